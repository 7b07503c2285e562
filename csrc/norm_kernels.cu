// RMSNorm and fused residual-add + RMSNorm. One CTA per row; the row stays in registers between
// the sum of squares and the scaling, so x (and residual) are read from memory once.
// Rounding follows the HF Llama/Qwen2 norm exactly: normalize in float32, cast to the input dtype,
// then multiply by the weight in that dtype; the residual sum is rounded before it is normalized.
//
// The *_quant_fp8 variants feed an fp8 linear layer (EngineConfig(quantization="fp8")): instead of
// the normed row they write its per-token e4m3 quantization (q, scale), bit-identical to
// per_token_quant_fp8(rms_norm(...)). They are the same kernel with a different epilogue (same
// launch shape, so the same sum-of-squares order): the normed row, rounded to the dtype, stays in
// registers while the CTA finds its absolute maximum, then is divided by the scale and stored as e4m3.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.cuh"
#include "ops.h"

namespace modelyard {
namespace {

constexpr int kPerThread = 4;  // vectors of the row each thread holds

// kQuant: `out` is e4m3 [T, hidden] and `scales` [T] float32 receives each row's scale; otherwise
// `out` is the normed row in T and `scales` is unused.
template <typename T, int VEC, bool kAdd, bool kQuant>
__global__ void rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ weight,
                                std::conditional_t<kQuant, fp8_e4m3, T>* __restrict__ out, float* __restrict__ scales,
                                T* __restrict__ residual_out, int64_t x_stride, int64_t r_stride, int hidden,
                                float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int nvec = hidden / VEC;
  Vec<T, VEC> h[kPerThread];
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    if (i < nvec) {
      h[j] = load_vec<T, VEC>(x + row * x_stride + i * VEC);
      if constexpr (kAdd) {
        const Vec<T, VEC> r = load_vec<T, VEC>(residual + row * r_stride + i * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) h[j].v[k] = from_float<T>(to_float(h[j].v[k]) + to_float(r.v[k]));
        store_vec<T, VEC>(residual_out + row * hidden + i * VEC, h[j]);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float f = to_float(h[j].v[k]);
        ss = fmaf(f, f, ss);
      }
    }
  }
  // The weight is loaded before the reduction, so its latency overlaps the barriers (at decode
  // sizes the kernel is latency-bound: 64 rows of 4096 took 4.7 us, H200).
  Vec<T, VEC> w[kPerThread];
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    if (i < nvec) w[j] = load_vec<T, VEC>(weight + i * VEC);
  }
  ss = block_sum(ss, scratch);
  const float inv = rsqrtf(ss / static_cast<float>(hidden) + eps);
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    if (i < nvec) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float n = to_float(from_float<T>(to_float(h[j].v[k]) * inv));
        h[j].v[k] = from_float<T>(to_float(w[j].v[k]) * n);  // the normed value, in place
        if constexpr (kQuant) amax = fmaxf(amax, fabsf(to_float(h[j].v[k])));
      }
      if constexpr (!kQuant) store_vec<T, VEC>(out + row * hidden + i * VEC, h[j]);
    }
  }
  if constexpr (kQuant) {
    const float scale = fp8_block_row_scale(amax, scratch, scales + row);
    store_row_fp8<T, VEC, kPerThread>(h, nvec, scale, out + row * hidden);
  }
}

void check_norm_args(const char* name, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.is_cuda() && weight.is_cuda(), name, ": tensors must be on CUDA");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, ": x must be [T, H] with a contiguous last dim, got ",
              shape(x.sizes()), " strides ", shape(x.strides()));
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(), name,
              ": weight must be a contiguous [H] vector");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), name, ": weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x.scalar_type(), "; keep norm weights in the model dtype");
}

void check_residual(const char* name, const at::Tensor& x, const at::Tensor& residual) {
  TORCH_CHECK(residual.is_cuda() && residual.sizes() == x.sizes() && residual.stride(1) == 1 &&
                  residual.scalar_type() == x.scalar_type(),
              name, ": residual must match x (shape ", shape(x.sizes()), ", dtype ", x.scalar_type(), ")");
}

// out: [T, H] in x's dtype, or e4m3 when kQuant (then scales is [T, 1] float32).
template <bool kAdd, bool kQuant>
void launch_norm(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight, at::Tensor& out,
                 at::Tensor* scales, at::Tensor* residual_out, double eps, const char* name) {
  const int64_t T = x.size(0);
  const int H = static_cast<int>(x.size(1));
  if (T == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  bool vectorized = vec_elems(x, {x.stride(0)}, H) > 1 && vec_elems(weight, {}, H) > 1;
  if constexpr (kAdd) vectorized = vectorized && vec_elems(*residual, {residual->stride(0)}, H) > 1;

  MODELYARD_DISPATCH_FLOAT_TYPES(x.scalar_type(), name, [&] {
    // The quantized variants must launch exactly like the plain ones (same threads, same vector
    // width): the block's sum of squares, hence inv, depends on both.
    constexpr int V = 16 / sizeof(scalar_t);
    const int vec = vectorized ? V : 1;
    const int64_t nvec = H / vec;
    const int64_t threads = std::max<int64_t>(32, ceil_div(ceil_div(nvec, kPerThread), 32) * 32);
    TORCH_CHECK(threads <= 1024, name, ": hidden size ", num(H), " is too large for one CTA per row");
    using out_t = std::conditional_t<kQuant, fp8_e4m3, scalar_t>;
    const auto* xp = reinterpret_cast<const scalar_t*>(x.data_ptr());
    const auto* rp = kAdd ? reinterpret_cast<const scalar_t*>(residual->data_ptr()) : nullptr;
    const auto* wp = reinterpret_cast<const scalar_t*>(weight.data_ptr());
    auto* op = reinterpret_cast<out_t*>(out.data_ptr());
    auto* sp = kQuant ? scales->data_ptr<float>() : nullptr;
    auto* rop = kAdd ? reinterpret_cast<scalar_t*>(residual_out->data_ptr()) : nullptr;
    const int64_t r_stride = kAdd ? residual->stride(0) : 0;
    if (vectorized) {
      rms_norm_kernel<scalar_t, V, kAdd, kQuant>
          <<<T, threads, 0, stream>>>(xp, rp, wp, op, sp, rop, x.stride(0), r_stride, H, static_cast<float>(eps));
    } else {
      rms_norm_kernel<scalar_t, 1, kAdd, kQuant>
          <<<T, threads, 0, stream>>>(xp, rp, wp, op, sp, rop, x.stride(0), r_stride, H, static_cast<float>(eps));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor new_fp8(const at::Tensor& x) {
  return at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat8_e4m3fn));
}
at::Tensor new_scales(const at::Tensor& x) { return at::empty({x.size(0), 1}, x.options().dtype(at::kFloat)); }

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args("rms_norm", x, weight);
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  launch_norm<false, false>(x, nullptr, weight, out, nullptr, nullptr, eps, "rms_norm");
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps) {
  check_norm_args("fused_add_rms_norm", x, weight);
  check_residual("fused_add_rms_norm", x, residual);
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  at::Tensor new_residual = at::empty({x.size(0), x.size(1)}, x.options());
  launch_norm<true, false>(x, &residual, weight, out, nullptr, &new_residual, eps, "fused_add_rms_norm");
  return {out, new_residual};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_quant_fp8(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args("rms_norm_quant_fp8", x, weight);
  at::Tensor q = new_fp8(x);
  at::Tensor scales = new_scales(x);
  launch_norm<false, true>(x, nullptr, weight, q, &scales, nullptr, eps, "rms_norm_quant_fp8");
  return {q, scales};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_add_rms_norm_quant_fp8(const at::Tensor& x,
                                                                            const at::Tensor& residual,
                                                                            const at::Tensor& weight, double eps) {
  check_norm_args("fused_add_rms_norm_quant_fp8", x, weight);
  check_residual("fused_add_rms_norm_quant_fp8", x, residual);
  at::Tensor q = new_fp8(x);
  at::Tensor scales = new_scales(x);
  at::Tensor new_residual = at::empty({x.size(0), x.size(1)}, x.options());
  launch_norm<true, true>(x, &residual, weight, q, &scales, &new_residual, eps, "fused_add_rms_norm_quant_fp8");
  return {q, scales, new_residual};
}

}  // namespace modelyard
