// Total variation (Eq. 8) on CUDA: per-sample sums and the gradient in one pass, then a
// deterministic second pass over the per-block partial sums.
//
// tv_partial_kernel: grid (blocks_per_sample, min(B, 65535)); block (k, b) visits the elements of
// sample b with a grid stride, each thread reading one value and its up to six neighbours (which
// the neighbouring threads read too, so they come from L1/L2), accumulating the weighted forward
// differences in fp32 (fp64 for fp64 input) and, with grad, writing d(sum)/dx once. The block's
// sum (warp shuffles, then across warps) goes to partial[b, k]. tv_finalize_kernel: one block per
// sample adds its partials in index order. The number of blocks per sample depends on the shape
// only, so the result is the same on every run.
#include <torch/library.h>

#include "cuda_reduce.cuh"
#include "invcoss.h"
// Not self-contained: needs the c10 macros and <cstdint> included above.
#include <ATen/cuda/detail/IntegerDivider.cuh>

namespace invcoss {
namespace {

using cuda::kThreads;

// Index type I: 32-bit (fast divisions by magic numbers) when a sample has < 2^32 values.
template <typename T, typename A, typename I, bool kGrad>
__global__ void tv_partial_kernel(const T* __restrict__ x, T* __restrict__ grad, A* __restrict__ partial, int64_t B,
                                  I M, I W, I H, I D, at::cuda::detail::IntDivider<I> div_w,
                                  at::cuda::detail::IntDivider<I> div_h, at::cuda::detail::IntDivider<I> div_d,
                                  A ww, A wh, A wd) {
  const I HW = H * W;
  const I stride = static_cast<I>(gridDim.x) * kThreads;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const T* xs = x + b * static_cast<int64_t>(M);
    T* gs = kGrad ? grad + b * static_cast<int64_t>(M) : nullptr;
    A s = A(0);
    for (I i = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x; i < M; i += stride) {
      const auto qw = div_w.divmod(i);  // (row, w)
      const auto qh = div_h.divmod(qw.div);  // (plane, h)
      const I w = qw.mod, h = qh.mod, d = div_d.mod(qh.div);
      const A c = static_cast<A>(xs[i]);
      const A right = w + 1 < W ? static_cast<A>(xs[i + 1]) : c;
      const A down = h + 1 < H ? static_cast<A>(xs[i + W]) : c;
      const A back = d + 1 < D ? static_cast<A>(xs[i + HW]) : c;
      s += ww * cuda::abs_of(right - c) + wh * cuda::abs_of(down - c) + wd * cuda::abs_of(back - c);
      if constexpr (kGrad) {
        const A left = w > 0 ? static_cast<A>(xs[i - 1]) : c;
        const A up = h > 0 ? static_cast<A>(xs[i - W]) : c;
        const A front = d > 0 ? static_cast<A>(xs[i - HW]) : c;
        const A g = ww * (cuda::sign_of(c - left) - cuda::sign_of(right - c)) +
                    wh * (cuda::sign_of(c - up) - cuda::sign_of(down - c)) +
                    wd * (cuda::sign_of(c - front) - cuda::sign_of(back - c));
        gs[i] = static_cast<T>(g);
      }
    }
    s = cuda::block_sum(s);
    if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = s;
  }
}

// Grid min(B, 65535) blocks; block b adds sample b's n_part partials in index order.
template <typename A>
__global__ void tv_finalize_kernel(const A* __restrict__ partial, A* __restrict__ out, int64_t B, int n_part) {
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    A s = A(0);
    for (int k = threadIdx.x; k < n_part; k += kThreads) s += partial[b * n_part + k];
    s = cuda::block_sum(s);
    if (threadIdx.x == 0) out[b] = s;
  }
}

// Grid (x over the row's values, y over rows); out[r, k] = scale[r] * g[r, k].
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

template <typename T, typename I>
void tv_launch(const at::Tensor& x, at::Tensor& sums, at::Tensor& grad, at::ArrayRef<double> weights, bool with_grad) {
  using A = at::opmath_type<T>;
  const bool depth = x.dim() == 5;
  const int64_t B = x.size(0);
  const I W = static_cast<I>(x.size(-1)), H = static_cast<I>(x.size(-2)), D = static_cast<I>(depth ? x.size(2) : 1);
  const I M = static_cast<I>(x.numel() / B);
  const A ww = A(weights.back()), wh = A(weights[weights.size() - 2]), wd = A(depth ? weights[0] : 0.0);
  // About 8 values per thread, at most 1024 blocks per sample: fixed by the shape alone.
  const int n_part = static_cast<int>(std::clamp<int64_t>(cuda::ceil_div(M, kThreads * 8), 1, 1024));
  at::Tensor partial = at::empty({B, n_part}, sums.options());
  const dim3 grid(n_part, cuda::grid_y(B));
  auto stream = cuda::stream();
  const at::cuda::detail::IntDivider<I> dw(W), dh(H), dd(D);
  if (with_grad) {
    tv_partial_kernel<T, A, I, true><<<grid, kThreads, 0, stream>>>(
        x.const_data_ptr<T>(), grad.mutable_data_ptr<T>(), partial.mutable_data_ptr<A>(), B, M, W, H, D, dw, dh, dd,
        ww, wh, wd);
  } else {
    tv_partial_kernel<T, A, I, false><<<grid, kThreads, 0, stream>>>(
        x.const_data_ptr<T>(), nullptr, partial.mutable_data_ptr<A>(), B, M, W, H, D, dw, dh, dd, ww, wh, wd);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  tv_finalize_kernel<A><<<cuda::grid_y(B), kThreads, 0, stream>>>(partial.const_data_ptr<A>(),
                                                                    sums.mutable_data_ptr<A>(), B, n_part);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> tv_cuda(const at::Tensor& x_in, at::ArrayRef<double> weights, bool with_grad) {
  check_tv_args(x_in, weights);
  check_device("tv", "x", x_in, at::kCUDA);
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor sums = at::empty({x.size(0)}, x.options().dtype(acc_dtype(x)));
  at::Tensor grad = with_grad ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  if (x.numel() == 0) {
    sums.zero_();
    return {sums, grad};
  }
  const bool small = x.numel() / x.size(0) < (int64_t(1) << 32) - int64_t(kThreads) * 1024;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tv_cuda", [&] {
    if (small) {
      tv_launch<scalar_t, uint32_t>(x, sums, grad, weights, with_grad);
    } else {
      tv_launch<scalar_t, int64_t>(x, sums, grad, weights, with_grad);
    }
  });
  return {sums, grad};
}

at::Tensor scale_rows_cuda(const at::Tensor& grad_in, const at::Tensor& scale_in) {
  check_floating("scale_rows", "grad", grad_in);
  check_device("scale_rows", "grad", grad_in, at::kCUDA);
  TORCH_CHECK(grad_in.dim() >= 1, "scale_rows: expected grad with a leading dimension, got a 0-dim tensor");
  TORCH_CHECK(scale_in.dim() == 1 && scale_in.size(0) == grad_in.size(0), "scale_rows: expected scale of shape (",
              grad_in.size(0), ",), got ", scale_in.sizes());
  check_same_device("scale_rows", grad_in, "grad", scale_in, "scale");
  const c10::cuda::OptionalCUDAGuard guard(grad_in.device());
  const at::Tensor g = grad_in.contiguous();
  at::Tensor out = at::empty(g.sizes(), g.options());
  const int64_t rows = g.size(0);
  if (g.numel() == 0) return out;
  const int64_t inner = g.numel() / rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "scale_rows_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const at::Tensor s = scale_in.to(c10::CppTypeToScalarType<A>::value).contiguous();
    const dim3 grid(static_cast<unsigned>(std::clamp<int64_t>(cuda::ceil_div(inner, kThreads * 4), 1, 1024)),
                    cuda::grid_y(rows));
    scale_rows_kernel<scalar_t, A><<<grid, kThreads, 0, cuda::stream()>>>(
        g.const_data_ptr<scalar_t>(), s.const_data_ptr<A>(), out.mutable_data_ptr<scalar_t>(), rows, inner);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

TORCH_LIBRARY_IMPL(invcoss, CUDA, m) {
  m.impl("tv", &tv_cuda);
  m.impl("scale_rows", &scale_rows_cuda);
}

}  // namespace invcoss
