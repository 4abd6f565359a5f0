// Repulsive cosine loss (Eq. 5) on CUDA: normalisation and epilogue kernels around cuBLAS matmuls.
// Same formulation as repulsive_cpu.cpp (read its header for the algebra): Y = h^ G or
// Y = (h^ P^T) P^ over pool tiles, then one epilogue computes q_i = y_i . h^_i, the loss and the
// gradient. Row reductions use warp shuffles; the loss adds the rows' q_i in index order in a
// one-block pass, so it is deterministic.
#include <torch/library.h>

#include "cuda_reduce.cuh"
#include "invcoss.h"

namespace invcoss {
namespace {

using cuda::kThreads;
constexpr int64_t kPoolTile = 8192;  // pool rows per matmul of the direct path

// Grid: one block per row. out = in / max(|in|, eps); norm and proj (|in| >= eps) when not null.
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
  const A raw = sqrt(cuda::block_sum(ss));
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
  q = cuda::block_sum(q);
  if (threadIdx.x == 0) q_out[row] = q;
  if (grad != nullptr) {
    const A s = two_c / norm[row], pq = proj[row] * q;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) grad[row * D + d] = static_cast<T>(s * (yr[d] - pq * hr[d]));
  }
}

// One block: loss = c * sum_i q_i, the rows added in index order (fp64).
template <typename A>
__global__ void loss_kernel(const A* __restrict__ q, int64_t B, double c, A* __restrict__ loss) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < B; i += kThreads) s += double(q[i]);
  s = cuda::block_sum(s);
  if (threadIdx.x == 0) *loss = A(s * c);
}

struct NormalisedRows {
  at::Tensor hh, norm, proj;
};

template <typename T, typename A>
NormalisedRows normalise_batch(const at::Tensor& h, double eps) {
  const auto opts = h.options().dtype(c10::CppTypeToScalarType<A>::value);
  const int64_t B = h.size(0), D = h.size(1);
  NormalisedRows r{at::empty({B, D}, opts), at::empty({B}, opts), at::empty({B}, opts)};
  if (B > 0) {
    normalise_rows_kernel<T, A><<<static_cast<unsigned>(B), kThreads, 0, cuda::stream()>>>(
        h.const_data_ptr<T>(), r.hh.mutable_data_ptr<A>(), D, A(eps), r.norm.mutable_data_ptr<A>(),
        r.proj.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return r;
}

template <typename T, typename A>
std::tuple<at::Tensor, at::Tensor> epilogue(const at::Tensor& h, const NormalisedRows& n, const at::Tensor& y,
                                            double c, bool with_grad) {
  const int64_t B = h.size(0), D = h.size(1);
  at::Tensor grad = with_grad ? at::empty({B, D}, h.options()) : at::empty({0}, h.options());
  at::Tensor q = at::empty({B}, n.norm.options());
  at::Tensor loss = at::empty({}, n.norm.options());
  auto stream = cuda::stream();
  if (B > 0) {
    epilogue_kernel<T, A><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        y.const_data_ptr<A>(), n.hh.const_data_ptr<A>(), n.norm.const_data_ptr<A>(), n.proj.const_data_ptr<A>(), D,
        A(2.0 * c), q.mutable_data_ptr<A>(), with_grad ? grad.mutable_data_ptr<T>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  loss_kernel<A><<<1, kThreads, 0, stream>>>(q.const_data_ptr<A>(), B, c, loss.mutable_data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, grad};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> repulsive_gram_cuda(const at::Tensor& h_in, const at::Tensor& gram, int64_t count,
                                                       double eps, bool with_grad) {
  const char* op = "repulsive_gram";
  check_repulsive_args(op, h_in, gram, /*is_gram=*/true);
  check_device(op, "h", h_in, at::kCUDA);
  TORCH_CHECK(count >= 1, op, ": expected count >= 1 (the pool size), got ", count);
  TORCH_CHECK(h_in.size(0) <= INT32_MAX, op, ": expected at most 2^31 - 1 rows in h, got ", h_in.size(0));
  const c10::cuda::OptionalCUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "repulsive_gram_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const NormalisedRows n = normalise_batch<scalar_t, A>(h, eps);
    const at::Tensor y = at::mm(n.hh, gram.to(n.hh.scalar_type()));
    out = epilogue<scalar_t, A>(h, n, y, 1.0 / (double(h.size(0)) * double(count)), with_grad);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> repulsive_direct_cuda(const at::Tensor& h_in, const at::Tensor& pool_in,
                                                         double eps, bool with_grad) {
  const char* op = "repulsive_direct";
  check_repulsive_args(op, h_in, pool_in, /*is_gram=*/false);
  check_device(op, "h", h_in, at::kCUDA);
  TORCH_CHECK(h_in.size(0) <= INT32_MAX, op, ": expected at most 2^31 - 1 rows in h, got ", h_in.size(0));
  const c10::cuda::OptionalCUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  const int64_t B = h.size(0), D = h.size(1), P = pool_in.size(0);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "repulsive_direct_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const NormalisedRows n = normalise_batch<scalar_t, A>(h, eps);
    const at::Tensor pool = pool_in.to(n.hh.scalar_type()).contiguous();
    at::Tensor y = at::zeros({B, D}, n.hh.options());
    const int64_t tile = std::min(kPoolTile, P);
    at::Tensor pp = at::empty({tile, D}, n.hh.options());
    at::Tensor sim = at::empty({B, tile}, n.hh.options());
    for (int64_t p0 = 0; p0 < P; p0 += tile) {
      const int64_t tp = std::min(tile, P - p0);
      at::Tensor pp_t = pp.narrow(0, 0, tp), sim_t = sim.narrow(1, 0, tp);
      normalise_rows_kernel<A, A><<<static_cast<unsigned>(tp), kThreads, 0, cuda::stream()>>>(
          pool.const_data_ptr<A>() + p0 * D, pp_t.mutable_data_ptr<A>(), D, A(eps), nullptr, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::mm_out(sim_t, n.hh, pp_t.t());
      y.addmm_(sim_t, pp_t);
    }
    out = epilogue<scalar_t, A>(h, n, y, 1.0 / (double(B) * double(P)), with_grad);
  });
  return out;
}

TORCH_LIBRARY_IMPL(invcoss, CUDA, m) {
  m.impl("repulsive_direct", &repulsive_direct_cuda);
  m.impl("repulsive_gram", &repulsive_gram_cuda);
  m.impl("gram_update", &gram_update);
}

}  // namespace invcoss
