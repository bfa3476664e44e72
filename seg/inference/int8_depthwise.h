// The depthwise layer of int8_depthwise.cc (which describes it), shared with int8_kernel.cc's
// expansion + depthwise pass; and its AVX-512 loop in float32, input and ReLU6 output
// (`xf`, `outf`: float_kernel.cc's depthwise layer of the float engines), the output also as
// bfloat16 (`outb`: rounded to nearest even, the bfloat16 products' input).
#ifndef SEG_INFERENCE_INT8_DEPTHWISE_H_
#define SEG_INFERENCE_INT8_DEPTHWISE_H_

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernel_cpu.h"

namespace seg {
namespace depthwise {

constexpr int kSize = 3;                     // the window
constexpr int64_t kBlock = 64;               // channels converted and computed at a time
constexpr int64_t kWideBlock = 16;           // the same for AVX-512: one vector
constexpr int64_t kBandBytes = 256 * 1024;   // converted input rows of a band, at most
constexpr int kMaxBandRows = 8;              // output rows per band, at most

#define SEG_DEPTHWISE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

// What the AVX-512 loop writes: uint8 (`out`), float32 (`outf`) or bfloat16 (`outb`).
enum Output { kUint8 = 0, kFloat32 = 1, kBfloat16 = 2 };

struct Depthwise {
  const uint8_t* x;  // row iy of image n at x + (n * h + iy - row_base) * w * c
  int64_t h, w, c;
  const float* wt;  // [3][3][c]
  const float* b;
  float inv_out;
  int64_t stride, dilation, pad_top, pad_left;
  uint8_t* out;
  int64_t oh, ow;
  int64_t band;  // output rows per chunk
  int64_t row_base = 0;  // the first row x holds (int8_kernel.cc's fused expansion: a band's)
  int64_t out_row_base = 0;  // the first output row the output holds (the same for outputs)
  bool wide = false;     // the AVX-512 loop (BandWide)
  const float* xf = nullptr;  // float32 in and out instead of x and out (kFloat loops)
  float* outf = nullptr;
  uint16_t* outb = nullptr;   // or bfloat16 out (the AVX-512 loop's kBfloat16)

  // Columns of a converted row: the input's, with the padding's zeros around them.
  int64_t Span() const { return (ow - 1) * stride + (kSize - 1) * dilation + 1; }
  int64_t InputRows(int64_t out_rows) const {
    return (out_rows - 1) * stride + (kSize - 1) * dilation + 1;
  }

  void ChooseBand() {
    band = 1;
    const int64_t row_bytes = Span() * (wide ? kWideBlock : kBlock) * 4;
    while (band < kMaxBandRows && 4 * (band + 1) <= oh &&
           InputRows(band + 1) * row_bytes <= kBandBytes)
      ++band;
  }

  // Channels [ch, ch + width) of input row iy as float32 into r ([Span()][width]), with the
  // padding's zero columns left and right.
  void Convert(int64_t n, int64_t iy, int64_t ch, int64_t width, float* r) const {
    const int64_t first = pad_left, last = std::min(pad_left + w, Span());
    std::fill(r, r + first * width, 0.f);
    if (xf) {
      const float* src = xf + (n * h + iy - row_base) * w * c + ch;
      for (int64_t col = first; col < last; ++col, src += c)
        std::copy_n(src, width, r + col * width);
    } else {
      const uint8_t* src = x + (n * h + iy - row_base) * w * c + ch;
      for (int64_t col = first; col < last; ++col, src += c)
        for (int64_t k = 0; k < width; k += 8)
          _mm256_storeu_ps(r + col * width + k, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + k)))));
    }
    std::fill(r + last * width, r + Span() * width, 0.f);
  }

  // U output pixels from ox x V vectors of 8 channels from ch (of the block that starts at
  // ch0 and is `width` channels wide) of the output row whose converted input rows are
  // rows[0..3) (null: padding), written to o (the row's output: uint8, or with kFloat
  // float32 ReLU6).
  template <int S, int D, int U, int V, bool kFloat>
  void Pixels(const float* const* rows, int64_t width, int64_t ox, int64_t ch0, int64_t ch,
              void* o) const {
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
        const int64_t at = (ox + u) * c + ch0 + ch + 8 * v;
        if (kFloat) {
          _mm256_storeu_ps(static_cast<float*>(o) + at, y);
          continue;
        }
        const __m256i q = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(y, inv)), top);
        const __m128i q16 = _mm_packus_epi32(_mm256_castsi256_si128(q),
                                             _mm256_extracti128_si256(q, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(static_cast<uint8_t*>(o) + at),
                         _mm_packus_epi16(q16, q16));
      }
    }
  }

  // Channels [ch0, ch0 + width) of one output row.
  template <int S, int D, bool kFloat>
  void OutputRow(const float* const* rows, int64_t ch0, int64_t width, void* o) const {
    int64_t ch = 0;
    for (; ch + 16 <= width; ch += 16) {
      int64_t ox = 0;
      for (; ox + 4 <= ow; ox += 4) Pixels<S, D, 4, 2, kFloat>(rows, width, ox, ch0, ch, o);
      for (; ox < ow; ++ox) Pixels<S, D, 1, 2, kFloat>(rows, width, ox, ch0, ch, o);
    }
    if (ch < width) {  // 8 channels left
      int64_t ox = 0;
      for (; ox + 4 <= ow; ox += 4) Pixels<S, D, 4, 1, kFloat>(rows, width, ox, ch0, ch, o);
      for (; ox < ow; ++ox) Pixels<S, D, 1, 1, kFloat>(rows, width, ox, ch0, ch, o);
    }
  }

  // Output rows [oy0, oy0 + band) of image n (and before `limit`), a block of channels at a
  // time (kFloat: xf in, outf out; c a multiple of 8).
  template <int S, int D, bool kFloat = false>
  void Band(int64_t n, int64_t oy0, std::vector<float>& buffer,
            int64_t limit = INT64_MAX) const {
    const int64_t oy1 = std::min({oh, oy0 + band, limit});
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
        const int64_t at = (n * oh + oy - out_row_base) * ow * c;
        OutputRow<S, D, kFloat>(rows, ch0, width, kFloat ? static_cast<void*>(outf + at)
                                                         : static_cast<void*>(out + at));
      }
    }
  }

  // Output rows [oy0, oy0 + band) of image n (and before `limit`), in the AVX2 loop above or
  // the AVX-512 loop below (`wide`): the same numbers.
  template <int S, int D>
  void AnyBand(int64_t n, int64_t oy0, std::vector<float>& buffer,
               int64_t limit = INT64_MAX) const {
    if (wide) BandWide<S, D>(n, oy0, buffer, limit); else Band<S, D>(n, oy0, buffer, limit);
  }

  // ----------------------------------------------------------------------------------------
  // The AVX-512 loop: one vector of 16 channels at a time (the last 8 under a mask), its
  // nine weights and bias held in registers across the band; a converted row is [Span()][16]
  // floats, so that a step of 8 output pixels reads each row's columns in one sweep. Each
  // output's taps are summed in the AVX2 loop's order: the same numbers.

  // Channels [ch, ch + 16) of input row iy (`mask`: those that exist) as float32 into r.
  SEG_DEPTHWISE_AVX512 void ConvertWide(int64_t n, int64_t iy, int64_t ch, __mmask16 mask,
                                        float* r) const {
    const int64_t span = Span(), first = pad_left, last = std::min(pad_left + w, span);
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t col = 0; col < first; ++col) _mm512_store_ps(r + col * kWideBlock, zero);
    if (xf) {
      const float* src = xf + (n * h + iy - row_base) * w * c + ch;
      for (int64_t col = first; col < last; ++col, src += c)
        _mm512_store_ps(r + col * kWideBlock, _mm512_maskz_loadu_ps(mask, src));
    } else {
      const uint8_t* src = x + (n * h + iy - row_base) * w * c + ch;
      for (int64_t col = first; col < last; ++col, src += c)
        _mm512_store_ps(r + col * kWideBlock, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
            _mm_maskz_loadu_epi8(mask, src))));
    }
    for (int64_t col = last; col < span; ++col) _mm512_store_ps(r + col * kWideBlock, zero);
  }

  // U output pixels from ox of one row (converted input rows rows[0..3), null: padding),
  // weights wv[9] and bias of the vector's channels, written to o (the row's output at those
  // channels: uint8, or ReLU6 in float32 or bfloat16, as kOut says).
  template <int S, int D, int U, int kOut>
  SEG_DEPTHWISE_AVX512 static void PixelsWide(const float* const* rows, const __m512* wv,
                                              __m512 bias, __m512 inv, __mmask16 mask,
                                              int64_t ox, int64_t c, void* o) {
    __m512 acc[U];
    for (int u = 0; u < U; ++u) acc[u] = bias;
    for (int i = 0; i < kSize; ++i) {
      if (!rows[i]) continue;
      const float* r = rows[i] + ox * S * kWideBlock;
      for (int j = 0; j < kSize; ++j)
        for (int u = 0; u < U; ++u)
          acc[u] = _mm512_fmadd_ps(_mm512_load_ps(r + (u * S + j * D) * kWideBlock),
                                   wv[i * kSize + j], acc[u]);
    }
    const __m512 zero = _mm512_setzero_ps(), six = _mm512_set1_ps(6.f);
    const __m512i top = _mm512_set1_epi32(127);
    for (int u = 0; u < U; ++u) {
      const __m512 y = _mm512_min_ps(_mm512_max_ps(acc[u], zero), six);
      if (kOut == kFloat32) {  // whole vectors unmasked: masked stores are slow on Zen 4 and 5
        float* of = static_cast<float*>(o) + (ox + u) * c;
        if (mask == 0xffff) _mm512_storeu_ps(of, y); else _mm512_mask_storeu_ps(of, mask, y);
        continue;
      }
      if (kOut == kBfloat16) {
        uint16_t* ob = static_cast<uint16_t*>(o) + (ox + u) * c;
        const __m256i h = RoundToBf16(y);
        if (mask == 0xffff) _mm256_storeu_si256(reinterpret_cast<__m256i*>(ob), h);
        else _mm256_mask_storeu_epi16(ob, mask, h);
        continue;
      }
      const __m512i q = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(y, inv)), top);
      _mm_mask_storeu_epi8(static_cast<uint8_t*>(o) + (ox + u) * c, mask,
                           _mm512_cvtepi32_epi8(q));
    }
  }

  template <int S, int D, int kOut = kUint8>
  SEG_DEPTHWISE_AVX512 void BandWide(int64_t n, int64_t oy0, std::vector<float>& buffer,
                                     int64_t limit) const {
    const int64_t oy1 = std::min({oh, oy0 + band, limit});
    const int64_t first = oy0 * S - pad_top;  // the band's first input row (maybe padding)
    const int64_t count = InputRows(oy1 - oy0), row_floats = Span() * kWideBlock;
    bool used[kMaxBandRows * 4 + kSize * 8] = {};  // the input rows the band reads
    for (int64_t oy = oy0; oy < oy1; ++oy)
      for (int i = 0; i < kSize; ++i) {
        const int64_t iy = oy * S + i * D - pad_top;
        used[iy - first] = iy >= 0 && iy < h;
      }
    buffer.resize(count * row_floats + kWideBlock);  // and room to align it to 64 bytes
    float* rows_base = reinterpret_cast<float*>(
        (reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~static_cast<uintptr_t>(63));
    const __m512 inv = _mm512_set1_ps(inv_out);
    for (int64_t ch = 0; ch < c; ch += kWideBlock) {
      const __mmask16 mask = static_cast<__mmask16>((1u << std::min(kWideBlock, c - ch)) - 1);
      for (int64_t k = 0; k < count; ++k)
        if (used[k]) ConvertWide(n, first + k, ch, mask, rows_base + k * row_floats);
      __m512 wv[kSize * kSize];
      for (int t = 0; t < kSize * kSize; ++t) wv[t] = _mm512_maskz_loadu_ps(mask, wt + t * c + ch);
      const __m512 bias = _mm512_maskz_loadu_ps(mask, b + ch);
      for (int64_t oy = oy0; oy < oy1; ++oy) {
        const float* rows[kSize];
        for (int i = 0; i < kSize; ++i) {
          const int64_t iy = oy * S + i * D - pad_top;
          rows[i] = iy >= 0 && iy < h ? rows_base + (iy - first) * row_floats : nullptr;
        }
        const int64_t at = (n * oh + oy - out_row_base) * ow * c + ch;
        void* o = kOut == kFloat32 ? static_cast<void*>(outf + at) :
                  kOut == kBfloat16 ? static_cast<void*>(outb + at) : static_cast<void*>(out + at);
        int64_t ox = 0;
        for (; ox + 8 <= ow; ox += 8)
          PixelsWide<S, D, 8, kOut>(rows, wv, bias, inv, mask, ox, c, o);
        for (; ox + 4 <= ow; ox += 4)
          PixelsWide<S, D, 4, kOut>(rows, wv, bias, inv, mask, ox, c, o);
        for (; ox < ow; ++ox) PixelsWide<S, D, 1, kOut>(rows, wv, bias, inv, mask, ox, c, o);
      }
    }
  }
};

}  // namespace depthwise
}  // namespace seg

#endif  // SEG_INFERENCE_INT8_DEPTHWISE_H_
