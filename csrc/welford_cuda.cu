// Column statistics of x (N, F) on CUDA (Eq. 9 and Eq. 3): batch mean/variance, the Welford/Chan
// update of a running state, the stat-matching loss and the shared backward.
//
// col_partial_kernel: grid (ceil(F / 64), S row segments), 8 warps per block. A warp owns 8
// adjacent columns; its lanes are 4 row groups x 8 columns, so every load instruction reads four
// full 32-byte sectors (8 columns of 4 rows). Each lane runs Welford over its rows in fp32 (fp64
// for fp64), the 4 row groups of a column are merged with warp shuffles (Chan), and the segment's
// (mean, m2) goes to a staging buffer. Second pass, one thread per column: the S segments are
// merged in order (and with the running state for welford_update). The stat-matching loss adds
// per-block partial sums of its squared differences in a last one-block pass. The shapes of all
// reductions depend on (N, F) only: the same bits on every run, no atomics.
#include <torch/library.h>

#include "cuda_reduce.cuh"
#include "invcoss.h"

namespace invcoss {
namespace {

using cuda::kThreads;
constexpr int kColsPerWarp = 8;
constexpr int kRowGroups = 32 / kColsPerWarp;
constexpr int kColsPerBlock = kColsPerWarp * cuda::kWarps;

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
    const A nb = __shfl_xor_sync(cuda::kFullMask, n, offset);
    const A mb = __shfl_xor_sync(cuda::kFullMask, mean, offset);
    const A qb = __shfl_xor_sync(cuda::kFullMask, m2, offset);
    cuda::chan_merge(n, mean, m2, nb, mb, qb);
  }
  if (group == 0 && col < F) {
    part_mean[blockIdx.y * F + col] = mean;
    part_m2[blockIdx.y * F + col] = m2;
  }
}

// The column's (mean, m2) over all N rows: its S segments merged in order.
template <typename A>
__device__ __forceinline__ void merge_segments(const A* __restrict__ part_mean, const A* __restrict__ part_m2,
                                               int64_t col, int64_t F, int64_t N, int64_t seg_len, int S, A& mean,
                                               A& m2) {
  A n = A(0);
  mean = A(0);
  m2 = A(0);
  for (int s = 0; s < S; ++s) {
    const A nb = A(std::min(seg_len, N - s * seg_len));
    cuda::chan_merge(n, mean, m2, nb, part_mean[s * F + col], part_m2[s * F + col]);
  }
}

template <typename A>
__global__ void col_mean_var_kernel(const A* __restrict__ part_mean, const A* __restrict__ part_m2, int64_t F,
                                    int64_t N, int64_t seg_len, int S, A* __restrict__ out_mean,
                                    A* __restrict__ out_var) {
  const int64_t col = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= F) return;
  A mean, m2;
  merge_segments(part_mean, part_m2, col, F, N, seg_len, S, mean, m2);
  out_mean[col] = mean;
  out_var[col] = m2 / A(N);
}

// wa = N / (count + N), wb = count * N / (count + N), computed in fp64 on the host.
template <typename A>
__global__ void welford_merge_kernel(const A* __restrict__ part_mean, const A* __restrict__ part_m2, int64_t F,
                                     int64_t N, int64_t seg_len, int S, const A* __restrict__ state_mean,
                                     const A* __restrict__ state_m2, bool fresh, A wa, A wb, A* __restrict__ out_mean,
                                     A* __restrict__ out_m2) {
  const int64_t col = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= F) return;
  A mean, m2;
  merge_segments(part_mean, part_m2, col, F, N, seg_len, S, mean, m2);
  if (fresh) {
    out_mean[col] = mean;
    out_m2[col] = m2;
    return;
  }
  const A d = mean - state_mean[col];
  out_mean[col] = state_mean[col] + d * wa;
  out_m2[col] = state_m2[col] + m2 + d * d * wb;
}

// Batch mean, the differences to the targets (scaled to unit length later), and per-block fp64
// partial sums of their squares.
template <typename A>
__global__ void stat_diff_kernel(const A* __restrict__ part_mean, const A* __restrict__ part_m2, int64_t F,
                                 int64_t N, int64_t seg_len, int S, const A* __restrict__ mu,
                                 const A* __restrict__ var, A* __restrict__ bmean, A* __restrict__ dmean,
                                 A* __restrict__ dvar, double* __restrict__ block_sq) {
  const int64_t col = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  double sm = 0.0, sv = 0.0;
  if (col < F) {
    A mean, m2;
    merge_segments(part_mean, part_m2, col, F, N, seg_len, S, mean, m2);
    const A dm = mean - mu[col], dv = m2 / A(N) - var[col];
    bmean[col] = mean;
    dmean[col] = dm;
    dvar[col] = dv;
    sm = double(dm) * double(dm);
    sv = double(dv) * double(dv);
  }
  sm = cuda::block_sum(sm);
  sv = cuda::block_sum(sv);
  if (threadIdx.x == 0) {
    block_sq[2 * blockIdx.x] = sm;
    block_sq[2 * blockIdx.x + 1] = sv;
  }
}

// One block: the two norms from the block partials (in index order), the loss, and the factors
// that turn the differences into unit directions (0 for a zero norm).
template <typename A>
__global__ void stat_norms_kernel(const double* __restrict__ block_sq, int n_blocks, A* __restrict__ loss,
                                  A* __restrict__ inv_norms) {
  double sm = 0.0, sv = 0.0;
  for (int k = threadIdx.x; k < n_blocks; k += kThreads) sm += block_sq[2 * k], sv += block_sq[2 * k + 1];
  sm = cuda::block_sum(sm);
  sv = cuda::block_sum(sv);
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
__global__ void mean_var_backward_kernel(const T* __restrict__ x, const A* __restrict__ mean,
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

// Segment staging for x (N, F): S segments of seg_len rows, S chosen from the shape alone.
struct Segments {
  int64_t seg_len;
  int S;
};

Segments segments_for(int64_t N, int64_t F) {
  const int64_t blocks_x = cuda::ceil_div(F, kColsPerBlock);
  // Split the rows only when the columns give too few blocks, and keep >= 256 rows per segment.
  int64_t S = std::clamp<int64_t>(1024 / blocks_x, 1, std::max<int64_t>(1, N / 256));
  S = std::max<int64_t>(S, cuda::ceil_div(N, int64_t(1) << 24));  // exact fp32 row counts
  const int64_t seg_len = cuda::ceil_div(N, S);
  return {seg_len, static_cast<int>(cuda::ceil_div(N, seg_len))};
}

// Launches col_partial_kernel; returns the staging buffers (S, F) of the accumulation type A.
template <typename T, typename A>
std::pair<at::Tensor, at::Tensor> column_partials(const at::Tensor& x, const Segments& seg) {
  const int64_t N = x.size(0), F = x.size(1);
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<A>::value);
  at::Tensor pm = at::empty({seg.S, F}, opts), pq = at::empty({seg.S, F}, opts);
  const dim3 grid(static_cast<unsigned>(cuda::ceil_div(F, kColsPerBlock)), static_cast<unsigned>(seg.S));
  col_partial_kernel<T, A><<<grid, kThreads, 0, cuda::stream()>>>(
      x.const_data_ptr<T>(), x.stride(0), N, F, seg.seg_len, pm.mutable_data_ptr<A>(), pq.mutable_data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {pm, pq};
}

at::Tensor rows_with_unit_stride(const at::Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); }

template <typename A>
at::Tensor as_acc(const at::Tensor& t) {
  return t.to(c10::CppTypeToScalarType<A>::value).contiguous();
}

unsigned col_blocks(int64_t F) { return static_cast<unsigned>(std::max<int64_t>(1, cuda::ceil_div(F, kThreads))); }

template <typename T, typename A>
void welford_update_launch(const at::Tensor& x, int64_t count, const at::Tensor& mean, const at::Tensor& m2,
                           at::Tensor& out_mean, at::Tensor& out_m2) {
  const int64_t N = x.size(0), F = x.size(1);
  const double n = double(count + N);
  const Segments seg = segments_for(N, F);
  const auto [pm, pq] = column_partials<T, A>(x, seg);
  welford_merge_kernel<A><<<col_blocks(F), kThreads, 0, cuda::stream()>>>(
      pm.template const_data_ptr<A>(), pq.template const_data_ptr<A>(), F, N, seg.seg_len, seg.S,
      mean.const_data_ptr<A>(), m2.const_data_ptr<A>(), count == 0, A(double(N) / n),
      A(double(count) * double(N) / n), out_mean.mutable_data_ptr<A>(), out_m2.mutable_data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> col_mean_var_cuda(const at::Tensor& x_in) {
  check_columns_args("col_mean_var", x_in);
  check_device("col_mean_var", "x", x_in, at::kCUDA);
  TORCH_CHECK(x_in.size(0) >= 1, "col_mean_var: expected x with at least one row, got ", x_in.sizes());
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = rows_with_unit_stride(x_in);
  const int64_t N = x.size(0), F = x.size(1);
  at::Tensor mean = at::empty({F}, x.options().dtype(acc_dtype(x)));
  at::Tensor var = at::empty_like(mean);
  if (F == 0) return {mean, var};
  const Segments seg = segments_for(N, F);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "col_mean_var_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const auto [pm, pq] = column_partials<scalar_t, A>(x, seg);
    col_mean_var_kernel<A><<<col_blocks(F), kThreads, 0, cuda::stream()>>>(
        pm.template const_data_ptr<A>(), pq.template const_data_ptr<A>(), F, N, seg.seg_len, seg.S,
        mean.mutable_data_ptr<A>(),
        var.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

at::Tensor mean_var_backward_cuda(const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& gm_in,
                                  const at::Tensor& gv_in) {
  const char* op = "mean_var_backward";
  check_state_args(op, x_in, gm_in, "grad_mean", gv_in, "grad_var");
  check_state_args(op, x_in, mean_in, "mean", mean_in, "mean");
  check_device(op, "x", x_in, at::kCUDA);
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t N = x.size(0), F = x.size(1);
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mean_var_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const at::Tensor mean = as_acc<A>(mean_in), gm = as_acc<A>(gm_in), gv = as_acc<A>(gv_in);
    const dim3 grid(static_cast<unsigned>(std::clamp<int64_t>(cuda::ceil_div(F, kThreads), 1, 1024)),
                    cuda::grid_y(N));
    mean_var_backward_kernel<scalar_t, A><<<grid, kThreads, 0, cuda::stream()>>>(
        x.const_data_ptr<scalar_t>(), mean.const_data_ptr<A>(), gm.const_data_ptr<A>(), gv.const_data_ptr<A>(),
        out.mutable_data_ptr<scalar_t>(), N, F);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> welford_update_cuda(const at::Tensor& x_in, int64_t count,
                                                       const at::Tensor& mean_in, const at::Tensor& m2_in) {
  const char* op = "welford_update";
  check_state_args(op, x_in, mean_in, "mean", m2_in, "m2");
  check_device(op, "x", x_in, at::kCUDA);
  TORCH_CHECK(count >= 0, op, ": expected count >= 0, got ", count);
  TORCH_CHECK(mean_in.scalar_type() == m2_in.scalar_type() &&
                  (mean_in.scalar_type() == at::kFloat || mean_in.scalar_type() == at::kDouble),
              op, ": expected mean and m2 both fp32 or both fp64, got ", mean_in.scalar_type(), " and ",
              m2_in.scalar_type());
  if (x_in.size(0) == 0 || x_in.size(1) == 0) return {mean_in.clone(), m2_in.clone()};
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = rows_with_unit_stride(x_in);
  const at::Tensor mean = mean_in.contiguous(), m2 = m2_in.contiguous();
  at::Tensor out_mean = at::empty_like(mean), out_m2 = at::empty_like(m2);
  // The state's dtype is the accumulation type (Eq. 9 is evaluated in the state's precision).
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "welford_update_cuda", [&] {
    if (mean.scalar_type() == at::kDouble) {
      welford_update_launch<scalar_t, double>(x, count, mean, m2, out_mean, out_m2);
    } else {
      welford_update_launch<scalar_t, float>(x, count, mean, m2, out_mean, out_m2);
    }
  });
  return {out_mean, out_m2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stat_matching_cuda(const at::Tensor& x_in,
                                                                              const at::Tensor& mu_in,
                                                                              const at::Tensor& var_in) {
  const char* op = "stat_matching";
  check_state_args(op, x_in, mu_in, "mean", var_in, "var");
  check_device(op, "x", x_in, at::kCUDA);
  TORCH_CHECK(x_in.size(0) >= 1, op, ": expected x with at least one row, got ", x_in.sizes());
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = rows_with_unit_stride(x_in);
  const int64_t N = x.size(0), F = x.size(1);
  const auto opts = x.options().dtype(acc_dtype(x));
  at::Tensor bmean = at::empty({F}, opts), g_mean = at::empty({F}, opts), g_var = at::empty({F}, opts);
  at::Tensor loss = at::zeros({}, opts);
  if (F == 0) return {loss, bmean, g_mean, g_var};
  const Segments seg = segments_for(N, F);
  const unsigned blocks = col_blocks(F);
  at::Tensor block_sq = at::empty({int64_t(blocks), 2}, x.options().dtype(at::kDouble));
  at::Tensor inv_norms = at::empty({2}, opts);
  auto stream = cuda::stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stat_matching_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const at::Tensor mu = as_acc<A>(mu_in), var = as_acc<A>(var_in);
    const auto [pm, pq] = column_partials<scalar_t, A>(x, seg);
    stat_diff_kernel<A><<<blocks, kThreads, 0, stream>>>(
        pm.template const_data_ptr<A>(), pq.template const_data_ptr<A>(), F, N, seg.seg_len, seg.S,
        mu.const_data_ptr<A>(),
        var.const_data_ptr<A>(), bmean.mutable_data_ptr<A>(), g_mean.mutable_data_ptr<A>(),
        g_var.mutable_data_ptr<A>(), block_sq.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    stat_norms_kernel<A><<<1, kThreads, 0, stream>>>(block_sq.const_data_ptr<double>(), static_cast<int>(blocks),
                                                     loss.mutable_data_ptr<A>(), inv_norms.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    stat_scale_kernel<A><<<blocks, kThreads, 0, stream>>>(g_mean.mutable_data_ptr<A>(), g_var.mutable_data_ptr<A>(),
                                                          inv_norms.const_data_ptr<A>(), F);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, bmean, g_mean, g_var};
}

TORCH_LIBRARY_IMPL(invcoss, CUDA, m) {
  m.impl("col_mean_var", &col_mean_var_cuda);
  m.impl("mean_var_backward", &mean_var_backward_cuda);
  m.impl("welford_update", &welford_update_cuda);
  m.impl("stat_matching", &stat_matching_cuda);
}

}  // namespace invcoss
