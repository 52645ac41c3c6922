// The AVX2 build of the kernel section of rope_cpu.cpp (see cpu_variant.h): same code,
// compiled under `#pragma GCC target` for AVX2; chosen at run time by at::get_cpu_capability().
#define POSENC_CPU_VARIANT 2
#include "rope_cpu.cpp"
