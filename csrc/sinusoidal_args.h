// The sinusoidal argument rules, written once for the CPU (sinusoidal_cpu.cpp) and CUDA (cuda_ops.cpp) glue:
// ports of posenc_kernels/ops/sinusoidal/op.py check_convention, check_table, check_add and check_concat,
// same order, messages and exception types (py_checks.h). The sinusoidal ops read no values.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <optional>

#include "py_checks.h"

namespace posenc {

// x [B, S, D] or [T, D] (as [1, T, D]) by sizes and strides, with Triton's stride names.
struct SinusoidalLayout {
  int64_t B, S, D, stride_b, stride_s, stride_d;
};

inline SinusoidalLayout sinusoidal_layout(const at::Tensor& t) {
  if (t.dim() == 2) return {1, t.size(0), t.size(1), 0, t.stride(0), t.stride(1)};
  return {t.size(0), t.size(1), t.size(2), t.stride(0), t.stride(1), t.stride(2)};
}

// check_convention(dim, base, freq_shift, scale, name=...)
inline void check_sinusoidal_convention(int64_t dim, double base, double freq_shift, double scale,
                                        const char* name = "dim") {
  TORCH_CHECK_VALUE(dim > 0, name, " must be a positive int, got ", dim);
  TORCH_CHECK_VALUE(std::isfinite(base) && base > 0, "base must be a positive finite number, got ", py_float(base));
  TORCH_CHECK_VALUE(std::isfinite(freq_shift), "freq_shift must be finite, got ", py_float(freq_shift));
  const int64_t half = dim / 2;
  TORCH_CHECK_VALUE(!(half > 0 && static_cast<double>(half) - freq_shift == 0), "freq_shift=", py_float(freq_shift),
                    " with ", name, "=", dim, " divides by zero: the exponent is i / (", name,
                    " // 2 - freq_shift); use dim >= 4 with freq_shift=1, or freq_shift=0");
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", py_float(scale));
}

// check_table(positions, length, dim, ..., dtype, device)
inline void check_sinusoidal_table(const OptT& positions, int64_t length, int64_t dim, double base, double freq_shift,
                                   double scale, at::ScalarType dtype, const c10::Device& device) {
  check_sinusoidal_convention(dim, base, freq_shift, scale);
  TORCH_CHECK_TYPE(is_float_dtype(dtype), "dtype must be a floating dtype, got ", py_dtype(dtype));
  if (!positions.has_value()) {
    TORCH_CHECK_VALUE(length >= 0, "positions_or_length must be >= 0, got ", length);
    return;
  }
  const auto st = positions->scalar_type();
  TORCH_CHECK_TYPE(is_index_dtype(st) || is_float_dtype(st),
                   "positions must be an integer or floating tensor, got dtype ", py_dtype(st));
  TORCH_CHECK_VALUE(positions->device() == device, "device (", py_device(device),
                    ") must match the positions' device (", py_device(positions->device()), ")");
}

// _check_x_positions(x, positions, offsets, offset)
inline SinusoidalLayout check_sinusoidal_x(const at::Tensor& x, const OptT& positions, const OptT& offsets,
                                           int64_t offset) {
  check_tensor("x", x, Dtypes::kFloat, {2, 3}, nullptr);
  const SinusoidalLayout l = sinusoidal_layout(x);
  check_position_args(positions, offsets, offset, l.B, l.S, x.device(), std::nullopt, false,
                      /*integer_positions=*/false);
  return l;
}

// check_add(x, ..., values=True, inplace=...)
inline SinusoidalLayout check_sinusoidal_add(const at::Tensor& x, const OptT& positions, const OptT& offsets,
                                             int64_t offset, double x_scale, double base, double freq_shift,
                                             double scale, bool inplace) {
  const SinusoidalLayout l = check_sinusoidal_x(x, positions, offsets, offset);
  check_sinusoidal_convention(x.size(-1), base, freq_shift, scale);
  TORCH_CHECK_VALUE(std::isfinite(x_scale), "x_scale must be finite, got ", py_float(x_scale));
  if (inplace) check_writable("x", x);
  return l;
}

// check_concat(x, ..., dim_pe, ...)
inline SinusoidalLayout check_sinusoidal_concat(const at::Tensor& x, const OptT& positions, const OptT& offsets,
                                                int64_t offset, int64_t dim_pe, double base, double freq_shift,
                                                double scale) {
  const SinusoidalLayout l = check_sinusoidal_x(x, positions, offsets, offset);
  check_sinusoidal_convention(dim_pe, base, freq_shift, scale, "dim_pe");
  return l;
}

}  // namespace posenc
