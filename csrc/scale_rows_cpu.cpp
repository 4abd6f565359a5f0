// scale_rows on CPU: out[i] = scale[i] * grad[i] for grad (N, ...), scale (N,). The backward of every
// op that writes its gradient during the forward pass (repulsive_direct, repulsive_gram): the
// forward leaves d(value)/d(input) and backward only scales it by the incoming gradient.
#include <algorithm>

#include "invcoss.h"
#include "simd.h"

namespace invcoss {
namespace {

template <typename T>
INVCOSS_CLONES void scale_block(const T* INVCOSS_RESTRICT g, T* INVCOSS_RESTRICT out, int64_t n,
                                at::opmath_type<T> s) {
  using A = at::opmath_type<T>;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = T(A(g[k]) * s);
}

template <typename T>
void scale_rows_kernel(const at::Tensor& g, const at::Tensor& scale, at::Tensor& out) {
  using A = at::opmath_type<T>;
  constexpr int64_t kBlock = 1 << 14;
  const int64_t rows = g.size(0);
  const int64_t inner = rows == 0 ? 0 : g.numel() / rows;
  const int64_t blocks = (inner + kBlock - 1) / kBlock;
  const at::Tensor s = as_acc<A>(scale);
  const A* sp = s.const_data_ptr<A>();
  const T* gp = g.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const int nt = cpu_threads(g.numel());
#pragma omp parallel for collapse(2) num_threads(nt) schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t k = 0; k < blocks; ++k) {
      const int64_t k0 = k * kBlock, n = std::min(kBlock, inner - k0);
      scale_block<T>(gp + i * inner + k0, op + i * inner + k0, n, sp[i]);
    }
  }
}

}  // namespace

void check_scale_rows_args(const at::Tensor& grad, const at::Tensor& scale) {
  check_floating("scale_rows", "grad", grad);
  check_floating("scale_rows", "scale", scale);
  TORCH_CHECK(grad.dim() >= 1, "scale_rows: expected grad with a leading dimension, got a 0-dim tensor");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == grad.size(0), "scale_rows: expected scale of shape (",
              grad.size(0), ",), got ", scale.sizes());
  check_same_device("scale_rows", grad, "grad", scale, "scale");
}

at::Tensor scale_rows_cpu(const at::Tensor& grad_in, const at::Tensor& scale_in) {
  check_scale_rows_args(grad_in, scale_in);
  check_device("scale_rows", "grad", grad_in, at::kCPU);
  const at::Tensor g = grad_in.contiguous();
  at::Tensor out = at::empty(g.sizes(), g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "scale_rows_cpu",
                                  [&] { scale_rows_kernel<scalar_t>(g, scale_in, out); });
  return out;
}

}  // namespace invcoss
