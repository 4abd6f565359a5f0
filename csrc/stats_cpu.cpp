// Column statistics of x (N, F) on CPU (Eq. 9 and Eq. 3): batch mean/variance, the Welford/Chan
// update of a running state, the stat-matching loss and the shared backward.
//
// Layout: x is row-major, so a tile of kColTile adjacent columns is kColTile contiguous values in
// every row. Each tile is owned by one thread and walked in blocks of kColRowBlock rows; a block
// (64 rows x 4 KB of fp32) stays in L2, so its statistics are computed in two passes (sum, then the
// sum of squared deviations from the block mean: no cancellation, no divide in the inner loop, and
// both on values shifted by the tile's first row), and consecutive blocks are merged with Chan et
// al.'s formula. The inner loops run along the columns,
// contiguous and branch-free, and vectorise. A column is always reduced by one thread in one order,
// so results do not depend on the thread count; the two norms of the stat-matching loss are summed
// per tile and the tile partials are added in tile order.
#include <algorithm>
#include <cmath>
#include <vector>

#include "invcoss.h"
#include "simd.h"

namespace invcoss {
namespace {

// mean and m2 (sum of squared deviations) of the N rows of one tile of nf <= kColTile columns,
// x pointing at the tile's first column of row 0, rows ld apart.
//
// Everything is computed on x - shift with shift = the tile's first row: a column with a large
// mean and a small spread (randn * 0.01 + 100 in fp32) then sums small numbers, so the block means
// and the differences between them in the Chan merge keep their relative precision.
template <typename T, typename A>
INVCOSS_CLONES void column_moments(const T* INVCOSS_RESTRICT x, int64_t ld, int64_t N, int64_t nf,
                                   A* INVCOSS_RESTRICT mean, A* INVCOSS_RESTRICT m2) {
  alignas(64) A shift[kColTile];
  alignas(64) A s[kColTile];
  alignas(64) A q[kColTile];
  for (int64_t f = 0; f < nf; ++f) shift[f] = A(x[f]);
  int64_t n_done = 0;
  for (int64_t r0 = 0; r0 < N; r0 += kColRowBlock) {
    const int64_t nb = std::min(kColRowBlock, N - r0);
    const T* blk = x + r0 * ld;
    for (int64_t f = 0; f < nf; ++f) s[f] = A(0), q[f] = A(0);
    for (int64_t r = 0; r < nb; ++r) {
      const T* row = blk + r * ld;
#pragma omp simd
      for (int64_t f = 0; f < nf; ++f) s[f] += A(row[f]) - shift[f];
    }
    const A inv_nb = A(1) / A(nb);
#pragma omp simd
    for (int64_t f = 0; f < nf; ++f) s[f] *= inv_nb;  // the block mean, shifted
    for (int64_t r = 0; r < nb; ++r) {
      const T* row = blk + r * ld;
#pragma omp simd
      for (int64_t f = 0; f < nf; ++f) {
        const A d = (A(row[f]) - shift[f]) - s[f];
        q[f] += d * d;
      }
    }
    if (n_done == 0) {
      for (int64_t f = 0; f < nf; ++f) mean[f] = s[f], m2[f] = q[f];
    } else {
      const double n = double(n_done + nb);
      const A wa = A(double(nb) / n), wb = A(double(n_done) * double(nb) / n);
#pragma omp simd
      for (int64_t f = 0; f < nf; ++f) {
        const A d = s[f] - mean[f];
        mean[f] += d * wa;
        m2[f] += q[f] + d * d * wb;
      }
    }
    n_done += nb;
  }
#pragma omp simd
  for (int64_t f = 0; f < nf; ++f) mean[f] += shift[f];
}

// Runs column_moments on every tile of x (N, F) in parallel and hands each tile's statistics to
// epilogue(tile, f0, nf, mean, m2), on the thread that computed them (while they are in L1).
template <typename T, typename A, typename Epilogue>
void for_each_column_tile(const at::Tensor& x, const Epilogue& epilogue) {
  const int64_t N = x.size(0), F = x.size(1), ld = x.stride(0);
  const int64_t tiles = (F + kColTile - 1) / kColTile;
  const T* xp = x.const_data_ptr<T>();
  const int nt = cpu_threads(N * F);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t f0 = t * kColTile, nf = std::min(kColTile, F - f0);
    alignas(64) A mean[kColTile];
    alignas(64) A m2[kColTile];
    column_moments<T, A>(xp + f0, ld, N, nf, mean, m2);
    epilogue(t, f0, nf, mean, m2);
  }
}

template <typename T, typename A>
INVCOSS_CLONES void batch_mean_var_backward_block(const T* INVCOSS_RESTRICT x, T* INVCOSS_RESTRICT out, int64_t ld,
                                                  int64_t N, int64_t nf, const A* INVCOSS_RESTRICT mean,
                                                  const A* INVCOSS_RESTRICT gm, const A* INVCOSS_RESTRICT gv) {
  const A inv_n = A(1) / A(N), two_inv_n = A(2) / A(N);
  alignas(64) A a[kColTile];
  alignas(64) A b[kColTile];
  for (int64_t f = 0; f < nf; ++f) a[f] = gm[f] * inv_n, b[f] = gv[f] * two_inv_n;
  for (int64_t r = 0; r < N; ++r) {
    const T* xr = x + r * ld;
    T* o = out + r * ld;
#pragma omp simd
    for (int64_t f = 0; f < nf; ++f) o[f] = T(a[f] + b[f] * (A(xr[f]) - mean[f]));
  }
}

// Parallel over blocks of columns; each block's coefficients stay in L1 while its rows stream by.
template <typename T, typename A>
void batch_mean_var_backward_kernel(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& gm,
                                    const at::Tensor& gv, at::Tensor& out) {
  constexpr int64_t kBlock = kColTile;
  const int64_t N = x.size(0), F = x.size(1);
  const int64_t blocks = (F + kBlock - 1) / kBlock;
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const A *mp = mean.const_data_ptr<A>(), *gmp = gm.const_data_ptr<A>(), *gvp = gv.const_data_ptr<A>();
  const int nt = cpu_threads(N * F);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t f0 = k * kBlock, nf = std::min(kBlock, F - f0);
    batch_mean_var_backward_block<T, A>(xp + f0, op + f0, F, N, nf, mp + f0, gmp + f0, gvp + f0);
  }
}

template <typename T, typename A>
void welford_update_kernel(const at::Tensor& x, int64_t count, const at::Tensor& mean, const at::Tensor& m2,
                           at::Tensor& out_mean, at::Tensor& out_m2) {
  const int64_t N = x.size(0);
  const double n = double(count + N);
  const A *ms = mean.const_data_ptr<A>(), *qs = m2.const_data_ptr<A>();
  A *mo = out_mean.mutable_data_ptr<A>(), *qo = out_m2.mutable_data_ptr<A>();
  const A wa = A(double(N) / n), wb = A(double(count) * double(N) / n);
  for_each_column_tile<T, A>(x, [&](int64_t, int64_t f0, int64_t nf, const A* mb, const A* qb) {
    if (count == 0) {
      for (int64_t f = 0; f < nf; ++f) mo[f0 + f] = mb[f], qo[f0 + f] = qb[f];
      return;
    }
#pragma omp simd
    for (int64_t f = 0; f < nf; ++f) {
      const A d = mb[f] - ms[f0 + f];
      mo[f0 + f] = ms[f0 + f] + d * wa;
      qo[f0 + f] = qs[f0 + f] + qb[f] + d * d * wb;
    }
  });
}

}  // namespace

void check_columns_args(const char* op, const at::Tensor& x) {
  check_floating(op, "x", x);
  check_dim(op, "x", x, 2, "(N, F)");
}

void check_state_args(const char* op, const at::Tensor& x, const at::Tensor& a, const char* a_name,
                      const at::Tensor& b, const char* b_name) {
  check_columns_args(op, x);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{a, a_name}, {b, b_name}}) {
    check_floating(op, name, t);
    TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": expected ", name, " of shape (", x.size(1),
                ",) (x's feature count), got ", t.sizes());
    check_same_device(op, x, "x", t, name);
  }
}

void check_welford_args(const at::Tensor& x, int64_t count, const at::Tensor& mean, const at::Tensor& m2) {
  const char* op = "welford_update";
  check_state_args(op, x, mean, "mean", m2, "m2");
  TORCH_CHECK(count >= 0, op, ": expected count >= 0, got ", count);
  TORCH_CHECK(mean.scalar_type() == m2.scalar_type() &&
                  (mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble),
              op, ": expected mean and m2 both fp32 or both fp64, got ", mean.scalar_type(), " and ",
              m2.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> batch_mean_var_cpu(const at::Tensor& x_in) {
  check_columns_args("batch_mean_var", x_in);
  check_device("batch_mean_var", "x", x_in, at::kCPU);
  TORCH_CHECK(x_in.size(0) >= 1, "batch_mean_var: expected x with at least one row, got ", x_in.sizes());
  const at::Tensor x = rows_with_unit_stride(x_in);
  at::Tensor mean = at::empty({x.size(1)}, x.options().dtype(acc_dtype(x)));
  at::Tensor var = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_mean_var_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    A* mp = mean.mutable_data_ptr<A>();
    A* vp = var.mutable_data_ptr<A>();
    const A inv_n = A(1) / A(x.size(0));
    for_each_column_tile<scalar_t, A>(x, [&](int64_t, int64_t f0, int64_t nf, const A* m, const A* m2) {
      for (int64_t f = 0; f < nf; ++f) mp[f0 + f] = m[f], vp[f0 + f] = m2[f] * inv_n;
    });
  });
  return {mean, var};
}

at::Tensor batch_mean_var_backward_cpu(const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& gm_in,
                                       const at::Tensor& gv_in) {
  const char* op = "batch_mean_var_backward";
  check_state_args(op, x_in, gm_in, "grad_mean", gv_in, "grad_var");
  check_state_args(op, x_in, mean_in, "mean", mean_in, "mean");
  check_device(op, "x", x_in, at::kCPU);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_mean_var_backward_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    batch_mean_var_backward_kernel<scalar_t, A>(x, as_acc<A>(mean_in), as_acc<A>(gm_in), as_acc<A>(gv_in), out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> welford_update_cpu(const at::Tensor& x_in, int64_t count,
                                                      const at::Tensor& mean_in, const at::Tensor& m2_in) {
  check_welford_args(x_in, count, mean_in, m2_in);
  check_device("welford_update", "x", x_in, at::kCPU);
  if (x_in.size(0) == 0) return {mean_in.clone(), m2_in.clone()};
  const at::Tensor x = rows_with_unit_stride(x_in);
  const at::Tensor mean = mean_in.contiguous(), m2 = m2_in.contiguous();
  at::Tensor out_mean = at::empty_like(mean), out_m2 = at::empty_like(m2);
  // Two-level dispatch: x's dtype (T) and the state dtype (A, the accumulation type, as Eq. 9 is
  // evaluated in the state's precision).
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "welford_update_cpu", [&] {
    if (mean.scalar_type() == at::kDouble) {
      welford_update_kernel<scalar_t, double>(x, count, mean, m2, out_mean, out_m2);
    } else {
      welford_update_kernel<scalar_t, float>(x, count, mean, m2, out_mean, out_m2);
    }
  });
  return {out_mean, out_m2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stat_matching_cpu(const at::Tensor& x_in,
                                                                             const at::Tensor& mu_in,
                                                                             const at::Tensor& var_in) {
  const char* op = "stat_matching";
  check_state_args(op, x_in, mu_in, "mean", var_in, "var");
  check_device(op, "x", x_in, at::kCPU);
  TORCH_CHECK(x_in.size(0) >= 1, op, ": expected x with at least one row, got ", x_in.sizes());
  const at::Tensor x = rows_with_unit_stride(x_in);
  const int64_t N = x.size(0), F = x.size(1);
  const auto opts = x.options().dtype(acc_dtype(x));
  at::Tensor bmean = at::empty({F}, opts), g_mean = at::empty({F}, opts), g_var = at::empty({F}, opts);
  at::Tensor loss = at::empty({}, opts);
  const int64_t tiles = (F + kColTile - 1) / kColTile;
  std::vector<double> part_m(static_cast<size_t>(tiles)), part_v(static_cast<size_t>(tiles));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stat_matching_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const at::Tensor mu = as_acc<A>(mu_in), var = as_acc<A>(var_in);
    const A *mup = mu.const_data_ptr<A>(), *varp = var.const_data_ptr<A>();
    A *bm = bmean.mutable_data_ptr<A>(), *gm = g_mean.mutable_data_ptr<A>(), *gv = g_var.mutable_data_ptr<A>();
    const A inv_n = A(1) / A(N);
    // Pass 1 (fused with the column statistics): batch mean, the differences to the targets and
    // their squared norms per tile.
    for_each_column_tile<scalar_t, A>(x, [&](int64_t t, int64_t f0, int64_t nf, const A* m, const A* m2) {
      double sm = 0.0, sv = 0.0;
      for (int64_t f = 0; f < nf; ++f) {
        const A dm = m[f] - mup[f0 + f];
        const A dv = m2[f] * inv_n - varp[f0 + f];
        bm[f0 + f] = m[f];
        gm[f0 + f] = dm;
        gv[f0 + f] = dv;
        sm += double(dm) * double(dm);
        sv += double(dv) * double(dv);
      }
      part_m[t] = sm;
      part_v[t] = sv;
    });
    double sm = 0.0, sv = 0.0;
    for (int64_t t = 0; t < tiles; ++t) sm += part_m[t], sv += part_v[t];
    const double nm = std::sqrt(sm), nv = std::sqrt(sv);
    loss.fill_(A(nm) + A(nv));
    // Pass 2 over the (F,) vectors only: unit directions, zero where a norm is zero.
    const A sm_inv = nm > 0 ? A(1.0 / nm) : A(0), sv_inv = nv > 0 ? A(1.0 / nv) : A(0);
    for (int64_t f = 0; f < F; ++f) gm[f] *= sm_inv, gv[f] *= sv_inv;
  });
  return {loss, bmean, g_mean, g_var};
}

}  // namespace invcoss
