// Column statistics of x (N, F) on CPU (Eq. 9 and Eq. 3): batch mean/variance, the Welford/Chan
// update of a running state, the stat-matching loss and the shared backward.
//
// Work split: x is cut into items of (kStatRowChunk rows) x (one tile of up to kColTile columns), a
// grid fixed by the shape alone, spread over the threads in chunk-major order, so that a thread
// streams a contiguous band of whole rows (F = 768 fp32: 3 KB per row). Row chunks let a few wide
// columns ((B*L, D) features with D = 768) use every thread; tiles do the same for (B, L*D) and
// keep an item's per-column accumulators (a few KB) in L1. With several chunks, each item writes
// its (mean, m2) to a staging buffer (chunks, F) and a second, small pass merges the chunks of every
// column in chunk order (Chan et al.). Results therefore do not depend on the thread count: no value
// is added in a thread-dependent order.
//
// Inside an item: rows are walked in blocks, whole rows of the tile at a time. The first block
// (kStatFirstBlock rows) is done in two passes around x's first row (its sum, then, from L1, the sum
// of squared deviations from its mean: no cancellation). Every later block (kStatRowBlock rows) is
// read once: the sums of v = x - c and of v^2 around c = the item's running mean (within a few
// standard deviations of each column's mean, so q - s^2 / n loses nothing; an outlier that pulls
// the running mean away adds at most a few ulps of the variance it contributes itself), 16 rows
// per sweep with the partial sums in registers (then 8, 4, 1 for the rest), then merged into the
// running state with Chan's formula. Means are kept shifted by x's first row, so a column with a
// large mean and a small spread (randn * 0.01 + 100 in fp32) keeps the relative precision of its
// block means and of the differences between them. A thread thus streams contiguous rows
// (F = 768 fp32: 3 KB) with a few KB of per-column state in L1; items of one 64-byte column line
// per row at a 3 KB stride (the earlier design) read 1.4x slower here.
#include <algorithm>
#include <cmath>
#include <vector>

#include "invcoss.h"
#include "simd.h"

// The row sweeps are also compiled for x86-64-v4 (INVCOSS_WIDE_CLONES, simd.h).

namespace invcoss {
namespace {

// Rows per block (the unit merged with Chan's formula) and per work item. Fixed: the chunking, and
// so every result bit, is a function of the shape only. Measured at stat matching's (48, 111360)
// (2 threads, 21 MB, cache-resident here): first blocks of 8 rows instead of 32 (re-read from L1,
// not L2, each pass one register sweep), later blocks of 64 instead of 32 (half the merges), the
// sweeps and merges compiled for AVX-512 and a vectorised epilogue took the batch statistics from
// 0.56 to 0.44-0.47 ms and the loss from 0.67 to 0.50-0.54 ms; a plain x.sum() takes 0.38-0.41 ms.
constexpr int64_t kStatRowBlock = 64;
// Rows of an item's first block, summed in two passes around its own mean (the second from the
// caches): few, so that they stay in L1 (8 rows of a 1024-column fp32 tile: 32 KB) and little is
// read twice; their mean, within a third of a standard deviation of the column's mean, is then a
// good centre for the one-pass blocks.
constexpr int64_t kStatFirstBlock = 8;
constexpr int64_t kStatRowChunk = 512;
// Rows per sweep over the columns of block_sums_squares: its per-column sums are loaded and stored
// once per 16 rows (4 rows per sweep ran 1.4x slower, 32 spilled).
constexpr int kStatRowsPerSweep = 16;

// Columns per group of the epilogue and of the chunk merge: one 64-byte line (16 fp32, 32 bf16
// columns). kColTile is a multiple of it for every dtype.
template <typename T>
constexpr int64_t kGroup = 64 / sizeof(T);

// One sweep of the first block's passes over K rows from xr, rows ld apart, with the K-row partial
// sums of each column in registers, added to out (or stored there when kFirst): the sum of
// x - shift, or with kSquares of (x - shift - m)^2 (m: the block's shifted mean).
template <int K, bool kFirst, bool kSquares, typename T, typename A>
[[gnu::always_inline]] inline void sweep_first_block(const T* INVCOSS_RESTRICT xr, int64_t ld, int64_t nf,
                                                     const A* INVCOSS_RESTRICT shift, const A* INVCOSS_RESTRICT m,
                                                     A* INVCOSS_RESTRICT out) {
#pragma omp simd
  for (int64_t f = 0; f < nf; ++f) {
    const A sh = shift[f];
    A acc = A(0);
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      if constexpr (kSquares) {
        const A d = (A(xr[k * ld + f]) - sh) - m[f];
        acc += d * d;
      } else {
        acc += A(xr[k * ld + f]) - sh;
      }
    }
    if constexpr (kFirst) {
      out[f] = acc;
    } else {
      out[f] += acc;
    }
  }
}

// The first block of an item (nb <= kStatFirstBlock rows of nf columns, rows ld apart) in two
// passes around shift: mean = the mean of x - shift, then, from L1, m2 = the sum of
// (x - shift - mean)^2. A full block is one sweep each, its sums in registers.
template <typename T, typename A>
INVCOSS_WIDE_CLONES void first_block_moments(const T* INVCOSS_RESTRICT x, int64_t ld, int64_t nb, int64_t nf,
                                             const A* INVCOSS_RESTRICT shift, A* INVCOSS_RESTRICT mean,
                                             A* INVCOSS_RESTRICT m2) {
  constexpr int K = int(kStatFirstBlock);
  if (nb == K) {
    sweep_first_block<K, true, false, T, A>(x, ld, nf, shift, nullptr, mean);
  } else {
    sweep_first_block<1, true, false, T, A>(x, ld, nf, shift, nullptr, mean);
    for (int64_t r = 1; r < nb; ++r) {
      sweep_first_block<1, false, false, T, A>(x + r * ld, ld, nf, shift, nullptr, mean);
    }
  }
  const A inv_nb = A(1) / A(nb);
#pragma omp simd
  for (int64_t f = 0; f < nf; ++f) mean[f] *= inv_nb;
  if (nb == K) {
    sweep_first_block<K, true, true, T, A>(x, ld, nf, shift, mean, m2);
  } else {
    sweep_first_block<1, true, true, T, A>(x, ld, nf, shift, mean, m2);
    for (int64_t r = 1; r < nb; ++r) sweep_first_block<1, false, true, T, A>(x + r * ld, ld, nf, shift, mean, m2);
  }
}

// Columns [f0, f1) of one sweep of block_sums_squares: K rows from xr, rows ld apart, added to s
// and q (or stored there when kFirst), with the K-row partial sums of each column in registers.
template <int K, bool kFirst, typename T, typename A>
[[gnu::always_inline]] inline void sweep_columns(const T* INVCOSS_RESTRICT xr, int64_t ld, int64_t f0, int64_t f1,
                                                 const A* INVCOSS_RESTRICT c, A* INVCOSS_RESTRICT s,
                                                 A* INVCOSS_RESTRICT q) {
#pragma omp simd
  for (int64_t f = f0; f < f1; ++f) {
    const A cf = c[f];
    A ss = A(0), qq = A(0);
#pragma GCC unroll 16
    for (int k = 0; k < K; ++k) {
      const A v = A(xr[k * ld + f]) - cf;
      ss += v;
      qq += v * v;
    }
    if constexpr (kFirst) {
      s[f] = ss;
      q[f] = qq;
    } else {
      s[f] += ss;
      q[f] += qq;
    }
  }
}

// How far ahead, in bytes along each row, a sweep asks for x's lines (into L2, prefetcht1). A sweep
// reads K rows side by side, K streams that the hardware prefetchers follow poorly: on an AMD EPYC
// a 16-row sweep read 21-25 MB from L3 at half the rate of x.sum(); asking for the line 1 KB ahead
// in each row took it to 1.2x-1.9x (0.5 and 2 KB ahead, or into L1, gained less).
constexpr int64_t kSweepPrefetchBytes = 1024;

// One sweep of block_sums_squares over all nf columns, one 64-byte line of each row at a time, the
// line kSweepPrefetchBytes ahead of it asked for first. A prefetch never faults: the lines past the
// end of a row (or of x) that the last groups ask for are harmless.
template <int K, bool kFirst, typename T, typename A>
[[gnu::always_inline]] inline void sweep_sums_squares(const T* INVCOSS_RESTRICT xr, int64_t ld, int64_t nf,
                                                      const A* INVCOSS_RESTRICT c, A* INVCOSS_RESTRICT s,
                                                      A* INVCOSS_RESTRICT q) {
  constexpr int64_t G = kGroup<T>;
  int64_t f0 = 0;
  for (; f0 + G <= nf; f0 += G) {
    for (int k = 0; k < K; ++k) {
      __builtin_prefetch(reinterpret_cast<const char*>(xr + k * ld + f0) + kSweepPrefetchBytes, 0, 2);
    }
    sweep_columns<K, kFirst>(xr, ld, f0, f0 + G, c, s, q);
  }
  sweep_columns<K, kFirst>(xr, ld, f0, nf, c, s, q);
}

// One pass over nb >= 1 rows of nf columns, rows ld apart: s[f] = the sum of v = x[r][f] - c[f]
// and q[f] = the sum of v^2, kStatRowsPerSweep rows per sweep over the columns, then the rest in
// sweeps of 8, 4 and 1 rows (so that s and q are loaded and stored once per sweep, not per row).
// With c within a few standard deviations of the column's mean, v is small (and exact for x and c
// within a factor of two) and q - s^2 / nb keeps its relative precision.
template <typename T, typename A>
INVCOSS_WIDE_CLONES void block_sums_squares(const T* INVCOSS_RESTRICT x, int64_t ld, int64_t nb, int64_t nf,
                                            const A* INVCOSS_RESTRICT c, A* INVCOSS_RESTRICT s,
                                            A* INVCOSS_RESTRICT q) {
  constexpr int K = kStatRowsPerSweep;
  int64_t r = 0;
  if (nb >= K) {
    sweep_sums_squares<K, true>(x, ld, nf, c, s, q);
    r = K;
  } else if (nb >= 8) {
    sweep_sums_squares<8, true>(x, ld, nf, c, s, q);
    r = 8;
  } else {
    sweep_sums_squares<1, true>(x, ld, nf, c, s, q);
    r = 1;
  }
  for (; r + K <= nb; r += K) sweep_sums_squares<K, false>(x + r * ld, ld, nf, c, s, q);
  if (r + 8 <= nb) sweep_sums_squares<8, false>(x + r * ld, ld, nf, c, s, q), r += 8;
  if (r + 4 <= nb) sweep_sums_squares<4, false>(x + r * ld, ld, nf, c, s, q), r += 4;
  for (; r < nb; ++r) sweep_sums_squares<1, false>(x + r * ld, ld, nf, c, s, q);
}

// Folds the block of block_sums_squares (nb rows, sums s and q around c) into the running state
// (n_a rows: mean, m2; means shifted by `shift`), in place (Chan et al.).
template <typename A>
INVCOSS_WIDE_CLONES void merge_block(int64_t n_a, A* INVCOSS_RESTRICT mean, A* INVCOSS_RESTRICT m2, int64_t nb,
                                     const A* INVCOSS_RESTRICT shift, const A* INVCOSS_RESTRICT c,
                                     const A* INVCOSS_RESTRICT s, const A* INVCOSS_RESTRICT q, int64_t nf) {
  const double n = double(n_a + nb);
  const A wa = A(double(nb) / n), wb = A(double(n_a) * double(nb) / n), inv_nb = A(1) / A(nb);
#pragma omp simd
  for (int64_t f = 0; f < nf; ++f) {
    const A sm = s[f] * inv_nb;
    const A mb = (c[f] - shift[f]) + sm;
    const A qb = std::max(A(0), q[f] - s[f] * sm);
    const A d = mb - mean[f];
    mean[f] += d * wa;
    m2[f] += qb + d * d * wb;
  }
}

// Folds a state (nb rows: mean_b, m2_b) into (n_a rows: mean, m2), in place (Chan et al.); with
// n_a = 0 and mean = m2 = 0 it copies the state.
template <typename A>
INVCOSS_CLONES void merge_chunk(int64_t n_a, A* INVCOSS_RESTRICT mean, A* INVCOSS_RESTRICT m2, int64_t nb,
                                const A* INVCOSS_RESTRICT mean_b, const A* INVCOSS_RESTRICT m2_b, int64_t nf) {
  const double n = double(n_a + nb);
  const A wa = A(double(nb) / n), wb = A(double(n_a) * double(nb) / n);
#pragma omp simd
  for (int64_t f = 0; f < nf; ++f) {
    const A d = mean_b[f] - mean[f];
    mean[f] += d * wa;
    m2[f] += m2_b[f] + d * d * wb;
  }
}

// The per-thread buffers of one item: kColTile columns each.
template <typename A>
struct TileBuffers {
  alignas(64) A shift[kColTile];
  alignas(64) A s[kColTile];
  alignas(64) A q[kColTile];
  alignas(64) A c[kColTile];
};

// The shifted mean (the mean of x - shift) and m2 (sum of squared deviations) of `rows` rows of nf
// <= kColTile columns; x points at the item's first column of its first row, rows ld apart.
template <typename T, typename A>
void tile_moments(const T* x, int64_t ld, int64_t rows, int64_t nf, TileBuffers<A>& buf, A* mean, A* m2) {
  // The first block in two passes around x's first row (the state is empty: no shift closer to the
  // mean is known yet; the second pass reads its kStatFirstBlock rows from L1)...
  const int64_t n0 = std::min(kStatFirstBlock, rows);
  first_block_moments<T, A>(x, ld, n0, nf, buf.shift, mean, m2);
  // ...the others in one pass each around the running mean.
  for (int64_t r0 = n0; r0 < rows; r0 += kStatRowBlock) {
    const int64_t nb = std::min(kStatRowBlock, rows - r0);
    for (int64_t f = 0; f < nf; ++f) buf.c[f] = buf.shift[f] + mean[f];
    block_sums_squares<T, A>(x + r0 * ld, ld, nb, nf, buf.c, buf.s, buf.q);
    merge_block<A>(r0, mean, m2, nb, buf.shift, buf.c, buf.s, buf.q, nf);
  }
}

// The work grid of x (N, F) (see the file comment): row chunks times column tiles.
struct ColumnGrid {
  int64_t tiles, chunks;
  ColumnGrid(int64_t N, int64_t F)
      : tiles((F + kColTile - 1) / kColTile), chunks((N + kStatRowChunk - 1) / kStatRowChunk) {}
  static int64_t cols(int64_t t, int64_t F) { return std::min(kColTile, F - t * kColTile); }
  static int64_t rows(int64_t c, int64_t N) { return std::min(kStatRowChunk, N - c * kStatRowChunk); }
};

// The number of epilogue groups of x's F columns.
template <typename T>
int64_t column_groups(int64_t F) {
  return (F + kGroup<T> - 1) / kGroup<T>;
}

// Computes every column's (mean, m2) of x (N >= 1, F) over all rows in parallel and hands them, one
// group of kGroup<T> columns at a time, to epilogue(group, f0, nf, mean, m2). With one row chunk
// each thread finishes its own tiles; with more, pass 1 writes every item to a staging buffer
// (chunks, F) and pass 2 merges the chunks of each group in chunk order.
template <typename T, typename A, typename Epilogue>
void for_each_column_group(const at::Tensor& x, const Epilogue& epilogue) {
  constexpr int64_t W = kGroup<T>;
  const int64_t N = x.size(0), F = x.size(1), ld = x.stride(0);
  const ColumnGrid grid(N, F);
  const int64_t groups = column_groups<T>(F);
  const T* xp = x.const_data_ptr<T>();
  const int nt = cpu_threads(N * F);
  if (grid.chunks == 1) {
#pragma omp parallel num_threads(nt)
    {
      TileBuffers<A> buf;
      alignas(64) A mean[kColTile];
      alignas(64) A m2[kColTile];
#pragma omp for schedule(static)
      for (int64_t t = 0; t < grid.tiles; ++t) {
        const int64_t f0 = t * kColTile, nf = ColumnGrid::cols(t, F);
        for (int64_t f = 0; f < nf; ++f) buf.shift[f] = A(xp[f0 + f]);
        tile_moments<T, A>(xp + f0, ld, N, nf, buf, mean, m2);
        for (int64_t f = 0; f < nf; ++f) mean[f] += buf.shift[f];
        for (int64_t k = 0; k < nf; k += W) {
          epilogue((f0 + k) / W, f0 + k, std::min(W, nf - k), mean + k, m2 + k);
        }
      }
    }
    return;
  }
  at::Tensor staging = at::empty({2, grid.chunks, F}, x.options().dtype(c10::CppTypeToScalarType<A>::value));
  A* part_mean = staging.mutable_data_ptr<A>();
  A* part_m2 = part_mean + grid.chunks * F;
#pragma omp parallel num_threads(nt)
  {
    TileBuffers<A> buf;
    // Items in chunk-major order: a thread's share of the items is a contiguous band of rows.
#pragma omp for schedule(static)
    for (int64_t i = 0; i < grid.chunks * grid.tiles; ++i) {
      const int64_t c = i / grid.tiles, t = i % grid.tiles;
      const int64_t f0 = t * kColTile, nf = ColumnGrid::cols(t, F);
      for (int64_t f = 0; f < nf; ++f) buf.shift[f] = A(xp[f0 + f]);
      tile_moments<T, A>(xp + c * kStatRowChunk * ld + f0, ld, ColumnGrid::rows(c, N), nf, buf,
                         part_mean + c * F + f0, part_m2 + c * F + f0);
    }
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t f0 = g * W, nf = std::min(W, F - f0);
      alignas(64) A mean[W];
      alignas(64) A m2[W];
      for (int64_t f = 0; f < nf; ++f) mean[f] = part_mean[f0 + f], m2[f] = part_m2[f0 + f];
      for (int64_t c = 1; c < grid.chunks; ++c) {
        merge_chunk<A>(c * kStatRowChunk, mean, m2, ColumnGrid::rows(c, N), part_mean + c * F + f0,
                       part_m2 + c * F + f0, nf);
      }
      for (int64_t f = 0; f < nf; ++f) mean[f] += A(xp[f0 + f]);
      epilogue(g, f0, nf, mean, m2);
    }
  }
}

// grad = a + b (x - mean) over `rows` rows of nf <= kColTile columns, with a = grad_mean / N and
// b = 2 grad_var / N; the coefficients stay in L1 while the rows stream by.
template <typename T, typename A>
INVCOSS_CLONES void tile_backward(const T* INVCOSS_RESTRICT x, int64_t ldx, T* INVCOSS_RESTRICT out, int64_t ldo,
                                  int64_t rows, int64_t nf, const A* INVCOSS_RESTRICT mean,
                                  const A* INVCOSS_RESTRICT a, const A* INVCOSS_RESTRICT b) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * ldx;
    T* o = out + r * ldo;
#pragma omp simd
    for (int64_t f = 0; f < nf; ++f) o[f] = T(a[f] + b[f] * (A(xr[f]) - mean[f]));
  }
}

// Items of (kBackwardRows rows) x (kColTile columns): each row of an item is one contiguous run of
// x and of the fresh output (4 KB in fp32), which the output's first touch (a page fault per 4 KB)
// favours over the forward pass's narrow groups. Each thread page-faults the part it writes.
constexpr int64_t kBackwardRows = 64;

template <typename T, typename A>
void batch_mean_var_backward_kernel(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& gm,
                                    const at::Tensor& gv, at::Tensor& out) {
  const int64_t N = x.size(0), F = x.size(1), ldx = x.stride(0);
  const int64_t tiles = (F + kColTile - 1) / kColTile, chunks = (N + kBackwardRows - 1) / kBackwardRows;
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const A *mp = mean.const_data_ptr<A>(), *gmp = gm.const_data_ptr<A>(), *gvp = gv.const_data_ptr<A>();
  const A inv_n = A(1) / A(N), two_inv_n = A(2) / A(N);
  const int nt = cpu_threads(N * F);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < chunks * tiles; ++i) {
    const int64_t c = i / tiles, t = i % tiles;
    const int64_t f0 = t * kColTile, nf = std::min(kColTile, F - f0), r0 = c * kBackwardRows;
    alignas(64) A a[kColTile];
    alignas(64) A b[kColTile];
    for (int64_t f = 0; f < nf; ++f) a[f] = gmp[f0 + f] * inv_n, b[f] = gvp[f0 + f] * two_inv_n;
    tile_backward<T, A>(xp + r0 * ldx + f0, ldx, op + r0 * F + f0, F, std::min(kBackwardRows, N - r0), nf, mp + f0,
                        a, b);
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
  for_each_column_group<T, A>(x, [&](int64_t, int64_t f0, int64_t nf, const A* mb, const A* qb) {
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

// Stat matching's epilogue for one group of nf <= kGroup columns (column statistics m, m2 of N rows,
// inv_n = 1 / N; targets mu, var): the batch mean, the differences to the targets and their squared
// norms (summed in A over the group, a few ulps; the groups are added in double by the caller).
template <typename A>
INVCOSS_CLONES void differences_group(int64_t nf, const A* INVCOSS_RESTRICT m, const A* INVCOSS_RESTRICT m2, A inv_n,
                                      const A* INVCOSS_RESTRICT mu, const A* INVCOSS_RESTRICT var,
                                      A* INVCOSS_RESTRICT bm, A* INVCOSS_RESTRICT gm, A* INVCOSS_RESTRICT gv,
                                      double* sum_m, double* sum_v) {
  A sm = A(0), sv = A(0);
#pragma omp simd reduction(+ : sm, sv)
  for (int64_t f = 0; f < nf; ++f) {
    const A dm = m[f] - mu[f];
    const A dv = m2[f] * inv_n - var[f];
    bm[f] = m[f];
    gm[f] = dm;
    gv[f] = dv;
    sm += dm * dm;
    sv += dv * dv;
  }
  *sum_m = double(sm);
  *sum_v = double(sv);
}

// a *= sa and b *= sb over n values.
template <typename A>
INVCOSS_CLONES void scale_two(int64_t n, A* INVCOSS_RESTRICT a, A sa, A* INVCOSS_RESTRICT b, A sb) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] *= sa, b[i] *= sb;
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
    for_each_column_group<scalar_t, A>(x, [&](int64_t, int64_t f0, int64_t nf, const A* m, const A* m2) {
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
  const at::Tensor x = rows_with_unit_stride(x_in);
  at::Tensor out = empty_streaming_output(x);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stat_matching_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const int64_t groups = column_groups<scalar_t>(F);
    std::vector<double> part_m(static_cast<size_t>(groups)), part_v(static_cast<size_t>(groups));
    const at::Tensor mu = as_acc<A>(mu_in), var = as_acc<A>(var_in);
    const A *mup = mu.const_data_ptr<A>(), *varp = var.const_data_ptr<A>();
    A *bm = bmean.mutable_data_ptr<A>(), *gm = g_mean.mutable_data_ptr<A>(), *gv = g_var.mutable_data_ptr<A>();
    const A inv_n = A(1) / A(N);
    // Pass 1 (fused with the column statistics): batch mean, the differences to the targets and
    // their squared norms per group, added in group order.
    for_each_column_group<scalar_t, A>(x, [&](int64_t g, int64_t f0, int64_t nf, const A* m, const A* m2) {
      differences_group<A>(nf, m, m2, inv_n, mup + f0, varp + f0, bm + f0, gm + f0, gv + f0, &part_m[g],
                           &part_v[g]);
    });
    // Four running sums per norm (groups g = k mod 4), then added: a fixed order, a quarter of the
    // dependent adds of one running sum (thousands of groups at (B, L*D) features).
    double am[4] = {0.0, 0.0, 0.0, 0.0}, av[4] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t g = 0; g < groups; ++g) am[g & 3] += part_m[g], av[g & 3] += part_v[g];
    const double sm = (am[0] + am[1]) + (am[2] + am[3]), sv = (av[0] + av[1]) + (av[2] + av[3]);
    const double nm = std::sqrt(sm), nv = std::sqrt(sv);
    loss.fill_(A(nm) + A(nv));
    // Pass 2 over the (F,) vectors only: unit directions, zero where a norm is zero.
    scale_two<A>(F, gm, nm > 0 ? A(1.0 / nm) : A(0), gv, nv > 0 ? A(1.0 / nv) : A(0));
  });
  return {loss, bmean, g_mean, g_var};
}

}  // namespace invcoss
