// Stand-in for the header CMake generates when PyTorch is built with CUDA (c10/cuda/impl/
// cuda_cmake_macros.h, from cuda_cmake_macros.h.in). CPU wheels of torch ship c10/cuda's headers without
// it, so scripts/check_cuda_compile puts csrc/compat on the include path to compile the CUDA glue
// (cuda_*.cpp) against a CPU build. A CUDA build of torch has the real file: never add csrc/compat to the
// include path of a real build (setup.py / the JIT loader), so the real one is always used.
#pragma once

// A CUDA build of torch defines this (libc10_cuda is a shared library); it only matters on Windows.
#define C10_CUDA_BUILD_SHARED_LIBS
