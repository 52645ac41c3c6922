// Sinusoidal encodings, CUDA: out [B, S, D] = x * x_scale + PE (x absent: the table alone).
//
// Read top-down: one unit (angles -> sin/cos -> 16-byte store) -> the kernel -> the launcher ->
// explicit instantiations.
//
// With half = D / 2:  angle[t, i] = (pos(t) * inv_freq[i]) * scale   (fp32, fp64 for double outputs)
//   interleaved:  PE[2i] = sin, PE[2i + 1] = cos        else  PE[i] = sin, PE[half + i] = cos
//   cos_first swaps each pair / the halves; odd D: PE[D - 1] = 0.
// pos(t) = positions[b, s] (integer or floating; converted to the math type with one rounding), else
// offsets[b] + s, else offset + s (integer arithmetic, then converted), as the Triton kernel does.
//
// Work split: threadIdx.x walks the units of a token (a unit = the angles behind one 16-byte store, or
// one angle on the scalar path), threadIdx.y and the grid stride walk tokens. A thread loads its
// inv_freq values once and reuses them for every token it visits; every angle gives one sin and one cos,
// each used once, so nothing is staged in shared memory.

#include "posenc_cuda_utils.cuh"

namespace posenc_cuda {
namespace {

constexpr int kSinThreads = 256;

template <typename Acc>
__device__ __forceinline__ void sin_cos(Acc a, Acc& s, Acc& c) {
  if constexpr (std::is_same<Acc, double>::value) {
    sincos(a, &s, &c);
  } else {
    sincosf(a, &s, &c);  // precise (no fast math): libdevice's sinf/cosf accuracy, as Triton's tl.sin/tl.cos
  }
}

template <typename T>
__device__ __forceinline__ acc_t<T> token_pos(const SinusoidalParams& p, int64_t b, int64_t s) {
  using Acc = acc_t<T>;
  if (p.pos_mode == kPosPositions && is_float_dtype(p.pos_dtype)) {
    // exact in double, then one rounding to the math type
    return static_cast<Acc>(load_float<double>(p.pos, p.pos_dtype, b * p.stride_pos_b + s * p.stride_pos_s));
  }
  return static_cast<Acc>(token_row(p.pos_mode, p.pos, p.pos_dtype, p.stride_pos_b, p.stride_pos_s, p.offset, b, s));
}

template <typename T, int VEC, bool INTERLEAVED>
__global__ void __launch_bounds__(kSinThreads) sinusoidal_kernel(const SinusoidalParams p) {
  using Acc = acc_t<T>;
  constexpr bool kVector = VEC > 1;
  // angles per unit: a 16-byte vector holds VEC/2 (sin, cos) pairs, or VEC values of each half
  constexpr int kAngles = INTERLEAVED ? (VEC >= 2 ? VEC / 2 : 1) : VEC;
  const int64_t half = p.half;
  const int64_t units = half / kAngles;
  const bool pad = p.dim > 2 * half;
  const Acc scale = static_cast<Acc>(p.scale);
  const Acc x_scale = static_cast<Acc>(p.x_scale);
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const int64_t t_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  const int64_t t_first = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;

  // One round per blockDim.x units (one round unless a token has more than blockDim.x units); the pad
  // column is written in the first round by threadIdx.x == 0, so D = 1 (no angles) still runs a round.
  for (int64_t u0 = 0; u0 < units || (u0 == 0 && pad); u0 += blockDim.x) {
    const int64_t u = u0 + threadIdx.x;
    const bool active = u < units;
    const bool write_pad = pad && u0 == 0 && threadIdx.x == 0;
    Acc inv[kAngles];
#pragma unroll
    for (int a = 0; a < kAngles; ++a) {
      inv[a] = active ? load_float<Acc>(p.inv_freq, p.inv_freq_dtype, (u * kAngles + a) * p.stride_inv_freq)
                      : Acc(0);
    }
    for (int64_t t = t_first; t < p.n_tokens; t += t_step) {
      const int64_t b = t / p.seqlen;
      const int64_t s = t - b * p.seqlen;
      const T* xrow = x ? x + b * p.stride_x_b + s * p.stride_x_s : nullptr;
      T* orow = out + b * p.stride_o_b + s * p.stride_o_s;
      if (active) {
        const Acc pos = token_pos<T>(p, b, s);
        Acc first[kAngles], second[kAngles];
#pragma unroll
        for (int a = 0; a < kAngles; ++a) {
          Acc sn, cs;
          sin_cos<Acc>((pos * inv[a]) * scale, sn, cs);
          first[a] = p.cos_first ? cs : sn;
          second[a] = p.cos_first ? sn : cs;
        }
        if constexpr (INTERLEAVED) {
          const int64_t c = 2 * u * kAngles;
          Vec<T, 2 * kAngles> o;
          if (xrow) {
            const Vec<T, 2 * kAngles> xv = load_vec<T, 2 * kAngles, kVector>(xrow + c);
#pragma unroll
            for (int a = 0; a < kAngles; ++a) {
              o.v[2 * a] = from_acc<T>(to_acc(xv.v[2 * a]) * x_scale + first[a]);
              o.v[2 * a + 1] = from_acc<T>(to_acc(xv.v[2 * a + 1]) * x_scale + second[a]);
            }
          } else {
#pragma unroll
            for (int a = 0; a < kAngles; ++a) {
              o.v[2 * a] = from_acc<T>(first[a]);
              o.v[2 * a + 1] = from_acc<T>(second[a]);
            }
          }
          store_vec<T, 2 * kAngles, kVector>(orow + c, o);
        } else {
          const int64_t c = u * kAngles;
          Vec<T, kAngles> o1, o2;
          if (xrow) {
            const Vec<T, kAngles> x1 = load_vec<T, kAngles, kVector>(xrow + c);
            const Vec<T, kAngles> x2 = load_vec<T, kAngles, kVector>(xrow + half + c);
#pragma unroll
            for (int a = 0; a < kAngles; ++a) {
              o1.v[a] = from_acc<T>(to_acc(x1.v[a]) * x_scale + first[a]);
              o2.v[a] = from_acc<T>(to_acc(x2.v[a]) * x_scale + second[a]);
            }
          } else {
#pragma unroll
            for (int a = 0; a < kAngles; ++a) {
              o1.v[a] = from_acc<T>(first[a]);
              o2.v[a] = from_acc<T>(second[a]);
            }
          }
          store_vec<T, kAngles, kVector>(orow + c, o1);
          store_vec<T, kAngles, kVector>(orow + half + c, o2);
        }
      }
      if (write_pad) {  // odd D: the last column carries no encoding
        const int64_t c = 2 * half;
        orow[c] = from_acc<T>(xrow ? to_acc(xrow[c]) * x_scale : Acc(0));
      }
    }
  }
}

template <typename T, int VEC, bool INTERLEAVED>
cudaError_t launch(const SinusoidalParams& p, cudaStream_t stream) {
  constexpr int kAngles = INTERLEAVED ? (VEC >= 2 ? VEC / 2 : 1) : VEC;
  const int64_t units = p.half / kAngles;
  const int bx = static_cast<int>(units < 1 ? 1 : (units < kSinThreads ? units : kSinThreads));
  int64_t by = kSinThreads / bx;
  if (by > p.n_tokens) by = p.n_tokens;
  // Enough blocks to fill the GPU once (8 blocks of 256 threads per SM), then a grid-stride loop.
  int64_t blocks = (p.n_tokens + by - 1) / by;
  const int64_t resident = 8 * static_cast<int64_t>(num_sms());
  if (blocks > resident) blocks = resident;
  const dim3 block(bx, static_cast<unsigned>(by));
  sinusoidal_kernel<T, VEC, INTERLEAVED><<<static_cast<unsigned>(blocks), block, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

int sinusoidal_vector_width(const SinusoidalParams& p, int elem_size) {
  const int vec = 16 / elem_size;
  const int64_t nb = p.seqlen > 0 ? p.n_tokens / p.seqlen : 0;
  bool ok = aligned16(p.out) && stride_ok(p.stride_o_b, nb, vec) && stride_ok(p.stride_o_s, p.seqlen, vec);
  if (p.x) ok = ok && aligned16(p.x) && stride_ok(p.stride_x_b, nb, vec) && stride_ok(p.stride_x_s, p.seqlen, vec);
  ok = ok && (p.interleaved ? (2 * p.half) % vec == 0 : p.half % vec == 0);
  return ok ? vec : 1;
}

template <typename T>
cudaError_t launch_sinusoidal(const SinusoidalParams& p, cudaStream_t stream) {
  if (p.n_tokens == 0 || p.dim == 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  const bool vector = sinusoidal_vector_width(p, sizeof(T)) == kVec;
  if (p.interleaved) {
    return vector ? launch<T, kVec, true>(p, stream) : launch<T, 1, true>(p, stream);
  }
  return vector ? launch<T, kVec, false>(p, stream) : launch<T, 1, false>(p, stream);
}

template cudaError_t launch_sinusoidal<__half>(const SinusoidalParams&, cudaStream_t);
template cudaError_t launch_sinusoidal<__nv_bfloat16>(const SinusoidalParams&, cudaStream_t);
template cudaError_t launch_sinusoidal<float>(const SinusoidalParams&, cudaStream_t);
template cudaError_t launch_sinusoidal<double>(const SinusoidalParams&, cudaStream_t);

}  // namespace posenc_cuda
