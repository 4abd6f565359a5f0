// Raw-pointer launchers of the CUDA kernels in *_cuda.cu, called by cuda_api.cpp.
//
// This header is the boundary between the two halves of the CUDA build: the .cu files hold the
// kernels and include no ATen tensor headers (nvcc parses every header once per GPU architecture,
// so this keeps the build within minutes), while cuda_api.cpp, compiled by the host compiler,
// checks arguments, allocates outputs and scratch, dispatches on dtypes and registers the ops.
// Every launcher runs on the current CUDA stream of the current device and checks the launch.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace invcoss::cuda {

template <typename T>
using acc_t = at::opmath_type<T>;  // fp32, or fp64 for fp64

// ---- total variation (tv_cuda.cu) ----
// x: (B, C, D, H, W) contiguous (D = 1 and w_d = 0 for images), H and W below 2^31. tv_forward's
// scratch `partial` holds B * tv_partials(x, C, D, H, W) values (the count depends on the shape and
// on whether x allows 16-byte loads). tv_backward writes grad (x's shape, contiguous) =
// grad_sums[b] * d(sums[b])/dx.
template <typename T>
int64_t tv_partials(const T* x, int64_t C, int64_t D, int64_t H, int64_t W);
template <typename T>
void tv_forward(const T* x, acc_t<T>* partial, acc_t<T>* sums, int64_t B, int64_t C, int64_t D, int64_t H, int64_t W,
                double w_w, double w_h, double w_d);
template <typename T>
void tv_backward(const T* x, const acc_t<T>* grad_sums, T* grad, int64_t B, int64_t C, int64_t D, int64_t H,
                 int64_t W, double w_w, double w_h, double w_d);

// ---- out[r] = scale[r] * g[r] for g (rows, inner) (scale_rows_cuda.cu) ----
template <typename T>
void scale_rows(const T* g, const acc_t<T>* scale, T* out, int64_t rows, int64_t inner);

// ---- column statistics of x (N, F) (stats_cuda.cu) ----
// Rows are cut into `count` segments of seg_len rows, chosen from the shape and the element size
// alone; the staging buffers part_mean / part_m2 hold count * F values.
struct Segments {
  int64_t seg_len;
  int count;
};
Segments column_segments(int64_t N, int64_t F, int64_t elem_size);
// Blocks of the per-column passes; stat_matching's scratch block_sq holds 2 * column_blocks(F).
int column_blocks(int64_t F);
// The segments' (mean, m2) relative to a per-column shift (x's row 0, written to shift (F,)): the
// finishing passes take the same shift and add it back.
template <typename T, typename A>
void column_partials(const T* x, int64_t ld, int64_t N, int64_t F, Segments seg, A* part_mean, A* part_m2,
                     A* shift);
template <typename A>
void batch_mean_var_finish(const A* part_mean, const A* part_m2, const A* shift, int64_t N, int64_t F, Segments seg,
                           A* mean, A* var);
template <typename A>
void welford_update_finish(const A* part_mean, const A* part_m2, const A* shift, int64_t N, int64_t F, Segments seg,
                           const A* state_mean, const A* state_m2, int64_t count, A* out_mean, A* out_m2);
// loss, batch mean and the unit directions g_mean, g_var of the two norms (zero for a zero norm);
// inv_norms: scratch of 2 values.
template <typename A>
void stat_matching_finish(const A* part_mean, const A* part_m2, const A* shift, int64_t N, int64_t F, Segments seg,
                          const A* mu, const A* var, A* bmean, A* g_mean, A* g_var, double* block_sq, A* inv_norms,
                          A* loss);
template <typename T>
void batch_mean_var_backward(const T* x, const acc_t<T>* mean, const acc_t<T>* grad_mean,
                             const acc_t<T>* grad_var, T* out, int64_t N, int64_t F);

// ---- repulsive loss (repulsive_cuda.cu) ----
// out = in / max(|in|, eps) per row; norm and proj (|in| >= eps) written when not null.
template <typename T>
void normalise_rows(const T* in, acc_t<T>* out, int64_t rows, int64_t D, double eps, acc_t<T>* norm,
                    acc_t<T>* proj);
// q_i = y_i . hh_i, loss = c * sum_i q_i, grad_i = 2c / norm_i (y_i - proj_i q_i hh_i) when grad != null;
// q: scratch of B values.
template <typename T>
void repulsive_epilogue(const acc_t<T>* y, const acc_t<T>* hh, const acc_t<T>* norm, const acc_t<T>* proj,
                        int64_t B, int64_t D, double c, acc_t<T>* q, T* grad, acc_t<T>* loss);
// out_r = 1 / max(|x_r|, eps) for `rows` rows of D values, rows ldx apart (unit column stride).
template <typename T>
void row_inv_norms(const T* x, int64_t ldx, int64_t rows, int64_t D, double eps, acc_t<T>* out);
// One pool tile of raw dots s (B, cols), rows lds apart: c_ij = s_ij / norm_i * inv_j; q_out_i = sum_j c_ij^2.
// With u != null, u_ij = c_ij inv_j (the weights of the raw pool rows in Y = C P^) in M: for a 16-bit
// M as hi (rows 0..B-1) plus lo (rows B..2B-1) = the rounding error of hi, so that the bf16/fp16
// matmul of [hi; lo] keeps ~16 significant bits of u; for M = A the values (rows 0..B-1). |u_ij| <= 1 / |p_j|:
// for fp16 that needs pool rows of norm above 2^-16 (RepulsivePool's rows have norm 1).
template <typename A, typename M>
void cosine_tile(const A* s, int64_t lds, const A* norm, const A* inv, int64_t B, int64_t cols, A* q_out, M* u,
                 int64_t ldu);
// loss = c * sum of n values, added in index order (one block, fp64).
template <typename A>
void sum_scaled(const A* v, int64_t n, double c, A* loss);

}  // namespace invcoss::cuda
