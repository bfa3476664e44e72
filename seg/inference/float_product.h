// 1x1 products with float32 activations in and out, for x86 CPUs with AVX-512: in float32
// (fused multiply-adds), or in bfloat16 with AVX-512 BF16 (`vdpbf16ps`) or AMX-BF16 tiles, the
// inputs rounded to bfloat16 inside the kernel, so the float32 layers around a product
// (depthwise, residual sums) need no conversion pass over memory; bias, activation and
// residual sum run in the product's output loop.
//
//   out[m, n] = act(sum_k x[m, k] * w[k, n] + bias[n]) (+ residual[m, n])
//
// x: [m, k] float32, or for the bfloat16 loops bfloat16 (`xb`: a layer that rounded its
// output as RoundRows would, so the product computes the same numbers). float32 (isa
// kAvx512F32): w float32, packed by `pack_weights` in float_kernel.py into panels of 16
// output channels, each [k][16]; every output is the fused multiply-add of its inputs in
// order k = 0, 1, ..., then the bias. bfloat16: w as
// uint16, panels of [kp / 2][16][2] (two consecutive inputs of one output channel in one
// 32-bit lane: the pair layout of `vdpbf16ps` and of AMX's B tiles), kp = k rounded up to
// 32 with zero weights. Each product of two bfloat16 is exact in float32; the sums are
// float32 (round to nearest even), as XLA's bfloat16 products with float32 accumulation, in
// another order. A row block's inputs are rounded to bfloat16 (to nearest even, as XLA and
// NumPy round) once into a per-thread buffer, zero-padded to kp inputs and to whole tiles of
// rows, from which both bfloat16 loops read.
//
// mode: 0 linear, 1 ReLU6, 2 ReLU; mode 0 may add a float32 `residual` [m, n] (a residual
// block's projection and its sum in one pass).
#ifndef SEG_INFERENCE_FLOAT_PRODUCT_H_
#define SEG_INFERENCE_FLOAT_PRODUCT_H_

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "int8_product.h"  // SEG_INLINE, SEG_AVX512, SEG_AMX, the AMX permission and config
#include "kernel_cpu.h"

// The AVX-512 BF16 intrinsics came with GCC 10 and clang 9 (<avx512bf16intrin.h>).
#if !defined(SEG_WITHOUT_NEW_LOOPS) && __has_include(<avx512bf16intrin.h>)
#define SEG_BF16_LOOP 1
#else
#define SEG_BF16_LOOP 0
#endif

namespace seg {
namespace floating {

constexpr int kPanel = 16;          // output channels per weight panel: one zmm of float32
constexpr int64_t kKMultiple = 32;  // inputs per AMX tile product: packed k's multiple
constexpr int64_t kChunkRows = 64;  // rows per claim of the thread pool, at most
constexpr int64_t kGrainRows = 32;  // and a multiple of this (two AMX row tiles)

enum Mode { kLinear = 0, kRelu6 = 1, kRelu = 2 };
// kAvx512F32, kAvx2F32: float32 products (no rounding), float32 weights [panels][k][16].
enum Isa { kAvx512Bf16 = 0, kAmxBf16 = 1, kAvx512F32 = 2, kAvx2F32 = 3 };  // float_kernel.py

struct Problem {
  const float* x;
  int64_t m, k, n;
  int64_t kp;          // the packed weights' inputs: k rounded up to kKMultiple
  const uint16_t* w;   // bfloat16's weights
  const float* bias;   // padded to whole panels
  int mode;
  int isa;
  const float* residual;  // mode 0: added to the output, or null
  float* out;
  const float* wf = nullptr;  // the float32 loops' weights (then w is unused)
  // The bfloat16 loops: x already in bfloat16 (the bits RoundRows would give), x unused.
  const uint16_t* xb = nullptr;
};

// ------------------------------------------------------------------------------------------
// Rows [row, row + rows) of x as bfloat16, rounded to nearest even (seg::RoundToBf16), or of
// xb as they are, into a [rows_padded][kp] buffer with zeros beyond k and beyond `rows`.
SEG_AVX512 inline void RoundRows(const Problem& p, int64_t row, int64_t rows,
                                 int64_t rows_padded, uint16_t* a) {
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* o = a + r * p.kp;
    if (p.xb) {
      std::memcpy(o, p.xb + (row + r) * p.k, p.k * sizeof(uint16_t));
      std::fill(o + p.k, o + p.kp, 0);
      continue;
    }
    const float* x = p.x + (row + r) * p.k;
    for (int64_t c = 0; c < p.kp; c += 16) {
      const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(16, p.k - c));
      const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + c),
                          seg::RoundToBf16(_mm512_maskz_loadu_ps(mask, x + c)));
    }
  }
  if (rows_padded > rows)
    std::memset(a + rows * p.kp, 0, (rows_padded - rows) * p.kp * sizeof(uint16_t));
}

// The bfloat16 rows [row, row + rows) as the loops read them ([rows][kp], zeros beyond k):
// xb itself where its rows need no padding, else rounded or copied into `buffer`.
SEG_AVX512 inline const uint16_t* BfloatRows(const Problem& p, int64_t row, int64_t rows,
                                             int64_t rows_padded,
                                             std::vector<uint16_t>& buffer) {
  if (p.xb && p.k == p.kp && rows == rows_padded) return p.xb + row * p.k;
  buffer.resize(rows_padded * p.kp);
  RoundRows(p, row, rows, rows_padded, buffer.data());
  return buffer.data();
}

// One row's 16 channels of `panel` from their float32 sums: bias, activation, residual.
SEG_AVX512 SEG_INLINE void Store16(const Problem& p, __m512 acc, int64_t m, int64_t panel,
                                   __m512 b) {
  const int64_t n0 = panel * kPanel;
  const int64_t valid = std::min<int64_t>(kPanel, p.n - n0);
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
  __m512 y = _mm512_add_ps(acc, b);
  if (p.mode != kLinear) y = _mm512_max_ps(y, _mm512_setzero_ps());
  if (p.mode == kRelu6) y = _mm512_min_ps(y, _mm512_set1_ps(6.f));
  // Whole panels unmasked: masked stores are several times slower on AMD's Zen 4 and 5.
  if (valid == kPanel) {
    if (p.residual) y = _mm512_add_ps(y, _mm512_loadu_ps(p.residual + m * p.n + n0));
    _mm512_storeu_ps(p.out + m * p.n + n0, y);
    return;
  }
  if (p.residual) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, p.residual + m * p.n + n0));
  _mm512_mask_storeu_ps(p.out + m * p.n + n0, mask, y);
}

// The output loop of R rows x P panels of float32 sums.
template <int R, int P>
SEG_AVX512 SEG_INLINE void StoreTile(const Problem& p, const __m512 (&acc)[R][P], int64_t row,
                                     int64_t panel) {
  for (int q = 0; q < P; ++q) {
    const __m512 b = _mm512_loadu_ps(p.bias + (panel + q) * kPanel);
    for (int r = 0; r < R; ++r) Store16(p, acc[r][q], row + r, panel + q, b);
  }
}

// run(P, panel) for groups of P panels (4, then a 2, then a 1) that cover the output.
template <typename Run>
inline void ForPanelGroups(const Problem& p, Run run) {
  const int64_t panels = (p.n + kPanel - 1) / kPanel;
  int64_t panel = 0;
  for (; panel + 4 <= panels; panel += 4) run(std::integral_constant<int, 4>(), panel);
  if (panel + 2 <= panels) {
    run(std::integral_constant<int, 2>(), panel);
    panel += 2;
  }
  if (panel < panels) run(std::integral_constant<int, 1>(), panel);
}

// ------------------------------------------------------------------------------------------
// float32 (AVX-512 F): one input of a panel (16 channels) is one zmm, each row's input is
// broadcast and multiplied in by a fused multiply-add; R rows x P panels of accumulators,
// the inputs summed in order (k = 0, 1, ...). Rows are read from x itself.
template <int R, int P>
SEG_AVX512 SEG_INLINE void F32Tile(const Problem& p, int64_t row, int64_t panel) {
  const int64_t k = p.k, panel_size = k * kPanel;
  const float* w = p.wf + panel * panel_size;
  const float* x = p.x + row * k;
  __m512 acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < P; ++q) acc[r][q] = _mm512_setzero_ps();
  for (int64_t g = 0; g < k; ++g) {
    __m512 wv[P];
    for (int q = 0; q < P; ++q) wv[q] = _mm512_loadu_ps(w + q * panel_size + kPanel * g);
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * k + g]);
      for (int q = 0; q < P; ++q) acc[r][q] = _mm512_fmadd_ps(xb, wv[q], acc[r][q]);
    }
  }
  StoreTile<R, P>(p, acc, row, panel);
}

template <int P>
SEG_AVX512 void F32Panels(const Problem& p, int64_t begin, int64_t end, int64_t panel) {
  constexpr int R = P == 4 ? 6 : 8;
  int64_t r = begin;
  for (; r + R <= end; r += R) F32Tile<R, P>(p, r, panel);
  for (; r < end; ++r) F32Tile<1, P>(p, r, panel);
}

inline void F32Rows(const Problem& p, int64_t begin, int64_t end) {
  ForPanelGroups(p, [&](auto panels, int64_t panel) {
    F32Panels<decltype(panels)::value>(p, begin, end, panel);
  });
}

// One row's 8 channels from n0 (those below p.n) from their float32 sums: bias, activation,
// residual (the AVX2 loop's Store16).
SEG_INLINE void Store8(const Problem& p, __m256 acc, int64_t m, int64_t n0) {
  const int64_t valid = std::min<int64_t>(8, p.n - n0);
  if (valid <= 0) return;
  __m256 y = _mm256_add_ps(acc, _mm256_loadu_ps(p.bias + n0));  // (padded to whole panels)
  if (p.mode != kLinear) y = _mm256_max_ps(y, _mm256_setzero_ps());
  if (p.mode == kRelu6) y = _mm256_min_ps(y, _mm256_set1_ps(6.f));
  const int64_t at = m * p.n + n0;
  if (valid == 8) {
    if (p.residual) y = _mm256_add_ps(y, _mm256_loadu_ps(p.residual + at));
    _mm256_storeu_ps(p.out + at, y);
    return;
  }
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  if (p.residual) y = _mm256_add_ps(y, _mm256_maskload_ps(p.residual + at, mask));
  _mm256_maskstore_ps(p.out + at, mask, y);
}

// float32 in AVX2 (CPUs without AVX-512): the same sums in the same order, a panel's 16
// channels in two ymm, 6 rows x 1 panel of accumulators (12 of the 16 registers).
template <int R>
SEG_INLINE void F32TileAvx2(const Problem& p, int64_t row, int64_t panel) {
  const int64_t k = p.k;
  const float* w = p.wf + panel * k * kPanel;
  const float* x = p.x + row * k;
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < k; ++g) {
    const __m256 w0 = _mm256_loadu_ps(w + kPanel * g), w1 = _mm256_loadu_ps(w + kPanel * g + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_set1_ps(x[r * k + g]);
      acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    Store8(p, acc[r][0], row + r, panel * kPanel);
    Store8(p, acc[r][1], row + r, panel * kPanel + 8);
  }
}

inline void F32RowsAvx2(const Problem& p, int64_t begin, int64_t end) {
  const int64_t panels = (p.n + kPanel - 1) / kPanel;
  for (int64_t panel = 0; panel < panels; ++panel) {
    int64_t r = begin;
    for (; r + 6 <= end; r += 6) F32TileAvx2<6>(p, r, panel);
    for (; r < end; ++r) F32TileAvx2<1>(p, r, panel);
  }
}

// ------------------------------------------------------------------------------------------
// AVX-512 BF16 (avx512_bf16): _mm512_dpbf16_ps multiplies the two bfloat16 of each 32-bit
// lane of its inputs and adds both products to that lane's float32: one pair of inputs of a
// panel (16 channels x 2 inputs, 64 bytes) is one zmm. R rows x P panels of accumulators.
#if SEG_BF16_LOOP
#define SEG_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

template <int R, int P>
SEG_BF16 SEG_INLINE void Tile(const Problem& p, const uint16_t* a, int64_t row,
                              int64_t panel) {
  const int64_t pairs = (p.k + 1) / 2, panel_size = p.kp * kPanel;
  const uint16_t* w = p.w + panel * panel_size;
  __m512 acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < P; ++q) acc[r][q] = _mm512_setzero_ps();
  for (int64_t g = 0; g < pairs; ++g) {
    __m512i wv[P];
    for (int q = 0; q < P; ++q) wv[q] = _mm512_loadu_si512(w + q * panel_size + 32 * g);
    for (int r = 0; r < R; ++r) {
      int32_t two;
      std::memcpy(&two, a + r * p.kp + 2 * g, 4);
      const __m512i xb = _mm512_set1_epi32(two);
      for (int q = 0; q < P; ++q)
        acc[r][q] = _mm512_dpbf16_ps(acc[r][q], (__m512bh)xb, (__m512bh)wv[q]);
    }
  }
  StoreTile<R, P>(p, acc, row, panel);
}

template <int P>
SEG_BF16 void Panels(const Problem& p, const uint16_t* a, int64_t begin, int64_t end,
                     int64_t panel) {
  constexpr int R = P == 4 ? 4 : 8;
  int64_t r = begin;
  for (; r + R <= end; r += R) Tile<R, P>(p, a + (r - begin) * p.kp, r, panel);
  for (; r < end; ++r) Tile<1, P>(p, a + (r - begin) * p.kp, r, panel);
}

// Rows [begin, end): rounded into the thread's buffer once (or read as they are: `xb`), then
// every panel.
SEG_BF16 inline void Bf16Rows(const Problem& p, int64_t begin, int64_t end) {
  thread_local std::vector<uint16_t> buffer;
  const uint16_t* a = BfloatRows(p, begin, end - begin, end - begin, buffer);
  ForPanelGroups(p, [&](auto panels, int64_t panel) {
    Panels<decltype(panels)::value>(p, a, begin, end, panel);
  });
}
#else
inline void Bf16Rows(const Problem&, int64_t, int64_t) {}  // never called: RunsLoop
#endif  // SEG_BF16_LOOP

// ------------------------------------------------------------------------------------------
// AMX-BF16 (amx_bf16): _tile_dpbf16ps adds to a 16 x 16 float32 C tile the products of a
// 16-row x 32-input bfloat16 A tile and a B tile of 16 pairs of inputs x 16 channels: the
// packed weights of a panel for 32 inputs are exactly that B tile (64-byte rows). A tiles
// come from the rounded rows (row stride kp, padded to 32 rows). Built with
// -DSEG_KERNEL_EMULATION the tile instructions are amx_emulation.h's plain C++, as in the
// int8 kernel's AMX loop.
#if SEG_NEW_LOOPS
#ifdef SEG_KERNEL_EMULATION
#define SEG_AMX_BF16 SEG_AVX512
#else
#define SEG_AMX_BF16 \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq")))
#endif

// RT row tiles x PT panels, A tiles from a0 (and a0 + 16 rows), into tiles 0..3.
template <int RT, int PT>
SEG_AMX_BF16 void AmxBlock(const Problem& p, const uint16_t* a0, int64_t panel, float* c,
                           int64_t row, int64_t rows) {
  constexpr int kTile = 16;
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  const int64_t lda = p.kp * sizeof(uint16_t), panel_size = p.kp * kPanel;
  const uint16_t* a1 = a0 + kTile * p.kp;
  const uint16_t* b0 = p.w + panel * panel_size;
  const uint16_t* b1 = b0 + panel_size;
  for (int64_t kb = 0; kb < p.kp; kb += kKMultiple) {
    _tile_loadd(4, a0 + kb, lda);
    if (RT == 2) _tile_loadd(5, a1 + kb, lda);
    _tile_loadd(6, b0 + kb * kPanel, 64);
    if (PT == 2) _tile_loadd(7, b1 + kb * kPanel, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (PT == 2) _tile_dpbf16ps(1, 4, 7);
    if (RT == 2) _tile_dpbf16ps(2, 5, 6);
    if (RT == 2 && PT == 2) _tile_dpbf16ps(3, 5, 7);
  }
  constexpr int kC = kTile * kTile;  // float32 per C tile
  _tile_stored(0, c, 64);
  if (PT == 2) _tile_stored(1, c + kC, 64);
  if (RT == 2) _tile_stored(2, c + 2 * kC, 64);
  if (RT == 2 && PT == 2) _tile_stored(3, c + 3 * kC, 64);
  for (int pt = 0; pt < PT; ++pt) {
    const __m512 b = _mm512_loadu_ps(p.bias + (panel + pt) * kPanel);
    for (int rt = 0; rt < RT; ++rt)
      for (int64_t r = 0; r < std::min<int64_t>(kTile, rows - rt * kTile); ++r)
        Store16(p, _mm512_load_ps(c + (2 * rt + pt) * kC + r * kTile), row + rt * kTile + r,
                panel + pt, b);
  }
}

SEG_AMX_BF16 inline void AmxRows(const Problem& p, int64_t begin, int64_t end) {
  constexpr int64_t kBlock = 32;  // two row tiles
  thread_local std::vector<uint16_t> buffer;
  alignas(64) float c[4 * 16 * 16];
  product::TileConfig config;
  for (int t = 0; t < 8; ++t) { config.colsb[t] = 64; config.rows[t] = 16; }
  _tile_loadconfig(&config);
  const int64_t panels = (p.n + kPanel - 1) / kPanel;
  for (int64_t row = begin; row < end; row += kBlock) {
    const int64_t rows = std::min(kBlock, end - row);
    const uint16_t* a = BfloatRows(p, row, rows, kBlock, buffer);  // whole tiles of rows
    SEG_AMX_READABLE(a, kBlock * p.kp * sizeof(uint16_t));
    SEG_AMX_READABLE(p.w, panels * p.kp * kPanel * sizeof(uint16_t));
    int64_t panel = 0;
    if (rows > 16) {
      for (; panel + 2 <= panels; panel += 2) AmxBlock<2, 2>(p, a, panel, c, row, rows);
      if (panel < panels) AmxBlock<2, 1>(p, a, panel, c, row, rows);
    } else {
      for (; panel + 2 <= panels; panel += 2) AmxBlock<1, 2>(p, a, panel, c, row, rows);
      if (panel < panels) AmxBlock<1, 1>(p, a, panel, c, row, rows);
    }
  }
  _tile_release();
}
#else
inline void AmxRows(const Problem&, int64_t, int64_t) {}  // never called: RunsLoop
#endif  // SEG_NEW_LOOPS

inline void RunRows(const Problem& p, int64_t begin, int64_t end) {
  if (p.isa == kAmxBf16) AmxRows(p, begin, end);
  else if (p.isa == kAvx512F32) F32Rows(p, begin, end);
  else if (p.isa == kAvx2F32) F32RowsAvx2(p, begin, end);
  else Bf16Rows(p, begin, end);
}

// Whether this CPU has the instructions of loop `isa` (AMX's permission is asked apart).
inline bool RunsLoop(int32_t isa) {
  switch (isa) {
#if SEG_BF16_LOOP
    case kAvx512Bf16: return seg::HasAvx512() && __builtin_cpu_supports("avx512bf16");
#endif
#if SEG_NEW_LOOPS
    case kAmxBf16: return seg::HasAvx512();  // and amx_bf16: float_kernel.py's flags
#endif
    case kAvx512F32: return seg::HasAvx512();
    case kAvx2F32: return true;  // the library's baseline (AVX2 and FMA)
    default: return false;
  }
}

}  // namespace floating
}  // namespace seg

#endif  // SEG_INFERENCE_FLOAT_PRODUCT_H_
