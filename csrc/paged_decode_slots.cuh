// The paged decode kernel ("slot" kernel).
#pragma once

#include "paged_common.cuh"

namespace modelyard {
namespace paged {

// Every group of TPT lanes (a "slot") keeps its own online-softmax state (max, sum,
// output accumulators) over its own tokens, so the main loop has no block-wide barrier and no
// shared-memory logits, and each lane keeps 2U loads (its tokens' K and V rows) in flight.
// Slots and then warps are merged once at the end.
// PF (variant 3): the loads of a slot's next U tokens are issued before the current ones are
// used, so every lane has loads in flight while it computes (variant 2 waits for each tile).
// C is the cache element: a 16-byte load holds 8 bf16/fp16 or 16 fp8 values; the fp8 cache's
// k_scale is folded into the query (scale_log2) and its v_scale into the output.
template <typename T, typename C, int D, int NG, int VARIANT>
__global__ void __launch_bounds__(kThreads) paged_decode_kernel_v2(const Params<T, C> p) {
  constexpr bool PF = VARIANT == 3;
  // Cache elements per lane per row: one 16-byte load, except fp8 with 4+ heads per CTA, where 16
  // query and accumulator floats per head would not fit in registers (8-byte loads instead).
  constexpr int VEC = (sizeof(C) == 1 && NG >= 4) ? 8 : 16 / sizeof(C);
  static_assert(D % VEC == 0, "head dim must be a whole number of 16-byte vectors");
  constexpr int NVEC = D / VEC;
  static_assert(NVEC <= 32, "one warp must cover a K/V row");
  constexpr int TPT = NextPow2<NVEC>::value;
  constexpr int TPW = 32 / TPT;
  // consecutive tokens per slot per step
  constexpr int U = PF ? (NG >= 4 ? 2 : 4) : (TPW >= 4 ? 2 : 4);
  constexpr int NS = kWarps * TPW;    // slots per CTA
  constexpr int QV = 16 / sizeof(T);  // query elements per 16-byte load
  static_assert(VEC % QV == 0, "a lane's query slice is a whole number of 16-byte loads");

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
      const T* qp = p.q + seq * p.q_stride_s + (h0 + g) * p.q_stride_h + vi * VEC;
#pragma unroll
      for (int j = 0; j < VEC / QV; ++j) {
        const Vec<T, QV> qv = load_vec<T, QV>(qp + j * QV);
#pragma unroll
        for (int i = 0; i < QV; ++i) qf[g][j * QV + i] = to_float(qv.v[i]) * p.scale_log2;
      }
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
  // Inactive lanes (head dims that are not a power-of-two number of vectors) read the row's first
  // vector: their query slice is zero, so they add nothing, and their accumulators are never stored.
  const int vl = active ? vi : 0;
  const C* k_base = p.k_cache + kvh * D + vl * VEC;
  const C* v_base = p.v_cache + kvh * D + vl * VEC;

  // This slot's K and V rows for tokens tb .. tb + U - 1. Branch-free, so the compiler can prove
  // the warp converged at the shuffles (a divergent load branch made it wrap every shuffle in a
  // WARPSYNC.COLLECTIVE sequence, SASS on an H200): tokens past the end re-read the last token,
  // a real cache row with finite values, whose score is masked to -inf (weight exactly 0).
  auto load_tile = [&](int tb, Vec<C, VEC>(&kv)[U], Vec<C, VEC>(&vv)[U]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = max(min(tb + u, end - 1), 0);  // 0: an empty sequence reads its (padding) block 0
      const int64_t row = (static_cast<int64_t>(bt[t >> p.block_shift]) << p.block_shift) + (t & bs_mask);
      kv[u] = load_vec<C, VEC>(k_base + row * tok_stride);
      vv[u] = load_vec<C, VEC>(v_base + row * tok_stride);
    }
  };

  Vec<C, VEC> kn[U], vn[U];  // PF: the next tile, in flight while the current one is used
  if constexpr (PF) load_tile(start + warp * TPW * U + slot * U, kn, vn);

  // The loop bound depends on the warp only, so every lane runs the same shuffles.
#pragma unroll 1
  for (int t0 = start + warp * TPW * U; t0 < end; t0 += NS * U) {
    const int tb = t0 + slot * U;
    Vec<C, VEC> kv[U], vv[U];
    if constexpr (PF) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        kv[u] = kn[u];
        vv[u] = vn[u];
      }
      load_tile(tb + NS * U, kn, vn);
    } else {
      load_tile(tb, kv, vv);
    }
    float s[NG][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[VEC];
      cache_to_float<C, VEC>(kv[u], kf);
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
    // Online softmax per head, then P.V with each token's V row converted once, inside the loop
    // (U x VEC floats of converted V at once would cost registers; the sum order is unchanged).
    float pu[NG][U];
#pragma unroll
    for (int g = 0; g < NG; ++g) {
      float bmax = s[g][0];
#pragma unroll
      for (int u = 1; u < U; ++u) bmax = fmaxf(bmax, s[g][u]);
      const float m_new = fmaxf(m[g], bmax);
      // No valid token seen yet by this slot: weights 0 (its V rows are real, finite rows), acc stays 0.
      const float alpha = m_new == -INFINITY ? 1.f : exp2f(m[g] - m_new);
      float psum = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        pu[g][u] = m_new == -INFINITY ? 0.f : exp2f(s[g][u] - m_new);
        psum += pu[g][u];
      }
      l[g] = l[g] * alpha + psum;
      m[g] = m_new;
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[g][i] *= alpha;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[VEC];
      cache_to_float<C, VEC>(vv[u], vf);
#pragma unroll
      for (int g = 0; g < NG; ++g) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[g][i] = fmaf(pu[g][u], vf[i], acc[g][i]);
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
    const float o = L > 0.f ? O / L * p.v_scale : 0.f;
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
