// Shared host-side declarations of the extension invcoss._C: the CPU ops, argument checks, small
// tensor helpers and the CPU threading policy. The op schemas are in ops.cpp; the CPU ops and their
// kernels in <op>_cpu.cpp, registered in cpu_api.cpp; the CUDA ops in cuda_api.cpp (which registers
// them) over the kernels of <op>_cuda.cu (cuda_launch.h).
//
// Accumulation: at::opmath_type<T>, i.e. fp32 for fp16/bf16/fp32 inputs and fp64 for fp64 inputs
// (the backend contract in invcoss/ops/dispatch.py). Reductions are deterministic on both devices:
// work is cut into pieces whose size depends on the shape only, every piece writes its own partial,
// and the partials are combined in a fixed order (never float atomics).
#pragma once

// Per-operator headers instead of <ATen/ATen.h>: a third less compile time per source file.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace invcoss {

// ---- the CPU ops (the schemas of all ops, with their shapes, are in ops.cpp) -------------------------

at::Tensor tv_cpu(const at::Tensor& x, at::ArrayRef<double> weights);
at::Tensor tv_backward_cpu(const at::Tensor& x, at::ArrayRef<double> weights, const at::Tensor& grad_sums);
at::Tensor scale_rows_cpu(const at::Tensor& grad, const at::Tensor& scale);
std::tuple<at::Tensor, at::Tensor> batch_mean_var_cpu(const at::Tensor& x);
at::Tensor batch_mean_var_backward_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& grad_mean,
                                       const at::Tensor& grad_var);
std::tuple<at::Tensor, at::Tensor> welford_update_cpu(const at::Tensor& x, int64_t count, const at::Tensor& mean,
                                                      const at::Tensor& m2);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stat_matching_cpu(const at::Tensor& x,
                                                                             const at::Tensor& mean,
                                                                             const at::Tensor& var);
std::tuple<at::Tensor, at::Tensor> repulsive_direct_cpu(const at::Tensor& h, const at::Tensor& pool, double eps,
                                                        bool with_grad, const std::optional<at::Tensor>& pool_inv_norm);
std::tuple<at::Tensor, at::Tensor> repulsive_gram_cpu(const at::Tensor& h, const at::Tensor& gram, int64_t count,
                                                      double eps, bool with_grad);
// In place gram += alpha * feats^T feats through at::addmm_ (MKL / cuBLAS); registered for both
// dispatch keys.
void gram_update(const at::Tensor& gram, const at::Tensor& feats_hat, double alpha);

// ---- shared helpers -----------------------------------------------------------------------------

// The result dtype of a reduction over `t`: fp32, or fp64 for fp64 inputs.
inline at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_device(const char* op, const char* name, const at::Tensor& t, at::DeviceType dev) {
  TORCH_CHECK(t.device().type() == dev, op, ": expected ", name, " on ", c10::DeviceTypeName(dev),
              ", got a tensor on ", t.device());
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected ", name,
              " of a floating dtype (fp16, bf16, fp32, fp64), got ", t.scalar_type());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* shape) {
  TORCH_CHECK(t.dim() == dim, op, ": expected ", name, " of shape ", shape, ", got ", t.sizes());
}

inline void check_same_device(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), op, ": expected ", b_name, " on the same device as ", a_name, " (",
              a.device(), "), got ", b.device());
}

// Shared argument checks of the ops (defined next to the CPU kernels); the device-specific files
// add only the device check.
void check_tv_args(const char* op, const at::Tensor& x, at::ArrayRef<double> weights);
void check_tv_backward_args(const at::Tensor& x, at::ArrayRef<double> weights, const at::Tensor& grad_sums);
void check_scale_rows_args(const at::Tensor& grad, const at::Tensor& scale);
void check_columns_args(const char* op, const at::Tensor& x);
void check_state_args(const char* op, const at::Tensor& x, const at::Tensor& a, const char* a_name,
                      const at::Tensor& b, const char* b_name);
void check_welford_args(const at::Tensor& x, int64_t count, const at::Tensor& mean, const at::Tensor& m2);
// h (B, D) and either gram (D, D) or pool (P, D) with P >= 1.
void check_repulsive_args(const char* op, const at::Tensor& h, const at::Tensor& other, bool is_gram);
// pool_inv_norm, when given: (P,) floating, on the pool's device.
void check_pool_inv_norm(const char* op, const at::Tensor& pool, const std::optional<at::Tensor>& inv);

// x (N, F) with unit column stride; the row stride may be anything (also 0 for expanded rows).
inline at::Tensor rows_with_unit_stride(const at::Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); }

// t converted to the accumulation type A, contiguous (no copy when it already is both).
template <typename A>
at::Tensor as_acc(const at::Tensor& t) {
  return t.to(c10::CppTypeToScalarType<A>::value).contiguous();
}

// Threads for an OpenMP region over `work` elements: 1 for small work or when already inside a
// parallel region (no nested parallelism), else PyTorch's thread count (torch.set_num_threads sets
// it; torch and this extension share one OpenMP runtime).
inline int cpu_threads(int64_t work) {
  constexpr int64_t kMinWorkPerThread = 1 << 17;  // ~50 us of streaming work
  if (work < 2 * kMinWorkPerThread || at::in_parallel_region()) return 1;
  return at::get_num_threads();
}

// A fresh contiguous tensor of x's sizes and dtype for a CPU backward pass that writes it once while
// reading x: huge pages requested, data half a 4 KB page away from x's (csrc/cpu_alloc.cpp).
at::Tensor empty_streaming_output(const at::Tensor& x);

// Rows per reduction chunk of the CPU TV kernel; columns per tile of the CPU column statistics.
// They fix how reductions are split, independent of the thread count.
constexpr int64_t kTvRowsPerChunk = 16;
constexpr int64_t kColTile = 1024;
constexpr int64_t kColRowBlock = 64;

}  // namespace invcoss
