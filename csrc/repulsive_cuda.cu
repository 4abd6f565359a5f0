// Repulsive cosine loss (Eq. 5) on CUDA: the normalisation and epilogue kernels around the cuBLAS
// matmuls that cuda_api.cpp runs through ATen. Same formulation as repulsive_cpu.cpp (its header
// has the algebra): Y = h^ G or Y = (h^ P^T) P^ over pool tiles, then one epilogue computes
// q_i = y_i . h^_i, the loss and the gradient. Row reductions use warp shuffles; the loss adds the
// rows' q_i in index order in a one-block pass, so it is deterministic.
#include "cuda_reduce.cuh"

namespace invcoss::cuda {
namespace {

// Grid: one block per row (x up to 2^31 - 1 rows). out = in / max(|in|, eps).
template <typename T, typename A>
__global__ void normalise_rows_kernel(const T* __restrict__ in, A* __restrict__ out, int64_t D, A eps,
                                      A* __restrict__ norm, A* __restrict__ proj) {
  const int64_t row = blockIdx.x;
  const T* x = in + row * D;
  A ss = A(0);
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    const A v = static_cast<A>(x[d]);
    ss += v * v;
  }
  const A raw = sqrt(block_sum(ss));
  const A n = raw > eps ? raw : eps;
  const A inv = A(1) / n;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) out[row * D + d] = static_cast<A>(x[d]) * inv;
  if (threadIdx.x == 0 && norm != nullptr) {
    norm[row] = n;
    proj[row] = raw >= eps ? A(1) : A(0);
  }
}

// Grid: one block per row i of h. q_i = y_i . h^_i; grad_i = two_c / n_i (y_i - proj_i q_i h^_i).
template <typename T, typename A>
__global__ void epilogue_kernel(const A* __restrict__ y, const A* __restrict__ hh, const A* __restrict__ norm,
                                const A* __restrict__ proj, int64_t D, A two_c, A* __restrict__ q_out,
                                T* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  const A* yr = y + row * D;
  const A* hr = hh + row * D;
  A q = A(0);
  for (int64_t d = threadIdx.x; d < D; d += kThreads) q += yr[d] * hr[d];
  q = block_sum(q);
  if (threadIdx.x == 0) q_out[row] = q;
  if (grad != nullptr) {
    const A s = two_c / norm[row], pq = proj[row] * q;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) grad[row * D + d] = static_cast<T>(s * (yr[d] - pq * hr[d]));
  }
}

// One block: loss = c * sum_i q_i, the rows added in index order in fp64.
template <typename A>
__global__ void loss_kernel(const A* __restrict__ q, int64_t B, double c, A* __restrict__ loss) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < B; i += kThreads) s += double(q[i]);
  s = block_sum(s);
  if (threadIdx.x == 0) *loss = A(s * c);
}

}  // namespace

template <typename T>
void normalise_rows(const T* in, acc_t<T>* out, int64_t rows, int64_t D, double eps, acc_t<T>* norm,
                    acc_t<T>* proj) {
  if (rows == 0) return;
  normalise_rows_kernel<T, acc_t<T>><<<static_cast<unsigned>(rows), kThreads, 0, stream()>>>(
      in, out, D, acc_t<T>(eps), norm, proj);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void repulsive_epilogue(const acc_t<T>* y, const acc_t<T>* hh, const acc_t<T>* norm, const acc_t<T>* proj,
                        int64_t B, int64_t D, double c, acc_t<T>* q, T* grad, acc_t<T>* loss) {
  using A = acc_t<T>;
  if (B > 0) {
    epilogue_kernel<T, A><<<static_cast<unsigned>(B), kThreads, 0, stream()>>>(y, hh, norm, proj, D, A(2.0 * c), q,
                                                                                grad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  loss_kernel<A><<<1, kThreads, 0, stream()>>>(q, B, c, loss);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define INVCOSS_INSTANTIATE(T)                                                                                 \
  template void normalise_rows<T>(const T*, acc_t<T>*, int64_t, int64_t, double, acc_t<T>*, acc_t<T>*);       \
  template void repulsive_epilogue<T>(const acc_t<T>*, const acc_t<T>*, const acc_t<T>*, const acc_t<T>*,    \
                                      int64_t, int64_t, double, acc_t<T>*, T*, acc_t<T>*);
INVCOSS_FOR_FLOATING_TYPES(INVCOSS_INSTANTIATE)
#undef INVCOSS_INSTANTIATE

}  // namespace invcoss::cuda
