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
  int dtype;  // output/x dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16
  bool interleaved, cos_first, has_x;
  int64_t B, S, D, half;
  const void* x;
  void* out;
  int64_t xsb, xss, xsd, osb, oss, osd;
  RowSource rows;   // integer rows (positions.h)
  int pos_float;    // 0: integer rows; else 1 + dtype code of floating positions (read through rows.ptr/sb/ss)
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
  switch (p.pos_float) {
    case 1: return static_cast<acc_t>(static_cast<const float*>(ptr)[at]);
    case 2: return static_cast<acc_t>(static_cast<const double*>(ptr)[at]);
    case 3: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(ptr)[at]));
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
  const bool unit = p.osd == 1 && (!p.has_x || p.xsd == 1);
  for (int64_t tok = begin; tok < end; ++tok) {
    const int64_t b = tok / S, s = tok - b * S;
    // the row in the math dtype: one rounding from the integer row, or from the floating position
    const acc_t row = p.pos_float ? float_position<acc_t>(p, b * p.rows.sb + s * p.rows.ss)
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
    scalar_t* o = static_cast<scalar_t*>(p.out) + b * p.osb + s * p.oss;
    const scalar_t* x = p.has_x ? static_cast<const scalar_t*>(p.x) + b * p.xsb + s * p.xss : nullptr;
    if (unit) {
      if (x) {
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(pe[d] + xs * static_cast<acc_t>(x[d]));
      } else {
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(pe[d]);
      }
    } else {
      const int64_t od = p.osd, xd = p.xsd;
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
    case 0: return tokens_impl<float, float>(p, begin, end);
    case 1: return tokens_impl<double, double>(p, begin, end);
    case 2: return tokens_impl<c10::Half, float>(p, begin, end);
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
// Registered for CPU by posenc::_native_register("CPU", true) (bindings.cpp).
// =================================================================================================
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include "alias_checks.h"
#include "native_ops.h"

namespace posenc::sinusoidal_cpu {
TokensFn tokens_avx2();
TokensFn tokens_avx512();
}  // namespace posenc::sinusoidal_cpu

namespace posenc {
namespace {

using at::Tensor;
using std::optional;

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

int float_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    default: return 3;
  }
}

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

// A [B, S, D] view by sizes and strides (2-D [T, D] is [1, T, D]) without making a view tensor.
struct BSD {
  int64_t B, S, D, sb, ss, sd;
};

BSD as_bsd(const Tensor& t) {
  if (t.dim() == 2) return {1, t.size(0), t.size(1), 0, t.stride(0), t.stride(1)};
  return {t.size(0), t.size(1), t.size(2), t.stride(0), t.stride(1), t.stride(2)};
}

void check_x(const Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, op, ": x must be [B, S, D] or [T, D], got shape ", x.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(x.scalar_type()), op, ": x must be float16/bfloat16/float32/float64, got ",
                   x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), op, " (CPU kernel): x must be a CPU tensor, got ", x.device());
}

void check_convention(int64_t dim, double base, double freq_shift, const char* op) {
  TORCH_CHECK_VALUE(dim > 0, op, ": dim must be a positive int, got ", dim);
  TORCH_CHECK_VALUE(std::isfinite(base) && base > 0, op, ": base must be a positive finite number, got ", base);
  TORCH_CHECK_VALUE(dim / 2 == 0 || static_cast<double>(dim / 2) - freq_shift != 0, op, ": freq_shift=", freq_shift,
                    " with dim=", dim, " divides by zero (the exponent is i / (dim // 2 - freq_shift))");
}

// Row source of an add/concat: positions [S] / [B, S] (integer or floating), offsets [B], or offset.
void fill_rows(sinusoidal_cpu::Params& p, const optional<Tensor>& positions, const optional<Tensor>& offsets,
               int64_t offset, int64_t B, int64_t S, const char* op) {
  TORCH_CHECK(!(positions.has_value() && offsets.has_value()), op, ": pass positions or offsets, not both");
  TORCH_CHECK(!(positions.has_value() || offsets.has_value()) || offset == 0, op,
              ": offset must be 0 when a positions or offsets tensor is given, got ", offset);
  p.rows.offset = offset;
  if (positions.has_value()) {
    const Tensor& t = *positions;
    const bool ok = (t.dim() == 1 && t.size(0) == S) || (t.dim() == 2 && t.size(0) == B && t.size(1) == S);
    TORCH_CHECK(ok, op, ": positions must be [S] = [", S, "] or [B, S] = [", B, ", ", S, "], got ", t.sizes());
    TORCH_CHECK(t.device().is_cpu(), op, " (CPU kernel): positions must be a CPU tensor, got ", t.device());
    p.rows.mode = kPosPositions;
    p.rows.ptr = t.const_data_ptr();
    p.rows.sb = t.dim() == 2 ? t.stride(0) : 0;
    p.rows.ss = t.stride(-1);
    if (is_float_dtype(t.scalar_type())) {
      p.pos_float = 1 + float_code(t.scalar_type());
    } else {
      TORCH_CHECK_TYPE(index_code(t.scalar_type(), p.rows.code), op,
                       ": positions must be an integer or floating tensor, got ", t.scalar_type());
    }
  } else if (offsets.has_value()) {
    const Tensor& t = *offsets;
    TORCH_CHECK_TYPE(index_code(t.scalar_type(), p.rows.code), op, ": offsets must be an integer tensor, got ",
                     t.scalar_type());
    TORCH_CHECK(t.dim() == 1 && t.size(0) == B, op, ": offsets must be [B] = [", B, "], got ", t.sizes());
    TORCH_CHECK(t.device().is_cpu(), op, " (CPU kernel): offsets must be a CPU tensor, got ", t.device());
    p.rows.mode = kPosOffsets;
    p.rows.ptr = t.const_data_ptr();
    p.rows.sb = t.stride(0);
  }
}

// out (a [B, S, D] layout at out_ptr, dtype `dtype`) = x * x_scale + PE; x may be out (in place) or absent.
void run_sinusoidal(sinusoidal_cpu::Params& p, at::ScalarType dtype, double base, double freq_shift) {
  const int64_t n = p.B * p.S;
  if (n == 0 || p.D == 0) return;
  const auto math = dtype == at::kDouble ? at::kDouble : at::kFloat;
  p.dtype = float_code(dtype);
  p.half = p.D / 2;
  const Tensor inv = sinusoidal_inv_freq(p.half, base, freq_shift, math, c10::Device(c10::kCPU));
  p.inv = inv.const_data_ptr();
  const sinusoidal_cpu::TokensFn fn = pick_sinusoidal_variant();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(p.D, 1));
  if (n <= grain) {
    fn(p, 0, n);
  } else {
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
  }
}

void set_out(sinusoidal_cpu::Params& p, const BSD& o, void* ptr) {
  p.B = o.B;
  p.S = o.S;
  p.D = o.D;
  p.out = ptr;
  p.osb = o.sb;
  p.oss = o.ss;
  p.osd = o.sd;
}

void set_x(sinusoidal_cpu::Params& p, const BSD& x, const void* ptr, double x_scale) {
  p.has_x = true;
  p.x = ptr;
  p.xsb = x.sb;
  p.xss = x.ss;
  p.xsd = x.sd;
  p.x_scale = x_scale;
}

Tensor sinusoidal_table_cpu(const optional<Tensor>& positions, int64_t length, int64_t dim, double base,
                            bool interleaved, bool cos_first, double freq_shift, double scale, at::ScalarType dtype,
                            at::Device device) {
  const char* op = "sinusoidal_table";
  check_convention(dim, base, freq_shift, op);
  TORCH_CHECK_TYPE(is_float_dtype(dtype), op, ": dtype must be a floating dtype, got ", dtype);
  TORCH_CHECK(device.is_cpu(), op, " (CPU kernel): device must be cpu, got ", device);
  sinusoidal_cpu::Params p{};
  p.interleaved = interleaved;
  p.cos_first = cos_first;
  p.scale = scale;
  Tensor out;
  if (positions.has_value()) {
    const Tensor& t = *positions;
    TORCH_CHECK(t.device().is_cpu(), op, " (CPU kernel): positions must be a CPU tensor, got ", t.device());
    std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
    shape.push_back(dim);
    out = at::empty(shape, at::TensorOptions().dtype(dtype).device(device));
    const Tensor flat = t.reshape({-1});  // a view where the strides allow (O(N) copy otherwise)
    fill_rows(p, flat, std::nullopt, 0, 1, flat.size(0), op);
  } else {
    TORCH_CHECK_VALUE(length >= 0, op, ": positions_or_length must be >= 0, got ", length);
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
  const char* op = "add_sinusoidal_";
  check_x(x, op);
  const BSD xb = as_bsd(x);
  check_convention(xb.D, base, freq_shift, op);
  TORCH_CHECK(!x.is_inference() || c10::InferenceMode::is_enabled(),
              "Inplace update to inference tensor outside InferenceMode is not allowed. You can make a clone to get "
              "a normal tensor before doing inplace update. (add_sinusoidal_: x is an inference tensor)");
  posenc_alias::check_no_internal_overlap(x, "x");
  sinusoidal_cpu::Params p{};
  p.interleaved = interleaved;
  p.cos_first = cos_first;
  p.scale = scale;
  fill_rows(p, positions, offsets, offset, xb.B, xb.S, op);
  set_out(p, xb, x.data_ptr());
  set_x(p, xb, x.const_data_ptr(), x_scale);
  run_sinusoidal(p, x.scalar_type(), base, freq_shift);
}

Tensor add_sinusoidal_cpu(const Tensor& x, const optional<Tensor>& positions, const optional<Tensor>& offsets,
                          int64_t offset, double x_scale, double base, bool interleaved, bool cos_first,
                          double freq_shift, double scale) {
  const char* op = "add_sinusoidal";
  check_x(x, op);
  const BSD xb = as_bsd(x);
  check_convention(xb.D, base, freq_shift, op);
  sinusoidal_cpu::Params p{};
  p.interleaved = interleaved;
  p.cos_first = cos_first;
  p.scale = scale;
  fill_rows(p, positions, offsets, offset, xb.B, xb.S, op);
  Tensor out = at::empty_like(x);
  set_out(p, as_bsd(out), out.data_ptr());
  set_x(p, xb, x.const_data_ptr(), x_scale);
  run_sinusoidal(p, x.scalar_type(), base, freq_shift);
  return out;
}

// [x | PE]: the encoding is written into the output's tail channels (table mode), x copied into its head.
Tensor concat_sinusoidal_cpu(const Tensor& x, const optional<Tensor>& positions, const optional<Tensor>& offsets,
                             int64_t offset, int64_t dim_pe, double base, bool interleaved, bool cos_first,
                             double freq_shift, double scale) {
  const char* op = "concat_sinusoidal";
  check_x(x, op);
  check_convention(dim_pe, base, freq_shift, op);
  const BSD xb = as_bsd(x);
  sinusoidal_cpu::Params p{};
  p.interleaved = interleaved;
  p.cos_first = cos_first;
  p.scale = scale;
  fill_rows(p, positions, offsets, offset, xb.B, xb.S, op);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() += dim_pe;
  Tensor out = at::empty(shape, x.options());  // contiguous, as x.new_empty
  BSD ob = as_bsd(out);
  ob.D = dim_pe;
  set_out(p, ob, static_cast<char*>(out.data_ptr()) + xb.D * static_cast<int64_t>(out.element_size()));
  run_sinusoidal(p, x.scalar_type(), base, freq_shift);
  if (xb.D > 0) out.narrow(-1, 0, xb.D).copy_(x);
  return out;
}

void register_sinusoidal_cpu(torch::Library& m) {
  m.impl("sinusoidal_table", TORCH_FN(sinusoidal_table_cpu));
  m.impl("add_sinusoidal_", TORCH_FN(add_sinusoidal_inplace_cpu));
  m.impl("add_sinusoidal", TORCH_FN(add_sinusoidal_cpu));
  m.impl("concat_sinusoidal", TORCH_FN(concat_sinusoidal_cpu));
}

const AddKernelSet add_sinusoidal_set("CPU", {"sinusoidal_table", "add_sinusoidal_", "add_sinusoidal",
                                              "concat_sinusoidal"},
                                      &register_sinusoidal_cpu);

}  // namespace
}  // namespace posenc
#endif  // !POSENC_CPU_VARIANT
