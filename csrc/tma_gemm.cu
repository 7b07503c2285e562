// The batch-64 decode GEMM: out[M, N] = x[M, K] w[N, K]^T (+ bias[N]), or out += x w^T, for M <= 64
// rows, bf16 or fp16 with float32 accumulation, on Hopper (sm_90a: TMA and wgmma). Reached through
// skinny_gemm's configs kNumMmaConfigs and up (skinny_gemm.cu), which check the arguments.
//
// At M = 64 a decode step's GEMMs still only stream their weights (64 rows of x make 64 FLOP per
// weight byte, a quarter of the tensor cores' rate at 4 TB/s), but mma.sync cannot issue that much
// work from registers (skinny_gemm's own kernels lose to cuBLAS there, NOTES-perf.md v6) and cuBLAS's
// kernels read o_proj at 2.8 and down_proj at 3.6 TB/s on an H200 with no faster configuration on
// offer (v8). This kernel is built for the problem:
//   - one CTA per block_n columns (and K share), all M <= 64 rows in one wgmma m64 tile, so each
//     weight byte is read once; x is small and comes from L2;
//   - a producer warp streams x and w tiles (64-wide K blocks, 128-byte rows, the 128B swizzle wgmma
//     reads conflict-free) with TMA into a ring of stages guarded by mbarriers; one consumer
//     warpgroup multiplies each stage with wgmma.mma_async straight from shared memory, keeping one
//     stage's wgmmas in flight while it releases the one before;
//   - split-K over the CTAs of a thread-block cluster, summed through distributed shared memory
//     (gemm_epilogue.cuh, as skinny_gemm): no workspace, no second kernel, deterministic; or
//     (kind 3, XC > 1) no split-K and a cluster of column blocks sharing x by TMA multicast;
//   - rows past M, columns past N and K past its end are TMA's zero fill: no bounds checks inside;
//   - launched with PDL (common.cuh) in the decode graphs, the producer requests the first stages'
//     weights before griddepcontrol.wait, while the kernel ahead of it is still finishing.
// tma_gemm_pair_kernel (below, kind 2) is the other decomposition: the rows split over a CTA pair
// that receives each weight tile by TMA multicast, no split-K. Where each wins (none yet beats
// cuBLAS at M = 64 on an H200): benchmarks/NOTES-perf.md v10.
#include <c10/cuda/CUDAException.h>
#include <cuda.h>
#include <cudaTypedefs.h>

#include "common.cuh"
#include "gemm_epilogue.cuh"
#include "skinny_gemm.h"
#include "tma_ptx.cuh"

namespace modelyard {
namespace {

constexpr int kBM = 64;                   // rows of x per CTA: one wgmma m64 tile
constexpr int kBK = 64;                   // K per stage: 128-byte rows
constexpr int kConsumers = 128;           // one warpgroup
constexpr int kThreads = kConsumers + 32; // and the producer warp
constexpr int kRowBytes = kBK * 2;
constexpr int kXBytes = kBM * kRowBytes;  // 8 KiB

constexpr int kNumTmaConfigs = 9;  // with_config

template <int BN, int STAGES>
struct Layout {
  static constexpr int kStageBytes = kXBytes + BN * kRowBytes;  // x tile, then w tile; both 1024-aligned
  static constexpr int kPipeBytes = STAGES * kStageBytes;
  static constexpr int kRS = BN + 8;                           // reduction tile row stride (floats)
  static_assert(kBM * kRS * 4 <= kPipeBytes, "the reduction tile reuses the pipeline's shared memory");
  static constexpr int kSmem = 1024 + kPipeBytes + 2 * STAGES * 8;  // alignment slack, stages, barriers
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#ifdef MODELYARD_TMA_TRACE
// Diagnostics (not built by default): with MODELYARD_TMA_TRACE defined, thread 0 of every CTA prints
// its timeline (start, first stage arrived, main loop done, both epilogue barriers, end; globaltimer
// ns) after the epilogue: how NOTES-perf.md v9 split a call's time into ramp, stream and epilogue.
// The pair kernel prints "TP rank block smid" and its start, stages 0, 1, STAGES and last arrived, end.
__device__ __forceinline__ uint64_t globaltimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#endif
// One thread: fetches both tensor maps' descriptors early and initialises the stages' barriers:
// full (the producer's arrival and the bytes), empty (`releases` consumer arrivals).
template <int STAGES>
__device__ __forceinline__ void init_pipeline(const CUtensorMap* tx, const CUtensorMap* tw, uint32_t full0,
                                              uint32_t empty0, uint32_t releases) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(tx)) : "memory");
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(tw)) : "memory");
  for (int s = 0; s < STAGES; ++s) {
    mbar_init(full0 + 8 * s, 1);
    mbar_init(empty0 + 8 * s, releases);
  }
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
template <int NC, int E>
__device__ __forceinline__ void zero(float (&acc)[NC][E]) {
#pragma unroll
  for (int c = 0; c < NC; ++c)
#pragma unroll
    for (int e = 0; e < E; ++e) acc[c][e] = 0.f;
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// Grid (split_k, ceil(N / BN)), clusters of split_k CTAs along x: CTA `split` multiplies K blocks
// [split * kb_per_split, (split + 1) * kb_per_split) of columns [n0, n0 + BN).
// With XC > 1 instead (no split-K): grid (ceil(N / BN) rounded up to XC), clusters of XC CTAs with
// consecutive column blocks, which share x: each loads 64 / XC of its rows for all of them by TMA
// multicast (cuBLAS's structure for the wide shapes, NOTES-perf.md v10), so L2 serves x once per
// cluster; a stage is refilled once every CTA of the cluster has released it.
template <typename T, int BN, int STAGES, int XC = 1>
__global__ void __launch_bounds__(kThreads, 1)
    tma_gemm_kernel(const __grid_constant__ CUtensorMap tx, const __grid_constant__ CUtensorMap tw,
                    const T* __restrict__ bias, T* out, bool accumulate, int M, int N, int K, int kb_per_split,
                    bool pdl) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Layout<BN, STAGES>;
  constexpr int NC = BN / 64;  // m64n64 accumulators per thread
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t base = (raw + 1023) & ~1023u;  // the 128B swizzle wants 1024-byte aligned tiles
  float* red = reinterpret_cast<float*>(smem_raw + (base - raw));
  const uint32_t full0 = base + L::kPipeBytes, empty0 = full0 + STAGES * 8;
  auto x_tile = [&](int s) { return base + s * L::kStageBytes; };
  auto w_tile = [&](int s) { return base + s * L::kStageBytes + kXBytes; };

  const int tid = threadIdx.x;
#ifdef MODELYARD_TMA_TRACE
  uint64_t tr1 = 0, tr2 = 0, tra = 0, trb = 0;
  const uint64_t tr0 = globaltimer();
#endif
  const int split = XC > 1 ? 0 : blockIdx.x, splits = XC > 1 ? 1 : gridDim.x;
  const int n0 = (XC > 1 ? blockIdx.x : blockIdx.y) * BN, rank = blockIdx.x % XC;
  constexpr int kXRows = kBM / XC;  // x rows this CTA loads (for the whole cluster with XC > 1)
  const int kb_total = (K + kBK - 1) / kBK, kb0 = split * kb_per_split;
  const int nkb = max(0, min(kb_per_split, kb_total - kb0));

  if (tid == kConsumers) init_pipeline<STAGES>(&tx, &tw, full0, empty0, XC > 1 ? XC * (kConsumers / 32) : kConsumers);
  __syncthreads();
  if (XC > 1) cluster_arrive();  // waited for before the first x load: the others' barriers exist
  auto load_x = [&](int kb, int s) {
    if (XC > 1)
      tma_load_multicast(x_tile(s) + rank * kXRows * kRowBytes, &tx, (kb0 + kb) * kBK, rank * kXRows, full0 + 8 * s,
                         (1u << XC) - 1);
    else
      tma_load(x_tile(s), &tx, (kb0 + kb) * kBK, 0, full0 + 8 * s);
  };

  const TileShare<kBM, BN, kThreads> share(split, splits);
  Vec<T, 4> pre[TileShare<kBM, BN, kThreads>::kIters];

  float acc[NC][32];
  zero(acc);

  if (tid >= kConsumers) {
    // The producer (one thread). Launched with PDL, the first stages' weights go out before pdl_wait
    // (nothing before this kernel writes them), their x, which the kernel before may have written,
    // after it. Without PDL each stage's x goes with its weights: x of stage 0 behind a whole round of
    // weight boxes cost 1.3 us on Llama-7B's gate_up (H200, benchmarks/RESULTS.md session 15).
    const int early = pdl ? min(nkb, STAGES) : 0;
    if (tid == kConsumers) {
      for (int kb = 0; kb < early; ++kb) {
        mbar_expect_tx(full0 + 8 * kb, L::kStageBytes);
        tma_load(w_tile(kb), &tw, (kb0 + kb) * kBK, n0, full0 + 8 * kb);
      }
    }
    pdl_wait();
    pdl_trigger();
    if (accumulate) load_out_share(pre, share, out, M, N, n0);
    if (XC > 1) cluster_wait();
    if (tid == kConsumers) {
      for (int kb = 0; kb < early; ++kb) load_x(kb, kb);
      for (int kb = early; kb < nkb; ++kb) {
        const int s = kb % STAGES;
        if (kb >= STAGES) mbar_wait(empty0 + 8 * s, ((kb / STAGES) - 1) & 1);  // the consumers are done with kb - STAGES
        mbar_expect_tx(full0 + 8 * s, L::kStageBytes);
        tma_load(w_tile(s), &tw, (kb0 + kb) * kBK, n0, full0 + 8 * s);
        load_x(kb, s);
      }
    }
  } else {
    pdl_wait();
    pdl_trigger();
    if (accumulate) load_out_share(pre, share, out, M, N, n0);
    if (XC > 1) cluster_wait();
    const int lane = tid & 31;
    for (int kb = 0; kb < nkb; ++kb) {
      const int s = kb % STAGES;
      mbar_wait(full0 + 8 * s, (kb / STAGES) & 1);
#ifdef MODELYARD_TMA_TRACE
      if (kb == 0) tr1 = globaltimer();
#endif
      const uint64_t da = sw128_desc(x_tile(s)), db = sw128_desc(w_tile(s));
      wgmma_fence();
#pragma unroll
      for (int c = 0; c < NC; ++c) fence_regs(acc[c]);
      // One m64n<BN> wgmma per k16 step: x's slice is read from shared memory once, not NC times
      // (0.2-0.7 us on the decode shapes, benchmarks/gemm_stream.cu's mmaW, RESULTS.md session 15).
#pragma unroll
      for (int j = 0; j < kBK / 16; ++j) wgmma_64xN<T, NC>(acc, da + 2 * j, db + 2 * j);
      wgmma_commit();
#pragma unroll
      for (int c = 0; c < NC; ++c) fence_regs(acc[c]);
      wgmma_wait<1>();  // the stage before this one is read: hand it back to the producer(s)
      if (XC > 1) {
        if (kb > 0 && lane < XC) mbar_arrive_cluster(empty0 + 8 * ((kb - 1) % STAGES), lane);
        __syncwarp();
      } else if (kb > 0) {
        mbar_arrive(empty0 + 8 * ((kb - 1) % STAGES));
      }
    }
    wgmma_wait<0>();
#pragma unroll
    for (int c = 0; c < NC; ++c) fence_regs(acc[c]);
#ifdef MODELYARD_TMA_TRACE
    tr2 = globaltimer();
#endif
  }
  if (XC > 1) cluster_arrive();  // no CTA exits while another can still arrive on its barriers
  __syncthreads();  // every stage consumed: the pipeline's shared memory becomes the reduction tile
#ifdef MODELYARD_TMA_TRACE
  tra = globaltimer();
#endif

  if (tid < kConsumers) store_acc_tile<NC, L::kRS>(red, acc, tid);
  __syncthreads();
#ifdef MODELYARD_TMA_TRACE
  trb = globaltimer();
#endif
  cluster_reduce_store<T, kBM, BN, L::kRS, kThreads>(red, share, splits, pre, out, bias, accumulate, M, N, n0);
  if (XC > 1) cluster_wait();
#ifdef MODELYARD_TMA_TRACE
  if (tid == 0) {
    const uint64_t tr3 = globaltimer();
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    printf("TR %llx %d %d %u %llu %llu %llu %llu %llu %llu\n", reinterpret_cast<unsigned long long>(out), split,
           blockIdx.y, smid, tr0, tr1, tr2, tr3, tra, trb);
  }
#endif
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// The pair kernels (cuBLAS's decomposition of these shapes, NOTES-perf.md v9, v10): rows split across the
// two CTAs of a cluster instead of K. Both CTAs of a pair own the same block_n columns and all of K;
// rank r multiplies x rows [32 r, 32 r + 32). Each W tile is read once for both: each CTA's producer
// loads half of its rows by TMA multicast into the same stage of both CTAs, whose full barriers each
// count the whole tile; a stage is refilled only once the consumers of both CTAs have released it
// (each consumer warp arrives on both CTAs' empty barriers). No split-K: no partial sums and no
// reduction barrier, an epilogue of plain stores. The operands are swapped so that the 32 rows fit a
// wgmma without padding: d[block_n x 32] = W x^T, m64n32k16 per 64 columns, transposed on the way out.
// A stage may hold NK consecutive 64-wide K blocks (one TMA box each): 256 contiguous bytes per weight
// row per refill instead of 128 streamed faster on the smaller shapes (o_proj, down_proj).
constexpr int kPairRows = 32;                        // x rows per CTA
constexpr int kPairXBytes = kPairRows * kRowBytes;   // 4 KiB

template <int BN, int STAGES, int NK = 1>
struct PairLayout {
  static constexpr int kWBytes = BN * kRowBytes;  // one 64-wide K block of w
  static constexpr int kStageBytes = NK * (kWBytes + kPairXBytes);  // NK w tiles, then NK x tiles; 1024-aligned
  static constexpr int kPipeBytes = STAGES * kStageBytes;
  static constexpr int kRS = BN + 4;  // the output tile's row stride (floats): conflict-free transposed writes
  static_assert(kPairRows * kRS * 4 <= kPipeBytes, "the output tile reuses the pipeline's shared memory");
  static constexpr int kSmem = 1024 + kPipeBytes + 2 * STAGES * 8;
};

// Grid (2, ceil(N / BN)) in clusters of 2 along x.
template <typename T, int BN, int STAGES, int NK>
__global__ void __launch_bounds__(kThreads, 1)
    tma_gemm_pair_kernel(const __grid_constant__ CUtensorMap tx, const __grid_constant__ CUtensorMap tw,
                         const T* __restrict__ bias, T* out, bool accumulate, int M, int N, int K) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = PairLayout<BN, STAGES, NK>;
  constexpr int NC = BN / 64;          // m64n32 accumulators per thread
  constexpr int kHalfRows = BN / 2;    // W rows each CTA of the pair loads for both
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t base = (raw + 1023) & ~1023u;
  float* tile = reinterpret_cast<float*>(smem_raw + (base - raw));
  const uint32_t full0 = base + L::kPipeBytes, empty0 = full0 + STAGES * 8;
  auto w_tile = [&](int s, int q) { return base + s * L::kStageBytes + q * L::kWBytes; };
  auto x_tile = [&](int s, int q) { return base + s * L::kStageBytes + NK * L::kWBytes + q * kPairXBytes; };

  const int tid = threadIdx.x, rank = blockIdx.x, n0 = blockIdx.y * BN, m0 = rank * kPairRows;
  const int nkb = (K + NK * kBK - 1) / (NK * kBK), rows = M - m0;  // rows <= 0: this CTA only helps load W
  T* out_r = out + static_cast<int64_t>(m0) * N;

  if (tid == kConsumers) init_pipeline<STAGES>(&tx, &tw, full0, empty0, 2 * (kConsumers / 32));  // each consumer warp of both CTAs
  cluster_arrive();  // the partner's barriers exist before anything is multicast into it
  cluster_wait();
#ifdef MODELYARD_TMA_TRACE
  uint64_t tq[6] = {globaltimer(), 0, 0, 0, 0, 0};
#endif

  const TileShare<kPairRows, BN, kThreads> share(0, 1);
  Vec<T, 4> pre[TileShare<kPairRows, BN, kThreads>::kIters];
  float acc[NC][16];
  zero(acc);

  if (tid >= kConsumers) {
    const int first_round = min(nkb, STAGES);
    auto load_w = [&](int kb, int s) {
#pragma unroll
      for (int q = 0; q < NK; ++q)
        tma_load_multicast(w_tile(s, q) + rank * kHalfRows * kRowBytes, &tw, (kb * NK + q) * kBK,
                           n0 + rank * kHalfRows, full0 + 8 * s, 0x3);
    };
    auto load_x = [&](int kb, int s) {
#pragma unroll
      for (int q = 0; q < NK; ++q) tma_load(x_tile(s, q), &tx, (kb * NK + q) * kBK, m0, full0 + 8 * s);
    };
    if (tid == kConsumers) {
      for (int kb = 0; kb < first_round; ++kb) {
        mbar_expect_tx(full0 + 8 * kb, L::kStageBytes);
        load_w(kb, kb);
      }
    }
    pdl_wait();
    pdl_trigger();
    if (accumulate) load_out_share(pre, share, out_r, rows, N, n0);
    if (tid == kConsumers) {
      for (int kb = 0; kb < first_round; ++kb) load_x(kb, kb);
      for (int kb = first_round; kb < nkb; ++kb) {
        const int s = kb % STAGES;
        mbar_wait(empty0 + 8 * s, ((kb / STAGES) - 1) & 1);  // both CTAs are done with kb - STAGES
        mbar_expect_tx(full0 + 8 * s, L::kStageBytes);
        load_w(kb, s);
        load_x(kb, s);
      }
    }
  } else {
    pdl_wait();
    pdl_trigger();
    if (accumulate) load_out_share(pre, share, out_r, rows, N, n0);
    const int lane = tid & 31;
    for (int kb = 0; kb < nkb; ++kb) {
      const int s = kb % STAGES;
      mbar_wait(full0 + 8 * s, (kb / STAGES) & 1);
#ifdef MODELYARD_TMA_TRACE
      if (kb == 0) tq[1] = globaltimer();
      if (kb == 1) tq[2] = globaltimer();
      if (kb == STAGES) tq[3] = globaltimer();
      if (kb == nkb - 1) tq[4] = globaltimer();
#endif
      wgmma_fence();
#pragma unroll
      for (int c = 0; c < NC; ++c) fence_regs(acc[c]);
#pragma unroll
      for (int q = 0; q < NK; ++q) {
        const uint64_t dw = sw128_desc(w_tile(s, q)), dx = sw128_desc(x_tile(s, q));
#pragma unroll
        for (int j = 0; j < kBK / 16; ++j)
#pragma unroll
          for (int c = 0; c < NC; ++c) wgmma_64x32<T>(acc[c], dw + 2 * j + c * (64 * kRowBytes >> 4), dx + 2 * j);
      }
      wgmma_commit();
#pragma unroll
      for (int c = 0; c < NC; ++c) fence_regs(acc[c]);
      wgmma_wait<1>();  // the stage before this one is read: release it in both CTAs
      if (kb > 0 && lane < 2) mbar_arrive_cluster(empty0 + 8 * ((kb - 1) % STAGES), lane);
      __syncwarp();
    }
    wgmma_wait<0>();
#pragma unroll
    for (int c = 0; c < NC; ++c) fence_regs(acc[c]);
  }
  // Neither CTA may exit while the other can still arrive on its barriers: the wait is at the end.
  cluster_arrive();
  __syncthreads();  // every stage consumed: the pipeline's shared memory becomes the output tile

  if (tid < kConsumers) {
    // acc[c][4 j + 2 h + e] is d[column n][row m], n = 64 c + 16 warp + lane / 4 + 8 h, m = 8 j + 2 (lane % 4) + e.
    const int lane = tid & 31, n = 16 * (tid >> 5) + (lane >> 2), m = 2 * (lane & 3);
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int e = 0; e < 2; ++e) tile[(8 * j + m + e) * L::kRS + 64 * c + n + 8 * h] = acc[c][4 * j + 2 * h + e];
  }
  __syncthreads();
  cluster_reduce_store<T, kPairRows, BN, L::kRS, kThreads>(tile, share, 1, pre, out_r, bias, accumulate, rows, N, n0);
  cluster_wait();
#ifdef MODELYARD_TMA_TRACE
  if (tid == 0) {
    tq[5] = globaltimer();
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    printf("TP %d %d %u %llu %llu %llu %llu %llu %llu\n", rank, blockIdx.y, smid, tq[0], tq[1], tq[2], tq[3], tq[4], tq[5]);
  }
#endif
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q));
    TORCH_CHECK(q == cudaDriverEntryPointSuccess && p != nullptr,
                "tma_gemm: the CUDA driver does not offer cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// A [rows, K] row-major 16-bit matrix (row stride `stride` elements) read in boxes of box_rows x 64.
CUtensorMap tensor_map(const at::Tensor& t, int64_t rows, int64_t stride, int box_rows) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(t.size(1)), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(stride) * 2};
  const cuuint32_t box[2] = {kBK, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode_tiled()(
      &map, t.scalar_type() == at::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
      t.data_ptr(), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "tma_gemm: cuTensorMapEncodeTiled failed (CUresult ", num(static_cast<int>(r)), ")");
  return map;
}

template <int BN_, int STAGES_, bool PAIR_ = false, int NK_ = 1, int XC_ = 1>
struct Cfg {
  static constexpr int kBN = BN_, kStages = STAGES_, kNK = NK_, kXC = XC_;  // kXC: tma_gemm_kernel's x cluster
  static constexpr bool kPair = PAIR_;  // tma_gemm_pair_kernel: rows split over a CTA pair, no split-K
  static constexpr int kSmem = PAIR_ ? PairLayout<BN_, STAGES_, NK_>::kSmem : Layout<BN_, STAGES_>::kSmem;
};

template <typename T, typename C>
auto prepared_kernel() {
  auto kernel = [] {
    if constexpr (C::kPair)
      return tma_gemm_pair_kernel<T, C::kBN, C::kStages, C::kNK>;
    else
      return tma_gemm_kernel<T, C::kBN, C::kStages, C::kXC>;
  }();
  static const bool once = [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem));
    return true;
  }();
  (void)once;
  return kernel;
}

template <typename T, typename C>
void run(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, at::Tensor& out,
         bool accumulate, int split_k, cudaStream_t stream) {
  const int M = static_cast<int>(x.size(0)), K = static_cast<int>(x.size(1)), N = static_cast<int>(w.size(0));
  const T* b = bias ? static_cast<const T*>(bias->data_ptr()) : nullptr;
  T* o = static_cast<T*>(out.data_ptr());
  const unsigned blocks = static_cast<unsigned>(ceil_div(N, C::kBN));
  if constexpr (C::kPair) {
    TORCH_CHECK(split_k == 1, "tma_gemm: the pair configs do not split K");
    const CUtensorMap tx = tensor_map(x, M, x.stride(0), kPairRows), tw = tensor_map(w, N, K, C::kBN / 2);
    launch_ex(prepared_kernel<T, C>(), dim3(2, blocks, 1), dim3(kThreads, 1, 1), C::kSmem, 2, stream, tx, tw, b, o,
              accumulate, M, N, K);
  } else if constexpr (C::kXC > 1) {
    TORCH_CHECK(split_k == 1, "tma_gemm: the x-multicast configs do not split K");
    const CUtensorMap tx = tensor_map(x, M, x.stride(0), kBM / C::kXC), tw = tensor_map(w, N, K, C::kBN);
    launch_ex(prepared_kernel<T, C>(), dim3(static_cast<unsigned>(ceil_div(blocks, C::kXC) * C::kXC), 1, 1),
              dim3(kThreads, 1, 1), C::kSmem, C::kXC, stream, tx, tw, b, o, accumulate, M, N, K, ceil_div(K, kBK),
              pdl_on());
  } else {
    const CUtensorMap tx = tensor_map(x, M, x.stride(0), kBM), tw = tensor_map(w, N, K, C::kBN);
    const int kb_per_split = static_cast<int>(ceil_div(ceil_div(K, kBK), split_k));
    launch_ex(prepared_kernel<T, C>(), dim3(split_k, blocks, 1), dim3(kThreads, 1, 1), C::kSmem, split_k, stream, tx,
              tw, b, o, accumulate, M, N, K, kb_per_split, pdl_on());
  }
}

// f(Cfg<block_n, stages[, pair, K blocks per stage]>{}) for config: the one place a config index
// becomes template arguments. block_n a multiple of 64 (one wgmma m64n<block_n>k16 per k16 step, or
// m64n32k16 per 64 columns for a pair); stages so that 2 CTAs share an SM (~100 KiB each) or 1 streams deeper (~200 KiB).
// Measured and dropped (NOTES-perf.md v9, v10): block_n 256 (never the fastest), block_n 64 with 12
// stages (no faster than 6); for the pair kernel 16 single-block stages (as fast as 8 double ones),
// 4 K blocks per stage, 2 CTAs per SM with 2 K blocks per stage, block_n 128 (never the fastest pair
// on the H200), an L2 evict-first hint on the weights (no gain), and W loaded by each CTA for itself
// instead of multicast (no faster, no slower); for the x-sharing kernel clusters of 2 (slower than
// 4) and block_n 128 with 8 stages at 1 CTA per SM.
template <typename F>
void with_config(int config, F&& f) {
  static_assert(kNumTmaConfigs == 9, "one case per config");
  switch (config) {
    case 0: return f(Cfg<64, 6>{});
    case 1: return f(Cfg<128, 4>{});
    case 2: return f(Cfg<128, 8>{});
    case 3: return f(Cfg<192, 6>{});
    case 4: return f(Cfg<64, 8, true>{});
    case 5: return f(Cfg<64, 8, true, 2>{});
    case 6: return f(Cfg<64, 6, false, 1, 4>{});
    case 7: return f(Cfg<128, 4, false, 1, 4>{});
    default: return f(Cfg<192, 4, false, 1, 4>{});
  }
}

}  // namespace

int tma_gemm_num_configs(int major, int minor) {
#if defined(MODELYARD_SM90A)
  return major == 9 && minor == 0 ? kNumTmaConfigs : 0;
#else
  (void)major;
  (void)minor;
  return 0;  // built without sm_90a (wgmma): not on offer
#endif
}

TmaGemmInfo tma_gemm_info(int config) {
  TmaGemmInfo info{0, kThreads, 0};
  with_config(config, [&](auto c) {
    using C = decltype(c);
    info.block_n = C::kBN;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&info.ctas_per_sm, prepared_kernel<__nv_bfloat16, C>(),
                                                                 kThreads, C::kSmem));
  });
  return info;
}

int tma_gemm_kind(int config) {
  int kind = 1;
  with_config(config, [&](auto c) {
    using C = decltype(c);
    kind = C::kPair ? 2 : C::kXC > 1 ? 3 : 1;
  });
  return kind;
}

void tma_gemm_run(int config, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                  at::Tensor& out, bool accumulate, int split_k, cudaStream_t stream) {
  with_config(config, [&](auto c) {
    using C = decltype(c);
    if (x.scalar_type() == at::kBFloat16)
      run<__nv_bfloat16, C>(x, w, bias, out, accumulate, split_k, stream);
    else
      run<__half, C>(x, w, bias, out, accumulate, split_k, stream);
  });
}

}  // namespace modelyard
