// Total variation (Eq. 8) on CUDA: per-sample sums and the gradient in one pass, then a
// deterministic second pass over the per-block partial sums.
//
// tv_partial_kernel: grid (n_part, min(B, 65535)); block (k, b) visits the values of sample b with a
// grid stride, each thread reading one value and its up to six neighbours (which the neighbouring
// threads read too, so they come from L1/L2), accumulating the weighted forward differences in
// fp32 (fp64 for fp64 input) and, with grad, writing d(sum)/dx once. The block's sum (warp
// shuffles, then across warps) goes to partial[b, k]. tv_finalize_kernel: one block per sample adds
// its partials in index order. n_part depends on the shape only: the same bits on every run.
#include "cuda_reduce.cuh"
// Not self-contained: needs the c10 macros and <cstdint> included above.
#include <ATen/cuda/detail/IntegerDivider.cuh>

namespace invcoss::cuda {
namespace {

// Index type I: 32-bit (division by magic numbers) when a sample has fewer than 2^31 values.
template <typename T, typename A, typename I>
__global__ void tv_partial_kernel(const T* __restrict__ x, T* __restrict__ grad, A* __restrict__ partial, int64_t B,
                                  I M, I W, I H, I D, at::cuda::detail::IntDivider<I> div_w,
                                  at::cuda::detail::IntDivider<I> div_h, at::cuda::detail::IntDivider<I> div_d,
                                  A ww, A wh, A wd) {
  const I HW = H * W;
  const I stride = static_cast<I>(gridDim.x) * kThreads;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const T* xs = x + b * static_cast<int64_t>(M);
    T* gs = grad != nullptr ? grad + b * static_cast<int64_t>(M) : nullptr;
    A s = A(0);
    for (I i = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x; i < M; i += stride) {
      const auto qw = div_w.divmod(i);       // (row, w)
      const auto qh = div_h.divmod(qw.div);  // (plane, h)
      const I w = qw.mod, h = qh.mod, d = div_d.mod(qh.div);
      const A c = static_cast<A>(xs[i]);
      const A right = w + 1 < W ? static_cast<A>(xs[i + 1]) : c;
      const A down = h + 1 < H ? static_cast<A>(xs[i + W]) : c;
      const A back = d + 1 < D ? static_cast<A>(xs[i + HW]) : c;
      s += ww * abs_of(right - c) + wh * abs_of(down - c) + wd * abs_of(back - c);
      if (gs != nullptr) {  // uniform across the grid
        const A left = w > 0 ? static_cast<A>(xs[i - 1]) : c;
        const A up = h > 0 ? static_cast<A>(xs[i - W]) : c;
        const A front = d > 0 ? static_cast<A>(xs[i - HW]) : c;
        const A g = ww * (sign_of(c - left) - sign_of(right - c)) + wh * (sign_of(c - up) - sign_of(down - c)) +
                    wd * (sign_of(c - front) - sign_of(back - c));
        gs[i] = static_cast<T>(g);
      }
    }
    s = block_sum(s);
    if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = s;
  }
}

// Grid min(B, 65535) blocks; block b adds sample b's n_part partials in index order.
template <typename A>
__global__ void tv_finalize_kernel(const A* __restrict__ partial, A* __restrict__ out, int64_t B, int n_part) {
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    A s = A(0);
    for (int k = threadIdx.x; k < n_part; k += kThreads) s += partial[b * n_part + k];
    s = block_sum(s);
    if (threadIdx.x == 0) out[b] = s;
  }
}

template <typename T, typename I>
void tv_launch(const T* x, T* grad, acc_t<T>* partial, acc_t<T>* sums, int64_t B, int64_t C, int64_t D, int64_t H,
               int64_t W, double w_w, double w_h, double w_d) {
  using A = acc_t<T>;
  const int64_t M = C * D * H * W;  // values per sample
  const int n_part = tv_partials(M);
  const dim3 grid(n_part, grid_y(B));
  const I Wi = static_cast<I>(W), Hi = static_cast<I>(H), Di = static_cast<I>(D);
  tv_partial_kernel<T, A, I><<<grid, kThreads, 0, stream()>>>(
      x, grad, partial, B, static_cast<I>(M), Wi, Hi, Di, at::cuda::detail::IntDivider<I>(Wi),
      at::cuda::detail::IntDivider<I>(Hi), at::cuda::detail::IntDivider<I>(Di), A(w_w), A(w_h), A(w_d));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  tv_finalize_kernel<A><<<grid_y(B), kThreads, 0, stream()>>>(partial, sums, B, n_part);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int tv_partials(int64_t per_sample) {
  // About 8 values per thread, at most 1024 blocks per sample.
  return static_cast<int>(std::clamp<int64_t>(ceil_div(per_sample, kThreads * 8), 1, 1024));
}

template <typename T>
void tv_forward(const T* x, T* grad, acc_t<T>* partial, acc_t<T>* sums, int64_t B, int64_t C, int64_t D, int64_t H,
                int64_t W, double w_w, double w_h, double w_d) {
  // IntDivider<uint32_t> divides exactly below 2^31; the grid stride must not carry an index past it.
  if (C * D * H * W <= int64_t(INT32_MAX) - int64_t(kThreads) * 1024) {
    tv_launch<T, uint32_t>(x, grad, partial, sums, B, C, D, H, W, w_w, w_h, w_d);
  } else {
    tv_launch<T, int64_t>(x, grad, partial, sums, B, C, D, H, W, w_w, w_h, w_d);
  }
}

#define INVCOSS_INSTANTIATE(T)                                                                                   \
  template void tv_forward<T>(const T*, T*, acc_t<T>*, acc_t<T>*, int64_t, int64_t, int64_t, int64_t, int64_t, \
                              double, double, double);
INVCOSS_FOR_FLOATING_TYPES(INVCOSS_INSTANTIATE)
#undef INVCOSS_INSTANTIATE

}  // namespace invcoss::cuda
