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
// copy of the mask). Each strip is one deflate block of Huffman codes fitted to its symbols
// (the runs are found once, their symbols counted, the codes built, then written), and the
// Adler-32 of the filtered bytes is computed run by run in closed form.
#ifndef SEG_INFERENCE_MASK_PNG_H_
#define SEG_INFERENCE_MASK_PNG_H_

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace seg {
namespace mask_png {

constexpr uint64_t kMod = 65521;  // Adler-32's
constexpr int kSymbols = 286;     // literal/length alphabet: bytes, end of block, lengths
constexpr int kEnd = 256;
constexpr int kMaxBits = 15, kMaxCodeLengthBits = 7;  // RFC 1951's limits
// Match lengths 3..258: the length symbol 257 + i covers kBase[i] .. kBase[i + 1] - 1 with
// kExtra[i] extra bits (RFC 1951, 3.2.5).
constexpr uint16_t kBase[29] = {3,  4,  5,  6,  7,  8,  9,  10, 11,  13,  15,  17,  19,  23, 27,
                                31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
constexpr uint8_t kExtra[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2,
                                2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
// The most bytes Deflate writes for `rows` rows of `width` pixels: a zlib header, a block
// header (at most 19 * 3 + 289 * 7 bits and the fields), at most kMaxBits bits per filtered
// byte (a match costs at most 15 + 5 + 1 bits for 3 bytes or more), the final block and the
// Adler-32; seg/predict/png.py allocates the same.
constexpr int64_t MaxBytes(int64_t rows, int64_t width) {
  return 2 + (kMaxBits * rows * (1 + 3 * width) + 2200) / 8 + 16;
}

inline uint16_t Reversed(int code, int bits) {  // deflate writes Huffman codes LSB first
  int out = 0;
  for (int b = 0; b < bits; ++b) out |= ((code >> b) & 1) << (bits - 1 - b);
  return static_cast<uint16_t>(out);
}

// Match length -> its length symbol's index i (symbol 257 + i).
inline const uint8_t* LengthSymbols() {
  static const struct Table {
    uint8_t of[259];
    Table() {
      for (int i = 0, length = 3; length <= 258; ++length) {
        while (i < 28 && length >= kBase[i + 1]) ++i;
        of[length] = static_cast<uint8_t>(i);
      }
    }
  } table;
  return table.of;
}

// Code lengths, at most max_bits, of a Huffman code for the frequencies of n symbols (0 for
// the unused ones): a complete code wherever two or more symbols are used. Huffman's
// construction (two queues over the leaves sorted by frequency); if a code runs longer than
// max_bits, the frequencies are halved (rounding up) and it is built again, until the
// frequencies flatten enough.
inline void HuffmanLengths(const uint32_t* freq, int n, int max_bits, uint8_t* lengths) {
  std::vector<uint64_t> f(freq, freq + n);
  std::vector<int> leaves;
  for (int i = 0; i < n; ++i)
    if (f[i]) leaves.push_back(i);
  std::fill(lengths, lengths + n, 0);
  const int m = static_cast<int>(leaves.size());
  if (m == 1) lengths[leaves[0]] = 1;
  if (m < 2) return;
  std::vector<uint64_t> weight(2 * m - 1);
  std::vector<int> parent(2 * m - 1), depth(2 * m - 1);
  for (;;) {
    std::sort(leaves.begin(), leaves.end(),
              [&](int a, int b) { return f[a] != f[b] ? f[a] < f[b] : a < b; });
    for (int i = 0; i < m; ++i) weight[i] = f[leaves[i]];
    int leaf = 0, internal = m, next = m;  // the queues: leaves [leaf, m), [internal, next)
    auto take = [&]() {
      return leaf < m && (internal >= next || weight[leaf] <= weight[internal]) ? leaf++
                                                                               : internal++;
    };
    for (; next < 2 * m - 1; ++next) {
      const int a = take(), b = take();
      weight[next] = weight[a] + weight[b];
      parent[a] = parent[b] = next;
    }
    depth[2 * m - 2] = 0;  // the root; a parent's index is above its children's
    int longest = 0;
    for (int node = 2 * m - 3; node >= 0; --node) {
      depth[node] = depth[parent[node]] + 1;
      if (node < m) longest = std::max(longest, depth[node]);
    }
    if (longest <= max_bits) {
      for (int i = 0; i < m; ++i) lengths[leaves[i]] = static_cast<uint8_t>(depth[i]);
      return;
    }
    for (uint64_t& x : f) x = (x + 1) / 2;  // used symbols stay used
  }
}

// Canonical codes (RFC 1951, 3.2.2), bit-reversed for writing, from code lengths.
inline void CanonicalCodes(const uint8_t* lengths, int n, uint16_t* codes) {
  int count[16] = {0}, next[16] = {0};
  for (int s = 0; s < n; ++s)
    if (lengths[s]) ++count[lengths[s]];
  for (int bits = 1, code = 0; bits < 16; ++bits) next[bits] = code = (code + count[bits - 1]) << 1;
  for (int s = 0; s < n; ++s)
    codes[s] = lengths[s] ? Reversed(next[lengths[s]]++, lengths[s]) : 0;
}

// The stream between calls, kept by the caller: pending bits (LSB first) and their count, and
// the Adler-32 sums of the filtered bytes so far.
struct State {
  uint64_t bits, count, s1, s2;
};

// One block's literal/length code.
struct Codes {
  uint16_t code[kSymbols];
  uint8_t length[kSymbols];
};

class Writer {
 public:
  static constexpr bool kWrites = true;
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
  void Use(const Codes* codes) { codes_ = codes; }
  void Symbol(int s) { Put(codes_->code[s], codes_->length[s]); }
  // A match of `length` (3..258) bytes at distance 1 (distance code 0) or 3 (code 2), whose
  // codes are the single bits 0 and 1 of a two-code distance tree.
  void Match(int length, int distance) {
    const int i = LengthSymbols()[length];
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
  const Codes* codes_ = nullptr;
};

// The first pass over a block's rows: how often each literal/length symbol is written.
struct Counter {
  static constexpr bool kWrites = false;
  uint32_t freq[kSymbols] = {0};
  void Symbol(int s) { ++freq[s]; }
  void Match(int length, int) { ++freq[257 + LengthSymbols()[length]]; }
};

// A non-final block of dynamic Huffman codes (RFC 1951, 3.2.7): the literal/length code
// fitted to the symbols counted (codes), the distance code of distances 1 and 3 (codes 0 and
// 2, one bit each), the code lengths run-length coded with a code-length code of their own.
inline void BlockHeader(Writer& w, const Counter& counted, Codes& codes) {
  HuffmanLengths(counted.freq, kSymbols, kMaxBits, codes.length);
  CanonicalCodes(codes.length, kSymbols, codes.code);
  int hlit = kSymbols;
  while (hlit > 257 && codes.length[hlit - 1] == 0) --hlit;
  std::vector<uint8_t> sequence(codes.length, codes.length + hlit);
  sequence.insert(sequence.end(), {1, 0, 1});  // the distance code's lengths
  struct Item {
    uint8_t symbol, extra;  // code-length symbol 0..18 and its extra bits' value
  };
  std::vector<Item> items;
  for (size_t i = 0; i < sequence.size();) {
    const uint8_t value = sequence[i];
    size_t run = 1;
    while (i + run < sequence.size() && sequence[i + run] == value) ++run;
    i += run;
    if (value == 0) {
      for (; run >= 11; run -= std::min<size_t>(run, 138))
        items.push_back({18, static_cast<uint8_t>(std::min<size_t>(run, 138) - 11)});
      if (run >= 3) items.push_back({17, static_cast<uint8_t>(run - 3)}), run = 0;
    } else {
      items.push_back({value, 0}), --run;
      for (; run >= 3; run -= std::min<size_t>(run, 6))
        items.push_back({16, static_cast<uint8_t>(std::min<size_t>(run, 6) - 3)});
    }
    for (; run > 0; --run) items.push_back({value, 0});
  }
  uint32_t freq[19] = {0};
  for (const Item& item : items) ++freq[item.symbol];
  uint8_t cl_length[19];
  uint16_t cl_code[19];
  HuffmanLengths(freq, 19, kMaxCodeLengthBits, cl_length);  // 0 and 1 at least: complete
  CanonicalCodes(cl_length, 19, cl_code);
  static const int kOrder[19] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};
  int hclen = 19;
  while (hclen > 4 && cl_length[kOrder[hclen - 1]] == 0) --hclen;
  w.Put(0, 1);  // BFINAL: not the last block
  w.Put(2, 2);  // BTYPE: dynamic
  w.Put(hlit - 257, 5);
  w.Put(3 - 1, 5);
  w.Put(hclen - 4, 4);
  for (int i = 0; i < hclen; ++i) w.Put(cl_length[kOrder[i]], 3);
  static const int kExtraBits[3] = {2, 3, 7};  // of symbols 16, 17, 18
  for (const Item& item : items) {
    w.Put(cl_code[item.symbol], cl_length[item.symbol]);
    if (item.symbol >= 16) w.Put(item.extra, kExtraBits[item.symbol - 16]);
  }
  w.Use(&codes);
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
// copies of the pixel before; counted, or written (with their Adler-32).
template <class Sink>
inline void Run(Sink& sink, State* st, const uint8_t* pattern, int p, int64_t n) {
  for (int j = 0; j < p; ++j) sink.Symbol(pattern[j]);
  int64_t left = p * (n - 1);
  while (left >= 3) {
    int64_t take = left > 258 ? 258 : left;
    if (left - take == 1 || left - take == 2) take = left - 3;
    sink.Match(static_cast<int>(take), p);
    left -= take;
  }
  for (int64_t k = p * n - left; k < p * n; ++k) sink.Symbol(pattern[k % p]);
  if (Sink::kWrites) Adler(st, pattern, p, static_cast<uint64_t>(n));
}

// One run of a row's filtered pixels: p bytes repeated n times, the row's first run (after
// its filter type) where `first`.
struct Piece {
  uint8_t pattern[3];
  uint8_t first;
  uint32_t n;
};

// Deflate's rows as runs (RunEnd), into pieces.
inline void Scan(std::vector<Piece>& pieces, const uint8_t* m, const uint8_t* previous,
                 int64_t rows, int64_t width, int64_t stride, const uint8_t* colours) {
  std::vector<uint8_t> zeros(previous ? 0 : width, 0);
  pieces.clear();
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = m + r * stride;
    const bool top = r == 0 && !previous;
    const uint8_t* above = r ? m + (r - 1) * stride : top ? zeros.data() : previous;
    for (int64_t x = 0; x < width;) {
      const int64_t end = RunEnd(row, above, x + 1, width);
      Piece piece = {{0, 0, 0}, static_cast<uint8_t>(x == 0), static_cast<uint32_t>(end - x)};
      if (!colours) {
        piece.pattern[0] = static_cast<uint8_t>(row[x] - above[x]);
      } else {
        for (int c = 0; c < 3; ++c)
          piece.pattern[c] = static_cast<uint8_t>(colours[3 * row[x] + c] -
                                                  (top ? 0 : colours[3 * above[x] + c]));
      }
      pieces.push_back(piece);
      x = end;
    }
  }
}

// The pieces' symbols (each row's filter type, then its runs: Run) to a Sink: counted
// (Counter), then written (Writer, with the Adler-32).
template <class Sink>
inline void Emit(Sink& sink, State* st, const std::vector<Piece>& pieces, int p) {
  const uint8_t filter_type = 2;
  for (const Piece& piece : pieces) {
    if (piece.first) {
      sink.Symbol(filter_type);
      if (Sink::kWrites) Adler(st, &filter_type, 1, 1);
    }
    Run(sink, st, piece.pattern, p, piece.n);
  }
}

// Rows of class indices m [rows, width] (row stride `stride`) after `previous` (the row
// above the first, or null at the image's top), filtered 'Up' and deflated as one block
// whose Huffman codes fit them (its runs found once, their symbols counted, then written):
// the palette PNG's bytes (colours null) or the RGB PNG's of colours [256 * 3]. `start`:
// the stream's first call (the zlib header first); `finish`: its last (an empty final block
// and the Adler-32 after these rows). Returns the bytes written to out, which holds
// MaxBytes(rows, width).
inline int64_t Deflate(State* st, const uint8_t* m, const uint8_t* previous, int64_t rows,
                       int64_t width, int64_t stride, const uint8_t* colours, bool start,
                       bool finish, uint8_t* out) {
  Writer w(st, out);
  if (start) {
    st->bits = st->count = st->s2 = 0;
    st->s1 = 1;
    w.Byte(0x78);  // deflate, 32 KiB window
    w.Byte(0x01);  // (0x7801 % 31 == 0), no dictionary, fastest
  }
  if (rows > 0 && width > 0) {
    std::vector<Piece> pieces;
    Scan(pieces, m, previous, rows, width, stride, colours);
    const int p = colours ? 3 : 1;
    Counter counted;
    Emit(counted, st, pieces, p);
    counted.freq[kEnd] = 1;
    Codes codes;
    BlockHeader(w, counted, codes);
    Emit(w, st, pieces, p);
    w.Symbol(kEnd);
  }
  if (finish) {
    w.Put(1, 1);  // BFINAL
    w.Put(1, 2);  // BTYPE: fixed codes, in which the end of block is seven 0 bits
    w.Put(0, 7);
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
