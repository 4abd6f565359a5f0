// Total variation (Eq. 8) on CUDA: the per-sample sums (forward: x read once, one partial per block,
// then a deterministic second pass) and the gradient times the incoming per-sample gradient
// (backward: x read once more, grad written once). Nothing of x's size is kept between the two.
//
// Geometry (both kernels): x (B, C, D, H, W) contiguous, seen as B * C * D planes of H rows. A block
// of kThreads threads owns a tile of rows of one plane: `lanes` threads side by side along W, each
// owning VEC contiguous values of a column strip (VEC = 16 bytes of T: float4, 8 x bf16/fp16,
// double2; VEC = 1 when W is not a multiple of it or x is not 16-byte aligned), and `rows_par`
// threads stacked along H, each walking kRows consecutive rows (the row below becomes the current
// one, so a row is loaded once per thread). grid = (row tiles, C * D, B) (the y and z extents are
// capped at 65535 and looped over). Indices come from the grid and one division of threadIdx.x by
// `lanes` per thread: no per-element division or divmod. Neighbours: the row below and above
// (vector loads that the thread or its neighbours also load: L1/L2), the planes in front and behind
// (vector loads, L2 when neighbouring planes run close in time), and the one value right (left) of
// the strip (a scalar load from L1). Accumulation in fp32 (fp64 for fp64 input), VEC independent
// accumulators per thread.
//
// tv_sum_kernel writes the block's sum to partial[b, p * tiles + tile]; tv_finalize_kernel adds a
// sample's partials in index order: the same bits on every run, no atomics. tv_grad_kernel writes
// grad = grad_sums[b] * d(sums[b])/dx with the weights pre-multiplied by grad_sums[b].
#include "cuda_reduce.cuh"

namespace invcoss::cuda {
namespace {

constexpr int kRows = 4;  // consecutive rows per thread

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename A, typename T, int VEC>
__device__ __forceinline__ void load_pack(A (&out)[VEC], const T* p) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = static_cast<A>(pk.v[j]);
}

template <typename A, int VEC>
__device__ __forceinline__ void copy_pack(A (&dst)[VEC], const A (&src)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) dst[j] = src[j];
}

// 32-bit extents besides B (the launcher checks them): a 64-bit division or modulo is a
// subroutine call, around which ptxas spills.
struct TvGeometry {
  int64_t B;
  int P, D, H, W;  // P = C * D planes per sample
  int lanes, rows_par, tiles;
};

template <typename T, typename A, int VEC, bool kDepth>
__global__ void __launch_bounds__(kThreads) tv_sum_kernel(const T* __restrict__ x, A* __restrict__ partial,
                                                          TvGeometry g, A ww, A wh, A wd) {
  const int tx = static_cast<int>(threadIdx.x) % g.lanes, ty = static_cast<int>(threadIdx.x) / g.lanes;
  const int W = g.W, H = g.H;
  const int nvec = W / VEC;
  const int64_t HW = int64_t(H) * W;
  const int h_first = static_cast<int>(blockIdx.x) * g.rows_par * kRows + ty * kRows;
  for (int64_t b = blockIdx.z; b < g.B; b += gridDim.z) {
    for (int p = blockIdx.y; p < g.P; p += gridDim.y) {
      const int64_t bp = b * g.P + p;
      const T* plane = x + bp * HW;
      const bool has_back = kDepth && (p % g.D) + 1 < g.D;  // one modulo per block and plane
      A acc[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] = A(0);
      if (ty < g.rows_par && h_first < H) {
        const int h_last = min(h_first + kRows, H);
        for (int cv = tx; cv < nvec; cv += g.lanes) {
          const int w = cv * VEC;
          const T* row = plane + static_cast<int64_t>(h_first) * W + w;
          A cur[VEC];
          load_pack<A, T, VEC>(cur, row);
#pragma unroll
          for (int k = 0; k < kRows; ++k) {
            const int h = h_first + k;
            if (h < h_last) {
              A down[VEC], back[VEC];
              if (h + 1 < H) {
                load_pack<A, T, VEC>(down, row + W);
              } else {
                copy_pack<A, VEC>(down, cur);
              }
              if (has_back) {
                load_pack<A, T, VEC>(back, row + HW);
              } else {
                copy_pack<A, VEC>(back, cur);
              }
              const A right_end = w + VEC < W ? static_cast<A>(row[VEC]) : cur[VEC - 1];
#pragma unroll
              for (int j = 0; j < VEC; ++j) {
                const A right = j + 1 < VEC ? cur[j + 1 < VEC ? j + 1 : j] : right_end;
                acc[j] += ww * abs_of(right - cur[j]) + wh * abs_of(down[j] - cur[j]);
                if constexpr (kDepth) acc[j] += wd * abs_of(back[j] - cur[j]);
              }
              copy_pack<A, VEC>(cur, down);
              row += W;
            }
          }
        }
      }
      A s = acc[0];
#pragma unroll
      for (int j = 1; j < VEC; ++j) s += acc[j];
      s = block_sum(s);
      if (threadIdx.x == 0) partial[bp * g.tiles + blockIdx.x] = s;
    }
  }
}

// At least four blocks per SM (64 registers a thread): without the bound ptxas for sm_80 spilled
// 8 bytes in the scalar 3-D variant at 48 registers; with it every variant fits without spills.
template <typename T, typename A, int VEC, bool kDepth>
__global__ void __launch_bounds__(kThreads, 4)
    tv_grad_kernel(const T* __restrict__ x, const A* __restrict__ grad_sums, T* __restrict__ grad, TvGeometry g,
                   A ww, A wh, A wd) {
  const int tx = static_cast<int>(threadIdx.x) % g.lanes, ty = static_cast<int>(threadIdx.x) / g.lanes;
  if (ty >= g.rows_par) return;  // no block-wide step below
  const int W = g.W, H = g.H;
  const int nvec = W / VEC;
  const int64_t HW = int64_t(H) * W;
  const int h_first = static_cast<int>(blockIdx.x) * g.rows_par * kRows + ty * kRows;
  if (h_first >= H) return;
  const int h_last = min(h_first + kRows, H);
  for (int64_t b = blockIdx.z; b < g.B; b += gridDim.z) {
    for (int p = blockIdx.y; p < g.P; p += gridDim.y) {
      const int64_t off = (b * g.P + p) * HW + static_cast<int64_t>(h_first) * W;
      const A s = grad_sums[b];
      const A sw = s * ww, sh = s * wh, sd = s * wd;
      const int d = kDepth ? p % g.D : 0;  // one modulo per block and plane
      const bool has_front = kDepth && d > 0, has_back = kDepth && d + 1 < g.D;
      for (int cv = tx; cv < nvec; cv += g.lanes) {
        const int w = cv * VEC;
        const T* row = x + off + w;
        T* grow = grad + off + w;
        A cur[VEC], up[VEC];
        load_pack<A, T, VEC>(cur, row);
        if (h_first > 0) {
          load_pack<A, T, VEC>(up, row - W);
        } else {
          copy_pack<A, VEC>(up, cur);
        }
#pragma unroll
        for (int k = 0; k < kRows; ++k) {
          const int h = h_first + k;
          if (h < h_last) {
            A down[VEC], back[VEC], front[VEC];
            if (h + 1 < H) {
              load_pack<A, T, VEC>(down, row + W);
            } else {
              copy_pack<A, VEC>(down, cur);
            }
            if (has_back) {
              load_pack<A, T, VEC>(back, row + HW);
            } else {
              copy_pack<A, VEC>(back, cur);
            }
            if (has_front) {
              load_pack<A, T, VEC>(front, row - HW);
            } else {
              copy_pack<A, VEC>(front, cur);
            }
            const A right_end = w + VEC < W ? static_cast<A>(row[VEC]) : cur[VEC - 1];
            const A left_end = w > 0 ? static_cast<A>(row[-1]) : cur[0];
            Pack<T, VEC> out;
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              const A c = cur[j];
              const A right = j + 1 < VEC ? cur[j + 1 < VEC ? j + 1 : j] : right_end;
              const A left = j > 0 ? cur[j > 0 ? j - 1 : 0] : left_end;
              A gj = sw * (sign_of(c - left) - sign_of(right - c)) + sh * (sign_of(c - up[j]) - sign_of(down[j] - c));
              if constexpr (kDepth) gj += sd * (sign_of(c - front[j]) - sign_of(back[j] - c));
              out.v[j] = static_cast<T>(gj);
            }
            *reinterpret_cast<Pack<T, VEC>*>(grow) = out;
            copy_pack<A, VEC>(up, cur);
            copy_pack<A, VEC>(cur, down);
            row += W;
            grow += W;
          }
        }
      }
    }
  }
}

// Grid min(B, 65535) blocks; block b adds sample b's n_part partials in index order.
template <typename A>
__global__ void tv_finalize_kernel(const A* __restrict__ partial, A* __restrict__ out, int64_t B, int64_t n_part) {
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    A s = A(0);
    for (int64_t k = threadIdx.x; k < n_part; k += kThreads) s += partial[b * n_part + k];
    s = block_sum(s);
    if (threadIdx.x == 0) out[b] = s;
  }
}

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // values per 16-byte load

// The vector width for x (and grad) at these addresses: 16-byte loads need W a multiple of the
// width (then every row starts aligned) and 16-byte aligned base pointers.
template <typename T>
int vec_width(int64_t W, const void* a, const void* b) {
  const bool aligned = reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0;
  return W % kVec<T> == 0 && aligned ? kVec<T> : 1;
}

TvGeometry geometry(int64_t B, int64_t C, int64_t D, int64_t H, int64_t W, int vec) {
  TvGeometry g{B, static_cast<int>(C * D), static_cast<int>(D), static_cast<int>(H), static_cast<int>(W), 0, 0, 0};
  g.lanes = static_cast<int>(std::min<int64_t>(W / vec, kThreads));
  g.rows_par = kThreads / g.lanes;
  g.tiles = static_cast<int>(ceil_div(H, int64_t(g.rows_par) * kRows));
  return g;
}

dim3 grid_of(const TvGeometry& g) { return dim3(static_cast<unsigned>(g.tiles), grid_y(g.P), grid_y(g.B)); }

template <typename T, int VEC>
void tv_sum_launch(const T* x, acc_t<T>* partial, const TvGeometry& g, double w_w, double w_h, double w_d) {
  using A = acc_t<T>;
  if (g.D > 1) {
    tv_sum_kernel<T, A, VEC, true><<<grid_of(g), kThreads, 0, stream()>>>(x, partial, g, A(w_w), A(w_h), A(w_d));
  } else {
    tv_sum_kernel<T, A, VEC, false><<<grid_of(g), kThreads, 0, stream()>>>(x, partial, g, A(w_w), A(w_h), A(w_d));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void tv_grad_launch(const T* x, const acc_t<T>* grad_sums, T* grad, const TvGeometry& g, double w_w, double w_h,
                    double w_d) {
  using A = acc_t<T>;
  if (g.D > 1) {
    tv_grad_kernel<T, A, VEC, true>
        <<<grid_of(g), kThreads, 0, stream()>>>(x, grad_sums, grad, g, A(w_w), A(w_h), A(w_d));
  } else {
    tv_grad_kernel<T, A, VEC, false>
        <<<grid_of(g), kThreads, 0, stream()>>>(x, grad_sums, grad, g, A(w_w), A(w_h), A(w_d));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename T>
int64_t tv_partials(const T* x, int64_t C, int64_t D, int64_t H, int64_t W) {
  const TvGeometry g = geometry(1, C, D, H, W, vec_width<T>(W, x, x));
  return g.P * g.tiles;
}

template <typename T>
void tv_forward(const T* x, acc_t<T>* partial, acc_t<T>* sums, int64_t B, int64_t C, int64_t D, int64_t H, int64_t W,
                double w_w, double w_h, double w_d) {
  const int vec = vec_width<T>(W, x, x);
  const TvGeometry g = geometry(B, C, D, H, W, vec);
  if (vec == 1) {
    tv_sum_launch<T, 1>(x, partial, g, w_w, w_h, w_d);
  } else {
    tv_sum_launch<T, kVec<T>>(x, partial, g, w_w, w_h, w_d);
  }
  tv_finalize_kernel<acc_t<T>><<<grid_y(B), kThreads, 0, stream()>>>(partial, sums, B, g.P * g.tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void tv_backward(const T* x, const acc_t<T>* grad_sums, T* grad, int64_t B, int64_t C, int64_t D, int64_t H,
                 int64_t W, double w_w, double w_h, double w_d) {
  const int vec = vec_width<T>(W, x, grad);
  const TvGeometry g = geometry(B, C, D, H, W, vec);
  if (vec == 1) {
    tv_grad_launch<T, 1>(x, grad_sums, grad, g, w_w, w_h, w_d);
  } else {
    tv_grad_launch<T, kVec<T>>(x, grad_sums, grad, g, w_w, w_h, w_d);
  }
}

#define INVCOSS_INSTANTIATE(T)                                                                                    \
  template int64_t tv_partials<T>(const T*, int64_t, int64_t, int64_t, int64_t);                                \
  template void tv_forward<T>(const T*, acc_t<T>*, acc_t<T>*, int64_t, int64_t, int64_t, int64_t, int64_t, double, \
                              double, double);                                                                    \
  template void tv_backward<T>(const T*, const acc_t<T>*, T*, int64_t, int64_t, int64_t, int64_t, int64_t, double, \
                               double, double);
INVCOSS_FOR_FLOATING_TYPES(INVCOSS_INSTANTIATE)
#undef INVCOSS_INSTANTIATE

}  // namespace invcoss::cuda
