// What the CPU running the int8 kernels offers, asked at run time (the library is built for
// AVX2 and FMA; its AVX-512 functions carry their own target attributes).
#ifndef SEG_INFERENCE_KERNEL_CPU_H_
#define SEG_INFERENCE_KERNEL_CPU_H_

namespace seg {

// Whether this CPU runs the kernels' AVX-512 loops (AVX-512 F, BW, VL and DQ).
inline bool HasAvx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

}  // namespace seg

#endif  // SEG_INFERENCE_KERNEL_CPU_H_
