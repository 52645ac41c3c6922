// Aliasing checks shared by the CPU and CUDA glue of the native ops: from metadata only (sizes, strides,
// data pointers, storages), so no sync and graph-capture safe. Outputs must have no internal overlap, and
// an output must be exactly its input (in place) or disjoint from every tensor the kernel reads or writes.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/ATen.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <utility>
#include <vector>
#include <optional>

namespace posenc_alias {

using at::Tensor;

// Aliasing, from metadata only (no sync, graph-capture safe). at::get_overlap_status reports Full/Partial
// only where it can prove shared elements (the same storage and dense tensors); two non-dense views of one
// storage (e.g. head slices of a fused qkv) are TooHard and pass, as in ATen's own out= checks.
inline void check_no_internal_overlap(const Tensor& t, const char* name) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
              " has internally overlapping memory (an expanded or as_strided view whose elements share memory,"
              " strides ", t.strides(), "); it cannot be written: pass a tensor with distinct elements");
}

// Sorted by stride, each dimension's stride covers the whole extent of the smaller ones: distinct elements
// (every view slicing, transposing or splitting produces). Mirrors posenc_kernels/ops/checks.py.
inline bool nested_layout(c10::IntArrayRef sizes, c10::IntArrayRef strides) {
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] > 1) dims.emplace_back(strides[d], sizes[d]);
  }
  std::sort(dims.begin(), dims.end());
  int64_t extent = 1;
  for (const auto& [st, n] : dims) {
    if (st < extent) return false;
    extent += (n - 1) * st;
  }
  return true;
}

// Whether a and b may share an element. ATen answers for dense tensors; two non-dense views of one storage
// (head slices of a fused qkv) are resolved as posenc_kernels/ops/checks.py check_disjoint does: disjoint
// byte spans, or - with the same nested strides - a box shift between them that leaves one outside the
// other in some dimension; any other intersecting layout is resolved exactly with a bool map of the span.
inline bool shares_memory(const Tensor& a, const Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto st = at::get_overlap_status(a, b);
  if (st == at::MemOverlapStatus::Full || st == at::MemOverlapStatus::Partial) return true;
  if (st == at::MemOverlapStatus::No) return false;
  // TooHard (a non-dense view): ATen has not compared the storages yet.
  if (!a.storage().is_alias_of(b.storage())) return false;
  auto span = [](const Tensor& t) {
    int64_t hi = t.storage_offset() + 1;
    for (int64_t d = 0; d < t.dim(); ++d) hi += (t.size(d) - 1) * std::abs(t.stride(d));
    return std::make_pair(t.storage_offset() * t.element_size(), hi * t.element_size());
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  if (a1 <= b0 || b1 <= a0) return false;
  if (a.element_size() != b.element_size()) return true;
  std::vector<int64_t> shape(a.dim());
  for (int64_t d = 0; d < a.dim(); ++d) shape[d] = std::max(a.size(d), b.size(d));
  if (a.strides() != b.strides() || a.dim() != b.dim() || !nested_layout(shape, a.strides())) {
    // Other intersecting layouts (rare): mark a's elements over the shared span and test b's - exact, at the
    // cost of a bool map of the span (and a sync on CUDA), as the Python check does.
    const int64_t e = a.element_size(), lo = std::min(a0, b0) / e, hi = std::max(a1, b1) / e;
    at::Tensor mark = at::zeros({hi - lo}, a.options().dtype(at::kBool));
    mark.as_strided(a.sizes(), a.strides(), a.storage_offset() - lo).fill_(true);
    return mark.as_strided(b.sizes(), b.strides(), b.storage_offset() - lo).any().item<bool>();
  }
  const int64_t delta = b.storage_offset() - a.storage_offset();
  const Tensor& lo = delta >= 0 ? a : b;
  int64_t rest = std::abs(delta);
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, lo's size), largest stride first
  for (int64_t d = 0; d < a.dim(); ++d) dims.emplace_back(a.stride(d), lo.size(d));
  std::sort(dims.rbegin(), dims.rend());
  for (const auto& [stride, n_lo] : dims) {
    const int64_t shift = stride > 0 ? rest / stride : 0;
    rest -= shift * stride;
    if (shift >= n_lo) return false;  // the other view starts past lo's extent in this dimension
  }
  return rest == 0;  // not a whole-element shift of the shared layout: no element coincides
}

// In place: out is exactly in - the same first element and the same strides wherever a stride matters
// (dims of size > 1; the callers have checked the sizes equal), so every element is at the same address.
inline bool same_elements(const Tensor& out, const Tensor& in) {
  if (out.data_ptr() != in.data_ptr()) return false;
  for (int64_t d = 0; d < in.dim(); ++d) {
    if (in.size(d) > 1 && out.stride(d) != in.stride(d)) return false;
  }
  return true;
}

// out must be exactly in (in place) or share no memory with it.
inline void check_out_vs_in(const Tensor& out, const char* out_name, const Tensor& in, const char* in_name) {
  if (same_elements(out, in)) return;
  TORCH_CHECK(!shares_memory(out, in), out_name, " overlaps ", in_name, " without being exactly ", in_name,
              " (in place needs the same data_ptr and strides ", in.strides(), "; got strides ", out.strides(),
              " and a data_ptr ",
              reinterpret_cast<intptr_t>(out.data_ptr()) - reinterpret_cast<intptr_t>(in.data_ptr()),
              " bytes from ", in_name, "'s): pass ", in_name, " itself or a tensor that shares no memory with it");
}

inline void check_disjoint(const Tensor& out, const char* out_name, const Tensor& other, const char* other_name) {
  TORCH_CHECK(!shares_memory(out, other), out_name, " must not overlap ", other_name,
              ": one launch writes ", out_name, " while it reads or writes ", other_name);
}

// RoPE's outputs (rope_: q and k themselves; rope: fresh tensors), before any write: each output is exactly
// its input or disjoint from it, never internally overlapping, and q's output never overlaps k's tensors
// (nor k's q's). In place (outputs = inputs) this says q and k must be disjoint.
inline void check_rope_outputs(const Tensor& q, const std::optional<Tensor>& k, const Tensor& q_out,
                               const std::optional<Tensor>& k_out) {
  check_no_internal_overlap(q_out, "q_out");
  check_out_vs_in(q_out, "q_out", q, "q");
  if (k.has_value()) {
    check_no_internal_overlap(*k_out, "k_out");
    check_out_vs_in(*k_out, "k_out", *k, "k");
    check_disjoint(q_out, "q_out", *k_out, "k_out");
    check_disjoint(q_out, "q_out", *k, "k");
    check_disjoint(*k_out, "k_out", q, "q");
  }
}

}  // namespace posenc_alias
