// The int8 kernel's XLA FFI handlers: a 1x1 product in the loops of int8_product.h (which
// describes them: modes, input forms, the AVX2, AVX-VNNI, VNNI and AMX loops), an expansion
// with its depthwise layer in one pass, and the stem pass with block 0's projection. Built
// and loaded by seg/inference/int8_kernel.py; called through the XLA FFI. Rows are split
// into chunks shared by the calling thread and XLA's intra-op thread pool
// (kernel_threads.h).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "int8_depthwise.h"
#include "int8_product.h"
#include "int8_stem.h"
#include "kernel_threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace seg::product;  // NOLINT: the loops, modes and Problem of one kernel

// ------------------------------------------------------------------------------------------
// The per-call state: the problem, and scale, bias and offsets padded to whole panels.
struct Work {
  Problem p;
  std::vector<float> scale, bias;  // zero-padded to whole panels; times inv_out in modes 3, 4
  std::vector<int32_t> offset;     // the VNNI loop's, for signed x

  void Prepare(const float* s, const float* b) {
    const int64_t panels = (p.n + kPanel - 1) / kPanel, padded = panels * kPanel;
    scale.assign(padded, 0.f);
    bias.assign(padded, 0.f);
    const float f = p.mode >= kRelu6Uint8 ? p.inv_out : 1.f;  // the requantising modes
    for (int64_t i = 0; i < p.n; ++i) { scale[i] = s[i] * f; bias[i] = b[i] * f; }
    p.scale = scale.data();
    p.bias = bias.data();
    p.offset = nullptr;
    if ((p.isa == kVnni || p.isa == kAvxVnni) && p.is_signed) {
      offset.resize(padded);
      if (p.isa == kVnni) VnniOffsets(p, offset.data()); else AvxVnniOffsets(p, offset.data());
      p.offset = offset.data();
    }
  }

  void RunRows(int64_t begin, int64_t end) const { RunRows(p, begin, end); }

  // Rows [begin, end) of q: p with other rows of x and out (the fused pass, below).
  static void RunRows(const Problem& q, int64_t begin, int64_t end) {
    if (q.isa == kAmx) AmxRun(q, begin, end);
    else if (q.isa == kVnni && q.is_signed && !q.offset_input) VnniRows<true>(q, begin, end);
    else if (q.isa == kVnni) VnniRows<false>(q, begin, end);
    else if (q.isa == kAvxVnni && q.is_signed && !q.offset_input) AvxVnniRows<true>(q, begin, end);
    else if (q.isa == kAvxVnni) AvxVnniRows<false>(q, begin, end);
    else if (q.is_signed) Rows<true>(q, begin, end);
    else Rows<false>(q, begin, end);
  }
};

// The checks of a product's weights and mode for k input channels, and its Work for m rows
// of x (`out`: where it writes).
ffi::Error MakeProduct(int64_t k, int64_t m, const uint8_t* x, ffi::Buffer<ffi::S8>& w,
                       ffi::Buffer<ffi::F32>& scale, ffi::Buffer<ffi::F32>& bias,
                       ffi::Buffer<ffi::F32>& inv_out, int32_t mode, bool is_signed,
                       bool offset_input, int32_t isa, void* out, Work& work) {
  const int64_t n = static_cast<int64_t>(scale.element_count());
  const int64_t panels = (n + kPanel - 1) / kPanel;
  if (k % 4 != 0) return ffi::Error::InvalidArgument("the input channels must be a multiple of 4");
  const int64_t kw = static_cast<int64_t>(w.element_count()) / (panels * kPanel);
  if (kw * panels * kPanel != static_cast<int64_t>(w.element_count()) || kw < k || kw % 4 != 0 ||
      kw - k >= 64)
    return ffi::Error::InvalidArgument("packed weights do not match the input and output sizes");
  if (isa < kAvx2 || isa > kAvxVnni) return ffi::Error::InvalidArgument("unknown isa");
  if (!RunsLoop(isa))
    return ffi::Error::InvalidArgument("this CPU lacks the instructions of that loop (isa)");
  if (isa == kAmx && kw % 64 != 0)
    return ffi::Error::InvalidArgument("AMX needs weights packed to a multiple of 64 inputs");
  if (isa == kAmx && !AmxPermitted())
    return ffi::Error::Internal("the kernel (Linux) refused this process AMX's tile registers");
  if (offset_input && (!is_signed || (isa != kVnni && isa != kAvxVnni)))
    return ffi::Error::InvalidArgument("x + 128 as uint8 is the VNNI loops' signed input only");
  if (mode < kLinear || mode > kLinearUint8Offset)
    return ffi::Error::InvalidArgument("unknown mode");
  if (inv_out.element_count() != 1) return ffi::Error::InvalidArgument("inv_out is one number");
  work.p = Problem{x, m, k, n, kw, w.typed_data(), scale.typed_data(), bias.typed_data(),
                    inv_out.typed_data()[0], mode, is_signed, offset_input, isa, nullptr, out};
  work.Prepare(scale.typed_data(), bias.typed_data());
  return ffi::Error::Success();
}

// MakeProduct for x's rows (all axes but the last) and channels.
ffi::Error MakeWork(ffi::AnyBuffer& x, ffi::Buffer<ffi::S8>& w, ffi::Buffer<ffi::F32>& scale,
                    ffi::Buffer<ffi::F32>& bias, ffi::Buffer<ffi::F32>& inv_out, int32_t mode,
                    bool is_signed, bool offset_input, int32_t isa, void* out, Work& work) {
  const auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("x needs a channel axis");
  if (offset_input && x.element_type() != ffi::DataType::U8)
    return ffi::Error::InvalidArgument("x + 128 must be uint8");
  int64_t m = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) m *= dims[i];
  return MakeProduct(dims.back(), m, static_cast<const uint8_t*>(x.untyped_data()), w, scale,
                     bias, inv_out, mode, is_signed, offset_input, isa, out, work);
}

ffi::Error Int8Product(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S8> w,
                       ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                       ffi::Buffer<ffi::F32> inv_out, ffi::Buffer<ffi::F32> residual,
                       int32_t mode, bool is_signed, bool offset_input, int32_t isa,
                       bool q_offset, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::AnyBuffer> out_q) {
  Work work;
  ffi::Error error = MakeWork(x, w, scale, bias, inv_out, mode, is_signed, offset_input, isa,
                              out->element_count() ? out->untyped_data() : nullptr, work);
  if (error.failure()) return error;
  const int64_t m = work.p.m;
  const size_t size = static_cast<size_t>(m * work.p.n);
  if ((residual.element_count() || out_q->element_count()) && mode != kLinear)
    return ffi::Error::InvalidArgument("a residual or a requantised output: mode 0 only");
  if ((residual.element_count() && residual.element_count() != size) ||
      (out_q->element_count() && out_q->element_count() != size) ||
      (out->element_count() != size && !(out->element_count() == 0 && out_q->element_count())))
    return ffi::Error::InvalidArgument("the residual and the outputs are [..., out]");
  if (residual.element_count()) work.p.residual = residual.typed_data();
  if (out_q->element_count()) work.p.out_q = out_q->untyped_data();
  work.p.q_offset = q_offset;
  seg::ForEachRange(pool, m, kGrainRows, kChunkRows,
                    [&work](int64_t begin, int64_t end) { work.RunRows(begin, end); });
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------
// An expansion and the depthwise layer after it in one pass (int8_kernel.py:
// expand_depthwise), the same numbers as the two calls: a chunk is a band of the depthwise
// layer's output rows of one image; it computes the expansion's uint8 output (mode 3) for
// just the input rows that band reads, into a buffer that stays in the core's cache, and
// runs int8_depthwise.h's bands over it. The expansion's output (6.3 MB for block 1 of a
// 513x513 image) never goes to memory; the input rows a band shares with the next (one at
// stride 2, two at stride 1) are computed by both.
constexpr int64_t kFusedBytes = 512 * 1024;  // a band's expansion output, at most

template <int S, int D>
void FusedRun(ffi::ThreadPool& pool, const Work& work, const seg::depthwise::Depthwise& d,
              int64_t images, int64_t rows) {
  seg::ForEachRows(pool, images, d.oh, 2, rows, [&work, &d](int64_t n, int64_t oy0,
                                                            int64_t oy1) {
    thread_local std::vector<uint8_t> expanded;
    thread_local std::vector<float> converted;
    const int64_t first = std::max<int64_t>(oy0 * S - d.pad_top, 0);
    const int64_t last = std::min<int64_t>((oy1 - 1) * S + 2 * D - d.pad_top + 1, d.h);
    const int64_t pixels = (last - first) * d.w;
    expanded.resize(pixels * work.p.n);
    Problem q = work.p;
    q.x = work.p.x + (n * d.h + first) * d.w * work.p.k;
    q.m = pixels;
    q.out = expanded.data();
    Work::RunRows(q, 0, pixels);
    seg::depthwise::Depthwise band = d;
    band.x = expanded.data();
    band.row_base = n * d.h + first;
    for (int64_t oy = oy0; oy < oy1; oy += d.band) band.AnyBand<S, D>(n, oy, converted, oy1);
  });
}

ffi::Error Int8ExpandDepthwise(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S8> w,
                               ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                               ffi::Buffer<ffi::F32> inv_mid, ffi::Buffer<ffi::F32> wd,
                               ffi::Buffer<ffi::F32> bd, ffi::Buffer<ffi::F32> inv_out,
                               bool is_signed, bool offset_input, int32_t isa, int32_t stride,
                               int32_t dilation, int32_t pad_top, int32_t pad_left,
                               ffi::Result<ffi::Buffer<ffi::U8>> out) {
  Work work;
  ffi::Error error = MakeWork(x, w, scale, bias, inv_mid, kRelu6Uint8, is_signed, offset_input,
                              isa, nullptr, work);
  if (error.failure()) return error;
  const auto xd = x.dimensions(), wdd = wd.dimensions(), od = out->dimensions();
  const int64_t e = work.p.n;
  if (xd.size() != 4 || od.size() != 4 || od[0] != xd[0] || od[3] != e)
    return ffi::Error::InvalidArgument("x is [n, h, w, k] and out [n, oh, ow, expanded]");
  if (e % 8 != 0) return ffi::Error::InvalidArgument("the channels must be a multiple of 8");
  if (wdd.size() != 3 || wdd[0] != 3 || wdd[1] != 3 || wdd[2] != e || bd.element_count() != e ||
      inv_out.element_count() != 1)
    return ffi::Error::InvalidArgument(
        "the depthwise weights are [3, 3, expanded], bias [expanded]");
  seg::depthwise::Depthwise d{nullptr, xd[1], xd[2], e, wd.typed_data(), bd.typed_data(),
                              inv_out.typed_data()[0], stride, dilation, pad_top, pad_left,
                              out->typed_data(), od[1], od[2], 1};
  if (d.oh != (d.h + stride - 1) / stride || d.ow != (d.w + stride - 1) / stride)
    return ffi::Error::InvalidArgument("the output is not the input's size over the stride");
  d.wide = isa == kVnni || isa == kAmx;  // their CPUs have AVX-512 F, BW, VL and DQ
  d.ChooseBand();
  // Output rows per chunk: as many as keep the band's expansion output within kFusedBytes,
  // and at most an eighth of the image's, so that two threads share even a batch of one.
  int64_t rows = 1;
  while (rows < (d.oh + 7) / 8 &&
         (rows * stride + 2 * dilation + 1) * d.w * e <= kFusedBytes)
    ++rows;
  if (stride == 1 && dilation == 1) FusedRun<1, 1>(pool, work, d, xd[0], rows);
  else if (stride == 2 && dilation == 1) FusedRun<2, 1>(pool, work, d, xd[0], rows);
  else if (stride == 1 && dilation == 2) FusedRun<1, 2>(pool, work, d, xd[0], rows);
  else if (stride == 1 && dilation == 4) FusedRun<1, 4>(pool, work, d, xd[0], rows);
  else return ffi::Error::InvalidArgument("stride and dilation: (1, 1), (2, 1), (1, 2), (1, 4)");
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------
// The stem pass (int8_stem.h) and block 0's projection in one (int8_kernel.py: stem with
// `project`): each chunk of rows writes the depthwise layer's uint8 output to a buffer that
// stays in the core's cache, and the projection (mode 4 or 5: block 1's input) reads it
// there, so the 257x257x32 map never goes to memory.
ffi::Error Int8StemProject(ffi::ThreadPool pool, ffi::AnyBuffer x,
                           ffi::Buffer<ffi::S32> sizes, ffi::Buffer<ffi::F32> ws,
                           ffi::Buffer<ffi::F32> bs, ffi::Buffer<ffi::F32> wd,
                           ffi::Buffer<ffi::F32> bd,
                           ffi::Buffer<ffi::F32> inv_mid, ffi::Buffer<ffi::S8> w,
                           ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                           ffi::Buffer<ffi::F32> inv_out, int32_t pad_top, int32_t pad_left,
                           int32_t mode, int32_t isa, ffi::Result<ffi::AnyBuffer> out) {
  const auto od = out->dimensions();
  if (od.size() != 4) return ffi::Error::InvalidArgument("out is [n, oh, ow, channels]");
  if (mode != kLinearInt8 && mode != kLinearUint8Offset)
    return ffi::Error::InvalidArgument("the projection writes the next input: mode 4 or 5");
  seg::stem::Stem s;
  ffi::Error error = seg::stem::Make(x, sizes, ws, bs, wd, bd, inv_mid, pad_top, pad_left,
                                     od[0], od[1], od[2], nullptr, pool.num_threads(), s);
  if (error.failure()) return error;
  Work work;
  error = MakeProduct(s.c, 0, nullptr, w, scale, bias, inv_out, mode, false, false, isa, nullptr,
                      work);
  if (error.failure()) return error;
  if (od[3] != work.p.n) return ffi::Error::InvalidArgument("out's channels are the weights'");
  s.wide = isa == kVnni || isa == kAmx;  // their CPUs have AVX-512 F, BW, VL and DQ
  uint8_t* o = static_cast<uint8_t*>(out->untyped_data());
  seg::ForEachRows(pool, od[0], s.oh, seg::stem::kGrainRows, s.rows,
                   [&s, &work, o](int64_t n, int64_t oy0, int64_t oy1) {
    thread_local std::vector<float> rows;
    thread_local std::vector<uint8_t> mid;
    const int64_t pixels = (oy1 - oy0) * s.ow;
    mid.resize(pixels * s.c);
    seg::stem::Stem chunk = s;
    chunk.out = mid.data();
    chunk.out_base = n * s.oh + oy0;
    chunk.Chunk(n, oy0, oy1, rows);
    Problem q = work.p;
    q.x = mid.data();
    q.m = pixels;
    q.out = o + (n * s.oh + oy0) * s.ow * work.p.n;  // one byte per output (modes 4, 5)
    Work::RunRows(q, 0, pixels);
  });
  return ffi::Error::Success();
}

}  // namespace

// Whether this process may use AMX (asks Linux once; int8_kernel.py calls it through ctypes).
extern "C" int SegAmxPermitted() { return AmxPermitted() ? 1 : 0; }

// Whether this library has loop `isa` (Isa), whatever the CPU: the compiler may have left the
// AVX-VNNI and AMX loops out (SEG_NEW_LOOPS).
extern "C" int SegHasLoop(int isa) {
  return isa == kAvx2 || isa == kVnni || ((isa == kAvxVnni || isa == kAmx) && SEG_NEW_LOOPS);
}

// Each kernel call's start and end (kernel_threads.h: CallTimes), through ctypes: recording
// started afresh (on) or stopped; the calls recorded, up to `most` (start, end) pairs
// copied to out.
extern "C" void SegRecordCallTimes(int on) { seg::CallTimes::Get().Record(on != 0); }
extern "C" int64_t SegCallTimes(double* out, int64_t most) {
  return seg::CallTimes::Get().Copy(out, most);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegInt8Product, Int8Product,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // x
                                  .Arg<ffi::Buffer<ffi::S8>>()     // packed weights
                                  .Arg<ffi::Buffer<ffi::F32>>()    // scale [n]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // bias [n]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // inv_out []
                                  .Arg<ffi::Buffer<ffi::F32>>()    // residual [..., n] or [0]
                                  .Attr<int32_t>("mode")
                                  .Attr<bool>("is_signed")
                                  .Attr<bool>("offset_input")
                                  .Attr<int32_t>("isa")
                                  .Attr<bool>("q_offset")
                                  .Ret<ffi::AnyBuffer>()           // out [..., n] or [0]
                                  .Ret<ffi::AnyBuffer>());         // out_q [..., n] or [0]

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegInt8StemProject, Int8StemProject,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // x [n, h, w, 3]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // sizes [n, 2] or [0]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // ws [3, 3, 3, c]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // bs [c]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // wd [3, 3, c]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // bd [c]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // inv_mid []
                                  .Arg<ffi::Buffer<ffi::S8>>()     // packed weights
                                  .Arg<ffi::Buffer<ffi::F32>>()    // scale [out]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // bias [out]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // inv_out []
                                  .Attr<int32_t>("pad_top")
                                  .Attr<int32_t>("pad_left")
                                  .Attr<int32_t>("mode")
                                  .Attr<int32_t>("isa")
                                  .Ret<ffi::AnyBuffer>());         // out [n, oh, ow, out]

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegInt8ExpandDepthwise, Int8ExpandDepthwise,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // x [n, h, w, k]
                                  .Arg<ffi::Buffer<ffi::S8>>()     // packed weights
                                  .Arg<ffi::Buffer<ffi::F32>>()    // scale [expanded]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // bias [expanded]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // inv_mid []
                                  .Arg<ffi::Buffer<ffi::F32>>()    // wd [3, 3, expanded]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // bd [expanded]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // inv_out []
                                  .Attr<bool>("is_signed")
                                  .Attr<bool>("offset_input")
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("stride")
                                  .Attr<int32_t>("dilation")
                                  .Attr<int32_t>("pad_top")
                                  .Attr<int32_t>("pad_left")
                                  .Ret<ffi::Buffer<ffi::U8>>());  // out [n, oh, ow, expanded]
