// posenc::add_position_embedding_ / posenc::add_position_embedding on CPU: out = x + table[positions].
//
// x [B, S, D] (or [T, D] as [1, T, D]), positions [B, S] or [S] (any integer dtype), table [P, D] of any
// float dtype (it may differ from x's). Per token: gather the table row and add, in fp32 (fp64 when x or
// the table is fp64), one rounding on store - torch.add(x, table[rows], out=...)'s numerics. Parallel over
// tokens (cpu_parallel.h: the grain from the bytes moved, so small calls run inline). A row outside [0, P)
// (value checks off) gives NaN, never an out-of-bounds read. padding_idx and deterministic matter only to
// the backward.
// No ISA variants: the unit-stride loop is a plain convert-add-convert the compiler vectorises at the
// baseline width, and the op is memory bound.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "alias_checks.h"
#include "cpu_parallel.h"
#include "native_ops.h"
#include "py_checks.h"

namespace posenc {
namespace {

using at::Tensor;
using std::optional;

struct LearnedParams {
  int64_t B, S, D;
  const void* x;
  void* out;
  int64_t stride_x_b, stride_x_s, stride_x_d, stride_o_b, stride_o_s, stride_o_d;
  const void* table;
  int64_t stride_t_p, stride_t_d, P;
  RowSource rows;
};

template <typename x_t, typename t_t, typename acc_t>
void add_tokens(const LearnedParams& p, int64_t begin, int64_t end) {
  const x_t* xb = static_cast<const x_t*>(p.x);
  x_t* ob = static_cast<x_t*>(p.out);
  const t_t* tb = static_cast<const t_t*>(p.table);
  const int64_t D = p.D;
  const bool unit = p.stride_x_d == 1 && p.stride_o_d == 1 && p.stride_t_d == 1;
  for (int64_t tok = begin; tok < end; ++tok) {
    const int64_t b = tok / p.S, s = tok - b * p.S;
    const int64_t row = token_row(p.rows, b, s);
    const x_t* x = xb + b * p.stride_x_b + s * p.stride_x_s;
    x_t* o = ob + b * p.stride_o_b + s * p.stride_o_s;
    if (row < 0 || row >= p.P) {
      const x_t nan = static_cast<x_t>(std::numeric_limits<float>::quiet_NaN());
      for (int64_t d = 0; d < D; ++d) o[d * p.stride_o_d] = nan;
      continue;
    }
    const t_t* t = tb + row * p.stride_t_p;
    if (unit) {
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<x_t>(static_cast<acc_t>(x[d]) + static_cast<acc_t>(t[d]));
    } else {
      for (int64_t d = 0; d < D; ++d) {
        o[d * p.stride_o_d] = static_cast<x_t>(static_cast<acc_t>(x[d * p.stride_x_d]) + static_cast<acc_t>(t[d * p.stride_t_d]));
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

// learned/op.py check_add (values=True) - every check of both ops, Python's order and messages
// (py_checks.h), before anything is written - and the parameters they decide.
void check_learned(const Tensor& x, const Tensor& table, const Tensor& positions, optional<int64_t> padding_idx,
                   bool inplace, LearnedParams& p) {
  check_tensor("x", x, Dtypes::kFloat, {2, 3}, nullptr);
  const c10::Device dev = x.device();
  check_tensor("table", table, Dtypes::kFloat, {2}, &dev);
  TORCH_CHECK_VALUE(table.size(1) == x.size(-1), "table must be [P, D] with D = x.shape[-1] = ", x.size(-1),
                    ", got shape ", py_shape(table.sizes()));
  const bool packed = x.dim() == 2;
  p.B = packed ? 1 : x.size(0);
  p.S = packed ? x.size(0) : x.size(1);
  p.D = x.size(-1);
  p.P = table.size(0);
  check_position_args(positions, std::nullopt, 0, p.B, p.S, dev);
  if (padding_idx.has_value()) {
    const int64_t pi = *padding_idx;
    TORCH_CHECK_VALUE(-p.P <= pi && pi < p.P, "padding_idx must lie in [-", p.P, ", ", p.P,
                      ") (the table's rows), got ", pi);
  }
  if (inplace) {
    check_writable("x", x);
    TORCH_CHECK_VALUE(disjoint_error("x", x, "table", table).empty(),
                      "table must not overlap x: x is written in place while the table is read");
  }
  if (p.B * p.S > 0) check_position_values(positions, std::nullopt, 0, p.S, p.P, dev);
  p.rows.code = dtype_code(positions.scalar_type());
  p.rows.mode = kPosPositions;
  p.rows.ptr = positions.const_data_ptr();
  p.rows.stride_pos_b = positions.dim() == 2 ? positions.stride(0) : 0;
  p.rows.stride_pos_s = positions.stride(-1);
  p.table = table.const_data_ptr();
  p.stride_t_p = table.stride(0);
  p.stride_t_d = table.stride(1);
  p.x = x.const_data_ptr();
  p.stride_x_b = packed ? 0 : x.stride(0);
  p.stride_x_s = x.stride(-2);
  p.stride_x_d = x.stride(-1);
}

void run_learned(LearnedParams& p, const Tensor& x, const Tensor& out, const Tensor& table) {
  p.out = out.data_ptr();
  const bool packed = out.dim() == 2;
  p.stride_o_b = packed ? 0 : out.stride(0);
  p.stride_o_s = out.stride(-2);
  p.stride_o_d = out.stride(-1);
  const int64_t n = p.B * p.S;
  if (n == 0 || p.D == 0) return;
  const AddFn fn = pick(x.scalar_type(), table.scalar_type());
  // The split (cpu_parallel.h): a token reads D elements of x and of its table row, and writes D.
  const int64_t row_bytes = p.D * static_cast<int64_t>(2 * x.element_size() + table.element_size());
  parallel_items(n, row_bytes, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
}

void add_position_embedding_inplace_cpu(const Tensor& x, const Tensor& table, const Tensor& positions,
                                        optional<int64_t> padding_idx) {
  LearnedParams p{};
  check_learned(x, table, positions, padding_idx, /*inplace=*/true, p);
  run_learned(p, x, x, table);
}

Tensor add_position_embedding_cpu(const Tensor& x, const Tensor& table, const Tensor& positions,
                                  optional<int64_t> padding_idx, bool deterministic) {
  (void)deterministic;  // the table-gradient path of the backward; the forward is the same
  LearnedParams p{};
  check_learned(x, table, positions, padding_idx, /*inplace=*/false, p);
  Tensor out = at::empty_like(x);
  run_learned(p, x, out, table);
  return out;
}

const AddNative<ops::AddPositionEmbeddingInplace> add_learned_inplace(kNativeCPU, &add_position_embedding_inplace_cpu);
const AddNative<ops::AddPositionEmbedding> add_learned(kNativeCPU, &add_position_embedding_cpu);

}  // namespace
}  // namespace posenc
