// The plain parameters of the CPU RoPE kernel (rope_cpu.cpp, compiled once per ISA) and its entry points,
// shared with the op glue (rope_cpu_ops.cpp: checks, parameters, variant choice, the parallel loop).
#pragma once

#include <cstdint>

#include "positions.h"

namespace posenc {
namespace rope_cpu {

// Everything one chunk of (token, head) items needs, as plain pointers and element strides.
struct Params {
  int dtype;  // 0 float32, 1 float64, 2 float16, 3 bfloat16 (q, k and outputs)
  bool interleaved, conjugate;
  int64_t B, S, Hq, Hk, D, half;
  const void* x[2];  // q, k
  void* o[2];        // q_out, k_out
  int64_t xs[2][4], os[2][4];  // [b, s, h, d] strides
  bool unit[2];                // x and o of q (k) have unit channel stride: the vector path
  bool copy_tail[2];
  // Row of token (b, s) (positions.h); cu_seqlens arrive as per-token int64 positions (sb 0, ss 1).
  RowSource rows;
  // Axis map: frequency i follows positions[axis[i] * psa + b * rows.sb + s * rows.ss] (rows.mode is
  // kPosPositions); axis[i] < 0 marks an axis outside positions (value checks off): NaN, never a read.
  const int64_t* axis;
  int64_t psa;
  int angle_mode;  // 0 tables, 1 fp32 pos * inv_freq, 2 exact (fp64 reduced, exact_angle.h)
  int table_dtype;  // same codes as dtype
  const void* cos;
  const void* sin;
  int64_t cos_rs, sin_rs, cos_cs, sin_cs, n_rows;
  const float* inv32;
  const double* inv64;
  float attention_factor;
};

using ItemsFn = void (*)(const Params&, int64_t begin, int64_t end);

}  // namespace rope_cpu
}  // namespace posenc

namespace posenc::rope_cpu {
ItemsFn items_default();
ItemsFn items_avx2();
ItemsFn items_avx512();
}  // namespace posenc::rope_cpu
