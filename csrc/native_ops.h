// What the op files share with bindings.cpp (torch glue only; the kernel sections never include it):
//   * the kernel-set registry: each family file adds, at load, the public ops it implements for a dispatch
//     key and a function registering them on a torch::Library; bindings.cpp's control op
//     posenc::_native_register(key, enable) creates / destroys that Library when Python asks (nothing is
//     registered for the public ops at load);
//   * the process-wide value-check flag (posenc::_native_value_checks), read by the CPU kernels;
//   * the one C++ position resolver of the CPU kernels (row of token (b, s)) and its index loads;
//   * the inverse frequencies of the sinusoidal encodings, computed once per convention.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <vector>

#include "positions.h"

namespace posenc {

using RegisterFn = void (*)(torch::Library&);

struct KernelSet {
  std::string key;               // "CPU", "CUDA", "ADInplaceOrView", "BackendSelect"
  std::vector<std::string> ops;  // public op names registered by fn
  RegisterFn fn;
};

std::vector<KernelSet>& kernel_sets();  // bindings.cpp

struct AddKernelSet {  // a static of this type in a family file adds its set at load
  AddKernelSet(const char* key, std::vector<std::string> ops, RegisterFn fn) {
    kernel_sets().push_back(KernelSet{key, std::move(ops), fn});
  }
};

bool value_checks_enabled();  // bindings.cpp; default true

inline bool index_code(at::ScalarType t, int& code) {
  switch (t) {
    case at::kChar: code = kI8; return true;
    case at::kByte: code = kU8; return true;
    case at::kShort: code = kI16; return true;
    case at::kInt: code = kI32; return true;
    case at::kLong: code = kI64; return true;
    default: return false;
  }
}

// Min and max of an integer tensor's values (any strides), for the value checks; false when empty.
bool index_min_max(const at::Tensor& t, int64_t& lo, int64_t& hi);

// Sinusoidal inverse frequencies inv[i] = exp(-log(base) * i / (half - freq_shift)), computed in float64
// with the same ATen ops as posenc_kernels/sinusoidal.py's _inv_freq (so bit-identical) and rounded once to
// fp32 (or kept fp64), cached per convention. Returns a contiguous CPU tensor of `half` values in `dtype`
// (kFloat or kDouble); with `device` non-CPU, a cached copy on that device.
at::Tensor sinusoidal_inv_freq(int64_t half, double base, double freq_shift, at::ScalarType dtype,
                               c10::Device device);

// ValueError-class message formatting of a Python list of up to 16 values: "[0, 3, 7]".
std::string format_list(const at::Tensor& t, int64_t max_items);

}  // namespace posenc
