// Aliasing checks shared by the CPU and CUDA glue of the native ops: from metadata only (sizes, strides,
// data pointers, storages), so no sync and graph-capture safe. Outputs must have no internal overlap, and
// an output must be exactly its input (in place) or disjoint from every tensor the kernel reads or writes.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
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

inline bool shares_memory(const Tensor& a, const Tensor& b) {
  const auto st = at::get_overlap_status(a, b);
  return st == at::MemOverlapStatus::Full || st == at::MemOverlapStatus::Partial;
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
