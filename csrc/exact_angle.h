// The exact-angle reduction of RoPE's exact=True mode: ONE algorithm and one set of constants for every
// backend (CPU and CUDA C++ include this header; the Triton kernel and the torch path in
// posenc_kernels/rope.py spell the same three constants and the same operation order).
//
//   a = double(pos) * inv_freq64[i]                                  (one fp64 product)
//   k = floor(a * kInvTwoPi + 0.5)                                   (nearest multiple of 2*pi)
//   r = float((a - k * kTwoPiHi) - k * kTwoPiLo)                     (Cody-Waite, two fp64 steps)
//   cos/sin = fp32 cos(r) / sin(r), each times attention_factor in fp32
//
// kTwoPiHi is float32(2*pi): it has 24 significant bits, so k * kTwoPiHi is exact in fp64 for k < 2**29;
// kTwoPiLo = 2*pi - kTwoPiHi carries the rest. Every operation is a separate
// IEEE fp64 operation, never contracted to an FMA (CPU builds use -ffp-contract=off; device code uses the
// explicitly rounded __dmul_rn/__dsub_rn intrinsics), so all backends produce the same fp32 r bit for bit.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define POSENC_HD __host__ __device__ __forceinline__
#else
#define POSENC_HD inline
#endif

namespace posenc_exact {

constexpr double kInvTwoPi = 0.15915494309189535;     // 1 / (2*pi), fp64 nearest
constexpr double kTwoPiHi = 6.2831854820251465;       // float32(2*pi)
constexpr double kTwoPiLo = -1.7484556025237907e-07;  // 2*pi - kTwoPiHi

// The reduced fp32 angle of position `pos` at fp64 inverse frequency `inv`.
POSENC_HD float reduced_angle(double pos, double inv) {
#if defined(__CUDA_ARCH__)
  const double a = __dmul_rn(pos, inv);
  const double k = floor(__dadd_rn(__dmul_rn(a, kInvTwoPi), 0.5));
  return static_cast<float>(__dsub_rn(__dsub_rn(a, __dmul_rn(k, kTwoPiHi)), __dmul_rn(k, kTwoPiLo)));
#else
  const double a = pos * inv;
  const double k = std::floor(a * kInvTwoPi + 0.5);
  return static_cast<float>((a - k * kTwoPiHi) - k * kTwoPiLo);
#endif
}

}  // namespace posenc_exact
