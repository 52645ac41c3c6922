// Every schema of the native posenc ops, in one place.
//
// The Python package defines its public ops (posenc::rope_, posenc::rope, ...) with torch.library.custom_op
// in the same namespace, so this file adds a FRAGMENT. Implementations register per dispatch key in the
// family files: rope_cpu.cpp / sinusoidal_cpu.cpp (CPU) and cuda_*.cpp (CUDA). The Python wrappers
// validate values (table rows, aliasing) and own autograd; these ops check shapes, dtypes and devices.
//
// native_rope: rotate q [B, S, Hq, D] (and k [B, S, Hk, D]) into q_out/k_out (which may be q/k: in place).
//   Angles from cos/sin tables [P, R/2] (row per token), or on the fly from inv_freq [R/2]: fp32(pos) *
//   fp32(inv_freq) (HF numerics) times attention_factor, or with exact=True double(pos) * inv_freq (fp64),
//   reduced mod 2*pi in double, then fp32 cos/sin. Row of token (b, s): positions[b, s] / positions[s],
//   else offsets[b] + s, else offset + s. Channels [R, D) pass through. conjugate rotates by -theta.
// native_sinusoidal: out [B, S, D] = x * x_scale + PE (x None: the table alone), PE angles
//   (row * inv_freq[i]) * scale, sin/cos interleaved or concatenated (cos_first swaps), odd D last column 0.

#include <ATen/core/LegacyTypeDispatch.h>  // at::AutoDispatchBelowADInplaceOrView (torch 2.12 has no indirect include)
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(posenc, m) {
  m.def(
      "native_rope(Tensor q, Tensor? k, Tensor(a!) q_out, Tensor(b!)? k_out, Tensor? cos, Tensor? sin, "
      "Tensor? inv_freq, Tensor? positions, Tensor? offsets, int offset, float attention_factor, "
      "bool interleaved, bool conjugate, bool exact) -> ()");
  m.def(
      "native_sinusoidal(Tensor? x, Tensor(a!) out, Tensor? positions, Tensor? offsets, int offset, "
      "float x_scale, Tensor inv_freq, float scale, bool interleaved, bool cos_first) -> ()");
}

// ADInplaceOrView: bump the version counters of what the ops write, as torch's own in-place ops do, so
// autograd notices a tensor saved for backward being overwritten even when the op is called directly
// (the Python ops call it below autograd; a no-grad fast path may call it straight from eager code).
namespace posenc {
namespace {

void native_rope_ad_inplace(c10::DispatchKeySet ks, const at::Tensor& q, const std::optional<at::Tensor>& k,
                            const at::Tensor& q_out, const std::optional<at::Tensor>& k_out,
                            const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                            const std::optional<at::Tensor>& inv_freq, const std::optional<at::Tensor>& positions,
                            const std::optional<at::Tensor>& offsets, int64_t offset, double attention_factor,
                            bool interleaved, bool conjugate, bool exact) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("posenc::native_rope", "")
                             .typed<void(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                         int64_t, double, bool, bool, bool)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, q, k, q_out, k_out, cos, sin, inv_freq, positions,
                  offsets, offset, attention_factor, interleaved, conjugate, exact);
  }
  torch::autograd::impl::bump_version(q_out);
  if (k_out.has_value()) torch::autograd::impl::bump_version(*k_out);
}

void native_sinusoidal_ad_inplace(c10::DispatchKeySet ks, const std::optional<at::Tensor>& x, const at::Tensor& out,
                                  const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& offsets,
                                  int64_t offset, double x_scale, const at::Tensor& inv_freq, double scale,
                                  bool interleaved, bool cos_first) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("posenc::native_sinusoidal", "")
                             .typed<void(const std::optional<at::Tensor>&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t,
                                         double, const at::Tensor&, double, bool, bool)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, x, out, positions, offsets, offset, x_scale, inv_freq,
                  scale, interleaved, cos_first);
  }
  torch::autograd::impl::bump_version(out);
}

}  // namespace
}  // namespace posenc

TORCH_LIBRARY_IMPL(posenc, ADInplaceOrView, m) {
  m.impl("native_rope", TORCH_FN(posenc::native_rope_ad_inplace));
  m.impl("native_sinusoidal", TORCH_FN(posenc::native_sinusoidal_ad_inplace));
}
