// posenc::sinusoidal_table / add_sinusoidal_ / add_sinusoidal / concat_sinusoidal on CPU:
// out [B, S, D] = x * x_scale + PE (x None: the encoding alone). Any strides (a non-unit channel stride
// takes a scalar store loop); positions of any integer or float dtype are read in place (no conversion).
//
// Mirrors posenc_kernels/sinusoidal.py (_sinusoidal_torch): angle = (row * inv_freq[i]) * scale in the math
// dtype (fp64 for fp64 outputs, else fp32; the row converted to it first, as positions.to(inv_freq.dtype)),
// sin/cos of it, laid out as (sin, cos) pairs (interleaved) or [sin..., cos...] (cos_first swaps), an odd D's
// last column 0; then x * x_scale + pe, rounded once to the output dtype. Parallel over tokens; per token the
// angles are one vector pass (at::vec sin/cos: Sleef in the AVX2/AVX512 builds, see cpu_variant.h).

#include "cpu_variant.h"
#include "positions.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace posenc {
namespace sinusoidal_cpu {

struct Params {
  int dtype;  // output/x dtype (positions.h DType, a float code)
  bool interleaved, cos_first, has_x;
  int64_t B, S, D, half;
  const void* x;
  void* out;
  int64_t stride_x_b, stride_x_s, stride_x_d, stride_o_b, stride_o_s, stride_o_d;
  RowSource rows;   // integer rows (positions.h)
  bool pos_float;   // floating positions, of DType rows.code (read through rows.ptr and its strides); else integer rows
  const void* inv;  // [half] in the math dtype, contiguous
  double x_scale, scale;
};

using TokensFn = void (*)(const Params&, int64_t begin, int64_t end);

}  // namespace sinusoidal_cpu
}  // namespace posenc

#if POSENC_VARIANT_ENABLED
namespace posenc {
namespace sinusoidal_cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename acc_t>
inline acc_t float_position(const Params& p, int64_t at) {
  const void* ptr = p.rows.ptr;
  switch (p.rows.code) {
    case kFloat: return static_cast<acc_t>(static_cast<const float*>(ptr)[at]);
    case kDouble: return static_cast<acc_t>(static_cast<const double*>(ptr)[at]);
    case kHalf: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(ptr)[at]));
    default: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(ptr)[at]));
  }
}

constexpr int64_t kStack = 2048;  // scratch values on the stack up to this many (2 * half + D)

template <typename scalar_t, typename acc_t>
void tokens_impl(const Params& p, int64_t begin, int64_t end) {
  using V = Vectorized<acc_t>;
  constexpr int64_t VL = V::size();
  const int64_t S = p.S, D = p.D, half = p.half;
  const acc_t* inv = static_cast<const acc_t*>(p.inv);
  const acc_t scale = static_cast<acc_t>(p.scale), xs = static_cast<acc_t>(p.x_scale);
  acc_t stack[kStack];
  std::vector<acc_t> heap;
  acc_t* sn = stack;
  if (2 * half + D > kStack) {
    heap.resize(2 * half + D);
    sn = heap.data();
  }
  acc_t* cs = sn + half;
  acc_t* pe = cs + half;
  if (D > 2 * half) pe[D - 1] = acc_t(0);
  const acc_t* first = p.cos_first ? cs : sn;
  const acc_t* second = p.cos_first ? sn : cs;
  const bool unit = p.stride_o_d == 1 && (!p.has_x || p.stride_x_d == 1);
  for (int64_t tok = begin; tok < end; ++tok) {
    const int64_t b = tok / S, s = tok - b * S;
    // the row in the math dtype: one rounding from the integer row, or from the floating position
    const acc_t row = p.pos_float ? float_position<acc_t>(p, b * p.rows.stride_pos_b + s * p.rows.stride_pos_s)
                                  : static_cast<acc_t>(token_row(p.rows, b, s));
    const V rv(row), sv(scale);
    int64_t i = 0;
    for (; i + VL <= half; i += VL) {
      const V a = (rv * V::loadu(inv + i)) * sv;
      a.sin().store(sn + i);
      a.cos().store(cs + i);
    }
    if (i < half) {  // the tail through a partial vector: the same functions as the body
      const int64_t n = half - i;
      const V a = (rv * V::loadu(inv + i, n)) * sv;
      a.sin().store(sn + i, n);
      a.cos().store(cs + i, n);
    }
    if (p.interleaved) {
      for (int64_t j = 0; j < half; ++j) {
        pe[2 * j] = first[j];
        pe[2 * j + 1] = second[j];
      }
    } else {
      std::copy(first, first + half, pe);
      std::copy(second, second + half, pe + half);
    }
    scalar_t* o = static_cast<scalar_t*>(p.out) + b * p.stride_o_b + s * p.stride_o_s;
    const scalar_t* x = p.has_x ? static_cast<const scalar_t*>(p.x) + b * p.stride_x_b + s * p.stride_x_s : nullptr;
    if (unit) {
      if (x) {
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(pe[d] + xs * static_cast<acc_t>(x[d]));
      } else {
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(pe[d]);
      }
    } else {
      const int64_t od = p.stride_o_d, xd = p.stride_x_d;
      if (x) {
        for (int64_t d = 0; d < D; ++d) o[d * od] = static_cast<scalar_t>(pe[d] + xs * static_cast<acc_t>(x[d * xd]));
      } else {
        for (int64_t d = 0; d < D; ++d) o[d * od] = static_cast<scalar_t>(pe[d]);
      }
    }
  }
}

void tokens(const Params& p, int64_t begin, int64_t end) {
  switch (p.dtype) {
    case kFloat: return tokens_impl<float, float>(p, begin, end);
    case kDouble: return tokens_impl<double, double>(p, begin, end);
    case kHalf: return tokens_impl<c10::Half, float>(p, begin, end);
    default: return tokens_impl<c10::BFloat16, float>(p, begin, end);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace sinusoidal_cpu
}  // namespace posenc
#endif  // POSENC_VARIANT_ENABLED

#if !defined(POSENC_CPU_VARIANT)
namespace posenc::sinusoidal_cpu {
TokensFn tokens_default() { return &DEFAULT::tokens; }
}
#elif POSENC_CPU_VARIANT == 2
namespace posenc::sinusoidal_cpu {
#if POSENC_VARIANT_ENABLED
TokensFn tokens_avx2() { return &AVX2::tokens; }
#else
TokensFn tokens_avx2() { return nullptr; }
#endif
}
#elif POSENC_CPU_VARIANT == 3
namespace posenc::sinusoidal_cpu {
#if POSENC_VARIANT_ENABLED
TokensFn tokens_avx512() { return &AVX512::tokens; }
#else
TokensFn tokens_avx512() { return nullptr; }
#endif
}
#endif

#if !defined(POSENC_CPU_VARIANT)
// =================================================================================================
// The ops (schemas: Python): checks, parameters, variant choice, parallel loop (baseline flags only).
// Called by the choosers of bindings.cpp (AddNative).
// =================================================================================================
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include "alias_checks.h"
#include "cpu_parallel.h"
#include "native_ops.h"
#include "sinusoidal_args.h"

namespace posenc::sinusoidal_cpu {
TokensFn tokens_avx2();
TokensFn tokens_avx512();
}  // namespace posenc::sinusoidal_cpu

namespace posenc {
namespace {

using at::Tensor;
using std::optional;

sinusoidal_cpu::TokensFn pick_sinusoidal_variant() {
  static const sinusoidal_cpu::TokensFn fn = [] {
    const std::string cap = at::get_cpu_capability();
    sinusoidal_cpu::TokensFn f = nullptr;
    if (cap == "AVX512") f = sinusoidal_cpu::tokens_avx512();
    if (f == nullptr && (cap == "AVX512" || cap == "AVX2")) f = sinusoidal_cpu::tokens_avx2();
    return f != nullptr ? f : sinusoidal_cpu::tokens_default();
  }();
  return fn;
}

}  // namespace

const char* sinusoidal_cpu_isa() {
  const sinusoidal_cpu::TokensFn fn = pick_sinusoidal_variant();
  return fn == sinusoidal_cpu::tokens_avx512() ? "AVX512" : fn == sinusoidal_cpu::tokens_avx2() ? "AVX2" : "baseline";
}

namespace {

using BSD = SinusoidalLayout;

// Row source of an add/concat/table (checked by sinusoidal_args.h): positions [S] / [B, S] (integer or
// floating), offsets [B], or offset.
void fill_rows(sinusoidal_cpu::Params& p, const optional<Tensor>& positions, const optional<Tensor>& offsets,
               int64_t offset) {
  p.rows.offset = offset;
  if (positions.has_value()) {
    const Tensor& t = *positions;
    p.rows.mode = kPosPositions;
    p.rows.ptr = t.const_data_ptr();
    p.rows.stride_pos_b = t.dim() == 2 ? t.stride(0) : 0;
    p.rows.stride_pos_s = t.stride(-1);
    p.rows.code = dtype_code(t.scalar_type());
    p.pos_float = is_float_dtype(t.scalar_type());
  } else if (offsets.has_value()) {
    const Tensor& t = *offsets;
    p.rows.code = dtype_code(t.scalar_type());
    p.rows.mode = kPosOffsets;
    p.rows.ptr = t.const_data_ptr();
    p.rows.stride_off = t.stride(0);
  }
}

// out (a [B, S, D] layout at out_ptr, dtype `dtype`) = x * x_scale + PE; x may be out (in place) or absent.
void run_sinusoidal(sinusoidal_cpu::Params& p, at::ScalarType dtype, double base, double freq_shift) {
  const int64_t n = p.B * p.S;
  if (n == 0 || p.D == 0) return;
  const auto math = dtype == at::kDouble ? at::kDouble : at::kFloat;
  p.dtype = dtype_code(dtype);
  p.half = p.D / 2;
  const Tensor inv = sinusoidal_inv_freq(p.half, base, freq_shift, math, c10::Device(c10::kCPU));
  p.inv = inv.const_data_ptr();
  const sinusoidal_cpu::TokensFn fn = pick_sinusoidal_variant();
  // The split (cpu_parallel.h): a token writes D elements (and reads D of x when there is one).
  const int64_t row_bytes = p.D * static_cast<int64_t>(c10::elementSize(dtype));
  parallel_items(n, p.has_x ? 2 * row_bytes : row_bytes, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
}

void set_out(sinusoidal_cpu::Params& p, const BSD& o, void* ptr) {
  p.B = o.B;
  p.S = o.S;
  p.D = o.D;
  p.out = ptr;
  p.stride_o_b = o.stride_b;
  p.stride_o_s = o.stride_s;
  p.stride_o_d = o.stride_d;
}

void set_x(sinusoidal_cpu::Params& p, const BSD& x, const void* ptr, double x_scale) {
  p.has_x = true;
  p.x = ptr;
  p.stride_x_b = x.stride_b;
  p.stride_x_s = x.stride_s;
  p.stride_x_d = x.stride_d;
  p.x_scale = x_scale;
}

Tensor sinusoidal_table_cpu(const optional<Tensor>& positions, int64_t length, int64_t dim, double base,
                            bool interleaved, bool cos_first, double freq_shift, double scale, at::ScalarType dtype,
                            at::Device device) {
  check_sinusoidal_table(positions, length, dim, base, freq_shift, scale, dtype, device);
  sinusoidal_cpu::Params p{};
  p.interleaved = interleaved;
  p.cos_first = cos_first;
  p.scale = scale;
  Tensor out;
  if (positions.has_value()) {
    const Tensor& t = *positions;
    std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
    shape.push_back(dim);
    out = at::empty(shape, at::TensorOptions().dtype(dtype).device(device));
    const Tensor flat = t.reshape({-1});  // a view where the strides allow (O(N) copy otherwise)
    fill_rows(p, flat, std::nullopt, 0);
  } else {
    out = at::empty({length, dim}, at::TensorOptions().dtype(dtype).device(device));
  }
  const int64_t N = out.numel() / dim;
  set_out(p, BSD{1, N, dim, 0, dim, 1}, out.data_ptr());
  run_sinusoidal(p, dtype, base, freq_shift);
  return out;
}

void add_sinusoidal_inplace_cpu(const Tensor& x, const optional<Tensor>& positions, const optional<Tensor>& offsets,
                                int64_t offset, double x_scale, double base, bool interleaved, bool cos_first,
                                double freq_shift, double scale) {
  const BSD xb = check_sinusoidal_add(x, positions, offsets, offset, x_scale, base, freq_shift, scale, true);
  sinusoidal_cpu::Params p{};
  p.interleaved = interleaved;
  p.cos_first = cos_first;
  p.scale = scale;
  fill_rows(p, positions, offsets, offset);
  set_out(p, xb, x.data_ptr());
  set_x(p, xb, x.const_data_ptr(), x_scale);
  run_sinusoidal(p, x.scalar_type(), base, freq_shift);
}

Tensor add_sinusoidal_cpu(const Tensor& x, const optional<Tensor>& positions, const optional<Tensor>& offsets,
                          int64_t offset, double x_scale, double base, bool interleaved, bool cos_first,
                          double freq_shift, double scale) {
  const BSD xb = check_sinusoidal_add(x, positions, offsets, offset, x_scale, base, freq_shift, scale, false);
  sinusoidal_cpu::Params p{};
  p.interleaved = interleaved;
  p.cos_first = cos_first;
  p.scale = scale;
  fill_rows(p, positions, offsets, offset);
  Tensor out = at::empty_like(x);
  set_out(p, sinusoidal_layout(out), out.data_ptr());
  set_x(p, xb, x.const_data_ptr(), x_scale);
  run_sinusoidal(p, x.scalar_type(), base, freq_shift);
  return out;
}

// [x | PE]: the encoding is written into the output's tail channels (table mode), x copied into its head.
Tensor concat_sinusoidal_cpu(const Tensor& x, const optional<Tensor>& positions, const optional<Tensor>& offsets,
                             int64_t offset, int64_t dim_pe, double base, bool interleaved, bool cos_first,
                             double freq_shift, double scale) {
  const BSD xb = check_sinusoidal_concat(x, positions, offsets, offset, dim_pe, base, freq_shift, scale);
  sinusoidal_cpu::Params p{};
  p.interleaved = interleaved;
  p.cos_first = cos_first;
  p.scale = scale;
  fill_rows(p, positions, offsets, offset);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() += dim_pe;
  Tensor out = at::empty(shape, x.options());  // contiguous, as x.new_empty
  BSD ob = sinusoidal_layout(out);
  ob.D = dim_pe;
  set_out(p, ob, static_cast<char*>(out.data_ptr()) + xb.D * static_cast<int64_t>(out.element_size()));
  run_sinusoidal(p, x.scalar_type(), base, freq_shift);
  if (xb.D > 0) out.narrow(-1, 0, xb.D).copy_(x);
  return out;
}

const AddNative<ops::SinusoidalTable> add_table(kNativeCPU, &sinusoidal_table_cpu);
const AddNative<ops::AddSinusoidalInplace> add_inplace(kNativeCPU, &add_sinusoidal_inplace_cpu);
const AddNative<ops::AddSinusoidal> add_out(kNativeCPU, &add_sinusoidal_cpu);
const AddNative<ops::ConcatSinusoidal> add_concat(kNativeCPU, &concat_sinusoidal_cpu);

}  // namespace
}  // namespace posenc
#endif  // !POSENC_CPU_VARIANT
