// The ops for the CPU dispatch key: the one TORCH_LIBRARY_IMPL block of the CPU kernels, as
// cuda_api.cpp holds the CUDA one. Each function is defined beside its kernels in <op>_cpu.cpp and
// declared in invcoss.h; the schemas are in ops.cpp.
#include <torch/library.h>

#include "invcoss.h"

namespace invcoss {

TORCH_LIBRARY_IMPL(invcoss, CPU, m) {
  m.impl("tv", &tv_cpu);
  m.impl("tv_backward", &tv_backward_cpu);
  m.impl("scale_rows", &scale_rows_cpu);
  m.impl("batch_mean_var", &batch_mean_var_cpu);
  m.impl("batch_mean_var_backward", &batch_mean_var_backward_cpu);
  m.impl("welford_update", &welford_update_cpu);
  m.impl("stat_matching", &stat_matching_cpu);
  m.impl("repulsive_direct", &repulsive_direct_cpu);
  m.impl("repulsive_gram", &repulsive_gram_cpu);
  m.impl("gram_update", &gram_update);
}

}  // namespace invcoss
