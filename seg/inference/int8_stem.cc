// The int8 engine's first layers as one pass over memory: MobileNetV2's stem (3x3 stride-2
// convolution of the 3-channel image, + bias, ReLU6) and block 0's 3x3 depthwise layer
// (stride 1, + bias, ReLU6), rounded to block 0's projection's uint8 input:
//
//   s[n, sy, sx, c] = clip(bs[c] + the fma-sum over (i, j, k) in row-major order of
//                          x[n, 2 sy + i - pt, 2 sx + j - pl, k] * ws[i, j, k, c], 0, 6)
//   y = bd[c];  y = fma(s[n, oy + i - 1, ox + j - 1, c], wd[i, j, c], y)  for (i, j) row-major
//   out[n, oy, ox, c] = min(round(clip(y, 0, 6) * inv_out), 127)   (rounding half to even)
//
// with 0 outside x and outside s ('SAME' padding of both layers). x: [n, h, w, 3] float32, the
// preprocessed image, or its uint8 pixels, preprocessed as they are read (u / 127.5 - 1, 0
// outside each image's valid rows and columns where `sizes` [n, 2] gives them, as
// seg/preprocessing.py's preprocess_padded); ws: [3, 3, 3, c]; bs, bd: [c]; wd: [3, 3, c];
// out: [n, ceil(h / 2), ceil(w / 2), c] uint8. The function of XLA's stem, depthwise taps and
// quantisation in forward.py / quantize.py, summed in one fixed order (XLA's sums differ from
// it by a rounding now and then, so outputs may differ by one step).
//
// XLA runs those layers as three single-threaded loops over a 2-3 MB image and two 8 MB float32
// maps (docs/performance.md). Here a chunk of output rows keeps the three stem rows its current
// depthwise row reads in a ring (in L2), computing each stem row once (plus the two rows above
// and below the chunk), and chunks run on the thread pool. A stem step computes 2 pixels x 32
// channels (8 accumulators, the weights of a tap in 4 registers), a depthwise step 4 pixels x 16
// channels. Eight channels per AVX2 vector: c is a multiple of 8. With `wide` (CPUs with
// AVX-512 F, BW, VL and DQ) and c a multiple of 16, AVX-512 loops compute the same sums in
// the same order (int8_stem.h: StemRowWide, DepthwiseRowWide). Built and loaded with
// int8_kernel.cc by seg/inference/int8_kernel.py; called through the XLA FFI.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "int8_stem.h"
#include "kernel_cpu.h"
#include "kernel_threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using seg::stem::Stem;

// out: uint8 as above, or float32: clip(y, 0, 6) itself (the float engines' stem pass,
// float_kernel.py: stem), or that rounded to bfloat16 (the bfloat16 engine's; AVX-512 loops).
ffi::Error Int8Stem(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> sizes,
                    ffi::Buffer<ffi::F32> ws,
                    ffi::Buffer<ffi::F32> bs, ffi::Buffer<ffi::F32> wd,
                    ffi::Buffer<ffi::F32> bd, ffi::Buffer<ffi::F32> inv_out, int32_t pad_top,
                    int32_t pad_left, bool wide, ffi::Result<ffi::AnyBuffer> out) {
  const auto od = out->dimensions();
  if (od.size() != 4) return ffi::Error::InvalidArgument("out is [n, oh, ow, c]");
  const bool to_bf16 = out->element_type() == ffi::DataType::BF16;
  const bool to_float = out->element_type() == ffi::DataType::F32 || to_bf16;
  if (!to_float && out->element_type() != ffi::DataType::U8)
    return ffi::Error::InvalidArgument("out is uint8, float32 or bfloat16");
  Stem s;
  ffi::Error error = seg::stem::Make(
      x, sizes, ws, bs, wd, bd, inv_out, pad_top, pad_left, od[0], od[1], od[2],
      to_float ? nullptr : static_cast<uint8_t*>(out->untyped_data()), pool.num_threads(), s);
  if (error.failure()) return error;
  if (od[3] != s.c) return ffi::Error::InvalidArgument("out's channels are the stem's");
  if (wide && !seg::HasAvx512())
    return ffi::Error::InvalidArgument("the AVX-512 loops need AVX-512 F, BW, VL and DQ");
  s.wide = wide;
  if (to_bf16 && !s.Wide())
    return ffi::Error::InvalidArgument("bfloat16 out: the AVX-512 loops, channels in 16s");
  if (to_bf16) s.outb = static_cast<uint16_t*>(out->untyped_data());
  else if (to_float) s.outf = static_cast<float*>(out->untyped_data());
  seg::ForEachRows(pool, od[0], s.oh, seg::stem::kGrainRows, s.rows,
                   [&s](int64_t n, int64_t oy0, int64_t oy1) {
    thread_local std::vector<float> buffer;
    s.Chunk(n, oy0, oy1, buffer);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegInt8Stem, Int8Stem,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // x [n, h, w, 3]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // sizes [n, 2] or [0]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // ws [3, 3, 3, c]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // bs [c]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // wd [3, 3, c]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // bd [c]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // inv_out []
                                  .Attr<int32_t>("pad_top")
                                  .Attr<int32_t>("pad_left")
                                  .Attr<bool>("wide")              // the AVX-512 loops
                                  .Ret<ffi::AnyBuffer>());         // out [n, oh, ow, c]
