// The argument rules of posenc_kernels/ops/checks.py and ops/positions.py, in C++, with Python's messages and
// exception types (TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK ->
// RuntimeError), in Python's order: a native kernel raises exactly what the Python implementations raise
// for the same bad input (tests/test_native_errors.py compares them). Python is the contract; a change of
// a message there is made here too.
//
// Shared by the CPU and CUDA glue (rope_args.h, sinusoidal_args.h, learned_cpu.cpp). The checks that read
// values (positions within the table, cu_seqlens, axis_map) take `values_on` (posenc::value_checks_on:
// off by setting, or while the current CUDA stream captures a graph) and read with plain loops on CPU and
// ATen reductions (one host sync) on CUDA (bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>

#include "alias_checks.h"
#include "native_ops.h"

namespace posenc {

// ---- Python's formatting ----------------------------------------------------------------------------

// str(dtype): "torch.float32"
inline std::string py_dtype(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

// str(tuple(t.shape)): "(2, 3)", "(5,)", "()"
inline std::string py_shape(c10::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  if (s.size() == 1) os << ",";
  os << ")";
  return os.str();
}

// repr(float): shortest round-trip digits, fixed notation for exponents in [-4, 16), else d.ddde+XX.
inline std::string py_float(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  if (v == 0) return std::signbit(v) ? "-0.0" : "0.0";
  char buf[40];
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof(buf), "%.*e", prec - 1, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string s(buf), digits;
  const bool neg = s[0] == '-';
  const size_t epos = s.find('e');
  for (size_t i = neg ? 1 : 0; i < epos; ++i) {
    if (s[i] != '.') digits += s[i];
  }
  const int e = std::atoi(s.c_str() + epos + 1);
  std::string out = neg ? "-" : "";
  if (e >= -4 && e < 16) {
    if (e >= 0) {
      std::string ip = digits.substr(0, std::min<size_t>(digits.size(), e + 1));
      ip.append(e + 1 > static_cast<int>(digits.size()) ? e + 1 - digits.size() : 0, '0');
      const std::string fp = static_cast<int>(digits.size()) > e + 1 ? digits.substr(e + 1) : "0";
      out += ip + "." + fp;
    } else {
      out += "0." + std::string(-e - 1, '0') + digits;
    }
  } else {
    out += digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char eb[8];
    std::snprintf(eb, sizeof(eb), "e%c%02d", e < 0 ? '-' : '+', std::abs(e));
    out += eb;
  }
  return out;
}

// str(device): "cpu", "cuda:0"
inline std::string py_device(const c10::Device& d) { return d.str(); }

// ---- checks.py ----------------------------------------------------------------------------------

enum class Dtypes { kAny, kFloat, kFloatOrIndex };

// check_tensor(name, t, dtypes=..., ndim=..., device=...): dtype, then rank, then device.
inline void check_tensor(const char* name, const at::Tensor& t, Dtypes dtypes, std::initializer_list<int64_t> ndim,
                         const c10::Device* device) {
  if (dtypes == Dtypes::kFloat) {
    TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), name,
                     " must have dtype in (float16, bfloat16, float32, float64), got ", py_dtype(t.scalar_type()));
  } else if (dtypes == Dtypes::kFloatOrIndex) {
    TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()) || is_index_dtype(t.scalar_type()), name,
                     " must have dtype in (float16, bfloat16, float32, float64, int8, int16, int32, int64, uint8), "
                     "got ", py_dtype(t.scalar_type()));
  }
  if (ndim.size() > 0) {
    bool ok = false;
    for (const int64_t n : ndim) ok |= t.dim() == n;
    if (!ok) {  // the message is built on the error path only (a few string allocations per argument otherwise)
      std::string want;
      for (const int64_t n : ndim) want += (want.empty() ? "" : " or ") + std::to_string(n);
      TORCH_CHECK_VALUE(false, name, " must have ", want, " dimensions, got shape ", py_shape(t.sizes()));
    }
  }
  if (device != nullptr) {
    TORCH_CHECK_VALUE(t.device() == *device, name, " must be on the same device as the input (",
                      py_device(*device), "), got ", py_device(t.device()));
  }
}

// _nested_layout: sorted by stride, each dimension's stride covers the extent of the smaller ones.
using posenc_alias::nested_layout;

// check_writable(name, t)
inline void check_writable(const char* name, const at::Tensor& t) {
  TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(), name,
              " is an inference tensor: in-place updates to inference tensors outside InferenceMode are not allowed "
              "(PyTorch's rule); clone it or run under torch.inference_mode()");
  TORCH_CHECK_VALUE(t.numel() <= 1 || nested_layout(t.sizes(), t.strides()), name,
                    " has internally overlapping memory (an expanded or as_strided view?); it cannot be written in "
                    "place");
}

// check_disjoint(name_a, a, name_b, b): "" when a and b share no element, else the ValueError message.
std::string disjoint_error(const char* name_a, const at::Tensor& a, const char* name_b, const at::Tensor& b);
inline void check_disjoint(const char* name_a, const at::Tensor& a, const char* name_b, const at::Tensor& b) {
  const std::string msg = disjoint_error(name_a, a, name_b, b);
  TORCH_CHECK_VALUE(msg.empty(), msg);
}

// ---- positions.py -----------------------------------------------------------------------------

// _int_tensor(name, t, ndim=..., device=...)
inline void check_int_tensor(const char* name, const at::Tensor& t, std::initializer_list<int64_t> ndim,
                             const c10::Device* device) {
  TORCH_CHECK_TYPE(is_index_dtype(t.scalar_type()), name, " must be an integer tensor, got dtype ",
                   py_dtype(t.scalar_type()));
  check_tensor(name, t, Dtypes::kAny, ndim, device);
}

// check_position_args(positions, offsets, offset, batch=, seqlen=, device=, cu_seqlens=, packed=,
// integer_positions=)
inline void check_position_args(const OptT& positions, const OptT& offsets, int64_t offset, int64_t batch,
                                int64_t seqlen, const c10::Device& device, const OptT& cu_seqlens = std::nullopt,
                                bool packed = false, bool integer_positions = true) {
  if (cu_seqlens.has_value()) {
    TORCH_CHECK_VALUE(packed, "cu_seqlens needs packed inputs [T, ...] (tokens of all sequences back to back)");
    check_int_tensor("cu_seqlens", *cu_seqlens, {1}, &device);
    TORCH_CHECK_VALUE(cu_seqlens->size(0) >= 2, "cu_seqlens must be [N + 1] with N >= 1 sequences, got shape ",
                      py_shape(cu_seqlens->sizes()));
    TORCH_CHECK_VALUE(!positions.has_value(), "pass positions or cu_seqlens, not both");
    batch = cu_seqlens->size(0) - 1;
  }
  if (positions.has_value()) {
    const at::Tensor& p = *positions;
    const auto st = p.scalar_type();
    TORCH_CHECK_TYPE(is_index_dtype(st) || (!integer_positions && is_float_dtype(st)), "positions must be ",
                     integer_positions ? "an integer" : "an integer or floating", " tensor, got dtype ", py_dtype(st));
    check_tensor("positions", p, Dtypes::kAny, {1, 2}, &device);
    const bool ok = (p.dim() == 1 && p.size(0) == seqlen) || (p.dim() == 2 && p.size(0) == batch && p.size(1) == seqlen);
    TORCH_CHECK_VALUE(ok, "positions must have shape [S] = [", seqlen, "] or [B, S] = [", batch, ", ", seqlen,
                      "], got ", py_shape(p.sizes()));
    TORCH_CHECK_VALUE(!offsets.has_value() && offset == 0, "pass positions or offsets, not both");
  }
  if (offsets.has_value()) {
    const at::Tensor& o = *offsets;
    TORCH_CHECK_TYPE(is_index_dtype(o.scalar_type()), "offsets must be an int or an integer tensor, got dtype ",
                     py_dtype(o.scalar_type()));
    check_tensor("offsets", o, Dtypes::kAny, {1}, &device);
    TORCH_CHECK_VALUE(o.size(0) == batch, "offsets must have shape [B] = [", batch, "], got ", py_shape(o.sizes()));
    TORCH_CHECK_VALUE(offset == 0, "offset must be 0 when an offsets tensor is given, got ", offset);
  }
}

// The value checks run for tensors on `device` (posenc::_native_value_checks, and not while the current
// CUDA stream captures a graph).
bool value_checks_on(const c10::Device& device);  // bindings.cpp

// cu_seqlens statistics of check_position_values: cu[0], cu[-1], whether a length is negative, and the
// lowest / highest row a non-empty sequence uses (lo > hi when none).
struct CuSeqlensStats {
  int64_t first = 0, last = 0;
  bool decreasing = false;
  int64_t lo = 0, hi = 0;
};
CuSeqlensStats cu_seqlens_stats(const at::Tensor& cu, const OptT& offsets, int64_t offset);  // bindings.cpp

// Python's cu.tolist()[:16] (any device).
std::string format_list(const at::Tensor& t, int64_t max_items);  // bindings.cpp

// check_position_values(positions, offsets, offset, seqlen=, num_rows=, device=, cu_seqlens=); num_rows < 0
// is Python's None (no table).
inline void check_position_values(const OptT& positions, const OptT& offsets, int64_t offset, int64_t seqlen,
                                  int64_t num_rows, const c10::Device& device, const OptT& cu_seqlens = std::nullopt) {
  if (seqlen == 0) return;
  if (cu_seqlens.has_value()) {
    if (!value_checks_on(device)) return;
    const CuSeqlensStats c = cu_seqlens_stats(*cu_seqlens, offsets, offset);
    TORCH_CHECK_VALUE(c.first == 0 && !c.decreasing, "cu_seqlens must start at 0 and never decrease, got ",
                      format_list(*cu_seqlens, 16));
    TORCH_CHECK_VALUE(c.last <= seqlen, "cu_seqlens[-1] = ", c.last, " exceeds the ", seqlen,
                      " packed tokens of q");
    if (num_rows >= 0) {
      TORCH_CHECK_VALUE(!(c.lo <= c.hi && (c.lo < 0 || c.hi >= num_rows)),
                        "offsets + positions within each sequence must lie in [0, ", num_rows,
                        ") (the table's rows), got rows in [", c.lo, ", ", c.hi, "]");
      TORCH_CHECK_VALUE(!(c.last < seqlen && num_rows < 1),
                        "padded tokens past cu_seqlens[-1] use table row 0, but the table is empty");
    }
    return;
  }
  if (num_rows < 0) return;
  if (!positions.has_value() && !offsets.has_value()) {
    TORCH_CHECK_VALUE(offset >= 0 && offset + seqlen <= num_rows, "offsets=", offset, " with seqlen ", seqlen,
                      " needs table rows [", offset, ", ", offset + seqlen, "), but the cos/sin table has ", num_rows,
                      " rows");
    return;
  }
  if (!value_checks_on(device)) return;
  const at::Tensor& t = positions.has_value() ? *positions : *offsets;
  int64_t lo = 0, hi = 0;
  if (!index_min_max(t, lo, hi)) return;
  if (positions.has_value()) {
    TORCH_CHECK_VALUE(lo >= 0 && hi < num_rows, "positions must lie in [0, ", num_rows,
                      ") (the table's rows), got values in [", lo, ", ", hi, "]");
  } else {
    TORCH_CHECK_VALUE(lo >= 0 && hi + seqlen <= num_rows, "offsets + seqlen must stay within the table's ", num_rows,
                      " rows: offsets lie in [", lo, ", ", hi, "] and seqlen is ", seqlen);
  }
}

}  // namespace posenc
