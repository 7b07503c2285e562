// Variant 2, the slot kernel (the default).
#pragma once

#include "paged_common.cuh"

namespace modelyard {
namespace paged {

// Every group of TPT lanes (a "slot") keeps its own online-softmax state (max, sum,
// output accumulators) over its own tokens, so the main loop has no block-wide barrier and no
// shared-memory logits, and each lane keeps 2U loads (its tokens' K and V rows) in flight.
// Slots and then warps are merged once at the end.
template <typename T, int D, int NG>
__global__ void __launch_bounds__(kThreads) paged_decode_kernel_v2(const Params<T> p) {
  constexpr int VEC = 16 / sizeof(T);
  static_assert(D % VEC == 0, "head dim must be a whole number of 16-byte vectors");
  constexpr int NVEC = D / VEC;
  static_assert(NVEC <= 32, "one warp must cover a K/V row");
  constexpr int TPT = NextPow2<NVEC>::value;
  constexpr int TPW = 32 / TPT;
  constexpr int U = TPW >= 4 ? 2 : 4;        // consecutive tokens per slot per step
  constexpr int NS = kWarps * TPW;           // slots per CTA

  __shared__ float s_m[kWarps][NG], s_l[kWarps][NG];
  __shared__ float s_acc[kWarps][NG][D];

  const int seq = blockIdx.y;
  const int split = blockIdx.z;
  const int kvh = blockIdx.x / p.head_groups;
  const int hg = blockIdx.x % p.head_groups;
  const int group = p.num_heads / p.num_kv_heads;
  const int h0 = kvh * group + hg * NG;
  const int nh = min(NG, group - hg * NG);

  const int seq_len = p.seq_lens[seq];
  const int used = splits_used(seq_len, p.num_splits);
  if (split >= used) return;
  const int chunk = split_len(seq_len, p.num_splits);
  const int start = split * chunk;
  const int end = min(seq_len, start + chunk);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int slot = lane / TPT, vi = lane % TPT;
  const bool active = vi < NVEC;

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
  float m[NG], l[NG], acc[NG][VEC];
#pragma unroll
  for (int g = 0; g < NG; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[g][i] = 0.f;
  }

  const int* bt = p.block_tables + seq * p.bt_stride;
  const int bs_mask = (1 << p.block_shift) - 1;
  const int64_t tok_stride = static_cast<int64_t>(p.num_kv_heads) * D;
  const T* k_base = p.k_cache + kvh * D + vi * VEC;
  const T* v_base = p.v_cache + kvh * D + vi * VEC;

  // The loop bound depends on the warp only, so every lane runs the same shuffles.
  for (int t0 = start + warp * TPW * U; t0 < end; t0 += NS * U) {
    const int tb = t0 + slot * U;
    Vec<T, VEC> kv[U], vv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = tb + u;
      if (active && t < end) {
        const int64_t row = (static_cast<int64_t>(bt[t >> p.block_shift]) << p.block_shift) + (t & bs_mask);
        kv[u] = load_vec<T, VEC>(k_base + row * tok_stride);
        vv[u] = load_vec<T, VEC>(v_base + row * tok_stride);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) kv[u].v[i] = vv[u].v[i] = from_float<T>(0.f);
      }
    }
    float s[NG][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
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
        s[g][u] = tb + u < end ? d : -INFINITY;
      }
    }
#pragma unroll
    for (int g = 0; g < NG; ++g) {
      float bmax = s[g][0];
#pragma unroll
      for (int u = 1; u < U; ++u) bmax = fmaxf(bmax, s[g][u]);
      const float m_new = fmaxf(m[g], bmax);
      if (m_new == -INFINITY) continue;  // no valid token seen yet by this slot
      const float alpha = exp2f(m[g] - m_new);
      float pu[U];
      float psum = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        pu[u] = exp2f(s[g][u] - m_new);
        psum += pu[u];
      }
      l[g] = l[g] * alpha + psum;
      m[g] = m_new;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float a = acc[g][i] * alpha;
#pragma unroll
        for (int u = 0; u < U; ++u) a = fmaf(pu[u], to_float(vv[u].v[i]), a);
        acc[g][i] = a;
      }
    }
  }

  // Merge the slots of each warp (lanes TPT apart hold the same head-dim slice).
#pragma unroll
  for (int o = TPT; o < 32; o <<= 1) {
#pragma unroll
    for (int g = 0; g < NG; ++g) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m[g], o);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[g], o);
      const float mx = fmaxf(m[g], m2);
      const float ca = mx == -INFINITY ? 0.f : exp2f(m[g] - mx);
      const float cb = mx == -INFINITY ? 0.f : exp2f(m2 - mx);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float a2 = __shfl_xor_sync(0xffffffffu, acc[g][i], o);
        acc[g][i] = acc[g][i] * ca + a2 * cb;
      }
      l[g] = l[g] * ca + l2 * cb;
      m[g] = mx;
    }
  }
  if (slot == 0) {
#pragma unroll
    for (int g = 0; g < NG; ++g) {
      if (active) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) s_acc[warp][g][vi * VEC + i] = acc[g][i];
      }
      if (lane == 0) {
        s_m[warp][g] = m[g];
        s_l[warp][g] = l[g];
      }
    }
  }
  __syncthreads();

  const bool single = used == 1;
  for (int idx = threadIdx.x; idx < NG * D; idx += kThreads) {
    const int g = idx / D, d = idx % D;
    if (g >= nh) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_m[w][g]);
    float L = 0.f, O = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float c = exp2f(s_m[w][g] - mx);
        L = fmaf(s_l[w][g], c, L);
        O = fmaf(s_acc[w][g][d], c, O);
      }
    }
    const float o = L > 0.f ? O / L : 0.f;
    const int64_t sh = static_cast<int64_t>(seq) * p.num_heads + h0 + g;
    if (single) {
      p.out[sh * D + d] = from_float<T>(o);
    } else {
      const int64_t ps = sh * p.num_splits + split;
      p.part_out[ps * D + d] = o;
      if (d == 0) {
        p.part_max[ps] = mx;
        p.part_sum[ps] = L;
      }
    }
  }
}

}  // namespace paged
}  // namespace modelyard
