// CUDA implementations of posenc::native_rope and posenc::native_sinusoidal (schemas: bindings.cpp).
//
// Torch glue only: check what the kernels rely on (device, dtype, shapes, stride(-1) == 1, int32 head
// counts), fill the plain parameter structs of posenc_cuda.h, pick the storage type with a switch on the
// ScalarType (AT_DISPATCH without its header weight) and launch on the current stream under a device
// guard. Nothing here reads tensor values or synchronises, so the ops are CUDA-graph capturable; the
// Python wrappers run the value checks (table rows) before calling in. Aliasing is checked here too, from
// metadata only (sizes, strides, data pointers, storages): outputs without internal overlap, and an output
// either exactly its input (in place) or disjoint from every tensor the launch reads or writes.
//
// Lean on purpose: the ATen core Tensor, ATen/MemoryOverlap.h (declarations only), torch/library.h and
// c10/cuda's guard and stream headers - no ATen/cuda/CUDAContext.h (it pulls cuBLAS/cuSPARSE headers) and
// no torch/all.h.

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "alias_checks.h"
#include "posenc_cuda.h"

namespace {

using at::Tensor;
using std::optional;
using namespace posenc_alias;

int32_t aux_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return posenc_cuda::kHalf;
    case at::kBFloat16: return posenc_cuda::kBFloat16;
    case at::kFloat: return posenc_cuda::kFloat;
    case at::kDouble: return posenc_cuda::kDouble;
    case at::kChar: return posenc_cuda::kInt8;
    case at::kByte: return posenc_cuda::kUInt8;
    case at::kShort: return posenc_cuda::kInt16;
    case at::kInt: return posenc_cuda::kInt32;
    case at::kLong: return posenc_cuda::kInt64;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", t.scalar_type());
  }
  return 0;
}

bool is_floating(const Tensor& t) { return at::isFloatingType(t.scalar_type()); }

void check_cuda(const Tensor& t, const char* name, const Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
}

void check_last_stride(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
              " must have stride(-1) == 1 (contiguous channels; other strides are fine), got strides ", t.strides());
}

// Row source shared by both ops: positions [B, S] / [S], else offsets [B], else the int offset.
void fill_positions(const optional<Tensor>& positions, const optional<Tensor>& offsets, int64_t offset,
                    int64_t B, int64_t S, const Tensor& ref, bool float_positions_ok, int32_t& mode,
                    const void*& ptr, int32_t& dtype, int64_t& sb, int64_t& ss, int64_t& off) {
  off = offset;
  if (positions.has_value()) {
    const Tensor& p = *positions;
    check_cuda(p, "positions", ref);
    TORCH_CHECK(p.scalar_type() != at::kBool && (float_positions_ok || !is_floating(p)),
                "positions must be an integer tensor", float_positions_ok ? " (or floating)" : "", ", got ",
                p.scalar_type());
    TORCH_CHECK((p.dim() == 1 && p.size(0) == S) || (p.dim() == 2 && p.size(0) == B && p.size(1) == S),
                "positions must have shape [S] = [", S, "] or [B, S] = [", B, ", ", S, "], got ", p.sizes());
    TORCH_CHECK(!offsets.has_value(), "pass positions or offsets, not both");
    TORCH_CHECK(offset == 0, "offset must be 0 when positions are given (positions are absolute), got ", offset);
    mode = posenc_cuda::kPosPositions;
    ptr = p.data_ptr();
    dtype = aux_dtype(p, "positions");
    sb = p.dim() == 2 ? p.stride(0) : 0;
    ss = p.stride(-1);
  } else if (offsets.has_value()) {
    const Tensor& o = *offsets;
    check_cuda(o, "offsets", ref);
    TORCH_CHECK(!is_floating(o) && o.scalar_type() != at::kBool, "offsets must be an integer tensor, got ",
                o.scalar_type());
    TORCH_CHECK(o.dim() == 1 && o.size(0) == B, "offsets must have shape [B] = [", B, "], got ", o.sizes());
    TORCH_CHECK(offset == 0, "offset must be 0 when offsets are given (pass the per-sequence offsets only), got ",
                offset);
    mode = posenc_cuda::kPosOffsets;
    ptr = o.data_ptr();
    dtype = aux_dtype(o, "offsets");
    sb = o.stride(0);
    ss = 0;
  } else {
    mode = posenc_cuda::kPosOffset;
  }
}

void native_rope_cuda(const Tensor& q, const optional<Tensor>& k, const Tensor& q_out, const optional<Tensor>& k_out,
                      const optional<Tensor>& cos, const optional<Tensor>& sin, const optional<Tensor>& inv_freq,
                      const optional<Tensor>& positions, const optional<Tensor>& offsets, int64_t offset,
                      double attention_factor, bool interleaved, bool conjugate, bool exact) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got device ", q.device());
  TORCH_CHECK(q.dim() == 4, "q must be [B, S, Hq, D], got shape ", q.sizes());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble,
              "q must be float16, bfloat16, float32 or float64, got ", st);
  const int64_t B = q.size(0), S = q.size(1), Hq = q.size(2), D = q.size(3);
  check_last_stride(q, "q");
  check_cuda(q_out, "q_out", q);
  TORCH_CHECK(q_out.scalar_type() == st && q_out.sizes() == q.sizes(), "q_out must match q (", st, ", ", q.sizes(),
              "), got ", q_out.scalar_type(), ", ", q_out.sizes());
  check_last_stride(q_out, "q_out");
  TORCH_CHECK(k.has_value() == k_out.has_value(), "k and k_out must both be given or both be None");
  int64_t Hk = 0;
  if (k.has_value()) {
    check_cuda(*k, "k", q);
    check_cuda(*k_out, "k_out", q);
    TORCH_CHECK(k->scalar_type() == st, "k must have q's dtype ", st, ", got ", k->scalar_type());
    TORCH_CHECK(k->dim() == 4 && k->size(0) == B && k->size(1) == S && k->size(3) == D, "k must be [B, S, Hk, D] = [",
                B, ", ", S, ", Hk, ", D, "], got ", k->sizes());
    TORCH_CHECK(k_out->scalar_type() == st && k_out->sizes() == k->sizes(), "k_out must match k (", st, ", ",
                k->sizes(), "), got ", k_out->scalar_type(), ", ", k_out->sizes());
    check_last_stride(*k, "k");
    check_last_stride(*k_out, "k_out");
    Hk = k->size(2);
  }
  TORCH_CHECK(Hq + Hk < (int64_t{1} << 31), "too many heads: ", Hq + Hk);

  posenc_cuda::RopeParams p;
  int64_t half = 0;
  if (cos.has_value() || sin.has_value()) {
    TORCH_CHECK(cos.has_value() && sin.has_value(), "cos and sin must both be given");
    TORCH_CHECK(!inv_freq.has_value(), "pass cos/sin tables or inv_freq, not both");
    for (const Tensor* t : {&*cos, &*sin}) {
      const char* name = t == &*cos ? "cos" : "sin";
      check_cuda(*t, name, q);
      TORCH_CHECK(is_floating(*t), name, " must be a floating tensor, got ", t->scalar_type());
      TORCH_CHECK(t->dim() == 2, name, " must be [P, R/2], got shape ", t->sizes());
      check_last_stride(*t, name);
    }
    TORCH_CHECK(cos->sizes() == sin->sizes(), "cos and sin must have the same shape, got ", cos->sizes(), " and ",
                sin->sizes());
    half = cos->size(1);
    TORCH_CHECK(attention_factor == 1.0, "attention_factor applies to on-the-fly angles (inv_freq); cos/sin tables "
                "carry it already, so it must be 1.0 with tables, got ", attention_factor);
    TORCH_CHECK(!exact, "exact applies to on-the-fly angles: pass float64 inv_freq instead of cos/sin tables");
    p.angle_mode = posenc_cuda::kAngleTable;
    p.cos = cos->data_ptr();
    p.sin = sin->data_ptr();
    p.cos_dtype = aux_dtype(*cos, "cos");
    p.sin_dtype = aux_dtype(*sin, "sin");
    p.cos_sp = cos->stride(0);
    p.sin_sp = sin->stride(0);
    p.n_rows = cos->size(0);
  } else {
    TORCH_CHECK(inv_freq.has_value(), "pass cos/sin tables or inv_freq");
    const Tensor& f = *inv_freq;
    check_cuda(f, "inv_freq", q);
    TORCH_CHECK(f.dim() == 1, "inv_freq must be [R/2], got shape ", f.sizes());
    TORCH_CHECK(exact ? f.scalar_type() == at::kDouble : is_floating(f),
                exact ? "inv_freq must be float64 with exact=True, got " : "inv_freq must be floating, got ",
                f.scalar_type());
    half = f.size(0);
    p.angle_mode = exact ? posenc_cuda::kAngleInvFreqExact : posenc_cuda::kAngleInvFreq;
    p.inv_freq = f.data_ptr();
    p.inv_freq_dtype = aux_dtype(f, "inv_freq");
    p.inv_freq_stride = f.stride(0);
    p.attention_factor = static_cast<float>(attention_factor);  // fp32 scalar, as Triton's (posenc_cuda.h)
  }
  TORCH_CHECK(half >= 1, "the rotary dim R = 2 * (table columns or inv_freq size) must be >= 2, got ", 2 * half);
  TORCH_CHECK(2 * half <= D, "rotary dim R = ", 2 * half, " exceeds head_dim D = ", D);
  fill_positions(positions, offsets, offset, B, S, q, /*float_positions_ok=*/false, p.pos_mode, p.pos, p.pos_dtype,
                 p.pos_sb, p.pos_ss, p.offset);
  check_rope_outputs(q, k, q_out, k_out);  // aliasing, before any write
  if (B * S == 0 || Hq + Hk == 0) return;

  p.q = q.data_ptr();
  p.q_out = q_out.data_ptr();
  p.n_tokens = B * S;
  p.seqlen = S;
  p.heads_q = Hq;
  p.heads_k = Hk;
  p.head_dim = D;
  p.half = half;
  p.q_sb = q.stride(0), p.q_ss = q.stride(1), p.q_sh = q.stride(2);
  p.qo_sb = q_out.stride(0), p.qo_ss = q_out.stride(1), p.qo_sh = q_out.stride(2);
  const bool partial = 2 * half < D;
  // in place (same memory and layout): the pass-through channels are already where they belong
  p.copy_tail_q = partial && !same_elements(q_out, q);
  if (Hk > 0) {
    p.k = k->data_ptr();
    p.k_out = k_out->data_ptr();
    p.k_sb = k->stride(0), p.k_ss = k->stride(1), p.k_sh = k->stride(2);
    p.ko_sb = k_out->stride(0), p.ko_ss = k_out->stride(1), p.ko_sh = k_out->stride(2);
    p.copy_tail_k = partial && !same_elements(*k_out, *k);
  }
  p.interleaved = interleaved;
  p.conjugate = conjugate;

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  cudaError_t err = cudaSuccess;
  switch (st) {
    case at::kHalf: err = posenc_cuda::launch_rope<__half>(p, stream); break;
    case at::kBFloat16: err = posenc_cuda::launch_rope<__nv_bfloat16>(p, stream); break;
    case at::kFloat: err = posenc_cuda::launch_rope<float>(p, stream); break;
    default: err = posenc_cuda::launch_rope<double>(p, stream); break;
  }
  C10_CUDA_CHECK(err);
}

void native_sinusoidal_cuda(const optional<Tensor>& x, const Tensor& out, const optional<Tensor>& positions,
                            const optional<Tensor>& offsets, int64_t offset, double x_scale, const Tensor& inv_freq,
                            double scale, bool interleaved, bool cos_first) {
  TORCH_CHECK(out.is_cuda(), "out must be a CUDA tensor, got device ", out.device());
  TORCH_CHECK(out.dim() == 3, "out must be [B, S, D], got shape ", out.sizes());
  const auto st = out.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble,
              "out must be float16, bfloat16, float32 or float64, got ", st);
  check_last_stride(out, "out");
  const int64_t B = out.size(0), S = out.size(1), D = out.size(2);
  posenc_cuda::SinusoidalParams p;
  if (x.has_value()) {
    check_cuda(*x, "x", out);
    TORCH_CHECK(x->scalar_type() == st && x->sizes() == out.sizes(), "x must match out (", st, ", ", out.sizes(),
                "), got ", x->scalar_type(), ", ", x->sizes());
    check_last_stride(*x, "x");
  }
  check_cuda(inv_freq, "inv_freq", out);
  TORCH_CHECK(is_floating(inv_freq) && inv_freq.dim() == 1 && inv_freq.size(0) == D / 2,
              "inv_freq must be a floating [D/2] = [", D / 2, "] tensor, got ", inv_freq.scalar_type(), " ",
              inv_freq.sizes());
  fill_positions(positions, offsets, offset, B, S, out, /*float_positions_ok=*/true, p.pos_mode, p.pos, p.pos_dtype,
                 p.pos_sb, p.pos_ss, p.offset);
  check_no_internal_overlap(out, "out");
  if (x.has_value()) check_out_vs_in(out, "out", *x, "x");
  if (B * S == 0 || D == 0) return;

  p.x = x.has_value() ? x->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.n_tokens = B * S;
  p.seqlen = S;
  p.dim = D;
  p.half = D / 2;
  if (x.has_value()) p.x_sb = x->stride(0), p.x_ss = x->stride(1);
  p.o_sb = out.stride(0), p.o_ss = out.stride(1);
  p.inv_freq = inv_freq.data_ptr();
  p.inv_freq_dtype = aux_dtype(inv_freq, "inv_freq");
  p.inv_freq_stride = inv_freq.stride(0);
  p.x_scale = x_scale;
  p.scale = scale;
  p.interleaved = interleaved;
  p.cos_first = cos_first;

  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.device().index()).stream();
  cudaError_t err = cudaSuccess;
  switch (st) {
    case at::kHalf: err = posenc_cuda::launch_sinusoidal<__half>(p, stream); break;
    case at::kBFloat16: err = posenc_cuda::launch_sinusoidal<__nv_bfloat16>(p, stream); break;
    case at::kFloat: err = posenc_cuda::launch_sinusoidal<float>(p, stream); break;
    default: err = posenc_cuda::launch_sinusoidal<double>(p, stream); break;
  }
  C10_CUDA_CHECK(err);
}

}  // namespace

TORCH_LIBRARY_IMPL(posenc, CUDA, m) {
  m.impl("native_rope", &native_rope_cuda);
  m.impl("native_sinusoidal", &native_sinusoidal_cuda);
}
