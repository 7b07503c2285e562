// silu_and_mul: the gated MLP activation, silu(gate) * up, over rows [gate (I) | up (I)].
// Rounding matches the torch reference: silu is rounded to the dtype before the multiply.
//
// silu_and_mul_quant_fp8 feeds an fp8 down_proj (EngineConfig(quantization="fp8")): it writes the
// per-token e4m3 quantization of that product (q, scale), bit-identical to
// per_token_quant_fp8(silu_and_mul(x)). The scale needs the whole row's maximum before any element
// can be written, so it runs one CTA per row and keeps the row's products (rounded to the dtype) in
// registers: x is read once and only e4m3 is written. Rows wider than the registers hold (I > 32768)
// and unaligned rows take a simpler two-pass kernel that reads x twice and recomputes the products.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.cuh"
#include "ops.h"

namespace modelyard {
namespace {

// Elements of the row one thread of the fused register kernel holds (kHeld / VEC vectors): up to
// 1024 threads then cover I <= 32768 (Llama-70B: 28672, Qwen2-72B: 29568); wider rows go two-pass.
constexpr int kHeld = 32;
constexpr int kTwoPassThreads = 256;

// silu(a) * b with both roundings of the reference. Both kernels use this one expression so the
// fused and plain results agree bit for bit.
template <typename T>
__device__ __forceinline__ T silu_mul(T a, T b) {
  const float g = to_float(a);
  const float s = to_float(from_float<T>(g / (1.f + __expf(-g))));
  return from_float<T>(s * to_float(b));
}

template <typename T, int VEC>
__global__ void silu_and_mul_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t x_stride, int inter) {
  const int64_t row = blockIdx.x;
  const int i = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  if (i >= inter) return;
  const T* gate = x + row * x_stride;
  const Vec<T, VEC> a = load_vec<T, VEC>(gate + i);
  const Vec<T, VEC> b = load_vec<T, VEC>(gate + inter + i);
  Vec<T, VEC> o;
#pragma unroll
  for (int k = 0; k < VEC; ++k) o.v[k] = silu_mul(a.v[k], b.v[k]);
  store_vec<T, VEC>(out + row * inter + i, o);
}

// The row stays in registers: one CTA per row, each thread holding kPer vectors of products
// (rounded to T); the launch guarantees blockDim.x * kPer * VEC >= inter. The launch bound makes
// ptxas fit 1024-thread CTAs (the widest rows).
template <typename T, int VEC, int kPer>
__global__ void __launch_bounds__(1024)
    silu_and_mul_quant_fp8_kernel(const T* __restrict__ x, fp8_e4m3* __restrict__ q, float* __restrict__ scales,
                                  int64_t x_stride, int inter) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* gate = x + row * x_stride;
  const int nvec = inter / VEC;
  Vec<T, VEC> o[kPer];
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    if (i < nvec) {
      const Vec<T, VEC> a = load_vec<T, VEC>(gate + i * VEC);
      const Vec<T, VEC> b = load_vec<T, VEC>(gate + inter + i * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        o[j].v[k] = silu_mul(a.v[k], b.v[k]);
        amax = fmaxf(amax, fabsf(to_float(o[j].v[k])));
      }
    }
  }
  const float scale = fp8_block_row_scale(amax, scratch, scales + row);
  store_row_fp8<T, VEC, kPer>(o, nvec, scale, q + row * inter);
}

// Any width: one CTA per row, a strided loop finds the maximum, a second one reads the row again
// (mostly from L2) and recomputes the products to quantize them. For rows too wide for registers
// and the scalar (unaligned) path, which the model never takes: gate_up_proj's output is dense.
template <typename T, int VEC>
__global__ void silu_and_mul_quant_fp8_twopass_kernel(const T* __restrict__ x, fp8_e4m3* __restrict__ q,
                                                      float* __restrict__ scales, int64_t x_stride, int inter) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* gate = x + row * x_stride;
  const int nvec = inter / VEC;
  float amax = 0.f;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Vec<T, VEC> a = load_vec<T, VEC>(gate + i * VEC);
    const Vec<T, VEC> b = load_vec<T, VEC>(gate + inter + i * VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) amax = fmaxf(amax, fabsf(to_float(silu_mul(a.v[k], b.v[k]))));
  }
  const float scale = fp8_block_row_scale(amax, scratch, scales + row);
  fp8_e4m3* out = q + row * inter;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Vec<T, VEC> a = load_vec<T, VEC>(gate + i * VEC);
    const Vec<T, VEC> b = load_vec<T, VEC>(gate + inter + i * VEC);
    Vec<T, VEC> o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.v[k] = silu_mul(a.v[k], b.v[k]);
    store_vec<fp8_e4m3, VEC>(out + i * VEC, fp8_quantize<T, VEC>(o, scale));
  }
}

// x [..., 2I] -> x as [rows, 2I] with evenly strided rows. Checks what both ops need.
at::Tensor silu_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, ": x must be on CUDA");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, name, ": last dim must be even, got ", shape(x.sizes()));
  TORCH_CHECK(x.stride(-1) == 1, name, ": last dim must be contiguous");
  // Rows of a >2-d input must be evenly strided; reshape copies only when they are not.
  return x.dim() == 2 ? x : x.reshape({-1, x.size(-1)});
}

}  // namespace

at::Tensor silu_and_mul(const at::Tensor& x) {
  const at::Tensor x2 = silu_rows(x, "silu_and_mul");
  const int64_t inter = x2.size(1) / 2;
  const int64_t rows = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = inter;
  at::Tensor out = at::empty(out_shape, x.options());
  if (rows == 0 || inter == 0) return out;

  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vectorized = vec_elems(x2, {x2.stride(0), inter}, inter) > 1;
  MODELYARD_DISPATCH_FLOAT_TYPES(x.scalar_type(), "silu_and_mul", [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    const int vec = vectorized ? V : 1;
    const int64_t items = ceil_div(inter, vec);
    const int threads = static_cast<int>(std::min<int64_t>(256, ceil_div(items, 32) * 32));
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(ceil_div(items, threads)));
    const auto* xp = reinterpret_cast<const scalar_t*>(x2.data_ptr());
    auto* op = reinterpret_cast<scalar_t*>(out.data_ptr());
    if (vectorized) {
      silu_and_mul_kernel<scalar_t, V><<<grid, threads, 0, stream>>>(xp, op, x2.stride(0), static_cast<int>(inter));
    } else {
      silu_and_mul_kernel<scalar_t, 1><<<grid, threads, 0, stream>>>(xp, op, x2.stride(0), static_cast<int>(inter));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> silu_and_mul_quant_fp8(const at::Tensor& x) {
  const at::Tensor x2 = silu_rows(x, "silu_and_mul_quant_fp8");
  const int64_t inter = x2.size(1) / 2;
  const int64_t rows = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = inter;
  at::Tensor q = at::empty(out_shape, x.options().dtype(at::kFloat8_e4m3fn));
  out_shape.back() = 1;
  at::Tensor scales = at::empty(out_shape, x.options().dtype(at::kFloat));
  if (rows == 0) return {q, scales};  // an empty row (inter == 0) still gets its scale below
  TORCH_CHECK(inter <= (int64_t{1} << 30), "silu_and_mul_quant_fp8: row width ", num(inter), " is too large");

  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // 16-byte input vectors where the row start, row stride and I allow it; the e4m3 stores are then
  // 4 or 8 bytes, aligned because I is a multiple of the vector.
  const bool vectorized = vec_elems(x2, {x2.stride(0), inter}, inter) > 1;
  MODELYARD_DISPATCH_FLOAT_TYPES(x.scalar_type(), "silu_and_mul_quant_fp8", [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    constexpr int kPer = kHeld / V;
    const auto* xp = reinterpret_cast<const scalar_t*>(x2.data_ptr());
    auto* qp = reinterpret_cast<fp8_e4m3*>(q.data_ptr());
    auto* sp = scales.data_ptr<float>();
    const auto blocks = static_cast<unsigned>(rows);
    const int64_t nvec = inter / V;
    const int64_t held_threads = std::max<int64_t>(32, ceil_div(ceil_div(nvec, kPer), 32) * 32);
    if (vectorized && held_threads <= 1024) {
      silu_and_mul_quant_fp8_kernel<scalar_t, V, kPer><<<blocks, static_cast<unsigned>(held_threads), 0, stream>>>(
          xp, qp, sp, x2.stride(0), static_cast<int>(inter));
    } else if (vectorized) {
      silu_and_mul_quant_fp8_twopass_kernel<scalar_t, V>
          <<<blocks, kTwoPassThreads, 0, stream>>>(xp, qp, sp, x2.stride(0), static_cast<int>(inter));
    } else {
      silu_and_mul_quant_fp8_twopass_kernel<scalar_t, 1>
          <<<blocks, kTwoPassThreads, 0, stream>>>(xp, qp, sp, x2.stride(0), static_cast<int>(inter));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {q, scales};
}

}  // namespace modelyard
