// The split-K epilogue shared by the decode GEMMs (skinny_gemm.cu, tma_gemm.cu).
#pragma once
#include <cooperative_groups.h>

#include "common.cuh"

namespace modelyard {

// The share of the [BM, BN] output tile that thread threadIdx.x of cluster rank `split` finishes in
// cluster_reduce_store: 4-column groups i = first + j * THREADS (j < ITERS) while i < end, the
// cluster's CTAs taking consecutive 1/splits shares of the tile's row-major groups.
template <int BM, int BN, int THREADS>
struct TileShare {
  static constexpr int kGroups = BM * (BN / 4);
  static constexpr int kIters = (kGroups + THREADS - 1) / THREADS;  // the most a thread gets (splits = 1)
  int first, end;
  __device__ __forceinline__ TileShare(int split, int splits) {
    const int per = (kGroups + splits - 1) / splits;
    first = split * per + static_cast<int>(threadIdx.x);
    end = min(kGroups, (split + 1) * per);
  }
  __device__ __forceinline__ int group(int j) const { return first + j * THREADS; }
  __device__ __forceinline__ int row(int i) const { return i / (BN / 4); }
  __device__ __forceinline__ int col(int i) const { return (i % (BN / 4)) * 4; }
  __device__ __forceinline__ bool stored(int i, int M, int N, int n0) const {
    return i < end && row(i) < M && n0 + col(i) < N;
  }
};

// out += x w^T reads this thread's share of out before the sum is ready: called early (after
// pdl_wait, before the main loop), its loads' latency hides behind the K loop instead of adding
// one memory round trip per group at the end, when the weights' stream keeps every queue full.
template <typename T, int BM, int BN, int THREADS>
__device__ __forceinline__ void load_out_share(Vec<T, 4> (&pre)[TileShare<BM, BN, THREADS>::kIters],
                                               const TileShare<BM, BN, THREADS>& share, const T* out, int M, int N,
                                               int n0) {
#pragma unroll
  for (int j = 0; j < TileShare<BM, BN, THREADS>::kIters; ++j) {
    const int i = share.group(j);
    if (share.stored(i, M, N, n0))
      pre[j] = load_vec<T, 4>(out + static_cast<int64_t>(share.row(i)) * N + n0 + share.col(i));
  }
}

// Each of the cluster's `splits` CTAs (split = its rank) holds its float32 partial tile of rows
// [0, BM) and columns [n0, n0 + BN) in shared memory at `red` (row stride RS floats), visible to all
// of its threads. The CTAs sum their tiles through distributed shared memory: each finishes its
// TileShare of the tile's 4-column groups, reading every CTA's tile (its own included) in rank
// order (deterministic), and writes rows < M, columns < N of out [M, N] (+ bias, or, with
// accumulate, + pre: out's values from load_out_share; one rounding of the float sum, as cuBLAS with
// beta 1). Every thread (THREADS per CTA) of every CTA of the cluster calls it.
// With splits == 1 the tile is read as this CTA's shared memory: through the generic address that
// map_shared_rank returns (one code path for both) the loads cost tma_gemm's block_n 192 kernel 7-20 us
// per call (benchmarks/RESULTS.md session 14).
template <typename T, int BM, int BN, int RS, int THREADS>
__device__ __forceinline__ void cluster_reduce_store(const float* red, const TileShare<BM, BN, THREADS>& share,
                                                     int splits, const Vec<T, 4> (&pre)[TileShare<BM, BN, THREADS>::kIters],
                                                     T* out, const T* __restrict__ bias, bool accumulate, int M, int N,
                                                     int n0) {
#if __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  if (splits > 1) cluster.sync();
#endif
#pragma unroll
  for (int j = 0; j < TileShare<BM, BN, THREADS>::kIters; ++j) {
    const int i = share.group(j);
    if (!share.stored(i, M, N, n0)) continue;
    const int row = share.row(i), col = share.col(i);
    float f[4] = {0.f, 0.f, 0.f, 0.f};
    auto add = [&](const float* part) {
      const float4 v = *reinterpret_cast<const float4*>(part + row * RS + col);
      f[0] += v.x;
      f[1] += v.y;
      f[2] += v.z;
      f[3] += v.w;
    };
#if __CUDA_ARCH__ >= 900
    if (splits > 1) {
      for (int q = 0; q < splits; ++q) add(cluster.map_shared_rank(red, q));
    } else {
      add(red);  // this CTA's own tile, as shared memory
    }
#else
    add(red);  // splits == 1 below 9.0 (checked on the host)
#endif
    Vec<T, 4> o;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (bias != nullptr) f[e] += to_float(bias[n0 + col + e]);
      if (accumulate) f[e] += to_float(pre[j].v[e]);
      o.v[e] = from_float<T>(f[e]);
    }
    store_vec<T, 4>(out + static_cast<int64_t>(row) * N + n0 + col, o);
  }
#if __CUDA_ARCH__ >= 900
  if (splits > 1) cluster.sync();  // no CTA leaves while another still reads its shared memory
#endif
}

}  // namespace modelyard
