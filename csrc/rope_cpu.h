// The plain parameters of the CPU RoPE kernel (rope_cpu.cpp, compiled once per ISA) and its entry points,
// shared with the op glue (rope_cpu_ops.cpp: checks, parameters, variant choice, the parallel loop).
#pragma once

#include <cstdint>

#include "positions.h"

namespace posenc {
namespace rope_cpu {

// posenc::rope_and_cache_ (rope_cpu_ops.cpp): where the rotated k heads (and v) of a token go, written by the
// same items right after each k head is stored. The caches are NHD views [N0, N1, Hk, D] (HND is a
// transposed view), unit channel stride, in the input dtype (fp8 0) or FP8 (fp8 1: float8_e4m3fn, 2:
// float8_e5m2: fp32(x) / scale clamped to the finite range, rounded to nearest even, as torch's cast).
struct CacheParams {
  bool paged;        // slot_mapping [L] (B = 1): row (slot / N1, slot % N1); else cache_positions: row (b, pos)
  const void* idx;   // slot_mapping or cache_positions
  int idx_code;      // its positions.h DType
  int64_t idx_len;   // paged: L (tokens s >= L are not written)
  int64_t idx_sb, idx_ss;  // element strides over b (0 for [S] positions) and s
  int64_t n0, n1;    // the view's sizes [N0, N1]; rows outside them (value checks off) are not written
  int fp8;           // 0 the input dtype, 1 float8_e4m3fn, 2 float8_e5m2 (both caches)
  void* kc;
  int64_t kcs[3];    // element strides of k_cache's view over N0, N1, H
  void* vc;          // nullptr: no v
  int64_t vcs[3];
  const void* v;     // v [b, s, h, d] (input dtype), strides vs
  int64_t vs[4], Dv;
  const float* k_scale;  // FP8: fp32 scales, per head (k_scale_h 1) or one (0)
  const float* v_scale;
  int64_t k_scale_h, v_scale_h;
  // q_fp8: the rotated q (rounded to q's dtype) quantised here instead of written to q_out; nullptr: none
  void* q8;
  int q8_fp8;  // 1 e4m3fn, 2 e5m2
  int64_t q8s[4];  // [b, s, h, d] element strides
  const float* q_scale;
  int64_t q_scale_h;
};

// Everything one chunk of (token, head) items needs, as plain pointers and element strides.
struct Params {
  int dtype;  // positions.h DType of q, k and the outputs (a float code)
  bool interleaved, conjugate;
  int64_t B, S, Hq, Hk, D, half;
  const void* x[2];  // q, k
  void* o[2];        // q_out, k_out
  // [b, s, h, d] strides of q (w = 0: stride_q_b, stride_q_s, stride_q_h, stride_q_d) and k (w = 1: stride_k_*);
  // os: of q_out / k_out (stride_qo_*, stride_ko_*)
  int64_t xs[2][4], os[2][4];
  bool unit[2];                // x and o of q (k) have unit channel stride: the vector path
  bool copy_tail[2];
  // Row of token (b, s) (positions.h); cu_seqlens arrive as per-token int64 positions (stride_pos_b 0, stride_pos_s 1).
  RowSource rows;
  // Axis map: frequency i follows positions[axis[i] * stride_pos_a + b * rows.stride_pos_b + s * rows.stride_pos_s] (rows.mode is
  // kPosPositions); axis[i] < 0 marks an axis outside positions (value checks off): NaN, never a read.
  const int64_t* axis;
  int64_t stride_pos_a;
  int angle_mode;  // 0 tables, 1 fp32 pos * inv_freq, 2 exact (fp64 reduced, exact_angle.h)
  int table_dtype;  // DType of cos/sin
  const void* cos;
  const void* sin;
  int64_t stride_cos_p, stride_sin_p, stride_cos_f, stride_sin_f, n_rows;
  const float* inv32;
  const double* inv64;
  float attention_factor;
  // QK-norm before the rotation (posenc::qk_norm_rope_, qk_norm_rope): norm -1 none, 0 each head over D,
  // 1 each token over all heads of q (of k); w[t]: the weight of q (t = 0) / k (t = 1), [D] or [H*D] in
  // q's dtype, unit stride, or nullptr (no scale); y = x * rstd * (weight_offset + w).
  int norm = -1;
  const void* w[2] = {nullptr, nullptr};
  double eps = 0.0, weight_offset = 0.0;
  // posenc::rope_and_cache_: the cache write of each rotated k head (nullptr: none).
  const CacheParams* cache = nullptr;
};

using ItemsFn = void (*)(const Params&, int64_t begin, int64_t end);

}  // namespace rope_cpu
}  // namespace posenc

namespace posenc::rope_cpu {
ItemsFn items_default();
ItemsFn items_avx2();
ItemsFn items_avx512();
// QK-norm + RoPE: one item is one token (all its q and k heads: "heads" needs them together).
ItemsFn norm_items_default();
ItemsFn norm_items_avx2();
ItemsFn norm_items_avx512();
}  // namespace posenc::rope_cpu
