// Repulsive cosine loss (Eq. 5) on CUDA: the normalisation, cosine-tile and epilogue kernels around
// the cuBLAS matmuls that cuda_api.cpp runs through ATen. Same formulation as repulsive_cpu.cpp (its
// header has the algebra): Y = h^ G, or Y = C P^ over pool tiles with C the cosines from raw dots
// scaled by both rows' inverse norms, then one epilogue computes q_i = y_i . h^_i, the loss and the
// gradient. Every kernel reads and writes its rows 16 bytes at a time along the contiguous axis
// (the vector width V is the last template argument; V = 1 when a row does not start on 16 bytes),
// keeps several vectors in flight per thread with one independent sum per vector lane, and divides
// once per row, never per element. Row reductions add the lanes in a fixed order and then use warp
// shuffles; losses add their partials in index order in a one-block pass, so they are deterministic.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "cuda_reduce.cuh"

namespace invcoss::cuda {
namespace {

// 16-byte accesses: a vector of V values is V * sizeof(T) / 16 loads or stores of 16 bytes
// (float4, 8 x bf16/fp16, 2 x fp64; V = 1 is the scalar fallback for rows that do not start on 16 bytes).
constexpr int kVecBytes = 16;

// V values of T at p (16-byte aligned when V > 1), converted to A.
template <typename T, typename A, int V>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, A (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = static_cast<A>(p[0]);
  } else {
    constexpr int kPer = kVecBytes / int(sizeof(T));
    static_assert(V % kPer == 0, "a vector is whole 16-byte accesses");
#pragma unroll
    for (int c = 0; c < V / kPer; ++c) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + c);
      T vals[kPer];
      memcpy(vals, &raw, kVecBytes);
#pragma unroll
      for (int k = 0; k < kPer; ++k) out[c * kPer + k] = static_cast<A>(vals[k]);
    }
  }
}

// V values of T to p (16-byte aligned when V > 1).
template <typename T, int V>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const T (&vals)[V]) {
  if constexpr (V == 1) {
    p[0] = vals[0];
  } else {
    constexpr int kPer = kVecBytes / int(sizeof(T));
    static_assert(V % kPer == 0, "a vector is whole 16-byte accesses");
#pragma unroll
    for (int c = 0; c < V / kPer; ++c) {
      uint4 raw;
      memcpy(&raw, vals + c * kPer, kVecBytes);
      reinterpret_cast<uint4*>(p)[c] = raw;
    }
  }
}

// Vectors in flight per thread and operand: U vectors of V values of A in at most `bytes` bytes, 1 to 4.
template <typename A, int V, int bytes>
constexpr int vectors_in_flight() {
  return std::max(1, std::min(4, bytes / (V * int(sizeof(A)))));
}

// Grid: one block per row (x up to 2^31 - 1 rows). out = in / max(|in|, eps). A thread handles V
// adjacent values per vector (16-byte loads of in: V = 16 bytes of T), U vectors in flight, V
// independent sums of squares; the D % V values after the last whole vector go to the first threads.
// The second pass reads the row again (L1/L2) and scales it by the reciprocal of the norm.
template <typename T, typename A, int V>
__global__ void normalise_rows_kernel(const T* __restrict__ in, A* __restrict__ out, int64_t D, A eps,
                                      A* __restrict__ norm, A* __restrict__ proj) {
  constexpr int U = vectors_in_flight<A, V, 64>();
  const int64_t row = blockIdx.x;
  const T* x = in + row * D;
  A* o = out + row * D;
  const int64_t nvec = D / V, tail = nvec * V + threadIdx.x;
  A acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k] = A(0);
  for (int64_t v0 = threadIdx.x; v0 < nvec; v0 += U * kThreads) {
    A vals[U][V];
#pragma unroll
    for (int w = 0; w < U; ++w) {
      if (v0 + w * kThreads < nvec) load_vec<T, A, V>(x + (v0 + w * kThreads) * V, vals[w]);
    }
#pragma unroll
    for (int w = 0; w < U; ++w) {
      if (v0 + w * kThreads < nvec) {
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] += vals[w][k] * vals[w][k];
      }
    }
  }
  if (tail < D) {
    const A v = static_cast<A>(x[tail]);
    acc[0] += v * v;
  }
  A ss = acc[0];
#pragma unroll
  for (int k = 1; k < V; ++k) ss += acc[k];
  const A raw = sqrt(block_sum(ss));
  const A n = raw > eps ? raw : eps;
  const A inv = A(1) / n;
  for (int64_t v0 = threadIdx.x; v0 < nvec; v0 += U * kThreads) {
    A vals[U][V];
#pragma unroll
    for (int w = 0; w < U; ++w) {
      if (v0 + w * kThreads < nvec) load_vec<T, A, V>(x + (v0 + w * kThreads) * V, vals[w]);
    }
#pragma unroll
    for (int w = 0; w < U; ++w) {
      if (v0 + w * kThreads < nvec) {
#pragma unroll
        for (int k = 0; k < V; ++k) vals[w][k] *= inv;
        store_vec<A, V>(o + (v0 + w * kThreads) * V, vals[w]);
      }
    }
  }
  if (tail < D) o[tail] = static_cast<A>(x[tail]) * inv;
  if (threadIdx.x == 0 && norm != nullptr) {
    norm[row] = n;
    proj[row] = raw >= eps ? A(1) : A(0);
  }
}

// Grid: one block per row i of h. q_i = y_i . h^_i; grad_i = two_c / n_i (y_i - proj_i q_i h^_i).
// Vectors of V values (16 bytes of the narrower of T and A) as in normalise_rows_kernel: U in
// flight, V independent partial dots, the D % V values after the last whole vector to the first
// threads; the gradient pass reads y_i and h^_i again (L1/L2) and writes grad 16 bytes at a time.
template <typename T, typename A, int V>
__global__ void epilogue_kernel(const A* __restrict__ y, const A* __restrict__ hh, const A* __restrict__ norm,
                                const A* __restrict__ proj, int64_t D, A two_c, A* __restrict__ q_out,
                                T* __restrict__ grad) {
  constexpr int U = vectors_in_flight<A, V, 32>();
  const int64_t row = blockIdx.x;
  const A* yr = y + row * D;
  const A* hr = hh + row * D;
  const int64_t nvec = D / V, tail = nvec * V + threadIdx.x;
  A acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k] = A(0);
  for (int64_t v0 = threadIdx.x; v0 < nvec; v0 += U * kThreads) {
    A yv[U][V], hv[U][V];
#pragma unroll
    for (int w = 0; w < U; ++w) {
      if (v0 + w * kThreads < nvec) {
        load_vec<A, A, V>(yr + (v0 + w * kThreads) * V, yv[w]);
        load_vec<A, A, V>(hr + (v0 + w * kThreads) * V, hv[w]);
      }
    }
#pragma unroll
    for (int w = 0; w < U; ++w) {
      if (v0 + w * kThreads < nvec) {
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] += yv[w][k] * hv[w][k];
      }
    }
  }
  if (tail < D) acc[0] += yr[tail] * hr[tail];
  A q = acc[0];
#pragma unroll
  for (int k = 1; k < V; ++k) q += acc[k];
  q = block_sum(q);
  if (threadIdx.x == 0) q_out[row] = q;
  if (grad == nullptr) return;
  const A s = two_c / norm[row], pq = proj[row] * q;
  T* g = grad + row * D;
  for (int64_t v0 = threadIdx.x; v0 < nvec; v0 += U * kThreads) {
    A yv[U][V], hv[U][V];
#pragma unroll
    for (int w = 0; w < U; ++w) {
      if (v0 + w * kThreads < nvec) {
        load_vec<A, A, V>(yr + (v0 + w * kThreads) * V, yv[w]);
        load_vec<A, A, V>(hr + (v0 + w * kThreads) * V, hv[w]);
      }
    }
#pragma unroll
    for (int w = 0; w < U; ++w) {
      if (v0 + w * kThreads < nvec) {
        T out[V];
#pragma unroll
        for (int k = 0; k < V; ++k) out[k] = static_cast<T>(s * (yv[w][k] - pq * hv[w][k]));
        store_vec<T, V>(g + (v0 + w * kThreads) * V, out);
      }
    }
  }
  if (tail < D) g[tail] = static_cast<T>(s * (yr[tail] - pq * hr[tail]));
}

// One block: loss = c * sum_i q_i, the rows added in index order in fp64.
template <typename A>
__global__ void loss_kernel(const A* __restrict__ q, int64_t B, double c, A* __restrict__ loss) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < B; i += kThreads) s += double(q[i]);
  s = block_sum(s);
  if (threadIdx.x == 0) *loss = A(s * c);
}

// Grid: one warp per row (kWarps rows per block). out_r = 1 / max(|x_r|, eps). A lane reads V
// values per 16-byte load and issues up to U loads before it adds their squares into V independent
// sums; the D % V values after the last whole vector go to the first lanes. The lane sums are added
// in a fixed order, then over the warp in a fixed shuffle tree: the same bits on every run.
template <typename T, typename A, int V>
__global__ void inv_norm_kernel(const T* __restrict__ x, int64_t ldx, int64_t rows, int64_t D, A eps,
                                A* __restrict__ out) {
  constexpr int U = vectors_in_flight<A, V, 128>();
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps leave: the shuffles below involve one row's warp only
  const T* r = x + row * ldx;
  const int64_t nvec = D / V;
  A acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k] = A(0);
  for (int64_t v0 = lane; v0 < nvec; v0 += U * 32) {
    A vals[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (v0 + u * 32 < nvec) load_vec<T, A, V>(r + (v0 + u * 32) * V, vals[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (v0 + u * 32 < nvec) {
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] += vals[u][k] * vals[u][k];
      }
    }
  }
  const int64_t tail = nvec * V + lane;
  if (tail < D) {
    const A v = static_cast<A>(r[tail]);
    acc[0] += v * v;
  }
  A ss = acc[0];
#pragma unroll
  for (int k = 1; k < V; ++k) ss += acc[k];
  const A n = sqrt(warp_sum(ss));  // lane 0 holds the row's sum
  if (lane == 0) out[row] = A(1) / (n > eps ? n : eps);
}

// Grid: one block per row i of the tile; see cosine_tile in cuda_launch.h. A thread handles V
// adjacent columns per vector (16-byte loads of s and inv, 16-byte stores of u: V = 16 bytes of the
// narrower of A and M), U vectors in flight, V independent sums of squares; the cols % V columns
// after the last whole vector go to the first threads. The sums are added in a fixed order and
// then over the block (block_sum): the same bits on every run.
template <typename A, typename M, int V>
__global__ void cosine_tile_kernel(const A* __restrict__ s, int64_t lds, const A* __restrict__ norm,
                                   const A* __restrict__ inv, int64_t B, int64_t cols, A* __restrict__ q_out,
                                   M* __restrict__ u, int64_t ldu) {
  constexpr bool kSplit = !std::is_same_v<M, A>;
  constexpr int U = vectors_in_flight<A, V, 64>();
  const int64_t i = blockIdx.x;
  const A* sr = s + i * lds;
  M* u_hi = u == nullptr ? nullptr : u + i * ldu;
  M* u_lo = u == nullptr || !kSplit ? nullptr : u + (i + B) * ldu;
  const A scale = A(1) / norm[i];
  const int64_t nvec = cols / V;
  A acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k] = A(0);
  for (int64_t v0 = threadIdx.x; v0 < nvec; v0 += U * kThreads) {
    A sv[U][V], iv[U][V];
#pragma unroll
    for (int w = 0; w < U; ++w) {
      const int64_t v = v0 + w * kThreads;
      if (v < nvec) {
        load_vec<A, A, V>(sr + v * V, sv[w]);
        load_vec<A, A, V>(inv + v * V, iv[w]);
      }
    }
#pragma unroll
    for (int w = 0; w < U; ++w) {
      const int64_t v = v0 + w * kThreads;
      if (v >= nvec) continue;
      M hi[V], lo[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A c = sv[w][k] * scale * iv[w][k];
        acc[k] += c * c;
        const A wt = c * iv[w][k];
        hi[k] = static_cast<M>(wt);
        if constexpr (kSplit) lo[k] = static_cast<M>(wt - static_cast<A>(hi[k]));
      }
      if (u_hi != nullptr) {
        store_vec<M, V>(u_hi + v * V, hi);
        if constexpr (kSplit) store_vec<M, V>(u_lo + v * V, lo);
      }
    }
  }
  const int64_t j = nvec * V + threadIdx.x;
  if (j < cols) {
    const A c = sr[j] * scale * inv[j];
    acc[0] += c * c;
    if (u_hi != nullptr) {
      const A wt = c * inv[j];
      const M hi = static_cast<M>(wt);
      u_hi[j] = hi;
      if constexpr (kSplit) u_lo[j] = static_cast<M>(wt - static_cast<A>(hi));
    }
  }
  A ss = acc[0];
#pragma unroll
  for (int k = 1; k < V; ++k) ss += acc[k];
  ss = block_sum(ss);
  if (threadIdx.x == 0) q_out[i] = ss;
}

// Whether rows `ld` values of T apart from p all start on 16 bytes (null: no rows to access).
template <typename T>
bool rows_aligned(const T* p, int64_t ld) {
  if (p == nullptr) return true;
  return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0 && (ld * int64_t(sizeof(T))) % kVecBytes == 0;
}

}  // namespace

template <typename T>
void row_inv_norms(const T* x, int64_t ldx, int64_t rows, int64_t D, double eps, acc_t<T>* out) {
  if (rows == 0) return;
  using A = acc_t<T>;
  constexpr int V = kVecBytes / int(sizeof(T));
  const unsigned blocks = static_cast<unsigned>(ceil_div(rows, kWarps));
  if (rows_aligned(x, ldx)) {
    inv_norm_kernel<T, A, V><<<blocks, kThreads, 0, stream()>>>(x, ldx, rows, D, A(eps), out);
  } else {
    inv_norm_kernel<T, A, 1><<<blocks, kThreads, 0, stream()>>>(x, ldx, rows, D, A(eps), out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename A, typename M>
void cosine_tile(const A* s, int64_t lds, const A* norm, const A* inv, int64_t B, int64_t cols, A* q_out, M* u,
                 int64_t ldu) {
  if (B == 0) return;
  constexpr int V = kVecBytes / int(std::min(sizeof(A), sizeof(M)));
  const unsigned blocks = static_cast<unsigned>(B);
  if (rows_aligned(s, lds) && rows_aligned(inv, 0) && rows_aligned(u, ldu)) {
    cosine_tile_kernel<A, M, V><<<blocks, kThreads, 0, stream()>>>(s, lds, norm, inv, B, cols, q_out, u, ldu);
  } else {
    cosine_tile_kernel<A, M, 1><<<blocks, kThreads, 0, stream()>>>(s, lds, norm, inv, B, cols, q_out, u, ldu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename A>
void sum_scaled(const A* v, int64_t n, double c, A* loss) {
  loss_kernel<A><<<1, kThreads, 0, stream()>>>(v, n, c, loss);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void normalise_rows(const T* in, acc_t<T>* out, int64_t rows, int64_t D, double eps, acc_t<T>* norm,
                    acc_t<T>* proj) {
  if (rows == 0) return;
  using A = acc_t<T>;
  constexpr int V = kVecBytes / int(sizeof(T));  // T is never wider than A
  const unsigned blocks = static_cast<unsigned>(rows);
  if (rows_aligned(in, D) && rows_aligned(out, D)) {
    normalise_rows_kernel<T, A, V><<<blocks, kThreads, 0, stream()>>>(in, out, D, A(eps), norm, proj);
  } else {
    normalise_rows_kernel<T, A, 1><<<blocks, kThreads, 0, stream()>>>(in, out, D, A(eps), norm, proj);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void repulsive_epilogue(const acc_t<T>* y, const acc_t<T>* hh, const acc_t<T>* norm, const acc_t<T>* proj,
                        int64_t B, int64_t D, double c, acc_t<T>* q, T* grad, acc_t<T>* loss) {
  using A = acc_t<T>;
  if (B > 0) {
    constexpr int V = kVecBytes / int(sizeof(T));
    const unsigned blocks = static_cast<unsigned>(B);
    if (rows_aligned(y, D) && rows_aligned(hh, D) && rows_aligned(grad, D)) {
      epilogue_kernel<T, A, V><<<blocks, kThreads, 0, stream()>>>(y, hh, norm, proj, D, A(2.0 * c), q, grad);
    } else {
      epilogue_kernel<T, A, 1><<<blocks, kThreads, 0, stream()>>>(y, hh, norm, proj, D, A(2.0 * c), q, grad);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  loss_kernel<A><<<1, kThreads, 0, stream()>>>(q, B, c, loss);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define INVCOSS_INSTANTIATE(T)                                                                                 \
  template void normalise_rows<T>(const T*, acc_t<T>*, int64_t, int64_t, double, acc_t<T>*, acc_t<T>*);       \
  template void repulsive_epilogue<T>(const acc_t<T>*, const acc_t<T>*, const acc_t<T>*, const acc_t<T>*,    \
                                      int64_t, int64_t, double, acc_t<T>*, T*, acc_t<T>*);                    \
  template void row_inv_norms<T>(const T*, int64_t, int64_t, int64_t, double, acc_t<T>*);                     \
  template void cosine_tile<acc_t<T>, T>(const acc_t<T>*, int64_t, const acc_t<T>*, const acc_t<T>*, int64_t, \
                                         int64_t, acc_t<T>*, T*, int64_t);
INVCOSS_FOR_FLOATING_TYPES(INVCOSS_INSTANTIATE)
#undef INVCOSS_INSTANTIATE
template void sum_scaled<float>(const float*, int64_t, double, float*);
template void sum_scaled<double>(const double*, int64_t, double, double*);

}  // namespace invcoss::cuda
