// posenc::native_rope on CPU: in-place (or out-of-place) rotary position embedding.
//
// Work is split over (token, head) items of q and k together with at::parallel_for; a chunk walks its
// items token by token, so the cos/sin row of a token is loaded (or computed) once and serves all of its
// q and k heads. The inner loop is at::vec::Vectorized: storage dtype -> fp32 registers (fp64 for fp64),
// rotate, round on store. Both halves of a pair are loaded before either is written, so q_out may be q.
//
// ISA, chosen at run time like torch's own CPU kernels: the kernel section below is compiled three times,
// here with the baseline flags (-O3, no -march: at::vec's DEFAULT width, runs wherever torch runs) and in
// rope_cpu_avx2.cpp / rope_cpu_avx512.cpp (x86-64 with GCC) under `#pragma GCC target` with the ISA set
// torch uses for its AVX2 / AVX512 kernels. The entry point picks the variant matching
// at::get_cpu_capability() (so ATEN_CPU_CAPABILITY=default|avx2 forces a narrower one, as for torch). Only
// the kernel section (plain pointers, no at::Tensor) is compiled with the wider ISA, and the baseline
// translation units come first on the link line, so shared inline code is the baseline build.
// Why it matters: the DEFAULT bfloat16 <-> fp32 conversions are scalar loops (16x slower than AVX2 here).

#include "cpu_variant.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace posenc {
namespace rope_cpu {

// Everything one chunk of (token, head) items needs, as plain pointers and element strides.
struct Params {
  int dtype;  // 0 float32, 1 float64, 2 float16, 3 bfloat16 (q, k and outputs)
  bool interleaved, conjugate;
  int64_t B, S, Hq, Hk, D, half;
  const void* x[2];  // q, k
  void* o[2];        // q_out, k_out
  int64_t xs[2][3], os[2][3];  // [b, s, h] strides
  bool copy_tail[2];
  int pos_mode;  // 0 offset + s, 1 offsets[b] + s, 2 positions[b, s]
  bool idx64;
  const void* pos;
  int64_t psb, pss, offset;
  int angle_mode;  // 0 tables, 1 fp32 pos * inv_freq, 2 exact (fp64 reduced)
  int table_dtype;  // same codes as dtype
  const void* cos;
  const void* sin;
  int64_t cos_rs, sin_rs, n_rows;
  const float* inv32;
  const double* inv64;
  float attention_factor;
};

using ItemsFn = void (*)(const Params&, int64_t begin, int64_t end);

}  // namespace rope_cpu
}  // namespace posenc

#if POSENC_VARIANT_ENABLED
namespace posenc {
namespace rope_cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Loads/stores of W = 2 * Vectorized<acc_t>::size() elements as two accumulator vectors.
template <typename scalar_t>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename scalar_t>
struct VecIO {  // float / double: two plain vectors
  using V = Vectorized<scalar_t>;
  static constexpr int64_t W = 2 * V::size();
  static inline void load(const scalar_t* p, V& a, V& b) {
    a = V::loadu(p);
    b = V::loadu(p + V::size());
  }
  static inline void store(scalar_t* p, const V& a, const V& b) {
    a.store(p);
    b.store(p + V::size());
  }
};

template <typename scalar_t>
struct VecIOReduced {  // bfloat16 / float16: one storage vector <-> two fp32 vectors
  using V = Vectorized<float>;
  static constexpr int64_t W = Vectorized<scalar_t>::size();
  static_assert(Vectorized<scalar_t>::size() == 2 * Vectorized<float>::size(), "unexpected vector widths");
  static inline void load(const scalar_t* p, V& a, V& b) {
    std::tie(a, b) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
  }
  static inline void store(scalar_t* p, const V& a, const V& b) {
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  }
};
template <>
struct VecIO<c10::BFloat16> : VecIOReduced<c10::BFloat16> {};
template <>
struct VecIO<c10::Half> : VecIOReduced<c10::Half> {};

// Rotate one head: x -> o (o may be x). c/s hold the token's R/2 cos and (signed) sin values.
template <typename scalar_t, bool INTERLEAVED>
inline void rotate_head(const scalar_t* x, scalar_t* o, const typename Acc<scalar_t>::type* c,
                        const typename Acc<scalar_t>::type* s, int64_t half) {
  using acc_t = typename Acc<scalar_t>::type;
  using IO = VecIO<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t VL = V::size();
  int64_t i = 0;
  if constexpr (INTERLEAVED) {
    // Pairs (2i, 2i+1): a block of W channels is VL pairs: deinterleave, rotate, interleave back.
    for (; i + VL <= half; i += VL) {
      V a, b;
      IO::load(x + 2 * i, a, b);
      auto [x1, x2] = at::vec::deinterleave2(a, b);
      const V cv = V::loadu(c + i), sv = V::loadu(s + i);
      const V o1 = x1 * cv - x2 * sv;
      const V o2 = x2 * cv + x1 * sv;
      auto [r0, r1] = at::vec::interleave2(o1, o2);
      IO::store(o + 2 * i, r0, r1);
    }
    for (; i < half; ++i) {
      const acc_t x1 = static_cast<acc_t>(x[2 * i]), x2 = static_cast<acc_t>(x[2 * i + 1]);
      o[2 * i] = static_cast<scalar_t>(x1 * c[i] - x2 * s[i]);
      o[2 * i + 1] = static_cast<scalar_t>(x2 * c[i] + x1 * s[i]);
    }
  } else {
    // Pairs (i, i + R/2): W channels of each half per step.
    constexpr int64_t W = IO::W;
    for (; i + W <= half; i += W) {
      V x1a, x1b, x2a, x2b;
      IO::load(x + i, x1a, x1b);
      IO::load(x + half + i, x2a, x2b);
      const V ca = V::loadu(c + i), cb = V::loadu(c + i + VL);
      const V sa = V::loadu(s + i), sb = V::loadu(s + i + VL);
      IO::store(o + i, x1a * ca - x2a * sa, x1b * cb - x2b * sb);
      IO::store(o + half + i, x2a * ca + x1a * sa, x2b * cb + x1b * sb);
    }
    for (; i < half; ++i) {
      const acc_t x1 = static_cast<acc_t>(x[i]), x2 = static_cast<acc_t>(x[half + i]);
      o[i] = static_cast<scalar_t>(x1 * c[i] - x2 * s[i]);
      o[half + i] = static_cast<scalar_t>(x2 * c[i] + x1 * s[i]);
    }
  }
}


// One table row (any float dtype) -> accumulator values; sin is multiplied by +-1 (conjugate).
template <typename table_t, typename acc_t>
inline void load_table_row(const void* cos_ptr, const void* sin_ptr, int64_t cos_off, int64_t sin_off,
                           int64_t half, acc_t sign, acc_t* c, acc_t* s) {
  const table_t* cr = static_cast<const table_t*>(cos_ptr) + cos_off;
  const table_t* sr = static_cast<const table_t*>(sin_ptr) + sin_off;
  for (int64_t i = 0; i < half; ++i) {
    c[i] = static_cast<acc_t>(cr[i]);
    s[i] = sign * static_cast<acc_t>(sr[i]);
  }
}

template <typename acc_t>
void fill_row(const Params& p, int64_t row, acc_t* c, acc_t* s) {
  const int64_t half = p.half;
  const acc_t sign = p.conjugate ? acc_t(-1) : acc_t(1);
  if (p.angle_mode == 0) {
    if (row < 0 || row >= p.n_rows) {  // outside the table: NaN, never an out-of-bounds read
      std::fill(c, c + half, std::numeric_limits<acc_t>::quiet_NaN());
      std::fill(s, s + half, std::numeric_limits<acc_t>::quiet_NaN());
      return;
    }
    const int64_t co = row * p.cos_rs, so = row * p.sin_rs;
    switch (p.table_dtype) {
      case 0: load_table_row<float>(p.cos, p.sin, co, so, half, sign, c, s); break;
      case 1: load_table_row<double>(p.cos, p.sin, co, so, half, sign, c, s); break;
      case 2: load_table_row<c10::Half>(p.cos, p.sin, co, so, half, sign, c, s); break;
      default: load_table_row<c10::BFloat16>(p.cos, p.sin, co, so, half, sign, c, s); break;
    }
  } else if (p.angle_mode == 2) {
    // Exact: double angle reduced to [-pi, pi] in double, then fp32 cos/sin of the reduced angle.
    constexpr double two_pi = 6.283185307179586476925286766559;
    const double pd = static_cast<double>(row);
    for (int64_t i = 0; i < half; ++i) {
      const double a = pd * p.inv64[i];
      const float r = static_cast<float>(a - two_pi * std::nearbyint(a / two_pi));
      c[i] = static_cast<acc_t>(std::cos(r) * p.attention_factor);
      s[i] = sign * static_cast<acc_t>(std::sin(r) * p.attention_factor);
    }
  } else {
    // HF numerics: one fp32 product fp32(pos) * fp32(inv_freq), fp32 cos/sin.
    const float pf = static_cast<float>(row);
    for (int64_t i = 0; i < half; ++i) {
      const float a = pf * p.inv32[i];
      c[i] = static_cast<acc_t>(std::cos(a) * p.attention_factor);
      s[i] = sign * static_cast<acc_t>(std::sin(a) * p.attention_factor);
    }
  }
}

template <typename scalar_t, bool INTERLEAVED>
void items_impl(const Params& p, int64_t begin, int64_t end) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t H = p.Hq + p.Hk, S = p.S, half = p.half, R = 2 * half;
  const int64_t tail_bytes = (p.D - R) * static_cast<int64_t>(sizeof(scalar_t));
  std::vector<acc_t> buf(2 * half);
  acc_t* c = buf.data();
  acc_t* s = buf.data() + half;
  int64_t cur_tok = -1;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t tok = item / H, h = item - tok * H;
    const int64_t b = tok / S, sq = tok - b * S;
    if (tok != cur_tok) {
      int64_t row = p.offset + sq;
      if (p.pos_mode != 0) {
        const int64_t at = b * p.psb + sq * p.pss;
        const int64_t v = p.idx64 ? static_cast<const int64_t*>(p.pos)[at]
                                  : static_cast<int64_t>(static_cast<const int32_t*>(p.pos)[at]);
        row = p.pos_mode == 2 ? v : v + sq;
      }
      fill_row<acc_t>(p, row, c, s);
      cur_tok = tok;
    }
    const int w = h < p.Hq ? 0 : 1;
    const int64_t hh = w == 0 ? h : h - p.Hq;
    const scalar_t* x = static_cast<const scalar_t*>(p.x[w]) + b * p.xs[w][0] + sq * p.xs[w][1] + hh * p.xs[w][2];
    scalar_t* o = static_cast<scalar_t*>(p.o[w]) + b * p.os[w][0] + sq * p.os[w][1] + hh * p.os[w][2];
    rotate_head<scalar_t, INTERLEAVED>(x, o, c, s, half);
    if (p.copy_tail[w]) std::memcpy(o + R, x + R, tail_bytes);
  }
}

void items(const Params& p, int64_t begin, int64_t end) {
  switch (p.dtype * 2 + (p.interleaved ? 1 : 0)) {
    case 0: return items_impl<float, false>(p, begin, end);
    case 1: return items_impl<float, true>(p, begin, end);
    case 2: return items_impl<double, false>(p, begin, end);
    case 3: return items_impl<double, true>(p, begin, end);
    case 4: return items_impl<c10::Half, false>(p, begin, end);
    case 5: return items_impl<c10::Half, true>(p, begin, end);
    case 6: return items_impl<c10::BFloat16, false>(p, begin, end);
    default: return items_impl<c10::BFloat16, true>(p, begin, end);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace rope_cpu
}  // namespace posenc
#endif  // POSENC_VARIANT_ENABLED

// Each variant exports its entry point (nullptr where the compiler cannot build it).
#if !defined(POSENC_CPU_VARIANT)
namespace posenc::rope_cpu {
ItemsFn items_default() { return &DEFAULT::items; }
}
#elif POSENC_CPU_VARIANT == 2
namespace posenc::rope_cpu {
#if POSENC_VARIANT_ENABLED
ItemsFn items_avx2() { return &AVX2::items; }
#else
ItemsFn items_avx2() { return nullptr; }
#endif
}
#elif POSENC_CPU_VARIANT == 3
namespace posenc::rope_cpu {
#if POSENC_VARIANT_ENABLED
ItemsFn items_avx512() { return &AVX512::items; }
#else
ItemsFn items_avx512() { return nullptr; }
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

namespace posenc::rope_cpu {
ItemsFn items_avx2();
ItemsFn items_avx512();
}  // namespace posenc::rope_cpu

namespace posenc {
namespace {

using at::Tensor;

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

bool is_index(at::ScalarType t) { return t == at::kInt || t == at::kLong; }

// Shape/dtype/device checks shared by the CPU and Meta kernels. Returns R/2.
int64_t check_rope_args(const Tensor& q, const std::optional<Tensor>& k, const Tensor& q_out,
                        const std::optional<Tensor>& k_out, const std::optional<Tensor>& cos,
                        const std::optional<Tensor>& sin, const std::optional<Tensor>& inv_freq,
                        const std::optional<Tensor>& positions, const std::optional<Tensor>& offsets,
                        bool exact) {
  TORCH_CHECK(q.dim() == 4, "native_rope: q must be [B, S, Hq, D], got shape ", q.sizes());
  TORCH_CHECK(is_float(q.scalar_type()), "native_rope: q must be float16/bfloat16/float32/float64, got ",
              q.scalar_type());
  const auto B = q.size(0), S = q.size(1), D = q.size(3);
  const auto dev = q.device();
  auto check_last = [](const Tensor& t, const char* name) {
    TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, "native_rope: ", name,
                " must have stride(-1) == 1 (other strides are fine), got strides ", t.strides());
  };
  auto check_dev = [&](const Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == dev, "native_rope: ", name, " must be on ", dev, " like q, got ", t.device());
  };
  check_last(q, "q");
  TORCH_CHECK(q_out.sizes() == q.sizes(), "native_rope: q_out must have q's shape ", q.sizes(), ", got ",
              q_out.sizes());
  TORCH_CHECK(q_out.scalar_type() == q.scalar_type(), "native_rope: q_out must have q's dtype ",
              q.scalar_type(), ", got ", q_out.scalar_type());
  check_dev(q_out, "q_out");
  check_last(q_out, "q_out");
  TORCH_CHECK(k.has_value() == k_out.has_value(), "native_rope: pass k and k_out together (or neither)");
  if (k.has_value()) {
    TORCH_CHECK(k->dim() == 4 && k->size(0) == B && k->size(1) == S && k->size(3) == D,
                "native_rope: k must be [B, S, Hk, D] = [", B, ", ", S, ", Hk, ", D, "] to match q, got ",
                k->sizes());
    TORCH_CHECK(k->scalar_type() == q.scalar_type(), "native_rope: k must have q's dtype ", q.scalar_type(),
                ", got ", k->scalar_type());
    check_dev(*k, "k");
    check_last(*k, "k");
    TORCH_CHECK(k_out->sizes() == k->sizes(), "native_rope: k_out must have k's shape ", k->sizes(),
                ", got ", k_out->sizes());
    TORCH_CHECK(k_out->scalar_type() == k->scalar_type(), "native_rope: k_out must have k's dtype");
    check_dev(*k_out, "k_out");
    check_last(*k_out, "k_out");
  }
  int64_t half = 0;
  TORCH_CHECK(cos.has_value() == sin.has_value(), "native_rope: pass cos and sin together (or neither)");
  TORCH_CHECK(cos.has_value() != inv_freq.has_value(),
              "native_rope: pass either cos/sin tables or inv_freq (exactly one angle source)");
  if (cos.has_value()) {
    for (const Tensor* t : {&*cos, &*sin}) {
      const char* name = t == &*cos ? "cos" : "sin";
      TORCH_CHECK(t->dim() == 2, "native_rope: ", name, " must be [P, R/2], got shape ", t->sizes());
      TORCH_CHECK(is_float(t->scalar_type()), "native_rope: ", name, " must be a floating tensor, got ",
                  t->scalar_type());
      check_dev(*t, name);
      check_last(*t, name);
    }
    TORCH_CHECK(cos->sizes() == sin->sizes(), "native_rope: cos and sin must have the same shape, got ",
                cos->sizes(), " and ", sin->sizes());
    TORCH_CHECK(cos->scalar_type() == sin->scalar_type(), "native_rope: cos and sin must have the same dtype");
    half = cos->size(1);
  } else {
    TORCH_CHECK(inv_freq->dim() == 1, "native_rope: inv_freq must be [R/2], got shape ", inv_freq->sizes());
    TORCH_CHECK(is_float(inv_freq->scalar_type()), "native_rope: inv_freq must be a floating tensor, got ",
                inv_freq->scalar_type());
    TORCH_CHECK(!exact || inv_freq->scalar_type() == at::kDouble,
                "native_rope: exact=True needs float64 inv_freq, got ", inv_freq->scalar_type());
    check_dev(*inv_freq, "inv_freq");
    half = inv_freq->size(0);
  }
  TORCH_CHECK(half >= 1, "native_rope: the rotary dim R = 2 * cos.size(-1) (or 2 * inv_freq.size(0)) must be "
              ">= 2, got R/2 = ", half);
  TORCH_CHECK(2 * half <= D, "native_rope: rotary dim R = ", 2 * half, " exceeds head_dim D = ", D);
  TORCH_CHECK(!(positions.has_value() && offsets.has_value()), "native_rope: pass positions or offsets, not both");
  if (positions.has_value()) {
    TORCH_CHECK(is_index(positions->scalar_type()), "native_rope: positions must be int32/int64, got ",
                positions->scalar_type());
    const bool ok = (positions->dim() == 1 && positions->size(0) == S) ||
                    (positions->dim() == 2 && positions->size(0) == B && positions->size(1) == S);
    TORCH_CHECK(ok, "native_rope: positions must be [S] = [", S, "] or [B, S] = [", B, ", ", S, "], got ",
                positions->sizes());
    check_dev(*positions, "positions");
  }
  if (offsets.has_value()) {
    TORCH_CHECK(is_index(offsets->scalar_type()), "native_rope: offsets must be int32/int64, got ",
                offsets->scalar_type());
    TORCH_CHECK(offsets->dim() == 1 && offsets->size(0) == B, "native_rope: offsets must be [B] = [", B,
                "], got ", offsets->sizes());
    check_dev(*offsets, "offsets");
  }
  return half;
}


int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    default: return 3;
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

void native_rope_cpu(const Tensor& q, const std::optional<Tensor>& k, const Tensor& q_out,
                     const std::optional<Tensor>& k_out, const std::optional<Tensor>& cos,
                     const std::optional<Tensor>& sin, const std::optional<Tensor>& inv_freq,
                     const std::optional<Tensor>& positions, const std::optional<Tensor>& offsets, int64_t offset,
                     double attention_factor, bool interleaved, bool conjugate, bool exact) {
  const int64_t half = check_rope_args(q, k, q_out, k_out, cos, sin, inv_freq, positions, offsets, exact);
  TORCH_CHECK(q.device().is_cpu(), "native_rope (CPU kernel): q must be a CPU tensor, got ", q.device());
  // Arguments the chosen mode would ignore are errors, not silently dropped (as in the CUDA glue).
  TORCH_CHECK(!cos.has_value() || (attention_factor == 1.0 && !exact),
              "native_rope: attention_factor and exact apply to inv_freq angles; tables carry the factor already");
  TORCH_CHECK(!(positions.has_value() || offsets.has_value()) || offset == 0,
              "native_rope: offset must be 0 when positions or offsets tensors are given, got ", offset);
  posenc_alias::check_rope_outputs(q, k, q_out, k_out);  // aliasing, before any write
  rope_cpu::Params p{};
  p.dtype = dtype_code(q.scalar_type());
  p.interleaved = interleaved;
  p.conjugate = conjugate;
  p.B = q.size(0);
  p.S = q.size(1);
  p.Hq = q.size(2);
  p.Hk = k.has_value() ? k->size(2) : 0;
  p.D = q.size(3);
  p.half = half;
  const int64_t n_items = p.B * p.S * (p.Hq + p.Hk);
  if (n_items == 0) return;
  const int64_t R = 2 * half;
  auto set = [&](int w, const Tensor& x, const Tensor& o) {
    p.x[w] = x.const_data_ptr();
    p.o[w] = o.data_ptr();
    for (int d = 0; d < 3; ++d) {
      p.xs[w][d] = x.stride(d);
      p.os[w][d] = o.stride(d);
    }
    // Pass-through channels [R, D) are copied only out of place.
    p.copy_tail[w] = R < p.D && (p.o[w] != p.x[w] || x.strides() != o.strides());
  };
  set(0, q, q_out);
  if (k.has_value()) set(1, *k, *k_out);
  p.offset = offset;
  if (positions.has_value()) {
    p.pos_mode = 2;
    p.idx64 = positions->scalar_type() == at::kLong;
    p.pos = positions->const_data_ptr();
    p.psb = positions->dim() == 2 ? positions->stride(0) : 0;
    p.pss = positions->stride(-1);
    p.offset = 0;
  } else if (offsets.has_value()) {
    p.pos_mode = 1;
    p.idx64 = offsets->scalar_type() == at::kLong;
    p.pos = offsets->const_data_ptr();
    p.psb = offsets->stride(0);
    p.offset = 0;
  }
  std::vector<float> inv32;
  std::vector<double> inv64;
  if (cos.has_value()) {
    p.angle_mode = 0;
    p.table_dtype = dtype_code(cos->scalar_type());
    p.cos = cos->const_data_ptr();
    p.sin = sin->const_data_ptr();
    p.cos_rs = cos->stride(0);
    p.sin_rs = sin->stride(0);
    p.n_rows = cos->size(0);
  } else {
    // inv_freq as fp32 (default) or fp64 (exact): converted once per call, R/2 values.
    const Tensor inv = inv_freq->contiguous();
    if (exact) {
      inv64.assign(inv.const_data_ptr<double>(), inv.const_data_ptr<double>() + half);
      p.inv64 = inv64.data();
      p.angle_mode = 2;
    } else {
      const Tensor f = inv.to(at::kFloat);
      inv32.assign(f.const_data_ptr<float>(), f.const_data_ptr<float>() + half);
      p.inv32 = inv32.data();
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

// Meta (fake tensor) kernel: the same checks, nothing written.
void native_rope_meta(const Tensor& q, const std::optional<Tensor>& k, const Tensor& q_out,
                      const std::optional<Tensor>& k_out, const std::optional<Tensor>& cos,
                      const std::optional<Tensor>& sin, const std::optional<Tensor>& inv_freq,
                      const std::optional<Tensor>& positions, const std::optional<Tensor>& offsets, int64_t offset,
                      double attention_factor, bool interleaved, bool conjugate, bool exact) {
  check_rope_args(q, k, q_out, k_out, cos, sin, inv_freq, positions, offsets, exact);
}

}  // namespace
}  // namespace posenc

TORCH_LIBRARY_IMPL(posenc, CPU, m) { m.impl("native_rope", &posenc::native_rope_cpu); }
TORCH_LIBRARY_IMPL(posenc, Meta, m) { m.impl("native_rope", &posenc::native_rope_meta); }
#endif  // !POSENC_CPU_VARIANT
