// The 3x3 depthwise layer of an inverted-residual block in the int8 engine, between the
// kernel's expansion (uint8 out) and its projection (uint8 in), as one pass over memory:
//
//   y = b[c];  y = fma(float(x[n, oy*s + i*d - pt, ox*s + j*d - pl, c]), w[i, j, c], y)
//                for (i, j) in row-major order, 0 outside the input ('SAME' padding)
//   out[n, oy, ox, c] = min(round(clip(y, 0, 6) * inv_out), 127)   (rounding half to even)
//
// x: [n, h, w, c] uint8, the expansion's ReLU6 output in the scale that w carries (0 stands
// for 0.0); w: [3, 3, c] float32; b: [c] float32; inv_out: 1 / the projection's input scale.
// The same function as XLA's taps in forward._depthwise followed by the projection's
// quantisation of its input, summed in another order (XLA's sums differ from any one order
// by a rounding now and then, so outputs may differ by one step).
//
// Work: a band of output rows and a block of 64 channels at a time; the input rows it reads
// are converted to float32 once, into a buffer (in L2) with the padding's zero columns on
// both sides, so that a tap is one fused multiply-add with no bounds to check. Each step computes 4 output pixels x 16
// channels (8 independent accumulator chains, enough to hide the FMA latency); stride and
// dilation are template arguments so that the compiler shares loads between taps. Eight
// channels per AVX2 vector: c is a multiple of 8. Built and loaded with int8_kernel.cc by
// seg/inference/int8_kernel.py; called through the XLA FFI.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernel_threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kSize = 3;                     // the window
constexpr int64_t kBlock = 64;               // channels converted and computed at a time
constexpr int64_t kBandBytes = 256 * 1024;   // converted input rows of a band, at most
constexpr int kMaxBandRows = 8;              // output rows per band, at most

struct Depthwise {
  const uint8_t* x;
  int64_t h, w, c;
  const float* wt;  // [3][3][c]
  const float* b;
  float inv_out;
  int64_t stride, dilation, pad_top, pad_left;
  uint8_t* out;
  int64_t oh, ow;
  int64_t band;  // output rows per chunk

  // Columns of a converted row: the input's, with the padding's zeros around them.
  int64_t Span() const { return (ow - 1) * stride + (kSize - 1) * dilation + 1; }
  int64_t InputRows(int64_t out_rows) const {
    return (out_rows - 1) * stride + (kSize - 1) * dilation + 1;
  }

  void ChooseBand() {
    band = 1;
    const int64_t row_bytes = Span() * kBlock * 4;
    while (band < kMaxBandRows && 4 * (band + 1) <= oh &&
           InputRows(band + 1) * row_bytes <= kBandBytes)
      ++band;
  }

  // Channels [ch, ch + width) of input row iy as float32 into r ([Span()][width]), with the
  // padding's zero columns left and right.
  void Convert(int64_t n, int64_t iy, int64_t ch, int64_t width, float* r) const {
    const int64_t first = pad_left, last = std::min(pad_left + w, Span());
    std::fill(r, r + first * width, 0.f);
    const uint8_t* src = x + (n * h + iy) * w * c + ch;
    for (int64_t col = first; col < last; ++col, src += c)
      for (int64_t k = 0; k < width; k += 8)
        _mm256_storeu_ps(r + col * width + k, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + k)))));
    std::fill(r + last * width, r + Span() * width, 0.f);
  }

  // U output pixels from ox x V vectors of 8 channels from ch (of the block that starts at
  // ch0 and is `width` channels wide) of the output row whose converted input rows are
  // rows[0..3) (null: padding), written to o (the row's output).
  template <int S, int D, int U, int V>
  void Pixels(const float* const* rows, int64_t width, int64_t ox, int64_t ch0, int64_t ch,
              uint8_t* o) const {
    __m256 acc[U][V];
    for (int v = 0; v < V; ++v) {
      const __m256 bias = _mm256_loadu_ps(b + ch0 + ch + 8 * v);
      for (int u = 0; u < U; ++u) acc[u][v] = bias;
    }
    for (int i = 0; i < kSize; ++i) {
      if (!rows[i]) continue;
      const float* r = rows[i] + ox * S * width + ch;
      for (int j = 0; j < kSize; ++j) {
        for (int v = 0; v < V; ++v) {
          const __m256 wv = _mm256_loadu_ps(wt + (i * kSize + j) * c + ch0 + ch + 8 * v);
          for (int u = 0; u < U; ++u)
            acc[u][v] = _mm256_fmadd_ps(
                _mm256_loadu_ps(r + (u * S + j * D) * width + 8 * v), wv, acc[u][v]);
        }
      }
    }
    const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.f),
                 inv = _mm256_set1_ps(inv_out);
    const __m256i top = _mm256_set1_epi32(127);
    for (int u = 0; u < U; ++u) {
      for (int v = 0; v < V; ++v) {
        const __m256 y = _mm256_min_ps(_mm256_max_ps(acc[u][v], zero), six);
        const __m256i q = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(y, inv)), top);
        const __m128i q16 = _mm_packus_epi32(_mm256_castsi256_si128(q),
                                             _mm256_extracti128_si256(q, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(o + (ox + u) * c + ch0 + ch + 8 * v),
                         _mm_packus_epi16(q16, q16));
      }
    }
  }

  // Channels [ch0, ch0 + width) of one output row.
  template <int S, int D>
  void OutputRow(const float* const* rows, int64_t ch0, int64_t width, uint8_t* o) const {
    int64_t ch = 0;
    for (; ch + 16 <= width; ch += 16) {
      int64_t ox = 0;
      for (; ox + 4 <= ow; ox += 4) Pixels<S, D, 4, 2>(rows, width, ox, ch0, ch, o);
      for (; ox < ow; ++ox) Pixels<S, D, 1, 2>(rows, width, ox, ch0, ch, o);
    }
    if (ch < width) {  // 8 channels left
      int64_t ox = 0;
      for (; ox + 4 <= ow; ox += 4) Pixels<S, D, 4, 1>(rows, width, ox, ch0, ch, o);
      for (; ox < ow; ++ox) Pixels<S, D, 1, 1>(rows, width, ox, ch0, ch, o);
    }
  }

  // Output rows [oy0, oy0 + band) of image n, a block of channels at a time.
  template <int S, int D>
  void Band(int64_t n, int64_t oy0, std::vector<float>& buffer) const {
    const int64_t oy1 = std::min(oh, oy0 + band);
    const int64_t first = oy0 * S - pad_top;  // the band's first input row (maybe padding)
    const int64_t count = InputRows(oy1 - oy0);
    bool used[kMaxBandRows * 4 + kSize * 8] = {};  // the input rows the band reads
    for (int64_t oy = oy0; oy < oy1; ++oy)
      for (int i = 0; i < kSize; ++i) {
        const int64_t iy = oy * S + i * D - pad_top;
        used[iy - first] = iy >= 0 && iy < h;
      }
    for (int64_t ch0 = 0; ch0 < c; ch0 += kBlock) {
      const int64_t width = std::min(kBlock, c - ch0), row_floats = Span() * width;
      buffer.resize(count * row_floats);
      for (int64_t k = 0; k < count; ++k)
        if (used[k]) Convert(n, first + k, ch0, width, buffer.data() + k * row_floats);
      for (int64_t oy = oy0; oy < oy1; ++oy) {
        const float* rows[kSize];
        for (int i = 0; i < kSize; ++i) {
          const int64_t iy = oy * S + i * D - pad_top;
          rows[i] = iy >= 0 && iy < h ? buffer.data() + (iy - first) * row_floats : nullptr;
        }
        OutputRow<S, D>(rows, ch0, width, out + (n * oh + oy) * ow * c);
      }
    }
  }
};

// The (stride, dilation) pairs compiled (int8_kernel.py: DEPTHWISE_STRIDES): MobileNetV2's
// at output stride 8, 16 and 32.
template <int S, int D>
void Run(ffi::ThreadPool& pool, const Depthwise& d, int64_t images) {
  const int64_t bands = (d.oh + d.band - 1) / d.band;
  seg::ForEachChunk(pool, images * bands, [&d, bands](int64_t k) {
    thread_local std::vector<float> buffer;
    d.Band<S, D>(k / bands, (k % bands) * d.band, buffer);
  });
}

ffi::Error Int8Depthwise(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> x, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> inv_out, int32_t stride,
                         int32_t dilation, int32_t pad_top, int32_t pad_left,
                         ffi::Result<ffi::Buffer<ffi::U8>> out) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || od.size() != 4 || wd.size() != 3 || wd[0] != kSize || wd[1] != kSize)
    return ffi::Error::InvalidArgument("x and out are [n, h, w, c], the weights [3, 3, c]");
  const int64_t c = xd[3];
  if (c % 8 != 0) return ffi::Error::InvalidArgument("the channels must be a multiple of 8");
  if (wd[2] != c || od[3] != c || od[0] != xd[0] || b.element_count() != c ||
      inv_out.element_count() != 1)
    return ffi::Error::InvalidArgument("weights, bias and output do not match x's channels");
  Depthwise d{x.typed_data(), xd[1], xd[2], c, w.typed_data(), b.typed_data(),
              inv_out.typed_data()[0], stride, dilation, pad_top, pad_left,
              out->typed_data(), od[1], od[2], 1};
  if (d.oh != (d.h + stride - 1) / stride || d.ow != (d.w + stride - 1) / stride)
    return ffi::Error::InvalidArgument("the output is not the input's size over the stride");
  d.ChooseBand();
  if (stride == 1 && dilation == 1) Run<1, 1>(pool, d, xd[0]);
  else if (stride == 2 && dilation == 1) Run<2, 1>(pool, d, xd[0]);
  else if (stride == 1 && dilation == 2) Run<1, 2>(pool, d, xd[0]);
  else if (stride == 1 && dilation == 4) Run<1, 4>(pool, d, xd[0]);
  else return ffi::Error::InvalidArgument("stride and dilation: (1, 1), (2, 1), (1, 2), (1, 4)");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegInt8Depthwise, Int8Depthwise,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()     // x [n, h, w, c]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // w [3, 3, c]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // b [c]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // inv_out []
                                  .Attr<int32_t>("stride")
                                  .Attr<int32_t>("dilation")
                                  .Attr<int32_t>("pad_top")
                                  .Attr<int32_t>("pad_left")
                                  .Ret<ffi::Buffer<ffi::U8>>());  // out [n, oh, ow, c]
