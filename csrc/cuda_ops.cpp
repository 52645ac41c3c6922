// CUDA implementations of the public ops posenc::rope_, rope, sinusoidal_table, add_sinusoidal_,
// add_sinusoidal and concat_sinusoidal (schemas: Python; registered for CUDA by
// posenc::_native_register("CUDA", true), bindings.cpp). No learned add here: Triton serves it on CUDA.
//
// Torch glue only: check what the kernels rely on (device, dtype, shapes, stride(-1) == 1, int32 head
// counts), fill the plain parameter structs of posenc_cuda.h, pick the storage type with a switch on the
// ScalarType (AT_DISPATCH without its header weight) and launch on the current stream under a device
// guard. Nothing here reads tensor values or synchronises, so the ops are CUDA-graph capturable: the Python
// side runs the value checks (table rows, cu_seqlens, axis_map) before calling in, and a row outside the
// table gives NaN, an axis outside positions NaN, never an out-of-bounds read. cu_seqlens resolve to
// positions inside the kernel (a binary search per token: no allocation, no extra launch); axis maps are
// read by the kernel too. A non-unit channel stride (stride(-1) != 1) of q/k/x is refused with a message
// (the CPU kernel has a strided path; on CUDA call .contiguous() or use the Triton backend).
// Aliasing is checked from metadata only (sizes, strides, data pointers, storages).
//
// Lean on purpose: the ATen core Tensor, ATen/MemoryOverlap.h (declarations only), per-op ATen headers,
// torch/library.h and c10/cuda's guard and stream headers - no ATen/cuda/CUDAContext.h (it pulls
// cuBLAS/cuSPARSE headers) and no torch/all.h.

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/InferenceMode.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "alias_checks.h"
#include "native_ops.h"
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

void check_not_inference(const Tensor& t, const char* what) {
  TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(),
              "Inplace update to inference tensor outside InferenceMode is not allowed. You can make a clone to get "
              "a normal tensor before doing inplace update. (", what, " is an inference tensor)");
}

bool is_index(const Tensor& t) { return !is_floating(t) && t.scalar_type() != at::kBool && !t.is_complex(); }

// Everything but the outputs: checks and the parameter struct (outputs filled by set_rope_outputs).
posenc_cuda::RopeParams rope_params(const Tensor& q, const optional<Tensor>& k, const optional<Tensor>& cos,
                                    const optional<Tensor>& sin, const optional<Tensor>& inv_freq,
                                    const optional<Tensor>& positions, const optional<Tensor>& offsets,
                                    int64_t offset, const optional<Tensor>& cu_seqlens,
                                    const optional<Tensor>& axis_map, double attention_factor, bool interleaved,
                                    bool conjugate, bool exact) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got device ", q.device());
  TORCH_CHECK(q.dim() == 4 || q.dim() == 3, "q must be [B, S, Hq, D] or packed [T, Hq, D], got shape ", q.sizes());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble,
              "q must be float16, bfloat16, float32 or float64, got ", st);
  const bool packed = q.dim() == 3;
  const int64_t B = packed ? 1 : q.size(0), S = packed ? q.size(0) : q.size(1), Hq = q.size(-2), D = q.size(-1);
  check_last_stride(q, "q");
  int64_t Hk = 0;
  if (k.has_value()) {
    check_cuda(*k, "k", q);
    TORCH_CHECK(k->scalar_type() == st, "k must have q's dtype ", st, ", got ", k->scalar_type());
    const bool ok = k->dim() == q.dim() && (packed ? k->size(0) == S && k->size(2) == D
                                                   : k->size(0) == B && k->size(1) == S && k->size(3) == D);
    TORCH_CHECK(ok, "k must be ", packed ? "[T, Hk, D]" : "[B, S, Hk, D]", " matching q ", q.sizes(), ", got ",
                k->sizes());
    check_last_stride(*k, "k");
    Hk = k->size(-2);
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
    p.cos_sc = cos->stride(1);
    p.sin_sc = sin->stride(1);
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
  if (cu_seqlens.has_value()) {
    const Tensor& cu = *cu_seqlens;
    TORCH_CHECK(packed, "cu_seqlens needs packed q/k [T, H, D], got q of shape ", q.sizes());
    TORCH_CHECK(!positions.has_value(), "pass positions or cu_seqlens, not both");
    TORCH_CHECK(!axis_map.has_value(), "axis_map cannot be combined with cu_seqlens");
    check_cuda(cu, "cu_seqlens", q);
    TORCH_CHECK(is_index(cu) && cu.dim() == 1 && cu.size(0) >= 2,
                "cu_seqlens must be an integer [N + 1] tensor with N >= 1, got ", cu.scalar_type(), " ", cu.sizes());
    p.pos_mode = posenc_cuda::kPosCuSeqlens;
    p.cu = cu.data_ptr();
    p.cu_dtype = aux_dtype(cu, "cu_seqlens");
    p.cu_stride = cu.stride(0);
    p.n_seq = cu.size(0) - 1;
    p.offset = offset;
    if (offsets.has_value()) {
      const Tensor& o = *offsets;
      check_cuda(o, "offsets", q);
      TORCH_CHECK(is_index(o) && o.dim() == 1 && o.size(0) == p.n_seq, "offsets must be an integer [N] = [",
                  p.n_seq, "] tensor (one per sequence), got ", o.scalar_type(), " ", o.sizes());
      TORCH_CHECK(offset == 0, "offset must be 0 when an offsets tensor is given, got ", offset);
      p.pos = o.data_ptr();
      p.pos_dtype = aux_dtype(o, "offsets");
      p.pos_sb = o.stride(0);
    }
  } else if (axis_map.has_value()) {
    TORCH_CHECK(positions.has_value(), "axis_map needs positions [A, B, S] or [A, S]");
    const Tensor& m = *axis_map;
    const Tensor& ps = *positions;
    check_cuda(m, "axis_map", q);
    check_cuda(ps, "positions", q);
    TORCH_CHECK(is_index(m) && m.dim() == 1 && m.size(0) == half, "axis_map must be an integer [R/2] = [", half,
                "] tensor, got ", m.scalar_type(), " ", m.sizes());
    TORCH_CHECK(is_index(ps), "positions must be an integer tensor, got ", ps.scalar_type());
    const bool ok = ps.dim() >= 2 && ps.size(0) >= 1 &&
                    ((ps.dim() == 2 && ps.size(1) == S) || (ps.dim() == 3 && ps.size(1) == B && ps.size(2) == S));
    TORCH_CHECK(ok, "with axis_map, positions must be [A, S] = [A, ", S, "] or [A, B, S] = [A, ", B, ", ", S,
                "], got ", ps.sizes());
    TORCH_CHECK(!offsets.has_value() && offset == 0, "pass positions or offsets, not both");
    p.pos_mode = posenc_cuda::kPosPositions;
    p.pos = ps.data_ptr();
    p.pos_dtype = aux_dtype(ps, "positions");
    p.pos_sa = ps.stride(0);
    p.pos_sb = ps.dim() == 3 ? ps.stride(1) : 0;
    p.pos_ss = ps.stride(-1);
    p.axis = m.data_ptr();
    p.axis_dtype = aux_dtype(m, "axis_map");
    p.axis_stride = m.stride(0);
    p.n_axes = ps.size(0);
  } else {
    fill_positions(positions, offsets, offset, B, S, q, /*float_positions_ok=*/false, p.pos_mode, p.pos, p.pos_dtype,
                   p.pos_sb, p.pos_ss, p.offset);
  }
  p.q = q.data_ptr();
  p.n_tokens = B * S;
  p.seqlen = S;
  p.heads_q = Hq;
  p.heads_k = Hk;
  p.head_dim = D;
  p.half = half;
  p.q_sb = packed ? 0 : q.stride(0), p.q_ss = q.stride(-3), p.q_sh = q.stride(-2);
  if (Hk > 0) {
    p.k = k->data_ptr();
    p.k_sb = packed ? 0 : k->stride(0), p.k_ss = k->stride(-3), p.k_sh = k->stride(-2);
  }
  p.interleaved = interleaved;
  p.conjugate = conjugate;
  return p;
}

void launch_rope_params(posenc_cuda::RopeParams& p, const Tensor& q, const optional<Tensor>& k, const Tensor& q_out,
                        const optional<Tensor>& k_out) {
  const bool packed = q.dim() == 3;
  const bool partial = 2 * p.half < p.head_dim;
  p.q_out = q_out.data_ptr();
  p.qo_sb = packed ? 0 : q_out.stride(0), p.qo_ss = q_out.stride(-3), p.qo_sh = q_out.stride(-2);
  // in place (same memory and layout): the pass-through channels are already where they belong
  p.copy_tail_q = partial && !same_elements(q_out, q);
  if (p.heads_k > 0) {
    p.k_out = k_out->data_ptr();
    p.ko_sb = packed ? 0 : k_out->stride(0), p.ko_ss = k_out->stride(-3), p.ko_sh = k_out->stride(-2);
    p.copy_tail_k = partial && !same_elements(*k_out, *k);
  }
  if (p.n_tokens == 0 || p.heads_q + p.heads_k == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  cudaError_t err = cudaSuccess;
  switch (q.scalar_type()) {
    case at::kHalf: err = posenc_cuda::launch_rope<__half>(p, stream); break;
    case at::kBFloat16: err = posenc_cuda::launch_rope<__nv_bfloat16>(p, stream); break;
    case at::kFloat: err = posenc_cuda::launch_rope<float>(p, stream); break;
    default: err = posenc_cuda::launch_rope<double>(p, stream); break;
  }
  C10_CUDA_CHECK(err);
}

void rope_inplace_cuda(const Tensor& q, const optional<Tensor>& k, const optional<Tensor>& cos,
                       const optional<Tensor>& sin, const optional<Tensor>& inv_freq, const optional<Tensor>& positions,
                       const optional<Tensor>& offsets, int64_t offset, const optional<Tensor>& cu_seqlens,
                       const optional<Tensor>& axis_map, double attention_factor, bool interleaved, bool conjugate,
                       bool exact) {
  posenc_cuda::RopeParams p = rope_params(q, k, cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map,
                                          attention_factor, interleaved, conjugate, exact);
  check_not_inference(q, "rope_: q");
  if (k.has_value()) check_not_inference(*k, "rope_: k");
  check_rope_outputs(q, k, q, k);  // aliasing, before any write
  launch_rope_params(p, q, k, q, k);
}

std::tuple<Tensor, Tensor> rope_cuda(const Tensor& q, const optional<Tensor>& k, const optional<Tensor>& cos,
                                     const optional<Tensor>& sin, const optional<Tensor>& inv_freq,
                                     const optional<Tensor>& positions, const optional<Tensor>& offsets, int64_t offset,
                                     const optional<Tensor>& cu_seqlens, const optional<Tensor>& axis_map,
                                     double attention_factor, bool interleaved, bool conjugate, bool exact) {
  posenc_cuda::RopeParams p = rope_params(q, k, cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map,
                                          attention_factor, interleaved, conjugate, exact);
  Tensor q_out = at::empty_like(q);
  Tensor k_out = k.has_value() ? at::empty_like(*k) : at::empty({0}, q.options());
  const optional<Tensor> ko = k.has_value() ? optional<Tensor>(k_out) : std::nullopt;
  check_last_stride(q_out, "q_out (empty_like(q))");
  if (ko.has_value()) check_last_stride(*ko, "k_out (empty_like(k))");
  launch_rope_params(p, q, k, q_out, ko);
  return {q_out, k_out};
}

// out (a [B, S, D] layout: sizes/strides given) = x * x_scale + PE; x absent for the encoding alone.
struct Layout3 {
  int64_t B, S, D, sb, ss, sd;
};

Layout3 layout3(const Tensor& t) {
  if (t.dim() == 2) return {1, t.size(0), t.size(1), 0, t.stride(0), t.stride(1)};
  return {t.size(0), t.size(1), t.size(2), t.stride(0), t.stride(1), t.stride(2)};
}

void launch_sinusoidal_layout(const Tensor& ref, at::ScalarType st, const Layout3& o, void* out_ptr, const Layout3* x,
                              const void* x_ptr, const optional<Tensor>& positions, const optional<Tensor>& offsets,
                              int64_t offset, double x_scale, double base, bool interleaved, bool cos_first,
                              double freq_shift, double scale) {
  TORCH_CHECK(o.D <= 1 || o.sd == 1, "the CUDA C++ kernel needs stride(-1) == 1 for the output, got ", o.sd);
  TORCH_CHECK(x == nullptr || x->D <= 1 || x->sd == 1,
              "x must have stride(-1) == 1 for the CUDA C++ kernel (contiguous channels; other strides are fine), "
              "got ", x ? x->sd : 0, "; the Triton backend or .contiguous() serves other layouts");
  TORCH_CHECK(o.D / 2 == 0 || static_cast<double>(o.D / 2) - freq_shift != 0, "freq_shift=", freq_shift,
              " with dim=", o.D, " divides by zero");
  posenc_cuda::SinusoidalParams p;
  fill_positions(positions, offsets, offset, o.B, o.S, ref, /*float_positions_ok=*/true, p.pos_mode, p.pos,
                 p.pos_dtype, p.pos_sb, p.pos_ss, p.offset);
  if (o.B * o.S == 0 || o.D == 0) return;
  const Tensor inv = posenc::sinusoidal_inv_freq(o.D / 2, base, freq_shift, st == at::kDouble ? at::kDouble : at::kFloat,
                                                 ref.device());
  p.x = x_ptr;
  p.out = out_ptr;
  p.n_tokens = o.B * o.S;
  p.seqlen = o.S;
  p.dim = o.D;
  p.half = o.D / 2;
  if (x) p.x_sb = x->sb, p.x_ss = x->ss;
  p.o_sb = o.sb, p.o_ss = o.ss;
  p.inv_freq = inv.data_ptr();
  p.inv_freq_dtype = aux_dtype(inv, "inv_freq");
  p.inv_freq_stride = 1;
  p.x_scale = x_scale;
  p.scale = scale;
  p.interleaved = interleaved;
  p.cos_first = cos_first;

  const c10::cuda::CUDAGuard guard(ref.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(ref.device().index()).stream();
  cudaError_t err = cudaSuccess;
  switch (st) {
    case at::kHalf: err = posenc_cuda::launch_sinusoidal<__half>(p, stream); break;
    case at::kBFloat16: err = posenc_cuda::launch_sinusoidal<__nv_bfloat16>(p, stream); break;
    case at::kFloat: err = posenc_cuda::launch_sinusoidal<float>(p, stream); break;
    default: err = posenc_cuda::launch_sinusoidal<double>(p, stream); break;
  }
  C10_CUDA_CHECK(err);
}

void check_x_cuda(const Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "x must be [B, S, D] or [T, D], got shape ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble,
              "x must be float16, bfloat16, float32 or float64, got ", st);
  check_last_stride(x, "x");
}

bool is_float_st(at::ScalarType st) {
  return st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble;
}

Tensor sinusoidal_table_cuda(const optional<Tensor>& positions, int64_t length, int64_t dim, double base,
                             bool interleaved, bool cos_first, double freq_shift, double scale, at::ScalarType dtype,
                             at::Device device) {
  TORCH_CHECK(device.is_cuda(), "sinusoidal_table (CUDA kernel): device must be a CUDA device, got ", device);
  TORCH_CHECK(dim > 0, "dim must be a positive int, got ", dim);
  TORCH_CHECK(is_float_st(dtype), "dtype must be a floating dtype, got ", dtype);
  const auto opts = at::TensorOptions().dtype(dtype).device(device);
  Tensor out;
  optional<Tensor> flat;
  if (positions.has_value()) {
    std::vector<int64_t> shape(positions->sizes().begin(), positions->sizes().end());
    shape.push_back(dim);
    out = at::empty(shape, opts);
    TORCH_CHECK(positions->device() == out.device(), "positions must be on ", out.device(), ", got ",
                positions->device());
    flat = positions->reshape({-1});
  } else {
    TORCH_CHECK(length >= 0, "positions_or_length must be >= 0, got ", length);
    out = at::empty({length, dim}, opts);
  }
  const int64_t N = out.numel() / dim;
  launch_sinusoidal_layout(out, dtype, Layout3{1, N, dim, 0, dim, 1}, out.data_ptr(), nullptr, nullptr, flat,
                           std::nullopt, 0, 1.0, base, interleaved, cos_first, freq_shift, scale);
  return out;
}

void add_sinusoidal_inplace_cuda(const Tensor& x, const optional<Tensor>& positions, const optional<Tensor>& offsets,
                                 int64_t offset, double x_scale, double base, bool interleaved, bool cos_first,
                                 double freq_shift, double scale) {
  check_x_cuda(x);
  check_not_inference(x, "add_sinusoidal_: x");
  check_no_internal_overlap(x, "x");
  const Layout3 l = layout3(x);
  launch_sinusoidal_layout(x, x.scalar_type(), l, x.data_ptr(), &l, x.data_ptr(), positions, offsets, offset, x_scale,
                           base, interleaved, cos_first, freq_shift, scale);
}

Tensor add_sinusoidal_cuda(const Tensor& x, const optional<Tensor>& positions, const optional<Tensor>& offsets,
                           int64_t offset, double x_scale, double base, bool interleaved, bool cos_first,
                           double freq_shift, double scale) {
  check_x_cuda(x);
  Tensor out = at::empty_like(x);
  const Layout3 lx = layout3(x), lo = layout3(out);
  launch_sinusoidal_layout(x, x.scalar_type(), lo, out.data_ptr(), &lx, x.data_ptr(), positions, offsets, offset,
                           x_scale, base, interleaved, cos_first, freq_shift, scale);
  return out;
}

Tensor concat_sinusoidal_cuda(const Tensor& x, const optional<Tensor>& positions, const optional<Tensor>& offsets,
                              int64_t offset, int64_t dim_pe, double base, bool interleaved, bool cos_first,
                              double freq_shift, double scale) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "x must be [B, S, D] or [T, D], got shape ", x.sizes());
  TORCH_CHECK(is_float_st(x.scalar_type()), "x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(dim_pe > 0, "dim_pe must be a positive int, got ", dim_pe);
  const int64_t D = x.size(-1);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() += dim_pe;
  Tensor out = at::empty(shape, x.options());
  Layout3 lo = layout3(out);
  lo.D = dim_pe;
  launch_sinusoidal_layout(x, x.scalar_type(), lo, static_cast<char*>(out.data_ptr()) + D * out.element_size(),
                           nullptr, nullptr, positions, offsets, offset, 1.0, base, interleaved, cos_first, freq_shift,
                           scale);
  if (D > 0) out.narrow(-1, 0, D).copy_(x);
  return out;
}

void register_cuda(torch::Library& m) {
  m.impl("rope_", TORCH_FN(rope_inplace_cuda));
  m.impl("rope", TORCH_FN(rope_cuda));
  m.impl("sinusoidal_table", TORCH_FN(sinusoidal_table_cuda));
  m.impl("add_sinusoidal_", TORCH_FN(add_sinusoidal_inplace_cuda));
  m.impl("add_sinusoidal", TORCH_FN(add_sinusoidal_cuda));
  m.impl("concat_sinusoidal", TORCH_FN(concat_sinusoidal_cuda));
}

const posenc::AddKernelSet add_cuda_set("CUDA", {"rope_", "rope", "sinusoidal_table", "add_sinusoidal_",
                                                 "add_sinusoidal", "concat_sinusoidal"},
                                        &register_cuda);

}  // namespace
