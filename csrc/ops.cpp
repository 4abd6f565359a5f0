// Registration of the extension invcoss._C: every op schema of the namespace `invcoss` (one
// TORCH_LIBRARY block; the kernels are registered per device, in cpu_api.cpp and cuda_api.cpp) and
// the Python module, which holds only build facts. Autograd and the fake (meta) kernels for
// torch.compile are registered from Python, in invcoss/ops/backend_ext.py. An op has the same name
// here, in the Triton namespace invcoss_triton and in the backend contract (invcoss/ops/dispatch.py).
#include <Python.h>
#include <omp.h>
#include <torch/library.h>

#include "invcoss.h"

TORCH_LIBRARY(invcoss, m) {
  // x: (B, C, H, W) or (B, C, D, H, W) -> per-sample sums (B,)
  m.def("tv(Tensor x, float[] weights) -> Tensor");
  // -> grad_sums[b] * d(sums[b])/dx[b] (x's shape and dtype, contiguous), the backward of tv
  m.def("tv_backward(Tensor x, float[] weights, Tensor grad_sums) -> Tensor");
  // grad: (N, ...), scale: (N,) -> scale[i] * grad[i]
  m.def("scale_rows(Tensor grad, Tensor scale) -> Tensor");
  // x: (N, F) -> (mean (F,), biased var (F,))
  m.def("batch_mean_var(Tensor x) -> (Tensor, Tensor)");
  // -> grad_mean / N + 2 grad_var (x - mean) / N, the backward of batch_mean_var and stat_matching
  m.def("batch_mean_var_backward(Tensor x, Tensor mean, Tensor grad_mean, Tensor grad_var) -> Tensor");
  // Fold x (N, F) into the state (count, mean (F,), m2 (F,)) -> (new mean, new m2)
  m.def("welford_update(Tensor x, int count, Tensor mean, Tensor m2) -> (Tensor, Tensor)");
  // -> (loss, batch mean, d loss / d batch mean, d loss / d batch var)
  m.def("stat_matching(Tensor x, Tensor mean, Tensor var) -> (Tensor, Tensor, Tensor, Tensor)");
  // h: (B, D), pool: (P, D), pool_inv_norm: (P,) fp32 1 / max(|p_j|, eps) or None (computed)
  //   -> (loss, d loss / dh or an empty tensor)
  m.def(
      "repulsive_direct(Tensor h, Tensor pool, float eps, bool with_grad, Tensor? pool_inv_norm=None) -> (Tensor, "
      "Tensor)");
  // h: (B, D), gram: (D, D) = sum of count outer products -> (loss, d loss / dh or an empty tensor)
  m.def("repulsive_gram(Tensor h, Tensor gram, int count, float eps, bool with_grad) -> (Tensor, Tensor)");
  m.def("gram_update(Tensor(a!) gram, Tensor feats_hat, float alpha) -> ()");
}

namespace {

PyObject* has_cuda(PyObject*, PyObject*) {
#ifdef INVCOSS_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

// How many threads an OpenMP region of the CPU kernels starts right now (torch.set_num_threads
// controls it: torch and this module share one OpenMP runtime). Lets tests prove that a
// "2 threads" run really ran on two.
PyObject* omp_threads(PyObject*, PyObject*) {
  int used = 0;
  const int nt = at::get_num_threads();
#pragma omp parallel num_threads(nt)
  {
#pragma omp single
    used = omp_get_num_threads();
  }
  return PyLong_FromLong(used);
}

PyMethodDef methods[] = {
    {"has_cuda", has_cuda, METH_NOARGS, "True when the module was built with its CUDA kernels."},
    {"omp_threads", omp_threads, METH_NOARGS, "Threads an OpenMP region of the CPU kernels uses now."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "invcoss C++/CUDA kernels; the ops live in torch.ops.invcoss.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
