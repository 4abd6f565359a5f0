// Repulsive cosine loss (Eq. 5) on CUDA: the normalisation, cosine-tile and epilogue kernels around
// the cuBLAS matmuls that cuda_api.cpp runs through ATen. Same formulation as repulsive_cpu.cpp (its
// header has the algebra): Y = h^ G, or Y = C P^ over pool tiles with C the cosines from raw dots
// scaled by both rows' inverse norms, then one epilogue computes q_i = y_i . h^_i, the loss and the
// gradient. Row reductions use warp shuffles; losses add their partials in index order in a
// one-block pass, so they are deterministic.
#include <type_traits>

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

// Grid: one block per row. out_r = 1 / max(|x_r|, eps).
template <typename T, typename A>
__global__ void inv_norm_kernel(const T* __restrict__ x, int64_t ldx, int64_t D, A eps, A* __restrict__ out) {
  const T* r = x + int64_t(blockIdx.x) * ldx;
  A ss = A(0);
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    const A v = static_cast<A>(r[d]);
    ss += v * v;
  }
  const A n = sqrt(block_sum(ss));
  if (threadIdx.x == 0) out[blockIdx.x] = A(1) / (n > eps ? n : eps);
}

// Grid: one block per row i of the tile; see cosine_tile in cuda_launch.h.
template <typename A, typename M>
__global__ void cosine_tile_kernel(const A* __restrict__ s, int64_t lds, const A* __restrict__ norm,
                                   const A* __restrict__ inv, int64_t B, int64_t cols, A* __restrict__ q_out,
                                   M* __restrict__ u, int64_t ldu) {
  const int64_t i = blockIdx.x;
  const A* sr = s + i * lds;
  const A scale = A(1) / norm[i];
  A ss = A(0);
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const A c = sr[j] * scale * inv[j];
    ss += c * c;
    if (u != nullptr) {
      const A w = c * inv[j];
      const M hi = static_cast<M>(w);
      u[i * ldu + j] = hi;
      if constexpr (!std::is_same_v<M, A>) u[(i + B) * ldu + j] = static_cast<M>(w - static_cast<A>(hi));
    }
  }
  ss = block_sum(ss);
  if (threadIdx.x == 0) q_out[i] = ss;
}

}  // namespace

template <typename T>
void row_inv_norms(const T* x, int64_t ldx, int64_t rows, int64_t D, double eps, acc_t<T>* out) {
  if (rows == 0) return;
  inv_norm_kernel<T, acc_t<T>><<<static_cast<unsigned>(rows), kThreads, 0, stream()>>>(x, ldx, D, acc_t<T>(eps), out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename A, typename M>
void cosine_tile(const A* s, int64_t lds, const A* norm, const A* inv, int64_t B, int64_t cols, A* q_out, M* u,
                 int64_t ldu) {
  if (B == 0) return;
  cosine_tile_kernel<A, M><<<static_cast<unsigned>(B), kThreads, 0, stream()>>>(s, lds, norm, inv, B, cols, q_out, u,
                                                                                ldu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename A>
void sum_scaled(const A* v, int64_t n, double c, A* loss) {
  loss_kernel<A><<<1, kThreads, 0, stream()>>>(v, n, c, loss);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

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
                                      int64_t, int64_t, double, acc_t<T>*, T*, acc_t<T>*);                    \
  template void row_inv_norms<T>(const T*, int64_t, int64_t, int64_t, double, acc_t<T>*);                     \
  template void cosine_tile<acc_t<T>, T>(const acc_t<T>*, int64_t, const acc_t<T>*, const acc_t<T>*, int64_t, \
                                         int64_t, acc_t<T>*, T*, int64_t);
INVCOSS_FOR_FLOATING_TYPES(INVCOSS_INSTANTIATE)
#undef INVCOSS_INSTANTIATE
template void sum_scaled<float>(const float*, int64_t, double, float*);
template void sum_scaled<double>(const double*, int64_t, double, double*);

}  // namespace invcoss::cuda
