// Column statistics of x (N, F) on CUDA (Eq. 9 and Eq. 3): batch mean/variance, the Welford/Chan
// update of a running state, the stat-matching loss and the shared backward.
//
// col_partial_kernel: grid (ceil(F / 64), S row segments), 8 warps per block. A warp owns 8
// adjacent columns; its lanes are 4 row groups x 8 columns, so every load instruction reads four
// full 32-byte sectors (8 columns of 4 rows). Each lane runs Welford over its rows in the
// accumulation type, the 4 row groups of a column are merged with warp shuffles (Chan), and the
// segment's (mean, m2) goes to a staging buffer. Second pass, one thread per column: the S segments
// are merged in order (and with the running state for welford_update). The stat-matching loss adds
// per-block partial sums of its squared differences in a last one-block pass. The shapes of all
// reductions depend on (N, F) only: the same bits on every run, no atomics.
#include "cuda_reduce.cuh"

namespace invcoss::cuda {
namespace {

constexpr int kColsPerWarp = 8;
constexpr int kRowGroups = 32 / kColsPerWarp;
constexpr int kColsPerBlock = kColsPerWarp * kWarps;

template <typename T, typename A>
__global__ void col_partial_kernel(const T* __restrict__ x, int64_t ld, int64_t N, int64_t F, int64_t seg_len,
                                   A* __restrict__ part_mean, A* __restrict__ part_m2) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t col = int64_t(blockIdx.x) * kColsPerBlock + warp * kColsPerWarp + (lane % kColsPerWarp);
  const int group = lane / kColsPerWarp;
  const int64_t r0 = int64_t(blockIdx.y) * seg_len, r1 = std::min(N, r0 + seg_len);
  A n = A(0), mean = A(0), m2 = A(0);
  if (col < F) {
    for (int64_t r = r0 + group; r < r1; r += kRowGroups) {
      const A v = static_cast<A>(x[r * ld + col]);
      n += A(1);
      const A d = v - mean;
      mean += d / n;
      m2 += d * (v - mean);
    }
  }
  // Lanes col, col + 8, col + 16, col + 24 hold the same column: two butterfly steps merge them.
#pragma unroll
  for (int offset = kColsPerWarp; offset < 32; offset <<= 1) {
    const A nb = __shfl_xor_sync(kFullMask, n, offset);
    const A mb = __shfl_xor_sync(kFullMask, mean, offset);
    const A qb = __shfl_xor_sync(kFullMask, m2, offset);
    chan_merge(n, mean, m2, nb, mb, qb);
  }
  if (group == 0 && col < F) {
    part_mean[blockIdx.y * F + col] = mean;
    part_m2[blockIdx.y * F + col] = m2;
  }
}

// The column's (mean, m2) over all N rows: its segments merged in order.
template <typename A>
__device__ __forceinline__ void merge_segments(const A* __restrict__ part_mean, const A* __restrict__ part_m2,
                                               int64_t col, int64_t F, int64_t N, Segments seg, A& mean, A& m2) {
  A n = A(0);
  mean = A(0);
  m2 = A(0);
  for (int s = 0; s < seg.count; ++s) {
    const A nb = A(std::min(seg.seg_len, N - s * seg.seg_len));
    chan_merge(n, mean, m2, nb, part_mean[s * F + col], part_m2[s * F + col]);
  }
}

template <typename A>
__global__ void batch_mean_var_kernel(const A* __restrict__ part_mean, const A* __restrict__ part_m2, int64_t F,
                                      int64_t N, Segments seg, A* __restrict__ out_mean, A* __restrict__ out_var) {
  const int64_t col = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= F) return;
  A mean, m2;
  merge_segments(part_mean, part_m2, col, F, N, seg, mean, m2);
  out_mean[col] = mean;
  out_var[col] = m2 / A(N);
}

// wa = N / (count + N), wb = count * N / (count + N), computed in fp64 on the host.
template <typename A>
__global__ void welford_merge_kernel(const A* __restrict__ part_mean, const A* __restrict__ part_m2, int64_t F,
                                     int64_t N, Segments seg, const A* __restrict__ state_mean,
                                     const A* __restrict__ state_m2, bool fresh, A wa, A wb,
                                     A* __restrict__ out_mean, A* __restrict__ out_m2) {
  const int64_t col = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= F) return;
  A mean, m2;
  merge_segments(part_mean, part_m2, col, F, N, seg, mean, m2);
  if (fresh) {
    out_mean[col] = mean;
    out_m2[col] = m2;
    return;
  }
  const A d = mean - state_mean[col];
  out_mean[col] = state_mean[col] + d * wa;
  out_m2[col] = state_m2[col] + m2 + d * d * wb;
}

// Batch mean, the differences to the targets (made unit vectors by stat_scale_kernel), and per-block
// fp64 partial sums of their squares.
template <typename A>
__global__ void stat_diff_kernel(const A* __restrict__ part_mean, const A* __restrict__ part_m2, int64_t F,
                                 int64_t N, Segments seg, const A* __restrict__ mu, const A* __restrict__ var,
                                 A* __restrict__ bmean, A* __restrict__ dmean, A* __restrict__ dvar,
                                 double* __restrict__ block_sq) {
  const int64_t col = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  double sm = 0.0, sv = 0.0;
  if (col < F) {
    A mean, m2;
    merge_segments(part_mean, part_m2, col, F, N, seg, mean, m2);
    const A dm = mean - mu[col], dv = m2 / A(N) - var[col];
    bmean[col] = mean;
    dmean[col] = dm;
    dvar[col] = dv;
    sm = double(dm) * double(dm);
    sv = double(dv) * double(dv);
  }
  sm = block_sum(sm);
  sv = block_sum(sv);
  if (threadIdx.x == 0) {
    block_sq[2 * blockIdx.x] = sm;
    block_sq[2 * blockIdx.x + 1] = sv;
  }
}

// One block: the two norms from the block partials (in index order), the loss, and the factors that
// turn the differences into unit directions (0 for a zero norm).
template <typename A>
__global__ void stat_norms_kernel(const double* __restrict__ block_sq, int n_blocks, A* __restrict__ loss,
                                  A* __restrict__ inv_norms) {
  double sm = 0.0, sv = 0.0;
  for (int k = threadIdx.x; k < n_blocks; k += kThreads) sm += block_sq[2 * k], sv += block_sq[2 * k + 1];
  sm = block_sum(sm);
  sv = block_sum(sv);
  if (threadIdx.x == 0) {
    const double nm = sqrt(sm), nv = sqrt(sv);
    *loss = A(nm) + A(nv);
    inv_norms[0] = nm > 0 ? A(1.0 / nm) : A(0);
    inv_norms[1] = nv > 0 ? A(1.0 / nv) : A(0);
  }
}

template <typename A>
__global__ void stat_scale_kernel(A* __restrict__ dmean, A* __restrict__ dvar, const A* __restrict__ inv_norms,
                                  int64_t F) {
  const int64_t col = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= F) return;
  dmean[col] *= inv_norms[0];
  dvar[col] *= inv_norms[1];
}

// Grid (x over columns, y over rows): grad_x = grad_mean / N + grad_var * 2 (x - mean) / N.
template <typename T, typename A>
__global__ void batch_mean_var_backward_kernel(const T* __restrict__ x, const A* __restrict__ mean,
                                               const A* __restrict__ gm, const A* __restrict__ gv, T* __restrict__ out,
                                               int64_t N, int64_t F) {
  const A inv_n = A(1) / A(N), two_inv_n = A(2) / A(N);
  for (int64_t r = blockIdx.y; r < N; r += gridDim.y) {
    for (int64_t f = int64_t(blockIdx.x) * kThreads + threadIdx.x; f < F; f += int64_t(gridDim.x) * kThreads) {
      const A v = static_cast<A>(x[r * F + f]);
      out[r * F + f] = static_cast<T>(gm[f] * inv_n + gv[f] * two_inv_n * (v - mean[f]));
    }
  }
}

}  // namespace

Segments column_segments(int64_t N, int64_t F) {
  const int64_t blocks_x = std::max<int64_t>(1, ceil_div(F, kColsPerBlock));
  // Split the rows only when the columns give too few blocks, keeping >= 256 rows per segment.
  int64_t S = std::clamp<int64_t>(1024 / blocks_x, 1, std::max<int64_t>(1, N / 256));
  S = std::max<int64_t>(S, ceil_div(N, int64_t(1) << 24));  // row counts stay exact in fp32
  const int64_t seg_len = std::max<int64_t>(1, ceil_div(N, S));
  return {seg_len, static_cast<int>(ceil_div(N, seg_len))};
}

int column_blocks(int64_t F) { return static_cast<int>(std::max<int64_t>(1, ceil_div(F, kThreads))); }

template <typename T, typename A>
void column_partials(const T* x, int64_t ld, int64_t N, int64_t F, Segments seg, A* part_mean, A* part_m2) {
  const dim3 grid(static_cast<unsigned>(ceil_div(F, kColsPerBlock)), static_cast<unsigned>(seg.count));
  col_partial_kernel<T, A><<<grid, kThreads, 0, stream()>>>(x, ld, N, F, seg.seg_len, part_mean, part_m2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename A>
void batch_mean_var_finish(const A* part_mean, const A* part_m2, int64_t N, int64_t F, Segments seg, A* mean, A* var) {
  batch_mean_var_kernel<A><<<column_blocks(F), kThreads, 0, stream()>>>(part_mean, part_m2, F, N, seg, mean, var);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename A>
void welford_update_finish(const A* part_mean, const A* part_m2, int64_t N, int64_t F, Segments seg,
                           const A* state_mean, const A* state_m2, int64_t count, A* out_mean, A* out_m2) {
  const double n = double(count + N);
  welford_merge_kernel<A><<<column_blocks(F), kThreads, 0, stream()>>>(
      part_mean, part_m2, F, N, seg, state_mean, state_m2, count == 0, A(double(N) / n),
      A(double(count) * double(N) / n), out_mean, out_m2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename A>
void stat_matching_finish(const A* part_mean, const A* part_m2, int64_t N, int64_t F, Segments seg, const A* mu,
                          const A* var, A* bmean, A* g_mean, A* g_var, double* block_sq, A* inv_norms, A* loss) {
  const int blocks = column_blocks(F);
  stat_diff_kernel<A><<<blocks, kThreads, 0, stream()>>>(part_mean, part_m2, F, N, seg, mu, var, bmean, g_mean,
                                                          g_var, block_sq);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  stat_norms_kernel<A><<<1, kThreads, 0, stream()>>>(block_sq, blocks, loss, inv_norms);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  stat_scale_kernel<A><<<blocks, kThreads, 0, stream()>>>(g_mean, g_var, inv_norms, F);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void batch_mean_var_backward(const T* x, const acc_t<T>* mean, const acc_t<T>* grad_mean,
                             const acc_t<T>* grad_var, T* out, int64_t N, int64_t F) {
  const dim3 grid(static_cast<unsigned>(std::clamp<int64_t>(ceil_div(F, kThreads), 1, 1024)), grid_y(N));
  batch_mean_var_backward_kernel<T, acc_t<T>>
      <<<grid, kThreads, 0, stream()>>>(x, mean, grad_mean, grad_var, out, N, F);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// x's dtype T with either state/accumulation dtype (batch_mean_var uses A = acc_t<T>).
#define INVCOSS_INSTANTIATE(T)                                                                               \
  template void column_partials<T, float>(const T*, int64_t, int64_t, int64_t, Segments, float*, float*);    \
  template void column_partials<T, double>(const T*, int64_t, int64_t, int64_t, Segments, double*, double*); \
  template void batch_mean_var_backward<T>(const T*, const acc_t<T>*, const acc_t<T>*, const acc_t<T>*, T*,  \
                                           int64_t, int64_t);
INVCOSS_FOR_FLOATING_TYPES(INVCOSS_INSTANTIATE)
#undef INVCOSS_INSTANTIATE

#define INVCOSS_INSTANTIATE_ACC(A)                                                                             \
  template void batch_mean_var_finish<A>(const A*, const A*, int64_t, int64_t, Segments, A*, A*);              \
  template void welford_update_finish<A>(const A*, const A*, int64_t, int64_t, Segments, const A*, const A*,   \
                                         int64_t, A*, A*);                                                     \
  template void stat_matching_finish<A>(const A*, const A*, int64_t, int64_t, Segments, const A*, const A*, A*, \
                                        A*, A*, double*, A*, A*);
INVCOSS_INSTANTIATE_ACC(float)
INVCOSS_INSTANTIATE_ACC(double)
#undef INVCOSS_INSTANTIATE_ACC

}  // namespace invcoss::cuda
