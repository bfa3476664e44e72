// The stem pass of int8_stem.cc (which describes it), shared with int8_kernel.cc's stem +
// projection pass; its AVX-512 loops also write block 0's depthwise output in float32
// (`outf`: float_kernel.py's stem pass of the float engines) or bfloat16 (`outb`: the
// bfloat16 engine's, rounded to nearest even as its products round their inputs).
#ifndef SEG_INFERENCE_INT8_STEM_H_
#define SEG_INFERENCE_INT8_STEM_H_

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernel_cpu.h"
#include "xla/ffi/api/ffi.h"

namespace seg {
namespace stem {

#define SEG_STEM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

constexpr int kMinRows = 16;   // output rows per chunk, at least (but near the end)
constexpr int kGrainRows = 4;  // the thread pool's claims near the end: a multiple of these

// The preprocessing of a uint8 pixel (seg/preprocessing.py: u / 127.5 - 1, as XLA computes
// it: times the float32 reciprocal and minus 1 in one fused multiply-add).
constexpr float kInvMeanPixel = static_cast<float>(1.0 / 127.5);

struct Stem {
  const float* x;             // the preprocessed image [n][h][w][3], or null: `xu`
  const uint8_t* xu = nullptr;  // or its pixels, preprocessed as they are read
  const int32_t* sizes = nullptr;  // [n][2]: each image's valid rows and columns, or null
  int64_t h, w;
  const float* ws;  // [3][3][3][c]
  const float* bs;
  const float* wd;  // [3][3][c]
  const float* bd;
  float inv_out;
  int64_t c, pad_top, pad_left;
  uint8_t* out;
  int64_t oh, ow;
  int64_t rows;  // output rows per chunk, at most
  int64_t out_base = 0;  // the first output row `out` holds (int8_kernel.cc: a chunk's)
  bool wide = false;     // the AVX-512 loops (c a multiple of 16; `Wide()`)
  float* outf = nullptr;  // float32 ReLU6 out instead of `out`
  uint16_t* outb = nullptr;  // or bfloat16 (rounded to nearest even; the AVX-512 loops only)

  // Floats of a padded input row: the 2 ow + 1 columns the stem reads, 3 channels each.
  int64_t PaddedRow() const { return (2 * ow + 1) * 3; }
  // Floats of a stem row: ow columns and a zero column on either side, c channels each.
  int64_t StemRow() const { return (ow + 2) * c; }

  // Input row iy of image n, columns -pad_left .. 2 ow - pad_left, into r; 0 outside, and
  // outside the image's valid rows and columns (`sizes`: preprocess_padded's mean pixel).
  void PadRow(int64_t n, int64_t iy, float* r) const {
    const int64_t first = std::min(pad_left, 2 * ow + 1);
    int64_t valid = std::min(pad_left + w, 2 * ow + 1) - first;
    if (sizes) {
      valid = iy < sizes[2 * n] ? std::max<int64_t>(0, std::min<int64_t>(valid, sizes[2 * n + 1]))
                                : 0;
    }
    std::fill(r, r + 3 * first, 0.f);
    const int64_t at = (n * h + iy) * w * 3;
    if (xu) {
      for (int64_t i = 0; i < 3 * valid; ++i)
        r[3 * first + i] = std::fma(static_cast<float>(xu[at + i]), kInvMeanPixel, -1.f);
    } else {
      std::copy(x + at, x + at + 3 * valid, r + 3 * first);
    }
    std::fill(r + 3 * (first + valid), r + PaddedRow(), 0.f);
  }

  // U stem pixels from sx x V vectors of 8 channels from ch, from the padded input rows in[3]
  // (null: padding), ReLU6, into s (the stem row, its column 0 the left padding).
  template <int U, int V>
  void StemPixels(const float* const* in, int64_t sx, int64_t ch, float* s) const {
    __m256 acc[U][V];
    for (int v = 0; v < V; ++v) {
      const __m256 bias = _mm256_loadu_ps(bs + ch + 8 * v);
      for (int u = 0; u < U; ++u) acc[u][v] = bias;
    }
    // Unrolled, so that the accumulators stay in registers.
#pragma GCC unroll 3
    for (int i = 0; i < 3; ++i) {
      if (!in[i]) continue;
      const float* r = in[i] + 2 * sx * 3;
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t) {  // (j, k) row-major: r[t] is column 2 sx + j, channel k
        __m256 wv[V];
        for (int v = 0; v < V; ++v) wv[v] = _mm256_loadu_ps(ws + (i * 9 + t) * c + ch + 8 * v);
        for (int u = 0; u < U; ++u) {
          const __m256 xv = _mm256_broadcast_ss(r + u * 6 + t);
          for (int v = 0; v < V; ++v) acc[u][v] = _mm256_fmadd_ps(xv, wv[v], acc[u][v]);
        }
      }
    }
    const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.f);
    for (int u = 0; u < U; ++u)
      for (int v = 0; v < V; ++v)
        _mm256_storeu_ps(s + (1 + sx + u) * c + ch + 8 * v,
                         _mm256_min_ps(_mm256_max_ps(acc[u][v], zero), six));
  }

  template <int V>
  void StemBlock(const float* const* in, int64_t ch, float* s) const {
    int64_t sx = 0;
    for (; sx + 2 <= ow; sx += 2) StemPixels<2, V>(in, sx, ch, s);
    for (; sx < ow; ++sx) StemPixels<1, V>(in, sx, ch, s);
  }

  // Stem row sy of image n into s; padded: scratch for 3 padded input rows.
  void StemRowOf(int64_t n, int64_t sy, float* s, float* padded) const {
    const float* in[3];
    for (int i = 0; i < 3; ++i) {
      const int64_t iy = 2 * sy + i - pad_top;
      in[i] = nullptr;
      if (iy >= 0 && iy < h) {
        PadRow(n, iy, padded + i * PaddedRow());
        in[i] = padded + i * PaddedRow();
      }
    }
    std::fill(s, s + c, 0.f);
    std::fill(s + (ow + 1) * c, s + (ow + 2) * c, 0.f);
    if (Wide()) return StemRowWide(in, s);
    int64_t ch = 0;
    for (; ch + 32 <= c; ch += 32) StemBlock<4>(in, ch, s);
    switch ((c - ch) / 8) {
      case 3: StemBlock<3>(in, ch, s); break;
      case 2: StemBlock<2>(in, ch, s); break;
      case 1: StemBlock<1>(in, ch, s); break;
      default: break;
    }
  }

  // U depthwise outputs from ox x V vectors from ch, from the stem rows rows[3] (null:
  // padding), rounded to uint8 into o (the output row), or with kFloat float32 ReLU6.
  template <int U, int V, bool kFloat = false>
  void DepthwisePixels(const float* const* rows, int64_t ox, int64_t ch, void* o) const {
    __m256 acc[U][V];
    for (int v = 0; v < V; ++v) {
      const __m256 bias = _mm256_loadu_ps(bd + ch + 8 * v);
      for (int u = 0; u < U; ++u) acc[u][v] = bias;
    }
#pragma GCC unroll 3
    for (int i = 0; i < 3; ++i) {
      if (!rows[i]) continue;
      const float* r = rows[i] + ox * c + ch;
#pragma GCC unroll 3
      for (int j = 0; j < 3; ++j)
        for (int v = 0; v < V; ++v) {
          const __m256 wv = _mm256_loadu_ps(wd + (i * 3 + j) * c + ch + 8 * v);
          for (int u = 0; u < U; ++u)
            acc[u][v] = _mm256_fmadd_ps(_mm256_loadu_ps(r + (u + j) * c + 8 * v), wv, acc[u][v]);
        }
    }
    const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.f),
                 inv = _mm256_set1_ps(inv_out);
    const __m256i top = _mm256_set1_epi32(127);
    for (int u = 0; u < U; ++u)
      for (int v = 0; v < V; ++v) {
        const __m256 y = _mm256_min_ps(_mm256_max_ps(acc[u][v], zero), six);
        if (kFloat) {
          _mm256_storeu_ps(static_cast<float*>(o) + (ox + u) * c + ch + 8 * v, y);
          continue;
        }
        const __m256i q = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(y, inv)), top);
        const __m128i q16 = _mm_packus_epi32(_mm256_castsi256_si128(q),
                                             _mm256_extracti128_si256(q, 1));
        _mm_storel_epi64(
            reinterpret_cast<__m128i*>(static_cast<uint8_t*>(o) + (ox + u) * c + ch + 8 * v),
            _mm_packus_epi16(q16, q16));
      }
  }

  // One output row into o: uint8, or with kFloat float32 ReLU6.
  template <bool kFloat = false>
  void DepthwiseRow(const float* const* rows, void* o) const {
    if (Wide()) return DepthwiseRowWide(rows, o);
    int64_t ch = 0;
    for (; ch + 16 <= c; ch += 16) {
      int64_t ox = 0;
      for (; ox + 4 <= ow; ox += 4) DepthwisePixels<4, 2, kFloat>(rows, ox, ch, o);
      for (; ox < ow; ++ox) DepthwisePixels<1, 2, kFloat>(rows, ox, ch, o);
    }
    if (ch < c) {  // 8 channels left
      int64_t ox = 0;
      for (; ox + 4 <= ow; ox += 4) DepthwisePixels<4, 1, kFloat>(rows, ox, ch, o);
      for (; ox < ow; ++ox) DepthwisePixels<1, 1, kFloat>(rows, ox, ch, o);
    }
  }

  // ----------------------------------------------------------------------------------------
  // The AVX-512 loops: the same sums in the same order, 16 channels per vector; the stem 4
  // pixels x 32 channels at a time (2 pixels with 8 channels per vector), the depthwise layer
  // 8 pixels x 16 channels with its weights in registers (1.5x and 1.25x as fast on a Zen 4,
  // measured).
  bool Wide() const { return wide && c % 16 == 0; }

  template <int U, int V>
  SEG_STEM_AVX512 void StemPixelsWide(const float* const* in, int64_t sx, int64_t ch,
                                      float* s) const {
    __m512 acc[U][V];
    for (int v = 0; v < V; ++v) {
      const __m512 bias = _mm512_loadu_ps(bs + ch + 16 * v);
      for (int u = 0; u < U; ++u) acc[u][v] = bias;
    }
#pragma GCC unroll 3
    for (int i = 0; i < 3; ++i) {
      if (!in[i]) continue;
      const float* r = in[i] + 2 * sx * 3;
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t) {
        __m512 wv[V];
        for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_ps(ws + (i * 9 + t) * c + ch + 16 * v);
        for (int u = 0; u < U; ++u) {
          const __m512 xv = _mm512_set1_ps(r[u * 6 + t]);
          for (int v = 0; v < V; ++v) acc[u][v] = _mm512_fmadd_ps(xv, wv[v], acc[u][v]);
        }
      }
    }
    const __m512 zero = _mm512_setzero_ps(), six = _mm512_set1_ps(6.f);
    for (int u = 0; u < U; ++u)
      for (int v = 0; v < V; ++v)
        _mm512_storeu_ps(s + (1 + sx + u) * c + ch + 16 * v,
                         _mm512_min_ps(_mm512_max_ps(acc[u][v], zero), six));
  }

  template <int V>
  SEG_STEM_AVX512 void StemBlockWide(const float* const* in, int64_t ch, float* s) const {
    constexpr int U = 8 / V;
    int64_t sx = 0;
    for (; sx + U <= ow; sx += U) StemPixelsWide<U, V>(in, sx, ch, s);
    for (; sx < ow; ++sx) StemPixelsWide<1, V>(in, sx, ch, s);
  }

  SEG_STEM_AVX512 void StemRowWide(const float* const* in, float* s) const {
    int64_t ch = 0;
    for (; ch + 32 <= c; ch += 32) StemBlockWide<2>(in, ch, s);
    if (ch < c) StemBlockWide<1>(in, ch, s);
  }

  // U depthwise outputs from ox of the 16 channels from ch, their weights wv[9] and bias in
  // registers across the row.
  template <int U>
  SEG_STEM_AVX512 void DepthwisePixelsWide(const float* const* rows, const __m512* wv,
                                           __m512 bias, int64_t ox, int64_t ch,
                                           void* o) const {
    __m512 acc[U];
    for (int u = 0; u < U; ++u) acc[u] = bias;
#pragma GCC unroll 3
    for (int i = 0; i < 3; ++i) {
      if (!rows[i]) continue;
      const float* r = rows[i] + ox * c + ch;
#pragma GCC unroll 3
      for (int j = 0; j < 3; ++j)
        for (int u = 0; u < U; ++u)
          acc[u] = _mm512_fmadd_ps(_mm512_loadu_ps(r + (u + j) * c), wv[i * 3 + j], acc[u]);
    }
    const __m512 zero = _mm512_setzero_ps(), six = _mm512_set1_ps(6.f),
                 inv = _mm512_set1_ps(inv_out);
    const __m512i top = _mm512_set1_epi32(127);
    for (int u = 0; u < U; ++u) {
      const __m512 y = _mm512_min_ps(_mm512_max_ps(acc[u], zero), six);
      if (outf) {
        _mm512_storeu_ps(static_cast<float*>(o) + (ox + u) * c + ch, y);
        continue;
      }
      if (outb) {
        _mm256_storeu_si256(
            reinterpret_cast<__m256i*>(static_cast<uint16_t*>(o) + (ox + u) * c + ch),
            RoundToBf16(y));
        continue;
      }
      const __m512i q = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(y, inv)), top);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint8_t*>(o) + (ox + u) * c + ch),
                       _mm512_cvtepi32_epi8(q));
    }
  }

  SEG_STEM_AVX512 void DepthwiseRowWide(const float* const* rows, void* o) const {
    for (int64_t ch = 0; ch < c; ch += 16) {
      __m512 wv[9];
      for (int t = 0; t < 9; ++t) wv[t] = _mm512_loadu_ps(wd + t * c + ch);
      const __m512 bias = _mm512_loadu_ps(bd + ch);
      int64_t ox = 0;
      for (; ox + 8 <= ow; ox += 8) DepthwisePixelsWide<8>(rows, wv, bias, ox, ch, o);
      for (; ox < ow; ++ox) DepthwisePixelsWide<1>(rows, wv, bias, ox, ch, o);
    }
  }

  // Output rows [oy0, oy1) of image n. The stem row sy lives in ring slot sy % 3.
  void Chunk(int64_t n, int64_t oy0, int64_t oy1, std::vector<float>& buffer) const {
    buffer.resize(3 * StemRow() + 3 * PaddedRow());
    float* ring = buffer.data();
    float* padded = ring + 3 * StemRow();
    auto slot = [&](int64_t sy) { return ring + (sy % 3) * StemRow(); };
    for (int64_t sy = std::max<int64_t>(oy0 - 1, 0); sy <= oy0; ++sy)
      StemRowOf(n, sy, slot(sy), padded);
    for (int64_t oy = oy0; oy < oy1; ++oy) {
      if (oy + 1 < oh) StemRowOf(n, oy + 1, slot(oy + 1), padded);
      const float* rows[3];
      for (int i = 0; i < 3; ++i) {
        const int64_t sy = oy + i - 1;
        rows[i] = sy >= 0 && sy < oh ? slot(sy) : nullptr;
      }
      const int64_t at = (n * oh + oy - out_base) * ow * c;
      if (outb) DepthwiseRowWide(rows, outb + at);  // (the FFI call checked Wide())
      else if (outf) DepthwiseRow<true>(rows, outf + at);
      else DepthwiseRow(rows, out + at);
    }
  }

  // The largest claim of rows (kernel_threads.h: ForEachRows; each chunk computes two stem
  // rows more than it writes): at least kMinRows, about a quarter of a thread's share of an
  // image; claims near the end are smaller.
  void ChooseRows(int64_t threads) {
    threads = std::max<int64_t>(threads, 1);
    rows = std::min<int64_t>(oh, std::max<int64_t>(kMinRows, (oh + 4 * threads - 1) /
                                                                 (4 * threads)));
  }
};

// The stem's arguments checked and its Stem (rows chosen for `threads`), writing c channels
// of [n, oh, ow] to `out` (null: set per chunk).
inline xla::ffi::Error Make(xla::ffi::AnyBuffer& x, xla::ffi::Buffer<xla::ffi::S32>& sizes,
                            xla::ffi::Buffer<xla::ffi::F32>& ws,
                            xla::ffi::Buffer<xla::ffi::F32>& bs,
                            xla::ffi::Buffer<xla::ffi::F32>& wd,
                            xla::ffi::Buffer<xla::ffi::F32>& bd,
                            xla::ffi::Buffer<xla::ffi::F32>& inv_out, int32_t pad_top,
                            int32_t pad_left, int64_t n, int64_t oh, int64_t ow, uint8_t* out,
                            int64_t threads, Stem& s) {
  using xla::ffi::Error;
  const auto xd = x.dimensions(), sd = ws.dimensions(), dd = wd.dimensions();
  if (xd.size() != 4 || xd[3] != 3 || sd.size() != 4)
    return Error::InvalidArgument("x is [n, h, w, 3] and the stem's weights [3, 3, 3, c]");
  const bool pixels = x.element_type() == xla::ffi::DataType::U8;
  if (!pixels && x.element_type() != xla::ffi::DataType::F32)
    return Error::InvalidArgument("x is float32 (preprocessed) or uint8 (pixels)");
  if (sizes.element_count() != 0 && (sizes.dimensions().size() != 2 ||
                                     sizes.dimensions()[0] != xd[0] ||
                                     sizes.dimensions()[1] != 2))
    return Error::InvalidArgument("sizes are [n, 2] (valid rows, columns) or empty");
  const int64_t c = sd[3];
  if (c % 8 != 0) return Error::InvalidArgument("the channels must be a multiple of 8");
  if (sd[0] != 3 || sd[1] != 3 || sd[2] != 3 || dd.size() != 3 || dd[0] != 3 || dd[1] != 3 ||
      dd[2] != c || bs.element_count() != c || bd.element_count() != c ||
      inv_out.element_count() != 1)
    return Error::InvalidArgument(
        "the stem's weights are [3, 3, 3, c], the depthwise [3, 3, c], the biases [c]");
  if (n != xd[0] || oh != (xd[1] + 1) / 2 || ow != (xd[2] + 1) / 2)
    return Error::InvalidArgument("the output is not the input's size over 2");
  if (pad_top < 0 || pad_top > 2 || pad_left < 0 || pad_left > 2)
    return Error::InvalidArgument("the padding before is 0, 1 or 2");
  s = Stem{pixels ? nullptr : static_cast<const float*>(x.untyped_data()),
           pixels ? static_cast<const uint8_t*>(x.untyped_data()) : nullptr,
           sizes.element_count() ? sizes.typed_data() : nullptr, xd[1], xd[2], ws.typed_data(),
           bs.typed_data(), wd.typed_data(), bd.typed_data(), inv_out.typed_data()[0], c,
           pad_top, pad_left, out, oh, ow, 0};
  s.ChooseRows(threads);
  return Error::Success();
}

}  // namespace stem
}  // namespace seg

#endif  // SEG_INFERENCE_INT8_STEM_H_
