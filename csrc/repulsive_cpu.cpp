// Repulsive cosine loss (Eq. 5) on CPU: normalisation and epilogue kernels around ATen matmuls (MKL).
//
// With h^_i = h_i / max(|h_i|, eps), p^_j likewise and Y = h^ G (gram path, G = sum_j p^_j p^_j^T) or
// Y = (h^ P^T) P^ (direct path, over tiles of the pool so that the B x P similarity matrix is never
// held whole), both paths share one epilogue:
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

// q[i] += sum_j s[i * stride + j]^2 for j < cols (the squared cosines of one pool tile).
template <typename A>
void add_row_sq_sums(const A* s, double* q, int64_t rows, int64_t cols, int64_t stride) {
  const int nt = cpu_threads(rows * cols);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    const A* INVCOSS_RESTRICT row = s + i * stride;
    A ss = A(0);
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < cols; ++j) ss += row[j] * row[j];
    q[i] += double(ss);
  }
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

// Without a gradient the direct path skips the second matmul (see below): half the flops.
std::tuple<at::Tensor, at::Tensor> repulsive_direct_cpu(const at::Tensor& h_in, const at::Tensor& pool_in,
                                                        double eps, bool with_grad) {
  const char* op = "repulsive_direct";
  check_repulsive_args(op, h_in, pool_in, /*is_gram=*/false);
  check_device(op, "h", h_in, at::kCPU);
  const at::Tensor h = h_in.contiguous();
  const int64_t B = h.size(0), D = h.size(1), P = pool_in.size(0);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "repulsive_direct_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const NormalisedRows n = normalise_batch<scalar_t, A>(h, eps);
    const at::Tensor pool = pool_in.to(n.hh.scalar_type()).contiguous();
    const int64_t tile = std::min(kPoolTile, P);
    at::Tensor pp = at::empty({tile, D}, n.hh.options());
    at::Tensor sim = at::empty({B, tile}, n.hh.options());
    if (!with_grad) {
      // The loss alone is sum_ij cos_ij^2: one matmul per tile and a squared sum, no Y = C P^.
      std::vector<double> q(static_cast<size_t>(B), 0.0);
      for (int64_t p0 = 0; p0 < P; p0 += tile) {
        const int64_t tp = std::min(tile, P - p0);
        at::Tensor pp_t = pp.narrow(0, 0, tp), sim_t = sim.narrow(1, 0, tp);
        normalise_rows<A, A>(pool.const_data_ptr<A>() + p0 * D, pp_t.mutable_data_ptr<A>(), tp, D, A(eps),
                             nullptr, nullptr);
        at::mm_out(sim_t, n.hh, pp_t.t());  // (B, tp) cosines, rows `tile` apart
        add_row_sq_sums<A>(sim.const_data_ptr<A>(), q.data(), B, tp, tile);
      }
      double total = 0.0;
      for (int64_t i = 0; i < B; ++i) total += q[i];
      at::Tensor loss = at::empty({}, n.hh.options());
      loss.fill_(A(total / (double(B) * double(P))));
      out = {loss, at::empty({0}, h.options())};
      return;
    }
    at::Tensor y = at::zeros({B, D}, n.hh.options());
    for (int64_t p0 = 0; p0 < P; p0 += tile) {
      const int64_t tp = std::min(tile, P - p0);
      at::Tensor pp_t = pp.narrow(0, 0, tp), sim_t = sim.narrow(1, 0, tp);
      normalise_rows<A, A>(pool.const_data_ptr<A>() + p0 * D, pp_t.mutable_data_ptr<A>(), tp, D, A(eps), nullptr,
                           nullptr);
      at::mm_out(sim_t, n.hh, pp_t.t());  // (B, tp) cosines
      y.addmm_(sim_t, pp_t);              // y_i += sum_j cos_ij p^_j
    }
    out = epilogue<scalar_t, A>(h, n, y, 1.0 / (double(B) * double(P)), with_grad);
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
