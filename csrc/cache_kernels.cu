// reshape_and_cache: scatter the step's packed K/V rows into their cache slots.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.cuh"
#include "ops.h"

namespace modelyard {
namespace {

// One CTA per token; its Hk*D elements of K and of V are contiguous in the cache
// ([NB, BS, Hk, D]: slot * Hk * D), so the stores are fully coalesced.
template <typename T, int VEC>
__global__ void reshape_and_cache_kernel(const T* __restrict__ key, const T* __restrict__ value,
                                         T* __restrict__ k_cache, T* __restrict__ v_cache,
                                         const int64_t* __restrict__ slot_mapping, int64_t k_stride_t,
                                         int64_t k_stride_h, int64_t v_stride_t, int64_t v_stride_h,
                                         int num_kv_heads, int head_dim) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slot_mapping[t];
  if (slot < 0) return;  // padding token (e.g. a CUDA graph's unused rows)
  const int nvec = head_dim / VEC;
  const int64_t dst0 = slot * num_kv_heads * head_dim;
  for (int i = threadIdx.x; i < num_kv_heads * nvec; i += blockDim.x) {
    const int h = i / nvec, d = (i % nvec) * VEC;
    const int64_t dst = dst0 + static_cast<int64_t>(h) * head_dim + d;
    store_vec<T, VEC>(k_cache + dst, load_vec<T, VEC>(key + t * k_stride_t + h * k_stride_h + d));
    store_vec<T, VEC>(v_cache + dst, load_vec<T, VEC>(value + t * v_stride_t + h * v_stride_h + d));
  }
}

}  // namespace

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                       const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.is_cuda() && value.is_cuda() && k_cache.is_cuda() && v_cache.is_cuda() && slot_mapping.is_cuda(),
              "reshape_and_cache: all tensors must be on CUDA");
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(), "reshape_and_cache: key and value must be [T, Hk, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "reshape_and_cache: caches must be contiguous [num_blocks, block_size, Hk, D]");
  TORCH_CHECK(k_cache.size(2) == key.size(1) && k_cache.size(3) == key.size(2),
              "reshape_and_cache: key rows ", shape(key.sizes()), " do not match the cache ", shape(k_cache.sizes()));
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == k_cache.scalar_type(),
              "reshape_and_cache: key/value dtype ", key.scalar_type(), " differs from the cache's ",
              k_cache.scalar_type());
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1, "reshape_and_cache: head dim must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.is_contiguous() &&
                  slot_mapping.size(0) == key.size(0),
              "reshape_and_cache: slot_mapping must be a contiguous int64 vector with one slot per token");

  const int64_t T = key.size(0);
  if (T == 0) return;
  const int Hk = static_cast<int>(key.size(1)), D = static_cast<int>(key.size(2));
  const c10::cuda::OptionalCUDAGuard guard(key.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int vk = vec_elems(key, {key.stride(0), key.stride(1)}, D);
  const int vv = vec_elems(value, {value.stride(0), value.stride(1)}, D);
  const int vc = vec_elems(k_cache, {}, D);
  const bool vectorized = vk > 1 && vv > 1 && vc > 1 && reinterpret_cast<uintptr_t>(v_cache.data_ptr()) % 16 == 0;

  MODELYARD_DISPATCH_FLOAT_TYPES(key.scalar_type(), "reshape_and_cache", [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    const int vec = vectorized ? V : 1;
    const int threads = static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(32, Hk * D / vec)));
    auto* kc = reinterpret_cast<scalar_t*>(k_cache.data_ptr());
    auto* vc_ = reinterpret_cast<scalar_t*>(v_cache.data_ptr());
    const auto* kp = reinterpret_cast<const scalar_t*>(key.data_ptr());
    const auto* vp = reinterpret_cast<const scalar_t*>(value.data_ptr());
    if (vectorized) {
      reshape_and_cache_kernel<scalar_t, V><<<T, threads, 0, stream>>>(
          kp, vp, kc, vc_, slot_mapping.data_ptr<int64_t>(), key.stride(0), key.stride(1), value.stride(0),
          value.stride(1), Hk, D);
    } else {
      reshape_and_cache_kernel<scalar_t, 1><<<T, threads, 0, stream>>>(
          kp, vp, kc, vc_, slot_mapping.data_ptr<int64_t>(), key.stride(0), key.stride(1), value.stride(0),
          value.stride(1), Hk, D);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace modelyard
