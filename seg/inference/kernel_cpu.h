// What the CPU running the int8 kernels offers, asked at run time (the library is built for
// AVX2 and FMA; its AVX-512 functions carry their own target attributes).
#ifndef SEG_INFERENCE_KERNEL_CPU_H_
#define SEG_INFERENCE_KERNEL_CPU_H_

#include <immintrin.h>

namespace seg {

// Whether this CPU runs the kernels' AVX-512 loops (AVX-512 F, BW, VL and DQ).
inline bool HasAvx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

// 16 float32 as bfloat16 bits, rounded to nearest even: the bits plus 0x7fff plus the lowest
// kept bit, truncated (NumPy's and XLA's rounding of finite values). The bfloat16 products
// round their inputs so (float_product.h: RoundRows), and the layers that hand them bfloat16
// (the depthwise and stem passes' `outb`) round their outputs so: the same bits either way.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline __m256i RoundToBf16(
    __m512 y) {
  const __m512i bits = _mm512_castps_si512(y);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

}  // namespace seg

#endif  // SEG_INFERENCE_KERNEL_CPU_H_
