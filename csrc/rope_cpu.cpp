// posenc::rope_ / posenc::rope on CPU: in-place (or out-of-place) rotary position embedding.
//
// Rows: positions [S] / [B, S] (any integer dtype), offsets [B] + s, offset + s, packed varlen (cu_seqlens:
// per-token positions built once, O(T) int64), or per frequency with an axis map (positions [A, B, S]).
// Any strides: unit channel stride takes the vector path, any other a scalar strided path (in place too).
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
#include "exact_angle.h"
#include "positions.h"

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
  int64_t xs[2][4], os[2][4];  // [b, s, h, d] strides
  bool unit[2];                // x and o of q (k) have unit channel stride: the vector path
  bool copy_tail[2];
  // Row of token (b, s) (positions.h); cu_seqlens arrive as per-token int64 positions (sb 0, ss 1).
  RowSource rows;
  // Axis map: frequency i follows positions[axis[i] * psa + b * rows.sb + s * rows.ss] (rows.mode is
  // kPosPositions); axis[i] < 0 marks an axis outside positions (value checks off): NaN, never a read.
  const int64_t* axis;
  int64_t psa;
  int angle_mode;  // 0 tables, 1 fp32 pos * inv_freq, 2 exact (fp64 reduced, exact_angle.h)
  int table_dtype;  // same codes as dtype
  const void* cos;
  const void* sin;
  int64_t cos_rs, sin_rs, cos_cs, sin_cs, n_rows;
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


// Rotate one head through element strides (a non-unit channel stride: scalar, never a hidden copy).
template <typename scalar_t>
inline void rotate_head_strided(const scalar_t* x, int64_t xd, scalar_t* o, int64_t od,
                                const typename Acc<scalar_t>::type* c, const typename Acc<scalar_t>::type* s,
                                int64_t half, bool interleaved) {
  using acc_t = typename Acc<scalar_t>::type;
  for (int64_t i = 0; i < half; ++i) {
    const int64_t i1 = interleaved ? 2 * i : i, i2 = interleaved ? 2 * i + 1 : half + i;
    const acc_t x1 = static_cast<acc_t>(x[i1 * xd]), x2 = static_cast<acc_t>(x[i2 * xd]);
    o[i1 * od] = static_cast<scalar_t>(x1 * c[i] - x2 * s[i]);
    o[i2 * od] = static_cast<scalar_t>(x2 * c[i] + x1 * s[i]);
  }
}

// Table entries (row rows[i] or `row`, column i; any float dtype) -> accumulator values; sin times +-1
// (conjugate). A row outside [0, n_rows) gives NaN, never an out-of-bounds read (value checks off).
template <typename table_t, typename acc_t>
inline void load_table(const Params& p, int64_t row, const int64_t* rows, acc_t sign, acc_t* c, acc_t* s) {
  const table_t* ct = static_cast<const table_t*>(p.cos);
  const table_t* st = static_cast<const table_t*>(p.sin);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  if (rows == nullptr) {
    if (row < 0 || row >= p.n_rows) {
      std::fill(c, c + p.half, nan);
      std::fill(s, s + p.half, nan);
      return;
    }
    const table_t* cr = ct + row * p.cos_rs;
    const table_t* sr = st + row * p.sin_rs;
    if (p.cos_cs == 1 && p.sin_cs == 1) {
      for (int64_t i = 0; i < p.half; ++i) {
        c[i] = static_cast<acc_t>(cr[i]);
        s[i] = sign * static_cast<acc_t>(sr[i]);
      }
    } else {
      for (int64_t i = 0; i < p.half; ++i) {
        c[i] = static_cast<acc_t>(cr[i * p.cos_cs]);
        s[i] = sign * static_cast<acc_t>(sr[i * p.sin_cs]);
      }
    }
    return;
  }
  for (int64_t i = 0; i < p.half; ++i) {  // per-frequency rows (axis map)
    const int64_t r = rows[i];
    if (r < 0 || r >= p.n_rows) {
      c[i] = s[i] = nan;
      continue;
    }
    c[i] = static_cast<acc_t>(ct[r * p.cos_rs + i * p.cos_cs]);
    s[i] = sign * static_cast<acc_t>(st[r * p.sin_rs + i * p.sin_cs]);
  }
}

constexpr int64_t kNoRow = std::numeric_limits<int64_t>::min();  // an axis outside positions

// cos/sin of every pair for one token: position `row`, or per-frequency positions rows[i] (axis map).
template <typename acc_t>
void fill_row(const Params& p, int64_t row, const int64_t* rows, acc_t* c, acc_t* s) {
  const int64_t half = p.half;
  const acc_t sign = p.conjugate ? acc_t(-1) : acc_t(1);
  if (p.angle_mode == 0) {
    switch (p.table_dtype) {
      case 0: return load_table<float>(p, row, rows, sign, c, s);
      case 1: return load_table<double>(p, row, rows, sign, c, s);
      case 2: return load_table<c10::Half>(p, row, rows, sign, c, s);
      default: return load_table<c10::BFloat16>(p, row, rows, sign, c, s);
    }
  }
  for (int64_t i = 0; i < half; ++i) {
    const int64_t r = rows ? rows[i] : row;
    if (r == kNoRow) {
      c[i] = s[i] = std::numeric_limits<acc_t>::quiet_NaN();
      continue;
    }
    // exact: exact_angle.h's reduction (one algorithm for every backend); else HF numerics: one fp32
    // product fp32(pos) * fp32(inv_freq). Then fp32 cos/sin times the fp32 attention_factor.
    const float a = p.angle_mode == 2 ? posenc_exact::reduced_angle(static_cast<double>(r), p.inv64[i])
                                      : static_cast<float>(r) * p.inv32[i];
    c[i] = static_cast<acc_t>(std::cos(a) * p.attention_factor);
    s[i] = sign * static_cast<acc_t>(std::sin(a) * p.attention_factor);
  }
}

// Per-call scratch on the stack up to kStack pairs (decode never allocates), else on the heap.
constexpr int64_t kStack = 512;

template <typename scalar_t, bool INTERLEAVED>
void items_impl(const Params& p, int64_t begin, int64_t end) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t H = p.Hq + p.Hk, S = p.S, half = p.half, R = 2 * half;
  const int64_t tail = p.D - R;
  acc_t stack_cs[2 * kStack];
  int64_t stack_rows[kStack];
  std::vector<acc_t> heap_cs;
  std::vector<int64_t> heap_rows;
  acc_t* c = stack_cs;
  int64_t* prow = stack_rows;
  if (half > kStack) {
    heap_cs.resize(2 * half);
    c = heap_cs.data();
    if (p.axis) {
      heap_rows.resize(half);
      prow = heap_rows.data();
    }
  }
  acc_t* s = c + half;
  int64_t cur_tok = -1;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t tok = item / H, h = item - tok * H;
    const int64_t b = tok / S, sq = tok - b * S;
    if (tok != cur_tok) {
      if (p.axis) {
        const int64_t base = b * p.rows.sb + sq * p.rows.ss;
        for (int64_t i = 0; i < half; ++i) {
          prow[i] = p.axis[i] < 0 ? kNoRow : load_index(p.rows.ptr, p.rows.code, p.axis[i] * p.psa + base);
        }
        fill_row<acc_t>(p, 0, prow, c, s);
      } else {
        fill_row<acc_t>(p, token_row(p.rows, b, sq), nullptr, c, s);
      }
      cur_tok = tok;
    }
    const int w = h < p.Hq ? 0 : 1;
    const int64_t hh = w == 0 ? h : h - p.Hq;
    const scalar_t* x = static_cast<const scalar_t*>(p.x[w]) + b * p.xs[w][0] + sq * p.xs[w][1] + hh * p.xs[w][2];
    scalar_t* o = static_cast<scalar_t*>(p.o[w]) + b * p.os[w][0] + sq * p.os[w][1] + hh * p.os[w][2];
    if (p.unit[w]) {
      rotate_head<scalar_t, INTERLEAVED>(x, o, c, s, half);
      if (p.copy_tail[w]) std::memcpy(o + R, x + R, tail * static_cast<int64_t>(sizeof(scalar_t)));
    } else {
      const int64_t xd = p.xs[w][3], od = p.os[w][3];
      rotate_head_strided<scalar_t>(x, xd, o, od, c, s, half, INTERLEAVED);
      if (p.copy_tail[w]) {
        for (int64_t d = R; d < p.D; ++d) o[d * od] = x[d * xd];
      }
    }
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

namespace posenc::rope_cpu {
ItemsFn items_avx2();
ItemsFn items_avx512();
}  // namespace posenc::rope_cpu

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
#endif  // !POSENC_CPU_VARIANT
