// The ops for the CUDA dispatch key: argument checks, output and scratch allocation, dtype dispatch
// and cuBLAS matmuls (through ATen) around the raw kernels of *_cuda.cu (see cuda_launch.h for
// why the two halves are split). Compiled only into builds with CUDA kernels.
#ifdef INVCOSS_WITH_CUDA

#include <ATen/ops/add.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "cuda_launch.h"
#include "invcoss.h"

namespace invcoss {
namespace {

constexpr int64_t kPoolTile = 8192;  // pool rows per matmul of the direct path

// The (B, C, D, H, W) extents of x (D = 1 for images) and the weights of the W, H and D axes; the
// kernels index planes and rows with 32-bit integers.
struct TvArgs {
  int64_t B, C, D, H, W;
  double w_w, w_h, w_d;
};

TvArgs tv_args(const char* op, const at::Tensor& x, at::ArrayRef<double> weights) {
  const bool depth = x.dim() == 5;
  TvArgs a{x.size(0), x.size(1), depth ? x.size(2) : 1, x.size(-2), x.size(-1),
           weights.back(), weights[weights.size() - 2], depth ? weights[0] : 0.0};
  TORCH_CHECK(a.C * a.D <= INT32_MAX && a.H <= INT32_MAX && a.W <= INT32_MAX, op,
              ": expected C * D, H and W below 2^31, got ", x.sizes());
  return a;
}

// A non-contiguous x is copied to a contiguous one first (the kernels index planes of H x W values).
at::Tensor tv_cuda(const at::Tensor& x_in, at::ArrayRef<double> weights) {
  check_tv_args("tv", x_in, weights);
  check_device("tv", "x", x_in, at::kCUDA);
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor sums = at::empty({x.size(0)}, x.options().dtype(acc_dtype(x)));
  if (x.numel() == 0) return sums.zero_();
  const TvArgs a = tv_args("tv", x, weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tv_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::Tensor partial = at::empty({a.B * cuda::tv_partials<scalar_t>(xp, a.C, a.D, a.H, a.W)}, sums.options());
    cuda::tv_forward<scalar_t>(xp, partial.mutable_data_ptr<A>(), sums.mutable_data_ptr<A>(), a.B, a.C, a.D, a.H, a.W,
                               a.w_w, a.w_h, a.w_d);
  });
  return sums;
}

at::Tensor tv_backward_cuda(const at::Tensor& x_in, at::ArrayRef<double> weights, const at::Tensor& grad_sums) {
  check_tv_backward_args(x_in, weights, grad_sums);
  check_device("tv_backward", "x", x_in, at::kCUDA);
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor grad = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return grad;
  const TvArgs a = tv_args("tv_backward", x, weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tv_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const at::Tensor scale = as_acc<A>(grad_sums);
    cuda::tv_backward<scalar_t>(x.const_data_ptr<scalar_t>(), scale.const_data_ptr<A>(),
                                grad.mutable_data_ptr<scalar_t>(), a.B, a.C, a.D, a.H, a.W, a.w_w, a.w_h, a.w_d);
  });
  return grad;
}

at::Tensor scale_rows_cuda(const at::Tensor& grad_in, const at::Tensor& scale_in) {
  check_scale_rows_args(grad_in, scale_in);
  check_device("scale_rows", "grad", grad_in, at::kCUDA);
  const c10::cuda::OptionalCUDAGuard guard(grad_in.device());
  const at::Tensor g = grad_in.contiguous();
  at::Tensor out = at::empty(g.sizes(), g.options());
  if (g.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "scale_rows_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const at::Tensor s = as_acc<A>(scale_in);
    cuda::scale_rows<scalar_t>(g.const_data_ptr<scalar_t>(), s.const_data_ptr<A>(), out.mutable_data_ptr<scalar_t>(),
                               g.size(0), g.numel() / g.size(0));
  });
  return out;
}

// Staging buffers of the column statistics of x in the accumulation type A: the segments' (mean,
// m2), (S, F) each, relative to the per-column shift (F,).
struct ColumnPartials {
  at::Tensor mean, m2, shift;
};

template <typename T, typename A>
ColumnPartials column_partials(const at::Tensor& x, cuda::Segments seg) {
  const int64_t N = x.size(0), F = x.size(1);
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<A>::value);
  ColumnPartials p{at::empty({seg.count, F}, opts), at::empty({seg.count, F}, opts), at::empty({F}, opts)};
  cuda::column_partials<T, A>(x.const_data_ptr<T>(), x.stride(0), N, F, seg, p.mean.mutable_data_ptr<A>(),
                              p.m2.mutable_data_ptr<A>(), p.shift.mutable_data_ptr<A>());
  return p;
}

std::tuple<at::Tensor, at::Tensor> batch_mean_var_cuda(const at::Tensor& x_in) {
  check_columns_args("batch_mean_var", x_in);
  check_device("batch_mean_var", "x", x_in, at::kCUDA);
  TORCH_CHECK(x_in.size(0) >= 1, "batch_mean_var: expected x with at least one row, got ", x_in.sizes());
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = rows_with_unit_stride(x_in);
  const int64_t N = x.size(0), F = x.size(1);
  at::Tensor mean = at::empty({F}, x.options().dtype(acc_dtype(x)));
  at::Tensor var = at::empty_like(mean);
  if (F == 0) return {mean, var};
  const cuda::Segments seg = cuda::column_segments(N, F, x.element_size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_mean_var_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const ColumnPartials p = column_partials<scalar_t, A>(x, seg);
    cuda::batch_mean_var_finish<A>(p.mean.const_data_ptr<A>(), p.m2.const_data_ptr<A>(), p.shift.const_data_ptr<A>(),
                                   N, F, seg, mean.mutable_data_ptr<A>(), var.mutable_data_ptr<A>());
  });
  return {mean, var};
}

at::Tensor batch_mean_var_backward_cuda(const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& gm_in,
                                        const at::Tensor& gv_in) {
  const char* op = "batch_mean_var_backward";
  check_state_args(op, x_in, gm_in, "grad_mean", gv_in, "grad_var");
  check_state_args(op, x_in, mean_in, "mean", mean_in, "mean");
  check_device(op, "x", x_in, at::kCUDA);
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_mean_var_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const at::Tensor mean = as_acc<A>(mean_in), gm = as_acc<A>(gm_in), gv = as_acc<A>(gv_in);
    cuda::batch_mean_var_backward<scalar_t>(x.const_data_ptr<scalar_t>(), mean.const_data_ptr<A>(),
                                            gm.const_data_ptr<A>(), gv.const_data_ptr<A>(),
                                            out.mutable_data_ptr<scalar_t>(), x.size(0), x.size(1));
  });
  return out;
}

// The state's dtype A is the accumulation type (Eq. 9 is evaluated in the state's precision).
template <typename T, typename A>
void welford_update_launch(const at::Tensor& x, int64_t count, const at::Tensor& mean, const at::Tensor& m2,
                           at::Tensor& out_mean, at::Tensor& out_m2) {
  const int64_t N = x.size(0), F = x.size(1);
  const cuda::Segments seg = cuda::column_segments(N, F, x.element_size());
  const ColumnPartials p = column_partials<T, A>(x, seg);
  cuda::welford_update_finish<A>(p.mean.template const_data_ptr<A>(), p.m2.template const_data_ptr<A>(),
                                 p.shift.template const_data_ptr<A>(), N, F, seg,
                                 mean.const_data_ptr<A>(), m2.const_data_ptr<A>(), count,
                                 out_mean.mutable_data_ptr<A>(), out_m2.mutable_data_ptr<A>());
}

std::tuple<at::Tensor, at::Tensor> welford_update_cuda(const at::Tensor& x_in, int64_t count,
                                                       const at::Tensor& mean_in, const at::Tensor& m2_in) {
  const char* op = "welford_update";
  check_welford_args(x_in, count, mean_in, m2_in);
  check_device(op, "x", x_in, at::kCUDA);
  if (x_in.size(0) == 0 || x_in.size(1) == 0) return {mean_in.clone(), m2_in.clone()};
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = rows_with_unit_stride(x_in);
  const at::Tensor mean = mean_in.contiguous(), m2 = m2_in.contiguous();
  at::Tensor out_mean = at::empty_like(mean), out_m2 = at::empty_like(m2);
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
  const cuda::Segments seg = cuda::column_segments(N, F, x.element_size());
  at::Tensor block_sq = at::empty({2 * int64_t(cuda::column_blocks(F))}, x.options().dtype(at::kDouble));
  at::Tensor inv_norms = at::empty({2}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stat_matching_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const at::Tensor mu = as_acc<A>(mu_in), var = as_acc<A>(var_in);
    const ColumnPartials p = column_partials<scalar_t, A>(x, seg);
    cuda::stat_matching_finish<A>(p.mean.const_data_ptr<A>(), p.m2.const_data_ptr<A>(), p.shift.const_data_ptr<A>(),
                                  N, F, seg, mu.const_data_ptr<A>(), var.const_data_ptr<A>(),
                                  bmean.mutable_data_ptr<A>(), g_mean.mutable_data_ptr<A>(), g_var.mutable_data_ptr<A>(),
                                  block_sq.mutable_data_ptr<double>(), inv_norms.mutable_data_ptr<A>(),
                                  loss.mutable_data_ptr<A>());
  });
  return {loss, bmean, g_mean, g_var};
}

struct NormalisedRows {
  at::Tensor hh, norm, proj;
};

template <typename T>
NormalisedRows normalise_batch(const at::Tensor& h, double eps) {
  using A = at::opmath_type<T>;
  const auto opts = h.options().dtype(c10::CppTypeToScalarType<A>::value);
  const int64_t B = h.size(0), D = h.size(1);
  NormalisedRows r{at::empty({B, D}, opts), at::empty({B}, opts), at::empty({B}, opts)};
  cuda::normalise_rows<T>(h.const_data_ptr<T>(), r.hh.mutable_data_ptr<A>(), B, D, eps, r.norm.mutable_data_ptr<A>(),
                          r.proj.mutable_data_ptr<A>());
  return r;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> epilogue(const at::Tensor& h, const NormalisedRows& n, const at::Tensor& y,
                                            double c, bool with_grad) {
  using A = at::opmath_type<T>;
  const int64_t B = h.size(0), D = h.size(1);
  at::Tensor grad = with_grad ? at::empty({B, D}, h.options()) : at::empty({0}, h.options());
  at::Tensor q = at::empty({B}, n.norm.options());
  at::Tensor loss = at::empty({}, n.norm.options());
  cuda::repulsive_epilogue<T>(y.const_data_ptr<A>(), n.hh.const_data_ptr<A>(), n.norm.const_data_ptr<A>(),
                              n.proj.const_data_ptr<A>(), B, D, c, q.mutable_data_ptr<A>(),
                              with_grad ? grad.mutable_data_ptr<T>() : nullptr, loss.mutable_data_ptr<A>());
  return {loss, grad};
}

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
    const NormalisedRows n = normalise_batch<scalar_t>(h, eps);
    const at::Tensor y = at::mm(n.hh, gram.to(n.hh.scalar_type()));
    out = epilogue<scalar_t>(h, n, y, 1.0 / (double(h.size(0)) * double(count)), with_grad);
  });
  return out;
}

// Per pool tile of at most kPoolTile rows: S = h P_t^T (cuBLAS), one kernel that scales S into
// cosines with both rows' inverse norms, adds their squares per row and writes the weights
// u_ij = c_ij / |p_j| of the raw pool rows, then Y += u P_t (cuBLAS). The matmuls take the operands
// as stored: bf16/fp16 h against a pool of the same dtype run in that dtype with fp32 output
// (at::mm's out_dtype), the fp32 weights split into hi + lo halves of that dtype ([hi; lo] is one
// matmul of 2B rows, whose halves are added), so nothing computed is truncated to 16 bits; fp32 and
// fp64 run in their own dtype. A pool whose dtype is the operand dtype and whose columns are
// contiguous is read in place: no copy, and no renormalisation when RepulsivePool passes the inverse
// norms it keeps (else one pass computes them). Other pools (mixed dtypes) are converted tile by tile.
std::tuple<at::Tensor, at::Tensor> repulsive_direct_cuda(const at::Tensor& h_in, const at::Tensor& pool_in,
                                                         double eps, bool with_grad,
                                                         const std::optional<at::Tensor>& pool_inv_norm) {
  const char* op = "repulsive_direct";
  check_repulsive_args(op, h_in, pool_in, /*is_gram=*/false);
  check_device(op, "h", h_in, at::kCUDA);
  check_pool_inv_norm(op, pool_in, pool_inv_norm);
  TORCH_CHECK(h_in.size(0) <= INT32_MAX && pool_in.size(0) <= INT32_MAX, op,
              ": expected at most 2^31 - 1 rows in h and in pool, got ", h_in.size(0), " and ", pool_in.size(0));
  const c10::cuda::OptionalCUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  const int64_t B = h.size(0), D = h.size(1), P = pool_in.size(0);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "repulsive_direct_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    constexpr bool kLow = !std::is_same_v<scalar_t, A>;
    const NormalisedRows n = normalise_batch<scalar_t>(h, eps);
    const auto acc = n.hh.scalar_type();
    const at::TensorOptions acc_opts = n.hh.options();
    // The matmul operands' dtype: h's own when the pool shares its 16-bit dtype, else the accumulation type.
    const bool low = kLow && pool_in.scalar_type() == h.scalar_type();
    const at::ScalarType mm_dtype = low ? h.scalar_type() : acc;
    const at::Tensor h_op = low ? h : h.to(acc);
    const bool in_place = pool_in.scalar_type() == mm_dtype && pool_in.stride(1) == 1;
    const int64_t tile = std::min(kPoolTile, P);
    const int64_t n_tiles = (P + tile - 1) / tile;
    at::Tensor buf = in_place ? at::Tensor() : at::empty({tile, D}, h.options().dtype(mm_dtype));
    at::Tensor inv = pool_inv_norm.has_value() ? pool_inv_norm->to(acc).contiguous() : at::empty({P}, acc_opts);
    // Rows of the tile scratch start on 32 bytes (ld a multiple of 8 values), so that the cosine
    // pass reads and writes them 16 bytes at a time whatever P is.
    const int64_t ld = (tile + 7) / 8 * 8;
    at::Tensor sim = at::empty({B, ld}, acc_opts);
    at::Tensor q_part = at::empty({n_tiles, B}, acc_opts);
    const int64_t u_rows = low ? 2 * B : B;
    at::Tensor u = with_grad ? at::empty({u_rows, ld}, h.options().dtype(mm_dtype)) : at::Tensor();
    at::Tensor y = with_grad ? at::empty({B, D}, acc_opts) : at::Tensor();
    at::Tensor y_tile = with_grad && low ? at::empty({u_rows, D}, acc_opts) : at::Tensor();
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t p0 = t * tile, tp = std::min(tile, P - p0);
      at::Tensor pool_t = pool_in.narrow(0, p0, tp);
      if (!in_place) pool_t = buf.narrow(0, 0, tp).copy_(pool_t);
      A* inv_t = inv.mutable_data_ptr<A>() + p0;
      if (!pool_inv_norm.has_value() && low) {
        cuda::row_inv_norms<scalar_t>(pool_t.const_data_ptr<scalar_t>(), pool_t.stride(0), tp, D, eps, inv_t);
      } else if (!pool_inv_norm.has_value()) {
        cuda::row_inv_norms<A>(pool_t.const_data_ptr<A>(), pool_t.stride(0), tp, D, eps, inv_t);
      }
      at::Tensor sim_t = sim.narrow(1, 0, tp);
      if (low) {
        at::mm_out(sim_t, h_op, pool_t.t(), acc);  // 16-bit operands, fp32 output
      } else {
        at::mm_out(sim_t, h_op, pool_t.t());
      }
      const A* norm = n.norm.const_data_ptr<A>();
      A* q_t = q_part.mutable_data_ptr<A>() + t * B;
      if (low) {
        cuda::cosine_tile<A, scalar_t>(sim.const_data_ptr<A>(), ld, norm, inv_t, B, tp, q_t,
                                       with_grad ? u.mutable_data_ptr<scalar_t>() : nullptr, ld);
      } else {
        cuda::cosine_tile<A, A>(sim.const_data_ptr<A>(), ld, norm, inv_t, B, tp, q_t,
                                with_grad ? u.mutable_data_ptr<A>() : nullptr, ld);
      }
      if (!with_grad) continue;
      const at::Tensor u_t = u.narrow(1, 0, tp);
      if (low) {
        at::mm_out(y_tile, u_t, pool_t, acc);  // [hi; lo] P_t: (2B, D) fp32
        const at::Tensor hi = y_tile.narrow(0, 0, B), lo = y_tile.narrow(0, B, B);
        if (t == 0) {
          at::add_out(y, hi, lo);
        } else {
          y.add_(hi).add_(lo);
        }
      } else if (t == 0) {
        at::mm_out(y, u_t, pool_t);
      } else {
        y.addmm_(u_t, pool_t);
      }
    }
    const double c = 1.0 / (double(B) * double(P));
    if (with_grad) {
      out = epilogue<scalar_t>(h, n, y, c, with_grad);
      return;
    }
    at::Tensor loss = at::empty({}, acc_opts);
    cuda::sum_scaled<A>(q_part.const_data_ptr<A>(), n_tiles * B, c, loss.mutable_data_ptr<A>());
    out = {loss, at::empty({0}, h.options())};
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(invcoss, CUDA, m) {
  m.impl("tv", &tv_cuda);
  m.impl("tv_backward", &tv_backward_cuda);
  m.impl("scale_rows", &scale_rows_cuda);
  m.impl("batch_mean_var", &batch_mean_var_cuda);
  m.impl("batch_mean_var_backward", &batch_mean_var_backward_cuda);
  m.impl("welford_update", &welford_update_cuda);
  m.impl("stat_matching", &stat_matching_cuda);
  m.impl("repulsive_direct", &repulsive_direct_cuda);
  m.impl("repulsive_gram", &repulsive_gram_cuda);
  m.impl("gram_update", &gram_update);
}

}  // namespace invcoss

#endif  // INVCOSS_WITH_CUDA
