// The native extension's control ops, and the registry behind them.
//
// The public ops (posenc::rope_, posenc::rope, posenc::sinusoidal_table, posenc::add_sinusoidal_,
// posenc::add_sinusoidal, posenc::concat_sinusoidal, posenc::add_position_embedding_,
// posenc::add_position_embedding) are defined ONCE, by their schema strings in Python
// (torch.library.Library("posenc", "FRAGMENT").define). This library registers nothing for them at load:
// the family files (rope_cpu.cpp, sinusoidal_cpu.cpp, learned_cpu.cpp, cuda_ops.cpp) each add a kernel set
// (dispatch key, op names, a registering function) to the registry below, and Python decides when to
// install a set with
//
//   _native_register(str key, bool enable) -> str[]
//       key "CPU" / "CUDA" (this build's kernels for that key), "ADInplaceOrView" (a version-counter bump
//       of each mutated argument after redispatch, for each mutable op), "BackendSelect" (sinusoidal_table, whose only tensor argument
//       is optional: picks the kernel from its `device` argument). enable=True creates, once (idempotent), a
//       heap-held torch::Library(IMPL, "posenc", key) registering the set; enable=False destroys it, which
//       deregisters the kernels. Returns the op names registered (or unregistered).
//   _native_ops(str key) -> str[]        which public ops this build can register for key ([] if none)
//   _native_value_checks(bool enabled) -> ()
//       the process-wide switch of the checks that read tensor values (table rows, cu_seqlens, axis_map)
//       in the CPU kernels; default on. Python mirrors its own setting here.

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>  // at::AutoDispatchBelowADInplaceOrView (torch 2.12 has no indirect include)
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/irange.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <tuple>

#include "native_ops.h"

namespace posenc {

std::vector<KernelSet>& kernel_sets() {
  static std::vector<KernelSet> sets;
  return sets;
}

namespace {

std::atomic<bool> g_value_checks{true};

std::mutex g_lib_mutex;
std::map<std::string, std::unique_ptr<torch::Library>>& libraries() {
  static std::map<std::string, std::unique_ptr<torch::Library>> libs;
  return libs;
}

// ADInplaceOrView for the mutable public ops: redispatch below ADInplaceOrView, then bump the version
// counter of each argument the schema writes (Tensor(a!)), once per call, as ATen's in-place ops do.
// torch::autograd::autogradNotImplementedInplaceOrViewFallback() was tried first: it handles views only
// (the version bump of mutated inputs lives in its Autograd-key twin), so q._version stayed unchanged.
// Unboxed kernels, one per op, keep the decode path free of boxing.
using OptT = std::optional<at::Tensor>;

void rope_ad_inplace(c10::DispatchKeySet ks, const at::Tensor& q, const OptT& k, const OptT& cos, const OptT& sin,
                     const OptT& inv_freq, const OptT& positions, const OptT& offsets, int64_t offset,
                     const OptT& cu_seqlens, const OptT& axis_map, double attention_factor, bool interleaved,
                     bool conjugate, bool exact) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("posenc::rope_", "")
                             .typed<void(const at::Tensor&, const OptT&, const OptT&, const OptT&, const OptT&,
                                         const OptT&, const OptT&, int64_t, const OptT&, const OptT&, double, bool,
                                         bool, bool)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, q, k, cos, sin, inv_freq, positions, offsets, offset,
                  cu_seqlens, axis_map, attention_factor, interleaved, conjugate, exact);
  }
  torch::autograd::impl::bump_version(q);
  if (k.has_value()) torch::autograd::impl::bump_version(*k);
}

void add_sinusoidal_ad_inplace(c10::DispatchKeySet ks, const at::Tensor& x, const OptT& positions,
                               const OptT& offsets, int64_t offset, double x_scale, double base, bool interleaved,
                               bool cos_first, double freq_shift, double scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("posenc::add_sinusoidal_", "")
                             .typed<void(const at::Tensor&, const OptT&, const OptT&, int64_t, double, double, bool,
                                         bool, double, double)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, x, positions, offsets, offset, x_scale, base, interleaved,
                  cos_first, freq_shift, scale);
  }
  torch::autograd::impl::bump_version(x);
}

void add_position_embedding_ad_inplace(c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& table,
                                       const at::Tensor& positions, std::optional<int64_t> padding_idx) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("posenc::add_position_embedding_", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, std::optional<int64_t>)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, x, table, positions, padding_idx);
  }
  torch::autograd::impl::bump_version(x);
}

void register_ad_inplace(torch::Library& m) {
  m.impl("rope_", TORCH_FN(rope_ad_inplace));
  m.impl("add_sinusoidal_", TORCH_FN(add_sinusoidal_ad_inplace));
  m.impl("add_position_embedding_", TORCH_FN(add_position_embedding_ad_inplace));
}

// sinusoidal_table has no tensor argument when positions is None, so no backend key to dispatch on:
// BackendSelect computes it from the `device` (and dtype) arguments, as ATen's factory functions do.
at::Tensor sinusoidal_table_backend_select(c10::DispatchKeySet ks, const std::optional<at::Tensor>& positions,
                                           int64_t length, int64_t dim, double base, bool interleaved,
                                           bool cos_first, double freq_shift, double scale, at::ScalarType dtype,
                                           at::Device device) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("posenc::sinusoidal_table", "")
          .typed<at::Tensor(const std::optional<at::Tensor>&, int64_t, int64_t, double, bool, bool, double, double,
                            at::ScalarType, at::Device)>();
  // the backend of `device`, plus whatever of the caller's keys lies below BackendSelect (never BackendSelect
  // itself again)
  static const c10::DispatchKeySet after_backend_select(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::BackendSelect);
  const c10::DispatchKeySet key(c10::computeDispatchKey(dtype, at::kStrided, device));
  return op.redispatch(key | (ks & after_backend_select), positions, length, dim, base, interleaved, cos_first,
                       freq_shift, scale, dtype, device);
}

void register_backend_select(torch::Library& m) {
  m.impl("sinusoidal_table", TORCH_FN(sinusoidal_table_backend_select));
}

const AddKernelSet add_ad_inplace("ADInplaceOrView", {"rope_", "add_sinusoidal_", "add_position_embedding_"},
                                  &register_ad_inplace);
const AddKernelSet add_backend_select("BackendSelect", {"sinusoidal_table"}, &register_backend_select);

c10::DispatchKey parse_key(const std::string& key) {
  if (key == "CPU") return c10::DispatchKey::CPU;
  if (key == "CUDA") return c10::DispatchKey::CUDA;
  if (key == "ADInplaceOrView") return c10::DispatchKey::ADInplaceOrView;
  if (key == "BackendSelect") return c10::DispatchKey::BackendSelect;
  TORCH_CHECK_VALUE(false, "_native_register: key must be \"CPU\", \"CUDA\", \"ADInplaceOrView\" or "
                    "\"BackendSelect\", got \"", key, "\"");
}

std::vector<std::string> native_ops(const std::string& key) {
  parse_key(key);
  std::vector<std::string> names;
  for (const auto& s : kernel_sets()) {
    if (s.key == key) names.insert(names.end(), s.ops.begin(), s.ops.end());
  }
  return names;
}

std::vector<std::string> native_register(const std::string& key, bool enable) {
  const c10::DispatchKey k = parse_key(key);
  std::vector<std::string> names = native_ops(key);
  std::lock_guard<std::mutex> lock(g_lib_mutex);
  auto& libs = libraries();
  auto it = libs.find(key);
  if (enable) {
    if (it == libs.end() && !names.empty()) {
      auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "posenc", k, __FILE__, __LINE__);
      for (const auto& s : kernel_sets()) {
        if (s.key == key) s.fn(*lib);
      }
      libs.emplace(key, std::move(lib));
    }
  } else if (it != libs.end()) {
    libs.erase(it);  // ~Library deregisters every kernel it registered
  }
  return names;
}

void native_value_checks(bool enabled) { g_value_checks.store(enabled, std::memory_order_relaxed); }

}  // namespace

bool value_checks_enabled() { return g_value_checks.load(std::memory_order_relaxed); }

bool index_min_max(const at::Tensor& t, int64_t& lo, int64_t& hi) {
  const int64_t n = t.numel();
  if (n == 0) return false;
  int code = kI64;
  TORCH_CHECK(index_code(t.scalar_type(), code), "expected an integer tensor, got ", t.scalar_type());
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

std::string format_list(const at::Tensor& t, int64_t max_items) {
  int code = kI64;
  TORCH_CHECK(index_code(t.scalar_type(), code) && t.dim() == 1, "format_list: a 1-D integer tensor");
  std::ostringstream os;
  os << "[";
  const int64_t n = std::min<int64_t>(t.size(0), max_items);
  for (int64_t i = 0; i < n; ++i) os << (i ? ", " : "") << load_index(t.const_data_ptr(), code, i * t.stride(0));
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

TORCH_LIBRARY_FRAGMENT(posenc, m) {
  m.def("_native_register(str key, bool enable) -> str[]", &posenc::native_register);
  m.def("_native_ops(str key) -> str[]", &posenc::native_ops);
  m.def("_native_value_checks(bool enabled) -> ()", &posenc::native_value_checks);
}
