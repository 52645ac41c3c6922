// The one C++ position resolver: which row (table row / angle position) token (b, s) uses, and the
// integer loads behind it. Plain C++ (no torch header): the CPU kernel sections (compiled per ISA, see
// cpu_variant.h) and the CUDA kernels (posenc_cuda.h) include it. The mode codes are those of
// posenc_kernels/ops/positions.py's PosMode (a test compares them).
#pragma once

#include <cstdint>

namespace posenc {

// The one dtype-code table of the C++ side: storage dtypes of q/k/x/outputs, tables, inv_freq, positions,
// offsets, cu_seqlens and axis_map, as the small codes the CPU and CUDA kernels switch on. The torch glue
// maps an at::ScalarType to it in one place (native_ops.h dtype_code).
enum DType : int {
  kHalf = 0,
  kBFloat16 = 1,
  kFloat = 2,
  kDouble = 3,
  kInt8 = 4,
  kUInt8 = 5,
  kInt16 = 6,
  kInt32 = 7,
  kInt64 = 8,
};

// An integer index (positions / offsets / cu_seqlens / axis_map) of dtype `code` at element i.
inline int64_t load_index(const void* p, int code, int64_t i) {
  switch (code) {
    case kInt8: return static_cast<const int8_t*>(p)[i];
    case kUInt8: return static_cast<const uint8_t*>(p)[i];
    case kInt16: return static_cast<const int16_t*>(p)[i];
    case kInt32: return static_cast<const int32_t*>(p)[i];
    default: return static_cast<const int64_t*>(p)[i];
  }
}

// Mode codes of the row resolver: the same numbers as posenc_kernels/ops/positions.py's PosMode.
enum PosMode : int { kPosOffset = 0, kPosOffsets = 1, kPosPositions = 2, kPosCuSeqlens = 3 };

// Where the row (table row / angle position) of token (b, s) comes from.
struct RowSource {
  // kPosOffset: offset + s; kPosOffsets: ptr[b * stride_off] + s; kPosPositions: ptr[b * stride_pos_b +
  // s * stride_pos_s] (the Triton kernels' stride names)
  int mode = kPosOffset;
  int code = kInt64;      // index dtype of ptr (DType)
  const void* ptr = nullptr;
  int64_t stride_pos_b = 0, stride_pos_s = 0, stride_off = 0;
  int64_t offset = 0;
};

inline int64_t token_row(const RowSource& r, int64_t b, int64_t s) {
  if (r.mode == kPosPositions) return load_index(r.ptr, r.code, b * r.stride_pos_b + s * r.stride_pos_s);
  if (r.mode == kPosOffsets) return load_index(r.ptr, r.code, b * r.stride_off) + s;
  return r.offset + s;
}

}  // namespace posenc
