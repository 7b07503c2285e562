// Shared by the paged decode kernels: launch constants, the split rule, kernel parameters, and
// the reduction that combines splits.
//
// Grid: (kv_head x head_group, sequence, split). A CTA serves NG query heads that share one KV
// head (GQA), so each K/V row is read from memory once per group rather than once per query head.
// A split covers a contiguous range of the sequence's tokens; its length is derived on the device
// from seq_len (split_len), so the launch's split count only sets parallelism: any seq_lens give
// the right answer, which is what lets one CUDA graph serve every step.
#pragma once

#include "common.cuh"

namespace modelyard {
namespace paged {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxSplits = 64;
constexpr int kChunkAlign = 32;       // a split's token range is a multiple of this (except the last)
constexpr int kMinSplitTokens = 128;  // host heuristic: no more splits than max_len / this

__device__ __forceinline__ int split_len(int seq_len, int num_splits) {
  int per = (seq_len + num_splits - 1) / num_splits;
  per = (per + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  return per > kChunkAlign ? per : kChunkAlign;
}

// Splits that hold tokens for this sequence (at least 1, so a zero-length one still writes zeros).
__device__ __forceinline__ int splits_used(int seq_len, int num_splits) {
  const int per = split_len(seq_len, num_splits);
  const int n = (seq_len + per - 1) / per;
  return n > 1 ? n : 1;
}

// T: the query/output type. C: the cache's element type (T, or fp8_e4m3 for the fp8 cache).
template <typename T, typename C = T>
struct Params {
  const T* __restrict__ q;               // [S, Hq, D], strides q_stride_s, q_stride_h, 1
  const C* __restrict__ k_cache;         // [NB, BS, Hk, D] contiguous
  const C* __restrict__ v_cache;         // [NB, BS, Hk, D] contiguous
  const int* __restrict__ block_tables;  // [>=S, MB], row stride bt_stride
  const int* __restrict__ seq_lens;      // [S]
  T* __restrict__ out;                   // [S, Hq, D] contiguous
  float* __restrict__ part_out;          // [S, Hq, splits, D]: each split's normalized output
  float* __restrict__ part_max;          // [S, Hq, splits]: its running max (log2 domain)
  float* __restrict__ part_sum;          // [S, Hq, splits]: its softmax denominator
  int64_t q_stride_s, q_stride_h, bt_stride;
  int num_heads, num_kv_heads, head_dim, head_groups, block_shift, num_splits;
  int variant;       // 2: slot kernel, 3: slot kernel with the next tile prefetched
  float scale_log2;  // softmax scale * k_scale * log2(e): the kernel uses exp2
  float v_scale;     // the fp8 cache's value scale (1 otherwise), applied to the output
};

template <int N>
struct NextPow2 {
  static constexpr int value = N <= 1 ? 1 : N <= 2 ? 2 : N <= 4 ? 4 : N <= 8 ? 8 : N <= 16 ? 16 : 32;
};

// Combines the splits of one (sequence, head): weights each split's output by its share of the
// softmax denominator. Sequences that used one split were written directly and are skipped.
template <typename T, typename C>
__global__ void paged_decode_reduce_kernel(const Params<T, C> p) {
  __shared__ float s_w[kMaxSplits];
  __shared__ float s_inv;
  const int head = blockIdx.x, seq = blockIdx.y;
  const int used = splits_used(p.seq_lens[seq], p.num_splits);
  if (used == 1) return;
  const int64_t sh = static_cast<int64_t>(seq) * p.num_heads + head;
  const int64_t base = sh * p.num_splits;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    float m = -INFINITY;
    for (int j = lane; j < used; j += 32) m = fmaxf(m, p.part_max[base + j]);
    m = warp_max(m);
    float tot = 0.f;
    for (int j = lane; j < used; j += 32) {
      const float w = p.part_sum[base + j] * exp2f(p.part_max[base + j] - m);
      s_w[j] = w;
      tot += w;
    }
    tot = warp_sum(tot);
    if (lane == 0) s_inv = tot > 0.f ? 1.f / tot : 0.f;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < used; ++j) acc = fmaf(s_w[j], p.part_out[(base + j) * p.head_dim + d], acc);
    p.out[sh * p.head_dim + d] = from_float<T>(acc * s_inv);
  }
}

}  // namespace paged
}  // namespace modelyard
