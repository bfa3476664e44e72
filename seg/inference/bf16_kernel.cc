// The bfloat16 kernel's XLA FFI handler: a 1x1 product in the loops of bf16_product.h (which
// describes them), float32 in and out. Built into the same library as the int8 kernels by
// seg/inference/int8_kernel.py (`build`), called through bf16_kernel.py. Rows are split into
// chunks shared by the calling thread and XLA's intra-op thread pool (kernel_threads.h).
#include <cstdint>
#include <vector>

#include "bf16_product.h"
#include "kernel_threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace seg::bf16;  // NOLINT: the loops, modes and Problem of one kernel

ffi::Error Bf16Product(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U16> w,
                       ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> residual,
                       int32_t mode, int32_t isa, ffi::ResultBuffer<ffi::F32> out) {
  const auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("x needs a channel axis");
  int64_t m = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) m *= dims[i];
  const int64_t k = dims.back(), n = static_cast<int64_t>(bias.element_count());
  const int64_t panels = (n + kPanel - 1) / kPanel;
  const int64_t kp = (k + kKMultiple - 1) / kKMultiple * kKMultiple;
  if (static_cast<int64_t>(w.element_count()) != panels * kPanel * kp)
    return ffi::Error::InvalidArgument("packed weights do not match the input and output sizes");
  if (mode < kLinear || mode > kRelu) return ffi::Error::InvalidArgument("unknown mode");
  if (isa != kAvx512Bf16 && isa != kAmxBf16) return ffi::Error::InvalidArgument("unknown isa");
  if (!RunsLoop(isa))
    return ffi::Error::InvalidArgument("this CPU lacks the instructions of that loop (isa)");
  if (isa == kAmxBf16 && !seg::product::AmxPermitted())
    return ffi::Error::Internal("the kernel (Linux) refused this process AMX's tile registers");
  const size_t size = static_cast<size_t>(m * n);
  if (out->element_count() != size)
    return ffi::Error::InvalidArgument("the output is [..., out]");
  if (residual.element_count() && (residual.element_count() != size || mode != kLinear))
    return ffi::Error::InvalidArgument("a residual is [..., out], in mode 0 only");
  std::vector<float> padded_bias(panels * kPanel, 0.f);
  std::copy_n(bias.typed_data(), n, padded_bias.begin());
  const Problem p{x.typed_data(), m, k, n, kp, w.typed_data(), padded_bias.data(), mode, isa,
                  residual.element_count() ? residual.typed_data() : nullptr,
                  out->typed_data()};
  seg::ForEachRange(pool, m, kGrainRows, kChunkRows,
                    [&p](int64_t begin, int64_t end) { RunRows(p, begin, end); });
  return ffi::Error::Success();
}

}  // namespace

extern "C" int SegBf16HasLoop(int isa) { return RunsLoop(isa) ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegBf16Product, Bf16Product,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x [..., k]
                                  .Arg<ffi::Buffer<ffi::U16>>()    // packed bfloat16 weights
                                  .Arg<ffi::Buffer<ffi::F32>>()    // bias [n]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // residual [..., n] or [0]
                                  .Attr<int32_t>("mode")
                                  .Attr<int32_t>("isa")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [..., n]
