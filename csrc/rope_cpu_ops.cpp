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
// loop (baseline flags only). Registered for CPU by posenc::_native_register("CPU", true) (bindings.cpp).
// =================================================================================================
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include "alias_checks.h"
#include "native_ops.h"


namespace posenc {
namespace {

using at::Tensor;
using std::optional;

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

int index_type(const Tensor& t, const char* name) {
  int code = kI64;
  TORCH_CHECK_TYPE(index_code(t.scalar_type(), code), "rope: ", name, " must be an integer tensor, got dtype ",
                   t.scalar_type());
  return code;
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    default: return 3;
  }
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "rope (CPU kernel): ", name, " must be a CPU tensor, got ", t.device());
}

// Shapes, dtypes and devices (memory safety) and arguments the chosen mode would ignore. Returns R/2.
int64_t check_rope_args(const Tensor& q, const optional<Tensor>& k, const optional<Tensor>& cos,
                        const optional<Tensor>& sin, const optional<Tensor>& inv_freq,
                        const optional<Tensor>& positions, const optional<Tensor>& offsets, int64_t offset,
                        const optional<Tensor>& cu_seqlens, const optional<Tensor>& axis_map,
                        double attention_factor, bool exact) {
  TORCH_CHECK(q.dim() == 4 || q.dim() == 3, "rope: q must be [B, S, Hq, D] or packed [T, Hq, D], got shape ",
              q.sizes());
  TORCH_CHECK_TYPE(is_float(q.scalar_type()), "rope: q must be float16/bfloat16/float32/float64, got ",
                   q.scalar_type());
  check_cpu(q, "q");
  const bool packed = q.dim() == 3;
  const int64_t B = packed ? 1 : q.size(0), S = packed ? q.size(0) : q.size(1), D = q.size(-1);
  if (k.has_value()) {
    const bool ok = k->dim() == q.dim() && (packed ? k->size(0) == S && k->size(2) == D
                                                   : k->size(0) == B && k->size(1) == S && k->size(3) == D);
    TORCH_CHECK(ok, "rope: k must be ", packed ? "[T, Hk, D]" : "[B, S, Hk, D]", " matching q ", q.sizes(),
                ", got ", k->sizes());
    TORCH_CHECK_TYPE(k->scalar_type() == q.scalar_type(), "rope: k must have q's dtype ", q.scalar_type(),
                     ", got ", k->scalar_type());
    check_cpu(*k, "k");
  }
  int64_t half = 0;
  TORCH_CHECK(cos.has_value() == sin.has_value(), "rope: pass cos and sin together (or neither)");
  TORCH_CHECK(cos.has_value() != inv_freq.has_value(),
              "rope: pass either cos/sin tables or inv_freq (exactly one angle source)");
  if (cos.has_value()) {
    for (const Tensor* t : {&*cos, &*sin}) {
      const char* name = t == &*cos ? "cos" : "sin";
      TORCH_CHECK(t->dim() == 2, "rope: ", name, " must be [P, R/2], got shape ", t->sizes());
      TORCH_CHECK_TYPE(is_float(t->scalar_type()), "rope: ", name, " must be a floating tensor, got ",
                       t->scalar_type());
      check_cpu(*t, name);
    }
    TORCH_CHECK(cos->sizes() == sin->sizes(), "rope: cos and sin must have the same shape, got ", cos->sizes(),
                " and ", sin->sizes());
    TORCH_CHECK_TYPE(cos->scalar_type() == sin->scalar_type(), "rope: cos and sin must have the same dtype");
    TORCH_CHECK(attention_factor == 1.0 && !exact,
                "rope: attention_factor and exact apply to on-the-fly angles (inv_freq); tables carry the factor "
                "already (got attention_factor=", attention_factor, ", exact=", exact, ")");
    half = cos->size(1);
  } else {
    TORCH_CHECK(inv_freq->dim() == 1, "rope: inv_freq must be [R/2], got shape ", inv_freq->sizes());
    TORCH_CHECK_TYPE(is_float(inv_freq->scalar_type()), "rope: inv_freq must be a floating tensor, got ",
                     inv_freq->scalar_type());
    TORCH_CHECK_TYPE(!exact || inv_freq->scalar_type() == at::kDouble,
                     "rope: exact=True needs float64 inv_freq, got ", inv_freq->scalar_type());
    check_cpu(*inv_freq, "inv_freq");
    TORCH_CHECK_VALUE(std::isfinite(attention_factor), "rope: attention_factor must be finite, got ",
                      attention_factor);
    half = inv_freq->size(0);
  }
  TORCH_CHECK(half >= 1, "rope: the rotary dim R = 2 * cos.size(-1) (or 2 * inv_freq.size(0)) must be >= 2, got "
              "R/2 = ", half);
  TORCH_CHECK(2 * half <= D, "rope: rotary dim R = ", 2 * half, " exceeds head_dim D = ", D);
  TORCH_CHECK(!(positions.has_value() && offsets.has_value()), "rope: pass positions or offsets, not both");
  TORCH_CHECK(!(positions.has_value() || offsets.has_value()) || offset == 0,
              "rope: offset must be 0 when a positions or offsets tensor is given, got ", offset);
  if (cu_seqlens.has_value()) {
    TORCH_CHECK(packed, "rope: cu_seqlens needs packed q/k [T, H, D], got q of shape ", q.sizes());
    TORCH_CHECK(!positions.has_value(), "rope: pass positions or cu_seqlens, not both");
    TORCH_CHECK(!axis_map.has_value(), "rope: axis_map cannot be combined with cu_seqlens");
    index_type(*cu_seqlens, "cu_seqlens");
    TORCH_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->size(0) >= 2,
                "rope: cu_seqlens must be [N + 1] with N >= 1 sequences, got shape ", cu_seqlens->sizes());
    check_cpu(*cu_seqlens, "cu_seqlens");
    if (offsets.has_value()) {
      index_type(*offsets, "offsets");
      TORCH_CHECK(offsets->dim() == 1 && offsets->size(0) == cu_seqlens->size(0) - 1,
                  "rope: offsets must be [N] = [", cu_seqlens->size(0) - 1, "] (one per sequence), got shape ",
                  offsets->sizes());
      check_cpu(*offsets, "offsets");
    }
    return half;
  }
  if (axis_map.has_value()) {
    TORCH_CHECK(positions.has_value(), "rope: axis_map needs positions [A, B, S] or [A, S]");
    index_type(*axis_map, "axis_map");
    TORCH_CHECK(axis_map->dim() == 1 && axis_map->size(0) == half, "rope: axis_map must be [R/2] = [", half,
                "], got shape ", axis_map->sizes());
    check_cpu(*axis_map, "axis_map");
    const Tensor& p = *positions;
    index_type(p, "positions");
    const bool ok = p.dim() >= 2 && p.size(0) >= 1 &&
                    ((p.dim() == 2 && p.size(1) == S) || (p.dim() == 3 && p.size(1) == B && p.size(2) == S));
    TORCH_CHECK(ok, "rope: with axis_map, positions must be [A, S] = [A, ", S, "] or [A, B, S] = [A, ", B, ", ",
                S, "], got ", p.sizes());
    check_cpu(p, "positions");
  } else if (positions.has_value()) {
    const Tensor& p = *positions;
    index_type(p, "positions");
    const bool ok = (p.dim() == 1 && p.size(0) == S) || (p.dim() == 2 && p.size(0) == B && p.size(1) == S);
    TORCH_CHECK(ok, "rope: positions must be [S] = [", S, "] or [B, S] = [", B, ", ", S, "], got ", p.sizes());
    check_cpu(p, "positions");
  }
  if (offsets.has_value()) {
    index_type(*offsets, "offsets");
    TORCH_CHECK(offsets->dim() == 1 && offsets->size(0) == B, "rope: offsets must be [B] = [", B, "], got ",
                offsets->sizes());
    check_cpu(*offsets, "offsets");
  }
  return half;
}

// The checks that read values (Python's messages, so eager and compiled code raise alike), before any write.
// cu_seqlens: also builds the per-token positions (rows), O(T) int64.
void check_values_and_rows(int64_t S, const optional<Tensor>& cos, const optional<Tensor>& positions,
                           const optional<Tensor>& offsets, int64_t offset, const optional<Tensor>& cu_seqlens,
                           const optional<Tensor>& axis_map, std::vector<int64_t>& cu_rows) {
  const bool checks = value_checks_enabled();
  const int64_t P = cos.has_value() ? cos->size(0) : 0;
  if (cu_seqlens.has_value()) {
    const Tensor& cu = *cu_seqlens;
    const int cc = index_type(cu, "cu_seqlens");
    const int64_t N = cu.size(0) - 1, cst = cu.stride(0);
    const void* cp = cu.const_data_ptr();
    int oc = kI64;
    const void* op = nullptr;
    int64_t ost = 0;
    if (offsets.has_value()) {
      oc = index_type(*offsets, "offsets");
      op = offsets->const_data_ptr();
      ost = offsets->stride(0);
    }
    auto start = [&](int64_t n) { return op ? load_index(op, oc, n * ost) : offset; };
    if (checks) {
      const int64_t first = load_index(cp, cc, 0), last = load_index(cp, cc, N * cst);
      bool decreasing = false;
      int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
      for (int64_t n = 0; n < N; ++n) {
        const int64_t len = load_index(cp, cc, (n + 1) * cst) - load_index(cp, cc, n * cst);
        decreasing |= len < 0;
        if (len > 0) {
          lo = std::min(lo, start(n));
          hi = std::max(hi, start(n) + len - 1);
        }
      }
      TORCH_CHECK_VALUE(first == 0 && !decreasing, "cu_seqlens must start at 0 and never decrease, got ",
                        format_list(cu, 16));
      TORCH_CHECK_VALUE(last <= S, "cu_seqlens[-1] = ", last, " exceeds the ", S, " packed tokens of q");
      if (cos.has_value()) {
        TORCH_CHECK_VALUE(!(lo <= hi && (lo < 0 || hi >= P)), "offsets + positions within each sequence must lie in "
                          "[0, ", P, ") (the table's rows), got rows in [", lo, ", ", hi, "]");
        TORCH_CHECK_VALUE(!(last < S && P < 1),
                          "padded tokens past cu_seqlens[-1] use table row 0, but the table is empty");
      }
    }
    // Per-token positions by a linear walk (robust to unchecked values: never an out-of-bounds read; rows
    // outside the table become NaN in the kernel). Tokens past cu_seqlens[-1] take position 0.
    cu_rows.resize(S);
    int64_t n = 0;
    int64_t next = load_index(cp, cc, cst), cur = load_index(cp, cc, 0);
    for (int64_t t = 0; t < S; ++t) {
      while (n < N && t >= next) {
        ++n;
        cur = next;
        if (n < N) next = load_index(cp, cc, (n + 1) * cst);
      }
      cu_rows[t] = n < N ? t - cur + start(n) : 0;
    }
    return;
  }
  if (axis_map.has_value() && checks) {
    int64_t lo = 0, hi = 0;
    const int64_t A = positions->size(0);
    if (index_min_max(*axis_map, lo, hi)) {
      TORCH_CHECK_VALUE(lo >= 0 && hi < A, "axis_map values must lie in [0, ", A, ") (positions' axes), got [", lo,
                        ", ", hi, "]");
    }
  }
  if (!cos.has_value() || S == 0) return;
  if (!positions.has_value() && !offsets.has_value()) {
    TORCH_CHECK_VALUE(offset >= 0 && offset + S <= P, "offsets=", offset, " with seqlen ", S, " needs table rows [",
                      offset, ", ", offset + S, "), but the cos/sin table has ", P, " rows");
    return;
  }
  if (!checks) return;
  int64_t lo = 0, hi = 0;
  if (positions.has_value()) {
    if (index_min_max(*positions, lo, hi)) {
      TORCH_CHECK_VALUE(lo >= 0 && hi < P, "positions must lie in [0, ", P, ") (the table's rows), got values in [",
                        lo, ", ", hi, "]");
    }
  } else if (index_min_max(*offsets, lo, hi)) {
    TORCH_CHECK_VALUE(lo >= 0 && hi + S <= P, "offsets + seqlen must stay within the table's ", P,
                      " rows: offsets lie in [", lo, ", ", hi, "] and seqlen is ", S);
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

constexpr int64_t kSmall = 512;  // inv_freq / axis_map entries converted on the stack up to this many

// Rotate q (and k) into q_out (k_out), which are q (k) themselves (in place) or fresh tensors. Every check
// has run when this is called except aliasing (in place only: done here) .
void run_rope(const Tensor& q, const optional<Tensor>& k, const Tensor& q_out, const optional<Tensor>& k_out,
              int64_t half, const optional<Tensor>& cos, const optional<Tensor>& sin,
              const optional<Tensor>& inv_freq, const optional<Tensor>& positions, const optional<Tensor>& offsets,
              int64_t offset, const optional<Tensor>& axis_map, std::vector<int64_t>& cu_rows, bool has_cu,
              double attention_factor, bool interleaved, bool conjugate, bool exact) {
  rope_cpu::Params p{};
  const bool packed = q.dim() == 3;
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
    p.rows.code = kI64;
    p.rows.ptr = cu_rows.data();
    p.rows.sb = 0;
    p.rows.ss = 1;
  } else if (positions.has_value()) {
    const Tensor& t = *positions;
    p.rows.mode = kPosPositions;
    index_code(t.scalar_type(), p.rows.code);
    p.rows.ptr = t.const_data_ptr();
    if (axis_map.has_value()) {
      p.psa = t.stride(0);
      p.rows.sb = t.dim() == 3 ? t.stride(1) : 0;
    } else {
      p.rows.sb = t.dim() == 2 ? t.stride(0) : 0;
    }
    p.rows.ss = t.stride(-1);
  } else if (offsets.has_value()) {
    p.rows.mode = kPosOffsets;
    index_code(offsets->scalar_type(), p.rows.code);
    p.rows.ptr = offsets->const_data_ptr();
    p.rows.sb = offsets->stride(0);
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
    int code = kI64;
    index_code(axis_map->scalar_type(), code);
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
    p.cos_rs = cos->stride(0);
    p.sin_rs = sin->stride(0);
    p.cos_cs = cos->stride(1);
    p.sin_cs = sin->stride(1);
    p.n_rows = cos->size(0);
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
  const rope_cpu::ItemsFn fn = pick_variant();
  // Grain: about 32K channels of work per task, so a decode token (a few heads) runs inline.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(p.D, 1));
  if (n_items <= grain) {
    fn(p, 0, n_items);
  } else {
    at::parallel_for(0, n_items, grain, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
  }
}

void check_inplace_writable(const Tensor& t, const char* name) {
  TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(),
              "Inplace update to inference tensor outside InferenceMode is not allowed. You can make a clone to get "
              "a normal tensor before doing inplace update. (rope_: ", name, " is an inference tensor)");
}

// posenc::rope_: q, k <- rotate(q, k), in place.
void rope_inplace_cpu(const Tensor& q, const optional<Tensor>& k, const optional<Tensor>& cos,
                      const optional<Tensor>& sin, const optional<Tensor>& inv_freq,
                      const optional<Tensor>& positions, const optional<Tensor>& offsets, int64_t offset,
                      const optional<Tensor>& cu_seqlens, const optional<Tensor>& axis_map, double attention_factor,
                      bool interleaved, bool conjugate, bool exact) {
  const int64_t half = check_rope_args(q, k, cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map,
                                       attention_factor, exact);
  check_inplace_writable(q, "q");
  if (k.has_value()) check_inplace_writable(*k, "k");
  posenc_alias::check_rope_outputs(q, k, q, k);  // no internal overlap, q and k disjoint
  const int64_t S = q.dim() == 3 ? q.size(0) : q.size(1);
  const int64_t B = q.dim() == 3 ? 1 : q.size(0);
  std::vector<int64_t> cu_rows;
  if (B * S > 0) check_values_and_rows(S, cos, positions, offsets, offset, cu_seqlens, axis_map, cu_rows);
  run_rope(q, k, q, k, half, cos, sin, inv_freq, positions, offsets, offset, axis_map, cu_rows,
           cu_seqlens.has_value(), attention_factor, interleaved, conjugate, exact);
}

// posenc::rope: out of place; (q_out, k_out), k_out empty ([0]) when k is None.
std::tuple<Tensor, Tensor> rope_cpu(const Tensor& q, const optional<Tensor>& k, const optional<Tensor>& cos,
                                    const optional<Tensor>& sin, const optional<Tensor>& inv_freq,
                                    const optional<Tensor>& positions, const optional<Tensor>& offsets,
                                    int64_t offset, const optional<Tensor>& cu_seqlens,
                                    const optional<Tensor>& axis_map, double attention_factor, bool interleaved,
                                    bool conjugate, bool exact) {
  const int64_t half = check_rope_args(q, k, cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map,
                                       attention_factor, exact);
  const int64_t S = q.dim() == 3 ? q.size(0) : q.size(1);
  const int64_t B = q.dim() == 3 ? 1 : q.size(0);
  std::vector<int64_t> cu_rows;
  if (B * S > 0) check_values_and_rows(S, cos, positions, offsets, offset, cu_seqlens, axis_map, cu_rows);
  Tensor q_out = at::empty_like(q);
  Tensor k_out = k.has_value() ? at::empty_like(*k) : at::empty({0}, q.options());
  const optional<Tensor> ko = k.has_value() ? optional<Tensor>(k_out) : std::nullopt;
  run_rope(q, k, q_out, ko, half, cos, sin, inv_freq, positions, offsets, offset, axis_map, cu_rows,
           cu_seqlens.has_value(), attention_factor, interleaved, conjugate, exact);
  return {q_out, k_out};
}

void register_rope_cpu(torch::Library& m) {
  m.impl("rope_", TORCH_FN(rope_inplace_cpu));
  m.impl("rope", TORCH_FN(rope_cpu));
}

const AddKernelSet add_rope_cpu("CPU", {"rope_", "rope"}, &register_rope_cpu);

}  // namespace
}  // namespace posenc
