// posenc::add_position_embedding_ / posenc::add_position_embedding on CPU: out = x + table[positions].
//
// x [B, S, D] (or [T, D] as [1, T, D]), positions [B, S] or [S] (any integer dtype), table [P, D] of any
// float dtype (it may differ from x's). Per token: gather the table row and add, in fp32 (fp64 when x or
// the table is fp64), one rounding on store - torch.add(x, table[rows], out=...)'s numerics. Parallel over
// tokens (at::parallel_for, with a grain that runs decode inline). A row outside [0, P) (value checks off)
// gives NaN, never an out-of-bounds read. padding_idx and deterministic matter only to the backward.
// No ISA variants: the unit-stride loop is a plain convert-add-convert the compiler vectorises at the
// baseline width, and the op is memory bound.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "alias_checks.h"
#include "native_ops.h"

namespace posenc {
namespace {

using at::Tensor;
using std::optional;

struct LearnedParams {
  int64_t B, S, D;
  const void* x;
  void* out;
  int64_t xsb, xss, xsd, osb, oss, osd;
  const void* table;
  int64_t trs, tcs, P;
  RowSource rows;
};

template <typename x_t, typename t_t, typename acc_t>
void add_tokens(const LearnedParams& p, int64_t begin, int64_t end) {
  const x_t* xb = static_cast<const x_t*>(p.x);
  x_t* ob = static_cast<x_t*>(p.out);
  const t_t* tb = static_cast<const t_t*>(p.table);
  const int64_t D = p.D;
  const bool unit = p.xsd == 1 && p.osd == 1 && p.tcs == 1;
  for (int64_t tok = begin; tok < end; ++tok) {
    const int64_t b = tok / p.S, s = tok - b * p.S;
    const int64_t row = token_row(p.rows, b, s);
    const x_t* x = xb + b * p.xsb + s * p.xss;
    x_t* o = ob + b * p.osb + s * p.oss;
    if (row < 0 || row >= p.P) {
      const x_t nan = static_cast<x_t>(std::numeric_limits<float>::quiet_NaN());
      for (int64_t d = 0; d < D; ++d) o[d * p.osd] = nan;
      continue;
    }
    const t_t* t = tb + row * p.trs;
    if (unit) {
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<x_t>(static_cast<acc_t>(x[d]) + static_cast<acc_t>(t[d]));
    } else {
      for (int64_t d = 0; d < D; ++d) {
        o[d * p.osd] = static_cast<x_t>(static_cast<acc_t>(x[d * p.xsd]) + static_cast<acc_t>(t[d * p.tcs]));
      }
    }
  }
}

using AddFn = void (*)(const LearnedParams&, int64_t, int64_t);

template <typename x_t>
AddFn pick_table(at::ScalarType t) {
  constexpr bool xd = std::is_same<x_t, double>::value;
  switch (t) {
    case at::kFloat: return xd ? &add_tokens<x_t, float, double> : &add_tokens<x_t, float, float>;
    case at::kDouble: return &add_tokens<x_t, double, double>;
    case at::kHalf: return xd ? &add_tokens<x_t, c10::Half, double> : &add_tokens<x_t, c10::Half, float>;
    default: return xd ? &add_tokens<x_t, c10::BFloat16, double> : &add_tokens<x_t, c10::BFloat16, float>;
  }
}

AddFn pick(at::ScalarType x, at::ScalarType t) {
  switch (x) {
    case at::kFloat: return pick_table<float>(t);
    case at::kDouble: return pick_table<double>(t);
    case at::kHalf: return pick_table<c10::Half>(t);
    default: return pick_table<c10::BFloat16>(t);
  }
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Checks of both ops (memory safety, padding_idx, value checks), before anything is written.
void check_learned(const Tensor& x, const Tensor& table, const Tensor& positions, optional<int64_t> padding_idx,
                   const char* op, LearnedParams& p) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, op, ": x must be [B, S, D] or [T, D], got shape ", x.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(x.scalar_type()), op, ": x must be float16/bfloat16/float32/float64, got ",
                   x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), op, " (CPU kernel): x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(table.dim() == 2 && table.size(1) == x.size(-1), op, ": table must be [P, D] with D = x.shape[-1] = ",
              x.size(-1), ", got shape ", table.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(table.scalar_type()), op, ": table must be a floating tensor, got ",
                   table.scalar_type());
  TORCH_CHECK(table.device().is_cpu(), op, " (CPU kernel): table must be a CPU tensor, got ", table.device());
  const bool packed = x.dim() == 2;
  p.B = packed ? 1 : x.size(0);
  p.S = packed ? x.size(0) : x.size(1);
  p.D = x.size(-1);
  p.P = table.size(0);
  TORCH_CHECK_TYPE(index_code(positions.scalar_type(), p.rows.code), op,
                   ": positions must be an integer tensor, got dtype ", positions.scalar_type());
  const bool ok = (positions.dim() == 1 && positions.size(0) == p.S) ||
                  (positions.dim() == 2 && positions.size(0) == p.B && positions.size(1) == p.S);
  TORCH_CHECK(ok, op, ": positions must be [S] = [", p.S, "] or [B, S] = [", p.B, ", ", p.S, "], got ",
              positions.sizes());
  TORCH_CHECK(positions.device().is_cpu(), op, " (CPU kernel): positions must be a CPU tensor, got ",
              positions.device());
  if (padding_idx.has_value()) {
    const int64_t pi = *padding_idx;
    TORCH_CHECK_VALUE(-p.P <= pi && pi < p.P, "padding_idx must lie in [-", p.P, ", ", p.P,
                      ") (the table's rows), got ", pi);
  }
  if (p.B * p.S > 0 && value_checks_enabled()) {
    int64_t lo = 0, hi = 0;
    if (index_min_max(positions, lo, hi)) {
      TORCH_CHECK_VALUE(lo >= 0 && hi < p.P, "positions must lie in [0, ", p.P,
                        ") (the table's rows), got values in [", lo, ", ", hi, "]");
    }
  }
  p.rows.mode = kPosPositions;
  p.rows.ptr = positions.const_data_ptr();
  p.rows.sb = positions.dim() == 2 ? positions.stride(0) : 0;
  p.rows.ss = positions.stride(-1);
  p.table = table.const_data_ptr();
  p.trs = table.stride(0);
  p.tcs = table.stride(1);
  p.x = x.const_data_ptr();
  p.xsb = packed ? 0 : x.stride(0);
  p.xss = x.stride(-2);
  p.xsd = x.stride(-1);
}

void run_learned(LearnedParams& p, const Tensor& x, const Tensor& out, const Tensor& table) {
  p.out = out.data_ptr();
  const bool packed = out.dim() == 2;
  p.osb = packed ? 0 : out.stride(0);
  p.oss = out.stride(-2);
  p.osd = out.stride(-1);
  const int64_t n = p.B * p.S;
  if (n == 0 || p.D == 0) return;
  const AddFn fn = pick(x.scalar_type(), table.scalar_type());
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(p.D, 1));
  if (n <= grain) {
    fn(p, 0, n);
  } else {
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
  }
}

void add_position_embedding_inplace_cpu(const Tensor& x, const Tensor& table, const Tensor& positions,
                                        optional<int64_t> padding_idx) {
  LearnedParams p{};
  check_learned(x, table, positions, padding_idx, "add_position_embedding_", p);
  TORCH_CHECK(!x.is_inference() || c10::InferenceMode::is_enabled(),
              "Inplace update to inference tensor outside InferenceMode is not allowed. You can make a clone to get "
              "a normal tensor before doing inplace update. (add_position_embedding_: x is an inference tensor)");
  posenc_alias::check_no_internal_overlap(x, "x");
  TORCH_CHECK_VALUE(!posenc_alias::shares_memory(x, table),
                    "table must not overlap x: x is written in place while the table is read");
  run_learned(p, x, x, table);
}

Tensor add_position_embedding_cpu(const Tensor& x, const Tensor& table, const Tensor& positions,
                                  optional<int64_t> padding_idx, bool deterministic) {
  (void)deterministic;  // the table-gradient path of the backward; the forward is the same
  LearnedParams p{};
  check_learned(x, table, positions, padding_idx, "add_position_embedding", p);
  Tensor out = at::empty_like(x);
  run_learned(p, x, out, table);
  return out;
}

void register_learned_cpu(torch::Library& m) {
  m.impl("add_position_embedding_", TORCH_FN(add_position_embedding_inplace_cpu));
  m.impl("add_position_embedding", TORCH_FN(add_position_embedding_cpu));
}

const AddKernelSet add_learned_cpu("CPU", {"add_position_embedding_", "add_position_embedding"},
                                   &register_learned_cpu);

}  // namespace
}  // namespace posenc
