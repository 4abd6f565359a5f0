// Total variation (Eq. 8) on CPU: the per-sample anisotropic L1 sums and their gradient in one pass.
//
// x is viewed as planes (B*C*D of them, D = 1 for 2-D input) of H rows of W values. One pass reads
// each value once from memory (its neighbours along H and D sit in L1/L2: a plane of 192x192 fp32
// is 147 KB) and, when x requires grad, writes d(sum)/dx once; backward then only scales that
// gradient by the incoming per-sample gradient (scale_rows). A missing neighbour at a border is
// replaced by the value itself, so its difference is 0 and contributes nothing, without branches in
// the inner loop.
//
// Determinism: the sum is cut into chunks of kTvRowsPerChunk rows of one plane, each chunk sums in
// its own slot (rows in the accumulation type, the chunk in fp64), and the chunks of a sample are
// added in index order, so the result does not depend on the number of OpenMP threads.
#include <algorithm>
#include <cmath>
#include <vector>

#include "invcoss.h"
#include "simd.h"

namespace invcoss {
namespace {

constexpr int64_t kLanes = 16;  // interior values per vectorised step (two AVX registers of fp32)

struct TvWeights {
  double w, h, d;  // factors of the W, H and D axes
};

// One value c with its neighbours (left/right along W, up/down along H, front/back along D): its
// three forward differences enter the sum, and its gradient is, over the axes,
// weight * (sign(c - previous) - sign(next - c)). Two value-returning functions (rather than one
// with an output argument) keep the loop below vectorisable; the compiler shares the differences.
template <typename A, bool kDepth>
inline A tv_sum_point(A c, A right, A down, A back, A ww, A wh, A wd) {
  A s = ww * std::abs(right - c) + wh * std::abs(down - c);
  if constexpr (kDepth) s += wd * std::abs(back - c);
  return s;
}

template <typename A, bool kDepth>
inline A tv_grad_point(A c, A left, A right, A up, A down, A front, A back, A ww, A wh, A wd) {
  A g = ww * (sign_of(c - left) - sign_of(right - c)) + wh * (sign_of(c - up) - sign_of(down - c));
  if constexpr (kDepth) g += wd * (sign_of(c - front) - sign_of(back - c));
  return g;
}

// Rows [h0, h1) of one plane. prev/next are the planes before and behind it (the plane itself at
// the ends of the depth axis). Returns the weighted sum of the rows' differences.
template <typename T, bool kDepth, bool kGrad>
INVCOSS_CLONES double tv_rows(const T* INVCOSS_RESTRICT plane, const T* INVCOSS_RESTRICT prev,
                              const T* INVCOSS_RESTRICT next, T* INVCOSS_RESTRICT gplane, int64_t H, int64_t W,
                              int64_t h0, int64_t h1, TvWeights wt) {
  using A = at::opmath_type<T>;
  const A ww = A(wt.w), wh = A(wt.h), wd = A(wt.d);
  double total = 0.0;
  for (int64_t h = h0; h < h1; ++h) {
    const T* r = plane + h * W;
    const T* u = h > 0 ? r - W : r;
    const T* dn = h + 1 < H ? r + W : r;
    const T* f = prev + h * W;
    const T* b = next + h * W;
    T* gr = kGrad ? gplane + h * W : nullptr;
    // w = 0 has no left neighbour, w = W - 1 no right one (one value is both when W == 1).
    const int64_t last = W - 1;
    A row = tv_sum_point<A, kDepth>(A(r[0]), A(r[std::min<int64_t>(1, last)]), A(dn[0]), A(b[0]), ww, wh, wd);
    if constexpr (kGrad) {
      gr[0] = T(tv_grad_point<A, kDepth>(A(r[0]), A(r[0]), A(r[std::min<int64_t>(1, last)]), A(u[0]), A(dn[0]),
                                          A(f[0]), A(b[0]), ww, wh, wd));
    }
    // The interior in groups of kLanes values with one accumulator per lane (an explicit lane
    // array, not an OpenMP reduction, which GCC fails to vectorise for some of these loops).
    A lanes[kLanes] = {};
    int64_t w0 = 1;
    for (; w0 + kLanes <= last; w0 += kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const int64_t w = w0 + j;
        lanes[j] += tv_sum_point<A, kDepth>(A(r[w]), A(r[w + 1]), A(dn[w]), A(b[w]), ww, wh, wd);
        if constexpr (kGrad) {
          gr[w] = T(tv_grad_point<A, kDepth>(A(r[w]), A(r[w - 1]), A(r[w + 1]), A(u[w]), A(dn[w]), A(f[w]),
                                              A(b[w]), ww, wh, wd));
        }
      }
    }
    for (int64_t w = w0; w < last; ++w) {
      lanes[0] += tv_sum_point<A, kDepth>(A(r[w]), A(r[w + 1]), A(dn[w]), A(b[w]), ww, wh, wd);
      if constexpr (kGrad) {
        gr[w] = T(tv_grad_point<A, kDepth>(A(r[w]), A(r[w - 1]), A(r[w + 1]), A(u[w]), A(dn[w]), A(f[w]), A(b[w]),
                                            ww, wh, wd));
      }
    }
    for (int64_t j = 0; j < kLanes; ++j) row += lanes[j];
    if (last > 0) {
      row += tv_sum_point<A, kDepth>(A(r[last]), A(r[last]), A(dn[last]), A(b[last]), ww, wh, wd);
      if constexpr (kGrad) {
        gr[last] = T(tv_grad_point<A, kDepth>(A(r[last]), A(r[last - 1]), A(r[last]), A(u[last]), A(dn[last]),
                                               A(f[last]), A(b[last]), ww, wh, wd));
      }
    }
    total += double(row);
  }
  return total;
}

template <typename T, bool kDepth, bool kGrad>
void tv_kernel(const at::Tensor& x, at::Tensor& sums, at::Tensor& grad, TvWeights wt) {
  using A = at::opmath_type<T>;
  const int64_t B = x.size(0), C = x.size(1);
  const int64_t D = kDepth ? x.size(2) : 1, H = x.size(-2), W = x.size(-1);
  const int64_t HW = H * W;
  const int64_t row_blocks = (H + kTvRowsPerChunk - 1) / kTvRowsPerChunk;
  const int64_t planes = B * C * D;
  const int64_t n_chunks = planes * row_blocks;
  std::vector<double> partial(static_cast<size_t>(n_chunks));
  const T* xp = x.const_data_ptr<T>();
  T* gp = kGrad ? grad.mutable_data_ptr<T>() : nullptr;
  const int nt = cpu_threads(x.numel());
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t ci = 0; ci < n_chunks; ++ci) {
    const int64_t p = ci / row_blocks;
    const int64_t h0 = (ci % row_blocks) * kTvRowsPerChunk;
    const int64_t h1 = std::min(H, h0 + kTvRowsPerChunk);
    const int64_t d = p % D;
    const T* plane = xp + p * HW;
    const T* prev = d > 0 ? plane - HW : plane;
    const T* next = d + 1 < D ? plane + HW : plane;
    partial[ci] = tv_rows<T, kDepth, kGrad>(plane, prev, next, kGrad ? gp + p * HW : nullptr, H, W, h0, h1, wt);
  }
  // Fixed-order combine: a sample's chunks are contiguous.
  A* out = sums.mutable_data_ptr<A>();
  const int64_t per_sample = C * D * row_blocks;
  for (int64_t b = 0; b < B; ++b) {
    double t = 0.0;
    for (int64_t k = 0; k < per_sample; ++k) t += partial[b * per_sample + k];
    out[b] = A(t);
  }
}

template <typename T>
void tv_dispatch(const at::Tensor& x, at::Tensor& sums, at::Tensor& grad, TvWeights wt, bool depth, bool with_grad) {
  if (depth) {
    with_grad ? tv_kernel<T, true, true>(x, sums, grad, wt) : tv_kernel<T, true, false>(x, sums, grad, wt);
  } else {
    with_grad ? tv_kernel<T, false, true>(x, sums, grad, wt) : tv_kernel<T, false, false>(x, sums, grad, wt);
  }
}

}  // namespace

void check_tv_args(const at::Tensor& x, at::ArrayRef<double> weights) {
  check_floating("tv", "x", x);
  TORCH_CHECK(x.dim() == 4 || x.dim() == 5, "tv: expected x of shape (B, C, H, W) or (B, C, D, H, W), got ",
              x.sizes());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == x.dim() - 2, "tv: expected one weight per spatial axis (",
              x.dim() - 2, "), got ", weights.size());
}

std::tuple<at::Tensor, at::Tensor> tv_cpu(const at::Tensor& x_in, at::ArrayRef<double> weights, bool with_grad) {
  check_tv_args(x_in, weights);
  check_device("tv", "x", x_in, at::kCPU);
  const at::Tensor x = x_in.contiguous();
  const bool depth = x.dim() == 5;
  const TvWeights wt{weights.back(), weights[weights.size() - 2], depth ? weights[0] : 0.0};
  at::Tensor sums = at::empty({x.size(0)}, x.options().dtype(acc_dtype(x)));
  at::Tensor grad = with_grad ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  if (x.numel() == 0) {
    sums.zero_();
    return {sums, grad};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tv_cpu",
                                  [&] { tv_dispatch<scalar_t>(x, sums, grad, wt, depth, with_grad); });
  return {sums, grad};
}

}  // namespace invcoss
