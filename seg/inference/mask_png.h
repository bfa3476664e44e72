// The two PNGs of a class map (predict's masks: the palette PNG of its indices and the RGB
// PNG of their colours), deflated straight from the indices, strip by strip; and its
// overlay on the image (Overlay, at the end).
//
// Every row is PNG-filtered 'Up' (each byte minus the byte above; the image's first row minus
// zeros), as seg/predict/png.py's zlib writer does, so the decoded images are the same. A
// mask is runs of one class, and where neither the row nor the row above changes class, or
// the row is the row above, the filtered pixels repeat: a run of such pixels is written as
// its first pixel's bytes and then copies of the pixel before (deflate's match at distance
// 1, or 3 for RGB), 258 bytes at a time. The runs are found 32 pixels at a time (AVX2,
// comparing each pixel's class and the class above with its left neighbour's, and with
// each other), so the unchanged stretches, most of a photo's mask, cost a few instructions
// per 32 pixels instead of zlib's pass over every byte (and the colour PNG needs no RGB
// copy of the mask). One deflate block of Huffman codes fitted to masks (LiteralLength:
// the 258-byte copy 1 bit, the filter type 2 and byte 0 3 bits, every other symbol 10 or
// 11: a complete code, so any bytes can be written), and the Adler-32 of the filtered bytes
// computed run by run in closed form.
#ifndef SEG_INFERENCE_MASK_PNG_H_
#define SEG_INFERENCE_MASK_PNG_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace seg {
namespace mask_png {

constexpr uint64_t kMod = 65521;  // Adler-32's
constexpr int kSymbols = 286;     // literal/length alphabet: bytes, end of block, lengths
constexpr int kEnd = 256, kLongest = 285;
// Match lengths 3..258: the length symbol 257 + i covers kBase[i] .. kBase[i + 1] - 1 with
// kExtra[i] extra bits (RFC 1951, 3.2.5).
constexpr uint16_t kBase[29] = {3,  4,  5,  6,  7,  8,  9,  10, 11,  13,  15,  17,  19,  23, 27,
                                31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
constexpr uint8_t kExtra[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2,
                                2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};

// Code lengths: the 258-byte match 1 bit; bytes 0 and 2 (a run's zeros, each row's filter
// type) 3 bits; the other lengths, the end of block and bytes 1, 3..201 10 bits; bytes
// 202..255 11 bits: 1/2 + 2/8 + 229/1024 + 54/2048 = 1.
inline int LiteralLength(int symbol) {
  if (symbol == kLongest) return 1;
  if (symbol == 0 || symbol == 2) return 3;
  if (symbol >= 202 && symbol <= 255) return 11;
  return 10;
}

struct Tables {
  uint16_t code[kSymbols];  // bit-reversed canonical codes (deflate writes them LSB first)
  uint8_t length[kSymbols];
  uint8_t symbol_of[259];   // match length -> length symbol index i (symbol 257 + i)
  Tables() {
    int count[16] = {0};
    for (int s = 0; s < kSymbols; ++s) ++count[length[s] = LiteralLength(s)];
    int next[16] = {0};
    for (int bits = 1, first = 0; bits < 16; ++bits)
      next[bits] = first = (first + count[bits - 1]) << 1;
    for (int s = 0; s < kSymbols; ++s) code[s] = Reversed(next[length[s]]++, length[s]);
    for (int i = 0, length_ = 3; length_ <= 258; ++length_) {
      while (i < 28 && length_ >= kBase[i + 1]) ++i;
      symbol_of[length_] = static_cast<uint8_t>(i);
    }
  }
  static uint16_t Reversed(int code_, int bits) {
    int out = 0;
    for (int b = 0; b < bits; ++b) out |= ((code_ >> b) & 1) << (bits - 1 - b);
    return static_cast<uint16_t>(out);
  }
};

inline const Tables& GetTables() {
  static const Tables tables;
  return tables;
}

// The stream between calls, kept by the caller: pending bits (LSB first) and their count, and
// the Adler-32 sums of the filtered bytes so far.
struct State {
  uint64_t bits, count, s1, s2;
};

class Writer {
 public:
  Writer(State* state, uint8_t* out) : state_(state), out_(out), start_(out) {}
  void Put(uint64_t value, int bits) {
    state_->bits |= value << state_->count;
    state_->count += bits;
    if (state_->count >= 32) {
      const uint32_t word = static_cast<uint32_t>(state_->bits);
      std::memcpy(out_, &word, 4);  // little-endian x86: the first bits in the first byte
      out_ += 4;
      state_->bits >>= 32;
      state_->count -= 32;
    }
  }
  void Byte(uint8_t b) { *out_++ = b; }  // only with no bits pending
  void Symbol(int s) {
    const Tables& t = GetTables();
    Put(t.code[s], t.length[s]);
  }
  // A match of `length` (3..258) bytes at distance 1 (distance code 0) or 3 (code 2), whose
  // codes are the single bits 0 and 1 of a two-code distance tree.
  void Match(int length, int distance) {
    const Tables& t = GetTables();
    const int i = t.symbol_of[length];
    Symbol(257 + i);
    if (kExtra[i]) Put(length - kBase[i], kExtra[i]);
    Put(distance == 1 ? 0 : 1, 1);
  }
  void Flush() {  // the pending bits to whole bytes, zero-padded
    while (state_->count > 0) {
      *out_++ = static_cast<uint8_t>(state_->bits);
      state_->bits >>= 8;
      state_->count = state_->count > 8 ? state_->count - 8 : 0;
    }
    state_->bits = 0;
  }
  int64_t Written() const { return out_ - start_; }

 private:
  State* state_;
  uint8_t* out_;
  uint8_t* start_;
};

// The zlib header and the block's: final, dynamic Huffman codes (RFC 1951, 3.2.7): 286
// literal/length lengths and 3 distance lengths (codes 0 and 2: distances 1 and 3, one bit
// each), written with a code-length code of lengths 2 (for 0, 1, 3) and 3 (for 10, 11).
inline void Header(Writer& w) {
  w.Byte(0x78);  // deflate, 32 KiB window
  w.Byte(0x01);  // (0x7801 % 31 == 0), no dictionary, fastest
  w.Put(1, 1);   // BFINAL
  w.Put(2, 2);   // BTYPE: dynamic
  w.Put(kSymbols - 257, 5);
  w.Put(3 - 1, 5);
  static const int kOrder[19] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};
  int cl_length[19] = {0};
  cl_length[0] = cl_length[1] = cl_length[3] = 2;
  cl_length[10] = cl_length[11] = 3;
  // Canonical: 0 -> 00, 1 -> 01, 3 -> 10, 10 -> 110, 11 -> 111.
  int cl_code[19] = {0};
  cl_code[0] = 0, cl_code[1] = 1, cl_code[3] = 2, cl_code[10] = 6, cl_code[11] = 7;
  constexpr int kWritten = 18;  // through symbol 1, the last used in kOrder
  w.Put(kWritten - 4, 4);
  for (int i = 0; i < kWritten; ++i) w.Put(cl_length[kOrder[i]], 3);
  auto length = [&](int l) { w.Put(Tables::Reversed(cl_code[l], cl_length[l]), cl_length[l]); };
  for (int s = 0; s < kSymbols; ++s) length(LiteralLength(s));
  length(1), length(0), length(1);  // distance codes 0, 1, 2
}

inline void Adler(State* st, const uint8_t* pattern, int p, uint64_t n) {
  uint64_t sum = 0, weighted = 0;
  for (int j = 0; j < p; ++j) sum += pattern[j], weighted += uint64_t(p - j) * pattern[j];
  const uint64_t pairs = (n * (n - 1) / 2) % kMod;
  st->s2 = (st->s2 + (p * (n % kMod) % kMod) * st->s1 + (p * sum % kMod) * pairs +
            (n % kMod) * weighted) % kMod;
  st->s1 = (st->s1 + (n % kMod) * sum) % kMod;
}

// The first pixel at or after x (x >= 1) that may not repeat its left neighbour's filtered
// bytes, or width. A pixel repeats them where its class and the class above are its
// neighbour's, or where both it and its neighbour have the class above (filtered zeros).
inline int64_t RunEnd(const uint8_t* m, const uint8_t* q, int64_t x, int64_t width) {
  auto load = [](const uint8_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  };
  for (; x + 32 <= width; x += 32) {
    const __m256i mx = load(m + x), ml = load(m + x - 1), qx = load(q + x), ql = load(q + x - 1);
    const __m256i same = _mm256_or_si256(
        _mm256_and_si256(_mm256_cmpeq_epi8(mx, ml), _mm256_cmpeq_epi8(qx, ql)),
        _mm256_and_si256(_mm256_cmpeq_epi8(mx, qx), _mm256_cmpeq_epi8(ml, ql)));
    const uint32_t differ = ~static_cast<uint32_t>(_mm256_movemask_epi8(same));
    if (differ) return x + __builtin_ctz(differ);
  }
  for (; x < width; ++x)
    if (!((m[x] == m[x - 1] && q[x] == q[x - 1]) || (m[x] == q[x] && m[x - 1] == q[x - 1])))
      return x;
  return width;
}

// A run of n filtered pixels equal to `pattern` (p bytes each): the first pixel's bytes, then
// copies of the pixel before.
inline void Run(Writer& w, State* st, const uint8_t* pattern, int p, int64_t n) {
  for (int j = 0; j < p; ++j) w.Symbol(pattern[j]);
  int64_t left = p * (n - 1);
  while (left >= 3) {
    int64_t take = left > 258 ? 258 : left;
    if (left - take == 1 || left - take == 2) take = left - 3;
    w.Match(static_cast<int>(take), p);
    left -= take;
  }
  for (int64_t k = p * n - left; k < p * n; ++k) w.Symbol(pattern[k % p]);
  Adler(st, pattern, p, static_cast<uint64_t>(n));
}

// Rows of class indices m [rows, width] (row stride `stride`) after `previous` (the row
// above the first, or null at the image's top), filtered 'Up' and deflated: the palette
// PNG's bytes (colours null) or the RGB PNG's of colours [256 * 3]. `start`: the stream's
// first call (the headers first); `finish`: its last (the end of block and the Adler-32
// after these rows). Returns the bytes written to out, which holds at least
// 2 + (11 * rows * (1 + 3 * width) + 1200) / 8 + 8.
inline int64_t Deflate(State* st, const uint8_t* m, const uint8_t* previous, int64_t rows,
                       int64_t width, int64_t stride, const uint8_t* colours, bool start,
                       bool finish, uint8_t* out) {
  Writer w(st, out);
  if (start) {
    st->bits = st->count = st->s2 = 0;
    st->s1 = 1;
    Header(w);
  }
  std::vector<uint8_t> zeros(previous ? 0 : width, 0);
  const int p = colours ? 3 : 1;
  const uint8_t filter_type = 2;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = m + r * stride;
    const bool top = r == 0 && !previous;
    const uint8_t* above = r ? m + (r - 1) * stride : top ? zeros.data() : previous;
    w.Symbol(filter_type);
    Adler(st, &filter_type, 1, 1);
    for (int64_t x = 0; x < width;) {
      const int64_t end = RunEnd(row, above, x + 1, width);
      uint8_t pattern[3];
      if (!colours) {
        pattern[0] = static_cast<uint8_t>(row[x] - above[x]);
      } else {
        for (int c = 0; c < 3; ++c)
          pattern[c] = static_cast<uint8_t>(colours[3 * row[x] + c] -
                                            (top ? 0 : colours[3 * above[x] + c]));
      }
      Run(w, st, pattern, p, end - x);
      x = end;
    }
  }
  if (finish) {
    w.Symbol(kEnd);
    w.Flush();
    const uint32_t adler = static_cast<uint32_t>((st->s2 << 16) | st->s1);
    for (int shift = 24; shift >= 0; shift -= 8) w.Byte(static_cast<uint8_t>(adler >> shift));
  }
  return w.Written();
}

// predict's --overlay, in place: the pixels of rgb [height, width] (row stride `stride`,
// `pixel_bytes` from one pixel to the next: 3, or 4 in Pillow's memory; R, G, B first) whose
// class in mask [height, width] (row stride `mask_stride`) is not 0 become
// round((pixel + colour) / 2) with halves to even (seg/predict/outputs.py: overlay), the
// background ones stay; the classes are read 32 at a time, only the others' pixels touched.
inline void Overlay(uint8_t* rgb, int64_t height, int64_t width, int64_t stride,
                    int64_t pixel_bytes, const uint8_t* mask, int64_t mask_stride,
                    const uint8_t* colours) {
  auto blend = [&](uint8_t* pixel, int k) {
    for (int c = 0; c < 3; ++c) {
      const unsigned total = pixel[c] + colours[3 * k + c];
      pixel[c] = static_cast<uint8_t>((total + ((total >> 1) & 1)) >> 1);
    }
  };
  for (int64_t y = 0; y < height; ++y) {
    uint8_t* row = rgb + y * stride;
    const uint8_t* m = mask + y * mask_stride;
    int64_t x = 0;
    for (; x + 32 <= width; x += 32) {
      const __m256i classes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + x));
      uint32_t others = ~static_cast<uint32_t>(
          _mm256_movemask_epi8(_mm256_cmpeq_epi8(classes, _mm256_setzero_si256())));
      for (; others; others &= others - 1) {
        const int64_t at = x + __builtin_ctz(others);
        blend(row + pixel_bytes * at, m[at]);
      }
    }
    for (; x < width; ++x)
      if (m[x]) blend(row + pixel_bytes * x, m[x]);
  }
}

}  // namespace mask_png
}  // namespace seg

#endif  // SEG_INFERENCE_MASK_PNG_H_
