// Total variation (Eq. 8) on CPU: the per-sample anisotropic L1 sums (forward) and their gradient
// times the incoming per-sample gradient (backward), each in one streaming pass over x.
//
// x is viewed as planes (B*C*D of them, D = 1 for 2-D input) of H rows of W values. Forward reads
// each value once from memory (its neighbours along H and D sit in L1/L2: a plane of 192x192 fp32
// is 147 KB) and writes one partial sum per chunk; nothing of x's size is kept. Backward reads x
// again and writes grad = scale[b] * d(sum_b)/dx once, in x's dtype: the gradient is recomputed from
// the same neighbours instead of being saved by the forward pass, which would add a full-size write
// and read (16 B per fp32 value instead of 12) and a buffer as large as x. A missing neighbour at a
// border is replaced by the value itself, so its difference is 0 and contributes nothing, without
// branches in the inner loop.
//
// Determinism: the sum is cut into chunks of kTvRowsPerChunk rows of one plane, each chunk sums in
// its own slot (rows in the accumulation type, the chunk in fp64), and the chunks of a sample are
// added in index order, so the result does not depend on the number of OpenMP threads. Backward
// has no reduction.
#include <algorithm>
#include <cmath>
#include <vector>

#include "invcoss.h"
#include "simd.h"

namespace invcoss {
namespace {

constexpr int64_t kLanes = 16;  // interior values per vectorised step (two AVX registers of fp32)
constexpr int64_t kPrefetchRows = 8;  // how far ahead the slice behind is prefetched

struct TvWeights {
  double w, h, d;  // factors of the W, H and D axes
};

// One value c with its neighbours (left/right along W, up/down along H, front/back along D): its
// three forward differences enter the sum, and its gradient is, over the axes,
// weight * (sign(c - previous) - sign(next - c)).
template <typename A, bool kDepth>
inline A tv_sum_point(A c, A right, A down, A back, A ww, A wh, A wd) {
  A s = ww * std::abs(right - c) + wh * std::abs(down - c);
  if constexpr (kDepth) s += wd * std::abs(back - c);
  return s;
}

// sign(c - a) + sign(c - b) in {-2, ..., 2} from four compares added as integers: fewer
// instructions than two float signs once vectorised (compare masks, integer adds, one conversion);
// the backward ran 1.3x to 1.6x faster with it.
template <typename A>
inline int32_t sign_sum(A c, A a, A b) {
  return (int32_t(c > a) + int32_t(c > b)) - (int32_t(c < a) + int32_t(c < b));
}

// The gradient at c: over the axes, weight * (sign(c - previous) - sign(next - c)), i.e.
// weight * (sign(c - previous) + sign(c - next)).
template <typename A, bool kDepth>
inline A tv_grad_point(A c, A left, A right, A up, A down, A front, A back, A ww, A wh, A wd) {
  A g = ww * A(sign_sum(c, left, right)) + wh * A(sign_sum(c, up, down));
  if constexpr (kDepth) g += wd * A(sign_sum(c, front, back));
  return g;
}

// The slice behind is the one stream of a 3-D pass that comes from memory a whole plane away from
// the current one; the hardware prefetcher follows it poorly (a 3-D forward pass ran at half the rate
// of a 2-D one over the same bytes, 1.4x slower with this). The rows are fetched into L2, not L1
// (prefetcht1): into L1 they pushed out the current plane's rows (into L2 the forward pass ran 1.25x
// faster, the backward 1.05x, on an AMD EPYC). A prefetch never faults, so the rows past the end of
// x that the last plane asks for are harmless.
template <typename T>
inline void prefetch_row(const T* row, int64_t W) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t k = 0; k < W * int64_t(sizeof(T)); k += 64) __builtin_prefetch(p + k, 0, 2);
}

// Neighbour rows of row h of one plane: prev/next are the planes before and behind it (the plane
// itself at the ends of the depth axis), u/dn the rows above and below (the row itself at the ends).
template <typename T>
struct TvRow {
  const T *r, *u, *dn, *f, *b;
  TvRow(const T* plane, const T* prev, const T* next, int64_t h, int64_t H, int64_t W)
      : r(plane + h * W), u(h > 0 ? r - W : r), dn(h + 1 < H ? r + W : r), f(prev + h * W), b(next + h * W) {}
};

// Forward: the weighted sum of the differences of rows [h0, h1) of one plane.
template <typename T, bool kDepth>
INVCOSS_WIDE_CLONES double tv_sum_rows(const T* INVCOSS_RESTRICT plane, const T* INVCOSS_RESTRICT prev,
                                  const T* INVCOSS_RESTRICT next, int64_t H, int64_t W, int64_t h0, int64_t h1,
                                  TvWeights wt) {
  using A = at::opmath_type<T>;
  const A ww = A(wt.w), wh = A(wt.h), wd = A(wt.d);
  const int64_t last = W - 1;
  // One accumulator per lane for all the rows of the chunk (an explicit lane array, not an OpenMP
  // reduction, which GCC fails to vectorise for some of these loops), reduced once at the end: a
  // reduction per row cost as much as the row itself at W = 192 (a 3-D pass ran at 40% of its
  // cache-resident rate). The last value of a row has no right neighbour: the vector steps cover
  // w < last, the last value is added to `edge`.
  A lanes[kLanes] = {};
  A edge = A(0);
  for (int64_t h = h0; h < h1; ++h) {
    const TvRow<T> n(plane, prev, next, h, H, W);
    const T* INVCOSS_RESTRICT r = n.r;
    const T* INVCOSS_RESTRICT dn = n.dn;
    const T* INVCOSS_RESTRICT b = n.b;
    if constexpr (kDepth) prefetch_row(b + kPrefetchRows * W, W);
    if (last >= kLanes) {
      int64_t w0 = 0;
      for (; w0 + kLanes <= last; w0 += kLanes) {
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) {
          const int64_t w = w0 + j;
          lanes[j] += tv_sum_point<A, kDepth>(A(r[w]), A(r[w + 1]), A(dn[w]), A(b[w]), ww, wh, wd);
        }
      }
      // A short tail is one more step that ends at `last`, overlapping the previous one: the lanes
      // already counted add 0.
      if (w0 < last) {
        const int64_t start = last - kLanes;
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) {
          const int64_t w = start + j;
          const A v = tv_sum_point<A, kDepth>(A(r[w]), A(r[w + 1]), A(dn[w]), A(b[w]), ww, wh, wd);
          lanes[j] += w >= w0 ? v : A(0);
        }
      }
    } else {
      for (int64_t w = 0; w < last; ++w) {
        edge += tv_sum_point<A, kDepth>(A(r[w]), A(r[w + 1]), A(dn[w]), A(b[w]), ww, wh, wd);
      }
    }
    edge += tv_sum_point<A, kDepth>(A(r[last]), A(r[last]), A(dn[last]), A(b[last]), ww, wh, wd);
  }
  double total = double(edge);
  for (int64_t j = 0; j < kLanes; ++j) total += double(lanes[j]);
  return total;
}

// Backward: grad of rows [h0, h1) of one plane, the weights already multiplied by the sample's
// incoming gradient.
template <typename T, bool kDepth>
INVCOSS_WIDE_CLONES void tv_grad_rows(const T* INVCOSS_RESTRICT plane, const T* INVCOSS_RESTRICT prev,
                                 const T* INVCOSS_RESTRICT next, T* INVCOSS_RESTRICT gplane, int64_t H, int64_t W,
                                 int64_t h0, int64_t h1, TvWeights wt) {
  using A = at::opmath_type<T>;
  const A ww = A(wt.w), wh = A(wt.h), wd = A(wt.d);
  const int64_t last = W - 1;
  for (int64_t h = h0; h < h1; ++h) {
    const TvRow<T> n(plane, prev, next, h, H, W);
    const T* INVCOSS_RESTRICT r = n.r;
    const T* INVCOSS_RESTRICT u = n.u;
    const T* INVCOSS_RESTRICT dn = n.dn;
    const T* INVCOSS_RESTRICT f = n.f;
    const T* INVCOSS_RESTRICT b = n.b;
    T* INVCOSS_RESTRICT gr = gplane + h * W;
    if constexpr (kDepth) prefetch_row(b + kPrefetchRows * W, W);
    // w = 0 has no left neighbour, w = W - 1 no right one (one value is both when W == 1).
    gr[0] = T(tv_grad_point<A, kDepth>(A(r[0]), A(r[0]), A(r[std::min<int64_t>(1, last)]), A(u[0]), A(dn[0]),
                                        A(f[0]), A(b[0]), ww, wh, wd));
    if (last > 0) {
      gr[last] = T(tv_grad_point<A, kDepth>(A(r[last]), A(r[last - 1]), A(r[last]), A(u[last]), A(dn[last]),
                                             A(f[last]), A(b[last]), ww, wh, wd));
    }
    // The interior [1, last) in steps of kLanes; a short tail is covered by one more step that ends
    // at `last` and overlaps the previous one (the values are recomputed, not accumulated).
    const int64_t interior = last - 1;
    if (interior < kLanes) {
      for (int64_t w = 1; w < last; ++w) {
        gr[w] = T(tv_grad_point<A, kDepth>(A(r[w]), A(r[w - 1]), A(r[w + 1]), A(u[w]), A(dn[w]), A(f[w]), A(b[w]),
                                            ww, wh, wd));
      }
      continue;
    }
    for (int64_t step = 1; step < last; step += kLanes) {
      const int64_t w0 = std::min(step, last - kLanes);
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const int64_t w = w0 + j;
        gr[w] = T(tv_grad_point<A, kDepth>(A(r[w]), A(r[w - 1]), A(r[w + 1]), A(u[w]), A(dn[w]), A(f[w]), A(b[w]),
                                            ww, wh, wd));
      }
    }
  }
}

// The chunks of x: kTvRowsPerChunk rows of one plane each, a sample's chunks consecutive.
struct TvChunks {
  int64_t C, D, H, W, row_blocks, count;
  TvChunks(const at::Tensor& x, bool depth)
      : C(x.size(1)),
        D(depth ? x.size(2) : 1),
        H(x.size(-2)),
        W(x.size(-1)),
        row_blocks((H + kTvRowsPerChunk - 1) / kTvRowsPerChunk),
        count(x.size(0) * C * D * row_blocks) {}
  int64_t per_sample() const { return C * D * row_blocks; }

  // Calls f(plane, prev, next, plane index, h0, h1) for chunk ci.
  template <typename T, typename F>
  void visit(const T* xp, int64_t ci, F&& f) const {
    const int64_t p = ci / row_blocks;
    const int64_t h0 = (ci % row_blocks) * kTvRowsPerChunk;
    const int64_t d = p % D;
    const int64_t HW = H * W;
    const T* plane = xp + p * HW;
    f(plane, d > 0 ? plane - HW : plane, d + 1 < D ? plane + HW : plane, p, h0, std::min(H, h0 + kTvRowsPerChunk));
  }
};

template <typename T, bool kDepth>
void tv_forward_kernel(const at::Tensor& x, at::Tensor& sums, TvWeights wt) {
  using A = at::opmath_type<T>;
  const TvChunks ch(x, kDepth);
  std::vector<double> partial(static_cast<size_t>(ch.count));
  const T* xp = x.const_data_ptr<T>();
  const int nt = cpu_threads(x.numel());
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t ci = 0; ci < ch.count; ++ci) {
    ch.visit(xp, ci, [&](const T* plane, const T* prev, const T* next, int64_t, int64_t h0, int64_t h1) {
      partial[ci] = tv_sum_rows<T, kDepth>(plane, prev, next, ch.H, ch.W, h0, h1, wt);
    });
  }
  // Fixed-order combine: a sample's chunks are contiguous.
  A* out = sums.mutable_data_ptr<A>();
  const int64_t per_sample = ch.per_sample();
  for (int64_t b = 0; b < x.size(0); ++b) {
    double t = 0.0;
    for (int64_t k = 0; k < per_sample; ++k) t += partial[b * per_sample + k];
    out[b] = A(t);
  }
}

template <typename T, bool kDepth>
void tv_backward_kernel(const at::Tensor& x, const at::Tensor& scale, at::Tensor& grad, TvWeights wt) {
  using A = at::opmath_type<T>;
  const TvChunks ch(x, kDepth);
  const int64_t planes_per_sample = ch.C * ch.D;
  const A* sp = scale.const_data_ptr<A>();
  const T* xp = x.const_data_ptr<T>();
  T* gp = grad.mutable_data_ptr<T>();
  const int nt = cpu_threads(x.numel());
  // The same chunks and static schedule as the forward pass: each thread touches the pages of
  // grad it writes first, in order.
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t ci = 0; ci < ch.count; ++ci) {
    ch.visit(xp, ci, [&](const T* plane, const T* prev, const T* next, int64_t p, int64_t h0, int64_t h1) {
      const double s = double(sp[p / planes_per_sample]);
      const TvWeights ws{wt.w * s, wt.h * s, wt.d * s};
      tv_grad_rows<T, kDepth>(plane, prev, next, gp + p * ch.H * ch.W, ch.H, ch.W, h0, h1, ws);
    });
  }
}

TvWeights tv_weights(const at::Tensor& x, at::ArrayRef<double> weights) {
  return {weights.back(), weights[weights.size() - 2], x.dim() == 5 ? weights[0] : 0.0};
}

}  // namespace

void check_tv_args(const char* op, const at::Tensor& x, at::ArrayRef<double> weights) {
  check_floating(op, "x", x);
  TORCH_CHECK(x.dim() == 4 || x.dim() == 5, op, ": expected x of shape (B, C, H, W) or (B, C, D, H, W), got ",
              x.sizes());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == x.dim() - 2, op, ": expected one weight per spatial axis (",
              x.dim() - 2, "), got ", weights.size());
}

void check_tv_backward_args(const at::Tensor& x, at::ArrayRef<double> weights, const at::Tensor& grad_sums) {
  check_tv_args("tv_backward", x, weights);
  check_floating("tv_backward", "grad_sums", grad_sums);
  TORCH_CHECK(grad_sums.dim() == 1 && grad_sums.size(0) == x.size(0), "tv_backward: expected grad_sums of shape (",
              x.size(0), ",), got ", grad_sums.sizes());
  check_same_device("tv_backward", x, "x", grad_sums, "grad_sums");
}

at::Tensor tv_cpu(const at::Tensor& x_in, at::ArrayRef<double> weights) {
  check_tv_args("tv", x_in, weights);
  check_device("tv", "x", x_in, at::kCPU);
  const at::Tensor x = x_in.contiguous();
  at::Tensor sums = at::empty({x.size(0)}, x.options().dtype(acc_dtype(x)));
  if (x.numel() == 0) return sums.zero_();
  const TvWeights wt = tv_weights(x, weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tv_cpu", [&] {
    x.dim() == 5 ? tv_forward_kernel<scalar_t, true>(x, sums, wt) : tv_forward_kernel<scalar_t, false>(x, sums, wt);
  });
  return sums;
}

at::Tensor tv_backward_cpu(const at::Tensor& x_in, at::ArrayRef<double> weights, const at::Tensor& grad_sums) {
  check_tv_backward_args(x_in, weights, grad_sums);
  check_device("tv_backward", "x", x_in, at::kCPU);
  const at::Tensor x = x_in.contiguous();
  if (x.numel() == 0) return at::empty(x.sizes(), x.options());
  at::Tensor grad = empty_streaming_output(x);
  const TvWeights wt = tv_weights(x, weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tv_backward_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const at::Tensor scale = as_acc<A>(grad_sums);
    x.dim() == 5 ? tv_backward_kernel<scalar_t, true>(x, scale, grad, wt)
                 : tv_backward_kernel<scalar_t, false>(x, scale, grad, wt);
  });
  return grad;
}

}  // namespace invcoss
