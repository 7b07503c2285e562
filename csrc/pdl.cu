// set_pdl: turns programmatic dependent launch (common.cuh, `launch`) on or off for the library's
// kernels that support it: rotary_embedding_and_cache, silu_and_mul, paged decode attention and
// skinny_gemm.
#include <ATen/cuda/CUDAContext.h>

#include "common.cuh"
#include "ops.h"

namespace modelyard {

bool set_pdl(bool enabled) {
  const bool supported = at::cuda::is_available() && at::cuda::getCurrentDeviceProperties()->major >= 9;
  return pdl_flag().exchange(enabled && supported);
}

}  // namespace modelyard
