// The QK-norm + RoPE argument rules, written once for the CPU glue (rope_cpu_ops.cpp) and any CUDA glue: a
// port of posenc_kernels/ops/qknorm/op.py check_qk_norm_rope, same order, messages and exception types
// (py_checks.h). The RoPE arguments are checked by rope_args.h's check_rope, as in Python.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <optional>

#include "rope_args.h"

namespace posenc {

enum QkNorm : int64_t { kNormHead = 0, kNormHeads = 1 };

// _check_weight(name, w, x, xname, norm)
inline void check_qk_weight(const char* name, const OptT& w, const at::Tensor& x, const char* xname, int64_t norm) {
  if (!w.has_value()) return;
  const c10::Device dev = x.device();
  check_tensor(name, *w, Dtypes::kFloat, {1}, &dev);
  TORCH_CHECK_TYPE(w->scalar_type() == x.scalar_type(), name, " must have ", xname, "'s dtype (",
                   py_dtype(x.scalar_type()), "), got ", py_dtype(w->scalar_type()));
  const int64_t H = x.size(-2), D = x.size(-1);
  if (norm == kNormHead) {
    TORCH_CHECK_VALUE(w->size(0) == D, name, " must be [D] = [", D, "] for norm='head' (one weight per channel), got ",
                      py_shape(w->sizes()));
  } else {
    TORCH_CHECK_VALUE(w->size(0) == H * D, name, " must be [H*D] = [", H, "*", D, "] = [", H * D,
                      "] for norm='heads' (one weight per channel of all heads)",
                      w->size(0) == D ? " (a per-head weight [D]: use norm='head')" : "", ", got ", py_shape(w->sizes()));
  }
}

// check_qk_norm_rope(..., values=True, inplace=...) without the value checks (check_rope_values): returns the
// RoPE shape facts.
inline RopeShape check_qk_norm_rope(const at::Tensor& q, const OptT& k, const OptT& q_weight, const OptT& k_weight,
                                    double eps, int64_t norm, double weight_offset, const OptT& cos, const OptT& sin,
                                    const OptT& inv_freq, const OptT& positions, const OptT& offsets, int64_t offset,
                                    const OptT& cu_seqlens, const OptT& axis_map, double attention_factor,
                                    bool conjugate, bool exact, bool inplace) {
  TORCH_CHECK_VALUE(norm == kNormHead || norm == kNormHeads, "norm must be 'head' or 'heads' (codes 0, 1), got ", norm);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps must be a finite float >= 0, got ", py_float(eps));
  TORCH_CHECK_VALUE(std::isfinite(weight_offset), "weight_offset must be a finite float, got ", py_float(weight_offset));
  TORCH_CHECK_VALUE(!conjugate, "conjugate must be False for qk_norm_rope (RoPE's backward flag; qk_norm_rope's "
                                "backward is its own op)");
  // shapes first (the weights' lengths need them); writability after the weights, as in Python
  const RopeShape r = check_rope(q, k, cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map,
                                 attention_factor, exact, /*inplace=*/false);
  TORCH_CHECK_VALUE(!(inplace && k.has_value() && k->is_same(q)),
                    "k must not overlap q: shared elements would be rotated twice");
  check_qk_weight("q_weight", q_weight, q, "q", norm);
  TORCH_CHECK_VALUE(k.has_value() || !k_weight.has_value(), "k_weight was given without k");
  if (k.has_value()) check_qk_weight("k_weight", k_weight, *k, "k", norm);
  if (inplace) {
    check_writable("q", q);
    if (k.has_value()) {
      check_writable("k", *k);
      check_disjoint("q", q, "k", *k);
    }
  }
  return r;
}

}  // namespace posenc
