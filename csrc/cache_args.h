// The RoPE + KV-cache write argument rules (posenc::rope_and_cache_ / rope_and_cache), written once for the CPU
// glue (rope_cpu_ops.cpp) and any CUDA glue: a port of posenc_kernels/ops/cache/op.py check_rope_and_cache,
// same order, messages and exception types (py_checks.h). The q/k arguments are checked by the RoPE family's
// check_rope (rope_args.h) or the QK-norm family's check_qk_norm_rope (qknorm_args.h), as in Python.
//
// Python runs its check in two phases (values=False: shapes and arguments; then values=True: writability,
// aliasing and the checks that read values); check_rope_and_cache below runs both, in that order, so an
// input that breaks a rule of each phase raises the first phase's error, as Python does.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "qknorm_args.h"
#include "rope_args.h"

namespace posenc {

enum KvLayout : int64_t { kNHD = 0, kHND = 1 };
constexpr int64_t kNoNorm = -1;  // norm code: no QK-norm stage

inline bool is_fp8_dtype(at::ScalarType t) { return t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2; }

// Size / stride d of the cache's NHD view [N0, N1, H, D] (HND [N0, H, N1, D] transposed), from the cache's
// own metadata: no view is made (a transpose is an ATen call, ~1 us of a decode step's host time, and the
// checks and the glue read five of them).
inline int64_t nhd_dim(int64_t layout, int64_t d) { return layout == kHND && (d == 1 || d == 2) ? 3 - d : d; }
inline int64_t nhd_size(const at::Tensor& cache, int64_t layout, int64_t d) { return cache.size(nhd_dim(layout, d)); }
inline int64_t nhd_stride(const at::Tensor& cache, int64_t layout, int64_t d) {
  return cache.stride(nhd_dim(layout, d));
}

// _check_cache(name, cache, x, xname, layout, want_n0, want_n1, paged, k_cache); want_n* < 0 is None.
inline void check_cache(const char* name, const at::Tensor& cache, const at::Tensor& x, const char* xname,
                        int64_t layout, int64_t want_n0, int64_t want_n1, bool paged,
                        const at::Tensor* k_cache = nullptr) {
  const c10::Device dev = x.device();
  check_tensor(name, cache, Dtypes::kAny, {4}, &dev);
  TORCH_CHECK_TYPE(cache.scalar_type() == x.scalar_type() || is_fp8_dtype(cache.scalar_type()), name, " must have ",
                   xname, "'s dtype (", py_dtype(x.scalar_type()),
                   ") or an FP8 dtype (float8_e4m3fn, float8_e5m2), got ", py_dtype(cache.scalar_type()));
  if (k_cache != nullptr) {
    TORCH_CHECK_TYPE(cache.scalar_type() == k_cache->scalar_type(), "v_cache must have k_cache's dtype (",
                     py_dtype(k_cache->scalar_type()), "), got ", py_dtype(cache.scalar_type()));
  }
  TORCH_CHECK_VALUE(!(cache.stride(-1) != 1 && cache.size(-1) > 1), name,
                    " must have unit stride in its last dimension (head_dim), got strides ",
                    py_shape(cache.strides()));
  const int64_t H = x.size(-2), D = x.size(-1);
  const char* what = paged ? (layout == kNHD ? "[num_blocks, block_size, Hk, D]" : "[num_blocks, Hk, block_size, D]")
                           : (layout == kNHD ? "[B, S_max, Hk, D]" : "[B, Hk, S_max, D]");
  bool bad = nhd_size(cache, layout, 2) != H || nhd_size(cache, layout, 3) != D;
  if (want_n0 >= 0 && nhd_size(cache, layout, 0) != want_n0) bad = true;
  if (want_n1 >= 0 && nhd_size(cache, layout, 1) != want_n1) bad = true;
  if (!bad) return;
  const bool is_v = std::string(name) == "v_cache";
  std::string extra;
  if (is_v) {
    extra = std::string(" and k_cache's ") + (paged ? "blocks" : "batch") + " and " + (paged ? "block_size" : "length");
  } else if (want_n0 >= 0) {
    extra = " and B = " + std::to_string(want_n0);
  }
  TORCH_CHECK_VALUE(false, name, " must be ", what, " with ", is_v ? "v" : "k", "'s heads and head_dim (Hk = ", H,
                    ", D = ", D, ")", extra, " in kv_layout=", layout == kNHD ? "NHD" : "HND", ", got ",
                    py_shape(cache.sizes()));
}

// FP8 scales (op.py SCALE_MIN / SCALE_MAX): the kernels divide in fp32 by the scale: a normal fp32 number.
constexpr double kScaleMin = 1.1754943508222875e-38;  // 2**-126
constexpr double kScaleMax = 3.4028234663852886e+38;  // fp32 max

// _check_scale(name, t, value, H, dev)
inline void check_scale(const char* name, const OptT& t, const std::optional<double>& value, int64_t H,
                        const c10::Device& dev) {
  if (t.has_value()) {
    check_tensor(name, *t, Dtypes::kFloat, {0, 1}, &dev);
    TORCH_CHECK_VALUE(!(t->dim() == 1 && t->size(0) != 1 && t->size(0) != H), name,
                      " must be a float, a 0-d tensor, [1] or per head [", H, "], got ", py_shape(t->sizes()));
  } else if (value.has_value()) {
    TORCH_CHECK_VALUE(*value >= kScaleMin && *value <= kScaleMax, name,
                      " must be a normal fp32 number in [2**-126, 3.4e38] (its reciprocal finite), got ",
                      py_float(*value));
  }
}

// _check_scale_values(name, t)
inline void check_scale_values(const char* name, const OptT& t) {
  if (!t.has_value() || t->numel() == 0 || !value_checks_on(t->device())) return;
  double lo = 0, hi = 0;
  if (t->device().is_cpu()) {  // a 0-d / [1] / [H] float tensor read in place: no ATen call, no copy
    lo = std::numeric_limits<double>::infinity();
    hi = -lo;
    bool nan = false;
    const int64_t n = t->numel(), st = t->dim() == 0 ? 0 : t->stride(0);
    const void* base = t->const_data_ptr();
    for (int64_t i = 0; i < n; ++i) {
      double x = 0;
      switch (t->scalar_type()) {
        case at::kFloat: x = static_cast<const float*>(base)[i * st]; break;
        case at::kDouble: x = static_cast<const double*>(base)[i * st]; break;
        case at::kHalf: x = static_cast<float>(static_cast<const c10::Half*>(base)[i * st]); break;
        default: x = static_cast<float>(static_cast<const c10::BFloat16*>(base)[i * st]); break;
      }
      nan |= std::isnan(x);
      lo = std::min(lo, x);
      hi = std::max(hi, x);
    }
    if (nan) lo = hi = std::numeric_limits<double>::quiet_NaN();  // aminmax propagates NaN
  } else {
    c10::InferenceMode guard;
    lo = at::min(*t).item<double>();
    hi = at::max(*t).item<double>();
  }
  TORCH_CHECK_VALUE(lo >= kScaleMin && hi <= kScaleMax, name,
                    " must hold normal fp32 numbers in [2**-126, 3.4e38] (reciprocals finite), got min ", py_float(lo),
                    ", max ", py_float(hi));
}

// The values of a 1-D / 2-D integer index tensor, row-major, as int64 (any device: one copy to the host).
inline std::vector<int64_t> index_values(const at::Tensor& t) {
  if (t.device().is_cpu()) {  // read in place through the strides (CPU: no sync, no ATen call, no copy)
    std::vector<int64_t> v(t.numel());
    const void* base = t.const_data_ptr();
    const int code = dtype_code(t.scalar_type());
    const int64_t rows = t.dim() == 2 ? t.size(0) : 1, cols = t.dim() == 0 ? 1 : t.size(-1);
    const int64_t sr = t.dim() == 2 ? t.stride(0) : 0, sc = t.dim() == 0 ? 0 : t.stride(-1);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) v[r * cols + c] = load_index(base, code, r * sr + c * sc);
    }
    return v;
  }
  c10::InferenceMode guard;
  const at::Tensor h = t.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = h.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + h.numel());
}

inline std::string py_int_list(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

// Whether a slot >= 0 occurs twice: one O(n) pass over an open-addressing set (sized to a power of two >= 2n,
// on the stack up to 256 slots), in place of a sort (which is left to the error path, for the message).
inline bool has_duplicate_slot(const std::vector<int64_t>& s) {
  if (s.size() <= 1) return false;
  size_t cap = 16;
  while (cap < 2 * s.size()) cap *= 2;
  int64_t stack[512];
  std::vector<int64_t> heap;
  int64_t* set = stack;
  if (cap > 512) {
    heap.resize(cap);
    set = heap.data();
  }
  std::fill(set, set + cap, int64_t{-1});
  const size_t mask = cap - 1;
  for (const int64_t v : s) {
    if (v < 0) continue;
    size_t h = static_cast<size_t>(static_cast<uint64_t>(v) * UINT64_C(0x9E3779B97F4A7C15) >> 32) & mask;
    while (set[h] >= 0) {
      if (set[h] == v) return true;
      h = (h + 1) & mask;
    }
    set[h] = v;
  }
  return false;
}

// _check_slot_values(slots, n_slots, n_blocks, block_size)
inline void check_slot_values(const at::Tensor& slots, int64_t n_blocks, int64_t block_size) {
  if (slots.numel() == 0 || !value_checks_on(slots.device())) return;
  const int64_t n_slots = n_blocks * block_size;
  const std::vector<int64_t> s = index_values(slots);
  const auto mm = std::minmax_element(s.begin(), s.end());
  const int64_t lo = *mm.first, hi = *mm.second;
  if (lo < -1 || hi >= n_slots) {
    const int64_t bad = lo < -1 ? lo : hi;
    const int64_t i = std::find(s.begin(), s.end(), bad) - s.begin();
    TORCH_CHECK_VALUE(false, "slot_mapping[", i, "] = ", bad,
                      " is out of range: slots must lie in [0, num_blocks * block_size) = [0, ", n_blocks, " * ",
                      block_size, ") = [0, ", n_slots, "), or be -1 (not written)");
  }
  if (!has_duplicate_slot(s)) return;
  std::vector<int64_t> w;  // a duplicate: the smallest one, as Python's sorted scan names it
  for (const int64_t v : s) {
    if (v >= 0) w.push_back(v);
  }
  std::sort(w.begin(), w.end());
  for (size_t j = 1; j < w.size(); ++j) {
    if (w[j] != w[j - 1]) continue;
    const int64_t dup = w[j];
    std::vector<int64_t> idx;
    for (size_t i = 0; i < s.size(); ++i) {
      if (s[i] == dup) idx.push_back(static_cast<int64_t>(i));
    }
    TORCH_CHECK_VALUE(false, "slot ", dup, " is written twice in one call (slot_mapping", py_int_list(idx),
                      "): the cache row would be a race");
  }
}

// _check_position_values(pos, s_max)
inline void check_cache_position_values(const at::Tensor& pos, int64_t s_max) {
  if (pos.numel() == 0 || !value_checks_on(pos.device())) return;
  const std::vector<int64_t> p = index_values(pos);
  const auto mm = std::minmax_element(p.begin(), p.end());
  const int64_t lo = *mm.first, hi = *mm.second;
  const int64_t cols = pos.size(-1);
  if (lo < -1 || hi >= s_max) {
    const int64_t bad = lo < -1 ? lo : hi;
    const int64_t i = std::find(p.begin(), p.end(), bad) - p.begin();
    const std::vector<int64_t> at = pos.dim() == 2 ? std::vector<int64_t>{i / cols, i % cols} : std::vector<int64_t>{i};
    TORCH_CHECK_VALUE(false, "cache_positions", py_int_list(at), " = ", bad,
                      " is out of range: cache positions must lie in [0, S_max) = [0, ", s_max,
                      "), or be -1 (not written)");
  }
  const int64_t rows = pos.dim() == 2 ? pos.size(0) : 1;
  std::vector<int64_t> row;
  for (int64_t r = 0; r < rows; ++r) {
    row.assign(p.begin() + r * cols, p.begin() + (r + 1) * cols);
    std::sort(row.begin(), row.end());
    for (size_t c = 1; c < row.size(); ++c) {
      TORCH_CHECK_VALUE(!(row[c] == row[c - 1] && row[c] >= 0), "cache position ", row[c],
                        " is written twice in one call (cache_positions row ", r, "): the cache row would be a race");
    }
  }
}

// What the kernel glue needs from the check.
struct CacheShape {
  RopeShape rope;
  bool paged;
  bool fp8;  // k_cache (and v_cache) FP8
};

// check_rope_and_cache(..., values=True, inplace=...): every rule, in Python's order, before anything is written.
inline CacheShape check_rope_and_cache(
    const at::Tensor& q, const at::Tensor& k, const OptT& v, const at::Tensor& k_cache, const OptT& v_cache,
    const OptT& q_fp8, const OptT& slot_mapping, const OptT& cache_positions, int64_t kv_layout, const OptT& k_scale,
    const OptT& v_scale, const OptT& q_scale, const std::optional<double>& k_scale_value,
    const std::optional<double>& v_scale_value, const std::optional<double>& q_scale_value, const OptT& q_weight,
    const OptT& k_weight, double eps, int64_t norm, double weight_offset, const OptT& cos, const OptT& sin,
    const OptT& inv_freq, const OptT& positions, const OptT& offsets, int64_t offset, const OptT& cu_seqlens,
    const OptT& axis_map, double attention_factor, bool conjugate, bool exact, bool inplace) {
  TORCH_CHECK_VALUE(kv_layout == kNHD || kv_layout == kHND,
                    "kv_layout must be 'NHD' or 'HND' (codes 0, 1), got ", kv_layout);
  check_tensor("q", q, Dtypes::kFloat, {3, 4}, nullptr);
  const c10::Device dev = q.device();
  TORCH_CHECK_VALUE(slot_mapping.has_value() != cache_positions.has_value(),
                    "pass exactly one of slot_mapping (a paged cache, q/k/v [T, H, D]) and cache_positions (a "
                    "contiguous cache, q/k/v [B, S, H, D])",
                    slot_mapping.has_value() ? ", got both" : ", got neither");
  const bool paged = slot_mapping.has_value();
  TORCH_CHECK_VALUE(!(paged && q.dim() != 3),
                    "with slot_mapping (a paged cache), q, k and v must be packed [T, H, D], got q ",
                    py_shape(q.sizes()));
  TORCH_CHECK_VALUE(!(!paged && q.dim() != 4),
                    "with cache_positions (a contiguous cache), q, k and v must be [B, S, H, D], got q ",
                    py_shape(q.sizes()));
  // q and k: the norm's and RoPE's own checks (their writability and aliasing: below, with the values)
  CacheShape cs{};
  if (norm == kNoNorm) {
    cs.rope = check_rope(q, k, cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map, attention_factor,
                         exact, /*inplace=*/false);
    TORCH_CHECK_VALUE(!(inplace && k.is_same(q)), "k must not overlap q: shared elements would be rotated twice");
    TORCH_CHECK_VALUE(!conjugate, "conjugate must be False for rope_and_cache (RoPE's backward flag)");
  } else {
    cs.rope = check_qk_norm_rope(q, k, q_weight, k_weight, eps, norm, weight_offset, cos, sin, inv_freq, positions,
                                 offsets, offset, cu_seqlens, axis_map, attention_factor, conjugate, exact,
                                 /*inplace=*/false);
    TORCH_CHECK_VALUE(!(inplace && k.is_same(q)), "k must not overlap q: shared elements would be rotated twice");
  }
  TORCH_CHECK_VALUE(v.has_value() == v_cache.has_value(),
                    "pass v and v_cache together (or neither, for a k-only cache), got ",
                    v.has_value() ? "v without v_cache" : "v_cache without v");
  if (v.has_value()) {
    check_tensor("v", *v, Dtypes::kAny, {q.dim()}, &dev);
    TORCH_CHECK_TYPE(v->scalar_type() == k.scalar_type(), "v must have k's dtype (", py_dtype(k.scalar_type()),
                     "), got ", py_dtype(v->scalar_type()));
    const auto vs = v->sizes(), ks = k.sizes();
    const bool lead = vs.slice(0, vs.size() - 2) == ks.slice(0, ks.size() - 2);
    if (!lead || v->size(-2) != k.size(-2)) {
      const std::string kshape = py_shape(ks);
      TORCH_CHECK_VALUE(false, "v must have k's tokens and heads (", kshape.substr(0, kshape.size() - 1),
                        " with any head_dim): got ", py_shape(vs),
                        lead ? " (v has " + std::to_string(v->size(-2)) + " heads, k " +
                                   std::to_string(k.size(-2)) + ")"
                             : std::string());
    }
  }
  const int64_t T = paged ? q.size(0) : q.size(1);
  const int64_t B = paged ? 1 : q.size(0);
  const at::Tensor& index = paged ? *slot_mapping : *cache_positions;
  const char* iname = paged ? "slot_mapping" : "cache_positions";
  if (paged) {
    check_tensor(iname, index, Dtypes::kAny, {1}, nullptr);
  } else {
    check_tensor(iname, index, Dtypes::kAny, {1, 2}, nullptr);
  }
  TORCH_CHECK_TYPE(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong, iname,
                   " must be int32 or int64, got ", py_dtype(index.scalar_type()));
  TORCH_CHECK_VALUE(index.device() == dev, iname, " must be on the same device as the input (", py_device(dev),
                    "), got ", py_device(index.device()));
  if (paged) {
    TORCH_CHECK_VALUE(index.size(0) <= T, "slot_mapping must have at most one slot per token ([T] = [", T, "]), got ",
                      py_shape(index.sizes()));
    check_cache("k_cache", k_cache, k, "k", kv_layout, -1, -1, true);
  } else {
    const bool ok = (index.dim() == 1 && index.size(0) == T) ||
                    (index.dim() == 2 && index.size(0) == B && index.size(1) == T);
    TORCH_CHECK_VALUE(ok, "cache_positions must be [S] = [", T, "] or [B, S] = [", B, ", ", T, "], got ",
                      py_shape(index.sizes()));
    check_cache("k_cache", k_cache, k, "k", kv_layout, B, -1, false);
  }
  const int64_t kc_n0 = nhd_size(k_cache, kv_layout, 0), kc_n1 = nhd_size(k_cache, kv_layout, 1);
  if (v.has_value()) check_cache("v_cache", *v_cache, *v, "v", kv_layout, kc_n0, kc_n1, paged, &k_cache);
  const int64_t Hk = k.size(-2);
  cs.paged = paged;
  cs.fp8 = is_fp8_dtype(k_cache.scalar_type());
  const std::string kdt = py_dtype(k_cache.scalar_type());
  for (int i = 0; i < 2; ++i) {
    const char* name = i == 0 ? "k_scale" : "v_scale";
    const OptT& t = i == 0 ? k_scale : v_scale;
    const std::optional<double>& val = i == 0 ? k_scale_value : v_scale_value;
    if (i == 1 && !v.has_value()) {
      TORCH_CHECK_VALUE(!t.has_value() && !val.has_value(), "v_scale was given without v");
      continue;
    }
    TORCH_CHECK_VALUE(!(cs.fp8 && !t.has_value() && !val.has_value()), "an FP8 cache (", kdt, ") needs ", name,
                      " (a float, a 0-d tensor or per head [Hk])");
    TORCH_CHECK_VALUE(!(!cs.fp8 && (t.has_value() || val.has_value())), name,
                      " applies to FP8 caches only; this cache is ", kdt);
    check_scale(name, t, val, Hk, dev);
  }
  if (q_fp8.has_value()) {
    TORCH_CHECK_TYPE(is_fp8_dtype(q_fp8->scalar_type()), "q_fp8 must have dtype in (float8_e4m3fn, float8_e5m2), got ",
                     py_dtype(q_fp8->scalar_type()));
    TORCH_CHECK_VALUE(q_fp8->device() == dev, "q_fp8 must be on the same device as the input (", py_device(dev),
                      "), got ", py_device(q_fp8->device()));
    TORCH_CHECK_VALUE(q_fp8->sizes() == q.sizes(), "q_fp8 must have q's shape ", py_shape(q.sizes()), ", got ",
                      py_shape(q_fp8->sizes()));
    TORCH_CHECK_VALUE(q_scale.has_value() || q_scale_value.has_value(),
                      "q_fp8 needs q_scale (a float, a 0-d tensor or per head [Hq])");
    check_scale("q_scale", q_scale, q_scale_value, q.size(-2), dev);
  } else {
    TORCH_CHECK_VALUE(!q_scale.has_value() && !q_scale_value.has_value(),
                      "q_scale applies to the FP8 q output: pass q_fp8 too");
  }
  // ---- values=True: RoPE's writability and value checks, then the caches' aliasing and values
  if (inplace) {
    check_writable("q", q);
    check_writable("k", k);
    check_disjoint("q", q, "k", k);
  }
  check_rope_values(cs.rope, cos, positions, offsets, offset, cu_seqlens, axis_map, dev);
  std::vector<std::pair<const char*, const at::Tensor*>> written;
  written.emplace_back("k_cache", &k_cache);
  if (v.has_value()) written.emplace_back("v_cache", &*v_cache);
  if (q_fp8.has_value()) written.emplace_back("q_fp8", &*q_fp8);
  for (const auto& [name, t] : written) check_writable(name, *t);
  if (inplace) {
    written.insert(written.begin(), {{"q", &q}, {"k", &k}});
  }
  std::vector<std::pair<const char*, const at::Tensor*>> read = {{"q", &q}, {"k", &k}};
  if (v.has_value()) read.emplace_back("v", &*v);
  for (size_t i = 0; i < written.size(); ++i) {
    const auto& [na, a] = written[i];
    for (size_t j = i + 1; j < written.size(); ++j) check_disjoint(na, *a, written[j].first, *written[j].second);
    for (const auto& [nb, b] : read) {
      bool is_written = false;
      for (const auto& w : written) is_written |= b->is_same(*w.second);
      if (!is_written) check_disjoint(nb, *b, na, *a);
    }
  }
  check_scale_values("k_scale", k_scale);
  check_scale_values("v_scale", v_scale);
  check_scale_values("q_scale", q_scale);
  if (paged) {
    check_slot_values(*slot_mapping, kc_n0, kc_n1);
  } else {
    check_cache_position_values(*cache_positions, kc_n1);
  }
  return cs;
}

}  // namespace posenc
