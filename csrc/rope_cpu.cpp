// posenc::rope_ / posenc::rope on CPU: in-place (or out-of-place) rotary position embedding (and the item
// kernels of posenc::qk_norm_rope_ and posenc::rope_and_cache_: with Params::cache set, each rotated k head,
// as stored, is copied or FP8-quantised into its KV-cache row right after it is written).
//
// Rows: positions [S] / [B, S] (any integer dtype), offsets [B] + s, offset + s, packed varlen (cu_seqlens:
// per-token positions built once, O(T) int64), or per frequency with an axis map (positions [A, B, S]).
// Any strides: unit channel stride takes the vector path, any other a scalar strided path (in place too).
// Work is split over (token, head) items of q and k together (cpu_parallel.h: a grain from the bytes
// moved, small calls inline); a chunk walks its items token by token, so the cos/sin row of a token is
// loaded (or computed) once and serves all of its q and k heads. The inner loop is at::vec::Vectorized:
// storage dtype -> fp32 registers (fp64 for fp64), rotate, round on store. Both halves of a pair are
// loaded before either is written, so q_out may be q.
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
#include "rope_cpu.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>


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

// Rotate one head: x -> o (o may be x). c/s hold the token's R/2 cos and (signed) sin values. x is in the
// storage dtype, or (in_t = acc_t) the normalised values of the QK-norm path.
template <typename scalar_t, bool INTERLEAVED, typename in_t = scalar_t>
inline void rotate_head(const in_t* x, scalar_t* o, const typename Acc<scalar_t>::type* c,
                        const typename Acc<scalar_t>::type* s, int64_t half) {
  using acc_t = typename Acc<scalar_t>::type;
  using IO = VecIO<scalar_t>;
  using IN = VecIO<in_t>;
  static_assert(IN::W == IO::W, "input and output blocks must have the same width");
  using V = Vectorized<acc_t>;
  constexpr int64_t VL = V::size();
  int64_t i = 0;
  if constexpr (INTERLEAVED) {
    // Pairs (2i, 2i+1): a block of W channels is VL pairs: deinterleave, rotate, interleave back.
    for (; i + VL <= half; i += VL) {
      V a, b;
      IN::load(x + 2 * i, a, b);
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
      IN::load(x + i, x1a, x1b);
      IN::load(x + half + i, x2a, x2b);
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
template <typename scalar_t, typename in_t = scalar_t>
inline void rotate_head_strided(const in_t* x, int64_t xd, scalar_t* o, int64_t od,
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

// ---- the cache write of posenc::rope_and_cache_ (CacheParams) ----

// The cache row (n0, n1) of token (b, s); false: not written (slot / position -1, a token past the slot
// mapping, or a row outside the cache when value checks are off: never an out-of-bounds write).
inline bool cache_row(const CacheParams& c, int64_t b, int64_t s, int64_t& n0, int64_t& n1) {
  if (c.paged) {
    if (s >= c.idx_len) return false;
    const int64_t slot = load_index(c.idx, c.idx_code, s * c.idx_ss);
    if (slot < 0 || slot >= c.n0 * c.n1) return false;
    n0 = slot / c.n1;
    n1 = slot - n0 * c.n1;
    return true;
  }
  const int64_t pos = load_index(c.idx, c.idx_code, b * c.idx_sb + s * c.idx_ss);
  if (pos < 0 || pos >= c.n1 || b >= c.n0) return false;
  n0 = b;
  n1 = pos;
  return true;
}

// ---- FP8 quantisation (torch_impl.quantise): fp32(x) / scale (an IEEE fp32 division), clamped to the
// format's finite range (NaN stays NaN), rounded to nearest even exactly as c10's conversion (torch's own
// cast) rounds. c10's fp8e4m3fn_from_fp32_value / fp8e5m2_from_fp32_value branch per element (NaN / large,
// below the normal range, normal) and the compiler keeps them scalar; fp8_bits below computes every branch
// (the same integer and fp32 operations, the subnormal path's fp32 add included) and selects one, so a loop
// over a row vectorises under the AVX2 / AVX512 variants: bit for bit c10's byte for every fp32 input
// (tests/native/test_cache_native.py test_fp8_conversion_*: every bf16 and fp16 pattern, 2^20 fp32 patterns
// spread over every exponent, the fp8 grid and its midpoints +-1 ulp, subnormals, the clamp edges, NaN, inf).

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float f32_from(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// The FP8 byte of f: FMT 1 float8_e4m3fn, 2 float8_e5m2 (c10's conversion, branch-free).
template <int FMT>
inline uint32_t fp8_bits(float f) {
  // e4m3fn: first value past the range 480 (1087 << 20), subnormal threshold 2^-6 (121 << 23), denorm magic
  // ((127 - 7) + (23 - 3) + 1) << 23, 3 mantissa bits (shift 20). e5m2: 65536 (143 << 23), 2^-14 (113 << 23),
  // ((127 - 15) + (23 - 2) + 1) << 23, shift 21.
  constexpr uint32_t kMax = FMT == 1 ? (UINT32_C(1087) << 20) : (UINT32_C(143) << 23);
  constexpr uint32_t kNormal = FMT == 1 ? (UINT32_C(121) << 23) : (UINT32_C(113) << 23);
  constexpr uint32_t kDenorm = FMT == 1 ? (UINT32_C(141) << 23) : (UINT32_C(134) << 23);
  constexpr int kShift = FMT == 1 ? 20 : 21;
  constexpr uint32_t kBias = FMT == 1 ? ((uint32_t)(7 - 127) << 23) + 0x7FFFF : ((uint32_t)(15 - 127) << 23) + 0xFFFFF;
  const uint32_t bits = f32_bits(f);
  const uint32_t sign = bits & UINT32_C(0x80000000);
  const uint32_t a = bits ^ sign;  // |f|'s bits
  // below the normal range: the fp32 add rounds the mantissa into place (as c10 does)
  const uint32_t den = f32_bits(f32_from(a) + f32_from(kDenorm)) - kDenorm;
  // normal: rebias the exponent, round half to even by the bias plus the kept mantissa's lowest bit
  uint32_t nrm = (a + kBias + ((a >> kShift) & 1u)) >> kShift;
  if constexpr (FMT == 1) nrm -= static_cast<uint32_t>((nrm & 0xFFu) == 0x7Fu);  // a carry into NaN's saturates
  // past the range: NaN -> NaN; e4m3fn saturates (0x7E), e5m2 goes to inf (0x7C)
  const uint32_t big = a > UINT32_C(0x7F800000) ? 0x7Fu : (FMT == 1 ? 0x7Eu : 0x7Cu);
  // the selects as masks (all ones / zero): a select g++ would sink the fp32 add into a branch of, and a
  // loop with a branch does not vectorise
  const uint32_t m_den = 0u - static_cast<uint32_t>(a < kNormal);
  const uint32_t m_big = 0u - static_cast<uint32_t>(a >= kMax);
  const uint32_t r = (((den & m_den) | (nrm & ~m_den)) & ~m_big) | (big & m_big);
  return (r | (sign >> 24)) & 0xFFu;
}

// Elements per quantisation chunk (fp32 and byte buffers on the stack).
constexpr int64_t kQuantChunk = 256;

// o[i] = the FP8 byte of clamp(x[i] / scale) for n <= kQuantChunk fp32 values (loops the compiler vectorises).
// The clamp to [-max, max] is done on the quotient's bits (a magnitude above max's bits and not NaN's becomes
// max's, the sign kept): the same value as the fp32 compares, which g++ would thread into branches (no
// vectors). The bytes go through a 32-bit buffer and a narrowing loop: narrowing inside the main loop made
// g++ pack its masks to bytes and spill (~1.5x slower in AVX512, AVX2 and SSE2 builds here).
template <int FMT>
inline void quantise_f32(const float* __restrict x, uint8_t* __restrict o, int64_t n, float scale) {
  // finfo(float8_e4m3fn).max = 448 = 0x43E00000, finfo(float8_e5m2).max = 57344 = 0x47600000
  constexpr uint32_t kFmax = FMT == 1 ? UINT32_C(0x43E00000) : UINT32_C(0x47600000);
  alignas(64) uint32_t r[kQuantChunk];
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t y = f32_bits(x[i] / scale);
    const uint32_t sign = y & UINT32_C(0x80000000);
    uint32_t a = y ^ sign;
    const uint32_t m = 0u - static_cast<uint32_t>((a > kFmax) & (a <= UINT32_C(0x7F800000)));  // inf too, not NaN
    a = (kFmax & m) | (a & ~m);
    r[i] = fp8_bits<FMT>(f32_from(a | sign));
  }
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<uint8_t>(r[i]);
}

// n elements x[d * xd] (any float dtype) -> fp32 f[0, n) (exact: every storage dtype but fp64 widens exactly;
// fp64 rounds to fp32 as x.to(float32) does).
template <typename scalar_t>
inline void widen_row(const scalar_t* x, int64_t xd, float* f, int64_t n) {
  int64_t d = 0;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
    if (xd == 1) {
      constexpr int64_t W = Vectorized<scalar_t>::size();
      for (; d + W <= n; d += W) {
        const auto [a, b] = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(x + d));
        a.store(f + d);
        b.store(f + d + W / 2);
      }
    }
  }
  for (; d < n; ++d) f[d] = static_cast<float>(x[d * xd]);
}

// n elements x[d * xd] -> FP8 bytes o[d * od], a head row at a time through fp32 chunks on the stack.
template <typename scalar_t, int FMT>
inline void quantise_row(const scalar_t* x, int64_t xd, uint8_t* o, int64_t od, int64_t n, float scale) {
  alignas(64) float f[kQuantChunk];
  alignas(64) uint8_t b[kQuantChunk];
  for (int64_t d0 = 0; d0 < n; d0 += kQuantChunk) {
    const int64_t m = std::min(kQuantChunk, n - d0);
    const float* src = f;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (xd == 1) src = x + d0;  // fp32 input: quantised where it lies
    }
    if (src == f) widen_row<scalar_t>(x + d0 * xd, xd, f, m);
    uint8_t* dst = od == 1 ? o + d0 : b;
    quantise_f32<FMT>(src, dst, m, scale);
    if (od != 1) {
      for (int64_t d = 0; d < m; ++d) o[(d0 + d) * od] = b[d];
    }
  }
}

// n elements x[d * xd] (input dtype) -> dst (unit stride: a cache row; else dd): a copy, or quantised.
template <typename scalar_t>
inline void store_row(const scalar_t* x, int64_t xd, void* dst, int64_t dd, int64_t n, int fp8, float scale) {
  if (fp8 == 0) {
    scalar_t* o = static_cast<scalar_t*>(dst);
    if (xd == 1 && dd == 1) {
      std::memcpy(o, x, n * static_cast<int64_t>(sizeof(scalar_t)));
    } else {
      for (int64_t d = 0; d < n; ++d) o[d * dd] = x[d * xd];
    }
    return;
  }
  uint8_t* o = static_cast<uint8_t*>(dst);
  if (fp8 == 1) {
    quantise_row<scalar_t, 1>(x, xd, o, dd, n, scale);
  } else {
    quantise_row<scalar_t, 2>(x, xd, o, dd, n, scale);
  }
}

// k head h of token (b, s), as stored in k_out (ko, channel stride kod), and v's head h -> cache row (n0, n1).
template <typename scalar_t>
inline void write_kv(const CacheParams& c, int64_t D, int64_t b, int64_t s, int64_t n0, int64_t n1, int64_t h,
                     const scalar_t* ko, int64_t kod) {
  const int64_t es = c.fp8 ? 1 : static_cast<int64_t>(sizeof(scalar_t));
  char* kd = static_cast<char*>(c.kc) + (n0 * c.kcs[0] + n1 * c.kcs[1] + h * c.kcs[2]) * es;
  store_row<scalar_t>(ko, kod, kd, 1, D, c.fp8, c.fp8 ? c.k_scale[h * c.k_scale_h] : 1.0f);
  if (c.vc == nullptr) return;
  const scalar_t* vx = static_cast<const scalar_t*>(c.v) + b * c.vs[0] + s * c.vs[1] + h * c.vs[2];
  char* vd = static_cast<char*>(c.vc) + (n0 * c.vcs[0] + n1 * c.vcs[1] + h * c.vcs[2]) * es;
  store_row<scalar_t>(vx, c.vs[3], vd, 1, c.Dv, c.fp8, c.fp8 ? c.v_scale[h * c.v_scale_h] : 1.0f);
}

// The rotated q head h of token (b, s) (qr: q's dtype, unit stride) quantised into q_fp8.
template <typename scalar_t>
inline void write_q8(const CacheParams& c, int64_t D, int64_t b, int64_t s, int64_t h, const scalar_t* qr) {
  uint8_t* dst = static_cast<uint8_t*>(c.q8) + b * c.q8s[0] + s * c.q8s[1] + h * c.q8s[2];
  store_row<scalar_t>(qr, 1, dst, c.q8s[3], D, c.q8_fp8, c.q_scale[h * c.q_scale_h]);
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
    const table_t* cr = ct + row * p.stride_cos_p;
    const table_t* sr = st + row * p.stride_sin_p;
    if (p.stride_cos_f == 1 && p.stride_sin_f == 1) {
      for (int64_t i = 0; i < p.half; ++i) {
        c[i] = static_cast<acc_t>(cr[i]);
        s[i] = sign * static_cast<acc_t>(sr[i]);
      }
    } else {
      for (int64_t i = 0; i < p.half; ++i) {
        c[i] = static_cast<acc_t>(cr[i * p.stride_cos_f]);
        s[i] = sign * static_cast<acc_t>(sr[i * p.stride_sin_f]);
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
    c[i] = static_cast<acc_t>(ct[r * p.stride_cos_p + i * p.stride_cos_f]);
    s[i] = sign * static_cast<acc_t>(st[r * p.stride_sin_p + i * p.stride_sin_f]);
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
      case kFloat: return load_table<float>(p, row, rows, sign, c, s);
      case kDouble: return load_table<double>(p, row, rows, sign, c, s);
      case kHalf: return load_table<c10::Half>(p, row, rows, sign, c, s);
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
  // rope_and_cache_: the token's cache row; with q_fp8 a q head is rotated into qbuf, then quantised
  const CacheParams* cp = p.cache;
  const bool q8 = cp != nullptr && cp->q8 != nullptr;
  scalar_t stack_q[2 * kStack];
  std::vector<scalar_t> heap_q;
  scalar_t* qbuf = stack_q;
  if (q8 && p.D > 2 * kStack) {
    heap_q.resize(p.D);
    qbuf = heap_q.data();
  }
  int64_t row0 = 0, row1 = 0;
  bool row_ok = false;
  int64_t cur_tok = -1;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t tok = item / H, h = item - tok * H;
    const int64_t b = tok / S, sq = tok - b * S;
    if (tok != cur_tok) {
      if (cp != nullptr) row_ok = cache_row(*cp, b, sq, row0, row1);
      if (p.axis) {
        const int64_t base = b * p.rows.stride_pos_b + sq * p.rows.stride_pos_s;
        for (int64_t i = 0; i < half; ++i) {
          prow[i] = p.axis[i] < 0 ? kNoRow : load_index(p.rows.ptr, p.rows.code, p.axis[i] * p.stride_pos_a + base);
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
    if (w == 0 && q8) {  // q_fp8: q's dtype in qbuf (pass-through channels too), then quantised; q_out untouched
      const int64_t xd = p.xs[0][3];
      if (xd == 1 || p.D <= 1) {
        rotate_head<scalar_t, INTERLEAVED>(x, qbuf, c, s, half);
      } else {
        rotate_head_strided<scalar_t>(x, xd, qbuf, 1, c, s, half, INTERLEAVED);
      }
      for (int64_t d = R; d < p.D; ++d) qbuf[d] = x[d * xd];
      write_q8<scalar_t>(*cp, p.D, b, sq, hh, qbuf);
      continue;
    }
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
    if (w == 1 && row_ok) write_kv<scalar_t>(*cp, p.D, b, sq, row0, row1, hh, o, p.os[1][3]);
  }
}

void items(const Params& p, int64_t begin, int64_t end) {
  switch (p.dtype) {
    case kFloat: return p.interleaved ? items_impl<float, true>(p, begin, end) : items_impl<float, false>(p, begin, end);
    case kDouble:
      return p.interleaved ? items_impl<double, true>(p, begin, end) : items_impl<double, false>(p, begin, end);
    case kHalf:
      return p.interleaved ? items_impl<c10::Half, true>(p, begin, end) : items_impl<c10::Half, false>(p, begin, end);
    default:
      return p.interleaved ? items_impl<c10::BFloat16, true>(p, begin, end)
                           : items_impl<c10::BFloat16, false>(p, begin, end);
  }
}

// ---- QK-norm + RoPE (posenc::qk_norm_rope_ / qk_norm_rope): RMSNorm with accumulator statistics, times
// (weight_offset + w), into an accumulator row; then the rotation above from that row, one rounding on store.

// Sum of x[d]^2 over D channels (unit stride: vectors; else scalar through the stride).
template <typename scalar_t>
inline typename Acc<scalar_t>::type sum_squares(const scalar_t* x, int64_t xd, bool unit, int64_t D) {
  using acc_t = typename Acc<scalar_t>::type;
  using IO = VecIO<scalar_t>;
  using V = Vectorized<acc_t>;
  acc_t ss = 0;
  int64_t d = 0;
  if (unit) {
    V a0(acc_t(0)), a1(acc_t(0));
    for (; d + IO::W <= D; d += IO::W) {
      V u, v;
      IO::load(x + d, u, v);
      a0 = a0 + u * u;
      a1 = a1 + v * v;
    }
    ss = at::vec::vec_reduce_all<acc_t>([](V& p, V& q) { return p + q; }, a0 + a1);
  }
  for (; d < D; ++d) {
    const acc_t v = static_cast<acc_t>(x[d * xd]);
    ss += v * v;
  }
  return ss;
}

// y[d] = (x[d] * rstd) * (weight_offset + w[d]) (w nullptr: x[d] * rstd), in the accumulator dtype.
template <typename scalar_t>
inline void scale_row(const scalar_t* x, int64_t xd, bool unit, const scalar_t* w, typename Acc<scalar_t>::type rstd,
                      typename Acc<scalar_t>::type offset, typename Acc<scalar_t>::type* y, int64_t D) {
  using acc_t = typename Acc<scalar_t>::type;
  using IO = VecIO<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t VL = V::size();
  int64_t d = 0;
  if (unit) {
    const V r(rstd), off(offset);
    for (; d + IO::W <= D; d += IO::W) {
      V u, v;
      IO::load(x + d, u, v);
      u = u * r;
      v = v * r;
      if (w != nullptr) {
        V wu, wv;
        IO::load(w + d, wu, wv);
        u = u * (off + wu);
        v = v * (off + wv);
      }
      u.store(y + d);
      v.store(y + d + VL);
    }
  }
  for (; d < D; ++d) {
    acc_t v = static_cast<acc_t>(x[d * xd]) * rstd;
    if (w != nullptr) v = v * (offset + static_cast<acc_t>(w[d]));
    y[d] = v;
  }
}

template <typename scalar_t, bool INTERLEAVED>
void norm_items_impl(const Params& p, int64_t begin, int64_t end) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t S = p.S, half = p.half, R = 2 * half, D = p.D;
  const int64_t heads[2] = {p.Hq, p.Hk};
  acc_t stack_cs[2 * kStack];
  acc_t stack_y[2 * kStack];
  int64_t stack_rows[kStack];
  std::vector<acc_t> heap_cs, heap_y;
  std::vector<int64_t> heap_rows;
  acc_t* c = stack_cs;
  acc_t* y = stack_y;
  int64_t* prow = stack_rows;
  if (half > kStack) {
    heap_cs.resize(2 * half);
    c = heap_cs.data();
    if (p.axis) {
      heap_rows.resize(half);
      prow = heap_rows.data();
    }
  }
  if (D > 2 * kStack) {
    heap_y.resize(D);
    y = heap_y.data();
  }
  acc_t* s = c + half;
  const acc_t eps = static_cast<acc_t>(p.eps), offset = static_cast<acc_t>(p.weight_offset);
  const CacheParams* cp = p.cache;  // rope_and_cache_ (see items_impl)
  const bool q8 = cp != nullptr && cp->q8 != nullptr;
  scalar_t stack_q[2 * kStack];
  std::vector<scalar_t> heap_q;
  scalar_t* qbuf = stack_q;
  if (q8 && D > 2 * kStack) {
    heap_q.resize(D);
    qbuf = heap_q.data();
  }
  for (int64_t tok = begin; tok < end; ++tok) {
    const int64_t b = tok / S, sq = tok - b * S;
    int64_t row0 = 0, row1 = 0;
    const bool row_ok = cp != nullptr && cache_row(*cp, b, sq, row0, row1);
    if (p.axis) {
      const int64_t base = b * p.rows.stride_pos_b + sq * p.rows.stride_pos_s;
      for (int64_t i = 0; i < half; ++i) {
        prow[i] = p.axis[i] < 0 ? kNoRow : load_index(p.rows.ptr, p.rows.code, p.axis[i] * p.stride_pos_a + base);
      }
      fill_row<acc_t>(p, 0, prow, c, s);
    } else {
      fill_row<acc_t>(p, token_row(p.rows, b, sq), nullptr, c, s);
    }
    for (int w = 0; w < 2; ++w) {
      const int64_t H = heads[w];
      if (H == 0) continue;
      const scalar_t* x0 = static_cast<const scalar_t*>(p.x[w]) + b * p.xs[w][0] + sq * p.xs[w][1];
      scalar_t* o0 = static_cast<scalar_t*>(p.o[w]) + b * p.os[w][0] + sq * p.os[w][1];
      const int64_t xd = p.xs[w][3], od = p.os[w][3];
      const bool unit_x = xd == 1, unit_o = p.unit[w];
      const scalar_t* wt = static_cast<const scalar_t*>(p.w[w]);
      acc_t rstd_tok = 0;
      if (p.norm == 1) {  // statistics over every head of the token, read before any is written
        acc_t ss = 0;
        for (int64_t h = 0; h < H; ++h) ss += sum_squares<scalar_t>(x0 + h * p.xs[w][2], xd, unit_x, D);
        rstd_tok = acc_t(1) / std::sqrt(ss / static_cast<acc_t>(H * D) + eps);
      }
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* x = x0 + h * p.xs[w][2];
        scalar_t* o = o0 + h * p.os[w][2];
        const acc_t rstd = p.norm == 1
                               ? rstd_tok
                               : acc_t(1) / std::sqrt(sum_squares<scalar_t>(x, xd, unit_x, D) / static_cast<acc_t>(D) + eps);
        scale_row<scalar_t>(x, xd, unit_x, wt == nullptr ? nullptr : wt + (p.norm == 1 ? h * D : 0), rstd, offset, y, D);
        if (w == 0 && q8) {  // q_fp8: q's dtype in qbuf, then quantised; q_out untouched
          rotate_head<scalar_t, INTERLEAVED, acc_t>(y, qbuf, c, s, half);
          for (int64_t d = R; d < D; ++d) qbuf[d] = static_cast<scalar_t>(y[d]);
          write_q8<scalar_t>(*cp, D, b, sq, h, qbuf);
          continue;
        }
        if (unit_o) {
          rotate_head<scalar_t, INTERLEAVED, acc_t>(y, o, c, s, half);
          for (int64_t d = R; d < D; ++d) o[d] = static_cast<scalar_t>(y[d]);
        } else {
          rotate_head_strided<scalar_t, acc_t>(y, 1, o, od, c, s, half, INTERLEAVED);
          for (int64_t d = R; d < D; ++d) o[d * od] = static_cast<scalar_t>(y[d]);
        }
        if (w == 1 && row_ok) write_kv<scalar_t>(*cp, D, b, sq, row0, row1, h, o, od);
      }
    }
  }
}

void norm_items(const Params& p, int64_t begin, int64_t end) {
  switch (p.dtype) {
    case kFloat:
      return p.interleaved ? norm_items_impl<float, true>(p, begin, end) : norm_items_impl<float, false>(p, begin, end);
    case kDouble:
      return p.interleaved ? norm_items_impl<double, true>(p, begin, end)
                           : norm_items_impl<double, false>(p, begin, end);
    case kHalf:
      return p.interleaved ? norm_items_impl<c10::Half, true>(p, begin, end)
                           : norm_items_impl<c10::Half, false>(p, begin, end);
    default:
      return p.interleaved ? norm_items_impl<c10::BFloat16, true>(p, begin, end)
                           : norm_items_impl<c10::BFloat16, false>(p, begin, end);
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
ItemsFn norm_items_default() { return &DEFAULT::norm_items; }
}
#elif POSENC_CPU_VARIANT == 2
namespace posenc::rope_cpu {
#if POSENC_VARIANT_ENABLED
ItemsFn items_avx2() { return &AVX2::items; }
ItemsFn norm_items_avx2() { return &AVX2::norm_items; }
#else
ItemsFn items_avx2() { return nullptr; }
ItemsFn norm_items_avx2() { return nullptr; }
#endif
}
#elif POSENC_CPU_VARIANT == 3
namespace posenc::rope_cpu {
#if POSENC_VARIANT_ENABLED
ItemsFn items_avx512() { return &AVX512::items; }
ItemsFn norm_items_avx512() { return &AVX512::norm_items; }
#else
ItemsFn items_avx512() { return nullptr; }
ItemsFn norm_items_avx512() { return nullptr; }
#endif
}
#endif
