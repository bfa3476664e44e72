// AMX's tile instructions in plain C++, for running the int8 and bfloat16 kernels' AMX loops
// on CPUs without AMX: int8_product.h includes this (after <immintrin.h>) when built with
// -DSEG_KERNEL_EMULATION (int8_kernel.py: `emulate_loops`), and the AMX loops (its own and
// float_product.h's) then call these instead of the instructions. Tests use it to check those
// loops' tiling, padding and output loops against NumPy where no AMX CPU is at hand; it is
// far slower than the real tiles.
//
// What it models (Intel SDM, "Intel AMX"; palette 1): eight tiles of at most 16 rows x 64
// bytes, shaped by the config that _tile_loadconfig reads (64 bytes: palette, start_row,
// 14 reserved, colsb[16] as uint16, rows[16] as uint8); a load reads rows x colsb bytes at
// base + row * stride and zeroes the rest of the tile; a store writes rows x colsb bytes;
// _tile_dpbusd / _tile_dpbssd add to C[m][n] (int32, wrapping) the sums over k of
// A[m][4k + i] (uint8 / int8) times B[k][4n + i] (int8), i = 0..3; _tile_dpbf16ps adds
// the float32 products of pairs of bfloat16 (the bfloat16 kernel, float_product.h). What the
// hardware would fault on (a tile used without a config, a palette other than 1, shapes that do not fit
// the product) aborts with a message instead. So does a load from outside the memory the
// loop declared readable (`AllowRead`, once it declared any): on the hardware such a read
// goes unnoticed, or faults only where it crosses into an unmapped page.
#ifndef SEG_INFERENCE_AMX_EMULATION_H_
#define SEG_INFERENCE_AMX_EMULATION_H_

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

namespace seg_amx {

struct Tiles {
  bool configured = false;
  int rows[8] = {}, colsb[8] = {};
  alignas(64) uint8_t data[8][16][64] = {};
  std::vector<std::pair<const uint8_t*, const uint8_t*>> readable;  // [begin, end) ranges
};

inline Tiles& State() {
  thread_local Tiles tiles;
  return tiles;
}

[[noreturn]] inline void Fault(const char* what, int tile) {
  std::fprintf(stderr, "AMX emulation: %s (tile %d)\n", what, tile);
  std::abort();
}

inline Tiles& Configured(int tile) {
  Tiles& s = State();
  if (!s.configured) Fault("tile used without a configuration", tile);
  if (tile < 0 || tile > 7) Fault("no such tile", tile);
  return s;
}

inline void LoadConfig(const void* config) {
  const uint8_t* c = static_cast<const uint8_t*>(config);
  if (c[0] != 1) Fault("palette other than 1", -1);
  Tiles& s = State();
  for (int t = 0; t < 8; ++t) {
    uint16_t colsb;
    std::memcpy(&colsb, c + 16 + 2 * t, 2);
    s.rows[t] = c[48 + t];
    s.colsb[t] = colsb;
    if (s.rows[t] > 16 || s.colsb[t] > 64) Fault("tile shape beyond 16 rows x 64 bytes", t);
  }
  std::memset(s.data, 0, sizeof(s.data));
  s.configured = true;
}

inline void Release() {
  State() = Tiles();
}

// Tile loads may read [p, p + bytes) until the next Release.
inline void AllowRead(const void* p, size_t bytes) {
  const uint8_t* begin = static_cast<const uint8_t*>(p);
  State().readable.emplace_back(begin, begin + bytes);
}

inline bool Readable(const Tiles& s, const uint8_t* begin, const uint8_t* end) {
  if (s.readable.empty()) return true;
  for (const auto& range : s.readable)
    if (begin >= range.first && end <= range.second) return true;
  return false;
}

inline void Zero(int t) {
  std::memset(Configured(t).data[t], 0, sizeof(Tiles::data[0]));
}

inline void Load(int t, const void* base, long stride) {
  Tiles& s = Configured(t);
  std::memset(s.data[t], 0, sizeof(Tiles::data[0]));
  for (int r = 0; r < s.rows[t]; ++r) {
    const uint8_t* row = static_cast<const uint8_t*>(base) + r * stride;
    if (!Readable(s, row, row + s.colsb[t])) Fault("tile load outside the readable memory", t);
    std::memcpy(s.data[t][r], row, s.colsb[t]);
  }
}

inline void Store(int t, void* base, long stride) {
  Tiles& s = Configured(t);
  for (int r = 0; r < s.rows[t]; ++r)
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, s.data[t][r], s.colsb[t]);
}

// C += A . B over groups of 4 bytes; kSignedA: A's bytes are int8 (dpbssd), else uint8.
template <bool kSignedA>
inline void DotProduct(int c, int a, int b) {
  Tiles& s = Configured(c);
  Configured(a);
  Configured(b);
  const int m = s.rows[c], n = s.colsb[c] / 4, k4 = s.colsb[a] / 4;
  if (s.rows[a] != m || s.rows[b] != k4 || s.colsb[b] != s.colsb[c] || s.colsb[c] % 4)
    Fault("tile shapes do not fit a product", c);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      int32_t acc;
      std::memcpy(&acc, &s.data[c][i][4 * j], 4);
      uint32_t sum = static_cast<uint32_t>(acc);  // wraps as the instruction does
      for (int k = 0; k < k4; ++k)
        for (int g = 0; g < 4; ++g) {
          const uint8_t x = s.data[a][i][4 * k + g];
          const int32_t av = kSignedA ? static_cast<int8_t>(x) : x;
          sum += static_cast<uint32_t>(av * static_cast<int8_t>(s.data[b][k][4 * j + g]));
        }
      acc = static_cast<int32_t>(sum);
      std::memcpy(&s.data[c][i][4 * j], &acc, 4);
    }
}

// C += A . B over pairs of bfloat16 (_tile_dpbf16ps): C[m][n] (float32) plus, for each pair k
// in order, A[m][2k] * B[k][2n] then A[m][2k + 1] * B[k][2n + 1], each product exact and
// each sum rounded to float32 (the SDM's order; the hardware's denormals aside).
inline void DotProductBf16(int c, int a, int b) {
  Tiles& s = Configured(c);
  Configured(a);
  Configured(b);
  const int m = s.rows[c], n = s.colsb[c] / 4, k2 = s.colsb[a] / 4;
  if (s.rows[a] != m || s.rows[b] != k2 || s.colsb[b] != s.colsb[c] || s.colsb[c] % 4)
    Fault("tile shapes do not fit a product", c);
  auto widen = [](const uint8_t* bytes) {
    uint16_t h;
    std::memcpy(&h, bytes, 2);
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  };
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      float acc;
      std::memcpy(&acc, &s.data[c][i][4 * j], 4);
      for (int k = 0; k < k2; ++k)
        for (int g = 0; g < 2; ++g)
          acc += widen(&s.data[a][i][4 * k + 2 * g]) * widen(&s.data[b][k][4 * j + 2 * g]);
      std::memcpy(&s.data[c][i][4 * j], &acc, 4);
    }
}

}  // namespace seg_amx

// The intrinsics' names, now calling the emulation (GCC defines some as macros, some as
// functions: a macro defined after <immintrin.h> replaces either in the code that follows).
#undef _tile_loadconfig
#undef _tile_release
#undef _tile_zero
#undef _tile_loadd
#undef _tile_stored
#undef _tile_dpbusd
#undef _tile_dpbssd
#undef _tile_dpbf16ps
#define _tile_loadconfig(config) seg_amx::LoadConfig(config)
#define _tile_release() seg_amx::Release()
#define _tile_zero(t) seg_amx::Zero(t)
#define _tile_loadd(t, base, stride) seg_amx::Load(t, base, stride)
#define _tile_stored(t, base, stride) seg_amx::Store(t, base, stride)
#define _tile_dpbusd(c, a, b) seg_amx::DotProduct<false>(c, a, b)
#define _tile_dpbssd(c, a, b) seg_amx::DotProduct<true>(c, a, b)
#define _tile_dpbf16ps(c, a, b) seg_amx::DotProductBf16(c, a, b)

#endif  // SEG_INFERENCE_AMX_EMULATION_H_
