// Aliasing checks shared by the CPU and CUDA glue of the native ops: from metadata only (sizes, strides,
// data pointers, storages), so no sync and graph-capture safe. Outputs must have no internal overlap, and
// an output must be exactly its input (in place) or disjoint from every tensor the kernel reads or writes.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/ATen.h>
#include <ATen/core/Tensor.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>
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
  c10::SmallVector<std::pair<int64_t, int64_t>, 8> dims;  // on the stack up to rank 8 (checked per written tensor)
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

// Search steps the exact overlap test may take before answering Unknown (a conservative refusal).
// Mirrors posenc_kernels/ops/checks.py OVERLAP_WORK.
constexpr int64_t kOverlapWork = 4096;

enum class Overlap { No, Yes, Unknown };

namespace detail {

// t's bytes as first + sum(c * z), 0 <= z <= bound (flip: last - sum(c * z)); returns first (or last).
inline int64_t byte_terms(const Tensor& t, bool flip, std::vector<std::pair<int64_t, int64_t>>& terms) {
  const int64_t e = t.element_size();
  int64_t lo = t.storage_offset() * e;
  if (e > 1) terms.emplace_back(1, e - 1);
  int64_t hi_extra = e - 1;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t n = t.size(d), st = t.stride(d);
    if (n > 1 && st != 0) {
      lo += std::min<int64_t>(st, 0) * (n - 1) * e;
      terms.emplace_back(std::abs(st) * e, n - 1);
      hi_extra += std::abs(st) * e * (n - 1);
    }
  }
  return flip ? lo + hi_extra : lo;
}

// Euclid's gcd (std::gcd's binary algorithm compiles to tzcnt, which the baseline-ISA check flags).
inline int64_t gcd(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t r = a % b;
    a = b;
    b = r;
  }
  return a;
}

struct Knapsack {
  std::vector<std::pair<int64_t, int64_t>> terms;  // (coefficient, bound), largest coefficient first
  std::vector<int64_t> reach, gcd;
  int64_t steps = 0;
  bool out_of_work = false;

  bool solve(size_t k, int64_t rem) {
    if (++steps > kOverlapWork) {
      out_of_work = true;
      return false;
    }
    if (rem == 0) return true;
    if (k == terms.size() || rem > reach[k] || rem % gcd[k] != 0) return false;
    const auto [c, u] = terms[k];
    if (k + 1 == terms.size()) return rem / c <= u;  // rem is a multiple of c (gcd)
    const int64_t need = rem - reach[k + 1];
    const int64_t lo = need > 0 ? (need + c - 1) / c : 0, hi = std::min(u, rem / c);
    for (int64_t z = hi; z >= lo && !out_of_work; --z) {
      if (solve(k + 1, rem - z * c)) return true;
    }
    return false;
  }
};

}  // namespace detail

// Whether two strided views of one storage share a byte: exact (Yes/No), or Unknown when the search needs
// more than kOverlapWork steps. A byte of a is a0 + sum(c_i x_i), one of b b1 - sum(d_j y_j) counted down
// from b's last byte; they meet iff sum(c_i x_i) + sum(d_j y_j) = b1 - a0 within the bounds: a bounded
// knapsack over at most 2 (rank + 1) terms, equal coefficients merged, searched depth first from the largest
// coefficient with reach and gcd pruning (see posenc_kernels/ops/checks.py shared_element: the same steps).
// From metadata only: no sync, graph-capture safe.
inline Overlap element_overlap(const Tensor& a, const Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || a.device() != b.device()) return Overlap::No;
  if (!a.storage().is_alias_of(b.storage())) return Overlap::No;
  std::vector<std::pair<int64_t, int64_t>> raw;
  const int64_t a0 = detail::byte_terms(a, false, raw);
  const int64_t b1 = detail::byte_terms(b, true, raw);
  const int64_t target = b1 - a0;
  int64_t total = 0;
  for (const auto& [c, u] : raw) total += c * u;
  if (target < 0 || target > total) return Overlap::No;  // disjoint byte spans
  std::map<int64_t, int64_t, std::greater<int64_t>> merged;
  for (const auto& [c, u] : raw) merged[c] += u;
  detail::Knapsack ks;
  ks.terms.assign(merged.begin(), merged.end());
  const size_t n = ks.terms.size();
  ks.reach.assign(n + 1, 0);
  ks.gcd.assign(n + 1, 0);
  for (size_t k = n; k-- > 0;) {
    ks.reach[k] = ks.reach[k + 1] + ks.terms[k].first * ks.terms[k].second;
    ks.gcd[k] = detail::gcd(ks.terms[k].first, ks.gcd[k + 1]);
  }
  const bool found = ks.solve(0, target);
  return ks.out_of_work ? Overlap::Unknown : found ? Overlap::Yes : Overlap::No;
}

// Whether a and b may share an element (Unknown counts: the callers refuse).
inline bool shares_memory(const Tensor& a, const Tensor& b) { return element_overlap(a, b) != Overlap::No; }

// check_disjoint(name_a, a, name_b, b)'s ValueError message ("" when a and b share no element), worded as
// posenc_kernels/ops/checks.py's.
inline std::string disjoint_message(const char* name_a, const Tensor& a, const char* name_b, const Tensor& b) {
  switch (element_overlap(a, b)) {
    case Overlap::No:
      return "";
    case Overlap::Yes:
      return std::string(name_b) + " must not overlap " + name_a + ": they share memory that is written in place";
    case Overlap::Unknown:
    default:
      return std::string(name_b) + " must not overlap " + name_a +
             ", and their layouts are too irregular to prove that they do not share an element within the exact "
             "check's budget (" + std::to_string(kOverlapWork) + " steps): refused conservatively; pass tensors of "
             "separate buffers or a plain slice of one";
  }
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
