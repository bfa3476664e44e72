// The class map: logits on the feature grid, upsampled bilinearly with the taps given
// (aligned corners), and the first class of the largest,
//
//   r[w, c] = f[rlo[y], w, c] * (1 - rt[y]) + f[rhi, w, c] * rt[y]   (rhi = min(rlo + 1, fh - 1))
//   v[x, c] = r[clo[x], c] * (1 - ct[x]) + r[chi, c] * ct[x]         (chi likewise)
//   out[y, x] = the first c with the largest v[x, c]
//
// every product and sum rounded to float32 in that order (the library is built without
// contraction into fused multiply-adds): NumPy's float32 arithmetic on that formula
// (seg.predict.upsampling), bit for bit. NaN never wins. Two ways, the same numbers at every
// pixel they compute:
// - Columns::Row, every pixel of a row, 8 at once (float_kernel.cc's SegUpsampledArgmax, the
//   engine's class maps): r and v (class-major, 44 KB for 21 classes at 513 pixels) stay in
//   the core's cache, where XLA's resize writes every class of every pixel to memory and
//   reads it back for the argmax.
// - Blocks, for a photo's mask at its full size (SegClassMapBlocks; predict's large
//   images): the classes at a grid of sample pixels first, then only the blocks between
//   samples whose four corners disagree pixel by pixel (seg/predict/upsampling.py says why
//   the others take their corners' class).
#ifndef SEG_INFERENCE_CLASS_MAP_H_
#define SEG_INFERENCE_CLASS_MAP_H_

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace seg {
namespace class_map {

constexpr int64_t kLanes = 8;  // pixels per AVX2 vector

// Output row y's blend of feature rows lo and min(lo + 1, fh - 1) of one image's logits f
// [fh, fw, classes], with weight t on the second: r, class-major [classes][fw].
inline void Blend(const float* f, int64_t fh, int64_t fw, int64_t classes, int32_t lo, float t,
                  std::vector<float>& r) {
  r.resize(classes * fw);
  const float s = 1.f - t;
  const float* f0 = f + lo * fw * classes;
  const float* f1 = f + std::min<int64_t>(lo + 1, fh - 1) * fw * classes;
  for (int64_t w = 0; w < fw; ++w)
    for (int64_t c = 0; c < classes; ++c)
      r[c * fw + w] = f0[w * classes + c] * s + f1[w * classes + c] * t;
}

// The class of one pixel that reads cells lo and min(lo + 1, fw - 1) of a blended row r
// with weight t on the second: Columns::Row's arithmetic, one pixel.
inline uint8_t Pixel(const float* r, int64_t fw, int64_t classes, int32_t lo, float t) {
  const int64_t hi = std::min<int64_t>(lo + 1, fw - 1);
  const float s = 1.f - t;
  float best = r[lo] * s + r[hi] * t;
  int64_t index = 0;
  for (int64_t c = 1; c < classes; ++c) {
    const float value = r[c * fw + lo] * s + r[c * fw + hi] * t;
    if (value > best) {  // ties keep the first
      best = value;
      index = c;
    }
  }
  return static_cast<uint8_t>(index);
}

// The column taps of an output `width` pixels wide: (lo, t) per pixel, ascending lo.
struct Columns {
  int64_t fw, width;
  std::vector<int64_t> start;  // [fw + 1]: the first pixel x with lo[x] >= w
  std::vector<float> t, s;     // t[x] and 1 - t[x], padded by kLanes

  Columns(const int32_t* lo, const float* taps, int64_t fw_, int64_t width_)
      : fw(fw_), width(width_), start(fw_ + 1), t(width_ + kLanes, 0.f),
        s(width_ + kLanes, 0.f) {
    for (int64_t w = 0, x = 0; w <= fw; ++w) {
      while (x < width && lo[x] < w) ++x;
      start[w] = x;
    }
    for (int64_t x = 0; x < width; ++x) {
      t[x] = taps[x];
      s[x] = 1.f - t[x];
    }
  }

  int64_t Stride() const { return width + kLanes; }  // v's row per class

  // The classes of a whole output row from its blended row r, into out [width].
  void Row(const std::vector<float>& r, int64_t classes, std::vector<float>& v,
           uint8_t* out) const {
    v.resize(classes * Stride());
    // The pixels of cell w, [start[w], start[w + 1]), read r[w] and r[w + 1]; a vector that
    // runs past the cell's last pixel is overwritten by the next cell's (or lands in the
    // padding).
    for (int64_t c = 0; c < classes; ++c) {
      const float* rc = r.data() + c * fw;
      float* vc = v.data() + c * Stride();
      for (int64_t w = 0; w < fw; ++w) {
        const __m256 r0 = _mm256_set1_ps(rc[w]);
        const __m256 r1 = _mm256_set1_ps(rc[std::min<int64_t>(w + 1, fw - 1)]);
        for (int64_t x = start[w]; x < start[w + 1]; x += kLanes)
          _mm256_storeu_ps(vc + x, _mm256_add_ps(_mm256_mul_ps(r0, _mm256_loadu_ps(&s[x])),
                                                 _mm256_mul_ps(r1, _mm256_loadu_ps(&t[x]))));
      }
    }
    for (int64_t x = 0; x < width; x += kLanes) {
      __m256 best = _mm256_loadu_ps(v.data() + x), index = _mm256_setzero_ps();
      for (int64_t c = 1; c < classes; ++c) {
        const __m256 value = _mm256_loadu_ps(v.data() + c * Stride() + x);
        const __m256 more = _mm256_cmp_ps(value, best, _CMP_GT_OQ);  // ties keep the first
        best = _mm256_blendv_ps(best, value, more);
        index = _mm256_blendv_ps(index, _mm256_set1_ps(static_cast<float>(c)), more);
      }
      const __m256i i32 = _mm256_cvttps_epi32(index);
      const __m128i u16 = _mm_packus_epi32(_mm256_castsi256_si128(i32),
                                           _mm256_extracti128_si256(i32, 1));
      const __m128i u8 = _mm_packus_epi16(u16, u16);
      if (x + kLanes <= width) {
        _mm_storel_epi64(reinterpret_cast<__m128i*>(out + x), u8);
      } else {
        alignas(16) uint8_t last[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(last), u8);
        std::copy_n(last, width - x, out + x);
      }
    }
  }
};

// Sample positions along an axis of `size` pixels with taps lo: every `block`-th pixel, the
// last, and the two pixels on either side of every change of cell; between two samples more
// than one pixel apart every pixel reads one cell.
inline std::vector<int64_t> Samples(const int32_t* lo, int64_t size, int64_t block) {
  std::vector<int64_t> samples;
  for (int64_t i = 0; i < size; ++i)
    if (i % block == 0 || i == size - 1 || (i + 1 < size && lo[i + 1] != lo[i]) ||
        (i > 0 && lo[i] != lo[i - 1]))
      samples.push_back(i);
  return samples;
}

// The classes of the n <= kLanes pixels at t and s (t's and 1 - t's of consecutive columns)
// that all read cells lo and min(lo + 1, fw - 1) of a blended row r, into out: Pixel's
// arithmetic, kLanes pixels at once.
inline void Pixels(const float* r, int64_t fw, int64_t classes, int32_t lo, const float* t,
                   const float* s, int64_t n, uint8_t* out) {
  const int64_t hi = std::min<int64_t>(lo + 1, fw - 1);
  const __m256 tv = _mm256_loadu_ps(t), sv = _mm256_loadu_ps(s);
  __m256 best = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(r[lo]), sv),
                              _mm256_mul_ps(_mm256_set1_ps(r[hi]), tv));
  __m256 index = _mm256_setzero_ps();
  for (int64_t c = 1; c < classes; ++c) {
    const __m256 value = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(r[c * fw + lo]), sv),
                                       _mm256_mul_ps(_mm256_set1_ps(r[c * fw + hi]), tv));
    const __m256 more = _mm256_cmp_ps(value, best, _CMP_GT_OQ);  // ties keep the first
    best = _mm256_blendv_ps(best, value, more);
    index = _mm256_blendv_ps(index, _mm256_set1_ps(static_cast<float>(c)), more);
  }
  alignas(32) int32_t classes_of[kLanes];
  _mm256_store_si256(reinterpret_cast<__m256i*>(classes_of), _mm256_cvttps_epi32(index));
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint8_t>(classes_of[i]);
}

// One image's class map [height, width] from its logits f [fh, fw, classes], on this thread:
// the classes at the samples (Samples) first; block (i, j) covers sample rows i to i + 1 and
// columns j to j + 1 (the last sample row and column: blocks of their own); a block whose
// four corner samples agree takes their class, the others are computed pixel by pixel
// (Pixels: a block lies in one cell, at most `block` <= kLanes columns wide; Pixel for wider
// blocks). A band of rows between two sample rows is written as runs: neighbouring blocks
// that take one class are one memset, and a band with no mixed block is one row copied.
inline void Blocks(const float* f, int64_t fh, int64_t fw, int64_t classes, int64_t height,
                   int64_t width, const int32_t* row_lo, const float* row_t,
                   const int32_t* col_lo, const float* col_t, int64_t block, uint8_t* out) {
  const std::vector<int64_t> ys = Samples(row_lo, height, block);
  const std::vector<int64_t> xs = Samples(col_lo, width, block);
  const int64_t ny = static_cast<int64_t>(ys.size()), nx = static_cast<int64_t>(xs.size());
  std::vector<uint8_t> grid(ny * nx);
  std::vector<float> r;
  const Columns columns(col_lo, col_t, fw, width);  // t and 1 - t per column, padded
  // The samples' columns: their t and 1 - t (padded by kLanes), and where each run of
  // samples that read one cell ends, for Pixels.
  std::vector<float> sample_t(nx + kLanes, 0.f), sample_s(nx + kLanes, 0.f);
  std::vector<int64_t> cell_end(nx);
  for (int64_t j = 0; j < nx; ++j) {
    sample_t[j] = col_t[xs[j]];
    sample_s[j] = 1.f - sample_t[j];
  }
  for (int64_t j = nx - 1; j >= 0; --j)
    cell_end[j] = j + 1 < nx && col_lo[xs[j + 1]] == col_lo[xs[j]] ? cell_end[j + 1] : j + 1;
  for (int64_t i = 0; i < ny; ++i) {
    Blend(f, fh, fw, classes, row_lo[ys[i]], row_t[ys[i]], r);
    for (int64_t j = 0; j < nx;) {
      const int64_t n = std::min(kLanes, cell_end[j] - j);
      Pixels(r.data(), fw, classes, col_lo[xs[j]], &sample_t[j], &sample_s[j], n,
             &grid[i * nx + j]);
      j += n;
    }
  }
  struct Run {
    int64_t x0, x1;
    int cls;  // -1: a mixed block, computed pixel by pixel
  };
  std::vector<Run> runs;
  for (int64_t i = 0; i < ny; ++i) {
    const uint8_t* g = &grid[i * nx];
    const uint8_t* below = &grid[std::min(i + 1, ny - 1) * nx];
    bool mixed = false;
    runs.clear();
    for (int64_t j = 0; j < nx; ++j) {
      const int64_t right = std::min(j + 1, nx - 1);
      const bool same = g[j] == below[j] && g[j] == g[right] && g[j] == below[right];
      const int64_t x1 = j + 1 < nx ? xs[j + 1] : width;
      if (!same) {
        runs.push_back({xs[j], x1, -1});
        mixed = true;
      } else if (!runs.empty() && runs.back().cls == g[j]) {
        runs.back().x1 = x1;
      } else {
        runs.push_back({xs[j], x1, g[j]});
      }
    }
    const int64_t y0 = ys[i], y1 = i + 1 < ny ? ys[i + 1] : height;
    for (int64_t y = y0; y < y1; ++y) {
      uint8_t* o = out + y * width;
      if (!mixed && y > y0) {  // every row of the band is its first
        std::memcpy(o, out + y0 * width, width);
        continue;
      }
      if (mixed) Blend(f, fh, fw, classes, row_lo[y], row_t[y], r);
      for (const Run& run : runs) {
        if (run.cls >= 0) {
          std::memset(o + run.x0, run.cls, run.x1 - run.x0);
        } else if (run.x1 - run.x0 <= kLanes && col_lo[run.x0] == col_lo[run.x1 - 1]) {
          Pixels(r.data(), fw, classes, col_lo[run.x0], &columns.t[run.x0],
                 &columns.s[run.x0], run.x1 - run.x0, o + run.x0);
        } else {
          for (int64_t x = run.x0; x < run.x1; ++x)
            o[x] = Pixel(r.data(), fw, classes, col_lo[x], col_t[x]);
        }
      }
    }
  }
}

}  // namespace class_map
}  // namespace seg

#endif  // SEG_INFERENCE_CLASS_MAP_H_
