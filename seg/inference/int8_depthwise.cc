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
// channels per AVX2 vector: c is a multiple of 8. With `wide` (CPUs with AVX-512 F, BW, VL
// and DQ) an AVX-512 loop computes the same sums in the same order, 16 channels at a time
// with their weights in registers (int8_depthwise.h: BandWide). Built and loaded with
// int8_kernel.cc by seg/inference/int8_kernel.py; called through the XLA FFI.
#include <cstdint>
#include <vector>

#include "int8_depthwise.h"
#include "kernel_cpu.h"
#include "kernel_threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using seg::depthwise::Depthwise;
using seg::depthwise::kSize;

// The (stride, dilation) pairs compiled (int8_kernel.py: DEPTHWISE_STRIDES): MobileNetV2's
// at output stride 8, 16 and 32.
template <int S, int D>
void Run(ffi::ThreadPool& pool, const Depthwise& d, int64_t images) {
  seg::ForEachRows(pool, images, d.oh, 1, d.band, [&d](int64_t n, int64_t oy0, int64_t oy1) {
    thread_local std::vector<float> buffer;
    d.AnyBand<S, D>(n, oy0, buffer, oy1);
  });
}

ffi::Error Int8Depthwise(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> x, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> inv_out, int32_t stride,
                         int32_t dilation, int32_t pad_top, int32_t pad_left, bool wide,
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
  if (wide && !seg::HasAvx512())
    return ffi::Error::InvalidArgument("the AVX-512 loop needs AVX-512 F, BW, VL and DQ");
  d.wide = wide;
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
                                  .Attr<bool>("wide")              // the AVX-512 loop
                                  .Ret<ffi::Buffer<ffi::U8>>());  // out [n, oh, ow, c]
