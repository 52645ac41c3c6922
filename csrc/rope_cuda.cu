// RoPE, CUDA: rotate q [B, S, Hq, D] and k [B, S, Hk, D] in one launch (in place or out of place).
//
// Read top-down: angle of one pair -> the pair rotations of one 16-byte unit -> the kernel -> the
// launcher (path choice, block-size heuristic) -> explicit instantiations.
//
// Work split. A block owns `tok` consecutive tokens (flattened b * S + s) and a group of heads taken from
// the concatenated list [q heads | k heads], so q and k share one launch and one angle computation:
//   phase 0: the block's token bases (b, s -> element offsets) and rows, into shared memory;
//   phase 1: cos/sin of every (token, pair) into shared memory, in the math type, from the table (NaN for
//            rows outside it: never an out-of-bounds read) or computed from inv_freq; conjugate negates
//            sin here, so it costs nothing in the hot loop;
//   phase 2: threadIdx.x walks the 16-byte units of a head row, threadIdx.y the (token, head) rows, so a
//            warp covers whole contiguous head rows: every load and store is a 16-byte vector access
//            (ld.global.v4 / st.global.v4) when pointers and strides allow, a scalar loop otherwise.
//            Each thread takes several (row, unit) items per iteration and issues all their loads before any
//            math or store: 64 B of loads in flight per thread on the vector paths.
// Heads with more than kRopeSlots pairs per token are processed in chunks of pairs (phases 1-2 repeat).
// Out of place with partial rotary, channels [R, D) are copied after the rotary ones.

#include <cmath>

#include "exact_angle.h"
#include "posenc_cuda_utils.cuh"

namespace posenc_cuda {
namespace {

constexpr int kRopeThreads = 256;
constexpr int kRopeMaxTokens = 16;       // tokens per block (phase 0 keeps their bases in shared memory)
constexpr int kRopeSlots = 2048;         // (token, pair) cos/sin slots in shared memory: 16 KiB fp32, 32 fp64
constexpr int kRopeUnitsPerBlock = 2048; // target work per block: ~8 units of 16 bytes per thread
constexpr int64_t kMaxGridY = 65535;       // CUDA limit on gridDim.y (the head groups)

constexpr int64_t kNoRow = INT64_MIN;  // a frequency whose axis lies outside positions' axes: NaN

// cos and sin of pair i of table row / position `row`.
template <typename Acc>
__device__ __forceinline__ void rope_angle(const RopeParams& p, int64_t row, int64_t i, Acc& c, Acc& s) {
  if (p.angle_mode == kAngleTable) {
    if (row < 0 || row >= p.n_rows) {  // only reachable when the host-side value checks were skipped
      c = s = static_cast<Acc>(NAN);
      return;
    }
    c = load_float<Acc>(p.cos, p.cos_dtype, row * p.stride_cos_p + i * p.stride_cos_f);
    s = load_float<Acc>(p.sin, p.sin_dtype, row * p.stride_sin_p + i * p.stride_sin_f);
    return;
  }
  if (row == kNoRow) {
    c = s = static_cast<Acc>(NAN);
    return;
  }
  const int64_t fi = i * p.stride_inv_freq;
  if (p.angle_mode == kAngleInvFreq) {
    // HF numerics: one fp32 product of the fp32-rounded position and frequency, precise fp32 sincos.
    const float a = static_cast<float>(row) * load_float<float>(p.inv_freq, p.inv_freq_dtype, fi);
    float sf, cf;
    sincosf(a, &sf, &cf);
    c = static_cast<Acc>(cf * p.attention_factor);
    s = static_cast<Acc>(sf * p.attention_factor);
    return;
  }
  // Exact: exact_angle.h's reduction (the one algorithm of every backend), then fp32 sincos of the reduced
  // angle (correct to about 1 ulp at any position) and the fp32 product with attention_factor, for every
  // storage type; for double storage the fp32 cos/sin is then widened to the math type.
  const double inv = load_float<double>(p.inv_freq, p.inv_freq_dtype, fi);
  float sf, cf;
  sincosf(posenc_exact::reduced_angle(static_cast<double>(row), inv), &sf, &cf);
  c = static_cast<Acc>(cf * p.attention_factor);
  s = static_cast<Acc>(sf * p.attention_factor);
}

// Packed varlen: the position of token t (sequence n: the last with cu[n] <= t, by binary search over
// cu[1..N] as torch.searchsorted(cu[1:], t, right=True) clamped to N - 1); tokens past cu[N] take 0.
// Unchecked (decreasing) values still give some n in [0, N): never an out-of-bounds read.
__device__ __forceinline__ int64_t cu_token_row(const RopeParams& p, int64_t t) {
  const int64_t N = p.n_seq;
  if (t >= load_int(p.cu, p.cu_dtype, N * p.stride_cu)) return 0;
  int64_t lo = 0, hi = N;  // first n in [0, N) with cu[n + 1] > t
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (load_int(p.cu, p.cu_dtype, (mid + 1) * p.stride_cu) > t) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  const int64_t n = lo < N ? lo : N - 1;
  const int64_t base = p.pos ? load_int(p.pos, p.pos_dtype, n * p.stride_pos_b) : p.offset;
  return t - load_int(p.cu, p.cu_dtype, n * p.stride_cu) + base;
}

// N consecutive math-type values from shared memory: 16-byte loads when N values fill whole 16-byte
// words (then every unit's offset is 16-byte aligned), scalar loads otherwise.
template <typename Acc, int N>
__device__ __forceinline__ void load_shared(const Acc* p, Acc (&out)[N]) {
  if constexpr ((N * sizeof(Acc)) % 16 == 0) {
#pragma unroll
    for (int w = 0; w < static_cast<int>(N * sizeof(Acc) / 16); ++w) {
      reinterpret_cast<uint4*>(out)[w] = reinterpret_cast<const uint4*>(p)[w];
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = p[e];
  }
}

// One unit of kPairs pairs (pair index i0 onwards) of one head row, in two steps so a caller can issue
// the global loads of several units before the math and stores of any: load() reads the unit's input
// (in place, in == out: the compiler may not hoist a later unit's loads above an earlier unit's stores
// itself), rotate_store() rotates it by the cos/sin at cs/sn (shared memory, pair i0) and writes out.
template <typename T, int VEC, bool INTERLEAVED>
struct RopeUnit {
  static constexpr bool kVector = VEC > 1;
  // pairs per unit: a 16-byte vector holds VEC/2 interleaved pairs, or VEC first halves (+ VEC second)
  static constexpr int kPairs = INTERLEAVED ? (VEC >= 2 ? VEC / 2 : 1) : VEC;
  static constexpr int kN = INTERLEAVED ? 2 * kPairs : kPairs;  // elements per access
  using Acc = acc_t<T>;
  struct In {
    Vec<T, kN> a;  // interleaved: the kPairs pairs; else the first halves
    Vec<T, kN> b;  // non-interleaved: the second halves (unused when interleaved)
  };

  // in / out: the unit's first element (interleaved: in + 2 * i0, else in + i0); half: R / 2.
  __device__ __forceinline__ static In load(const T* in, int64_t half) {
    In x;
    x.a = load_vec<T, kN, kVector>(in);
    if constexpr (!INTERLEAVED) x.b = load_vec<T, kN, kVector>(in + half);
    return x;
  }

  __device__ __forceinline__ static void rotate_store(const In& x, T* out, int64_t half, const Acc* cs_sh,
                                                      const Acc* sn_sh) {
    alignas(16) Acc cs[kPairs];
    alignas(16) Acc sn[kPairs];
    load_shared<Acc, kPairs>(cs_sh, cs);
    load_shared<Acc, kPairs>(sn_sh, sn);
    if constexpr (INTERLEAVED) {
      Vec<T, kN> o;
#pragma unroll
      for (int e = 0; e < kPairs; ++e) {
        const Acc x1 = to_acc(x.a.v[2 * e]), x2 = to_acc(x.a.v[2 * e + 1]);
        o.v[2 * e] = from_acc<T>(x1 * cs[e] - x2 * sn[e]);
        o.v[2 * e + 1] = from_acc<T>(x2 * cs[e] + x1 * sn[e]);
      }
      store_vec<T, kN, kVector>(out, o);
    } else {
      Vec<T, kN> oa, ob;
#pragma unroll
      for (int e = 0; e < kPairs; ++e) {
        const Acc x1 = to_acc(x.a.v[e]), x2 = to_acc(x.b.v[e]);
        oa.v[e] = from_acc<T>(x1 * cs[e] - x2 * sn[e]);
        ob.v[e] = from_acc<T>(x2 * cs[e] + x1 * sn[e]);
      }
      store_vec<T, kN, kVector>(out, oa);
      store_vec<T, kN, kVector>(out + half, ob);
    }
  }
};

struct RopeLaunch {
  int tok;    // tokens per block
  int heads;  // heads per block
  int chunk;  // pairs per phase-1/2 round (multiple of the unit's pairs)
};

template <typename T, int VEC, bool INTERLEAVED>
__global__ void __launch_bounds__(kRopeThreads) rope_kernel(const RopeParams p, const RopeLaunch L) {
  using Acc = acc_t<T>;
  using Unit = RopeUnit<T, VEC, INTERLEAVED>;
  constexpr int kPairs = Unit::kPairs;
  constexpr bool kVector = VEC > 1;
  // Phase-2 work items per loop iteration: 64 bytes of global loads per thread on the vector paths (a
  // non-interleaved unit loads 2 x 16 bytes, an interleaved one 16), two units on the scalar paths.
  constexpr int kItems = kVector ? 64 / static_cast<int>(sizeof(T) * (INTERLEAVED ? 2 * kPairs : 2 * VEC)) : 2;
  struct Item {
    const T* in;  // the unit's first input element
    T* out;       // and output element
    const Acc* cs;  // its first cos in shared memory (the sin is L.tok * L.chunk further)
  };

  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* s_cos = reinterpret_cast<Acc*>(smem_raw);
  Acc* s_sin = s_cos + L.tok * L.chunk;
  __shared__ int64_t s_base[kRopeMaxTokens][4];  // element offsets of token t in q, k, q_out, k_out
  __shared__ int64_t s_row[kRopeMaxTokens];
  __shared__ int64_t s_bs[kRopeMaxTokens][2];  // (b, s) of token t, for per-frequency rows (axis map)

  const int64_t tok0 = static_cast<int64_t>(blockIdx.x) * L.tok;
  const int ntok = static_cast<int>(min(static_cast<int64_t>(L.tok), p.n_tokens - tok0));
  const int heads_q = static_cast<int>(p.heads_q);
  const int h0 = static_cast<int>(blockIdx.y) * L.heads;
  const int nh = min(L.heads, heads_q + static_cast<int>(p.heads_k) - h0);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;
  const int64_t half = p.half;

  // Phase 0: token bases and rows.
  if (tid < ntok) {
    const int64_t t = tok0 + tid;
    const int64_t b = t / p.seqlen;
    const int64_t s = t - b * p.seqlen;
    s_base[tid][0] = b * p.stride_q_b + s * p.stride_q_s;
    s_base[tid][1] = b * p.stride_k_b + s * p.stride_k_s;
    s_base[tid][2] = b * p.stride_qo_b + s * p.stride_qo_s;
    s_base[tid][3] = b * p.stride_ko_b + s * p.stride_ko_s;
    s_row[tid] = p.pos_mode == kPosCuSeqlens ? cu_token_row(p, t)
                                             : token_row(p.pos_mode, p.pos, p.pos_dtype, p.stride_pos_b, p.stride_pos_s, p.offset, b, s);
    s_bs[tid][0] = b;
    s_bs[tid][1] = s;
  }
  __syncthreads();

  for (int64_t c0 = 0; c0 < half; c0 += L.chunk) {
    const int nc = static_cast<int>(min(static_cast<int64_t>(L.chunk), half - c0));
    // Phase 1: cos/sin of the chunk's pairs for every token.
    for (int i = tid; i < ntok * nc; i += nthreads) {
      const int t = i / nc;
      const int j = i - t * nc;
      int64_t row = s_row[t];
      if (p.axis) {  // multi-axis positions: frequency c0 + j follows its own row of positions
        const int64_t ax = load_int(p.axis, p.axis_dtype, (c0 + j) * p.stride_axis);
        row = ax >= 0 && ax < p.n_axes ? load_int(p.pos, p.pos_dtype, ax * p.stride_pos_a + s_bs[t][0] * p.stride_pos_b + s_bs[t][1] * p.stride_pos_s)
                                       : kNoRow;
      }
      Acc c, s;
      rope_angle<Acc>(p, row, c0 + j, c, s);
      s_cos[t * L.chunk + j] = c;
      s_sin[t * L.chunk + j] = p.conjugate ? -s : s;
    }
    __syncthreads();
    // Phase 2: rotate. Thread (x, y) takes the work items (row r, unit u) r = y, y + by, ..., and within
    // a row u = x, x + bx, ... (units innermost), kItems items per iteration: every item's global loads
    // are issued before any item is rotated and stored, so 64 B of loads are in flight per thread on the
    // 16-byte vector paths (a one-item loop waits at each item's loads for the previous item's stores).
    // Items are distinct elements, and an output is its input or disjoint from every input (the glue's
    // alias checks), so the reordering changes no value. A row r is kept as (token t, head j) with
    // r = t * nh + j and advanced without a division, so the next item's address is a few instructions:
    // a division there gets the compiler to schedule the math of the loads issued before it in between.
    const int units = nc / kPairs;
    const int dt = static_cast<int>(blockDim.y) / nh, dj = static_cast<int>(blockDim.y) - dt * nh;
    const int64_t sin_off = static_cast<int64_t>(L.tok) * L.chunk;
    // Branch-free, so that every item's address is computed in the block holding all the loads (the
    // compiler otherwise places the math of the loads before a branch ahead of the loads after it).
    const auto next = [&](int& t, int& j, int& u) {
      u += blockDim.x;
      const bool wrap = u >= units;
      u = wrap ? static_cast<int>(threadIdx.x) : u;
      t += wrap ? dt : 0;
      j += wrap ? dj : 0;
      const bool carry = j >= nh;
      j -= carry ? nh : 0;
      t += carry ? 1 : 0;
    };
    const auto item = [&](int t, int j, int u) {
      const int h = h0 + j;
      const bool is_q = h < heads_q;
      const int64_t hh = is_q ? h : h - heads_q;
      const int64_t i0 = c0 + static_cast<int64_t>(u) * kPairs;
      const int64_t at = INTERLEAVED ? 2 * i0 : i0;
      Item it;
      it.in = static_cast<const T*>(is_q ? p.q : p.k) + s_base[t][is_q ? 0 : 1] + hh * (is_q ? p.stride_q_h : p.stride_k_h) + at;
      it.out = static_cast<T*>(is_q ? p.q_out : p.k_out) + s_base[t][is_q ? 2 : 3] + hh * (is_q ? p.stride_qo_h : p.stride_ko_h) + at;
      it.cs = s_cos + t * L.chunk + u * kPairs;
      return it;
    };
    // the block's rows r = t * nh + j < ntok * nh are those with t < ntok
    int t = static_cast<int>(threadIdx.x) < units ? static_cast<int>(threadIdx.y) / nh : ntok;
    int j = static_cast<int>(threadIdx.y) % nh;
    int u = threadIdx.x;
    while (t < ntok) {
      // Item 0 always exists. An item past the last row repeats item 0's loads and is not stored: every
      // load is unconditional, with no branch between them (in a branch the compiler unpacks an earlier
      // load's 16-bit halves right after it: more live registers, and a spill).
      Item it[kItems];
      typename Unit::In x[kItems];
      bool live[kItems];
      const int t0 = t, j0 = j, u0 = u;
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        live[k] = t < ntok;
        it[k] = item(live[k] ? t : t0, live[k] ? j : j0, live[k] ? u : u0);
        next(t, j, u);
      }
#pragma unroll
      for (int k = 0; k < kItems; ++k) x[k] = Unit::load(it[k].in, half);
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        if (live[k]) Unit::rotate_store(x[k], it[k].out, half, it[k].cs, it[k].cs + sin_off);
      }
    }
    if (c0 + L.chunk < half) __syncthreads();  // the next chunk overwrites the shared cos/sin
  }

  // Pass-through channels [R, D) when out of place (in place they are simply not touched).
  if (p.copy_tail_q || p.copy_tail_k) {
    const int64_t R = 2 * half;
    const int64_t tail = p.head_dim - R;
    const int rows = ntok * nh;  // (token, head) rows of this block
    for (int r = threadIdx.y; r < rows; r += blockDim.y) {
      const int t = r / nh;
      const int h = h0 + (r - t * nh);
      const bool is_q = h < heads_q;
      if (!(is_q ? p.copy_tail_q : p.copy_tail_k)) continue;
      const int64_t hh = is_q ? h : h - heads_q;
      const T* in = static_cast<const T*>(is_q ? p.q : p.k) + s_base[t][is_q ? 0 : 1] + hh * (is_q ? p.stride_q_h : p.stride_k_h) + R;
      T* out = static_cast<T*>(is_q ? p.q_out : p.k_out) + s_base[t][is_q ? 2 : 3] + hh * (is_q ? p.stride_qo_h : p.stride_ko_h) + R;
      for (int64_t e = static_cast<int64_t>(threadIdx.x) * VEC; e < tail; e += static_cast<int64_t>(blockDim.x) * VEC) {
        if (e + VEC <= tail) {
          store_vec<T, VEC, kVector>(out + e, load_vec<T, VEC, kVector>(in + e));
        } else {
          for (int64_t f = e; f < tail; ++f) out[f] = in[f];
        }
      }
    }
  }
}

template <typename T, int VEC, bool INTERLEAVED>
cudaError_t launch(const RopeParams& p, cudaStream_t stream) {
  using Acc = acc_t<T>;
  constexpr int kPairs = RopeUnit<T, VEC, INTERLEAVED>::kPairs;
  const int64_t heads = p.heads_q + p.heads_k;
  // Chunk of pairs held in shared memory per token; the whole head in one round up to kRopeSlots pairs.
  int chunk = static_cast<int>(p.half < kRopeSlots ? p.half : kRopeSlots);
  chunk -= chunk % kPairs;  // kRopeSlots is a multiple of every kPairs; p.half is one on the vector path
  const int units = chunk / kPairs;
  const int64_t tail_units = (p.copy_tail_q || p.copy_tail_k) ? (p.head_dim - 2 * p.half + VEC - 1) / VEC : 0;
  const int64_t units_per_token = heads * ((p.half + kPairs - 1) / kPairs + tail_units);
  // Tokens per block: ~kRopeUnitsPerBlock units of work, bounded by the shared-memory slots.
  int64_t tok = kRopeUnitsPerBlock / (units_per_token > 0 ? units_per_token : 1);
  tok = tok < 1 ? 1 : (tok > kRopeMaxTokens ? kRopeMaxTokens : tok);
  if (tok * chunk > kRopeSlots) tok = kRopeSlots / chunk;
  if (tok > p.n_tokens) tok = p.n_tokens;
  const int64_t token_blocks = (p.n_tokens + tok - 1) / tok;
  // Head groups: split the heads over grid.y when there are too few token blocks to fill the GPU (decode)
  // or when one token's heads are far more work than a block should do, keeping >= 64 units per block.
  const int64_t want_blocks = 2 * static_cast<int64_t>(num_sms());
  int64_t groups = 1;
  if (token_blocks < want_blocks) groups = (want_blocks + token_blocks - 1) / token_blocks;
  const int64_t max_groups_by_work = (tok * units_per_token + 63) / 64;
  if (groups > max_groups_by_work) groups = max_groups_by_work;
  const int64_t min_groups = (tok * units_per_token + 4 * kRopeUnitsPerBlock - 1) / (4 * kRopeUnitsPerBlock);
  if (groups < min_groups) groups = min_groups;
  if (groups > heads) groups = heads;
  if (groups > kMaxGridY) groups = kMaxGridY;  // grid.y limit: more heads per block instead of a failed launch
  if (groups < 1) groups = 1;
  // heads_per_block >= heads / groups, so the recomputed groups is <= the clamped one (<= kMaxGridY). The
  // kernel's int arithmetic holds: a block's first head (groups - 1) * heads_per_block < heads < 2^31, and its
  // rows tok * heads_per_block stay small: groups >= min(heads, min_groups, kMaxGridY) bounds heads_per_block
  // by about max(kRopeUnitsPerBlock * 4 / tok, 2^31 / kMaxGridY) = 2^15, so tok * heads_per_block <~ 2^19.
  const int64_t heads_per_block = (heads + groups - 1) / groups;
  groups = (heads + heads_per_block - 1) / heads_per_block;
  if (token_blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;

  RopeLaunch L{static_cast<int>(tok), static_cast<int>(heads_per_block), chunk};
  const int bx = units < kRopeThreads ? (units > 0 ? units : 1) : kRopeThreads;
  int64_t by = kRopeThreads / bx;
  if (by > tok * heads_per_block) by = tok * heads_per_block;
  if (by * bx < 32 && tok * heads_per_block * bx >= 32) by = (32 + bx - 1) / bx;
  const dim3 block(bx, static_cast<unsigned>(by < 1 ? 1 : by));
  const dim3 grid(static_cast<unsigned>(token_blocks), static_cast<unsigned>(groups));
  const size_t smem = 2 * sizeof(Acc) * static_cast<size_t>(L.tok) * static_cast<size_t>(L.chunk);
  rope_kernel<T, VEC, INTERLEAVED><<<grid, block, smem, stream>>>(p, L);
  return cudaGetLastError();
}

}  // namespace

int rope_vector_width(const RopeParams& p, int elem_size) {
  const int vec = 16 / elem_size;
  const bool has_k = p.heads_k > 0;
  bool ok = aligned16(p.q) && aligned16(p.q_out) && (!has_k || (aligned16(p.k) && aligned16(p.k_out)));
  // the dims: b has n_tokens / seqlen entries, s has seqlen, h has heads
  const int64_t nb = p.seqlen > 0 ? p.n_tokens / p.seqlen : 0;
  ok = ok && stride_ok(p.stride_q_b, nb, vec) && stride_ok(p.stride_q_s, p.seqlen, vec) && stride_ok(p.stride_q_h, p.heads_q, vec);
  ok = ok && stride_ok(p.stride_qo_b, nb, vec) && stride_ok(p.stride_qo_s, p.seqlen, vec) && stride_ok(p.stride_qo_h, p.heads_q, vec);
  if (has_k) {
    ok = ok && stride_ok(p.stride_k_b, nb, vec) && stride_ok(p.stride_k_s, p.seqlen, vec) && stride_ok(p.stride_k_h, p.heads_k, vec);
    ok = ok && stride_ok(p.stride_ko_b, nb, vec) && stride_ok(p.stride_ko_s, p.seqlen, vec) && stride_ok(p.stride_ko_h, p.heads_k, vec);
  }
  // A vector must hold whole pairs of one half: interleaved R % vec, else (R/2) % vec.
  ok = ok && (p.interleaved ? (2 * p.half) % vec == 0 : p.half % vec == 0);
  return ok ? vec : 1;
}

template <typename T>
cudaError_t launch_rope(const RopeParams& p, cudaStream_t stream) {
  if (p.n_tokens == 0 || p.heads_q + p.heads_k == 0 || p.half == 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  const bool vector = rope_vector_width(p, sizeof(T)) == kVec;
  if (p.interleaved) {
    return vector ? launch<T, kVec, true>(p, stream) : launch<T, 1, true>(p, stream);
  }
  return vector ? launch<T, kVec, false>(p, stream) : launch<T, 1, false>(p, stream);
}

template cudaError_t launch_rope<__half>(const RopeParams&, cudaStream_t);
template cudaError_t launch_rope<__nv_bfloat16>(const RopeParams&, cudaStream_t);
template cudaError_t launch_rope<float>(const RopeParams&, cudaStream_t);
template cudaError_t launch_rope<double>(const RopeParams&, cudaStream_t);

}  // namespace posenc_cuda
