// The RoPE argument rules, written once for the CPU (rope_cpu_ops.cpp) and CUDA (cuda_ops.cpp) glue: a port
// of posenc_kernels/ops/rope/op.py check_rope (with _check_angles and _check_axes), same order, messages
// and exception types (see py_checks.h), and the shape facts both kernels' parameter structs are filled
// from (RopeShape). The value checks (check_rope_values) read positions, offsets, cu_seqlens and axis_map.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <optional>

#include "py_checks.h"

namespace posenc {

struct RopeShape {
  bool packed;              // q [T, Hq, D] (B = 1); else [B, S, Hq, D]
  int64_t B, S, Hq, Hk, D;  // Hk = 0 without k
  int64_t half;             // R / 2
  bool tables;              // cos/sin tables; else inv_freq
};

// _check_angles: tables or frequencies; returns R/2.
inline int64_t check_rope_angles(const OptT& cos, const OptT& sin, const OptT& inv_freq, double attention_factor,
                                 bool exact, int64_t D, const c10::Device& dev) {
  int64_t half = 0;
  const char* what = nullptr;
  const char* src = nullptr;
  if (!inv_freq.has_value()) {
    TORCH_CHECK_VALUE(cos.has_value() && sin.has_value(), "pass cos and sin tables, or inv_freq for on-the-fly angles");
    check_tensor("cos", *cos, Dtypes::kFloat, {2}, &dev);
    check_tensor("sin", *sin, Dtypes::kFloat, {2}, &dev);
    TORCH_CHECK_VALUE(cos->sizes() == sin->sizes(), "cos and sin must have the same shape, got ",
                      py_shape(cos->sizes()), " and ", py_shape(sin->sizes()));
    TORCH_CHECK_TYPE(cos->scalar_type() == sin->scalar_type(), "cos and sin must have the same dtype, got ",
                     py_dtype(cos->scalar_type()), " and ", py_dtype(sin->scalar_type()));
    TORCH_CHECK_VALUE(attention_factor == 1.0,
                      "attention_factor scales on-the-fly angles (inv_freq); tables carry it already "
                      "(rope_cos_sin(..., attention_factor=...))");
    TORCH_CHECK_VALUE(!exact,
                      "exact applies to on-the-fly angles: pass inv_freq (float64) instead of cos/sin tables");
    half = cos->size(1);
    what = "cos must have R/2 >= 1 columns (R = rotary dim), got 0";
    src = "2 * cos.shape[-1]";
  } else {
    TORCH_CHECK_VALUE(!cos.has_value() && !sin.has_value(), "pass cos/sin tables or inv_freq, not both");
    check_tensor("inv_freq", *inv_freq, Dtypes::kFloat, {1}, &dev);
    TORCH_CHECK_TYPE(!exact || inv_freq->scalar_type() == at::kDouble,
                     "exact=True needs inv_freq in float64 (rope_frequencies(..., dtype=torch.float64)): an fp32 "
                     "frequency alone is up to 0.25 rad off at position 2**22; got ",
                     py_dtype(inv_freq->scalar_type()));
    TORCH_CHECK_VALUE(std::isfinite(attention_factor), "attention_factor must be finite, got ",
                      py_float(attention_factor));
    half = inv_freq->size(0);
    what = "inv_freq must have R/2 >= 1 entries (R = rotary dim), got 0";
    src = "2 * inv_freq.shape[0]";
  }
  TORCH_CHECK_VALUE(half != 0, what);
  TORCH_CHECK_VALUE(2 * half <= D, "rotary dim R = ", src, " = ", 2 * half, " exceeds head_dim D = ", D);
  return half;
}

// _check_axes
inline void check_rope_axes(const OptT& positions, const OptT& offsets, int64_t offset, const OptT& cu_seqlens,
                            const at::Tensor& m, int64_t B, int64_t S, int64_t half, const c10::Device& dev) {
  TORCH_CHECK_TYPE(is_index_dtype(m.scalar_type()), "axis_map must be an integer tensor, got dtype ",
                   py_dtype(m.scalar_type()));
  check_tensor("axis_map", m, Dtypes::kAny, {1}, &dev);
  TORCH_CHECK_VALUE(!cu_seqlens.has_value(),
                    "axis_map needs explicit positions [A, ...]; it cannot be combined with cu_seqlens");
  TORCH_CHECK_VALUE(m.size(0) == half, "axis_map must have one entry per frequency, [R/2] = [", half, "], got ",
                    py_shape(m.sizes()));
  TORCH_CHECK_VALUE(positions.has_value(),
                    "axis_map needs positions [A, B, S] or [A, S] (one row of positions per axis)");
  const at::Tensor& p = *positions;
  check_tensor("positions", p, Dtypes::kAny, {2, 3}, &dev);
  const bool ok = p.size(0) >= 1 && ((p.dim() == 2 && p.size(1) == S) || (p.dim() == 3 && p.size(1) == B && p.size(2) == S));
  TORCH_CHECK_VALUE(ok, "with axis_map, positions must be [A, S] = [A, ", S, "] or [A, B, S] = [A, ", B, ", ", S,
                    "], got ", py_shape(p.sizes()));
  check_position_args(p.select(0, 0), offsets, offset, B, S, dev);
}

// check_rope(q, k, ..., values=True, inplace=...) without the value checks: shapes, dtypes, devices, the
// argument combinations, and (in place) writability and disjointness of q and k. Returns the shape facts.
inline RopeShape check_rope(const at::Tensor& q, const OptT& k, const OptT& cos, const OptT& sin,
                            const OptT& inv_freq, const OptT& positions, const OptT& offsets, int64_t offset,
                            const OptT& cu_seqlens, const OptT& axis_map, double attention_factor, bool exact,
                            bool inplace) {
  check_tensor("q", q, Dtypes::kFloat, {3, 4}, nullptr);
  const c10::Device dev = q.device();
  RopeShape r{};
  r.packed = q.dim() == 3;
  r.B = r.packed ? 1 : q.size(0);
  r.S = r.packed ? q.size(0) : q.size(1);
  r.Hq = q.size(-2);
  r.D = q.size(-1);
  if (k.has_value()) {
    check_tensor("k", *k, Dtypes::kAny, {q.dim()}, &dev);
    TORCH_CHECK_TYPE(k->scalar_type() == q.scalar_type(), "k must have the same dtype as q (",
                     py_dtype(q.scalar_type()), "), got ", py_dtype(k->scalar_type()));
    if (r.packed) {
      TORCH_CHECK_VALUE(k->size(0) == r.S && k->size(2) == r.D, "k must be [T, Hk, D] = [", r.S, ", Hk, ", r.D,
                        "] to match q, got ", py_shape(k->sizes()));
    } else {
      TORCH_CHECK_VALUE(k->size(0) == r.B && k->size(1) == r.S && k->size(3) == r.D, "k must be [B, S, Hk, D] = [",
                        r.B, ", ", r.S, ", Hk, ", r.D, "] to match q, got ", py_shape(k->sizes()));
    }
    TORCH_CHECK_VALUE(!(inplace && k->is_same(q)), "k must not overlap q: shared elements would be rotated twice");
    r.Hk = k->size(-2);
  }
  r.half = check_rope_angles(cos, sin, inv_freq, attention_factor, exact, r.D, dev);
  r.tables = !inv_freq.has_value();
  TORCH_CHECK_VALUE(!(cu_seqlens.has_value() && !r.packed),
                    "cu_seqlens needs packed q/k [T, H, D] (tokens of all sequences back to back)");
  if (axis_map.has_value()) {
    check_rope_axes(positions, offsets, offset, cu_seqlens, *axis_map, r.B, r.S, r.half, dev);
  } else {
    check_position_args(positions, offsets, offset, r.B, r.S, dev, cu_seqlens, r.packed);
  }
  if (inplace) {
    check_writable("q", q);
    if (k.has_value()) {
      check_writable("k", *k);
      check_disjoint("q", q, "k", *k);
    }
  }
  return r;
}

// check_rope's value checks (values=True): axis_map within positions' axes, rows within the table,
// cu_seqlens' rules. Skipped when value checks are off or under graph capture (value_checks_on).
inline void check_rope_values(const RopeShape& r, const OptT& cos, const OptT& positions, const OptT& offsets,
                              int64_t offset, const OptT& cu_seqlens, const OptT& axis_map, const c10::Device& dev) {
  if (r.B * r.S == 0) return;
  const int64_t rows = r.tables ? cos->size(0) : -1;
  if (axis_map.has_value()) {
    int64_t lo = 0, hi = 0;
    const int64_t A = positions->size(0);
    if (axis_map->numel() && value_checks_on(dev) && index_min_max(*axis_map, lo, hi)) {
      TORCH_CHECK_VALUE(lo >= 0 && hi < A, "axis_map values must lie in [0, ", A, ") (positions' axes), got [", lo,
                        ", ", hi, "]");
    }
    if (rows >= 0) check_position_values(positions, std::nullopt, 0, r.S, rows, dev);
  } else {
    check_position_values(positions, offsets, offset, r.S, rows, dev, cu_seqlens);
  }
}

// The cos/sin table fields both kernels' parameter structs share (CPU: rope_cpu::Params, CUDA:
// posenc_cuda::Params), named as the Triton kernel's arguments.
template <class Params>
inline void set_table_strides(Params& p, const at::Tensor& cos, const at::Tensor& sin) {
  p.stride_cos_p = cos.stride(0);
  p.stride_sin_p = sin.stride(0);
  p.stride_cos_f = cos.stride(1);
  p.stride_sin_f = sin.stride(1);
  p.n_rows = cos.size(0);
}

}  // namespace posenc
