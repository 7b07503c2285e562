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
//     (gemm_epilogue.cuh, as skinny_gemm): no workspace, no second kernel, deterministic;
//   - rows past M, columns past N and K past its end are TMA's zero fill: no bounds checks inside;
//   - launched with PDL (common.cuh) in the decode graphs, the producer requests the first stages'
//     weights before griddepcontrol.wait, while the kernel ahead of it is still finishing.
#include <c10/cuda/CUDAException.h>
#include <cuda.h>
#include <cudaTypedefs.h>

#include "common.cuh"
#include "gemm_epilogue.cuh"
#include "skinny_gemm.h"

namespace modelyard {
namespace {

constexpr int kBM = 64;                   // rows of x per CTA: one wgmma m64 tile
constexpr int kBK = 64;                   // K per stage: 128-byte rows
constexpr int kConsumers = 128;           // one warpgroup
constexpr int kThreads = kConsumers + 32; // and the producer warp
constexpr int kRowBytes = kBK * 2;
constexpr int kXBytes = kBM * kRowBytes;  // 8 KiB

constexpr int kNumTmaConfigs = 4;  // (block_n, stages) pairs: with_config

template <int BN, int STAGES>
struct Layout {
  static constexpr int kStageBytes = kXBytes + BN * kRowBytes;  // x tile, then w tile; both 1024-aligned
  static constexpr int kPipeBytes = STAGES * kStageBytes;
  static constexpr int kRS = BN + 8;                           // reduction tile row stride (floats)
  static_assert(kBM * kRS * 4 <= kPipeBytes, "the reduction tile reuses the pipeline's shared memory");
  static constexpr int kSmem = 1024 + kPipeBytes + 2 * STAGES * 8;  // alignment slack, stages, barriers
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n}" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// A 2D box of `map` at (c0 = K element, c1 = row) into shared memory, completing `bar`'s transaction.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// wgmma shared-memory descriptor of a K-major tile of 128-byte rows in the 128B swizzle, 8-row
// groups 1024 bytes apart (start address and strides in 16-byte units; layout type 1 = 128B swizzle).
// Adding 2 (32 bytes) moves to the next k16 slice of the rows.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (1ull << 16) | (static_cast<uint64_t>(1024 >> 4) << 32) |
         (1ull << 62);
}

// d[64 x 64] += a[64 x 16] b[64 x 16]^T, both from shared memory. d's layout: thread t of the
// warpgroup holds d[8 j + {0..3}] = rows 16 (t / 32) + (t % 32) / 4 (+ 8 for the last two), columns
// 8 j + 2 (t % 4) + {0, 1}.
template <typename T>
__device__ __forceinline__ void wgmma_64x64(float (&d)[32], uint64_t a, uint64_t b) {
#define MY_D8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                 "+f"(d[i + 6]), "+f"(d[i + 7])
#define MY_WGMMA(TYPE)                                                                                          \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                    \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE                                     \
               " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
               "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"     \
               : MY_D8(0), MY_D8(8), MY_D8(16), MY_D8(24)                                                      \
               : "l"(a), "l"(b), "r"(1))
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    MY_WGMMA("bf16");
  } else {
    MY_WGMMA("f16");
  }
#undef MY_WGMMA
#undef MY_D8
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
#ifdef MODELYARD_TMA_TRACE
// Diagnostics (not built by default): with MODELYARD_TMA_TRACE defined, thread 0 of every CTA prints
// its timeline (start, first stage arrived, main loop done, both epilogue barriers, end; globaltimer
// ns) after the epilogue: how NOTES-perf.md v9 split a call's time into ramp, stream and epilogue.
__device__ __forceinline__ uint64_t globaltimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#endif
// Keeps the compiler from touching accumulators while a wgmma that writes them is in flight.
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// Grid (split_k, ceil(N / BN)), clusters of split_k CTAs along x: CTA `split` multiplies K blocks
// [split * kb_per_split, (split + 1) * kb_per_split) of columns [n0, n0 + BN).
template <typename T, int BN, int STAGES>
__global__ void __launch_bounds__(kThreads, 1)
    tma_gemm_kernel(const __grid_constant__ CUtensorMap tx, const __grid_constant__ CUtensorMap tw,
                    const T* __restrict__ bias, T* out, bool accumulate, int M, int N, int K, int kb_per_split) {
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
  const int split = blockIdx.x, splits = gridDim.x, n0 = blockIdx.y * BN;
  const int kb_total = (K + kBK - 1) / kBK, kb0 = split * kb_per_split;
  const int nkb = max(0, min(kb_per_split, kb_total - kb0));

  if (tid == kConsumers) {
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tx)) : "memory");
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tw)) : "memory");
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full0 + 8 * s, 1);
      mbar_init(empty0 + 8 * s, kConsumers);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  const TileShare<kBM, BN, kThreads> share(split, splits);
  Vec<T, 4> pre[TileShare<kBM, BN, kThreads>::kIters];

  float acc[NC][32];
#pragma unroll
  for (int c = 0; c < NC; ++c)
#pragma unroll
    for (int e = 0; e < 32; ++e) acc[c][e] = 0.f;

  if (tid >= kConsumers) {
    // The producer (one thread). The first stages' weights go out before pdl_wait: nothing before
    // this kernel writes them. x, which the kernel before may have written, only after it.
    const int first_round = min(nkb, STAGES);
    if (tid == kConsumers) {
      for (int kb = 0; kb < first_round; ++kb) {
        mbar_expect_tx(full0 + 8 * kb, L::kStageBytes);
        tma_load(w_tile(kb), &tw, (kb0 + kb) * kBK, n0, full0 + 8 * kb);
      }
    }
    pdl_wait();
    pdl_trigger();
    if (accumulate) load_out_share(pre, share, out, M, N, n0);
    if (tid == kConsumers) {
      for (int kb = 0; kb < first_round; ++kb) tma_load(x_tile(kb), &tx, (kb0 + kb) * kBK, 0, full0 + 8 * kb);
      for (int kb = first_round; kb < nkb; ++kb) {
        const int s = kb % STAGES;
        mbar_wait(empty0 + 8 * s, ((kb / STAGES) - 1) & 1);  // the consumers are done with kb - STAGES
        mbar_expect_tx(full0 + 8 * s, L::kStageBytes);
        tma_load(w_tile(s), &tw, (kb0 + kb) * kBK, n0, full0 + 8 * s);
        tma_load(x_tile(s), &tx, (kb0 + kb) * kBK, 0, full0 + 8 * s);
      }
    }
  } else {
    pdl_wait();
    pdl_trigger();
    if (accumulate) load_out_share(pre, share, out, M, N, n0);
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
#pragma unroll
      for (int j = 0; j < kBK / 16; ++j)
#pragma unroll
        for (int c = 0; c < NC; ++c) wgmma_64x64<T>(acc[c], da + 2 * j, db + 2 * j + c * (64 * kRowBytes >> 4));
      wgmma_commit();
#pragma unroll
      for (int c = 0; c < NC; ++c) fence_regs(acc[c]);
      wgmma_wait<1>();  // the stage before this one is read: hand it back to the producer
      if (kb > 0) mbar_arrive(empty0 + 8 * ((kb - 1) % STAGES));
    }
    wgmma_wait<0>();
#pragma unroll
    for (int c = 0; c < NC; ++c) fence_regs(acc[c]);
#ifdef MODELYARD_TMA_TRACE
    tr2 = globaltimer();
#endif
  }
  __syncthreads();  // every stage consumed: the pipeline's shared memory becomes the reduction tile
#ifdef MODELYARD_TMA_TRACE
  tra = globaltimer();
#endif

  if (tid < kConsumers) {
    const int lane = tid & 31, row0 = 16 * (tid >> 5) + (lane >> 2), col0 = 2 * (lane & 3);
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          *reinterpret_cast<float2*>(red + (row0 + 8 * h) * L::kRS + c * 64 + 8 * j + col0) =
              make_float2(acc[c][4 * j + 2 * h], acc[c][4 * j + 2 * h + 1]);
  }
  __syncthreads();
#ifdef MODELYARD_TMA_TRACE
  trb = globaltimer();
#endif
  cluster_reduce_store<T, kBM, BN, L::kRS, kThreads>(red, share, splits, pre, out, bias, accumulate, M, N, n0);
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

template <typename T, int BN, int STAGES>
auto prepared_kernel() {
  auto kernel = tma_gemm_kernel<T, BN, STAGES>;
  static const bool once = [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Layout<BN, STAGES>::kSmem));
    return true;
  }();
  (void)once;
  return kernel;
}

template <typename T, int BN, int STAGES>
void run(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, at::Tensor& out,
         bool accumulate, int split_k, cudaStream_t stream) {
  const int M = static_cast<int>(x.size(0)), K = static_cast<int>(x.size(1)), N = static_cast<int>(w.size(0));
  const CUtensorMap tx = tensor_map(x, M, x.stride(0), kBM), tw = tensor_map(w, N, K, BN);
  const int kb_per_split = static_cast<int>(ceil_div(ceil_div(K, kBK), split_k));
  launch_ex(prepared_kernel<T, BN, STAGES>(), dim3(split_k, static_cast<unsigned>(ceil_div(N, BN)), 1),
            dim3(kThreads, 1, 1), Layout<BN, STAGES>::kSmem, split_k, stream, tx, tw,
            bias ? static_cast<const T*>(bias->data_ptr()) : nullptr,
            static_cast<T*>(out.data_ptr()), accumulate, M, N, K, kb_per_split);
}

template <int BN_, int STAGES_>
struct Cfg {
  static constexpr int kBN = BN_, kStages = STAGES_;
};
// f(Cfg<block_n, stages>{}) for config: the one place a config index becomes template arguments.
// block_n a multiple of 64 (wgmma m64n64k16 per 64 columns); stages so that 2 CTAs share an SM
// (~100 KiB each) or 1 streams deeper (~200 KiB). Measured and dropped (H100, NOTES-perf.md v9):
// block_n 256 (never the fastest), block_n 64 with 12 stages (no faster than 6).
template <typename F>
void with_config(int config, F&& f) {
  static_assert(kNumTmaConfigs == 4, "one case per config");
  switch (config) {
    case 0: return f(Cfg<64, 6>{});
    case 1: return f(Cfg<128, 4>{});
    case 2: return f(Cfg<128, 8>{});
    default: return f(Cfg<192, 6>{});
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
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&info.ctas_per_sm,
                                                                 prepared_kernel<__nv_bfloat16, C::kBN, C::kStages>(),
                                                                 kThreads, Layout<C::kBN, C::kStages>::kSmem));
  });
  return info;
}

void tma_gemm_run(int config, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                  at::Tensor& out, bool accumulate, int split_k, cudaStream_t stream) {
  with_config(config, [&](auto c) {
    using C = decltype(c);
    if (x.scalar_type() == at::kBFloat16)
      run<__nv_bfloat16, C::kBN, C::kStages>(x, w, bias, out, accumulate, split_k, stream);
    else
      run<__half, C::kBN, C::kStages>(x, w, bias, out, accumulate, split_k, stream);
  });
}

}  // namespace modelyard
