// Variant 1, the tile kernel: the CTA walks its token range in tiles of kTile tokens with an online
// softmax; a tile's logits live in shared memory, the running max / sum per head in shared memory,
// the output accumulators in registers (each lane owns one 16-byte slice of the head dim for NG
// heads). Block-wide barriers separate q.k, softmax and p.v of each tile. Kept as the measured
// baseline of the slot kernel (benchmarks/NOTES-kernels.md), which is faster at every shape timed.
#pragma once

#include "paged_common.cuh"

namespace modelyard {
namespace paged {

template <typename T, int D, int NG>
__global__ void __launch_bounds__(kThreads) paged_decode_kernel(const Params<T> p) {
  constexpr int VEC = 16 / sizeof(T);        // elements per 16-byte load
  static_assert(D % VEC == 0, "head dim must be a whole number of 16-byte vectors");
  constexpr int NVEC = D / VEC;              // vectors per K/V row
  static_assert(NVEC <= 32, "one warp must cover a K/V row");
  constexpr int TPT = NextPow2<NVEC>::value; // lanes per token
  constexpr int TPW = 32 / TPT;              // tokens a warp reads at once
  constexpr int U = TPW >= 4 ? 2 : 4;        // loads in flight per lane
  constexpr int ROUND = kWarps * TPW * U;    // tokens per CTA per round

  __shared__ float s_p[NG][kTile];           // logits, then probabilities, of the current tile
  __shared__ float s_max[NG], s_sum[NG], s_alpha[NG];
  __shared__ float s_red[kWarps][NG][D];

  const int seq = blockIdx.y;
  const int split = blockIdx.z;
  const int kvh = blockIdx.x / p.head_groups;
  const int hg = blockIdx.x % p.head_groups;
  const int group = p.num_heads / p.num_kv_heads;
  const int h0 = kvh * group + hg * NG;      // first query head served here
  const int nh = min(NG, group - hg * NG);   // heads actually served (NG rounds the group up)

  const int seq_len = p.seq_lens[seq];
  const int used = splits_used(seq_len, p.num_splits);
  if (split >= used) return;
  const int chunk = split_len(seq_len, p.num_splits);
  const int start = split * chunk;
  const int end = min(seq_len, start + chunk);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int slot = lane / TPT, vi = lane % TPT;
  const bool active = vi < NVEC;             // D = 80: some lanes of a token group idle

  float qf[NG][VEC];
#pragma unroll
  for (int g = 0; g < NG; ++g) {
    if (active && g < nh) {
      const Vec<T, VEC> qv =
          load_vec<T, VEC>(p.q + seq * p.q_stride_s + (h0 + g) * p.q_stride_h + vi * VEC);
#pragma unroll
      for (int i = 0; i < VEC; ++i) qf[g][i] = to_float(qv.v[i]) * p.scale_log2;
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) qf[g][i] = 0.f;
    }
  }
  float acc[NG][VEC];
#pragma unroll
  for (int g = 0; g < NG; ++g)
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[g][i] = 0.f;
  if (threadIdx.x < NG) {
    s_max[threadIdx.x] = -INFINITY;
    s_sum[threadIdx.x] = 0.f;
  }

  const int* bt = p.block_tables + seq * p.bt_stride;
  const int bs_mask = (1 << p.block_shift) - 1;
  const int64_t tok_stride = static_cast<int64_t>(p.num_kv_heads) * D;  // between token rows
  const T* k_base = p.k_cache + kvh * D + vi * VEC;
  const T* v_base = p.v_cache + kvh * D + vi * VEC;

  for (int t0 = start; t0 < end; t0 += kTile) {
    const int tlen = min(kTile, end - t0);

    // q . k for every token of the tile, NG heads at once
    for (int r = 0; r < tlen; r += ROUND) {
      Vec<T, VEC> kv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int tl = r + (warp * U + u) * TPW + slot;
        if (active && tl < tlen) {
          const int t = t0 + tl;
          const int64_t row = (static_cast<int64_t>(bt[t >> p.block_shift]) << p.block_shift) + (t & bs_mask);
          kv[u] = load_vec<T, VEC>(k_base + row * tok_stride);
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) kv[u].v[i] = from_float<T>(0.f);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int tl = r + (warp * U + u) * TPW + slot;
        float kf[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) kf[i] = to_float(kv[u].v[i]);
#pragma unroll
        for (int g = 0; g < NG; ++g) {
          float d = 0.f;
#pragma unroll
          for (int i = 0; i < VEC; ++i) d = fmaf(qf[g][i], kf[i], d);
#pragma unroll
          for (int o = TPT / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
          if (vi == 0 && tl < tlen) s_p[g][tl] = d;
        }
      }
    }
    __syncthreads();

    // online softmax step: one warp per head
    for (int g = warp; g < NG; g += kWarps) {
      float mx = -INFINITY;
      for (int i = lane; i < tlen; i += 32) mx = fmaxf(mx, s_p[g][i]);
      mx = warp_max(mx);
      const float m_old = s_max[g];
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.f;
      for (int i = lane; i < tlen; i += 32) {
        const float e = exp2f(s_p[g][i] - m_new);
        s_p[g][i] = e;
        sum += e;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_new);  // 0 on the first tile (m_old = -inf)
        s_alpha[g] = alpha;
        s_sum[g] = s_sum[g] * alpha + sum;
        s_max[g] = m_new;
      }
    }
    __syncthreads();

    // acc = acc * alpha + p . v
#pragma unroll
    for (int g = 0; g < NG; ++g) {
      const float a = s_alpha[g];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[g][i] *= a;
    }
    for (int r = 0; r < tlen; r += ROUND) {
      Vec<T, VEC> vv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int tl = r + (warp * U + u) * TPW + slot;
        if (active && tl < tlen) {
          const int t = t0 + tl;
          const int64_t row = (static_cast<int64_t>(bt[t >> p.block_shift]) << p.block_shift) + (t & bs_mask);
          vv[u] = load_vec<T, VEC>(v_base + row * tok_stride);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int tl = r + (warp * U + u) * TPW + slot;
        if (active && tl < tlen) {
#pragma unroll
          for (int g = 0; g < NG; ++g) {
            const float pr = s_p[g][tl];
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[g][i] = fmaf(pr, to_float(vv[u].v[i]), acc[g][i]);
          }
        }
      }
    }
    __syncthreads();  // the next tile rewrites s_p
  }

  // Sum the token slots of each warp, then the warps, then normalize.
#pragma unroll
  for (int o = TPT; o < 32; o <<= 1)
#pragma unroll
    for (int g = 0; g < NG; ++g)
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[g][i] += __shfl_xor_sync(0xffffffffu, acc[g][i], o);
  if (slot == 0 && active) {
#pragma unroll
    for (int g = 0; g < NG; ++g)
#pragma unroll
      for (int i = 0; i < VEC; ++i) s_red[warp][g][vi * VEC + i] = acc[g][i];
  }
  __syncthreads();

  const bool single = used == 1;
  for (int idx = threadIdx.x; idx < NG * D; idx += kThreads) {
    const int g = idx / D, d = idx % D;
    if (g >= nh) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += s_red[w][g][d];
    const float l = s_sum[g];
    const float o = l > 0.f ? v / l : 0.f;
    const int64_t sh = static_cast<int64_t>(seq) * p.num_heads + h0 + g;
    if (single) {
      p.out[sh * D + d] = from_float<T>(o);
    } else {
      const int64_t ps = sh * p.num_splits + split;
      p.part_out[ps * D + d] = o;
      if (d == 0) {
        p.part_max[ps] = s_max[g];
        p.part_sum[ps] = l;
      }
    }
  }
}

}  // namespace paged
}  // namespace modelyard
