// Dynamic per-token fp8 (e4m3) quantization of activations, the input side of the fp8 linear layers
// (EngineConfig(quantization="fp8")): for every row, scale = max(|x|, kFp8MinAmax) / 448 and
// q = e4m3(x / scale), rounded to nearest and saturated. One CTA per row: the first pass finds the
// row's absolute maximum, the second re-reads the row (L1/L2-resident: a row is at most a few tens
// of KB) and writes e4m3. Divisions use __fdiv_rn so --use_fast_math does not change them: the
// result is bit-identical to the torch reference (ops.per_token_quant_fp8_ref).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.cuh"
#include "ops.h"

namespace modelyard {
namespace {

template <typename T, int VEC>
__global__ void per_token_quant_fp8_kernel(const T* __restrict__ x, fp8_e4m3* __restrict__ q,
                                           float* __restrict__ scales, int64_t x_stride, int width) {
  __shared__ float scratch[32];
  const T* row = x + blockIdx.x * x_stride;
  fp8_e4m3* out = q + blockIdx.x * static_cast<int64_t>(width);
  const int nvec = width / VEC;
  float amax = 0.f;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Vec<T, VEC> v = load_vec<T, VEC>(row + i * VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) amax = fmaxf(amax, fabsf(to_float(v.v[k])));
  }
  const float scale = fp8_block_row_scale(amax, scratch, scales + blockIdx.x);
  for (int i = threadIdx.x; i < nvec; i += blockDim.x)
    store_vec<fp8_e4m3, VEC>(out + i * VEC, fp8_quantize<T, VEC>(load_vec<T, VEC>(row + i * VEC), scale));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> per_token_quant_fp8(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "per_token_quant_fp8: x must be on CUDA");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1,
              "per_token_quant_fp8: x must be [M, K] with a contiguous last dim, got ", shape(x.sizes()), " strides ",
              shape(x.strides()));
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scales = at::empty({M, 1}, x.options().dtype(at::kFloat));
  TORCH_CHECK(K > 0, "per_token_quant_fp8: rows must not be empty (a scale needs at least one element)");
  if (M == 0) return {q, scales};
  TORCH_CHECK(K <= (int64_t{1} << 30), "per_token_quant_fp8: row width ", num(K), " is too large");

  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MODELYARD_DISPATCH_FLOAT_TYPES(x.scalar_type(), "per_token_quant_fp8", [&] {
    // 16-byte input vectors where the row start and width allow it; the fp8 side then stores
    // 4 or 8 bytes per vector, which every K that is a multiple of the vector keeps aligned.
    constexpr int V = 16 / sizeof(scalar_t);
    const bool vectorized = vec_elems(x, {x.stride(0)}, K) > 1;
    const int vec = vectorized ? V : 1;
    const int threads = static_cast<int>(std::min<int64_t>(256, ceil_div(K / vec, 32) * 32));
    const auto* xp = reinterpret_cast<const scalar_t*>(x.data_ptr());
    auto* qp = reinterpret_cast<fp8_e4m3*>(q.data_ptr());
    auto* sp = scales.data_ptr<float>();
    if (vectorized) {
      per_token_quant_fp8_kernel<scalar_t, V>
          <<<static_cast<unsigned>(M), threads, 0, stream>>>(xp, qp, sp, x.stride(0), static_cast<int>(K));
    } else {
      per_token_quant_fp8_kernel<scalar_t, 1>
          <<<static_cast<unsigned>(M), threads, 0, stream>>>(xp, qp, sp, x.stride(0), static_cast<int>(K));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {q, scales};
}

}  // namespace modelyard
