// Plain launchers of the CUDA kernels, shared by the kernels (rope_cuda.cu, sinusoidal_cuda.cu) and the
// torch glue (cuda_ops.cpp).
//
// No torch header here, on purpose: the .cu files include only the CUDA runtime, cuda_fp16/cuda_bf16 and
// this file, so each compiles in seconds (a .cu that includes torch/all.h takes over a minute). The glue
// validates tensors, picks the storage type with a switch on the ScalarType (the AT_DISPATCH of this
// package) and calls launch_rope<T> / launch_sinusoidal<T>, which the .cu files instantiate explicitly
// for T in {__half, __nv_bfloat16, float, double}. Math is fp32 for the first three, fp64 for double.
//
// Pointers are to the first element of each tensor (data_ptr, storage offset included); strides are in
// elements. Launchers only enqueue on the given stream: no allocation, no host sync (CUDA-graph safe).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "positions.h"

namespace posenc_cuda {

// Element type of an auxiliary tensor (tables, inv_freq, positions, offsets): positions.h's DType (the one
// dtype-code table), read with a runtime switch where it is loaded (once per token or per table entry, off
// the hot loop), so it costs no instantiations.
using DType = posenc::DType;
using posenc::kBFloat16;
using posenc::kDouble;
using posenc::kFloat;
using posenc::kHalf;
using posenc::kInt16;
using posenc::kInt32;
using posenc::kInt64;
using posenc::kInt8;
using posenc::kUInt8;

// How the row (RoPE table row / angle position) of token (b, s) is found: positions.h's mode codes (the
// one C++ copy of posenc_kernels/ops/positions.py's PosMode). kPosCuSeqlens (RoPE): t - cu[n] +
// (pos ? pos[n * stride_pos_b] : offset), sequence n by a binary search of cu; tokens past cu[N] take position 0.
using PosMode = posenc::PosMode;
using posenc::kPosCuSeqlens;
using posenc::kPosOffset;
using posenc::kPosOffsets;
using posenc::kPosPositions;

// Where RoPE angles come from.
enum AngleMode : int32_t {
  kAngleTable = 0,       // cos/sin tables [P, R/2]; rows outside [0, n_rows) give NaN
  kAngleInvFreq = 1,     // fp32(row) * fp32(inv_freq[i]) (one fp32 product), fp32 sincos, * attention_factor
  kAngleInvFreqExact = 2 // exact_angle.h's reduction of double(row) * inv_freq[i] (fp64), then fp32 sincos of
                         // the reduced angle * attention_factor (fp32), for every storage type (one algorithm
                         // for every backend)
};

struct RopeParams {
  const void* q = nullptr;
  const void* k = nullptr;  // nullptr: no k (heads_k == 0)
  void* q_out = nullptr;    // may equal q (in place)
  void* k_out = nullptr;    // may equal k
  int64_t n_tokens = 0;     // B * S
  int64_t seqlen = 1;       // S
  int64_t heads_q = 0;
  int64_t heads_k = 0;
  int64_t head_dim = 0;  // D
  int64_t half = 0;      // R / 2
  // [b, s, h] strides of q, k, q_out, k_out (channel stride is 1)
  int64_t stride_q_b = 0, stride_q_s = 0, stride_q_h = 0;
  int64_t stride_k_b = 0, stride_k_s = 0, stride_k_h = 0;
  int64_t stride_qo_b = 0, stride_qo_s = 0, stride_qo_h = 0;
  int64_t stride_ko_b = 0, stride_ko_s = 0, stride_ko_h = 0;
  bool copy_tail_q = false;  // out of place with R < D: copy channels [R, D) of q into q_out
  bool copy_tail_k = false;
  bool interleaved = false;  // pairs (2i, 2i + 1); else (i, i + R/2)
  bool conjugate = false;    // rotate by -theta
  // angle source
  int32_t angle_mode = kAngleTable;
  const void* cos = nullptr;
  const void* sin = nullptr;
  int32_t cos_dtype = kFloat, sin_dtype = kFloat;
  int64_t stride_cos_p = 0, stride_sin_p = 0;  // row strides
  int64_t stride_cos_f = 1, stride_sin_f = 1;  // column strides
  int64_t n_rows = 0;
  const void* inv_freq = nullptr;
  int32_t inv_freq_dtype = kFloat;
  int64_t stride_inv_freq = 1;
  // On-the-fly angles only (tables carry it already): an fp32 scalar multiplying the fp32 cos/sin, in both
  // angle modes and for every storage type, as the Triton kernel's fp32 argument and the torch path's
  // fp32 tensor * Python float do; the product is then converted to the math type.
  float attention_factor = 1.0f;
  // rows
  int32_t pos_mode = kPosOffset;
  const void* pos = nullptr;
  int32_t pos_dtype = kInt64;
  int64_t stride_pos_b = 0, stride_pos_s = 0;
  int64_t offset = 0;
  // kPosCuSeqlens: cu_seqlens [n_seq + 1] (pos/pos_dtype/stride_pos_b: the per-sequence offsets, or nullptr: offset)
  const void* cu = nullptr;
  int32_t cu_dtype = kInt64;
  int64_t stride_cu = 1;
  int64_t n_seq = 0;
  // Axis map (pos_mode kPosPositions): frequency i follows pos[axis[i] * stride_pos_a + b * stride_pos_b + s * stride_pos_s];
  // an axis outside [0, n_axes) gives NaN (the host-side value checks were skipped), never a read.
  const void* axis = nullptr;
  int32_t axis_dtype = kInt64;
  int64_t stride_axis = 1;
  int64_t n_axes = 0;
  int64_t stride_pos_a = 0;
};

struct SinusoidalParams {
  const void* x = nullptr;  // nullptr: table mode (out = PE)
  void* out = nullptr;      // may equal x (in place)
  int64_t n_tokens = 0;     // B * S
  int64_t seqlen = 1;
  int64_t dim = 0;   // D
  int64_t half = 0;  // D / 2 (odd D: column D - 1 is 0, + x * x_scale)
  int64_t stride_x_b = 0, stride_x_s = 0, stride_o_b = 0, stride_o_s = 0;
  const void* inv_freq = nullptr;  // [half]
  int32_t inv_freq_dtype = kFloat;
  int64_t stride_inv_freq = 1;
  int32_t pos_mode = kPosOffset;
  const void* pos = nullptr;  // integer or floating positions, integer offsets
  int32_t pos_dtype = kInt64;
  int64_t stride_pos_b = 0, stride_pos_s = 0;
  int64_t offset = 0;
  double x_scale = 1.0;  // rounded to fp32 for fp32 math
  double scale = 1.0;
  bool interleaved = true;  // (sin, cos) pairs; else [sin | cos] halves
  bool cos_first = false;   // swaps each pair / the halves
};

// Enqueue the kernel on `stream` (the caller sets the device). Returns cudaGetLastError() of the launch.
// 16-byte accesses are used when every pointer is 16-byte aligned and every stride (and the pair layout)
// is a multiple of the vector width; otherwise a scalar path runs (same results).
template <typename T>
cudaError_t launch_rope(const RopeParams& p, cudaStream_t stream);

template <typename T>
cudaError_t launch_sinusoidal(const SinusoidalParams& p, cudaStream_t stream);

// Which path launch_rope<T> / launch_sinusoidal<T> takes for these params (for tests and benchmarks):
// the vector width in elements (16 / sizeof(T)) or 1 for the scalar fallback.
int rope_vector_width(const RopeParams& p, int elem_size);
int sinusoidal_vector_width(const SinusoidalParams& p, int elem_size);

}  // namespace posenc_cuda
