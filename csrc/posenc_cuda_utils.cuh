// Device helpers shared by rope_cuda.cu and sinusoidal_cuda.cu: storage <-> math conversions, 16-byte
// vectors, and the runtime-typed loads of auxiliary tensors (tables, inv_freq, positions, offsets).
#pragma once

#include <atomic>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "posenc_cuda.h"

namespace posenc_cuda {

// Math type: fp32 for every storage type but double.
template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }

// N elements moved as one access. VECTOR: the address is N * sizeof(T)-aligned (checked at launch), so
// a 16-byte vector is one ld.global.v4 / st.global.v4; otherwise element by element.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int BYTES>
struct RawOf;
template <>
struct RawOf<2> { using type = unsigned short; };
template <>
struct RawOf<4> { using type = unsigned int; };
template <>
struct RawOf<8> { using type = uint2; };
template <>
struct RawOf<16> { using type = uint4; };

template <typename T, int N, bool VECTOR>
__device__ __forceinline__ Vec<T, N> load_vec(const T* ptr) {
  Vec<T, N> r;
  if constexpr (VECTOR) {
    using Raw = typename RawOf<sizeof(T) * N>::type;
    *reinterpret_cast<Raw*>(&r) = *reinterpret_cast<const Raw*>(ptr);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) r.v[e] = ptr[e];
  }
  return r;
}

__device__ __forceinline__ unsigned int bits32(__half a, __half b) {
  return static_cast<unsigned int>(__half_as_ushort(a)) | (static_cast<unsigned int>(__half_as_ushort(b)) << 16);
}
__device__ __forceinline__ unsigned int bits32(__nv_bfloat16 a, __nv_bfloat16 b) {
  return static_cast<unsigned int>(__bfloat16_as_ushort(a)) |
         (static_cast<unsigned int>(__bfloat16_as_ushort(b)) << 16);
}

// 32-bit word w of a 16-byte vector, built from the values (not through memory: a cast of the
// vector's address makes the compiler split the store into narrow ones).
template <typename T, int N>
__device__ __forceinline__ unsigned int word32(const Vec<T, N>& r, int w) {
  if constexpr (sizeof(T) == 2) {
    return bits32(r.v[2 * w], r.v[2 * w + 1]);
  } else if constexpr (sizeof(T) == 4) {
    return __float_as_uint(r.v[w]);
  } else {
    const unsigned long long b = static_cast<unsigned long long>(__double_as_longlong(r.v[w / 2]));
    return static_cast<unsigned int>(w % 2 ? b >> 32 : b);
  }
}

template <typename T, int N, bool VECTOR>
__device__ __forceinline__ void store_vec(T* ptr, const Vec<T, N>& r) {
  if constexpr (VECTOR) {
    static_assert(sizeof(T) * N == 16, "vector accesses are 16 bytes");
    // __stwb: st.global.wb.v4 (the default caching); a plain uint4 assignment is split by NVVM.
    __stwb(reinterpret_cast<uint4*>(ptr), make_uint4(word32(r, 0), word32(r, 1), word32(r, 2), word32(r, 3)));
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) ptr[e] = r.v[e];
  }
}

// Floating tensor element i (any float dtype) converted to Acc with one rounding.
template <typename Acc>
__device__ __forceinline__ Acc load_float(const void* p, int32_t dtype, int64_t i) {
  switch (dtype) {
    case kHalf:
      return static_cast<Acc>(__half2float(static_cast<const __half*>(p)[i]));
    case kBFloat16:
      return static_cast<Acc>(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
    case kFloat:
      return static_cast<Acc>(static_cast<const float*>(p)[i]);
    default:
      return static_cast<Acc>(static_cast<const double*>(p)[i]);
  }
}

__device__ __forceinline__ bool is_float_dtype(int32_t dtype) { return dtype <= kDouble; }

// Integer tensor element i as int64.
__device__ __forceinline__ int64_t load_int(const void* p, int32_t dtype, int64_t i) {
  switch (dtype) {
    case kInt8:
      return static_cast<const int8_t*>(p)[i];
    case kUInt8:
      return static_cast<const uint8_t*>(p)[i];
    case kInt16:
      return static_cast<const int16_t*>(p)[i];
    case kInt32:
      return static_cast<const int32_t*>(p)[i];
    default:
      return static_cast<const int64_t*>(p)[i];
  }
}

// Integer row of token (b, s): positions[b, s] / offsets[b] + s / offset + s.
__device__ __forceinline__ int64_t token_row(int32_t mode, const void* pos, int32_t dtype, int64_t sb, int64_t ss,
                                             int64_t offset, int64_t b, int64_t s) {
  if (mode == kPosPositions) return load_int(pos, dtype, b * sb + s * ss);
  if (mode == kPosOffsets) return load_int(pos, dtype, b * sb) + s;
  return offset + s;
}

__host__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// A stride only matters along a dimension of size > 1.
__host__ __forceinline__ bool stride_ok(int64_t stride, int64_t size, int vec) {
  return size <= 1 || stride % vec == 0;
}

__host__ __forceinline__ int num_sms() {
  // Per-device cache; cudaDeviceGetAttribute is no stream operation (allowed during graph capture). Launches
  // may come from several host threads: relaxed atomics make the cache race-free (every writer stores the
  // same value for a device, so no ordering is needed beyond the value itself).
  static std::atomic<int> cache[128];  // static storage: zero-initialised
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 128) return 132;
  int n = cache[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 132;
    cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

}  // namespace posenc_cuda
