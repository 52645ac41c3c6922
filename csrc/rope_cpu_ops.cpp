// posenc::rope_ / posenc::rope on CPU: the op glue around the kernel of rope_cpu.cpp (see its header
// comment for the kernel and its ISA variants). Baseline flags only.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "exact_angle.h"
#include "rope_cpu.h"

// =================================================================================================
// The ops posenc::rope_ / posenc::rope (schemas: Python): checks, parameters, variant choice, parallel
// loop (baseline flags only). The chooser of bindings.cpp calls them (AddNative).
// =================================================================================================
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include "alias_checks.h"
#include "cache_args.h"
#include "cpu_parallel.h"
#include "native_ops.h"
#include "qknorm_args.h"
#include "rope_args.h"


namespace posenc {
namespace {

using at::Tensor;
using std::optional;

// Per-token rows of a packed varlen batch (cu_seqlens, after check_rope_values), by a linear walk: robust to
// unchecked values (never an out-of-bounds read; rows outside the table become NaN in the kernel). Tokens
// past cu_seqlens[-1] take position 0.
void cu_seqlens_rows(int64_t S, const Tensor& cu, const optional<Tensor>& offsets, int64_t offset,
                     std::vector<int64_t>& rows) {
  const int cc = dtype_code(cu.scalar_type());
  const int64_t N = cu.size(0) - 1, cst = cu.stride(0);
  const void* cp = cu.const_data_ptr();
  const int oc = offsets.has_value() ? dtype_code(offsets->scalar_type()) : kInt64;
  const void* op = offsets.has_value() ? offsets->const_data_ptr() : nullptr;
  const int64_t ost = offsets.has_value() ? offsets->stride(0) : 0;
  rows.resize(S);
  int64_t n = 0;
  int64_t next = load_index(cp, cc, cst), cur = load_index(cp, cc, 0);
  for (int64_t t = 0; t < S; ++t) {
    while (n < N && t >= next) {
      ++n;
      cur = next;
      if (n < N) next = load_index(cp, cc, (n + 1) * cst);
    }
    rows[t] = n < N ? t - cur + (op ? load_index(op, oc, n * ost) : offset) : 0;
  }
}

// The widest variant this machine (and ATEN_CPU_CAPABILITY) allows; decided once.
rope_cpu::ItemsFn pick_variant() {
  static const rope_cpu::ItemsFn fn = [] {
    const std::string cap = at::get_cpu_capability();
    rope_cpu::ItemsFn f = nullptr;
    if (cap == "AVX512") f = rope_cpu::items_avx512();
    if (f == nullptr && (cap == "AVX512" || cap == "AVX2")) f = rope_cpu::items_avx2();
    return f != nullptr ? f : rope_cpu::items_default();
  }();
  return fn;
}

}  // namespace

const char* rope_cpu_isa() {
  const rope_cpu::ItemsFn fn = pick_variant();
  return fn == rope_cpu::items_avx512() ? "AVX512" : fn == rope_cpu::items_avx2() ? "AVX2" : "baseline";
}

namespace {

rope_cpu::ItemsFn pick_norm_variant() {
  static const rope_cpu::ItemsFn fn = [] {
    const std::string cap = at::get_cpu_capability();
    rope_cpu::ItemsFn f = nullptr;
    if (cap == "AVX512") f = rope_cpu::norm_items_avx512();
    if (f == nullptr && (cap == "AVX512" || cap == "AVX2")) f = rope_cpu::norm_items_avx2();
    return f != nullptr ? f : rope_cpu::norm_items_default();
  }();
  return fn;
}

// QK-norm before the rotation (run_rope's `norm`): its code and weights (unit stride, q's dtype).
struct NormArgs {
  int64_t norm;
  Tensor w[2];  // undefined: no weight
  double eps, weight_offset;
};

constexpr int64_t kSmall = 512;  // inv_freq / axis_map entries converted on the stack up to this many

// Rotate q (and k) into q_out (k_out), which are q (k) themselves (in place) or fresh tensors. Every check
// has run when this is called except aliasing (in place only: done here) .
void run_rope(const Tensor& q, const optional<Tensor>& k, const Tensor& q_out, const optional<Tensor>& k_out,
              const RopeShape& shape, const optional<Tensor>& cos, const optional<Tensor>& sin,
              const optional<Tensor>& inv_freq, const optional<Tensor>& positions, const optional<Tensor>& offsets,
              int64_t offset, const optional<Tensor>& axis_map, std::vector<int64_t>& cu_rows, bool has_cu,
              double attention_factor, bool interleaved, bool conjugate, bool exact, const NormArgs* norm = nullptr,
              const rope_cpu::CacheParams* cache = nullptr, int64_t cache_bytes_per_token = 0) {
  rope_cpu::Params p{};
  const bool packed = shape.packed;
  const int64_t half = shape.half;
  p.dtype = dtype_code(q.scalar_type());
  p.interleaved = interleaved;
  p.conjugate = conjugate;
  p.B = packed ? 1 : q.size(0);
  p.S = packed ? q.size(0) : q.size(1);
  p.Hq = q.size(-2);
  p.Hk = k.has_value() ? k->size(-2) : 0;
  p.D = q.size(-1);
  p.half = half;
  const int64_t n_items = p.B * p.S * (p.Hq + p.Hk);
  if (n_items == 0) return;
  const int64_t R = 2 * half;
  auto set = [&](int w, const Tensor& x, const Tensor& o) {
    p.x[w] = x.const_data_ptr();
    p.o[w] = o.data_ptr();
    const int64_t off = packed ? 1 : 0;  // packed [T, H, D]: b stride 0
    p.xs[w][0] = packed ? 0 : x.stride(0);
    p.os[w][0] = packed ? 0 : o.stride(0);
    for (int d = 1; d < 4; ++d) {
      p.xs[w][d] = x.stride(d - off);
      p.os[w][d] = o.stride(d - off);
    }
    p.unit[w] = p.D <= 1 || (p.xs[w][3] == 1 && p.os[w][3] == 1);
    // Pass-through channels [R, D) are copied only out of place.
    p.copy_tail[w] = R < p.D && !posenc_alias::same_elements(o, x);
  };
  set(0, q, q_out);
  if (k.has_value()) set(1, *k, *k_out);
  if (has_cu) {
    p.rows.mode = kPosPositions;
    p.rows.code = kInt64;
    p.rows.ptr = cu_rows.data();
    p.rows.stride_pos_b = 0;
    p.rows.stride_pos_s = 1;
  } else if (positions.has_value()) {
    const Tensor& t = *positions;
    p.rows.mode = kPosPositions;
    p.rows.code = dtype_code(t.scalar_type());
    p.rows.ptr = t.const_data_ptr();
    if (axis_map.has_value()) {
      p.stride_pos_a = t.stride(0);
      p.rows.stride_pos_b = t.dim() == 3 ? t.stride(1) : 0;
    } else {
      p.rows.stride_pos_b = t.dim() == 2 ? t.stride(0) : 0;
    }
    p.rows.stride_pos_s = t.stride(-1);
  } else if (offsets.has_value()) {
    p.rows.mode = kPosOffsets;
    p.rows.code = dtype_code(offsets->scalar_type());
    p.rows.ptr = offsets->const_data_ptr();
    p.rows.stride_off = offsets->stride(0);
  } else {
    p.rows.mode = kPosOffset;
    p.rows.offset = offset;
  }
  int64_t axis_stack[kSmall];
  std::vector<int64_t> axis_heap;
  if (axis_map.has_value()) {
    int64_t* ax = axis_stack;
    if (half > kSmall) {
      axis_heap.resize(half);
      ax = axis_heap.data();
    }
    const int code = dtype_code(axis_map->scalar_type());
    const int64_t A = positions->size(0);
    for (int64_t i = 0; i < half; ++i) {
      const int64_t v = load_index(axis_map->const_data_ptr(), code, i * axis_map->stride(0));
      ax[i] = v >= 0 && v < A ? v : -1;  // outside positions' axes (value checks off): NaN
    }
    p.axis = ax;
  }
  float inv32_stack[kSmall];
  double inv64_stack[kSmall];
  std::vector<float> inv32_heap;
  std::vector<double> inv64_heap;
  if (cos.has_value()) {
    p.angle_mode = 0;
    p.table_dtype = dtype_code(cos->scalar_type());
    p.cos = cos->const_data_ptr();
    p.sin = sin->const_data_ptr();
    set_table_strides(p, *cos, *sin);
  } else {
    // inv_freq read through its stride, converted once per call (R/2 values, on the stack when small)
    const Tensor& f = *inv_freq;
    const int64_t st = f.stride(0);
    if (exact) {
      double* v = inv64_stack;
      if (half > kSmall) {
        inv64_heap.resize(half);
        v = inv64_heap.data();
      }
      const double* src = f.const_data_ptr<double>();
      for (int64_t i = 0; i < half; ++i) v[i] = src[i * st];
      p.inv64 = v;
      p.angle_mode = 2;
    } else {
      float* v = inv32_stack;
      if (half > kSmall) {
        inv32_heap.resize(half);
        v = inv32_heap.data();
      }
      const void* src = f.const_data_ptr();
      switch (f.scalar_type()) {
        case at::kFloat: for (int64_t i = 0; i < half; ++i) v[i] = static_cast<const float*>(src)[i * st]; break;
        case at::kDouble:
          for (int64_t i = 0; i < half; ++i) v[i] = static_cast<float>(static_cast<const double*>(src)[i * st]);
          break;
        case at::kHalf:
          for (int64_t i = 0; i < half; ++i) v[i] = static_cast<float>(static_cast<const c10::Half*>(src)[i * st]);
          break;
        default:
          for (int64_t i = 0; i < half; ++i) v[i] = static_cast<float>(static_cast<const c10::BFloat16*>(src)[i * st]);
          break;
      }
      p.inv32 = v;
      p.angle_mode = 1;
    }
  }
  p.attention_factor = static_cast<float>(attention_factor);
  p.cache = cache;  // rope_and_cache_: each rotated k head (and v) also goes to its cache row
  if (norm != nullptr) {
    // One item per token (its q and k heads together: norm 'heads' needs every head's statistics first).
    p.norm = static_cast<int>(norm->norm);
    for (int w = 0; w < 2; ++w) p.w[w] = norm->w[w].defined() ? norm->w[w].const_data_ptr() : nullptr;
    p.eps = norm->eps;
    p.weight_offset = norm->weight_offset;
    const int64_t n_tok = p.B * p.S;
    const rope_cpu::ItemsFn nfn = pick_norm_variant();
    // The split (cpu_parallel.h): an item (one token, its q and k heads) reads and writes D(Hq + Hk) elements.
    parallel_items(n_tok, 2 * p.D * (p.Hq + p.Hk) * static_cast<int64_t>(q.element_size()) + cache_bytes_per_token,
                   [&](int64_t begin, int64_t end) { nfn(p, begin, end); });
    return;
  }
  const rope_cpu::ItemsFn fn = pick_variant();
  // The split (cpu_parallel.h): an item (one head of one token) reads and writes D elements (and its share of
  // the token's cache traffic).
  const int64_t H = p.Hq + p.Hk;
  parallel_items(n_items, 2 * p.D * static_cast<int64_t>(q.element_size()) + (cache_bytes_per_token + H - 1) / H,
                 [&](int64_t begin, int64_t end) { fn(p, begin, end); });
}

// posenc::rope_: q, k <- rotate(q, k), in place. Every check (rope_args.h) runs before any write.
void rope_inplace_cpu(const Tensor& q, const optional<Tensor>& k, const optional<Tensor>& cos,
                      const optional<Tensor>& sin, const optional<Tensor>& inv_freq,
                      const optional<Tensor>& positions, const optional<Tensor>& offsets, int64_t offset,
                      const optional<Tensor>& cu_seqlens, const optional<Tensor>& axis_map, double attention_factor,
                      bool interleaved, bool conjugate, bool exact) {
  const RopeShape r = check_rope(q, k, cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map,
                                 attention_factor, exact, /*inplace=*/true);
  check_rope_values(r, cos, positions, offsets, offset, cu_seqlens, axis_map, q.device());
  std::vector<int64_t> cu_rows;
  if (cu_seqlens.has_value() && r.B * r.S > 0) cu_seqlens_rows(r.S, *cu_seqlens, offsets, offset, cu_rows);
  run_rope(q, k, q, k, r, cos, sin, inv_freq, positions, offsets, offset, axis_map, cu_rows, cu_seqlens.has_value(),
           attention_factor, interleaved, conjugate, exact);
}

// posenc::rope: out of place; (q_out, k_out), k_out empty ([0]) when k is None.
std::tuple<Tensor, Tensor> rope_cpu(const Tensor& q, const optional<Tensor>& k, const optional<Tensor>& cos,
                                    const optional<Tensor>& sin, const optional<Tensor>& inv_freq,
                                    const optional<Tensor>& positions, const optional<Tensor>& offsets,
                                    int64_t offset, const optional<Tensor>& cu_seqlens,
                                    const optional<Tensor>& axis_map, double attention_factor, bool interleaved,
                                    bool conjugate, bool exact) {
  const RopeShape r = check_rope(q, k, cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map,
                                 attention_factor, exact, /*inplace=*/false);
  check_rope_values(r, cos, positions, offsets, offset, cu_seqlens, axis_map, q.device());
  std::vector<int64_t> cu_rows;
  if (cu_seqlens.has_value() && r.B * r.S > 0) cu_seqlens_rows(r.S, *cu_seqlens, offsets, offset, cu_rows);
  Tensor q_out = at::empty_like(q);
  Tensor k_out = k.has_value() ? at::empty_like(*k) : at::empty({0}, q.options());
  const optional<Tensor> ko = k.has_value() ? optional<Tensor>(k_out) : std::nullopt;
  run_rope(q, k, q_out, ko, r, cos, sin, inv_freq, positions, offsets, offset, axis_map, cu_rows,
           cu_seqlens.has_value(), attention_factor, interleaved, conjugate, exact);
  return {q_out, k_out};
}

// ---- posenc::qk_norm_rope_ / posenc::qk_norm_rope: RMSNorm then RoPE (qknorm_args.h checks first).

NormArgs norm_args(int64_t norm, const optional<Tensor>& q_weight, const optional<Tensor>& k_weight,
                   const optional<Tensor>& k, double eps, double weight_offset) {
  NormArgs a{norm, {}, eps, weight_offset};
  if (q_weight.has_value()) a.w[0] = q_weight->stride(0) == 1 ? *q_weight : q_weight->contiguous();
  if (k.has_value() && k_weight.has_value()) a.w[1] = k_weight->stride(0) == 1 ? *k_weight : k_weight->contiguous();
  return a;
}

void qk_norm_rope_inplace_cpu(const Tensor& q, const optional<Tensor>& k, const optional<Tensor>& q_weight,
                              const optional<Tensor>& k_weight, double eps, int64_t norm, double weight_offset,
                              const optional<Tensor>& cos, const optional<Tensor>& sin,
                              const optional<Tensor>& inv_freq, const optional<Tensor>& positions,
                              const optional<Tensor>& offsets, int64_t offset, const optional<Tensor>& cu_seqlens,
                              const optional<Tensor>& axis_map, double attention_factor, bool interleaved,
                              bool conjugate, bool exact) {
  const RopeShape r = check_qk_norm_rope(q, k, q_weight, k_weight, eps, norm, weight_offset, cos, sin, inv_freq,
                                         positions, offsets, offset, cu_seqlens, axis_map, attention_factor, conjugate,
                                         exact, /*inplace=*/true);
  check_rope_values(r, cos, positions, offsets, offset, cu_seqlens, axis_map, q.device());
  std::vector<int64_t> cu_rows;
  if (cu_seqlens.has_value() && r.B * r.S > 0) cu_seqlens_rows(r.S, *cu_seqlens, offsets, offset, cu_rows);
  const NormArgs na = norm_args(norm, q_weight, k_weight, k, eps, weight_offset);
  run_rope(q, k, q, k, r, cos, sin, inv_freq, positions, offsets, offset, axis_map, cu_rows, cu_seqlens.has_value(),
           attention_factor, interleaved, false, exact, &na);
}

std::tuple<Tensor, Tensor> qk_norm_rope_cpu(const Tensor& q, const optional<Tensor>& k,
                                            const optional<Tensor>& q_weight, const optional<Tensor>& k_weight,
                                            double eps, int64_t norm, double weight_offset,
                                            const optional<Tensor>& cos, const optional<Tensor>& sin,
                                            const optional<Tensor>& inv_freq, const optional<Tensor>& positions,
                                            const optional<Tensor>& offsets, int64_t offset,
                                            const optional<Tensor>& cu_seqlens, const optional<Tensor>& axis_map,
                                            double attention_factor, bool interleaved, bool conjugate, bool exact) {
  const RopeShape r = check_qk_norm_rope(q, k, q_weight, k_weight, eps, norm, weight_offset, cos, sin, inv_freq,
                                         positions, offsets, offset, cu_seqlens, axis_map, attention_factor, conjugate,
                                         exact, /*inplace=*/false);
  check_rope_values(r, cos, positions, offsets, offset, cu_seqlens, axis_map, q.device());
  std::vector<int64_t> cu_rows;
  if (cu_seqlens.has_value() && r.B * r.S > 0) cu_seqlens_rows(r.S, *cu_seqlens, offsets, offset, cu_rows);
  Tensor q_out = at::empty_like(q);
  Tensor k_out = k.has_value() ? at::empty_like(*k) : at::empty({0}, q.options());
  const optional<Tensor> ko = k.has_value() ? optional<Tensor>(k_out) : std::nullopt;
  const NormArgs na = norm_args(norm, q_weight, k_weight, k, eps, weight_offset);
  run_rope(q, k, q_out, ko, r, cos, sin, inv_freq, positions, offsets, offset, axis_map, cu_rows,
           cu_seqlens.has_value(), attention_factor, interleaved, false, exact, &na);
  return {q_out, k_out};
}

// ---- posenc::rope_and_cache_ / posenc::rope_and_cache: RoPE (or QK-norm + RoPE) and the KV-cache write in one
// pass over the tokens (cache_args.h checks first). The rotation is run_rope's (the same item kernels, so q,
// k are bit for bit rope_ / qk_norm_rope_); each k head, as stored, is copied (or quantised) into its cache
// row right after it is written, with v's head beside it.

int fp8_code(at::ScalarType t) { return t == at::kFloat8_e4m3fn ? 1 : t == at::kFloat8_e5m2 ? 2 : 0; }

// The fp32 scales of one FP8 output, as torch_impl.quantise forms them (tensor.to(float32) or
// torch.tensor(value, float32)): one value (0-d, [1], a float; per_head 0) or one per head (per_head 1).
const float* fp32_scales(const optional<Tensor>& t, const optional<double>& value, std::vector<float>& out,
                         int64_t& per_head) {
  if (t.has_value()) {  // a 0-d / [1] / [H] CPU float tensor, read in place (no ATen call): x.to(float32)
    const int64_t n = t->numel(), st = t->dim() == 0 ? 0 : t->stride(0);
    const void* base = t->const_data_ptr();
    out.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      switch (t->scalar_type()) {
        case at::kFloat: out[i] = static_cast<const float*>(base)[i * st]; break;
        case at::kDouble: out[i] = static_cast<float>(static_cast<const double*>(base)[i * st]); break;
        case at::kHalf: out[i] = static_cast<float>(static_cast<const c10::Half*>(base)[i * st]); break;
        default: out[i] = static_cast<float>(static_cast<const c10::BFloat16*>(base)[i * st]); break;
      }
    }
  } else {
    out.assign(1, static_cast<float>(value.value_or(1.0)));
  }
  per_head = out.size() > 1 ? 1 : 0;
  return out.data();
}

// Rotate q, k into q_out, k_out (or q into q8) and write the caches kc / vc (the op's tensors: the NHD view
// is taken here). Every check has run.
void run_rope_and_cache(const Tensor& q, const Tensor& k, const optional<Tensor>& v, const Tensor& q_out,
                        const Tensor& k_out, const Tensor& kc, const optional<Tensor>& vc, const optional<Tensor>& q8,
                        const CacheShape& cs, const optional<Tensor>& slot_mapping,
                        const optional<Tensor>& cache_positions, int64_t kv_layout, const optional<Tensor>& k_scale,
                        const optional<Tensor>& v_scale, const optional<Tensor>& q_scale,
                        const optional<double>& k_scale_value, const optional<double>& v_scale_value,
                        const optional<double>& q_scale_value, const optional<Tensor>& q_weight,
                        const optional<Tensor>& k_weight, double eps, int64_t norm, double weight_offset,
                        const optional<Tensor>& cos, const optional<Tensor>& sin, const optional<Tensor>& inv_freq,
                        const optional<Tensor>& positions, const optional<Tensor>& offsets, int64_t offset,
                        const optional<Tensor>& cu_seqlens, const optional<Tensor>& axis_map, double attention_factor,
                        bool interleaved, bool exact) {
  const RopeShape& r = cs.rope;
  std::vector<int64_t> cu_rows;
  if (cu_seqlens.has_value() && r.B * r.S > 0) cu_seqlens_rows(r.S, *cu_seqlens, offsets, offset, cu_rows);
  const bool packed = r.packed;
  rope_cpu::CacheParams c{};
  const Tensor& idx = cs.paged ? *slot_mapping : *cache_positions;
  c.paged = cs.paged;
  c.idx = idx.const_data_ptr();
  c.idx_code = dtype_code(idx.scalar_type());
  c.idx_len = cs.paged ? idx.size(0) : 0;
  c.idx_sb = !cs.paged && idx.dim() == 2 ? idx.stride(0) : 0;
  c.idx_ss = idx.stride(-1);
  // the NHD view's sizes and strides (cache_args.h nhd_*: no transposed view made)
  c.n0 = nhd_size(kc, kv_layout, 0);
  c.n1 = nhd_size(kc, kv_layout, 1);
  c.fp8 = fp8_code(kc.scalar_type());
  c.kc = kc.data_ptr();
  for (int d = 0; d < 3; ++d) c.kcs[d] = nhd_stride(kc, kv_layout, d);
  // [b, s, h, d] strides of a [T, H, D] (packed: b stride 0) or [B, S, H, D] tensor
  auto bshd = [packed](const Tensor& t, int64_t* st) {
    st[0] = packed ? 0 : t.stride(0);
    for (int d = 1; d < 4; ++d) st[d] = t.stride(d - (packed ? 1 : 0));
  };
  const int64_t es = static_cast<int64_t>(q.element_size()), ces = static_cast<int64_t>(kc.element_size());
  int64_t bytes = r.Hk * r.D * ces;  // per token, beyond the rotation: the k rows written
  if (v.has_value()) {
    c.vc = vc->data_ptr();
    for (int d = 0; d < 3; ++d) c.vcs[d] = nhd_stride(*vc, kv_layout, d);
    c.v = v->const_data_ptr();
    bshd(*v, c.vs);
    c.Dv = v->size(-1);
    bytes += r.Hk * c.Dv * (es + ces);
  }
  std::vector<float> ks, vs, qs;
  if (c.fp8) {
    c.k_scale = fp32_scales(k_scale, k_scale_value, ks, c.k_scale_h);
    if (v.has_value()) c.v_scale = fp32_scales(v_scale, v_scale_value, vs, c.v_scale_h);
  }
  if (q8.has_value()) {
    c.q8 = q8->data_ptr();
    c.q8_fp8 = fp8_code(q8->scalar_type());
    bshd(*q8, c.q8s);
    c.q_scale = fp32_scales(q_scale, q_scale_value, qs, c.q_scale_h);
    bytes += r.Hq * r.D * (1 - es);  // q_fp8 is written instead of q_out
  }
  const NormArgs na = norm_args(norm, q_weight, k_weight, k, eps, weight_offset);
  run_rope(q, k, q_out, k_out, r, cos, sin, inv_freq, positions, offsets, offset, axis_map, cu_rows,
           cu_seqlens.has_value(), attention_factor, interleaved, false, exact, norm == kNoNorm ? nullptr : &na, &c,
           std::max<int64_t>(bytes, 0));
}

void rope_and_cache_inplace_cpu(const Tensor& q, const Tensor& k, const optional<Tensor>& v, const Tensor& k_cache,
                                const optional<Tensor>& v_cache, const optional<Tensor>& q_fp8,
                                const optional<Tensor>& slot_mapping, const optional<Tensor>& cache_positions,
                                int64_t kv_layout, const optional<Tensor>& k_scale, const optional<Tensor>& v_scale,
                                const optional<Tensor>& q_scale, optional<double> k_scale_value,
                                optional<double> v_scale_value, optional<double> q_scale_value,
                                const optional<Tensor>& q_weight, const optional<Tensor>& k_weight, double eps,
                                int64_t norm, double weight_offset, const optional<Tensor>& cos,
                                const optional<Tensor>& sin, const optional<Tensor>& inv_freq,
                                const optional<Tensor>& positions, const optional<Tensor>& offsets, int64_t offset,
                                const optional<Tensor>& cu_seqlens, const optional<Tensor>& axis_map,
                                double attention_factor, bool interleaved, bool conjugate, bool exact) {
  const CacheShape cs = check_rope_and_cache(
      q, k, v, k_cache, v_cache, q_fp8, slot_mapping, cache_positions, kv_layout, k_scale, v_scale, q_scale,
      k_scale_value, v_scale_value, q_scale_value, q_weight, k_weight, eps, norm, weight_offset, cos, sin, inv_freq,
      positions, offsets, offset, cu_seqlens, axis_map, attention_factor, conjugate, exact, /*inplace=*/true);
  run_rope_and_cache(q, k, v, q, k, k_cache, v_cache, q_fp8, cs, slot_mapping, cache_positions, kv_layout, k_scale,
                     v_scale, q_scale, k_scale_value, v_scale_value, q_scale_value, q_weight, k_weight, eps, norm,
                     weight_offset, cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map,
                     attention_factor, interleaved, exact);
}

// Out of place: (q, k, k_cache, v_cache, q_fp8) new, as op.py _body: the caches (and q_fp8) start as copies of
// the old; with q_fp8, q's output is q itself (the rotated q goes to q_fp8). Absent ones: empty ([0], q's dtype).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rope_and_cache_cpu(
    const Tensor& q, const Tensor& k, const optional<Tensor>& v, const Tensor& k_cache, const optional<Tensor>& v_cache,
    const optional<Tensor>& q_fp8, const optional<Tensor>& slot_mapping, const optional<Tensor>& cache_positions,
    int64_t kv_layout, const optional<Tensor>& k_scale, const optional<Tensor>& v_scale,
    const optional<Tensor>& q_scale, optional<double> k_scale_value, optional<double> v_scale_value,
    optional<double> q_scale_value, const optional<Tensor>& q_weight, const optional<Tensor>& k_weight, double eps,
    int64_t norm, double weight_offset, const optional<Tensor>& cos, const optional<Tensor>& sin,
    const optional<Tensor>& inv_freq, const optional<Tensor>& positions, const optional<Tensor>& offsets,
    int64_t offset, const optional<Tensor>& cu_seqlens, const optional<Tensor>& axis_map, double attention_factor,
    bool interleaved, bool conjugate, bool exact) {
  const CacheShape cs = check_rope_and_cache(
      q, k, v, k_cache, v_cache, q_fp8, slot_mapping, cache_positions, kv_layout, k_scale, v_scale, q_scale,
      k_scale_value, v_scale_value, q_scale_value, q_weight, k_weight, eps, norm, weight_offset, cos, sin, inv_freq,
      positions, offsets, offset, cu_seqlens, axis_map, attention_factor, conjugate, exact, /*inplace=*/false);
  Tensor q_o = at::empty_like(q), k_o = at::empty_like(k), kc_o = at::empty_like(k_cache);
  Tensor vc_o = v.has_value() ? at::empty_like(*v_cache) : at::empty({0}, q.options());
  Tensor qf_o = q_fp8.has_value() ? at::empty_like(*q_fp8) : at::empty({0}, q.options());
  kc_o.copy_(k_cache);
  if (v.has_value()) vc_o.copy_(*v_cache);
  if (q_fp8.has_value()) {
    qf_o.copy_(*q_fp8);
    q_o.copy_(q);
  }
  const optional<Tensor> vc = v.has_value() ? optional<Tensor>(vc_o) : std::nullopt;
  const optional<Tensor> q8 = q_fp8.has_value() ? optional<Tensor>(qf_o) : std::nullopt;
  run_rope_and_cache(q, k, v, q_o, k_o, kc_o, vc, q8, cs, slot_mapping, cache_positions, kv_layout, k_scale, v_scale,
                     q_scale, k_scale_value, v_scale_value, q_scale_value, q_weight, k_weight, eps, norm,
                     weight_offset, cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map,
                     attention_factor, interleaved, exact);
  return {q_o, k_o, kc_o, vc_o, qf_o};
}

const AddNative<ops::RopeAndCacheInplace> add_rope_and_cache_inplace(kNativeCPU, &rope_and_cache_inplace_cpu);
const AddNative<ops::RopeAndCache> add_rope_and_cache(kNativeCPU, &rope_and_cache_cpu);

const AddNative<ops::QkNormRopeInplace> add_qk_norm_rope_inplace(kNativeCPU, &qk_norm_rope_inplace_cpu);
const AddNative<ops::QkNormRope> add_qk_norm_rope(kNativeCPU, &qk_norm_rope_cpu);
const AddNative<ops::RopeInplace> add_rope_inplace(kNativeCPU, &rope_inplace_cpu);
const AddNative<ops::Rope> add_rope(kNativeCPU, &rope_cpu);

}  // namespace
}  // namespace posenc
