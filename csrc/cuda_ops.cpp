// CUDA implementations of the public ops posenc::rope_, rope, sinusoidal_table, add_sinusoidal_,
// add_sinusoidal and concat_sinusoidal (schemas: Python), called by the choosers of bindings.cpp
// (AddNative below). No learned add here: Triton serves it on CUDA.
//
// Torch glue only. Every check of the op runs here, before any launch, with Python's messages: the shared
// argument rules (rope_args.h, sinusoidal_args.h, py_checks.h), value checks included (table rows,
// cu_seqlens, axis_map: ATen reductions and one host sync, skipped when value checks are off and while the
// current stream captures a CUDA graph), then what this kernel adds (stride(-1) == 1 for q/k/x, int32 head
// counts). Then the plain parameter structs of posenc_cuda.h are filled, the storage type picked with a
// switch on the ScalarType (AT_DISPATCH without its header weight) and the kernel launched on the current
// stream under a device guard. A row outside the table gives NaN, an axis outside positions NaN, never an
// out-of-bounds read. cu_seqlens resolve to positions inside the kernel (a binary search per token: no
// allocation, no extra launch); axis maps are read by the kernel too.
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
#include <c10/cuda/CUDAGraphsC10Utils.h>
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
#include "rope_args.h"
#include "sinusoidal_args.h"

namespace {

using at::Tensor;
using std::optional;
using namespace posenc_alias;

using posenc::dtype_code;
using posenc::OptT;
using posenc::RopeShape;

void check_last_stride(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
              " must have stride(-1) == 1 for the CUDA C++ kernel (contiguous channels; other strides are fine), "
              "got strides ", t.strides(), "; the Triton backend serves other layouts");
}

// Row source of the sinusoidal ops (checked by sinusoidal_args.h): positions [B, S] / [S], else offsets
// [B], else the int offset.
void fill_positions(const OptT& positions, const OptT& offsets, int64_t offset, int32_t& mode, const void*& ptr,
                    int32_t& dtype, int64_t& stride_b, int64_t& stride_s, int64_t& off) {
  off = offset;
  if (positions.has_value()) {
    const Tensor& p = *positions;
    mode = posenc_cuda::kPosPositions;
    ptr = p.data_ptr();
    dtype = dtype_code(p.scalar_type());
    stride_b = p.dim() == 2 ? p.stride(0) : 0;
    stride_s = p.stride(-1);
  } else if (offsets.has_value()) {
    const Tensor& o = *offsets;
    mode = posenc_cuda::kPosOffsets;
    ptr = o.data_ptr();
    dtype = dtype_code(o.scalar_type());
    stride_b = o.stride(0);
    stride_s = 0;
  } else {
    mode = posenc_cuda::kPosOffset;
  }
}

// Every check (rope_args.h, then this kernel's own limits) and the parameter struct but the outputs
// (filled by launch_rope_params).
posenc_cuda::RopeParams rope_params(const Tensor& q, const OptT& k, const OptT& cos, const OptT& sin,
                                    const OptT& inv_freq, const OptT& positions, const OptT& offsets, int64_t offset,
                                    const OptT& cu_seqlens, const OptT& axis_map, double attention_factor,
                                    bool interleaved, bool conjugate, bool exact, bool inplace) {
  const RopeShape r = posenc::check_rope(q, k, cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map,
                                         attention_factor, exact, inplace);
  {
    const c10::cuda::CUDAGuard guard(q.device());  // ATen reductions of the value checks on q's device
    posenc::check_rope_values(r, cos, positions, offsets, offset, cu_seqlens, axis_map, q.device());
  }
  check_last_stride(q, "q");
  if (k.has_value()) check_last_stride(*k, "k");
  TORCH_CHECK(r.Hq + r.Hk < (int64_t{1} << 31), "too many heads for the CUDA C++ kernel: ", r.Hq + r.Hk);

  posenc_cuda::RopeParams p;
  const int64_t half = r.half;
  if (r.tables) {
    p.angle_mode = posenc_cuda::kAngleTable;
    p.cos = cos->data_ptr();
    p.sin = sin->data_ptr();
    p.cos_dtype = dtype_code(cos->scalar_type());
    p.sin_dtype = dtype_code(sin->scalar_type());
    posenc::set_table_strides(p, *cos, *sin);
  } else {
    const Tensor& f = *inv_freq;
    p.angle_mode = exact ? posenc_cuda::kAngleInvFreqExact : posenc_cuda::kAngleInvFreq;
    p.inv_freq = f.data_ptr();
    p.inv_freq_dtype = dtype_code(f.scalar_type());
    p.stride_inv_freq = f.stride(0);
    p.attention_factor = static_cast<float>(attention_factor);  // fp32 scalar, as Triton's (posenc_cuda.h)
  }
  if (cu_seqlens.has_value()) {
    const Tensor& cu = *cu_seqlens;
    p.pos_mode = posenc_cuda::kPosCuSeqlens;
    p.cu = cu.data_ptr();
    p.cu_dtype = dtype_code(cu.scalar_type());
    p.stride_cu = cu.stride(0);
    p.n_seq = cu.size(0) - 1;
    p.offset = offset;
    if (offsets.has_value()) {
      const Tensor& o = *offsets;
      p.pos = o.data_ptr();
      p.pos_dtype = dtype_code(o.scalar_type());
      p.stride_pos_b = o.stride(0);
    }
  } else if (axis_map.has_value()) {
    const Tensor& m = *axis_map;
    const Tensor& ps = *positions;
    p.pos_mode = posenc_cuda::kPosPositions;
    p.pos = ps.data_ptr();
    p.pos_dtype = dtype_code(ps.scalar_type());
    p.stride_pos_a = ps.stride(0);
    p.stride_pos_b = ps.dim() == 3 ? ps.stride(1) : 0;
    p.stride_pos_s = ps.stride(-1);
    p.axis = m.data_ptr();
    p.axis_dtype = dtype_code(m.scalar_type());
    p.stride_axis = m.stride(0);
    p.n_axes = ps.size(0);
  } else {
    fill_positions(positions, offsets, offset, p.pos_mode, p.pos, p.pos_dtype, p.stride_pos_b, p.stride_pos_s,
                   p.offset);
  }
  p.q = q.data_ptr();
  p.n_tokens = r.B * r.S;
  p.seqlen = r.S;
  p.heads_q = r.Hq;
  p.heads_k = r.Hk;
  p.head_dim = r.D;
  p.half = half;
  p.stride_q_b = r.packed ? 0 : q.stride(0), p.stride_q_s = q.stride(-3), p.stride_q_h = q.stride(-2);
  if (r.Hk > 0) {
    p.k = k->data_ptr();
    p.stride_k_b = r.packed ? 0 : k->stride(0), p.stride_k_s = k->stride(-3), p.stride_k_h = k->stride(-2);
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
  p.stride_qo_b = packed ? 0 : q_out.stride(0), p.stride_qo_s = q_out.stride(-3), p.stride_qo_h = q_out.stride(-2);
  // in place (same memory and layout): the pass-through channels are already where they belong
  p.copy_tail_q = partial && !same_elements(q_out, q);
  if (p.heads_k > 0) {
    p.k_out = k_out->data_ptr();
    p.stride_ko_b = packed ? 0 : k_out->stride(0), p.stride_ko_s = k_out->stride(-3), p.stride_ko_h = k_out->stride(-2);
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

void rope_inplace_cuda(const Tensor& q, const OptT& k, const OptT& cos, const OptT& sin, const OptT& inv_freq,
                       const OptT& positions, const OptT& offsets, int64_t offset, const OptT& cu_seqlens,
                       const OptT& axis_map, double attention_factor, bool interleaved, bool conjugate, bool exact) {
  posenc_cuda::RopeParams p = rope_params(q, k, cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map,
                                          attention_factor, interleaved, conjugate, exact, /*inplace=*/true);
  launch_rope_params(p, q, k, q, k);
}

std::tuple<Tensor, Tensor> rope_cuda(const Tensor& q, const OptT& k, const OptT& cos, const OptT& sin,
                                     const OptT& inv_freq, const OptT& positions, const OptT& offsets, int64_t offset,
                                     const OptT& cu_seqlens, const OptT& axis_map, double attention_factor,
                                     bool interleaved, bool conjugate, bool exact) {
  posenc_cuda::RopeParams p = rope_params(q, k, cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map,
                                          attention_factor, interleaved, conjugate, exact, /*inplace=*/false);
  Tensor q_out = at::empty_like(q);
  Tensor k_out = k.has_value() ? at::empty_like(*k) : at::empty({0}, q.options());
  const OptT ko = k.has_value() ? OptT(k_out) : std::nullopt;
  check_last_stride(q_out, "q_out (empty_like(q))");
  if (ko.has_value()) check_last_stride(*ko, "k_out (empty_like(k))");
  launch_rope_params(p, q, k, q_out, ko);
  return {q_out, k_out};
}

using Layout3 = posenc::SinusoidalLayout;

// out (a [B, S, D] layout) = x * x_scale + PE; x absent for the encoding alone. Arguments checked.
void launch_sinusoidal_layout(const Tensor& ref, at::ScalarType st, const Layout3& o, void* out_ptr, const Layout3* x,
                              const void* x_ptr, const OptT& positions, const OptT& offsets, int64_t offset,
                              double x_scale, double base, bool interleaved, bool cos_first, double freq_shift,
                              double scale) {
  TORCH_CHECK(o.D <= 1 || o.stride_d == 1, "the CUDA C++ kernel needs stride(-1) == 1 for the output, got ",
              o.stride_d);
  TORCH_CHECK(x == nullptr || x->D <= 1 || x->stride_d == 1,
              "x must have stride(-1) == 1 for the CUDA C++ kernel (contiguous channels; other strides are fine), "
              "got ", x ? x->stride_d : 0, "; the Triton backend serves other layouts");
  posenc_cuda::SinusoidalParams p;
  fill_positions(positions, offsets, offset, p.pos_mode, p.pos, p.pos_dtype, p.stride_pos_b, p.stride_pos_s,
                 p.offset);
  if (o.B * o.S == 0 || o.D == 0) return;
  const Tensor inv = posenc::sinusoidal_inv_freq(o.D / 2, base, freq_shift, st == at::kDouble ? at::kDouble : at::kFloat,
                                                 ref.device());
  p.x = x_ptr;
  p.out = out_ptr;
  p.n_tokens = o.B * o.S;
  p.seqlen = o.S;
  p.dim = o.D;
  p.half = o.D / 2;
  if (x) p.stride_x_b = x->stride_b, p.stride_x_s = x->stride_s;
  p.stride_o_b = o.stride_b, p.stride_o_s = o.stride_s;
  p.inv_freq = inv.data_ptr();
  p.inv_freq_dtype = dtype_code(inv.scalar_type());
  p.stride_inv_freq = 1;
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

Tensor sinusoidal_table_cuda(const OptT& positions, int64_t length, int64_t dim, double base, bool interleaved,
                             bool cos_first, double freq_shift, double scale, at::ScalarType dtype, at::Device device) {
  posenc::check_sinusoidal_table(positions, length, dim, base, freq_shift, scale, dtype, device);
  const auto opts = at::TensorOptions().dtype(dtype).device(device);
  Tensor out;
  OptT flat;
  if (positions.has_value()) {
    std::vector<int64_t> shape(positions->sizes().begin(), positions->sizes().end());
    shape.push_back(dim);
    out = at::empty(shape, opts);
    flat = positions->reshape({-1});
  } else {
    out = at::empty({length, dim}, opts);
  }
  const int64_t N = out.numel() / dim;
  launch_sinusoidal_layout(out, dtype, Layout3{1, N, dim, 0, dim, 1}, out.data_ptr(), nullptr, nullptr, flat,
                           std::nullopt, 0, 1.0, base, interleaved, cos_first, freq_shift, scale);
  return out;
}

void add_sinusoidal_inplace_cuda(const Tensor& x, const OptT& positions, const OptT& offsets, int64_t offset,
                                 double x_scale, double base, bool interleaved, bool cos_first, double freq_shift,
                                 double scale) {
  const Layout3 l =
      posenc::check_sinusoidal_add(x, positions, offsets, offset, x_scale, base, freq_shift, scale, /*inplace=*/true);
  launch_sinusoidal_layout(x, x.scalar_type(), l, x.data_ptr(), &l, x.data_ptr(), positions, offsets, offset, x_scale,
                           base, interleaved, cos_first, freq_shift, scale);
}

Tensor add_sinusoidal_cuda(const Tensor& x, const OptT& positions, const OptT& offsets, int64_t offset,
                           double x_scale, double base, bool interleaved, bool cos_first, double freq_shift,
                           double scale) {
  const Layout3 lx =
      posenc::check_sinusoidal_add(x, positions, offsets, offset, x_scale, base, freq_shift, scale, /*inplace=*/false);
  Tensor out = at::empty_like(x);
  const Layout3 lo = posenc::sinusoidal_layout(out);
  launch_sinusoidal_layout(x, x.scalar_type(), lo, out.data_ptr(), &lx, x.data_ptr(), positions, offsets, offset,
                           x_scale, base, interleaved, cos_first, freq_shift, scale);
  return out;
}

Tensor concat_sinusoidal_cuda(const Tensor& x, const OptT& positions, const OptT& offsets, int64_t offset,
                              int64_t dim_pe, double base, bool interleaved, bool cos_first, double freq_shift,
                              double scale) {
  posenc::check_sinusoidal_concat(x, positions, offsets, offset, dim_pe, base, freq_shift, scale);
  const int64_t D = x.size(-1);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() += dim_pe;
  Tensor out = at::empty(shape, x.options());
  Layout3 lo = posenc::sinusoidal_layout(out);
  lo.D = dim_pe;
  launch_sinusoidal_layout(x, x.scalar_type(), lo, static_cast<char*>(out.data_ptr()) + D * out.element_size(),
                           nullptr, nullptr, positions, offsets, offset, 1.0, base, interleaved, cos_first, freq_shift,
                           scale);
  if (D > 0) out.narrow(-1, 0, D).copy_(x);
  return out;
}

// Whether the current stream of `device` captures a CUDA graph: the value checks are skipped then.
bool capturing(const c10::Device& device) {
  const c10::cuda::CUDAGuard guard(device);
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

struct RegisterCuda {
  RegisterCuda() {
    using namespace posenc;
    cuda_capture_query() = &capturing;
    AddNative<ops::RopeInplace>(kNativeCUDA, &rope_inplace_cuda);
    AddNative<ops::Rope>(kNativeCUDA, &rope_cuda);
    AddNative<ops::SinusoidalTable>(kNativeCUDA, &sinusoidal_table_cuda);
    AddNative<ops::AddSinusoidalInplace>(kNativeCUDA, &add_sinusoidal_inplace_cuda);
    AddNative<ops::AddSinusoidal>(kNativeCUDA, &add_sinusoidal_cuda);
    AddNative<ops::ConcatSinusoidal>(kNativeCUDA, &concat_sinusoidal_cuda);
  }
};
const RegisterCuda register_cuda;

}  // namespace
