// CPU code generation helpers shared by the *_cpu.cpp kernels.
#pragma once

// The module is built for baseline x86-64 (SSE2), so that it loads on every x86-64 CPU. The hot
// per-row/per-tile loops are additionally compiled for x86-64-v3 (AVX2, FMA) and the CPU picks the
// version once at load time (GCC function multiversioning, an ifunc). "arch=x86-64-v3" is tested
// by CPU features, so AMD and Intel both get it; "arch=haswell" would test the CPU model and pick
// the baseline on every AMD CPU. Other compilers and architectures get the portable build only.
//
// INVCOSS_WIDE_CLONES adds an x86-64-v4 (AVX-512) version, for the streaming loops whose rate is
// set by the instructions per value once the data is in the caches (TV, the column statistics'
// sweeps): 32 vector registers and half the instructions per row.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && \
    !defined(__CUDACC__) && !defined(INVCOSS_NO_CLONES)
#define INVCOSS_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define INVCOSS_WIDE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define INVCOSS_CLONES
#define INVCOSS_WIDE_CLONES
#endif

#define INVCOSS_RESTRICT __restrict__

namespace invcoss {

// sign(v) with sign(0) = 0 as a branch-free expression that vectorises (compare and mask).
template <typename A>
inline A sign_of(A v) {
  return static_cast<A>(v > A(0)) - static_cast<A>(v < A(0));
}

}  // namespace invcoss
