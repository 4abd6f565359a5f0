// Column statistics of x (N, F) on CUDA (Eq. 9 and Eq. 3): batch mean/variance, the Welford/Chan
// update of a running state, the stat-matching loss and the shared backward.
//
// col_partial_kernel: grid (column blocks, S row segments), kThreads threads as TX column lanes x
// TY row groups (TX a power of two, up to 32). A lane owns V adjacent columns read with one 16-byte
// load per row (float4, 8 x bf16/fp16, 2 x fp64; V = 1 when the rows are not 16-byte aligned or F is
// not a multiple of V), so a warp reads 512 contiguous bytes of one row per instruction. Each thread
// keeps U rows in flight with U independent Welford states: every round issues U loads before any
// arithmetic, and all U states share one count, so a round needs one reciprocal (1 / rounds so far)
// and no division per element. The U states are merged (Chan), the TY row groups of a column are
// merged in shared memory in a fixed tree, and the segment's (mean, m2) goes to a staging buffer.
// Second pass, one thread per column: the S segments are merged in order (and with the running
// state for welford_update). The stat-matching loss adds per-block partial sums of its squared
// differences in a last one-block pass. The shapes of all reductions depend on (N, F, dtype,
// alignment) only: the same bits on every run, no atomics.
#include "cuda_reduce.cuh"

namespace invcoss::cuda {
namespace {

constexpr int kVecBytes = 16;

// Values of T per 16-byte access.
template <typename T>
constexpr int vec_width() {
  return kVecBytes / int(sizeof(T));
}

// Rows in flight per thread: U independent states of V columns stay within 64 registers
// (2 U V sizeof(A) / 4 <= 64), at most 4.
template <typename A, int V>
constexpr int rows_in_flight() {
  return std::max(1, std::min(4, 128 / (V * int(sizeof(A)))));
}

// V values of T at p (16-byte aligned when V > 1), converted to A.
template <typename T, typename A, int V>
__device__ __forceinline__ void load_row(const T* __restrict__ p, A (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = static_cast<A>(p[0]);
  } else {
    static_assert(V * sizeof(T) == kVecBytes, "a vector is one 16-byte access");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    T vals[V];
    memcpy(vals, &raw, kVecBytes);
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = static_cast<A>(vals[k]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_row(T* __restrict__ p, const T (&vals)[V]) {
  if constexpr (V == 1) {
    p[0] = vals[0];
  } else {
    uint4 raw;
    memcpy(&raw, vals, kVecBytes);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// 1 / n, correctly rounded, without the slow-path call of an IEEE divide.
__device__ __forceinline__ float reciprocal(float n) { return __frcp_rn(n); }
__device__ __forceinline__ double reciprocal(double n) { return __drcp_rn(n); }

// Chan et al. for V columns that share their counts: fold (nb, mb, qb) into (na, mean, m2).
template <typename A, int V>
__device__ __forceinline__ void chan_merge_columns(A na, A (&mean)[V], A (&m2)[V], A nb, const A (&mb)[V],
                                                   const A (&qb)[V]) {
  const A nt = na + nb;
  if (nb == A(0) || nt == A(0)) return;
  const A wb = nb * reciprocal(nt), wab = na * wb;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const A d = mb[k] - mean[k];
    mean[k] += d * wb;
    m2[k] += qb[k] + d * d * wab;
  }
}

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kThreads) col_partial_kernel(const T* __restrict__ x, int64_t ld, int64_t N,
                                                               int64_t F, int64_t seg_len, int tx_log2,
                                                               A* __restrict__ part_mean, A* __restrict__ part_m2,
                                                               A* __restrict__ shift_out) {
  constexpr int U = rows_in_flight<A, V>();
  const int TX = 1 << tx_log2, TY = kThreads >> tx_log2;
  const int tx = threadIdx.x & (TX - 1), ty = threadIdx.x >> tx_log2;
  const int64_t col = ((int64_t(blockIdx.x) << tx_log2) + tx) * V;
  const bool active = col < F;
  const int64_t r0 = int64_t(blockIdx.y) * seg_len, r1 = std::min(N, r0 + seg_len);
  const T* __restrict__ xc = x + (active ? col : 0);
  // Every value is shifted by its column's value in row 0 (x - shift is exact within a factor 2 of
  // it), so that a column with a large mean and a small spread (randn * 0.01 + 100) is reduced as
  // small numbers: the means, and the differences of means that Chan's merge squares, keep their
  // relative precision. Partials are relative to the shift; the second pass adds it back.
  A shift[V];
#pragma unroll
  for (int k = 0; k < V; ++k) shift[k] = A(0);
  if (active) load_row<T, A, V>(xc, shift);

  A mean[U][V], m2[U][V];
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int k = 0; k < V; ++k) mean[u][k] = A(0), m2[u][k] = A(0);
  }
  // Full rounds: every slot of every thread has a row (a block-uniform condition). Slot u of row
  // group ty reads row base + u * TY + ty.
  const int64_t step = int64_t(TY) * U;
  int64_t base = r0;
  A rounds = A(0);
  for (; base + step <= r1; base += step) {
    A v[U][V];
    if (active) {
#pragma unroll
      for (int u = 0; u < U; ++u) load_row<T, A, V>(xc + (base + u * TY + ty) * ld, v[u]);
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int k = 0; k < V; ++k) v[u][k] -= shift[k];
      }
    }
    rounds += A(1);
    const A r = reciprocal(rounds);
    if (active) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const A d = v[u][k] - mean[u][k];
          mean[u][k] += d * r;
          m2[u][k] += d * (v[u][k] - mean[u][k]);
        }
      }
    }
  }
  // The last, partial round: slot u has a row when base + u * TY + ty < r1.
  A n[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t row = base + u * TY + ty;
    n[u] = rounds;
    if (row < r1) {
      n[u] += A(1);
      if (active) {
        A v[V];
        load_row<T, A, V>(xc + row * ld, v);
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] -= shift[k];
        const A r = reciprocal(n[u]);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const A d = v[k] - mean[u][k];
          mean[u][k] += d * r;
          m2[u][k] += d * (v[k] - mean[u][k]);
        }
      }
    }
  }
  // Slots into slot 0, in slot order.
  A nt = n[0];
#pragma unroll
  for (int u = 1; u < U; ++u) {
    chan_merge_columns<A, V>(nt, mean[0], m2[0], n[u], mean[u], m2[u]);
    nt += n[u];
  }
  // Row groups: a fixed tree in shared memory; at each level the upper half hands its state down.
  __shared__ A sh_n[kThreads / 2];
  __shared__ A sh_mean[kThreads / 2][V];
  __shared__ A sh_m2[kThreads / 2][V];
  for (int h = TY / 2; h >= 1; h >>= 1) {
    if (ty >= h && ty < 2 * h) {
      const int slot = (ty - h) * TX + tx;
      sh_n[slot] = nt;
#pragma unroll
      for (int k = 0; k < V; ++k) sh_mean[slot][k] = mean[0][k], sh_m2[slot][k] = m2[0][k];
    }
    __syncthreads();
    if (ty < h) {
      const int slot = ty * TX + tx;
      A mb[V], qb[V];
#pragma unroll
      for (int k = 0; k < V; ++k) mb[k] = sh_mean[slot][k], qb[k] = sh_m2[slot][k];
      chan_merge_columns<A, V>(nt, mean[0], m2[0], sh_n[slot], mb, qb);
      nt += sh_n[slot];
    }
    __syncthreads();
  }
  if (ty == 0 && active) {
    const int64_t out = int64_t(blockIdx.y) * F + col;
#pragma unroll
    for (int k = 0; k < V; ++k) part_mean[out + k] = mean[0][k], part_m2[out + k] = m2[0][k];
    if (blockIdx.y == 0) {
#pragma unroll
      for (int k = 0; k < V; ++k) shift_out[col + k] = shift[k];
    }
  }
}

// The column's (mean, m2) over all N rows, relative to the column's shift: its segments merged in
// order.
template <typename A>
__device__ __forceinline__ void merge_segments(const A* __restrict__ part_mean, const A* __restrict__ part_m2,
                                               int64_t col, int64_t F, int64_t N, Segments seg, A& mean, A& m2) {
  A n = A(0);
  mean = A(0);
  m2 = A(0);
  for (int s = 0; s < seg.count; ++s) {
    const A nb = A(std::min(seg.seg_len, N - s * seg.seg_len));
    chan_merge(n, mean, m2, nb, part_mean[s * F + col], part_m2[s * F + col]);
  }
}

template <typename A>
__global__ void batch_mean_var_kernel(const A* __restrict__ part_mean, const A* __restrict__ part_m2,
                                      const A* __restrict__ shift, int64_t F, int64_t N, Segments seg,
                                      A* __restrict__ out_mean, A* __restrict__ out_var) {
  const int64_t col = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= F) return;
  A mean, m2;
  merge_segments(part_mean, part_m2, col, F, N, seg, mean, m2);
  out_mean[col] = mean + shift[col];
  out_var[col] = m2 / A(N);
}

// wa = N / (count + N), wb = count * N / (count + N), computed in fp64 on the host. The batch is
// merged into the state in shifted coordinates too (state mean - shift is exact when they are close).
template <typename A>
__global__ void welford_merge_kernel(const A* __restrict__ part_mean, const A* __restrict__ part_m2,
                                     const A* __restrict__ shift, int64_t F, int64_t N, Segments seg,
                                     const A* __restrict__ state_mean, const A* __restrict__ state_m2, bool fresh,
                                     A wa, A wb, A* __restrict__ out_mean, A* __restrict__ out_m2) {
  const int64_t col = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= F) return;
  A mean, m2;
  merge_segments(part_mean, part_m2, col, F, N, seg, mean, m2);
  if (fresh) {
    out_mean[col] = mean + shift[col];
    out_m2[col] = m2;
    return;
  }
  const A d = mean - (state_mean[col] - shift[col]);
  out_mean[col] = state_mean[col] + d * wa;
  out_m2[col] = state_m2[col] + m2 + d * d * wb;
}

// Batch mean, the differences to the targets (made unit vectors by stat_scale_kernel), and per-block
// fp64 partial sums of their squares.
template <typename A>
__global__ void stat_diff_kernel(const A* __restrict__ part_mean, const A* __restrict__ part_m2,
                                 const A* __restrict__ shift, int64_t F, int64_t N, Segments seg,
                                 const A* __restrict__ mu, const A* __restrict__ var, A* __restrict__ bmean,
                                 A* __restrict__ dmean, A* __restrict__ dvar, double* __restrict__ block_sq) {
  const int64_t col = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  double sm = 0.0, sv = 0.0;
  if (col < F) {
    A mean, m2;
    merge_segments(part_mean, part_m2, col, F, N, seg, mean, m2);
    mean += shift[col];
    const A dm = mean - mu[col], dv = m2 / A(N) - var[col];
    bmean[col] = mean;
    dmean[col] = dm;
    dvar[col] = dv;
    sm = double(dm) * double(dm);
    sv = double(dv) * double(dv);
  }
  sm = block_sum(sm);
  sv = block_sum(sv);
  if (threadIdx.x == 0) {
    block_sq[2 * blockIdx.x] = sm;
    block_sq[2 * blockIdx.x + 1] = sv;
  }
}

// One block: the two norms from the block partials (in index order), the loss, and the factors that
// turn the differences into unit directions (0 for a zero norm).
template <typename A>
__global__ void stat_norms_kernel(const double* __restrict__ block_sq, int n_blocks, A* __restrict__ loss,
                                  A* __restrict__ inv_norms) {
  double sm = 0.0, sv = 0.0;
  for (int k = threadIdx.x; k < n_blocks; k += kThreads) sm += block_sq[2 * k], sv += block_sq[2 * k + 1];
  sm = block_sum(sm);
  sv = block_sum(sv);
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

// grad_x = grad_mean / N + grad_var * 2 (x - mean) / N for x (N, F) contiguous. Grid (column
// blocks, row blocks) with the lanes of col_partial_kernel: a thread keeps the coefficients of its V
// columns in registers and, per round, issues the loads of kBackwardRows rows before their stores.
constexpr int kBackwardRows = 4;

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kThreads)
    batch_mean_var_backward_kernel(const T* __restrict__ x, const A* __restrict__ mean, const A* __restrict__ gm,
                                   const A* __restrict__ gv, T* __restrict__ out, int64_t N, int64_t F, int tx_log2) {
  constexpr int U = kBackwardRows;
  const int TX = 1 << tx_log2, TY = kThreads >> tx_log2;
  const int tx = threadIdx.x & (TX - 1), ty = threadIdx.x >> tx_log2;
  const int64_t col = ((int64_t(blockIdx.x) << tx_log2) + tx) * V;
  if (col >= F) return;  // no block-wide synchronisation below
  const A inv_n = A(1) / A(N), two_inv_n = A(2) / A(N);
  A mu[V], a[V], b[V];
#pragma unroll
  for (int k = 0; k < V; ++k) mu[k] = mean[col + k], a[k] = gm[col + k] * inv_n, b[k] = gv[col + k] * two_inv_n;
  const int64_t step = int64_t(gridDim.y) * TY * U;
  for (int64_t base = int64_t(blockIdx.y) * TY * U; base < N; base += step) {
    A v[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t row = base + u * TY + ty;
      if (row < N) load_row<T, A, V>(x + row * F + col, v[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t row = base + u * TY + ty;
      if (row < N) {
        T o[V];
#pragma unroll
        for (int k = 0; k < V; ++k) o[k] = static_cast<T>(a[k] + b[k] * (v[u][k] - mu[k]));
        store_row<T, V>(out + row * F + col, o);
      }
    }
  }
}

// How the lanes of a block cover the columns of x: V columns per lane (vectorised when x's rows
// allow 16-byte accesses), TX = 2^tx_log2 lanes (the fewest powers of two that cover F, at most 32).
struct ColumnLanes {
  int vec;
  int tx_log2;
  int64_t blocks_x;
};

template <typename T>
ColumnLanes column_lanes(const T* x, int64_t ld, int64_t F) {
  constexpr int V = vec_width<T>();
  const bool aligned = reinterpret_cast<uintptr_t>(x) % kVecBytes == 0 && ld % V == 0 && F % V == 0;
  const int vec = aligned ? V : 1;
  const int64_t lanes = ceil_div(F, vec);
  int tx_log2 = 0;
  while (tx_log2 < 5 && (int64_t(1) << tx_log2) < lanes) ++tx_log2;
  return {vec, tx_log2, std::max<int64_t>(1, ceil_div(lanes, int64_t(1) << tx_log2))};
}

}  // namespace

Segments column_segments(int64_t N, int64_t F, int64_t elem_size) {
  // Column blocks of fully vectorised lanes (the split depends on the shape and dtype only).
  const int64_t blocks_x = std::max<int64_t>(1, ceil_div(F, 32 * (kVecBytes / elem_size)));
  // Split the rows until the grid holds about 2048 blocks (15 per SM of an H100/H200: several
  // waves, so the last one is short), keeping >= 256 rows per segment.
  constexpr int64_t kTargetBlocks = 2048, kMinSegmentRows = 256;
  int64_t S = std::clamp<int64_t>(kTargetBlocks / blocks_x, 1, std::max<int64_t>(1, N / kMinSegmentRows));
  S = std::max<int64_t>(S, ceil_div(N, int64_t(1) << 24));  // row counts stay exact in fp32
  const int64_t seg_len = std::max<int64_t>(1, ceil_div(N, S));
  return {seg_len, static_cast<int>(ceil_div(N, seg_len))};
}

int column_blocks(int64_t F) { return static_cast<int>(std::max<int64_t>(1, ceil_div(F, kThreads))); }

template <typename T, typename A>
void column_partials(const T* x, int64_t ld, int64_t N, int64_t F, Segments seg, A* part_mean, A* part_m2,
                     A* shift) {
  const ColumnLanes lanes = column_lanes(x, ld, F);
  const dim3 grid(static_cast<unsigned>(lanes.blocks_x), static_cast<unsigned>(seg.count));
  if (lanes.vec > 1) {
    col_partial_kernel<T, A, vec_width<T>()>
        <<<grid, kThreads, 0, stream()>>>(x, ld, N, F, seg.seg_len, lanes.tx_log2, part_mean, part_m2, shift);
  } else {
    col_partial_kernel<T, A, 1>
        <<<grid, kThreads, 0, stream()>>>(x, ld, N, F, seg.seg_len, lanes.tx_log2, part_mean, part_m2, shift);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename A>
void batch_mean_var_finish(const A* part_mean, const A* part_m2, const A* shift, int64_t N, int64_t F, Segments seg,
                           A* mean, A* var) {
  batch_mean_var_kernel<A>
      <<<column_blocks(F), kThreads, 0, stream()>>>(part_mean, part_m2, shift, F, N, seg, mean, var);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename A>
void welford_update_finish(const A* part_mean, const A* part_m2, const A* shift, int64_t N, int64_t F, Segments seg,
                           const A* state_mean, const A* state_m2, int64_t count, A* out_mean, A* out_m2) {
  const double n = double(count + N);
  welford_merge_kernel<A><<<column_blocks(F), kThreads, 0, stream()>>>(
      part_mean, part_m2, shift, F, N, seg, state_mean, state_m2, count == 0, A(double(N) / n),
      A(double(count) * double(N) / n), out_mean, out_m2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename A>
void stat_matching_finish(const A* part_mean, const A* part_m2, const A* shift, int64_t N, int64_t F, Segments seg,
                          const A* mu, const A* var, A* bmean, A* g_mean, A* g_var, double* block_sq, A* inv_norms,
                          A* loss) {
  const int blocks = column_blocks(F);
  stat_diff_kernel<A><<<blocks, kThreads, 0, stream()>>>(part_mean, part_m2, shift, F, N, seg, mu, var, bmean,
                                                          g_mean, g_var, block_sq);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  stat_norms_kernel<A><<<1, kThreads, 0, stream()>>>(block_sq, blocks, loss, inv_norms);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  stat_scale_kernel<A><<<blocks, kThreads, 0, stream()>>>(g_mean, g_var, inv_norms, F);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void batch_mean_var_backward(const T* x, const acc_t<T>* mean, const acc_t<T>* grad_mean,
                             const acc_t<T>* grad_var, T* out, int64_t N, int64_t F) {
  // out is fresh (aligned); x decides whether 16-byte accesses are possible.
  const ColumnLanes lanes = column_lanes(x, F, F);
  const int64_t rows_per_block = int64_t(kThreads >> lanes.tx_log2) * kBackwardRows;
  // About 4096 blocks in all (each thread loops over the rest of its rows).
  const int64_t blocks_y = std::clamp<int64_t>(4096 / lanes.blocks_x, 1, ceil_div(N, rows_per_block));
  const dim3 grid(static_cast<unsigned>(lanes.blocks_x), grid_y(blocks_y));
  using A = acc_t<T>;
  if (lanes.vec > 1) {
    batch_mean_var_backward_kernel<T, A, vec_width<T>()>
        <<<grid, kThreads, 0, stream()>>>(x, mean, grad_mean, grad_var, out, N, F, lanes.tx_log2);
  } else {
    batch_mean_var_backward_kernel<T, A, 1>
        <<<grid, kThreads, 0, stream()>>>(x, mean, grad_mean, grad_var, out, N, F, lanes.tx_log2);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// x's dtype T with either state/accumulation dtype (batch_mean_var uses A = acc_t<T>).
#define INVCOSS_INSTANTIATE(T)                                                                               \
  template void column_partials<T, float>(const T*, int64_t, int64_t, int64_t, Segments, float*, float*,     \
                                          float*);                                                          \
  template void column_partials<T, double>(const T*, int64_t, int64_t, int64_t, Segments, double*, double*,  \
                                           double*);                                                        \
  template void batch_mean_var_backward<T>(const T*, const acc_t<T>*, const acc_t<T>*, const acc_t<T>*, T*,  \
                                           int64_t, int64_t);
INVCOSS_FOR_FLOATING_TYPES(INVCOSS_INSTANTIATE)
#undef INVCOSS_INSTANTIATE

#define INVCOSS_INSTANTIATE_ACC(A)                                                                             \
  template void batch_mean_var_finish<A>(const A*, const A*, const A*, int64_t, int64_t, Segments, A*, A*);     \
  template void welford_update_finish<A>(const A*, const A*, const A*, int64_t, int64_t, Segments, const A*,   \
                                         const A*, int64_t, A*, A*);                                           \
  template void stat_matching_finish<A>(const A*, const A*, const A*, int64_t, int64_t, Segments, const A*,     \
                                        const A*, A*, A*, A*, double*, A*, A*);
INVCOSS_INSTANTIATE_ACC(float)
INVCOSS_INSTANTIATE_ACC(double)
#undef INVCOSS_INSTANTIATE_ACC

}  // namespace invcoss::cuda
