// Element types and their conversions, shared by the kernels and by the host emulation
// (csrc/host_emu). Free of torch headers and of inline PTX.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace llmrec {

// ---------------------------------------------------------------------------------------
// Element types: conversions to and from fp32.
// ---------------------------------------------------------------------------------------
template <typename T>
struct ElemTraits;

template <>
struct ElemTraits<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ __half from_bits(unsigned short b) {
    return __ushort_as_half(b);
  }
};

template <>
struct ElemTraits<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_bits(unsigned short b) {
    return __ushort_as_bfloat16(b);
  }
};

// The i-th 16-bit element (little endian) of a 16-byte vector, without type punning.
template <typename T>
__device__ __forceinline__ float element_of(const uint4& q, int i) {
  const unsigned int word = i < 2 ? q.x : i < 4 ? q.y : i < 6 ? q.z : q.w;
  const unsigned short bits = static_cast<unsigned short>(i % 2 ? word >> 16 : word & 0xffffu);
  return ElemTraits<T>::to_float(ElemTraits<T>::from_bits(bits));
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return ElemTraits<T>::to_float(v);
}
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return ElemTraits<T>::from_float(v);
}
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace llmrec
