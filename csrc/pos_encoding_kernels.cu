// Rotary position embedding applied in place to the query and key rows of each token.
// cos_sin_cache [max_pos, D] float32 holds [cos(D/2) | sin(D/2)] per position; the rotation is done
// in float32 and rounded once, as the torch reference does.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.cuh"
#include "ops.h"

namespace modelyard {
namespace {

// One CTA per token; each thread rotates VEC consecutive (head, pair) items of q then k. Neox pairs
// element j with j + D/2, so VEC pairs are two VEC-wide loads per half-row (16 bytes when the rows
// allow it; 2-byte scalar accesses reached ~40% of the copy rate on a 16k-token prefill step, H200).
// GPT-J pairs 2j with 2j + 1 (scalar only).
template <typename T, typename P, bool kNeox, int VEC>
__global__ void rotary_kernel(const P* __restrict__ positions, T* __restrict__ query, T* __restrict__ key,
                              const float* __restrict__ cos_sin, int64_t q_stride, int64_t k_stride, int num_heads,
                              int num_kv_heads, int head_dim) {
  static_assert(kNeox || VEC == 1, "GPT-J pairs are adjacent elements: one pair per item");
  const int64_t t = blockIdx.x;
  const int half = head_dim / 2;
  const int nvec = half / VEC;
  const float* cs = cos_sin + static_cast<int64_t>(positions[t]) * head_dim;
  const int total = (num_heads + num_kv_heads) * nvec;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const int head = i / nvec, j = (i % nvec) * VEC;
    T* x = head < num_heads ? query + t * q_stride + head * head_dim
                            : key + t * k_stride + (head - num_heads) * head_dim;
    const int i1 = kNeox ? j : 2 * j;
    const int i2 = kNeox ? j + half : 2 * j + 1;
    const Vec<T, VEC> a = load_vec<T, VEC>(x + i1);
    const Vec<T, VEC> b = load_vec<T, VEC>(x + i2);
    Vec<T, VEC> ra, rb;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float c = cs[j + e], s = cs[half + j + e];
      const float x1 = to_float(a.v[e]), x2 = to_float(b.v[e]);
      ra.v[e] = from_float<T>(x1 * c - x2 * s);
      rb.v[e] = from_float<T>(x2 * c + x1 * s);
    }
    store_vec<T, VEC>(x + i1, ra);
    store_vec<T, VEC>(x + i2, rb);
  }
}

// Row stride of a [T, H*D] or [T, H, D] tensor whose heads are packed within the row.
int64_t packed_row_stride(const at::Tensor& x, int64_t head_dim, const char* what) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "rotary_embedding: ", what, " must be [T, H*D] or [T, H, D]");
  TORCH_CHECK(x.stride(-1) == 1, "rotary_embedding: ", what, " must have a contiguous last dim");
  if (x.dim() == 3) {
    TORCH_CHECK(x.size(2) == head_dim && x.stride(1) == head_dim, "rotary_embedding: ", what,
                " heads must be packed [T, H, ", num(head_dim), "]");
  } else {
    TORCH_CHECK(x.size(1) % head_dim == 0, "rotary_embedding: ", what, " width ", num(x.size(1)),
                " is not a multiple of head_dim ", num(head_dim));
  }
  return x.stride(0);
}

}  // namespace

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, int64_t head_dim,
                      const at::Tensor& cos_sin_cache, bool is_neox) {
  TORCH_CHECK(positions.is_cuda() && query.is_cuda() && key.is_cuda() && cos_sin_cache.is_cuda(),
              "rotary_embedding: all tensors must be on CUDA");
  TORCH_CHECK(head_dim > 0 && head_dim % 2 == 0, "rotary_embedding: head_dim must be even, got ", num(head_dim));
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.dim() == 2 &&
                  cos_sin_cache.size(1) == head_dim && cos_sin_cache.is_contiguous(),
              "rotary_embedding: cos_sin_cache must be contiguous float32 [max_pos, head_dim]");
  TORCH_CHECK(positions.dim() == 1 && positions.is_contiguous() &&
                  (positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt),
              "rotary_embedding: positions must be a contiguous int64 or int32 vector");
  TORCH_CHECK(query.scalar_type() == key.scalar_type(), "rotary_embedding: query and key dtypes differ");
  const int64_t T = positions.size(0);
  TORCH_CHECK(query.size(0) == T && key.size(0) == T, "rotary_embedding: query/key rows must match positions (", num(T), ")");
  const int64_t q_stride = packed_row_stride(query, head_dim, "query");
  const int64_t k_stride = packed_row_stride(key, head_dim, "key");
  const int Hq = static_cast<int>(query.numel() / std::max<int64_t>(T, 1) / head_dim);
  const int Hk = static_cast<int>(key.numel() / std::max<int64_t>(T, 1) / head_dim);
  if (T == 0) return;

  const c10::cuda::OptionalCUDAGuard guard(query.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MODELYARD_DISPATCH_FLOAT_TYPES(query.scalar_type(), "rotary_embedding", [&] {
    auto* q = reinterpret_cast<scalar_t*>(query.data_ptr());
    auto* k = reinterpret_cast<scalar_t*>(key.data_ptr());
    const float* cs = cos_sin_cache.data_ptr<float>();
    constexpr int VEC = 16 / sizeof(scalar_t);
    // 16-byte vectors need whole vectors per half-row and 16-byte aligned rows (q and k are
    // usually column slices of the fused qkv output: aligned whenever head_dim is).
    const bool vec = is_neox && (head_dim / 2) % VEC == 0 && q_stride % VEC == 0 && k_stride % VEC == 0 &&
                     reinterpret_cast<uintptr_t>(q) % 16 == 0 && reinterpret_cast<uintptr_t>(k) % 16 == 0;
    const int64_t items = (Hq + Hk) * head_dim / 2 / (vec ? VEC : 1);
    const int threads = static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(32, items)));
    auto launch = [&](auto* pos) {
      using P = std::remove_const_t<std::remove_pointer_t<decltype(pos)>>;
      const int D = static_cast<int>(head_dim);
      if (vec) {
        rotary_kernel<scalar_t, P, true, VEC><<<T, threads, 0, stream>>>(pos, q, k, cs, q_stride, k_stride, Hq, Hk, D);
      } else if (is_neox) {
        rotary_kernel<scalar_t, P, true, 1><<<T, threads, 0, stream>>>(pos, q, k, cs, q_stride, k_stride, Hq, Hk, D);
      } else {
        rotary_kernel<scalar_t, P, false, 1><<<T, threads, 0, stream>>>(pos, q, k, cs, q_stride, k_stride, Hq, Hk, D);
      }
    };
    if (positions.scalar_type() == at::kLong) {
      launch(positions.data_ptr<int64_t>());
    } else {
      launch(positions.data_ptr<int>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace modelyard
