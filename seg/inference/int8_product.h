// int8 1x1 products with the requantisation fused into the output loop, for x86 CPUs with
// AVX2 and FMA (where XLA's int8 products run no faster than float32): an AVX2 loop and,
// where the CPU has them, the VNNI dot-product instruction in 256 bits (`avxvnni`, below:
// CPUs without AVX-512) or 512 (`vnni`), and AMX tiles (`amx`). These are the loops over a
// problem's rows; int8_kernel.cc holds the per-call state and the FFI handlers that run them.
//
//   out[m, n] = act(fma(float(sum_k x[m, k] * w[k, n]), scale[n], bias[n]))
//
// x: [..., K] uint8 in [0, 127] (an input known to be >= 0) or int8 in [-127, 127]
// (`is_signed`); w: int8, packed by `pack_weights` in int8_kernel.py into panels of 16
// output channels, each [K / 4][16][4] (four consecutive inputs of one output channel in one
// 32-bit lane); K is a multiple of 4. Products: _mm256_maddubs_epi16 multiplies unsigned by
// signed bytes and adds pairs into int16, which cannot saturate since |x|, |w| <= 127
// (2 * 127 * 127 < 2^15); _mm256_madd_epi16 adds those pairs into int32. A signed x is
// multiplied as |x| times w with x's sign (_mm256_sign_epi8). The int32 sums are exact, so
// the result equals the int8 x int8 -> int32 product of XLA's int8 formulation.
//
// mode: 0 float32 out; 1 float32 ReLU6; 2 float32 ReLU; 3 ReLU6 requantised to uint8:
// round(fma(acc, scale * inv_out, bias * inv_out)) clipped to [0, 127] (rounding half to
// even, as jnp.round), with scale * inv_out and bias * inv_out rounded to float32 first. This
// is ReLU6 too, since the scale of a ReLU6 output is at most 6 / 127 (inv_out >= 127 / 6).
// 4: no activation, requantised to int8 the same way, clipped to [-127, 127] (a projection
// whose output is only the next expansion's input); 5: the same + 128 as uint8 (that
// expansion's input for the VNNI loop, below).
// Mode 0 may also add a float32 `residual` [m, n] to its output and write that sum,
// requantised for the next product (round(y * inv_out) clipped to [-127, 127], as int8 or
// + 128 as uint8: `q_offset`), to `out_q`, the float32 output then being optional: a residual
// block's projection, its sum and the next expansion's input in one pass.
#ifndef SEG_INFERENCE_INT8_PRODUCT_H_
#define SEG_INFERENCE_INT8_PRODUCT_H_

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernel_cpu.h"
#ifdef SEG_KERNEL_EMULATION
#include "amx_emulation.h"  // the AMX loop's tile instructions in plain C++ (below)
#endif

// The AVX-VNNI and AMX intrinsics came with GCC 11 and clang 12: with an older compiler (or
// -DSEG_WITHOUT_NEW_LOOPS) those two loops are left out and the others run (`SegHasLoop`).
#if !defined(SEG_WITHOUT_NEW_LOOPS) && __has_include(<avxvnniintrin.h>)
#define SEG_NEW_LOOPS 1
#else
#define SEG_NEW_LOOPS 0
#endif

namespace seg {
namespace product {

constexpr int kPanel = 16;  // output channels per weight panel: two vectors of 8 int32
constexpr int kRows = 4;    // rows per register tile (8 accumulators)
constexpr int64_t kChunkRows = 64;  // rows per claim of the thread pool, at most
constexpr int64_t kGrainRows = 8;   // and a multiple of this (the VNNI loop's tiles)

enum Mode { kLinear = 0, kRelu6 = 1, kRelu = 2, kRelu6Uint8 = 3, kLinearInt8 = 4,
            kLinearUint8Offset = 5 };
enum Isa { kAvx2 = 0, kVnni = 1, kAmx = 2, kAvxVnni = 3 };  // int8_kernel.py: ISAS

struct Problem {
  const uint8_t* x;
  int64_t m, k, n;
  int64_t kw;  // the packed weights' input channels: k, or k rounded up to 64 for AMX
  const int8_t* w;
  const float* scale;
  const float* bias;
  float inv_out;
  int mode;
  bool is_signed;
  bool offset_input;  // signed x stored as x + 128 in uint8 (the VNNI loop's own form)
  int isa;
  const int32_t* offset;  // VNNI with signed x: -128 * sum_k w[k, n] per channel, else null
  void* out;              // null: mode 0 with out_q only
  const float* residual = nullptr;  // mode 0: added to the output
  void* out_q = nullptr;            // mode 0: the output requantised by inv_out
  bool q_offset = false;            // out_q as x + 128 in uint8, else int8
};

// Inlined into their loops whatever the compiler's size limits (unrolled tiles are large):
// called, the accumulators would go through memory.
#define SEG_INLINE inline __attribute__((always_inline))

// Mode 0's requantised output of one row's 8 channels: round(y * inv) in [-127, 127], as int8
// or + 128 as uint8, in the low 8 bytes.
inline __m128i Requantise8(__m256 y, __m256 inv, bool offset) {
  const __m256i q = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(y, inv)),
                                                      _mm256_set1_epi32(127)),
                                     _mm256_set1_epi32(-127));
  const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  const __m128i q8 = _mm_packs_epi16(q16, q16);
  return offset ? _mm_xor_si128(q8, _mm_set1_epi8(-128)) : q8;
}

// A panel's 16 output bytes to o, or the first `valid` of them (the last, partial panel).
SEG_INLINE void StoreBytes(void* o, __m128i bytes, int64_t valid) {
  if (valid == kPanel) {
    _mm_storeu_si128(static_cast<__m128i*>(o), bytes);
    return;
  }
  alignas(16) uint8_t t[kPanel];
  _mm_store_si128(reinterpret_cast<__m128i*>(t), bytes);
  std::memcpy(o, t, valid);
}

// The AVX2 output loop (of the AVX2 and AVX-VNNI loops): R rows' 16 channels of `panel` from
// their exact int32 sums (acc[r][0]: channels 0-7, acc[r][1]: 8-15).
template <int R>
SEG_INLINE void StoreRows(const Problem& p, const __m256i (&acc)[R][2], int64_t row,
                          int64_t panel) {
  const int64_t n0 = panel * kPanel;
  const int64_t valid = std::min<int64_t>(kPanel, p.n - n0);
  const float* s = p.scale + n0;  // padded to whole panels (Work::Prepare)
  const float* b = p.bias + n0;
  const __m256 s0 = _mm256_loadu_ps(s), s1 = _mm256_loadu_ps(s + 8);
  const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
  const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.f);
  for (int r = 0; r < R; ++r) {
    // acc * scale + bias in one FMA (one rounding), as XLA's CPU code computes the same
    // expression in the 'int8' formulation: both give the same numbers. The build turns
    // the compiler's own contraction off (-ffp-contract=off), so this is the only FMA.
    __m256 y0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][0]), s0, b0);
    __m256 y1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][1]), s1, b1);
    if (p.mode == kRelu6 || p.mode == kRelu) {
      y0 = _mm256_max_ps(y0, zero);
      y1 = _mm256_max_ps(y1, zero);
    }
    if (p.mode == kRelu6) {
      y0 = _mm256_min_ps(y0, six);
      y1 = _mm256_min_ps(y1, six);
    }
    const int64_t m = row + r;
    if (p.mode == kLinearInt8 || p.mode == kLinearUint8Offset) {
      const __m256i top = _mm256_set1_epi32(127), bottom = _mm256_set1_epi32(-127);
      const __m256i q0 = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(y0), top), bottom);
      const __m256i q1 = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(y1), top), bottom);
      const __m256i q16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xD8);
      __m128i q8 = _mm_packs_epi16(_mm256_castsi256_si128(q16), _mm256_extracti128_si256(q16, 1));
      if (p.mode == kLinearUint8Offset) q8 = _mm_xor_si128(q8, _mm_set1_epi8(-128));  // + 128
      StoreBytes(static_cast<int8_t*>(p.out) + m * p.n + n0, q8, valid);
    } else if (p.mode == kRelu6Uint8) {
      const __m256i top = _mm256_set1_epi32(127);
      const __m256i q0 = _mm256_min_epi32(_mm256_cvtps_epi32(y0), top);
      const __m256i q1 = _mm256_min_epi32(_mm256_cvtps_epi32(y1), top);
      // (_mm256_cvtps_epi32 rounds half to even under the default MXCSR mode; negative
      // values become 0 in the unsigned saturation of the packs below.)
      // packus interleaves 128-bit halves: q0[0:4] q1[0:4] q0[4:8] q1[4:8]; put them in order.
      const __m256i q16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(q0, q1), 0xD8);
      const __m128i q8 = _mm_packus_epi16(_mm256_castsi256_si128(q16),
                                          _mm256_extracti128_si256(q16, 1));
      StoreBytes(static_cast<uint8_t*>(p.out) + m * p.n + n0, q8, valid);
    } else {
      if (p.residual) {
        alignas(32) float t[kPanel] = {};
        std::memcpy(t, p.residual + m * p.n + n0, valid * sizeof(float));
        y0 = _mm256_add_ps(y0, _mm256_load_ps(t));
        y1 = _mm256_add_ps(y1, _mm256_load_ps(t + 8));
      }
      if (p.out_q) {
        const __m256 inv = _mm256_set1_ps(p.inv_out);
        alignas(16) int8_t t[kPanel];
        _mm_storel_epi64(reinterpret_cast<__m128i*>(t), Requantise8(y0, inv, p.q_offset));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(t + 8), Requantise8(y1, inv, p.q_offset));
        std::memcpy(static_cast<int8_t*>(p.out_q) + m * p.n + n0, t, valid);
      }
      if (p.out) {
        float* o = static_cast<float*>(p.out) + m * p.n + n0;
        if (valid == kPanel) {
          _mm256_storeu_ps(o, y0);
          _mm256_storeu_ps(o + 8, y1);
        } else {
          alignas(32) float t[kPanel];
          _mm256_store_ps(t, y0);
          _mm256_store_ps(t + 8, y1);
          std::memcpy(o, t, valid * sizeof(float));
        }
      }
    }
  }
}

// The AVX2 loop: R rows x one panel (8 accumulators for R = 4).
template <bool kSigned, int R>
SEG_INLINE void Tile(const Problem& p, int64_t row, int64_t panel) {
  const int64_t groups = p.k / 4;
  const int8_t* w = p.w + panel * (p.kw / 4) * 64;
  const uint8_t* x = p.x + row * p.k;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * g));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * g + 32));
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, x + r * p.k + 4 * g, 4);
      const __m256i xb = _mm256_set1_epi32(four);
      __m256i p0, p1;
      if (kSigned) {
        const __m256i xa = _mm256_abs_epi8(xb);
        p0 = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(w0, xb));
        p1 = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(w1, xb));
      } else {
        p0 = _mm256_maddubs_epi16(xb, w0);
        p1 = _mm256_maddubs_epi16(xb, w1);
      }
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(p0, ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(p1, ones));
    }
  }
  StoreRows<R>(p, acc, row, panel);
}

template <bool kSigned>
void Rows(const Problem& p, int64_t begin, int64_t end) {
  const int64_t panels = (p.n + kPanel - 1) / kPanel;
  for (int64_t panel = 0; panel < panels; ++panel) {
    int64_t r = begin;
    for (; r + kRows <= end; r += kRows) Tile<kSigned, kRows>(p, r, panel);
    for (; r < end; ++r) Tile<kSigned, 1>(p, r, panel);
  }
}

// run(std::integral_constant<int, G>()) with G the groups of 4 inputs where the weights are
// packed to k and there are at most 8 of them, else G = 0: the VNNI loops unroll those (the
// expansions of blocks 1-6 at width 1; 1.1-1.4x as fast there, no faster at k = 64, measured).
template <typename Run>
SEG_INLINE void WithGroups(const Problem& p, Run run) {
  switch (p.kw == p.k ? p.k / 4 : 0) {
    case 1: return run(std::integral_constant<int, 1>());
    case 2: return run(std::integral_constant<int, 2>());
    case 3: return run(std::integral_constant<int, 3>());
    case 4: return run(std::integral_constant<int, 4>());
    case 5: return run(std::integral_constant<int, 5>());
    case 6: return run(std::integral_constant<int, 6>());
    case 7: return run(std::integral_constant<int, 7>());
    case 8: return run(std::integral_constant<int, 8>());
    default: return run(std::integral_constant<int, 0>());
  }
}

// ------------------------------------------------------------------------------------------
// AVX-VNNI (avx_vnni: Intel's client cores since Alder Lake and its E-core Xeons, which have
// no AVX-512): the VNNI loop's instruction (below) in 256 bits, _mm256_dpbusd_avx_epi32, a
// panel's group of 4 inputs being two ymm; unsigned x only, so a signed x is multiplied as
// x + 128 into sums that start from `offset`, as in the VNNI loop; the AVX2 output loop.
// Built with -DSEG_KERNEL_EMULATION (int8_kernel.py: `emulate_loops`) it is the same
// instruction in its AVX-512 VL encoding, which CPUs with AVX-512 VNNI but no AVX-VNNI run.
#if SEG_NEW_LOOPS
#ifdef SEG_KERNEL_EMULATION
#define SEG_AVXVNNI __attribute__((target("avx512vl,avx512vnni")))
#define SEG_DPBUSD256 _mm256_dpbusd_epi32
#else
#define SEG_AVXVNNI __attribute__((target("avxvnni")))
#define SEG_DPBUSD256 _mm256_dpbusd_avx_epi32
#endif

// R rows x one panel: 2R accumulators (of the 16 ymm registers); G groups of 4 inputs, or 0:
// p.k / 4 (a compile-time G unrolls the loop over them, as in the VNNI loop below).
template <bool kSigned, int R, int G>
SEG_AVXVNNI SEG_INLINE void AvxVnniTile(const Problem& p, int64_t row, int64_t panel) {
  const int64_t groups = G ? G : p.k / 4, k = 4 * groups;
  const int8_t* w = p.w + panel * (G ? 64 * G : p.kw / 4 * 64);  // G: weights packed to k
  const uint8_t* x = p.x + row * k;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256i acc[R][2];
  for (int h = 0; h < 2; ++h) {
    const __m256i start =
        p.offset ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.offset + panel * kPanel +
                                                                        8 * h))
                 : _mm256_setzero_si256();
    for (int r = 0; r < R; ++r) acc[r][h] = start;
  }
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * g));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * g + 32));
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, x + r * k + 4 * g, 4);
      __m256i xb = _mm256_set1_epi32(four);
      if (kSigned) xb = _mm256_xor_si256(xb, flip);
      acc[r][0] = SEG_DPBUSD256(acc[r][0], xb, w0);
      acc[r][1] = SEG_DPBUSD256(acc[r][1], xb, w1);
    }
  }
  StoreRows<R>(p, acc, row, panel);
}

template <bool kSigned, int G>
SEG_AVXVNNI void AvxVnniRowsOf(const Problem& p, int64_t begin, int64_t end) {
  constexpr int R = 4;
  const int64_t panels = (p.n + kPanel - 1) / kPanel;
  for (int64_t panel = 0; panel < panels; ++panel) {
    int64_t r = begin;
    for (; r + R <= end; r += R) AvxVnniTile<kSigned, R, G>(p, r, panel);
    for (; r < end; ++r) AvxVnniTile<kSigned, 1, G>(p, r, panel);
  }
}

template <bool kSigned>
SEG_AVXVNNI void AvxVnniRows(const Problem& p, int64_t begin, int64_t end) {
  WithGroups(p, [&](auto groups) { AvxVnniRowsOf<kSigned, groups.value>(p, begin, end); });
}

// The VNNI loops' offset[n] = -128 * sum_k w[k, n], in 256 bits.
SEG_AVXVNNI inline void AvxVnniOffsets(const Problem& p, int32_t* offset) {
  const int64_t panels = (p.n + kPanel - 1) / kPanel, panel_bytes = p.kw / 4 * 64;
  const __m256i all128 = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t panel = 0; panel < panels; ++panel)
    for (int h = 0; h < 2; ++h) {
      __m256i acc = _mm256_setzero_si256();
      for (int64_t g = 0; g < p.kw / 4; ++g)
        acc = SEG_DPBUSD256(acc, all128, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                             p.w + panel * panel_bytes + 64 * g + 32 * h)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(offset + panel * kPanel + 8 * h),
                          _mm256_sub_epi32(_mm256_setzero_si256(), acc));
    }
}
#else
template <bool kSigned>
void AvxVnniRows(const Problem&, int64_t, int64_t) {}  // never called: RunsLoop
inline void AvxVnniOffsets(const Problem&, int32_t*) {}
#endif  // SEG_NEW_LOOPS

// ------------------------------------------------------------------------------------------
// The AVX-512 output loop of the VNNI and AMX loops: one row's 16 channels of `panel` from
// their exact int32 sums, with the panel's scale and bias (`s`, `b`, loaded once per tile):
// the AVX2 epilogue in 512 bits.
#define SEG_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

SEG_AVX512 SEG_INLINE void Store16(const Problem& p, __m512i acc, int64_t m, int64_t panel,
                               __m512 s, __m512 b) {
  const int64_t n0 = panel * kPanel;
  const int64_t valid = std::min<int64_t>(kPanel, p.n - n0);
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
  __m512 y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), s, b);
  if (p.mode == kRelu6Uint8) {
    const __m512i q = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(y),
                                                        _mm512_set1_epi32(127)),
                                       _mm512_setzero_si512());
    _mm_mask_storeu_epi8(static_cast<uint8_t*>(p.out) + m * p.n + n0, mask,
                         _mm512_cvtepi32_epi8(q));
    return;
  }
  if (p.mode == kLinearInt8 || p.mode == kLinearUint8Offset) {
    __m512i q = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(y), _mm512_set1_epi32(127)),
                                 _mm512_set1_epi32(-127));
    if (p.mode == kLinearUint8Offset) q = _mm512_add_epi32(q, _mm512_set1_epi32(128));
    _mm_mask_storeu_epi8(static_cast<int8_t*>(p.out) + m * p.n + n0, mask,
                         _mm512_cvtepi32_epi8(q));
    return;
  }
  if (p.mode != kLinear) y = _mm512_max_ps(y, _mm512_setzero_ps());
  if (p.mode == kRelu6) y = _mm512_min_ps(y, _mm512_set1_ps(6.f));
  if (p.residual) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, p.residual + m * p.n + n0));
  if (p.out_q) {
    __m512i q = _mm512_max_epi32(
        _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(y, _mm512_set1_ps(p.inv_out))),
                         _mm512_set1_epi32(127)),
        _mm512_set1_epi32(-127));
    if (p.q_offset) q = _mm512_add_epi32(q, _mm512_set1_epi32(128));
    _mm_mask_storeu_epi8(static_cast<int8_t*>(p.out_q) + m * p.n + n0, mask,
                         _mm512_cvtepi32_epi8(q));
  }
  if (p.out) _mm512_mask_storeu_ps(static_cast<float*>(p.out) + m * p.n + n0, mask, y);
}

// Mode 3 (uint8 out) for one row's 64 channels of panels panel..panel+3, all of them real:
// the four vectors of sums packed into 64 bytes with saturation (packs, packus: negative
// values become 0) and put in channel order (the packs work within 128-bit lanes), then one
// store: the same bytes as Store16 four times, in fewer instructions.
SEG_AVX512 SEG_INLINE void Store64Uint8(const Problem& p, const __m512i* acc, int64_t m,
                                    int64_t panel, const __m512* s, const __m512* b) {
  const int64_t n0 = panel * kPanel;
  __m512i q[4];
  for (int i = 0; i < 4; ++i)
    q[i] = _mm512_cvtps_epi32(_mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i]), s[i], b[i]));
  // 128-bit lane L holds channels 4L..4L+3 of panels 0, 1, 2, 3 as 32-bit groups 4L..4L+3;
  // group 4j + L of the output takes group 4L + j.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m512i bytes = _mm512_packus_epi16(_mm512_packs_epi32(q[0], q[1]),
                                            _mm512_packs_epi32(q[2], q[3]));
  _mm512_storeu_si512(static_cast<uint8_t*>(p.out) + m * p.n + n0,
                      _mm512_permutexvar_epi32(order, _mm512_min_epu8(bytes,
                                                                      _mm512_set1_epi8(127))));
}

// ------------------------------------------------------------------------------------------
// AVX-512 VNNI (avx512_vnni): _mm512_dpbusd_epi32 multiplies 4 uint8 inputs by 4 int8
// weights in each of 16 int32 lanes and adds them to the lane: one group of a panel (16
// channels x 4 inputs, 64 bytes) is exactly one zmm, so one instruction does what the AVX2
// loop's maddubs + madd + add do for half as many channels. It takes unsigned x only: a
// signed x is multiplied as x + 128 (x ^ 0x80, in [1, 255]) into sums that start from
// -128 * sum_k w[k, n] (`offset`), which leaves the exact int32 product. Where
// the producer already wrote x + 128 as uint8 (`offset_input`: XLA's quantisation, or mode 5
// of the projection before) the xor is skipped: 8-15% of an expansion's time (measured).
#define SEG_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

// R rows x P panels, R * P accumulators (at most 16 of the 32 zmm registers); G groups of 4
// inputs, or 0: p.k / 4 (a compile-time G unrolls the loop over them).
template <bool kSigned, int R, int P, int G>
SEG_VNNI SEG_INLINE void VnniTile(const Problem& p, int64_t row, int64_t panel) {
  const int64_t groups = G ? G : p.k / 4, k = 4 * groups;
  const int64_t panel_bytes = G ? 64 * G : p.kw / 4 * 64;  // G: weights packed to k
  const int8_t* w = p.w + panel * panel_bytes;
  const uint8_t* x = p.x + row * k;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc[R][P];
  for (int q = 0; q < P; ++q) {
    const __m512i start = p.offset ? _mm512_loadu_si512(p.offset + (panel + q) * kPanel)
                                   : _mm512_setzero_si512();
    for (int r = 0; r < R; ++r) acc[r][q] = start;
  }
  for (int64_t g = 0; g < groups; ++g) {
    __m512i wv[P];
    for (int q = 0; q < P; ++q) wv[q] = _mm512_loadu_si512(w + q * panel_bytes + 64 * g);
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, x + r * k + 4 * g, 4);
      __m512i xb = _mm512_set1_epi32(four);
      if (kSigned) xb = _mm512_xor_si512(xb, flip);
      for (int q = 0; q < P; ++q) acc[r][q] = _mm512_dpbusd_epi32(acc[r][q], xb, wv[q]);
    }
  }
  __m512 s[P], b[P];
  for (int q = 0; q < P; ++q) {
    s[q] = _mm512_loadu_ps(p.scale + (panel + q) * kPanel);
    b[q] = _mm512_loadu_ps(p.bias + (panel + q) * kPanel);
  }
  if (P == 4 && p.mode == kRelu6Uint8 && (panel + 4) * kPanel <= p.n) {
    for (int r = 0; r < R; ++r) Store64Uint8(p, acc[r], row + r, panel, s, b);
    return;
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < P; ++q) Store16(p, acc[r][q], row + r, panel + q, s[q], b[q]);
}

// offset[n] = -128 * sum_k w[k, n] for every channel of every panel: the products of an
// input of 128s, by the same instruction, negated.
SEG_VNNI inline void VnniOffsets(const Problem& p, int32_t* offset) {
  const int64_t panels = (p.n + kPanel - 1) / kPanel, panel_bytes = p.kw / 4 * 64;
  const __m512i all128 = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t panel = 0; panel < panels; ++panel) {
    __m512i acc = _mm512_setzero_si512();
    for (int64_t g = 0; g < p.kw / 4; ++g)
      acc = _mm512_dpbusd_epi32(acc, all128,
                                _mm512_loadu_si512(p.w + panel * panel_bytes + 64 * g));
    _mm512_storeu_si512(offset + panel * kPanel, _mm512_sub_epi32(_mm512_setzero_si512(), acc));
  }
}

template <bool kSigned, int P, int G>
SEG_VNNI void VnniPanels(const Problem& p, int64_t begin, int64_t end, int64_t panel) {
  constexpr int R = P == 4 ? 4 : 8;
  int64_t r = begin;
  for (; r + R <= end; r += R) VnniTile<kSigned, R, P, G>(p, r, panel);
  for (; r < end; ++r) VnniTile<kSigned, 1, P, G>(p, r, panel);
}

template <bool kSigned, int G>
SEG_VNNI void VnniRowsOf(const Problem& p, int64_t begin, int64_t end) {
  const int64_t panels = (p.n + kPanel - 1) / kPanel;
  int64_t panel = 0;
  for (; panel + 4 <= panels; panel += 4) VnniPanels<kSigned, 4, G>(p, begin, end, panel);
  if (panel + 2 <= panels) {
    VnniPanels<kSigned, 2, G>(p, begin, end, panel);
    panel += 2;
  }
  if (panel < panels) VnniPanels<kSigned, 1, G>(p, begin, end, panel);
}

template <bool kSigned>
SEG_VNNI void VnniRows(const Problem& p, int64_t begin, int64_t end) {
  WithGroups(p, [&](auto groups) { VnniRowsOf<kSigned, groups.value>(p, begin, end); });
}

// ------------------------------------------------------------------------------------------
// AMX (amx_int8): the same sums from tile products, 16 rows x 16 channels x 64 inputs per
// instruction (_tile_dpbusd: uint8 x int8, _tile_dpbssd: int8 x int8, into int32). The
// packed weights of a panel are exactly a B tile's layout ([64 inputs / 4][16][4] per 64
// inputs) when k is padded to a multiple of 64 with zero weights (pack_weights(...,
// k_multiple=64)); an A tile reads 16 rows x 64 input bytes straight from x (row stride k),
// whose bytes beyond k meet those zero weights, except near the end of x, where the rows
// are copied into a zero-padded buffer first. The epilogue is Store16.
// Built with -DSEG_KERNEL_EMULATION (int8_kernel.py: `emulate_loops`), the tile instructions
// are amx_emulation.h's plain C++ instead: this loop's code, checked on CPUs without AMX, its
// tile loads checked against the memory it declares readable (SEG_AMX_READABLE: x, the
// weights, the padded rows).
#if SEG_NEW_LOOPS
#ifdef SEG_KERNEL_EMULATION
#define SEG_AMX SEG_AVX512
#define SEG_AMX_READABLE(p, bytes) seg_amx::AllowRead(p, bytes)  // else a load faults
#else
#define SEG_AMX_READABLE(p, bytes)
#define SEG_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq")))
#endif

constexpr int kTile = 16;  // rows per A tile and channels per B tile (one panel)

// Linux hands out AMX's tile registers to processes that ask (arch_prctl); once per process.
inline bool AmxPermitted() {
#ifdef SEG_KERNEL_EMULATION
  return seg::HasAvx512();  // the emulated loop's output loops are AVX-512
#endif
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// RT row tiles x PT panels from rows a[0..RT) (stride lda) into tiles 0..3.
template <bool kSigned, int RT, int PT>
SEG_AMX void AmxBlock(const Problem& p, const uint8_t* a0, const uint8_t* a1, int64_t lda,
                      int64_t panel, int32_t* c, int64_t row, int64_t rows) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  const int64_t panel_bytes = p.kw / 4 * 64;
  const int8_t* b0 = p.w + panel * panel_bytes;
  const int8_t* b1 = b0 + panel_bytes;
  for (int64_t kb = 0; kb < p.kw; kb += 64) {
    _tile_loadd(4, a0 + kb, lda);
    if (RT == 2) _tile_loadd(5, a1 + kb, lda);
    _tile_loadd(6, b0 + kb * 16, 64);
    if (PT == 2) _tile_loadd(7, b1 + kb * 16, 64);
    if (kSigned) {
      _tile_dpbssd(0, 4, 6);
      if (PT == 2) _tile_dpbssd(1, 4, 7);
      if (RT == 2) _tile_dpbssd(2, 5, 6);
      if (RT == 2 && PT == 2) _tile_dpbssd(3, 5, 7);
    } else {
      _tile_dpbusd(0, 4, 6);
      if (PT == 2) _tile_dpbusd(1, 4, 7);
      if (RT == 2) _tile_dpbusd(2, 5, 6);
      if (RT == 2 && PT == 2) _tile_dpbusd(3, 5, 7);
    }
  }
  constexpr int kC = kTile * kTile;  // int32 per C tile
  _tile_stored(0, c, 64);
  if (PT == 2) _tile_stored(1, c + kC, 64);
  if (RT == 2) _tile_stored(2, c + 2 * kC, 64);
  if (RT == 2 && PT == 2) _tile_stored(3, c + 3 * kC, 64);
  for (int rt = 0; rt < RT; ++rt)
    for (int pt = 0; pt < PT; ++pt)
      for (int64_t r = 0; r < std::min<int64_t>(kTile, rows - rt * kTile); ++r)
        Store16(p, _mm512_load_si512(c + (2 * rt + pt) * kC + r * kTile), row + rt * kTile + r,
                panel + pt, _mm512_loadu_ps(p.scale + (panel + pt) * kPanel),
                _mm512_loadu_ps(p.bias + (panel + pt) * kPanel));
}

template <bool kSigned>
SEG_AMX void AmxRows(const Problem& p, int64_t begin, int64_t end, std::vector<uint8_t>& pad) {
  alignas(64) int32_t c[4 * kTile * kTile];
  const int64_t panels = (p.n + kPanel - 1) / kPanel;
  for (int64_t row = begin; row < end; row += 2 * kTile) {
    const int64_t rows = std::min<int64_t>(2 * kTile, end - row);
    // Direct loads read x[row + rows - 1][0 .. kw): inside x unless near its end.
    const uint8_t* a = p.x + row * p.k;
    int64_t lda = p.k;
    if (rows < 2 * kTile || (row + rows - 1) * p.k + p.kw > p.m * p.k) {
      pad.assign(2 * kTile * p.kw, 0);
      SEG_AMX_READABLE(pad.data(), pad.size());
      for (int64_t r = 0; r < rows; ++r) std::memcpy(&pad[r * p.kw], a + r * p.k, p.k);
      a = pad.data();
      lda = p.kw;
    }
    const uint8_t* a1 = a + kTile * lda;
    int64_t panel = 0;
    if (rows > kTile) {
      for (; panel + 2 <= panels; panel += 2) AmxBlock<kSigned, 2, 2>(p, a, a1, lda, panel, c, row, rows);
      if (panel < panels) AmxBlock<kSigned, 2, 1>(p, a, a1, lda, panel, c, row, rows);
    } else {
      for (; panel + 2 <= panels; panel += 2) AmxBlock<kSigned, 1, 2>(p, a, a1, lda, panel, c, row, rows);
      if (panel < panels) AmxBlock<kSigned, 1, 1>(p, a, a1, lda, panel, c, row, rows);
    }
  }
}

SEG_AMX inline void AmxRun(const Problem& p, int64_t begin, int64_t end) {
  thread_local std::vector<uint8_t> pad;
  TileConfig config;
  for (int t = 0; t < 8; ++t) { config.colsb[t] = 64; config.rows[t] = kTile; }
  _tile_loadconfig(&config);
  SEG_AMX_READABLE(p.x, p.m * p.k);
  SEG_AMX_READABLE(p.w, (p.n + kPanel - 1) / kPanel * kPanel * p.kw);
  if (p.is_signed) AmxRows<true>(p, begin, end, pad); else AmxRows<false>(p, begin, end, pad);
  _tile_release();
}

#else
inline bool AmxPermitted() { return false; }
inline void AmxRun(const Problem&, int64_t, int64_t) {}  // never called: AmxPermitted
#endif  // SEG_NEW_LOOPS

// Whether this CPU has the instructions of loop `isa` (AMX's permission is asked apart).
inline bool RunsLoop(int32_t isa) {
  const bool vnni512 = seg::HasAvx512() && __builtin_cpu_supports("avx512vnni");
  switch (isa) {
    case kVnni: return vnni512;
    case kAmx: return seg::HasAvx512();
#if !SEG_NEW_LOOPS
    case kAvxVnni: return false;
#elif defined(SEG_KERNEL_EMULATION)
    case kAvxVnni: return vnni512;  // its AVX-512 VL encoding
#else
    case kAvxVnni: return __builtin_cpu_supports("avxvnni");
#endif
    default: return true;  // AVX2 and FMA: the library's own
  }
}

}  // namespace product
}  // namespace seg

#endif  // SEG_INFERENCE_INT8_PRODUCT_H_
