// The float32 and bfloat16 engines' XLA FFI handlers: a 1x1 product in the loops of
// float_product.h (which describes them), float32 out, float32 in (or bfloat16 for the
// bfloat16 loops), its precision that of the packed weights; and the 3x3 depthwise layer +
// ReLU6 in float32 (the int8 engine's depthwise loop for AVX-512, int8_depthwise.h, with
// float32 input and float32 or bfloat16 output:
//
//   y = b[c];  y = fma(x[n, oy*s + i*d - pt, ox*s + j*d - pl, c], w[i, j, c], y)
//                for (i, j) in row-major order, 0 outside the input ('SAME' padding)
//   out[n, oy, ox, c] = clip(y, 0, 6)   (bfloat16: rounded to nearest even)
//
// XLA's float32 taps of forward._depthwise summed in one fixed order), alone or after a
// large expansion in one pass; the stem pass (int8_stem.cc's, writing float32 or bfloat16)
// with block 0's projection in one pass; and the class map: logits upsampled and their
// argmax, row by row (UpsampledArgmax). Built into
// the same library as the int8 kernels by seg/inference/int8_kernel.py (`build`), called
// through float_kernel.py. Work is split into chunks shared by the calling thread and XLA's
// intra-op thread pool (kernel_threads.h).
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "class_map.h"
#include "float_product.h"
#include "int8_depthwise.h"
#include "int8_stem.h"
#include "mask_png.h"
#include "kernel_cpu.h"
#include "kernel_threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace seg::floating;  // NOLINT: the loops, modes and Problem of one kernel

// The packed weights of loop `isa` for k inputs and n outputs into p: bfloat16 (uint16)
// [panels][kp / 2][16][2] for the bfloat16 loops, float32 [panels][k][16] for the float32
// loops.
ffi::Error SetWeights(ffi::AnyBuffer& w, int32_t isa, Problem& p) {
  const int64_t panels = (p.n + kPanel - 1) / kPanel;
  if (isa < kAvx512Bf16 || isa > kAvx2F32) return ffi::Error::InvalidArgument("unknown isa");
  const bool f32 = isa == kAvx512F32 || isa == kAvx2F32;
  if (w.element_type() != (f32 ? ffi::DataType::F32 : ffi::DataType::U16) ||
      static_cast<int64_t>(w.element_count()) != panels * kPanel * (f32 ? p.k : p.kp))
    return ffi::Error::InvalidArgument("packed weights do not match the loop, the input and "
                                       "output sizes");
  if (!RunsLoop(isa))
    return ffi::Error::InvalidArgument("this CPU lacks the instructions of that loop (isa)");
  if (isa == kAmxBf16 && !seg::product::AmxPermitted())
    return ffi::Error::Internal("the kernel (Linux) refused this process AMX's tile registers");
  if (f32) p.wf = static_cast<const float*>(w.untyped_data());
  else p.w = static_cast<const uint16_t*>(w.untyped_data());
  return ffi::Error::Success();
}

// Rows [0, m) of p on this thread, kChunkRows at a time as FloatProduct's threads take them:
// a block of input rows the loops sweep once per group of panels stays in the core's cache.
inline void RunRowsInChunks(const Problem& p, int64_t m) {
  for (int64_t row = 0; row < m; row += kChunkRows)
    RunRows(p, row, std::min(m, row + kChunkRows));
}

ffi::Error FloatProduct(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                       ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> residual,
                       int32_t mode, int32_t isa, ffi::ResultBuffer<ffi::F32> out) {
  const auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("x needs a channel axis");
  int64_t m = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) m *= dims[i];
  const int64_t k = dims.back(), n = static_cast<int64_t>(bias.element_count());
  const int64_t panels = (n + kPanel - 1) / kPanel;
  const int64_t kp = (k + kKMultiple - 1) / kKMultiple * kKMultiple;
  if (mode < kLinear || mode > kRelu) return ffi::Error::InvalidArgument("unknown mode");
  const size_t size = static_cast<size_t>(m * n);
  if (out->element_count() != size)
    return ffi::Error::InvalidArgument("the output is [..., out]");
  if (residual.element_count() && (residual.element_count() != size || mode != kLinear))
    return ffi::Error::InvalidArgument("a residual is [..., out], in mode 0 only");
  std::vector<float> padded_bias(panels * kPanel, 0.f);
  std::copy_n(bias.typed_data(), n, padded_bias.begin());
  const bool bf16_in = x.element_type() == ffi::DataType::BF16;
  if (!bf16_in && x.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("x is float32, or bfloat16 for the bfloat16 loops");
  if (bf16_in && (isa == kAvx512F32 || isa == kAvx2F32))
    return ffi::Error::InvalidArgument("bfloat16 x: the bfloat16 loops only");
  Problem p{bf16_in ? nullptr : static_cast<const float*>(x.untyped_data()), m, k, n, kp,
            nullptr, padded_bias.data(), mode, isa,
            residual.element_count() ? residual.typed_data() : nullptr, out->typed_data()};
  if (bf16_in) p.xb = static_cast<const uint16_t*>(x.untyped_data());
  if (auto error = SetWeights(w, isa, p); error.failure()) return error;
  seg::ForEachRange(pool, m, kGrainRows, kChunkRows,
                    [&p](int64_t begin, int64_t end) { RunRows(p, begin, end); });
  return ffi::Error::Success();
}

using seg::depthwise::Depthwise;

// run(S, D) with the compile-time (stride, dilation) pair, among those compiled
// (float_kernel.py: DEPTHWISE_STRIDES, MobileNetV2's at output stride 8, 16 and 32).
template <typename Run>
ffi::Error WithStride(int32_t stride, int32_t dilation, Run run) {
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  if (stride == 1 && dilation == 1) run(I1(), I1());
  else if (stride == 2 && dilation == 1) run(I2(), I1());
  else if (stride == 1 && dilation == 2) run(I1(), I2());
  else if (stride == 1 && dilation == 4) run(I1(), std::integral_constant<int, 4>());
  else return ffi::Error::InvalidArgument("stride and dilation: (1, 1), (2, 1), (1, 2), (1, 4)");
  return ffi::Error::Success();
}

// Output rows [oy0, oy0 + d.band) of image n (and before `limit`), float32 in and out, in
// the AVX-512 loop (d.wide) or the AVX2 one (c a multiple of 8): the same numbers.
template <int S, int D>
void FloatBand(const Depthwise& d, int64_t n, int64_t oy0, std::vector<float>& buffer,
               int64_t limit) {
  using seg::depthwise::kBfloat16;
  using seg::depthwise::kFloat32;
  if (d.outb) d.BandWide<S, D, kBfloat16>(n, oy0, buffer, limit);  // (checked: d.wide)
  else if (d.wide) d.BandWide<S, D, kFloat32>(n, oy0, buffer, limit);
  else d.Band<S, D, true>(n, oy0, buffer, limit);
}

// The output of a float32 depthwise layer into d: float32 (outf) or, in the AVX-512 loop,
// bfloat16 (outb, the bfloat16 products' input).
ffi::Error SetOutput(ffi::Result<ffi::AnyBuffer>& out, Depthwise& d) {
  if (out->element_type() == ffi::DataType::BF16) {
    if (!d.wide) return ffi::Error::InvalidArgument("bfloat16 out: the AVX-512 loop only");
    d.outb = static_cast<uint16_t*>(out->untyped_data());
  } else if (out->element_type() == ffi::DataType::F32) {
    d.outf = static_cast<float*>(out->untyped_data());
  } else {
    return ffi::Error::InvalidArgument("out is float32 or bfloat16");
  }
  return ffi::Error::Success();
}

template <int S, int D>
void RunDepthwise(ffi::ThreadPool& pool, const Depthwise& d, int64_t images) {
  seg::ForEachRows(pool, images, d.oh, 1, d.band, [&d](int64_t n, int64_t oy0, int64_t oy1) {
    thread_local std::vector<float> buffer;
    FloatBand<S, D>(d, n, oy0, buffer, oy1);
  });
}

// The float32 depthwise layer d of c channels from x's dimensions xd to out's od (weights w
// [3, 3, c], bias b): its stride, dilation and padding, the AVX-512 loop where `wide` (else
// the AVX2 one, channels in 8s); an error where out is not x's size over the stride.
template <typename Dims>
ffi::Error MakeDepthwise(const Dims& xd, const Dims& od, int64_t c, const float* w,
                         const float* b, int32_t stride, int32_t dilation, int32_t pad_top,
                         int32_t pad_left, bool wide, Depthwise& d) {
  d = Depthwise{nullptr, xd[1], xd[2], c, w, b, 1.f, stride, dilation, pad_top, pad_left,
                nullptr, od[1], od[2], 1};
  if (d.oh != (d.h + stride - 1) / stride || d.ow != (d.w + stride - 1) / stride)
    return ffi::Error::InvalidArgument("the output is not the input's size over the stride");
  d.wide = wide;
  if (!wide && c % 8 != 0)
    return ffi::Error::InvalidArgument("the AVX2 depthwise loop takes channels in 8s");
  return ffi::Error::Success();
}

ffi::Error F32Depthwise(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::F32> b, int32_t stride, int32_t dilation,
                        int32_t pad_top, int32_t pad_left, bool wide,
                        ffi::Result<ffi::AnyBuffer> out) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || od.size() != 4 || wd.size() != 3 || wd[0] != seg::depthwise::kSize ||
      wd[1] != seg::depthwise::kSize)
    return ffi::Error::InvalidArgument("x and out are [n, h, w, c], the weights [3, 3, c]");
  const int64_t c = xd[3];
  if (wd[2] != c || od[3] != c || od[0] != xd[0] || b.element_count() != c)
    return ffi::Error::InvalidArgument("weights, bias and output do not match x's channels");
  if (wide && !seg::HasAvx512())
    return ffi::Error::InvalidArgument("the AVX-512 depthwise loop needs AVX-512 F, BW, VL, DQ");
  Depthwise d;
  if (auto error = MakeDepthwise(xd, od, c, w.typed_data(), b.typed_data(), stride, dilation,
                                 pad_top, pad_left, wide, d);
      error.failure())
    return error;
  d.xf = x.typed_data();
  if (auto error = SetOutput(out, d); error.failure()) return error;
  d.ChooseBand();
  return WithStride(stride, dilation, [&](auto s, auto dl) {
    RunDepthwise<decltype(s)::value, decltype(dl)::value>(pool, d, xd[0]);
  });
}

// ------------------------------------------------------------------------------------------
// Output rows [oy0, oy1) of image `image` of depthwise layer d (its input set up by the
// caller) through the projection p after it: the rows go into a buffer that stays in the
// core's cache (bfloat16 for the bfloat16 loops, as the product would round them), then the
// product writes its rows of `out` (and adds p.residual's). The same numbers as the two
// calls; each output row of the projection is one of the depthwise layer's.
template <int S, int D>
void DepthwiseThenProject(const Depthwise& d, const Problem& p, float* out, int64_t image,
                          int64_t oy0, int64_t oy1) {
  thread_local std::vector<float> converted, midf;
  thread_local std::vector<uint16_t> midb;
  const int64_t pixels = (oy1 - oy0) * d.ow;
  const bool bf16 = p.isa == kAvx512Bf16 || p.isa == kAmxBf16;
  Depthwise chunk = d;
  chunk.outf = nullptr;
  chunk.outb = nullptr;
  chunk.out_row_base = image * d.oh + oy0;
  Problem q = p;
  if (bf16) {
    midb.resize(pixels * d.c);
    chunk.outb = midb.data();
    q.xb = midb.data();
  } else {
    midf.resize(pixels * d.c);
    chunk.outf = midf.data();
    q.x = midf.data();
  }
  for (int64_t oy = oy0; oy < oy1; oy += d.band) FloatBand<S, D>(chunk, image, oy, converted, oy1);
  const int64_t first = (image * d.oh + oy0) * d.ow;
  q.m = pixels;
  q.out = out + first * p.n;
  if (p.residual) q.residual = p.residual + first * p.n;
  RunRowsInChunks(q, pixels);
}

// A residual argument's data: null for [0], an error unless it has `size` elements.
ffi::Error ResidualData(ffi::Buffer<ffi::F32>& residual, size_t size, const float*& data) {
  data = residual.element_count() ? residual.typed_data() : nullptr;
  if (data && residual.element_count() != size)
    return ffi::Error::InvalidArgument("a residual is out's shape");
  return ffi::Error::Success();
}

// The projection of the one-pass handlers into p (k inputs): packed weights w for loop
// `isa`, `bias` (padded into `padded_bias`), `residual` (or null) added to its output.
ffi::Error SetProjection(ffi::AnyBuffer& w, ffi::Buffer<ffi::F32>& bias,
                         const float* residual, int64_t k, int32_t isa,
                         std::vector<float>& padded_bias, Problem& p) {
  const int64_t n = static_cast<int64_t>(bias.element_count());
  padded_bias.assign((n + kPanel - 1) / kPanel * kPanel, 0.f);
  std::copy_n(bias.typed_data(), n, padded_bias.begin());
  p = Problem{nullptr, 0, k, n, (k + kKMultiple - 1) / kKMultiple * kKMultiple, nullptr,
              padded_bias.data(), kLinear, isa, residual, nullptr};
  return SetWeights(w, isa, p);
}

// ------------------------------------------------------------------------------------------
// An expansion (ReLU6) and the depthwise layer after it in one pass (float_kernel.py:
// expand_depthwise), the same numbers as the two calls: a chunk is a band of the depthwise
// layer's output rows of one image; it computes the expansion's output for just the input
// rows that band reads, into a buffer that stays in the core's cache, and runs the
// depthwise loop over it. The expansion's output (25 MB of float32 for block 1 of a 513x513
// image) never goes to memory; the input rows a band shares with the next (one at stride 2,
// two at stride 1) are computed by both.
constexpr int64_t kFusedBytes = 1024 * 1024;  // a band's expansion output, at most

template <int S, int D>
void FusedRun(ffi::ThreadPool& pool, const Problem& p, const Depthwise& d, int64_t images,
              int64_t rows, const Problem* project, float* projected) {
  seg::ForEachRows(pool, images, d.oh, 2, rows, [&](int64_t n, int64_t oy0, int64_t oy1) {
    thread_local std::vector<float> expanded, converted;
    const int64_t first = std::max<int64_t>(oy0 * S - d.pad_top, 0);
    const int64_t last = std::min<int64_t>((oy1 - 1) * S + 2 * D - d.pad_top + 1, d.h);
    const int64_t pixels = (last - first) * d.w;
    expanded.resize(pixels * p.n);
    Problem q = p;
    q.x = p.x + (n * d.h + first) * d.w * p.k;
    q.m = pixels;
    q.out = expanded.data();
    RunRows(q, 0, pixels);
    Depthwise band = d;
    band.xf = expanded.data();
    band.row_base = n * d.h + first;
    if (project) {
      DepthwiseThenProject<S, D>(band, *project, projected, n, oy0, oy1);
      return;
    }
    for (int64_t oy = oy0; oy < oy1; oy += d.band) FloatBand<S, D>(band, n, oy, converted, oy1);
  });
}

ffi::Error FloatExpandDepthwise(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::AnyBuffer w, ffi::Buffer<ffi::F32> bias,
                               ffi::Buffer<ffi::F32> wd, ffi::Buffer<ffi::F32> bd,
                               ffi::AnyBuffer pw, ffi::Buffer<ffi::F32> pb,
                               ffi::Buffer<ffi::F32> residual, int32_t isa, int32_t stride,
                               int32_t dilation, int32_t pad_top, int32_t pad_left,
                               ffi::Result<ffi::AnyBuffer> out) {
  const auto xd = x.dimensions(), wdd = wd.dimensions(), od = out->dimensions();
  const int64_t e = static_cast<int64_t>(bias.element_count());
  const bool projects = pb.element_count() > 0;  // the projection too: out is its output
  if (xd.size() != 4 || od.size() != 4 || od[0] != xd[0] ||
      od[3] != (projects ? static_cast<int64_t>(pb.element_count()) : e))
    return ffi::Error::InvalidArgument(
        "x is [n, h, w, k] and out [n, oh, ow, expanded] (or [n, oh, ow, out] projected)");
  if (wdd.size() != 3 || wdd[0] != 3 || wdd[1] != 3 || wdd[2] != e || bd.element_count() != e)
    return ffi::Error::InvalidArgument(
        "the depthwise weights are [3, 3, expanded], bias [expanded]");
  const int64_t k = xd[3], panels = (e + kPanel - 1) / kPanel;
  const int64_t kp = (k + kKMultiple - 1) / kKMultiple * kKMultiple;
  std::vector<float> padded_bias(panels * kPanel, 0.f);
  std::copy_n(bias.typed_data(), e, padded_bias.begin());
  Problem p{x.typed_data(), 0, k, e, kp, nullptr, padded_bias.data(), kRelu6, isa, nullptr,
            nullptr};
  if (auto error = SetWeights(w, isa, p); error.failure()) return error;
  Depthwise d;  // AVX-512 for the bfloat16 loops and kAvx512F32
  if (auto error = MakeDepthwise(xd, od, e, wd.typed_data(), bd.typed_data(), stride, dilation,
                                 pad_top, pad_left, isa != kAvx2F32, d);
      error.failure())
    return error;
  Problem project;
  std::vector<float> project_bias;
  if (projects) {
    if (out->element_type() != ffi::DataType::F32)
      return ffi::Error::InvalidArgument("a projection's out is float32");
    const float* r;
    if (auto error = ResidualData(residual, static_cast<size_t>(od[0] * od[1] * od[2] * od[3]),
                                  r);
        error.failure())
      return error;
    if (auto error = SetProjection(pw, pb, r, e, isa, project_bias, project); error.failure())
      return error;
  } else if (residual.element_count()) {
    return ffi::Error::InvalidArgument("a residual goes with a projection");
  } else if (auto error = SetOutput(out, d); error.failure()) {
    return error;
  }
  d.ChooseBand();
  // Output rows per chunk: as many as keep the band's expansion output within kFusedBytes,
  // and at most an eighth of the image's, so that two threads share even a batch of one.
  int64_t rows = 1;
  while (rows < (d.oh + 7) / 8 &&
         (rows * stride + 2 * dilation + 1) * d.w * e * 4 <= kFusedBytes)
    ++rows;
  return WithStride(stride, dilation, [&](auto s, auto dl) {
    FusedRun<decltype(s)::value, decltype(dl)::value>(
        pool, p, d, xd[0], rows, projects ? &project : nullptr,
        projects ? static_cast<float*>(out->untyped_data()) : nullptr);
  });
}

// ------------------------------------------------------------------------------------------
// A depthwise layer and the projection after it in one pass (float_kernel.py:
// depthwise_project), the same numbers as the two calls: a chunk of the depthwise layer's
// output rows of one image goes into a buffer that stays in the core's cache (bfloat16 for
// the bfloat16 loops, as the product would round it), then through the product (with the
// residual block's sum). The depthwise output never goes to memory, and there is nothing to
// compute twice: each output row of the projection is one of the depthwise layer's.
constexpr int64_t kMidBytes = 256 * 1024;  // a chunk's depthwise output, at most

ffi::Error FloatDepthwiseProject(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                 ffi::Buffer<ffi::F32> wd, ffi::Buffer<ffi::F32> bd,
                                 ffi::AnyBuffer w, ffi::Buffer<ffi::F32> bias,
                                 ffi::Buffer<ffi::F32> residual, int32_t isa, int32_t stride,
                                 int32_t dilation, int32_t pad_top, int32_t pad_left,
                                 ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wdd = wd.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || od.size() != 4 || od[0] != xd[0])
    return ffi::Error::InvalidArgument("x is [n, h, w, c] and out [n, oh, ow, out]");
  const int64_t c = xd[3];
  if (wdd.size() != 3 || wdd[0] != 3 || wdd[1] != 3 || wdd[2] != c || bd.element_count() != c)
    return ffi::Error::InvalidArgument("the depthwise weights are [3, 3, c], bias [c]");
  if (od[3] != static_cast<int64_t>(bias.element_count()))
    return ffi::Error::InvalidArgument("out's channels are the bias's");
  Problem p;
  std::vector<float> padded_bias;
  const float* r;
  if (auto error = ResidualData(residual, out->element_count(), r); error.failure())
    return error;
  if (auto error = SetProjection(w, bias, r, c, isa, padded_bias, p); error.failure())
    return error;
  Depthwise d;  // AVX-512 for the bfloat16 loops and kAvx512F32
  if (auto error = MakeDepthwise(xd, od, c, wd.typed_data(), bd.typed_data(), stride, dilation,
                                 pad_top, pad_left, isa != kAvx2F32, d);
      error.failure())
    return error;
  d.xf = x.typed_data();
  d.ChooseBand();
  // Output rows per chunk: as many as keep the chunk's depthwise output within kMidBytes,
  // and at most an eighth of the image's, so that two threads share even a batch of one.
  const int64_t row_bytes = d.ow * c * (isa == kAvx512Bf16 || isa == kAmxBf16 ? 2 : 4);
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>((d.oh + 7) / 8,
                                                              kMidBytes / row_bytes));
  float* o = out->typed_data();
  return WithStride(stride, dilation, [&](auto s, auto dl) {
    seg::ForEachRows(pool, xd[0], d.oh, 1, rows, [&](int64_t image, int64_t oy0, int64_t oy1) {
      DepthwiseThenProject<decltype(s)::value, decltype(dl)::value>(d, p, o, image, oy0, oy1);
    });
  });
}

// ------------------------------------------------------------------------------------------
// The stem pass (int8_stem.h, writing float32 or bfloat16) and block 0's projection in one
// pass (float_kernel.py: stem_project), the same numbers as the two calls: a chunk of output
// rows of one image goes through the stem and depthwise layer into a buffer that stays in
// the core's cache (bfloat16 for the bfloat16 loops: the product's input as it would round
// it), then through the product. Block 0's depthwise output (a 257 x 257 x 32 map at 513 x
// 513) never goes to memory.
constexpr int64_t kStemMidBytes = 512 * 1024;  // a chunk's depthwise output, at most

ffi::Error FloatStemProject(ffi::ThreadPool pool, ffi::AnyBuffer x,
                            ffi::Buffer<ffi::S32> sizes, ffi::Buffer<ffi::F32> ws,
                            ffi::Buffer<ffi::F32> bs, ffi::Buffer<ffi::F32> wd,
                            ffi::Buffer<ffi::F32> bd,
                            ffi::Buffer<ffi::F32> unused_scale, ffi::AnyBuffer w,
                            ffi::Buffer<ffi::F32> bias, int32_t pad_top, int32_t pad_left,
                            int32_t isa, ffi::ResultBuffer<ffi::F32> out) {
  const auto od = out->dimensions();
  if (od.size() != 4) return ffi::Error::InvalidArgument("out is [n, oh, ow, channels]");
  seg::stem::Stem s;
  ffi::Error error = seg::stem::Make(x, sizes, ws, bs, wd, bd, unused_scale, pad_top, pad_left,
                                     od[0], od[1], od[2], nullptr, pool.num_threads(), s);
  if (error.failure()) return error;
  const int64_t n = static_cast<int64_t>(bias.element_count()), k = s.c;
  if (od[3] != n) return ffi::Error::InvalidArgument("out's channels are the bias's");
  Problem p;
  std::vector<float> padded_bias;
  if (auto e = SetProjection(w, bias, nullptr, k, isa, padded_bias, p); e.failure()) return e;
  const bool bf16 = isa == kAvx512Bf16 || isa == kAmxBf16;
  s.wide = isa != kAvx2F32;  // the other loops' CPUs have AVX-512 F, BW, VL and DQ
  if (bf16 && !s.Wide())
    return ffi::Error::InvalidArgument("the bfloat16 loops take the stem's channels in 16s");
  const int64_t pixel_bytes = s.ow * k * (bf16 ? 2 : 4);
  const int64_t most = std::max<int64_t>(seg::stem::kGrainRows,
                                         std::min<int64_t>(s.rows, kStemMidBytes / pixel_bytes));
  float* o = out->typed_data();
  seg::ForEachRows(pool, od[0], s.oh, seg::stem::kGrainRows, most,
                   [&](int64_t image, int64_t oy0, int64_t oy1) {
    thread_local std::vector<float> rows, midf;
    thread_local std::vector<uint16_t> midb;
    const int64_t pixels = (oy1 - oy0) * s.ow;
    seg::stem::Stem chunk = s;
    chunk.out_base = image * s.oh + oy0;
    Problem q = p;
    if (bf16) {
      midb.resize(pixels * k);
      chunk.outb = midb.data();
      q.xb = midb.data();
    } else {
      midf.resize(pixels * k);
      chunk.outf = midf.data();
      q.x = midf.data();
    }
    chunk.Chunk(image, oy0, oy1, rows);
    q.m = pixels;
    q.out = o + (image * s.oh + oy0) * s.ow * n;
    RunRowsInChunks(q, pixels);
  });
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------
// The mean of each image's channels over its rows and columns (float_kernel.py: mean, the
// head's image pooling): the float32 sum over pixels in row-major order, divided by their
// count. On the calling thread (a 33 x 33 x 320 map: tens of microseconds), its time
// recorded as the other kernels' (kernel_threads.h: CallTimes).
ffi::Error FloatMean(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || od.size() != 2 || od[0] != xd[0] || od[1] != xd[3] ||
      xd[1] * xd[2] == 0)
    return ffi::Error::InvalidArgument("x is [n, h, w, c] (h, w > 0) and out [n, c]");
  const bool timed = seg::CallTimes::Get().On();
  const double start = timed ? seg::CallTimes::Now() : 0.0;
  const int64_t pixels = xd[1] * xd[2], c = xd[3];
  const float count = static_cast<float>(pixels);
  std::vector<float> sums(c);
  for (int64_t n = 0; n < xd[0]; ++n) {
    std::fill(sums.begin(), sums.end(), 0.f);
    const float* image = x.typed_data() + n * pixels * c;
    for (int64_t i = 0; i < pixels; ++i)
      for (int64_t j = 0; j < c; ++j) sums[j] += image[i * c + j];
    float* o = out->typed_data() + n * c;
    for (int64_t j = 0; j < c; ++j) o[j] = sums[j] / count;
  }
  if (timed) seg::CallTimes::Get().Add(start, seg::CallTimes::Now());
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------
// The class map (float_kernel.py: upsampled_argmax): every output row in class_map.h's
// vector loop, rows shared by the threads.
ffi::Error UpsampledArgmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                           ffi::Buffer<ffi::S32> row_lo, ffi::Buffer<ffi::F32> row_t,
                           ffi::Buffer<ffi::S32> col_lo, ffi::Buffer<ffi::F32> col_t,
                           ffi::ResultBuffer<ffi::U8> out) {
  const auto ld = logits.dimensions(), od = out->dimensions();
  if (ld.size() != 4 || od.size() != 3 || od[0] != ld[0])
    return ffi::Error::InvalidArgument("logits are [n, fh, fw, classes], out [n, h, w]");
  const int64_t fh = ld[1], fw = ld[2], classes = ld[3], height = od[1], width = od[2];
  if (classes < 1 || classes > 256 || fh < 1 || fw < 1)
    return ffi::Error::InvalidArgument("1 to 256 classes on a non-empty grid");
  if (static_cast<int64_t>(row_lo.element_count()) != height ||
      static_cast<int64_t>(row_t.element_count()) != height ||
      static_cast<int64_t>(col_lo.element_count()) != width ||
      static_cast<int64_t>(col_t.element_count()) != width)
    return ffi::Error::InvalidArgument("one tap (lo, t) per output row and per column");
  const int32_t* rl = row_lo.typed_data();
  const int32_t* cl = col_lo.typed_data();
  for (int64_t y = 0; y < height; ++y)
    if (rl[y] < 0 || rl[y] >= fh)
      return ffi::Error::InvalidArgument("a row tap outside the feature grid");
  for (int64_t x = 0; x < width; ++x)
    if (cl[x] < 0 || cl[x] >= fw || (x && cl[x] < cl[x - 1]))
      return ffi::Error::InvalidArgument("column taps must be ascending, on the feature grid");
  const seg::class_map::Columns columns(cl, col_t.typed_data(), fw, width);
  const float* f = logits.typed_data();
  const float* rt = row_t.typed_data();
  uint8_t* o = out->typed_data();
  seg::ForEachRows(pool, ld[0], height, 4, 32, [&](int64_t n, int64_t y0, int64_t y1) {
    thread_local std::vector<float> r, v;
    for (int64_t y = y0; y < y1; ++y) {
      seg::class_map::Blend(f + n * fh * fw * classes, fh, fw, classes, rl[y], rt[y], r);
      columns.Row(r, classes, v, o + (n * height + y) * width);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegFloatExpandDepthwise, FloatExpandDepthwise,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x [n, h, w, k]
                                  .Arg<ffi::AnyBuffer>()           // packed weights
                                  .Arg<ffi::Buffer<ffi::F32>>()    // bias [expanded]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // wd [3, 3, expanded]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // bd [expanded]
                                  .Arg<ffi::AnyBuffer>()           // projection: weights or [0]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // its bias [out] or [0]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // residual: out's shape or [0]
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("stride")
                                  .Attr<int32_t>("dilation")
                                  .Attr<int32_t>("pad_top")
                                  .Attr<int32_t>("pad_left")
                                  .Ret<ffi::AnyBuffer>());  // out [n, oh, ow, expanded] f32|bf16,
                                                            // or projected [n, oh, ow, out] f32

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegF32Depthwise, F32Depthwise,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x [n, h, w, c]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // w [3, 3, c]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // b [c]
                                  .Attr<int32_t>("stride")
                                  .Attr<int32_t>("dilation")
                                  .Attr<int32_t>("pad_top")
                                  .Attr<int32_t>("pad_left")
                                  .Attr<bool>("wide")              // the AVX-512 loop
                                  .Ret<ffi::AnyBuffer>());         // out [n, oh, ow, c] f32|bf16

extern "C" int SegFloatHasLoop(int isa) { return RunsLoop(isa) ? 1 : 0; }

// One image's class map by blocks (class_map.h: Blocks), on the calling thread, for NumPy
// arrays through ctypes (float_kernel.py: class_map_blocks, which checks the arguments).
extern "C" void SegClassMapBlocks(const float* logits, int64_t fh, int64_t fw, int64_t classes,
                                  int64_t height, int64_t width, const int32_t* row_lo,
                                  const float* row_t, const int32_t* col_lo,
                                  const float* col_t, int64_t block, uint8_t* out) {
  seg::class_map::Blocks(logits, fh, fw, classes, height, width, row_lo, row_t, col_lo, col_t,
                         block, out);
}

// Rows of a class map deflated as one of its PNGs (mask_png.h: Deflate), on the calling
// thread, for NumPy arrays through ctypes (seg/predict/png.py: MaskPngWriter).
extern "C" int64_t SegMaskDeflate(uint64_t* state, const uint8_t* rows, const uint8_t* previous,
                                  int64_t n, int64_t width, int64_t stride,
                                  const uint8_t* colours, int start, int finish, uint8_t* out) {
  static_assert(sizeof(seg::mask_png::State) == 4 * sizeof(uint64_t), "4 uint64");
  return seg::mask_png::Deflate(reinterpret_cast<seg::mask_png::State*>(state), rows, previous,
                                n, width, stride, colours, start != 0, finish != 0, out);
}

// predict's overlay in place (mask_png.h: Overlay), through ctypes (seg/predict/outputs.py).
extern "C" void SegOverlay(uint8_t* rgb, int64_t height, int64_t width, int64_t stride,
                           int64_t pixel_bytes, const uint8_t* mask, int64_t mask_stride,
                           const uint8_t* colours) {
  seg::mask_png::Overlay(rgb, height, width, stride, pixel_bytes, mask, mask_stride, colours);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegFloatProduct, FloatProduct,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // x [..., k] f32 or bf16
                                  .Arg<ffi::AnyBuffer>()           // packed weights
                                  .Arg<ffi::Buffer<ffi::F32>>()    // bias [n]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // residual [..., n] or [0]
                                  .Attr<int32_t>("mode")
                                  .Attr<int32_t>("isa")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [..., n]

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegFloatDepthwiseProject, FloatDepthwiseProject,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x [n, h, w, c]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // wd [3, 3, c]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // bd [c]
                                  .Arg<ffi::AnyBuffer>()           // packed weights
                                  .Arg<ffi::Buffer<ffi::F32>>()    // bias [out]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // residual: out's shape or [0]
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("stride")
                                  .Attr<int32_t>("dilation")
                                  .Attr<int32_t>("pad_top")
                                  .Attr<int32_t>("pad_left")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [n, oh, ow, out]

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegFloatStemProject, FloatStemProject,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // x [n, h, w, 3]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // sizes [n, 2] or [0]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // ws [3, 3, 3, c]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // bs [c]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // wd [3, 3, c]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // bd [c]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // the stem's scale [] (unused)
                                  .Arg<ffi::AnyBuffer>()           // packed weights
                                  .Arg<ffi::Buffer<ffi::F32>>()    // bias [out]
                                  .Attr<int32_t>("pad_top")
                                  .Attr<int32_t>("pad_left")
                                  .Attr<int32_t>("isa")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [n, oh, ow, out]

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegFloatMean, FloatMean,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x [n, h, w, c]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [n, c]

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegUpsampledArgmax, UpsampledArgmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // logits [n, fh, fw, c]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // row taps: lo [h]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // and t [h]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // column taps: lo [w]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // and t [w]
                                  .Ret<ffi::Buffer<ffi::U8>>());   // classes [n, h, w]
