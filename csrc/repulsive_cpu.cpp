// Repulsive cosine loss (Eq. 5) on CPU: normalisation and epilogue kernels around ATen matmuls (MKL).
//
// With h^_i = h_i / max(|h_i|, eps), p^_j likewise and Y = h^ G (gram path, G = sum_j p^_j p^_j^T) or
// Y = C P^ with C = h^ P^T scaled by the pool rows' inverse norms (direct path, over tiles of the
// pool so that the B x P similarity matrix is never held whole; an fp32 pool is read in place, its
// inverse norms given by RepulsivePool or computed in one pass), both paths share one epilogue:
//   q_i = y_i . h^_i = sum_j cos(h_i, p_j)^2,   loss = sum_i q_i / (B P),
//   grad_i = 2 / (B P |h_i|) (y_i - q_i h^_i)   (y_i / eps without the projection where |h_i| < eps).
// The gradient costs one pass over (B, D) once Y exists, so it is computed in the forward pass and
// backward only scales it (scale_rows). G is symmetric by construction (a sum of outer products);
// the gram path relies on that (d(h^T G h)/dh = 2 G h). The loss is summed per row and the rows in
// order, so it does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <vector>

#include "invcoss.h"
#include "simd.h"

namespace invcoss {
namespace {

constexpr int64_t kPoolTile = 2048;  // pool rows per matmul of the direct path

// out = in / max(|in|, eps) for one row of D values; returns max(|in|, eps) and whether |in| >= eps.
template <typename T, typename A>
INVCOSS_CLONES void normalise_row(const T* INVCOSS_RESTRICT in, A* INVCOSS_RESTRICT out, int64_t D, A eps,
                                  A* norm, A* proj) {
  A ss = A(0);
#pragma omp simd reduction(+ : ss)
  for (int64_t d = 0; d < D; ++d) ss += A(in[d]) * A(in[d]);
  const A raw = std::sqrt(ss);
  const A n = std::max(raw, eps);
  const A inv = A(1) / n;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] = A(in[d]) * inv;
  if (norm != nullptr) *norm = n;
  if (proj != nullptr) *proj = raw >= eps ? A(1) : A(0);
}

template <typename T, typename A>
void normalise_rows(const T* in, A* out, int64_t rows, int64_t D, A eps, A* norm, A* proj) {
  const int nt = cpu_threads(rows * D);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    normalise_row<T, A>(in + i * D, out + i * D, D, eps, norm ? norm + i : nullptr, proj ? proj + i : nullptr);
  }
}

template <typename T, typename A>
INVCOSS_CLONES A epilogue_row(const A* INVCOSS_RESTRICT y, const A* INVCOSS_RESTRICT hh, T* INVCOSS_RESTRICT g,
                              int64_t D, A norm, A proj, A two_c) {
  A q = A(0);
#pragma omp simd reduction(+ : q)
  for (int64_t d = 0; d < D; ++d) q += y[d] * hh[d];
  if (g != nullptr) {
    const A s = two_c / norm, pq = proj * q;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) g[d] = T(s * (y[d] - pq * hh[d]));
  }
  return q;
}

// 1 / max(|x_r|, eps) of `rows` rows of D values, ld apart (the pool's inverse norms when not given).
template <typename A>
void inv_norms(const A* x, int64_t ld, A* out, int64_t rows, int64_t D, A eps) {
  const int nt = cpu_threads(rows * D);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    const A* INVCOSS_RESTRICT r = x + i * ld;
    A ss = A(0);
#pragma omp simd reduction(+ : ss)
    for (int64_t d = 0; d < D; ++d) ss += r[d] * r[d];
    out[i] = A(1) / std::max(std::sqrt(ss), eps);
  }
}

// One pool tile of raw dots s (rows `stride` apart, cols columns) against unit h rows: the cosines
// are c_ij = s_ij inv_j; q[i] += sum_j c_ij^2, and with `to_weights` s becomes c_ij inv_j in place
// (the weights of the raw pool rows in Y = C P^).
template <typename A>
INVCOSS_CLONES void scale_tile_row(A* INVCOSS_RESTRICT s, const A* INVCOSS_RESTRICT inv, int64_t cols, double* q,
                                   bool to_weights) {
  A ss = A(0);
  if (to_weights) {
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < cols; ++j) {
      const A c = s[j] * inv[j];
      ss += c * c;
      s[j] = c * inv[j];
    }
  } else {
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < cols; ++j) {
      const A c = s[j] * inv[j];
      ss += c * c;
    }
  }
  *q += double(ss);
}

template <typename A>
void scale_tile(A* s, const A* inv, double* q, int64_t rows, int64_t cols, int64_t stride, bool to_weights) {
  const int nt = cpu_threads(rows * cols);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < rows; ++i) scale_tile_row<A>(s + i * stride, inv, cols, q + i, to_weights);
}

// The normalised batch and its norms, in the accumulation type.
struct NormalisedRows {
  at::Tensor hh, norm, proj;
};

template <typename T, typename A>
NormalisedRows normalise_batch(const at::Tensor& h, double eps) {
  const auto opts = h.options().dtype(c10::CppTypeToScalarType<A>::value);
  const int64_t B = h.size(0), D = h.size(1);
  NormalisedRows r{at::empty({B, D}, opts), at::empty({B}, opts), at::empty({B}, opts)};
  normalise_rows<T, A>(h.const_data_ptr<T>(), r.hh.mutable_data_ptr<A>(), B, D, A(eps),
                       r.norm.mutable_data_ptr<A>(), r.proj.mutable_data_ptr<A>());
  return r;
}

// loss and gradient from Y (B, D), shared by both paths; c = 1 / (B P).
template <typename T, typename A>
std::tuple<at::Tensor, at::Tensor> epilogue(const at::Tensor& h, const NormalisedRows& n, const at::Tensor& y,
                                            double c, bool with_grad) {
  const int64_t B = h.size(0), D = h.size(1);
  at::Tensor grad = with_grad ? at::empty({B, D}, h.options()) : at::empty({0}, h.options());
  std::vector<A> q(static_cast<size_t>(B));
  const A *yp = y.const_data_ptr<A>(), *hp = n.hh.const_data_ptr<A>();
  const A *np = n.norm.const_data_ptr<A>(), *pp = n.proj.const_data_ptr<A>();
  T* gp = with_grad ? grad.mutable_data_ptr<T>() : nullptr;
  const int nt = cpu_threads(B * D);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < B; ++i) {
    q[i] = epilogue_row<T, A>(yp + i * D, hp + i * D, gp ? gp + i * D : nullptr, D, np[i], pp[i], A(2.0 * c));
  }
  double total = 0.0;
  for (int64_t i = 0; i < B; ++i) total += double(q[i]);
  at::Tensor loss = at::empty({}, h.options().dtype(c10::CppTypeToScalarType<A>::value));
  loss.fill_(A(total * c));
  return {loss, grad};
}

}  // namespace

void check_repulsive_args(const char* op, const at::Tensor& h, const at::Tensor& other, bool is_gram) {
  check_floating(op, "h", h);
  check_dim(op, "h", h, 2, "(B, D)");
  const char* name = is_gram ? "gram" : "pool";
  check_floating(op, name, other);
  const int64_t D = h.size(1);
  if (is_gram) {
    TORCH_CHECK(other.dim() == 2 && other.size(0) == D && other.size(1) == D, op, ": expected gram of shape (", D,
                ", ", D, "), got ", other.sizes());
  } else {
    TORCH_CHECK(other.dim() == 2 && other.size(0) >= 1 && other.size(1) == D, op,
                ": expected pool of shape (P, ", D, ") with P >= 1, got ", other.sizes());
  }
  check_same_device(op, h, "h", other, name);
}

void check_pool_inv_norm(const char* op, const at::Tensor& pool, const std::optional<at::Tensor>& inv) {
  if (!inv.has_value()) return;
  TORCH_CHECK(inv->dim() == 1 && inv->size(0) == pool.size(0), op, ": expected pool_inv_norm of shape (",
              pool.size(0), ",), got ", inv->sizes());
  check_floating(op, "pool_inv_norm", *inv);
  check_same_device(op, pool, "pool", *inv, "pool_inv_norm");
}

std::tuple<at::Tensor, at::Tensor> repulsive_gram_cpu(const at::Tensor& h_in, const at::Tensor& gram, int64_t count,
                                                      double eps, bool with_grad) {
  const char* op = "repulsive_gram";
  check_repulsive_args(op, h_in, gram, /*is_gram=*/true);
  check_device(op, "h", h_in, at::kCPU);
  TORCH_CHECK(count >= 1, op, ": expected count >= 1 (the pool size), got ", count);
  const at::Tensor h = h_in.contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "repulsive_gram_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const NormalisedRows n = normalise_batch<scalar_t, A>(h, eps);
    const at::Tensor y = at::mm(n.hh, gram.to(n.hh.scalar_type()));
    out = epilogue<scalar_t, A>(h, n, y, 1.0 / (double(h.size(0)) * double(count)), with_grad);
  });
  return out;
}

// Per pool tile: S = h^ P_t^T (MKL), one pass that scales S by the rows' inverse norms and adds the
// squared cosines, and with a gradient Y += (C diag(inv)) P_t, the raw rows as the second operand.
// An fp32 pool with unit column stride is read in place; other dtypes are converted tile by tile
// into one reused buffer. Without a gradient the second matmul is skipped: half the flops.
std::tuple<at::Tensor, at::Tensor> repulsive_direct_cpu(const at::Tensor& h_in, const at::Tensor& pool_in,
                                                        double eps, bool with_grad,
                                                        const std::optional<at::Tensor>& pool_inv_norm) {
  const char* op = "repulsive_direct";
  check_repulsive_args(op, h_in, pool_in, /*is_gram=*/false);
  check_device(op, "h", h_in, at::kCPU);
  check_pool_inv_norm(op, pool_in, pool_inv_norm);
  const at::Tensor h = h_in.contiguous();
  const int64_t B = h.size(0), D = h.size(1), P = pool_in.size(0);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "repulsive_direct_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const NormalisedRows n = normalise_batch<scalar_t, A>(h, eps);
    const auto acc = n.hh.scalar_type();
    const bool in_place = pool_in.scalar_type() == acc && pool_in.stride(1) == 1;
    const int64_t tile = std::min(kPoolTile, P);
    at::Tensor buf = in_place ? at::Tensor() : at::empty({tile, D}, n.hh.options());
    at::Tensor inv = pool_inv_norm.has_value() ? pool_inv_norm->to(acc).contiguous() : at::empty({P}, n.hh.options());
    at::Tensor sim = at::empty({B, tile}, n.hh.options());
    at::Tensor y = with_grad ? at::empty({B, D}, n.hh.options()) : at::Tensor();
    std::vector<double> q(static_cast<size_t>(B), 0.0);
    for (int64_t p0 = 0; p0 < P; p0 += tile) {
      const int64_t tp = std::min(tile, P - p0);
      at::Tensor pool_t = pool_in.narrow(0, p0, tp);
      if (!in_place) pool_t = buf.narrow(0, 0, tp).copy_(pool_t);
      if (!pool_inv_norm.has_value()) {
        inv_norms<A>(pool_t.const_data_ptr<A>(), pool_t.stride(0), inv.mutable_data_ptr<A>() + p0, tp, D, A(eps));
      }
      at::Tensor sim_t = sim.narrow(1, 0, tp);
      at::mm_out(sim_t, n.hh, pool_t.t());  // (B, tp) raw dots of h^ with the pool rows
      scale_tile<A>(sim.mutable_data_ptr<A>(), inv.const_data_ptr<A>() + p0, q.data(), B, tp, tile, with_grad);
      if (with_grad) {
        if (p0 == 0) {
          at::mm_out(y, sim_t, pool_t);  // y_i = sum_j c_ij p^_j
        } else {
          y.addmm_(sim_t, pool_t);
        }
      }
    }
    const double c = 1.0 / (double(B) * double(P));
    if (with_grad) {
      out = epilogue<scalar_t, A>(h, n, y, c, with_grad);
      return;
    }
    double total = 0.0;
    for (int64_t i = 0; i < B; ++i) total += q[i];
    at::Tensor loss = at::empty({}, n.hh.options());
    loss.fill_(A(total * c));
    out = {loss, at::empty({0}, h.options())};
  });
  return out;
}

void gram_update(const at::Tensor& gram, const at::Tensor& feats_hat, double alpha) {
  const char* op = "gram_update";
  check_floating(op, "gram", gram);
  check_floating(op, "feats_hat", feats_hat);
  TORCH_CHECK(gram.dim() == 2 && gram.size(0) == gram.size(1), op, ": expected gram of shape (D, D), got ",
              gram.sizes());
  TORCH_CHECK(feats_hat.dim() == 2 && feats_hat.size(1) == gram.size(0), op, ": expected feats_hat of shape (K, ",
              gram.size(0), "), got ", feats_hat.sizes());
  check_same_device(op, gram, "gram", feats_hat, "feats_hat");
  const at::Tensor f = feats_hat.to(gram.scalar_type());
  gram.addmm_(f.t(), f, /*beta=*/1.0, /*alpha=*/alpha);
}

}  // namespace invcoss
