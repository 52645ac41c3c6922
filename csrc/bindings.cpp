// The native extension's registration and control ops (see native_ops.h for the design).
//
// Registered once, statically, when the library is loaded (the Python schemas are defined before Python
// loads it), never deregistered:
//   BackendSelect   every public op's chooser (NativeOp<Op>::choose): this build's C++ kernel for the
//                   device of the call when the backend selection says native, else a redispatch below
//                   BackendSelect to Python's CPU/CUDA kernel (Meta, ... for other devices);
//   ADInplaceOrView the mutating ops: redispatch, then bump the version of each mutated argument.
// Nothing on the CPU / CUDA keys (Python's kernels live there).
//
// Control ops (schemas here, TORCH_LIBRARY_FRAGMENT):
//   _native_set_backend(int code) -> ()         process default: 0 auto, 1 triton, 2 native, 3 torch
//   _native_set_thread_backend(int code) -> ()  this thread's override (same codes; -1 clears it)
//   _native_set_triton(bool cpu, bool cuda) -> () whether `auto` prefers Triton on that device type
//   _native_ops(str key) -> str[]               "CPU" / "CUDA": the public ops this build has kernels for;
//                                               "BackendSelect" / "ADInplaceOrView": the ops this library
//                                               registered a kernel for on that key
//   _native_value_checks(bool enabled) -> ()    the checks that read tensor values; default on
//   _native_cpu_isa() -> str[]                  ["rope=<ISA>", "sinusoidal=<ISA>"]: the instruction set of
//                                               the CPU kernel variants this process runs (native_ops.h)
// Native runs op O on device type d iff O has a kernel for d and (code == native or (code == auto and
// Triton is not preferred on d)), code = this thread's override if set, else the process default.

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>  // at::AutoDispatchBelowADInplaceOrView (torch 2.12 has no indirect include)
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/irange.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <tuple>

#include "native_ops.h"
#include "py_checks.h"

namespace posenc {

namespace {

std::atomic<bool> g_value_checks{true};
std::atomic<int> g_default_backend{kAuto};
std::atomic<bool> g_triton_preferred[2] = {false, false};  // per NativeDevice
thread_local int t_backend = kNoOverride;

int checked_code(int64_t code, bool allow_clear) {
  TORCH_CHECK_VALUE((code >= kAuto && code <= kTorch) || (allow_clear && code == kNoOverride),
                    "backend code must be 0 (auto), 1 (triton), 2 (native) or 3 (torch)",
                    allow_clear ? ", or -1 (no thread override)" : "", ", got ", code);
  return static_cast<int>(code);
}

void native_set_backend(int64_t code) { g_default_backend.store(checked_code(code, false), std::memory_order_relaxed); }
void native_set_thread_backend(int64_t code) { t_backend = checked_code(code, true); }
void native_set_triton(bool cpu, bool cuda) {
  g_triton_preferred[kNativeCPU].store(cpu, std::memory_order_relaxed);
  g_triton_preferred[kNativeCUDA].store(cuda, std::memory_order_relaxed);
}
void native_value_checks(bool enabled) { g_value_checks.store(enabled, std::memory_order_relaxed); }

// ADInplaceOrView for the mutable public ops: redispatch below ADInplaceOrView, then bump the version
// counter of each argument the schema writes (Tensor(a!)), once per call, as ATen's in-place ops do.
// torch::autograd::autogradNotImplementedInplaceOrViewFallback() was tried first: it handles views only
// (the version bump of mutated inputs lives in its Autograd-key twin), so q._version stayed unchanged.
// Unboxed kernels, one per op, keep the decode path free of boxing. They take the schemas' SymInts and pass
// them on unchanged (a traced call keeps its symbolic offset).
void rope_ad_inplace(c10::DispatchKeySet ks, const at::Tensor& q, const OptT& k, const OptT& cos, const OptT& sin,
                     const OptT& inv_freq, const OptT& positions, const OptT& offsets, c10::SymInt offset,
                     const OptT& cu_seqlens, const OptT& axis_map, double attention_factor, bool interleaved,
                     bool conjugate, bool exact) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    NativeOp<ops::RopeInplace>::handle().redispatch(ks & c10::after_ADInplaceOrView_keyset, q, k, cos, sin, inv_freq,
                                                     positions, offsets, offset, cu_seqlens, axis_map,
                                                     attention_factor, interleaved, conjugate, exact);
  }
  torch::autograd::impl::bump_version(q);
  if (k.has_value()) torch::autograd::impl::bump_version(*k);
}

void qk_norm_rope_ad_inplace(c10::DispatchKeySet ks, const at::Tensor& q, const OptT& k, const OptT& q_weight,
                             const OptT& k_weight, double eps, c10::SymInt norm, double weight_offset, const OptT& cos,
                             const OptT& sin, const OptT& inv_freq, const OptT& positions, const OptT& offsets,
                             c10::SymInt offset, const OptT& cu_seqlens, const OptT& axis_map, double attention_factor,
                             bool interleaved, bool conjugate, bool exact) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    NativeOp<ops::QkNormRopeInplace>::handle().redispatch(
        ks & c10::after_ADInplaceOrView_keyset, q, k, q_weight, k_weight, eps, norm, weight_offset, cos, sin, inv_freq,
        positions, offsets, offset, cu_seqlens, axis_map, attention_factor, interleaved, conjugate, exact);
  }
  torch::autograd::impl::bump_version(q);
  if (k.has_value()) torch::autograd::impl::bump_version(*k);
}

void add_sinusoidal_ad_inplace(c10::DispatchKeySet ks, const at::Tensor& x, const OptT& positions,
                               const OptT& offsets, c10::SymInt offset, double x_scale, double base, bool interleaved,
                               bool cos_first, double freq_shift, double scale) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    NativeOp<ops::AddSinusoidalInplace>::handle().redispatch(ks & c10::after_ADInplaceOrView_keyset, x, positions,
                                                              offsets, offset, x_scale, base, interleaved, cos_first,
                                                              freq_shift, scale);
  }
  torch::autograd::impl::bump_version(x);
}

void add_position_embedding_ad_inplace(c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& table,
                                       const at::Tensor& positions, std::optional<c10::SymInt> padding_idx) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    NativeOp<ops::AddPositionEmbeddingInplace>::handle().redispatch(ks & c10::after_ADInplaceOrView_keyset, x, table,
                                                                     positions, padding_idx);
  }
  torch::autograd::impl::bump_version(x);
}

// Bumps every written argument the schema marks (q and k even when q_fp8 takes the rotated q, as Python's
// registry.py _inplace_view_kernel does for every mutated argument present).
void rope_and_cache_ad_inplace(c10::DispatchKeySet ks, const at::Tensor& q, const at::Tensor& k, const OptT& v,
                               const at::Tensor& k_cache, const OptT& v_cache, const OptT& q_fp8,
                               const OptT& slot_mapping, const OptT& cache_positions, c10::SymInt kv_layout,
                               const OptT& k_scale, const OptT& v_scale, const OptT& q_scale, OptD k_scale_value,
                               OptD v_scale_value, OptD q_scale_value, const OptT& q_weight, const OptT& k_weight,
                               double eps, c10::SymInt norm, double weight_offset, const OptT& cos, const OptT& sin,
                               const OptT& inv_freq, const OptT& positions, const OptT& offsets, c10::SymInt offset,
                               const OptT& cu_seqlens, const OptT& axis_map, double attention_factor, bool interleaved,
                               bool conjugate, bool exact) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    NativeOp<ops::RopeAndCacheInplace>::handle().redispatch(
        ks & c10::after_ADInplaceOrView_keyset, q, k, v, k_cache, v_cache, q_fp8, slot_mapping, cache_positions,
        kv_layout, k_scale, v_scale, q_scale, k_scale_value, v_scale_value, q_scale_value, q_weight, k_weight, eps,
        norm, weight_offset, cos, sin, inv_freq, positions, offsets, offset, cu_seqlens, axis_map, attention_factor,
        interleaved, conjugate, exact);
  }
  torch::autograd::impl::bump_version(q);
  torch::autograd::impl::bump_version(k);
  torch::autograd::impl::bump_version(k_cache);
  if (v_cache.has_value()) torch::autograd::impl::bump_version(*v_cache);
  if (q_fp8.has_value()) torch::autograd::impl::bump_version(*q_fp8);
}

const char* const kMutatingOps[] = {"rope_", "qk_norm_rope_", "rope_and_cache_", "add_sinusoidal_",
                                    "add_position_embedding_"};

template <class Op>
void add_if_kernel(std::vector<std::string>& names, int slot) {
  if (slot < 0 || NativeOp<Op>::kernels[slot] != nullptr) names.emplace_back(Op::name);
}

std::vector<std::string> native_ops(const std::string& key) {
  std::vector<std::string> names;
  if (key == "ADInplaceOrView") {
    names.assign(std::begin(kMutatingOps), std::end(kMutatingOps));
    return names;
  }
  const int slot = key == "CPU" ? kNativeCPU : key == "CUDA" ? kNativeCUDA : key == "BackendSelect" ? -1 : -2;
  TORCH_CHECK_VALUE(slot != -2, "_native_ops: key must be \"CPU\", \"CUDA\", \"BackendSelect\" or "
                    "\"ADInplaceOrView\", got \"", key, "\"");
#define POSENC_ADD(Tag, Name, Sig) add_if_kernel<ops::Tag>(names, slot);
  POSENC_PUBLIC_OPS(POSENC_ADD)
#undef POSENC_ADD
  return names;
}

std::vector<std::string> native_cpu_isa() {
  return {std::string("rope=") + rope_cpu_isa(), std::string("sinusoidal=") + sinusoidal_cpu_isa()};
}

}  // namespace

bool native_selected(NativeDevice dev) {
  int code = t_backend;
  if (code == kNoOverride) code = g_default_backend.load(std::memory_order_relaxed);
  return code == kNative || (code == kAuto && !g_triton_preferred[dev].load(std::memory_order_relaxed));
}

bool value_checks_enabled() { return g_value_checks.load(std::memory_order_relaxed); }

CaptureQuery& cuda_capture_query() {
  static CaptureQuery q = nullptr;
  return q;
}

bool value_checks_on(const c10::Device& device) {
  if (!value_checks_enabled()) return false;
  if (device.is_cuda()) {
    const CaptureQuery q = cuda_capture_query();
    return q == nullptr || !q(device);
  }
  return true;
}

std::string disjoint_error(const char* name_a, const at::Tensor& a, const char* name_b, const at::Tensor& b) {
  return posenc_alias::disjoint_message(name_a, a, name_b, b);  // the one exact check (alias_checks.h)
}

bool index_min_max(const at::Tensor& t, int64_t& lo, int64_t& hi) {
  const int64_t n = t.numel();
  if (n == 0) return false;
  if (!t.device().is_cpu()) {  // ATen reductions, one copy to the host
    c10::InferenceMode guard;
    const auto mm = at::aminmax(t.to(at::kLong));
    const at::Tensor both = at::stack({std::get<0>(mm), std::get<1>(mm)}).cpu();
    lo = both.data_ptr<int64_t>()[0];
    hi = both.data_ptr<int64_t>()[1];
    return true;
  }
  const int code = dtype_code(t.scalar_type());
  TORCH_CHECK(code >= kInt8, "index_min_max: expected an integer tensor, got ", t.scalar_type());
  const void* base = t.const_data_ptr();
  lo = std::numeric_limits<int64_t>::max();
  hi = std::numeric_limits<int64_t>::min();
  const int64_t nd = t.dim();
  if (nd <= 1) {  // the common case (positions [S], offsets [B]): one strided walk
    const int64_t st = nd == 0 ? 0 : t.stride(0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = load_index(base, code, i * st);
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
    return true;
  }
  // any rank: an odometer over the sizes
  c10::SmallVector<int64_t, 6> idx(nd, 0);
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  for (int64_t i = 0; i < n; ++i) {
    int64_t off = 0;
    for (int64_t d = 0; d < nd; ++d) off += idx[d] * strides[d];
    const int64_t v = load_index(base, code, off);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
    for (int64_t d = nd - 1; d >= 0; --d) {
      if (++idx[d] < sizes[d]) break;
      idx[d] = 0;
    }
  }
  return true;
}

CuSeqlensStats cu_seqlens_stats(const at::Tensor& cu, const OptT& offsets, int64_t offset) {
  CuSeqlensStats c;
  const int64_t N = cu.size(0) - 1;
  if (!cu.device().is_cpu()) {  // positions.py check_position_values' tensor ops, one copy to the host
    c10::InferenceMode guard;
    const at::Tensor cu64 = cu.to(at::kLong);
    const at::Tensor lengths = cu64.slice(0, 1) - cu64.slice(0, 0, N);
    const at::Tensor start = offsets.has_value() ? offsets->to(at::kLong) : at::full_like(lengths, offset);
    const at::Tensor used = lengths > 0;
    const int64_t big = std::numeric_limits<int64_t>::max();
    const at::Tensor lo = at::where(used, start, big).min();
    const at::Tensor hi = at::where(used, start + lengths - 1, -big).max();
    const at::Tensor all =
        at::stack({cu64.select(0, 0), cu64.select(0, N), (lengths < 0).any().to(at::kLong), lo, hi}).cpu();
    const int64_t* v = all.data_ptr<int64_t>();
    c.first = v[0], c.last = v[1], c.decreasing = v[2] != 0, c.lo = v[3], c.hi = v[4];
    if (c.lo == big) c.lo = std::numeric_limits<int64_t>::max();
    if (c.hi == -big) c.hi = std::numeric_limits<int64_t>::min();
    return c;
  }
  const int cc = dtype_code(cu.scalar_type());
  const int64_t cst = cu.stride(0);
  const void* cp = cu.const_data_ptr();
  const int oc = offsets.has_value() ? dtype_code(offsets->scalar_type()) : kInt64;
  const void* op = offsets.has_value() ? offsets->const_data_ptr() : nullptr;
  const int64_t ost = offsets.has_value() ? offsets->stride(0) : 0;
  c.first = load_index(cp, cc, 0);
  c.last = load_index(cp, cc, N * cst);
  c.lo = std::numeric_limits<int64_t>::max();
  c.hi = std::numeric_limits<int64_t>::min();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t len = load_index(cp, cc, (n + 1) * cst) - load_index(cp, cc, n * cst);
    c.decreasing |= len < 0;
    if (len > 0) {
      const int64_t start = op ? load_index(op, oc, n * ost) : offset;
      c.lo = std::min(c.lo, start);
      c.hi = std::max(c.hi, start + len - 1);
    }
  }
  return c;
}

std::string format_list(const at::Tensor& t, int64_t max_items) {
  const at::Tensor h = t.device().is_cpu() ? t : t.cpu();
  const int code = dtype_code(h.scalar_type());
  TORCH_CHECK(code >= kInt8 && h.dim() == 1, "format_list: a 1-D integer tensor");
  std::ostringstream os;
  os << "[";
  const int64_t n = std::min<int64_t>(h.size(0), max_items);
  for (int64_t i = 0; i < n; ++i) os << (i ? ", " : "") << load_index(h.const_data_ptr(), code, i * h.stride(0));
  os << "]";
  return os.str();
}

at::Tensor sinusoidal_inv_freq(int64_t half, double base, double freq_shift, at::ScalarType dtype,
                               c10::Device device) {
  using Key = std::tuple<int64_t, double, double, int, int, int>;
  static std::mutex mu;
  static std::map<Key, at::Tensor> cache;
  const Key key{half, base, freq_shift, static_cast<int>(dtype), static_cast<int>(device.type()), device.index()};
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (cache.size() > 256) cache.clear();  // bounded: conventions are few
  at::Tensor inv;
  {
    // exactly _inv_freq's ops: torch.exp(-math.log(base) * arange(half, fp64) / (half - freq_shift)).to(dtype),
    // on CPU, outside any autograd / inference mode of the caller
    c10::InferenceMode guard(false);
    const at::Tensor i = at::arange(half, at::TensorOptions().dtype(at::kDouble));
    inv = at::exp(at::div(at::mul(i, -std::log(base)), static_cast<double>(half) - freq_shift)).to(dtype);
    if (!device.is_cpu()) inv = inv.to(device);
  }
  cache.emplace(key, inv);
  return inv;
}

}  // namespace posenc

// Registered once at load; see the header comment.
TORCH_LIBRARY_IMPL(posenc, BackendSelect, m) {
#define POSENC_CHOOSER(Tag, Name, Sig) m.impl(Name, TORCH_FN(posenc::NativeOp<posenc::ops::Tag>::choose));
  POSENC_PUBLIC_OPS(POSENC_CHOOSER)
#undef POSENC_CHOOSER
}

TORCH_LIBRARY_IMPL(posenc, ADInplaceOrView, m) {
  m.impl("rope_", TORCH_FN(posenc::rope_ad_inplace));
  m.impl("qk_norm_rope_", TORCH_FN(posenc::qk_norm_rope_ad_inplace));
  m.impl("rope_and_cache_", TORCH_FN(posenc::rope_and_cache_ad_inplace));
  m.impl("add_sinusoidal_", TORCH_FN(posenc::add_sinusoidal_ad_inplace));
  m.impl("add_position_embedding_", TORCH_FN(posenc::add_position_embedding_ad_inplace));
}

TORCH_LIBRARY_FRAGMENT(posenc, m) {
  m.def("_native_set_backend(int code) -> ()", &posenc::native_set_backend);
  m.def("_native_set_thread_backend(int code) -> ()", &posenc::native_set_thread_backend);
  m.def("_native_set_triton(bool cpu, bool cuda) -> ()", &posenc::native_set_triton);
  m.def("_native_ops(str key) -> str[]", &posenc::native_ops);
  m.def("_native_value_checks(bool enabled) -> ()", &posenc::native_value_checks);
  m.def("_native_cpu_isa() -> str[]", &posenc::native_cpu_isa);
}
