// silu_and_mul: the gated MLP activation, silu(gate) * up, over rows [gate (I) | up (I)].
// Rounding matches the torch reference: silu is rounded to the dtype before the multiply.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.cuh"
#include "ops.h"

namespace modelyard {
namespace {

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
  for (int k = 0; k < VEC; ++k) {
    const float g = to_float(a.v[k]);
    const float s = to_float(from_float<T>(g / (1.f + __expf(-g))));
    o.v[k] = from_float<T>(s * to_float(b.v[k]));
  }
  store_vec<T, VEC>(out + row * inter + i, o);
}

}  // namespace

at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "silu_and_mul: x must be on CUDA");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "silu_and_mul: last dim must be even, got ", shape(x.sizes()));
  TORCH_CHECK(x.stride(-1) == 1, "silu_and_mul: last dim must be contiguous");
  const int64_t width = x.size(-1), inter = width / 2;
  // Rows of a >2-d input must be evenly strided; reshape copies only when they are not.
  const at::Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, width});
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

}  // namespace modelyard
