// The one C++ position resolver: which row (table row / angle position) token (b, s) uses, and the
// integer loads behind it. Plain C++ (no torch header): the CPU kernel sections (compiled per ISA, see
// cpu_variant.h) and the CUDA kernels (posenc_cuda.h) include it. The mode codes are those of
// posenc_kernels/ops/positions.py's PosMode (a test compares them).
#pragma once

#include <cstdint>

namespace posenc {

// Integer index dtypes of positions / offsets / cu_seqlens / axis_map, as small codes the kernel loops switch on.
enum IndexType : int { kI8 = 0, kU8 = 1, kI16 = 2, kI32 = 3, kI64 = 4 };

inline int64_t load_index(const void* p, int code, int64_t i) {
  switch (code) {
    case kI8: return static_cast<const int8_t*>(p)[i];
    case kU8: return static_cast<const uint8_t*>(p)[i];
    case kI16: return static_cast<const int16_t*>(p)[i];
    case kI32: return static_cast<const int32_t*>(p)[i];
    default: return static_cast<const int64_t*>(p)[i];
  }
}

// Mode codes of the row resolver: the same numbers as posenc_kernels/ops/positions.py's PosMode.
enum PosMode : int { kPosOffset = 0, kPosOffsets = 1, kPosPositions = 2, kPosCuSeqlens = 3 };

// Where the row (table row / angle position) of token (b, s) comes from.
struct RowSource {
  int mode = kPosOffset;  // kPosOffset: offset + s; kPosOffsets: ptr[b * sb] + s; kPosPositions: ptr[b * sb + s * ss]
  int code = kI64;        // index dtype of ptr
  const void* ptr = nullptr;
  int64_t sb = 0, ss = 0;
  int64_t offset = 0;
};

inline int64_t token_row(const RowSource& r, int64_t b, int64_t s) {
  if (r.mode == kPosPositions) return load_index(r.ptr, r.code, b * r.sb + s * r.ss);
  if (r.mode == kPosOffsets) return load_index(r.ptr, r.code, b * r.sb) + s;
  return r.offset + s;
}

}  // namespace posenc
