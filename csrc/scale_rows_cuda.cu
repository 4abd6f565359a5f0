// scale_rows on CUDA: out[r] = scale[r] * g[r] for g (rows, inner), scale (rows,) in the accumulation
// type. The backward of the ops that write their gradient during the forward pass
// (repulsive_direct, repulsive_gram); cuda_api.cpp registers it.
#include "cuda_reduce.cuh"

namespace invcoss::cuda {
namespace {

// Grid (x over a row's values, y over rows); out[r, k] = scale[r] * g[r, k].
template <typename T, typename A>
__global__ void scale_rows_kernel(const T* __restrict__ g, const A* __restrict__ scale, T* __restrict__ out,
                                  int64_t rows, int64_t inner) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const A s = scale[r];
    for (int64_t k = int64_t(blockIdx.x) * kThreads + threadIdx.x; k < inner; k += int64_t(gridDim.x) * kThreads) {
      out[r * inner + k] = static_cast<T>(static_cast<A>(g[r * inner + k]) * s);
    }
  }
}

}  // namespace

template <typename T>
void scale_rows(const T* g, const acc_t<T>* scale, T* out, int64_t rows, int64_t inner) {
  const dim3 grid(static_cast<unsigned>(std::clamp<int64_t>(ceil_div(inner, kThreads * 4), 1, 1024)), grid_y(rows));
  scale_rows_kernel<T, acc_t<T>><<<grid, kThreads, 0, stream()>>>(g, scale, out, rows, inner);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define INVCOSS_INSTANTIATE(T) template void scale_rows<T>(const T*, const acc_t<T>*, T*, int64_t, int64_t);
INVCOSS_FOR_FLOATING_TYPES(INVCOSS_INSTANTIATE)
#undef INVCOSS_INSTANTIATE

}  // namespace invcoss::cuda
