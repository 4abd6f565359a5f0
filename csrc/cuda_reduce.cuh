// Device helpers shared by the *_cuda.cu kernels: block size, warp-shuffle reductions, Chan merge.
//
// Every reduction here has a fixed shape (a fixed block size and a fixed shuffle tree), so a
// kernel that writes one partial per block and sums the partials in a second pass in index order
// gives the same bits on every run: no float atomics anywhere.
#pragma once

// Only c10 headers here (see cuda_launch.h): not even <ATen/cuda/CUDAContext.h>, which pulls in the
// cuBLAS and cuSPARSE headers that a toolkit with only nvcc and the runtime does not have.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "cuda_launch.h"

// Explicit instantiation of a launcher for the four input dtypes.
#define INVCOSS_FOR_FLOATING_TYPES(M) M(float) M(double) M(c10::Half) M(c10::BFloat16)

namespace invcoss::cuda {

constexpr int kThreads = 256;  // every kernel of the extension runs blocks of this size
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
  return v;
}

// Sum of v over a block of kThreads threads: shuffles within each warp, then the warps' sums in
// one warp. Returns the total in every thread. All threads of the block must call it.
template <typename A>
__device__ A block_sum(A v) {
  __shared__ A warp_part[kWarps];
  __shared__ A total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_part[lane] : A(0);
    v = warp_sum(v);
    if (lane == 0) total = v;
  }
  __syncthreads();
  const A out = total;
  __syncthreads();  // the shared slots may be reused by the next call
  return out;
}

// Chan et al.: fold (nb, mb, qb) into (n, mean, m2); either side may be empty.
template <typename A>
__device__ __forceinline__ void chan_merge(A& n, A& mean, A& m2, A nb, A mb, A qb) {
  const A nt = n + nb;
  if (nt == A(0)) return;
  const A wb = nb / nt;
  const A d = mb - mean;
  mean += d * wb;
  m2 += qb + d * d * n * wb;
  n = nt;
}

template <typename A>
__device__ __forceinline__ A abs_of(A v) {
  return v < A(0) ? -v : v;
}

template <typename A>
__device__ __forceinline__ A sign_of(A v) {
  return A(v > A(0)) - A(v < A(0));
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A grid dimension y (at most 65535); kernels loop over the rest.
inline unsigned grid_y(int64_t n) { return static_cast<unsigned>(std::clamp<int64_t>(n, 1, 65535)); }

}  // namespace invcoss::cuda
