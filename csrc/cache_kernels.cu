// reshape_and_cache: scatter the step's packed K/V rows into their cache slots.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <type_traits>

#include "common.cuh"
#include "kv_write.h"
#include "ops.h"

namespace modelyard {
namespace {

// One CTA per token; its Hk*D elements of K and of V are contiguous in the cache
// ([NB, BS, Hk, D]: slot * Hk * D), so the stores are fully coalesced.
// C == T copies; C == fp8_e4m3 stores x * inv_scale rounded and saturated to e4m3.
template <typename T, typename C, int VEC>
__global__ void reshape_and_cache_kernel(const T* __restrict__ key, const T* __restrict__ value,
                                         C* __restrict__ k_cache, C* __restrict__ v_cache,
                                         const int64_t* __restrict__ slot_mapping, int64_t k_stride_t,
                                         int64_t k_stride_h, int64_t v_stride_t, int64_t v_stride_h, int num_kv_heads,
                                         int head_dim, float k_inv_scale, float v_inv_scale) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slot_mapping[t];
  if (slot < 0) return;  // padding token (e.g. a CUDA graph's unused rows)
  const int nvec = head_dim / VEC;
  const int64_t dst0 = slot * num_kv_heads * head_dim;
  for (int i = threadIdx.x; i < num_kv_heads * nvec; i += blockDim.x) {
    const int h = i / nvec, d = (i % nvec) * VEC;
    const int64_t dst = dst0 + static_cast<int64_t>(h) * head_dim + d;
    const Vec<T, VEC> kx = load_vec<T, VEC>(key + t * k_stride_t + h * k_stride_h + d);
    const Vec<T, VEC> vx = load_vec<T, VEC>(value + t * v_stride_t + h * v_stride_h + d);
    store_vec<C, VEC>(k_cache + dst, to_cache<C>(kx, k_inv_scale));
    store_vec<C, VEC>(v_cache + dst, to_cache<C>(vx, v_inv_scale));
  }
}

template <typename T, typename C>
void launch_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                  const at::Tensor& slot_mapping, bool vectorized, float k_inv_scale, float v_inv_scale,
                  cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const int64_t T_ = key.size(0);
  const int Hk = static_cast<int>(key.size(1)), D = static_cast<int>(key.size(2));
  const int vec = vectorized ? V : 1;
  const int threads = static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(32, Hk * D / vec)));
  auto* kc = reinterpret_cast<C*>(k_cache.data_ptr());
  auto* vc = reinterpret_cast<C*>(v_cache.data_ptr());
  const auto* kp = reinterpret_cast<const T*>(key.data_ptr());
  const auto* vp = reinterpret_cast<const T*>(value.data_ptr());
  if (vectorized) {
    reshape_and_cache_kernel<T, C, V><<<T_, threads, 0, stream>>>(kp, vp, kc, vc, slot_mapping.data_ptr<int64_t>(),
                                                                  key.stride(0), key.stride(1), value.stride(0),
                                                                  value.stride(1), Hk, D, k_inv_scale, v_inv_scale);
  } else {
    reshape_and_cache_kernel<T, C, 1><<<T_, threads, 0, stream>>>(kp, vp, kc, vc, slot_mapping.data_ptr<int64_t>(),
                                                                  key.stride(0), key.stride(1), value.stride(0),
                                                                  value.stride(1), Hk, D, k_inv_scale, v_inv_scale);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Shared by reshape_and_cache and rotary_embedding_and_cache (kv_write.h); true for an fp8 cache.
bool check_kv_write(const char* op, const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const at::Tensor& slot_mapping, double k_scale, double v_scale) {
  TORCH_CHECK(key.is_cuda() && value.is_cuda() && k_cache.is_cuda() && v_cache.is_cuda() && slot_mapping.is_cuda(), op,
              ": all tensors must be on CUDA");
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(), op, ": key and value must be [T, Hk, D]");
  TORCH_CHECK(
      k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() && v_cache.is_contiguous(),
      op, ": caches must be contiguous [num_blocks, block_size, Hk, D]");
  TORCH_CHECK(k_cache.size(2) == key.size(1) && k_cache.size(3) == key.size(2), op, ": key rows ", shape(key.sizes()),
              " do not match the cache ", shape(k_cache.sizes()));
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() && key.scalar_type() == value.scalar_type(), op,
              ": k_cache/v_cache (or key/value) dtypes differ");
  const bool fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(fp8 ? key.scalar_type() != at::kFloat : key.scalar_type() == k_cache.scalar_type(), op,
              ": key/value dtype ", key.scalar_type(), " cannot be stored in a ", k_cache.scalar_type(),
              " cache (same dtype, or float16/bfloat16 into float8_e4m3fn)");
  TORCH_CHECK(k_scale > 0 && v_scale > 0, op, ": k_scale and v_scale must be positive");
  TORCH_CHECK(fp8 || (k_scale == 1.0 && v_scale == 1.0), op, ": k_scale / v_scale apply to an fp8 cache only");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1, op, ": head dim must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.is_contiguous() &&
                  slot_mapping.size(0) == key.size(0),
              op, ": slot_mapping must be a contiguous int64 vector with one slot per token");
  return fp8;
}

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                       const at::Tensor& slot_mapping, double k_scale, double v_scale) {
  const bool fp8 = check_kv_write("reshape_and_cache", key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale);
  if (key.size(0) == 0) return;
  const int D = static_cast<int>(key.size(2));
  const c10::cuda::OptionalCUDAGuard guard(key.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int vk = vec_elems(key, {key.stride(0), key.stride(1)}, D);
  const int vv = vec_elems(value, {value.stride(0), value.stride(1)}, D);
  // The cache side moves VEC elements of its own width: 16 bytes, or 8 for fp8 from 16-bit K/V.
  const int64_t cache_align = fp8 ? 8 : 16;
  const bool cache_ok = D % vk == 0 && reinterpret_cast<uintptr_t>(k_cache.data_ptr()) % cache_align == 0 &&
                        reinterpret_cast<uintptr_t>(v_cache.data_ptr()) % cache_align == 0;
  const bool vectorized = vk > 1 && vv > 1 && cache_ok;
  const float kis = static_cast<float>(1.0 / k_scale), vis = static_cast<float>(1.0 / v_scale);

  MODELYARD_DISPATCH_FLOAT_TYPES(key.scalar_type(), "reshape_and_cache", [&] {
    if (fp8) {
      if constexpr (!std::is_same_v<scalar_t, float>) {
        launch_cache<scalar_t, fp8_e4m3>(key, value, k_cache, v_cache, slot_mapping, vectorized, kis, vis, stream);
      }
    } else {
      launch_cache<scalar_t, scalar_t>(key, value, k_cache, v_cache, slot_mapping, vectorized, 1.f, 1.f, stream);
    }
  });
}

}  // namespace modelyard
