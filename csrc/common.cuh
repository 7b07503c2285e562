// Shared device helpers: dtype conversion, 16-byte vectors, warp reductions, dtype dispatch.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

namespace modelyard {

// torch builds extensions with -D__CUDA_NO_HALF_CONVERSIONS__ (and the bf16 twin), so every
// conversion between storage types and float goes through these explicit intrinsics.
template <typename T>
struct Convert;

template <>
struct Convert<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};

template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return Convert<T>::to_float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  return Convert<T>::from_float(x);
}

// N elements moved by one load/store instruction (16 bytes for the vectorized paths).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// The fp8 KV cache's element: e4m3 (OCP "fn": no infinities, +-448 max), torch.float8_e4m3fn.
using fp8_e4m3 = __nv_fp8_e4m3;

// N cache elements -> N floats. 16/32-bit caches convert element by element; fp8 converts pairs
// with the hardware's e4m3x2 -> f16x2 instruction (exact: every e4m3 value is a half).
template <typename C, int N>
__device__ __forceinline__ void cache_to_float(const Vec<C, N>& x, float (&f)[N]) {
  if constexpr (std::is_same_v<C, fp8_e4m3>) {
    static_assert(N % 2 == 0, "fp8 vectors convert in pairs");
    const auto* pairs = reinterpret_cast<const __nv_fp8x2_storage_t*>(&x);
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const float2 v = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pairs[i], __NV_E4M3)));
      f[2 * i] = v.x;
      f[2 * i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = to_float(x.v[i]);
  }
}

// float -> e4m3, rounded to nearest and saturated at +-448 (torch's cast would give NaN there).
__device__ __forceinline__ fp8_e4m3 float_to_fp8(float x) {
  fp8_e4m3 r;
  r.__x = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
  return r;
}

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& x) {
  *reinterpret_cast<Vec<T, N>*>(p) = x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Sum over the whole block; every thread gets the result. `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  x = warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < nwarps ? scratch[lane] : 0.f;
  return warp_sum(x);
}

// Max over the whole block; every thread gets the result. `scratch` holds 32 floats and may have
// been used by a block_sum / block_max just before (hence the leading barrier).
__device__ __forceinline__ float block_max(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  x = warp_max(x);
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < nwarps ? scratch[lane] : 0.f;
  return warp_max(x);
}

// Dynamic per-token fp8 quantization (quantization="fp8"), shared by the standalone quantizer and
// the kernels that write their output quantized, so all give the same bits as
// ops.per_token_quant_fp8_ref: scale = max(|row|, kFp8MinAmax) / 448, q = e4m3(x / scale), both
// divisions correctly rounded whatever --use_fast_math does. A row holding NaN gets a finite scale
// here (fmaxf drops NaN) where the reference's would be NaN.
constexpr float kFp8Max = 448.f;
constexpr float kFp8MinAmax = 1e-12f;  // an all-zero row gets a tiny positive scale, never 0 or NaN

// The row's scale from each thread's partial max |x| (one CTA per row); thread 0 stores it.
__device__ __forceinline__ float fp8_block_row_scale(float thread_amax, float* scratch, float* scale_out) {
  const float scale = __fdiv_rn(fmaxf(block_max(thread_amax, scratch), kFp8MinAmax), kFp8Max);
  if (threadIdx.x == 0) *scale_out = scale;
  return scale;
}

template <typename T, int VEC>
__device__ __forceinline__ Vec<fp8_e4m3, VEC> fp8_quantize(const Vec<T, VEC>& x, float scale) {
  Vec<fp8_e4m3, VEC> q;
#pragma unroll
  for (int k = 0; k < VEC; ++k) q.v[k] = float_to_fp8(__fdiv_rn(to_float(x.v[k]), scale));
  return q;
}

// A vector as cache elements: a copy for a cache of the same type, else x * inv_scale rounded and
// saturated to e4m3 (the fp8 KV cache stores x / scale).
template <typename C, typename T, int VEC>
__device__ __forceinline__ Vec<C, VEC> to_cache(const Vec<T, VEC>& x, float inv_scale) {
  if constexpr (std::is_same_v<C, T>) {
    return x;
  } else {
    Vec<C, VEC> q;
#pragma unroll
    for (int j = 0; j < VEC; ++j) q.v[j] = float_to_fp8(to_float(x.v[j]) * inv_scale);
    return q;
  }
}

// Stores a row held in registers as e4m3: thread t holds vectors t + j * blockDim.x (those < nvec).
template <typename T, int VEC, int kPer>
__device__ __forceinline__ void store_row_fp8(const Vec<T, VEC> (&row)[kPer], int nvec, float scale,
                                              fp8_e4m3* __restrict__ out) {
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    if (i < nvec) store_vec<fp8_e4m3, VEC>(out + i * VEC, fp8_quantize<T, VEC>(row[j], scale));
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Elements per 16-byte vector for a tensor, or 1 when its pointer or strides are not 16-byte aligned.
inline int vec_elems(const at::Tensor& t, std::initializer_list<int64_t> strides_elems, int64_t inner) {
  const int n = 16 / static_cast<int>(t.element_size());
  if (!aligned16(t.data_ptr()) || inner % n != 0) return 1;
  for (int64_t s : strides_elems)
    if (s % n != 0) return 1;
  return n;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Error messages get numbers as strings (std::to_string) rather than streaming them. On the device
// image (nvcc's host compiler from /opt/gcc, the system libstdc++ at run time) numeric ostream
// insertion compiled into this library crashed inside libstdc++ (SIGSEGV in num_put) when a check
// fired, while string insertion worked; keeping numbers out of iostreams sidesteps that mismatch.
inline std::string num(int64_t v) { return std::to_string(v); }

inline std::string shape(at::IntArrayRef s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

}  // namespace modelyard

// Binds `scalar_t` to the CUDA storage type of a float32 / float16 / bfloat16 tensor.
#define MODELYARD_DISPATCH_FLOAT_TYPES(DTYPE, NAME, ...)                                                 \
  [&] {                                                                                                  \
    switch (DTYPE) {                                                                                     \
      case at::ScalarType::Float: {                                                                      \
        using scalar_t = float;                                                                          \
        return __VA_ARGS__();                                                                            \
      }                                                                                                  \
      case at::ScalarType::Half: {                                                                       \
        using scalar_t = __half;                                                                         \
        return __VA_ARGS__();                                                                            \
      }                                                                                                  \
      case at::ScalarType::BFloat16: {                                                                   \
        using scalar_t = __nv_bfloat16;                                                                  \
        return __VA_ARGS__();                                                                            \
      }                                                                                                  \
      default:                                                                                           \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", DTYPE, " (float32, float16 and bfloat16 are)"); \
    }                                                                                                    \
  }()
