// posenc::native_sinusoidal on CPU: out [B, S, D] = x * x_scale + PE (x None: the table alone).
//
// Mirrors posenc_kernels/sinusoidal.py (_sinusoidal_torch): angle = (row * inv_freq[i]) * scale in the math
// dtype (fp64 for fp64 outputs, else fp32; the row converted to it first, as positions.to(inv_freq.dtype)),
// sin/cos of it, laid out as (sin, cos) pairs (interleaved) or [sin..., cos...] (cos_first swaps), an odd D's
// last column 0; then x * x_scale + pe, rounded once to the output dtype. Parallel over tokens; per token the
// angles are one vector pass (at::vec sin/cos: Sleef in the AVX2/AVX512 builds, see cpu_variant.h).

#include "cpu_variant.h"

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
  int64_t xsb, xss, osb, oss;
  int pos_mode;      // 0 offset + s, 1 offsets[b] + s, 2 positions[b, s] (already in the math dtype)
  const void* pos;   // math-dtype positions (mode 2) or int64 offsets (mode 1)
  int64_t psb, pss;  // element strides of pos
  int64_t offset;
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

template <typename scalar_t, typename acc_t>
void tokens_impl(const Params& p, int64_t begin, int64_t end) {
  using V = Vectorized<acc_t>;
  constexpr int64_t VL = V::size();
  const int64_t S = p.S, D = p.D, half = p.half;
  const acc_t* inv = static_cast<const acc_t*>(p.inv);
  const acc_t scale = static_cast<acc_t>(p.scale), xs = static_cast<acc_t>(p.x_scale);
  std::vector<acc_t> buf(2 * half + D);
  acc_t* sn = buf.data();
  acc_t* cs = sn + half;
  acc_t* pe = cs + half;
  if (D > 2 * half) pe[D - 1] = acc_t(0);
  const acc_t* first = p.cos_first ? cs : sn;
  const acc_t* second = p.cos_first ? sn : cs;
  for (int64_t tok = begin; tok < end; ++tok) {
    const int64_t b = tok / S, s = tok - b * S;
    acc_t row;
    if (p.pos_mode == 2) {
      row = static_cast<const acc_t*>(p.pos)[b * p.psb + s * p.pss];
    } else if (p.pos_mode == 1) {
      row = static_cast<acc_t>(static_cast<const int64_t*>(p.pos)[b * p.psb] + s);
    } else {
      row = static_cast<acc_t>(p.offset + s);
    }
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
    if (p.has_x) {
      const scalar_t* x = static_cast<const scalar_t*>(p.x) + b * p.xsb + s * p.xss;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(pe[d] + xs * static_cast<acc_t>(x[d]));
    } else {
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(pe[d]);
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
// The op: checks, parameters, variant choice, parallel loop (baseline flags only).
// =================================================================================================
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "alias_checks.h"

namespace posenc::sinusoidal_cpu {
TokensFn tokens_avx2();
TokensFn tokens_avx512();
}  // namespace posenc::sinusoidal_cpu

namespace posenc {
namespace {

using at::Tensor;

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

bool is_int_dtype(at::ScalarType t) {
  return t == at::kByte || t == at::kChar || t == at::kShort || t == at::kInt || t == at::kLong;
}

void check_sinusoidal_args(const std::optional<Tensor>& x, const Tensor& out, const std::optional<Tensor>& positions,
                           const std::optional<Tensor>& offsets, const Tensor& inv_freq) {
  TORCH_CHECK(out.dim() == 3, "native_sinusoidal: out must be [B, S, D], got shape ", out.sizes());
  TORCH_CHECK(is_float_dtype(out.scalar_type()), "native_sinusoidal: out must be float16/bfloat16/float32/float64, "
              "got ", out.scalar_type());
  TORCH_CHECK(out.size(2) <= 1 || out.stride(2) == 1, "native_sinusoidal: out must have stride(-1) == 1, got "
              "strides ", out.strides());
  const auto B = out.size(0), S = out.size(1), D = out.size(2);
  const auto dev = out.device();
  if (x.has_value()) {
    TORCH_CHECK(x->sizes() == out.sizes(), "native_sinusoidal: x must have out's shape ", out.sizes(), ", got ",
                x->sizes());
    TORCH_CHECK(x->scalar_type() == out.scalar_type(), "native_sinusoidal: x must have out's dtype ",
                out.scalar_type(), ", got ", x->scalar_type());
    TORCH_CHECK(x->device() == dev, "native_sinusoidal: x must be on ", dev, ", got ", x->device());
    TORCH_CHECK(D <= 1 || x->stride(2) == 1, "native_sinusoidal: x must have stride(-1) == 1, got strides ",
                x->strides());
  }
  TORCH_CHECK(inv_freq.dim() == 1 && inv_freq.size(0) == D / 2, "native_sinusoidal: inv_freq must be [D // 2] = [",
              D / 2, "], got shape ", inv_freq.sizes());
  TORCH_CHECK(is_float_dtype(inv_freq.scalar_type()), "native_sinusoidal: inv_freq must be a floating tensor");
  TORCH_CHECK(inv_freq.device() == dev, "native_sinusoidal: inv_freq must be on ", dev, ", got ", inv_freq.device());
  TORCH_CHECK(!(positions.has_value() && offsets.has_value()),
              "native_sinusoidal: pass positions or offsets, not both");
  if (positions.has_value()) {
    const auto t = positions->scalar_type();
    TORCH_CHECK(is_int_dtype(t) || is_float_dtype(t), "native_sinusoidal: positions must be an integer or floating "
                "tensor, got ", t);
    const bool ok = (positions->dim() == 1 && positions->size(0) == S) ||
                    (positions->dim() == 2 && positions->size(0) == B && positions->size(1) == S);
    TORCH_CHECK(ok, "native_sinusoidal: positions must be [S] = [", S, "] or [B, S] = [", B, ", ", S, "], got ",
                positions->sizes());
    TORCH_CHECK(positions->device() == dev, "native_sinusoidal: positions must be on ", dev);
  }
  if (offsets.has_value()) {
    TORCH_CHECK(is_int_dtype(offsets->scalar_type()), "native_sinusoidal: offsets must be an integer tensor, got ",
                offsets->scalar_type());
    TORCH_CHECK(offsets->dim() == 1 && offsets->size(0) == B, "native_sinusoidal: offsets must be [B] = [", B,
                "], got ", offsets->sizes());
    TORCH_CHECK(offsets->device() == dev, "native_sinusoidal: offsets must be on ", dev);
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

int out_dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    default: return 3;
  }
}

void native_sinusoidal_cpu(const std::optional<Tensor>& x, const Tensor& out, const std::optional<Tensor>& positions,
                           const std::optional<Tensor>& offsets, int64_t offset, double x_scale,
                           const Tensor& inv_freq, double scale, bool interleaved, bool cos_first) {
  check_sinusoidal_args(x, out, positions, offsets, inv_freq);
  TORCH_CHECK(out.device().is_cpu(), "native_sinusoidal (CPU kernel): out must be a CPU tensor, got ", out.device());
  posenc_alias::check_no_internal_overlap(out, "out");
  if (x.has_value()) posenc_alias::check_out_vs_in(out, "out", *x, "x");
  const int64_t B = out.size(0), S = out.size(1), D = out.size(2);
  if (B * S == 0 || D == 0) return;
  const auto math = out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  sinusoidal_cpu::Params p{};
  p.dtype = out_dtype_code(out.scalar_type());
  p.interleaved = interleaved;
  p.cos_first = cos_first;
  p.has_x = x.has_value();
  p.B = B;
  p.S = S;
  p.D = D;
  p.half = D / 2;
  p.out = out.data_ptr();
  p.osb = out.stride(0);
  p.oss = out.stride(1);
  if (x.has_value()) {
    p.x = x->const_data_ptr();
    p.xsb = x->stride(0);
    p.xss = x->stride(1);
  }
  // O(tokens) conversions, as the torch path does them: positions to the math dtype, offsets to int64.
  Tensor pos_t;
  if (positions.has_value()) {
    pos_t = positions->to(math);
    p.pos_mode = 2;
    p.psb = pos_t.dim() == 2 ? pos_t.stride(0) : 0;
    p.pss = pos_t.stride(-1);
  } else if (offsets.has_value()) {
    pos_t = offsets->to(at::kLong);
    p.pos_mode = 1;
    p.psb = pos_t.stride(0);
  }
  p.pos = pos_t.defined() ? pos_t.const_data_ptr() : nullptr;
  p.offset = offset;
  const Tensor inv = inv_freq.to(math).contiguous();
  p.inv = inv.const_data_ptr();
  p.x_scale = x_scale;
  p.scale = scale;
  const sinusoidal_cpu::TokensFn fn = pick_sinusoidal_variant();
  const int64_t n = B * S;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(D, 1));
  if (n <= grain) {
    fn(p, 0, n);
  } else {
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
  }
}

void native_sinusoidal_meta(const std::optional<Tensor>& x, const Tensor& out, const std::optional<Tensor>& positions,
                            const std::optional<Tensor>& offsets, int64_t offset, double x_scale,
                            const Tensor& inv_freq, double scale, bool interleaved, bool cos_first) {
  check_sinusoidal_args(x, out, positions, offsets, inv_freq);
}

}  // namespace
}  // namespace posenc

TORCH_LIBRARY_IMPL(posenc, CPU, m) { m.impl("native_sinusoidal", &posenc::native_sinusoidal_cpu); }
TORCH_LIBRARY_IMPL(posenc, Meta, m) { m.impl("native_sinusoidal", &posenc::native_sinusoidal_meta); }
#endif  // !POSENC_CPU_VARIANT
