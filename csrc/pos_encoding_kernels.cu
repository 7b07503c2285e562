// Rotary position embedding applied in place to the query and key rows of each token, alone
// (rotary_embedding) or with the token's K and V rows written into the paged cache in the same
// launch (rotary_embedding_and_cache: one kernel per layer and step fewer than rotary +
// reshape_and_cache, with the same results bit for bit).
// cos_sin_cache [max_pos, D] float32 holds [cos(D/2) | sin(D/2)] per position; the rotation is done
// in float32 and rounded once, as the torch reference does.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "kv_write.h"
#include "ops.h"

namespace modelyard {
namespace {

// Rotates one item in place: VEC (first, second) pairs of a head row x at element j of the half
// row. Neox pairs element j with j + D/2, so VEC pairs are two VEC-wide loads per half-row (16
// bytes when the rows allow it; 2-byte scalar accesses reached ~40% of the copy rate on a 16k-token
// prefill step, H200). GPT-J pairs 2j with 2j + 1 (VEC 1 only). Returns the rotated halves and
// their element offsets, for a caller that also stores them elsewhere (the cache).
template <typename T, int VEC>
struct Rotated {
  Vec<T, VEC> a, b;
  int i1, i2;
};

template <typename T, bool kNeox, int VEC>
__device__ __forceinline__ Rotated<T, VEC> rotate_item(T* __restrict__ x, const float* __restrict__ cs, int j,
                                                       int half) {
  static_assert(kNeox || VEC == 1, "GPT-J pairs are adjacent elements: one pair per item");
  Rotated<T, VEC> r;
  r.i1 = kNeox ? j : 2 * j;
  r.i2 = kNeox ? j + half : 2 * j + 1;
  const Vec<T, VEC> a = load_vec<T, VEC>(x + r.i1);
  const Vec<T, VEC> b = load_vec<T, VEC>(x + r.i2);
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const float c = cs[j + e], s = cs[half + j + e];
    const float x1 = to_float(a.v[e]), x2 = to_float(b.v[e]);
    r.a.v[e] = from_float<T>(x1 * c - x2 * s);
    r.b.v[e] = from_float<T>(x2 * c + x1 * s);
  }
  store_vec<T, VEC>(x + r.i1, r.a);
  store_vec<T, VEC>(x + r.i2, r.b);
  return r;
}

// One CTA per token; each thread rotates VEC consecutive (head, pair) items of q then k.
template <typename T, typename P, bool kNeox, int VEC>
__global__ void rotary_kernel(const P* __restrict__ positions, T* __restrict__ query, T* __restrict__ key,
                              const float* __restrict__ cos_sin, int64_t q_stride, int64_t k_stride, int num_heads,
                              int num_kv_heads, int head_dim) {
  const int64_t t = blockIdx.x;
  const int half = head_dim / 2;
  const int nvec = half / VEC;
  const float* cs = cos_sin + static_cast<int64_t>(positions[t]) * head_dim;
  const int total = (num_heads + num_kv_heads) * nvec;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const int head = i / nvec, j = (i % nvec) * VEC;
    T* x =
        head < num_heads ? query + t * q_stride + head * head_dim : key + t * k_stride + (head - num_heads) * head_dim;
    rotate_item<T, kNeox, VEC>(x, cs, j, half);
  }
}

// rotary_kernel plus the cache write of the token's K (rotated) and V rows, in one launch: the items
// past the rotary ones copy V. A negative slot (padding row) is rotated but not written, as the two
// separate ops do. C == T copies; C == fp8_e4m3 stores x * inv_scale rounded to e4m3.
template <typename T, typename C, typename P, bool kNeox, int VEC>
__global__ void rotary_cache_kernel(const P* __restrict__ positions, T* __restrict__ query, T* __restrict__ key,
                                    const T* __restrict__ value, C* __restrict__ k_cache, C* __restrict__ v_cache,
                                    const int64_t* __restrict__ slot_mapping, const float* __restrict__ cos_sin,
                                    int64_t q_stride, int64_t k_stride, int64_t v_stride, int num_heads,
                                    int num_kv_heads, int head_dim, float k_inv_scale, float v_inv_scale) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slot_mapping[t];
  const int half = head_dim / 2;
  const int nvec = half / VEC;
  const float* cs = cos_sin + static_cast<int64_t>(positions[t]) * head_dim;
  const int rot = (num_heads + num_kv_heads) * nvec;
  const int vrow = head_dim / VEC;
  const int total = rot + (slot >= 0 ? num_kv_heads * vrow : 0);
  const int64_t dst0 = slot * num_kv_heads * head_dim;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    if (i < rot) {
      const int head = i / nvec, j = (i % nvec) * VEC;
      if (head < num_heads) {
        rotate_item<T, kNeox, VEC>(query + t * q_stride + head * head_dim, cs, j, half);
      } else {
        const int kh = head - num_heads;
        const auto r = rotate_item<T, kNeox, VEC>(key + t * k_stride + kh * head_dim, cs, j, half);
        if (slot >= 0) {
          C* dst = k_cache + dst0 + static_cast<int64_t>(kh) * head_dim;
          store_vec<C, VEC>(dst + r.i1, to_cache<C>(r.a, k_inv_scale));
          store_vec<C, VEC>(dst + r.i2, to_cache<C>(r.b, k_inv_scale));
        }
      }
    } else {
      const int h = (i - rot) / vrow, d = ((i - rot) % vrow) * VEC;
      const Vec<T, VEC> vx = load_vec<T, VEC>(value + t * v_stride + h * head_dim + d);
      store_vec<C, VEC>(v_cache + dst0 + static_cast<int64_t>(h) * head_dim + d, to_cache<C>(vx, v_inv_scale));
    }
  }
}

// Row stride of a [T, H*D] or [T, H, D] tensor whose heads are packed within the row.
int64_t packed_row_stride(const at::Tensor& x, int64_t head_dim, const char* op, const char* what) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, op, ": ", what, " must be [T, H*D] or [T, H, D]");
  TORCH_CHECK(x.stride(-1) == 1, op, ": ", what, " must have a contiguous last dim");
  if (x.dim() == 3) {
    TORCH_CHECK(x.size(2) == head_dim && x.stride(1) == head_dim, op, ": ", what, " heads must be packed [T, H, ",
                num(head_dim), "]");
  } else {
    TORCH_CHECK(x.size(1) % head_dim == 0, op, ": ", what, " width ", num(x.size(1)), " is not a multiple of head_dim ",
                num(head_dim));
  }
  return x.stride(0);
}

// The checked shape of a rotary launch (shared by both ops).
struct RotaryShape {
  int64_t T, q_stride, k_stride;
  int Hq, Hk;
};

RotaryShape check_rotary(const char* op, const at::Tensor& positions, const at::Tensor& query, const at::Tensor& key,
                         int64_t head_dim, const at::Tensor& cos_sin_cache) {
  TORCH_CHECK(positions.is_cuda() && query.is_cuda() && key.is_cuda() && cos_sin_cache.is_cuda(), op,
              ": all tensors must be on CUDA");
  TORCH_CHECK(head_dim > 0 && head_dim % 2 == 0, op, ": head_dim must be even, got ", num(head_dim));
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.dim() == 2 &&
                  cos_sin_cache.size(1) == head_dim && cos_sin_cache.is_contiguous(),
              op, ": cos_sin_cache must be contiguous float32 [max_pos, head_dim]");
  TORCH_CHECK(positions.dim() == 1 && positions.is_contiguous() &&
                  (positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt),
              op, ": positions must be a contiguous int64 or int32 vector");
  TORCH_CHECK(query.scalar_type() == key.scalar_type(), op, ": query and key dtypes differ");
  RotaryShape r{};
  r.T = positions.size(0);
  TORCH_CHECK(query.size(0) == r.T && key.size(0) == r.T, op, ": query/key rows must match positions (", num(r.T), ")");
  r.q_stride = packed_row_stride(query, head_dim, op, "query");
  r.k_stride = packed_row_stride(key, head_dim, op, "key");
  r.Hq = static_cast<int>(query.numel() / std::max<int64_t>(r.T, 1) / head_dim);
  r.Hk = static_cast<int>(key.numel() / std::max<int64_t>(r.T, 1) / head_dim);
  return r;
}

// Runs f(positions pointer) with the positions' index type.
template <typename F>
void with_positions(const at::Tensor& positions, F&& f) {
  if (positions.scalar_type() == at::kLong) {
    f(positions.data_ptr<int64_t>());
  } else {
    f(positions.data_ptr<int>());
  }
}

int threads_for(int64_t items, int64_t most) {
  return static_cast<int>(std::min<int64_t>(most, std::max<int64_t>(32, items)));
}

}  // namespace

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, int64_t head_dim,
                      const at::Tensor& cos_sin_cache, bool is_neox) {
  const RotaryShape r = check_rotary("rotary_embedding", positions, query, key, head_dim, cos_sin_cache);
  if (r.T == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(query.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MODELYARD_DISPATCH_FLOAT_TYPES(query.scalar_type(), "rotary_embedding", [&] {
    auto* q = reinterpret_cast<scalar_t*>(query.data_ptr());
    auto* k = reinterpret_cast<scalar_t*>(key.data_ptr());
    const float* cs = cos_sin_cache.data_ptr<float>();
    constexpr int VEC = 16 / sizeof(scalar_t);
    // 16-byte vectors need whole vectors per half-row and 16-byte aligned rows (q and k are
    // usually column slices of the fused qkv output: aligned whenever head_dim is).
    const bool vec = is_neox && (head_dim / 2) % VEC == 0 && r.q_stride % VEC == 0 && r.k_stride % VEC == 0 &&
                     aligned16(q) && aligned16(k);
    const int threads = threads_for((r.Hq + r.Hk) * head_dim / 2 / (vec ? VEC : 1), 512);
    const int D = static_cast<int>(head_dim);
    with_positions(positions, [&](auto* pos) {
      using P = std::remove_pointer_t<decltype(pos)>;
      if (vec) {
        rotary_kernel<scalar_t, P, true, VEC>
            <<<r.T, threads, 0, stream>>>(pos, q, k, cs, r.q_stride, r.k_stride, r.Hq, r.Hk, D);
      } else if (is_neox) {
        rotary_kernel<scalar_t, P, true, 1>
            <<<r.T, threads, 0, stream>>>(pos, q, k, cs, r.q_stride, r.k_stride, r.Hq, r.Hk, D);
      } else {
        rotary_kernel<scalar_t, P, false, 1>
            <<<r.T, threads, 0, stream>>>(pos, q, k, cs, r.q_stride, r.k_stride, r.Hq, r.Hk, D);
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void rotary_embedding_and_cache(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                                const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                                const at::Tensor& slot_mapping, int64_t head_dim, const at::Tensor& cos_sin_cache,
                                bool is_neox, double k_scale, double v_scale) {
  const char* op = "rotary_embedding_and_cache";
  const RotaryShape r = check_rotary(op, positions, query, key, head_dim, cos_sin_cache);
  const bool fp8 = check_kv_write(op, key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale);
  TORCH_CHECK(key.size(2) == head_dim, op, ": key must be [T, Hk, head_dim]");
  if (r.T == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(query.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float kis = static_cast<float>(1.0 / k_scale), vis = static_cast<float>(1.0 / v_scale);
  MODELYARD_DISPATCH_FLOAT_TYPES(query.scalar_type(), op, [&] {
    auto* q = reinterpret_cast<scalar_t*>(query.data_ptr());
    auto* k = reinterpret_cast<scalar_t*>(key.data_ptr());
    const auto* v = reinterpret_cast<const scalar_t*>(value.data_ptr());
    const float* cs = cos_sin_cache.data_ptr<float>();
    const int64_t v_stride = value.stride(0);
    TORCH_CHECK(value.stride(1) == head_dim, op, ": value heads must be packed [T, Hk, head_dim]");
    constexpr int VEC = 16 / sizeof(scalar_t);
    // As rotary_embedding, and V rows and the cache (VEC elements of its own width: 16 bytes, or
    // 8 for an fp8 cache) aligned too.
    const uintptr_t cache_align = fp8 ? VEC : 16;
    const bool vec = is_neox && (head_dim / 2) % VEC == 0 && r.q_stride % VEC == 0 && r.k_stride % VEC == 0 &&
                     v_stride % VEC == 0 && aligned16(q) && aligned16(k) && aligned16(v) &&
                     reinterpret_cast<uintptr_t>(k_cache.data_ptr()) % cache_align == 0 &&
                     reinterpret_cast<uintptr_t>(v_cache.data_ptr()) % cache_align == 0;
    // Up to one item per thread: at decode sizes the kernel is a chain of dependent loads and
    // stores, and a second pass per thread would double it (64 x 32 heads of 128: 1024 items).
    const int threads =
        threads_for((r.Hq + r.Hk) * head_dim / 2 / (vec ? VEC : 1) + r.Hk * head_dim / (vec ? VEC : 1), 1024);
    const int D = static_cast<int>(head_dim);
    const int64_t* slots = slot_mapping.data_ptr<int64_t>();
    auto launch = [&](auto* pos, auto* kc, auto* vc) {
      using P = std::remove_pointer_t<decltype(pos)>;
      using C = std::remove_pointer_t<decltype(kc)>;
      if (vec) {
        rotary_cache_kernel<scalar_t, C, P, true, VEC><<<r.T, threads, 0, stream>>>(
            pos, q, k, v, kc, vc, slots, cs, r.q_stride, r.k_stride, v_stride, r.Hq, r.Hk, D, kis, vis);
      } else if (is_neox) {
        rotary_cache_kernel<scalar_t, C, P, true, 1><<<r.T, threads, 0, stream>>>(
            pos, q, k, v, kc, vc, slots, cs, r.q_stride, r.k_stride, v_stride, r.Hq, r.Hk, D, kis, vis);
      } else {
        rotary_cache_kernel<scalar_t, C, P, false, 1><<<r.T, threads, 0, stream>>>(
            pos, q, k, v, kc, vc, slots, cs, r.q_stride, r.k_stride, v_stride, r.Hq, r.Hk, D, kis, vis);
      }
    };
    with_positions(positions, [&](auto* pos) {
      if (fp8) {
        if constexpr (!std::is_same_v<scalar_t, float>) {
          launch(pos, reinterpret_cast<fp8_e4m3*>(k_cache.data_ptr()), reinterpret_cast<fp8_e4m3*>(v_cache.data_ptr()));
        }
      } else {
        launch(pos, reinterpret_cast<scalar_t*>(k_cache.data_ptr()), reinterpret_cast<scalar_t*>(v_cache.data_ptr()));
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace modelyard
