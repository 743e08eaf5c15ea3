// Device helpers shared by the kernels: dtype dispatch, fp32 conversion and 16-byte packs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels.h"

namespace fastjepa {

// Elements per thread per step: two float4 for fp32, one 16-byte pack for 16-bit types.
constexpr int kVec = 8;

// Calls f(T{}) with T the C++ type of a DType.
template <typename F>
decltype(auto) dispatch_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::BFloat16: return f(__nv_bfloat16{});
    case DType::Float16: return f(__half{});
    default: return f(float{});
  }
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else return v;
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Two 16-bit values in one 32-bit word, converted from and to fp32.
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t word) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 pair;
    memcpy(&pair, &word, 4);
    return __bfloat1622float2(pair);
  } else {
    __half2 pair;
    memcpy(&pair, &word, 4);
    return __half22float2(pair);
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  uint32_t word;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(a, b);
    memcpy(&word, &pair, 4);
  } else {
    const __half2 pair = __floats2half2_rn(a, b);
    memcpy(&word, &pair, 4);
  }
  return word;
}

// load<W>(p, v): W = 1 reads one element; W = kVec reads 8 elements with 16-byte loads (p
// must be 16-byte aligned). store<W> mirrors it. Values are converted to and from fp32.
template <int W, typename T>
__device__ __forceinline__ void load(const T* p, float (&v)[W]) {
  if constexpr (W == 1) {
    v[0] = to_float(*p);
  } else if constexpr (std::is_same_v<T, float>) {
    static_assert(W == 8);
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
    static_assert(W == 8 && sizeof(T) == 2);
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const float2 a = unpack2<T>(raw.x), b = unpack2<T>(raw.y), c = unpack2<T>(raw.z), d = unpack2<T>(raw.w);
    v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y, v[4] = c.x, v[5] = c.y, v[6] = d.x, v[7] = d.y;
  }
}

template <int W, typename T>
__device__ __forceinline__ void store(T* p, const float (&v)[W]) {
  if constexpr (W == 1) {
    *p = from_float<T>(v[0]);
  } else if constexpr (std::is_same_v<T, float>) {
    static_assert(W == 8);
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    static_assert(W == 8 && sizeof(T) == 2);
    *reinterpret_cast<uint4*>(p) = make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7]));
  }
}

template <int W>
using Width = std::integral_constant<int, W>;

}  // namespace fastjepa
