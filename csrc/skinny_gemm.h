// Between skinny_gemm.cu (the op, its checks and its mma.sync kernels) and tma_gemm.cu (its TMA +
// wgmma kernels for Hopper, configs kNumMmaConfigs and up of the op).
#pragma once
#include <optional>

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

namespace modelyard {

struct TmaGemmInfo {
  int block_n, threads, ctas_per_sm;
};
// How many TMA configs this build offers on a device of compute capability major.minor: all on
// sm_90 when built for sm_90a (kernels.py passes -DMODELYARD_SM90A), else none.
int tma_gemm_num_configs(int major, int minor);
TmaGemmInfo tma_gemm_info(int config);
// config's kind (skinny_gemm_configs' column 4): 1 splits K over a cluster, 2 the rows over a CTA
// pair (tma_gemm_pair_kernel), 3 shares x over a cluster of column blocks (multicast); 2 and 3 take
// split_k 1 only.
int tma_gemm_kind(int config);
// out = x w^T (+ bias), or out += x w^T; arguments checked by the caller (skinny_gemm.cu).
void tma_gemm_run(int config, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                  at::Tensor& out, bool accumulate, int split_k, cudaStream_t stream);

}  // namespace modelyard
