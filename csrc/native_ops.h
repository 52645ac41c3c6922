// What the op glue files share with bindings.cpp (torch glue only; the kernel sections never include it).
//
// Registration (issue 17: registered once, chosen per call). The public ops are defined by their schema
// strings in Python (posenc_kernels/ops/*/op.py), before Python loads this library. Python registers, once,
// a Python kernel on the CPU and the CUDA key of every public op (its check, then Triton or torch). This
// library registers, once and statically (TORCH_LIBRARY_IMPL at load, bindings.cpp), never deregistering:
//   * BackendSelect: for every public op below (kPublicOps), its chooser NativeOp<Op>::choose. Per call it
//     takes the device of the op's first tensor argument (of its `device` argument for the factory op
//     sinusoidal_table), reads the backend selection (native_chosen) and either calls this build's C++
//     implementation for that device type directly (unboxed: no redispatch, no boxing), or redispatches
//     below BackendSelect, where Python's kernel (or Meta, ...) serves the call;
//   * SymInt: every integer argument of the public ops is `SymInt` in the schemas (so torch.compile does
//     not guard on an int offset's value). The kernels (the *Sig types below, AddNative) keep int64_t; the
//     chooser and the ADInplaceOrView kernels take the dispatcher's form (DispatchSig: c10::SymInt) and pass
//     SymInts on unchanged when they redispatch. Only a native kernel's call concretises them (concrete()),
//     with guard_int, as torch itself does when it calls an int64_t kernel of a SymInt schema
//     (KernelFunction::call, unpackSymInt): on real tensors the values are plain ints, so this is free.
//     So every integer argument of a public op's schema must be SymInt (tests/core/test_symint.py checks
//     it): for an `int` one the chooser's inferred schema (SymInt) does not match, and loading this library
//     throws during static registration, which aborts the importing process ("Type mismatch in argument N:
//     int vs SymInt");
//   * ADInplaceOrView: the version-counter bump of every mutated argument after redispatch, for the
//     mutating ops.
// Nothing is registered on the CPU/CUDA keys. The family files (rope_cpu_ops.cpp, sinusoidal_cpu.cpp,
// learned_cpu.cpp, cuda_ops.cpp) put their implementations in the choosers' slots at load (AddNative);
// the slots are plain function pointers, constant-initialised, read per call.
//
// Backend selection: a process default (relaxed atomic) and a thread-local override, set by Python through
// the control ops of bindings.cpp (posenc::_native_set_backend, _native_set_thread_backend,
// _native_set_triton). Native runs an op on device type d iff this build has its kernel for d and
// (code == kNative or (code == kAuto and Triton is not preferred on d)), code = the thread's override if
// set, else the default.
//
// Also here: the process-wide value-check flag (posenc::_native_value_checks), the one dtype-code table
// (dtype_code), the index min/max of the value checks and the sinusoidal inverse frequencies.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/ScalarType.h>
#include <c10/core/SymInt.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "positions.h"

namespace posenc {

// ---- backend selection (bindings.cpp) --------------------------------------------------------------
enum BackendCode : int { kNoOverride = -1, kAuto = 0, kTriton = 1, kNative = 2, kTorch = 3 };
enum NativeDevice : int { kNativeCPU = 0, kNativeCUDA = 1 };

// Whether the process default / this thread's override selects the C++ kernel on device type `dev`
// (given that a kernel exists). One relaxed atomic load, one thread_local read.
bool native_selected(NativeDevice dev);

bool value_checks_enabled();  // default true; posenc::_native_value_checks

// The instruction set of the CPU kernel variant this process runs ("AVX512", "AVX2" or "baseline": the
// widest at::get_cpu_capability() allows that this build compiled; rope_cpu_ops.cpp, sinusoidal_cpu.cpp).
// posenc::_native_cpu_isa reports them.
const char* rope_cpu_isa();
const char* sinusoidal_cpu_isa();

// Whether the current CUDA stream of a device captures a graph: set at load by cuda_ops.cpp (CUDA builds),
// read by value_checks_on (py_checks.h), which skips the value checks then.
using CaptureQuery = bool (*)(const c10::Device&);
CaptureQuery& cuda_capture_query();

// ---- the public ops and their signatures ----------------------------------------------------------
using at::Tensor;
using OptT = std::optional<at::Tensor>;

using RopeInplaceSig = void(const Tensor&, const OptT&, const OptT&, const OptT&, const OptT&, const OptT&,
                            const OptT&, int64_t, const OptT&, const OptT&, double, bool, bool, bool);
using RopeSig = std::tuple<Tensor, Tensor>(const Tensor&, const OptT&, const OptT&, const OptT&, const OptT&,
                                           const OptT&, const OptT&, int64_t, const OptT&, const OptT&, double, bool,
                                           bool, bool);
// posenc::qk_norm_rope_ / qk_norm_rope: q, k, q_weight, k_weight, eps, norm, weight_offset, then RoPE's arguments.
using QkNormRopeInplaceSig = void(const Tensor&, const OptT&, const OptT&, const OptT&, double, int64_t, double,
                                  const OptT&, const OptT&, const OptT&, const OptT&, const OptT&, int64_t, const OptT&,
                                  const OptT&, double, bool, bool, bool);
using QkNormRopeSig = std::tuple<Tensor, Tensor>(const Tensor&, const OptT&, const OptT&, const OptT&, double, int64_t,
                                                 double, const OptT&, const OptT&, const OptT&, const OptT&,
                                                 const OptT&, int64_t, const OptT&, const OptT&, double, bool, bool,
                                                 bool);
// posenc::rope_and_cache_ / rope_and_cache: q, k, v, k_cache, v_cache, q_fp8, slot_mapping, cache_positions,
// kv_layout, k_scale, v_scale, q_scale, k/v/q_scale_value, then QK-norm's arguments (norm -1: none), then RoPE's.
using OptD = std::optional<double>;
using RopeAndCacheInplaceSig = void(const Tensor&, const Tensor&, const OptT&, const Tensor&, const OptT&,
                                    const OptT&, const OptT&, const OptT&, int64_t, const OptT&, const OptT&,
                                    const OptT&, OptD, OptD, OptD, const OptT&, const OptT&, double, int64_t, double,
                                    const OptT&, const OptT&, const OptT&, const OptT&, const OptT&, int64_t,
                                    const OptT&, const OptT&, double, bool, bool, bool);
using RopeAndCacheSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptT&, const Tensor&, const OptT&, const OptT&, const OptT&, const OptT&,
    int64_t, const OptT&, const OptT&, const OptT&, OptD, OptD, OptD, const OptT&, const OptT&, double, int64_t, double,
    const OptT&, const OptT&, const OptT&, const OptT&, const OptT&, int64_t, const OptT&, const OptT&, double, bool,
    bool, bool);
using SinusoidalTableSig = Tensor(const OptT&, int64_t, int64_t, double, bool, bool, double, double, at::ScalarType,
                                  at::Device);
using AddSinusoidalInplaceSig = void(const Tensor&, const OptT&, const OptT&, int64_t, double, double, bool, bool,
                                     double, double);
using AddSinusoidalSig = Tensor(const Tensor&, const OptT&, const OptT&, int64_t, double, double, bool, bool, double,
                                double);
using ConcatSinusoidalSig = Tensor(const Tensor&, const OptT&, const OptT&, int64_t, int64_t, double, bool, bool,
                                   double, double);
using AddPositionEmbeddingInplaceSig = void(const Tensor&, const Tensor&, const Tensor&, std::optional<int64_t>);
using AddPositionEmbeddingSig = Tensor(const Tensor&, const Tensor&, const Tensor&, std::optional<int64_t>, bool);

// The dispatcher's form of a kernel argument: int64_t -> c10::SymInt (the schemas say SymInt), the rest as is.
template <class T>
struct SymArg {
  using type = T;
};
template <>
struct SymArg<int64_t> {
  using type = c10::SymInt;
};
template <>
struct SymArg<std::optional<int64_t>> {
  using type = std::optional<c10::SymInt>;
};
template <class Sig>
struct DispatchSigOf;
template <class R, class... Args>
struct DispatchSigOf<R(Args...)> {
  using type = R(typename SymArg<Args>::type...);
};
// Signature Sig with SymInt where the schema has it: what the dispatcher's typed handles and the
// BackendSelect / ADInplaceOrView kernels use.
template <class Sig>
using DispatchSig = typename DispatchSigOf<Sig>::type;

// A dispatcher argument -> the kernel's (SymInt -> int64_t, as torch's unpackSymInt; others unchanged).
inline int64_t concrete(const c10::SymInt& v) { return v.guard_int(__FILE__, __LINE__); }
inline std::optional<int64_t> concrete(const std::optional<c10::SymInt>& v) {
  return v.has_value() ? std::make_optional(v->guard_int(__FILE__, __LINE__)) : std::nullopt;
}
template <class T>
inline const T& concrete(const T& v) {
  return v;
}

// One tag type per public op: its name and its kernels' signature (int64_t; see DispatchSig).
#define POSENC_PUBLIC_OPS(X)                                         \
  X(RopeInplace, "rope_", RopeInplaceSig)                            \
  X(Rope, "rope", RopeSig)                                           \
  X(QkNormRopeInplace, "qk_norm_rope_", QkNormRopeInplaceSig)        \
  X(QkNormRope, "qk_norm_rope", QkNormRopeSig)                       \
  X(RopeAndCacheInplace, "rope_and_cache_", RopeAndCacheInplaceSig)  \
  X(RopeAndCache, "rope_and_cache", RopeAndCacheSig)                 \
  X(SinusoidalTable, "sinusoidal_table", SinusoidalTableSig)         \
  X(AddSinusoidalInplace, "add_sinusoidal_", AddSinusoidalInplaceSig) \
  X(AddSinusoidal, "add_sinusoidal", AddSinusoidalSig)               \
  X(ConcatSinusoidal, "concat_sinusoidal", ConcatSinusoidalSig)      \
  X(AddPositionEmbeddingInplace, "add_position_embedding_", AddPositionEmbeddingInplaceSig) \
  X(AddPositionEmbedding, "add_position_embedding", AddPositionEmbeddingSig)

namespace ops {
#define POSENC_TAG(Tag, Name, Sig)             \
  struct Tag {                                 \
    static constexpr const char* name = Name;  \
    using sig = Sig;                           \
  };
POSENC_PUBLIC_OPS(POSENC_TAG)
#undef POSENC_TAG
}  // namespace ops

// ---- the chooser ----------------------------------------------------------------------------------
namespace detail {

// The device an op runs on: its Device argument (factory ops), else its first defined tensor argument.
struct DevicePick {
  std::optional<c10::Device> device_arg;
  std::optional<c10::Device> tensor;
};
inline void pick(DevicePick& d, const at::Tensor& t) {
  if (!d.tensor && t.defined()) d.tensor = t.device();
}
inline void pick(DevicePick& d, const std::optional<at::Tensor>& t) {
  if (!d.tensor && t.has_value() && t->defined()) d.tensor = t->device();
}
inline void pick(DevicePick& d, const c10::Device& dev) { d.device_arg = dev; }
template <class T>
inline void pick(DevicePick&, const T&) {}

template <class... Args>
inline constexpr bool has_device_arg = (std::is_same_v<std::decay_t<Args>, c10::Device> || ...);

// Everything of the caller's keyset below BackendSelect.
inline c10::DispatchKeySet after_backend_select() {
  return c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::BackendSelect);
}

}  // namespace detail

template <class Op, class Sig = typename Op::sig>
struct NativeOp;

template <class Op, class R, class... Args>
struct NativeOp<Op, R(Args...)> {
  using Fn = R (*)(Args...);
  // This build's implementations, per NativeDevice (nullptr: none); set at load by AddNative.
  static inline Fn kernels[2] = {nullptr, nullptr};

  static const c10::TypedOperatorHandle<DispatchSig<R(Args...)>>& handle() {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(
        (std::string("posenc::") + Op::name).c_str(), "").template typed<DispatchSig<R(Args...)>>();
    return op;
  }

  // The BackendSelect kernel (SymInt arguments passed on as they are; concretised for a native kernel only).
  static R choose(c10::DispatchKeySet ks, typename SymArg<Args>::type... args) {
    detail::DevicePick pick;
    (detail::pick(pick, args), ...);
    constexpr bool factory = detail::has_device_arg<Args...>;
    const std::optional<c10::Device> dev = factory ? pick.device_arg : pick.tensor;
    if (dev.has_value()) {
      const c10::DeviceType t = dev->type();
      const int slot = t == c10::DeviceType::CPU ? kNativeCPU : t == c10::DeviceType::CUDA ? kNativeCUDA : -1;
      if (slot >= 0) {
        const Fn fn = kernels[slot];
        if (fn != nullptr && native_selected(static_cast<NativeDevice>(slot))) return fn(concrete(args)...);
      }
    }
    c10::DispatchKeySet below = ks & detail::after_backend_select();
    if constexpr (factory) {
      // no tensor argument to take the backend key from: the key of `device`, as ATen's factory functions
      if (dev.has_value()) below = below | c10::DispatchKeySet(c10::computeDispatchKey(std::nullopt, at::kStrided, *dev));
    }
    return handle().redispatch(below, args...);
  }
};

// A static of this type in a family file puts `fn` in the chooser of Op for device `dev`.
template <class Op>
struct AddNative {
  AddNative(NativeDevice dev, typename NativeOp<Op>::Fn fn) { NativeOp<Op>::kernels[dev] = fn; }
};

// ---- shared helpers -------------------------------------------------------------------------------

// The one dtype-code table (positions.h's DType; the CPU and CUDA kernels switch on it). False for other
// dtypes (bool, complex, ...).
inline bool dtype_code(at::ScalarType t, int& code) {
  switch (t) {
    case at::kHalf: code = kHalf; return true;
    case at::kBFloat16: code = kBFloat16; return true;
    case at::kFloat: code = kFloat; return true;
    case at::kDouble: code = kDouble; return true;
    case at::kChar: code = kInt8; return true;
    case at::kByte: code = kUInt8; return true;
    case at::kShort: code = kInt16; return true;
    case at::kInt: code = kInt32; return true;
    case at::kLong: code = kInt64; return true;
    default: return false;
  }
}
inline int dtype_code(at::ScalarType t) {
  int code = kFloat;
  TORCH_CHECK(dtype_code(t, code), "posenc: no dtype code for ", t);
  return code;
}
inline bool is_index_dtype(at::ScalarType t) {
  int code = 0;
  return dtype_code(t, code) && code >= kInt8;
}
inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Min and max of an integer tensor's values (any strides, any device: ATen reductions and one copy to the
// host off CPU), for the value checks; false when empty.
bool index_min_max(const at::Tensor& t, int64_t& lo, int64_t& hi);

// Sinusoidal inverse frequencies inv[i] = exp(-log(base) * i / (half - freq_shift)), computed in float64
// with the same ATen ops as posenc_kernels/ops/sinusoidal/torch_impl.py's sinusoidal_inv_freq (so
// bit-identical) and rounded once to fp32 (or kept fp64), cached per convention. Returns a contiguous CPU
// tensor of `half` values in `dtype` (kFloat or kDouble); with `device` non-CPU, a cached copy on it.
at::Tensor sinusoidal_inv_freq(int64_t half, double base, double freq_shift, at::ScalarType dtype,
                               c10::Device device);

}  // namespace posenc
