// ISA selection for the CPU kernel files (rope_cpu.cpp, sinusoidal_cpu.cpp). Include first.
//
// A kernel file is compiled once with the baseline flags (POSENC_CPU_VARIANT undefined: at::vec DEFAULT)
// and once per wider ISA from a two-line wrapper (<family>_cpu_avx2.cpp / _avx512.cpp) that defines
// POSENC_CPU_VARIANT (2 = AVX2, 3 = AVX512) and includes it. The wrapper's code is compiled under
// `#pragma GCC target` with the ISA set torch uses for its own AVX2 / AVX512 kernels (x86-64, GCC; other
// compilers build nothing there and the baseline runs). Defines CPU_CAPABILITY (at::vec's namespace) and
// POSENC_VARIANT_ENABLED.
#pragma once

#if defined(POSENC_CPU_VARIANT)
// ---- wider-ISA variant (included from rope_cpu_<isa>.cpp) ----
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define POSENC_VARIANT_ENABLED 1
// g++ does not update the ISA macros for `#pragma GCC target` (it preprocesses ahead), and the headers
// (sleef.h, at::vec) test them: define what the pragma enables, as -mavx2 ... would.
#pragma GCC target("sse3,ssse3,sse4.1,sse4.2,popcnt,avx,avx2,fma,f16c,bmi,bmi2,lzcnt")
#ifndef __SSE3__
#define __SSE3__ 1
#endif
#ifndef __SSSE3__
#define __SSSE3__ 1
#endif
#ifndef __SSE4_1__
#define __SSE4_1__ 1
#endif
#ifndef __SSE4_2__
#define __SSE4_2__ 1
#endif
#ifndef __POPCNT__
#define __POPCNT__ 1
#endif
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __BMI__
#define __BMI__ 1
#endif
#ifndef __BMI2__
#define __BMI2__ 1
#endif
#ifndef __LZCNT__
#define __LZCNT__ 1
#endif
#if POSENC_CPU_VARIANT == 2
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#elif POSENC_CPU_VARIANT == 3
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#endif
#endif
#else
#define POSENC_VARIANT_ENABLED 1
#define CPU_CAPABILITY DEFAULT
#endif

