// Where an M = 64 decode GEMM's time goes, built up one piece at a time (GPU only, sm_90a: TMA + wgmma).
//
// For each decode GEMM shape of the LLaVA-1.5-7B step (qkv, o_proj, gate_up, down_proj, LM head), as a
// CUDA graph chain over R distinct weight copies (every call reads its weights from DRAM, as in the
// step), microseconds per call, median of 11 replays:
//   plain   a grid-stride read of the weight bytes (the streaming yardstick of stream_floor.py)
//   cublas  cublasGemmEx at M = 64 with its default heuristic (the step's tuner may pick better)
// and a GEMM-shaped kernel (one CTA per block_n columns and K share, a producer thread streaming
// stages into a ring of mbarrier-guarded stages, one consumer warpgroup) at four levels (and two variants):
//   w       the weight tiles only (the consumer just hands each stage back)
//   w+x     plus the 64 x 64 x tile per stage (2D TMA from L2), as every M = 64 GEMM needs
//   mma     plus wgmma m64n64k16 on every stage (float32 accumulators)
//   epi     plus the epilogue: accumulators -> float tile in shared memory -> bf16 stores
//           (split 1 only: there is no split-K reduction here; checked against cuBLAS)
//   mmaW, epiW  mma and epi with one m64n<block_n>k16 wgmma per k16 step instead of block_n / 64
//           m64n64k16 ones (block_n 128-256), which read the x tile from shared memory once, not
//           block_n / 64 times (session 15)
// each with the weights read in two layouts:
//   tma2d   row-major W [N, K], 2D TMA boxes of 64 K x block_n rows in the 128B swizzle (what
//           csrc/tma_gemm.cu and cuBLAS read: block_n rows of 128 bytes per stage)
//   tiled   W stored tile by tile, each block_n x 64 tile contiguous and already in the 128B swizzle,
//           one 1D bulk copy per stage (cp.async.bulk): the same bytes in one contiguous request
//
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a benchmarks/gemm_stream.cu -lcublas -o /tmp/gemm_stream
//   /tmp/gemm_stream            (python benchmarks/gemm_stream.py builds and runs it)
// Results: benchmarks/RESULTS.md sessions 14 and 15; reading: NOTES-perf.md v14, v15.
// The PTX wrappers (mbarrier, TMA, wgmma) are csrc/tma_gemm.cu's, from csrc/tma_ptx.cuh (no torch headers).
#include <cublas_v2.h>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../csrc/tma_ptx.cuh"
#include "stream_read.cuh"

#define CK(x)                                                                                     \
  do {                                                                                            \
    cudaError_t e_ = (x);                                                                         \
    if (e_ != cudaSuccess) {                                                                      \
      std::printf("CUDA error %s (line %d): %s\n", #x, __LINE__, cudaGetErrorString(e_));         \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

namespace {

using namespace modelyard;

constexpr int kM = 64, kBK = 64, kXBytes = kM * kBK * 2;

__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst), "l"(src),
               "r"(bytes), "r"(bar)
               : "memory");
}
enum Level { kW = 0, kWX = 1, kMma = 2, kEpi = 3, kMmaWide = 4, kEpiWide = 5 };  // wide: one m64nBN wgmma per k16

// grid (splits, ceil(N / BN)); CTA (split, nb) multiplies K blocks [split * kbps, ...) of columns
// [nb * BN, nb * BN + BN). tiled: W tile (nb, kb) is BN * 128 contiguous bytes at (nb * KB + kb) * BN * 128.
// out (kEpi): [64, gridDim.y * BN] bf16.
template <int NC, int LEVEL>
__global__ void __launch_bounds__(160, 1) gemm_stream(const __grid_constant__ CUtensorMap tw, const __grid_constant__ CUtensorMap tx,
                                                      const uint8_t* wt, bool tiled, int KB, int kbps, int stages,
                                                      __nv_bfloat16* out, unsigned* sink) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // tma_ptx.cuh's wrappers exist in the sm_90a device pass only
  constexpr int BN = NC * 64;
  constexpr bool kX = LEVEL >= kWX, kMath = LEVEL >= kMma, kWide = LEVEL >= kMmaWide;
  constexpr bool kStore = LEVEL == kEpi || LEVEL == kEpiWide;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  __shared__ uint64_t bars[64];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t base = (raw + 1023) & ~1023u;
  const uint32_t full0 = static_cast<uint32_t>(__cvta_generic_to_shared(bars)), empty0 = full0 + 32 * 8;
  constexpr uint32_t kWBytes = BN * 128, kStage = kXBytes + kWBytes;
  const int tid = threadIdx.x, split = blockIdx.x, nb = blockIdx.y, n0 = nb * BN;
  const int kb0 = split * kbps, nkb = max(0, min(kbps, KB - kb0));
  if (tid == 128) {
    for (int s = 0; s < stages; ++s) {
      mbar_init(full0 + 8 * s, 1);
      mbar_init(empty0 + 8 * s, kMath ? 4 : 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (tid == 128) {  // the producer
    auto load = [&](int kb, int s) {
      const uint32_t stage = base + s * kStage;
      mbar_expect_tx(full0 + 8 * s, kX ? kStage : kWBytes);
      if (tiled)
        bulk_load(stage + kXBytes, wt + (static_cast<size_t>(nb) * KB + kb0 + kb) * kWBytes, kWBytes, full0 + 8 * s);
      else
        tma_load(stage + kXBytes, &tw, (kb0 + kb) * kBK, n0, full0 + 8 * s);
      if (kX) tma_load(stage, &tx, (kb0 + kb) * kBK, 0, full0 + 8 * s);
    };
    for (int kb = 0; kb < nkb; ++kb) {
      const int s = kb % stages;
      if (kb >= stages) mbar_wait(empty0 + 8 * s, ((kb / stages) - 1) & 1);
      load(kb, s);
    }
    return;
  }
  if (tid > 128) return;
  const int lane = tid & 31;
  if constexpr (!kMath) {
    if (tid != 0) return;
    unsigned acc = 0;
    for (int kb = 0; kb < nkb; ++kb) {
      const int s = kb % stages;
      mbar_wait(full0 + 8 * s, (kb / stages) & 1);
      acc ^= *reinterpret_cast<const volatile unsigned*>(smem_raw + (base - raw) + s * kStage + kXBytes);
      mbar_arrive(empty0 + 8 * s);
    }
    if (acc == 0x9e3779b9u) sink[0] = acc;
  } else {
    float acc[NC][32];
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
      for (int e = 0; e < 32; ++e) acc[c][e] = 0.f;
    for (int kb = 0; kb < nkb; ++kb) {
      const int s = kb % stages;
      mbar_wait(full0 + 8 * s, (kb / stages) & 1);
      const uint64_t da = sw128_desc(base + s * kStage), db = sw128_desc(base + s * kStage + kXBytes);
      wgmma_fence();
#pragma unroll
      for (int c = 0; c < NC; ++c) fence_regs(acc[c]);
#pragma unroll
      for (int j = 0; j < kBK / 16; ++j) {
        if constexpr (kWide) {  // acc[NC][32] is the m64nBN fragment, 64 columns after 64
          wgmma_64xN<__nv_bfloat16, NC>(acc, da + 2 * j, db + 2 * j);
        } else {
#pragma unroll
          for (int c = 0; c < NC; ++c) wgmma_64x64<__nv_bfloat16>(acc[c], da + 2 * j, db + 2 * j + c * (64 * 128 >> 4));
        }
      }
      wgmma_commit();
#pragma unroll
      for (int c = 0; c < NC; ++c) fence_regs(acc[c]);
      wgmma_wait<1>();  // stage kb - 1 is read: hand it back
      if (kb > 0 && lane == 0) mbar_arrive(empty0 + 8 * ((kb - 1) % stages));
    }
    wgmma_wait<0>();
#pragma unroll
    for (int c = 0; c < NC; ++c) fence_regs(acc[c]);
    if constexpr (kStore) {
      asm volatile("bar.sync 1, 128;" ::: "memory");  // every stage consumed: the ring becomes the output tile
      float* red = reinterpret_cast<float*>(smem_raw + (base - raw));
      constexpr int RS = BN + 8;
      store_acc_tile<NC, RS>(red, acc, tid);
      asm volatile("bar.sync 1, 128;" ::: "memory");
      const int N = gridDim.y * BN;
      for (int i = tid; i < kM * BN / 4; i += 128) {
        const int row = i / (BN / 4), col = (i % (BN / 4)) * 4;
        const float4 v = *reinterpret_cast<const float4*>(red + row * RS + col);
        __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
        uint2 u;
        u.x = *reinterpret_cast<unsigned*>(&a);
        u.y = *reinterpret_cast<unsigned*>(&b);
        *reinterpret_cast<uint2*>(out + static_cast<size_t>(row) * N + n0 + col) = u;
      }
    } else {
      float t = 0.f;
#pragma unroll
      for (int c = 0; c < NC; ++c)
#pragma unroll
        for (int e = 0; e < 32; ++e) t += acc[c][e];
      if (t == 12345.f) sink[0] = 1;
    }
  }
#endif
}

__global__ void fill_random(__nv_bfloat16* p, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    p[i] = __float2bfloat16((static_cast<float>(h & 0xFFFFFF) / 8388608.f - 1.f) * scale);
  }
}

// W [N, K] row-major -> tiles: tile (nb, kb) row r, 16-byte chunk c (K elements kb * 64 + 8 c ..) lands at
// chunk c ^ (r % 8) of the tile's row r (the 128B swizzle TMA would apply); rows past N are zero.
__global__ void repack_tiled(const __nv_bfloat16* w, uint8_t* t, int N, int K, int BN) {
  const int KB = K / kBK, nblocks = (N + BN - 1) / BN;
  const size_t chunks = static_cast<size_t>(nblocks) * BN * KB * 8;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < chunks; i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int c = i % 8, kb = (i / 8) % KB;
    const int row = static_cast<int>(i / (8 * static_cast<size_t>(KB)));  // nb * BN + r
    const int nb = row / BN, r = row % BN;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row < N) v = *reinterpret_cast<const uint4*>(w + static_cast<size_t>(row) * K + kb * kBK + 8 * c);
    *reinterpret_cast<uint4*>(t + (static_cast<size_t>(nb) * KB + kb) * BN * 128 + r * 128 + ((c ^ (r & 7)) * 16)) = v;
  }
}

PFN_cuTensorMapEncodeTiled_v12000 encode() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q));
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}
// [rows, K] row-major bf16 in boxes of 64 K x box_rows, 128B swizzle (as csrc/tma_gemm.cu's tensor_map).
CUtensorMap make_map(const void* p, int rows, int K, int box_rows) {
  CUtensorMap m;
  cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(rows)};
  cuuint64_t strides[1] = {static_cast<cuuint64_t>(K) * 2};
  cuuint32_t box[2] = {kBK, static_cast<cuuint32_t>(box_rows)};
  cuuint32_t es[2] = {1, 1};
  CUresult r = encode()(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(p), dims, strides, box, es,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::printf("cuTensorMapEncodeTiled failed (%d)\n", static_cast<int>(r));
    std::exit(1);
  }
  return m;
}

cudaStream_t stream;

// Median microseconds per call of body(r), r < R, captured as one graph.
template <typename F>
float graph_us(F body, int R) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int r = 0; r < R; ++r) body(r);
  CK(cudaStreamEndCapture(stream, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) CK(cudaGraphLaunch(ge, stream));
  std::vector<float> ts;
  for (int i = 0; i < 11; ++i) {
    CK(cudaEventRecord(a, stream));
    CK(cudaGraphLaunch(ge, stream));
    CK(cudaEventRecord(b, stream));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms * 1000.f / R);
  }
  std::sort(ts.begin(), ts.end());
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  return ts[ts.size() / 2];
}

using Kernel = void (*)(CUtensorMap, CUtensorMap, const uint8_t*, bool, int, int, int, __nv_bfloat16*, unsigned*);
template <int LEVEL>
Kernel kernel_for(int BN) {
  static_assert(LEVEL <= kEpiWide, "a level");
  switch (BN) {
    case 64: return gemm_stream<1, LEVEL>;
    case 128: return gemm_stream<2, LEVEL>;
    case 192: return gemm_stream<3, LEVEL>;
    default: return gemm_stream<4, LEVEL>;
  }
}
Kernel kernel_for(int BN, int level) {
  switch (level) {
    case kW: return kernel_for<kW>(BN);
    case kWX: return kernel_for<kWX>(BN);
    case kMma: return kernel_for<kMma>(BN);
    case kEpi: return kernel_for<kEpi>(BN);
    case kMmaWide: return kernel_for<kMmaWide>(BN);
    default: return kernel_for<kEpiWide>(BN);
  }
}

}  // namespace

int main() {
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  int sms;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  int drv, rt;
  CK(cudaDriverGetVersion(&drv));
  CK(cudaRuntimeGetVersion(&rt));
  std::printf("%s, %d SMs, driver API %d, runtime %d\n", prop.name, sms, drv, rt);
  constexpr int R = 8;
  const size_t maxbytes = static_cast<size_t>(32256) * 11008 * 2;
  std::vector<uint8_t*> w(R);
  for (int r = 0; r < R; ++r) {
    CK(cudaMalloc(&w[r], maxbytes));
    fill_random<<<4 * sms, 256, 0, stream>>>(reinterpret_cast<__nv_bfloat16*>(w[r]), maxbytes / 2, 17u + r, 0.05f);
  }
  uint8_t* tiled;
  CK(cudaMalloc(&tiled, maxbytes));
  unsigned* sink;
  CK(cudaMalloc(&sink, 256));
  __nv_bfloat16 *x, *ref, *out;
  CK(cudaMalloc(&x, kM * 11008 * 2));
  CK(cudaMalloc(&ref, kM * 32256 * 2));
  CK(cudaMalloc(&out, kM * 32256 * 2));
  fill_random<<<sms, 256, 0, stream>>>(x, kM * 11008, 5u, 1.f);
  cublasHandle_t h;
  cublasCreate(&h);
  cublasSetStream(h, stream);
  void* ws;
  CK(cudaMalloc(&ws, 64 << 20));
  cublasSetWorkspace(h, ws, 64 << 20);
  const float alpha = 1.f, beta = 0.f;
  auto cublas = [&](const void* wp, int N, int K, __nv_bfloat16* y) {
    cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, kM, K, &alpha, wp, CUDA_R_16BF, K, x, CUDA_R_16BF, K, &beta, y, CUDA_R_16BF, N,
                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  };
  {
    const size_t n = maxbytes & ~static_cast<size_t>(15);
    const float us = graph_us([&](int r) { stream_read<<<sms * 8, 256, 0, stream>>>(reinterpret_cast<const V16*>(w[r]), n / 16, sink); }, R);
    std::printf("copy bandwidth (plain read of %zu MB): %.0f GB/s\n", n >> 20, n / us / 1e3);
  }
  struct Shape {
    const char* name;
    int N, K;
    std::vector<int> bns;
  };
  const Shape shapes[] = {{"qkv", 12288, 4096, {128, 192}},
                          {"o_proj", 4096, 4096, {64, 128}},
                          {"gate_up", 22016, 4096, {128, 192, 256}},
                          {"down_proj", 4096, 11008, {64, 128}},
                          {"lm_head", 32064, 4096, {128, 192, 256}}};
  const char* level_names[] = {"w    ", "w+x  ", "mma  ", "epi  ", "mmaW ", "epiW "};
  int failures = 0;
  for (const Shape& s : shapes) {
    const size_t bytes = static_cast<size_t>(s.N) * s.K * 2;
    const int KB = s.K / kBK;
    const float plain =
        graph_us([&](int r) { stream_read<<<sms * 8, 256, 0, stream>>>(reinterpret_cast<const V16*>(w[r]), bytes / 16, sink); }, R);
    const float cub = graph_us([&](int r) { cublas(w[r], s.N, s.K, ref); }, R);
    std::printf("\n%s N %d K %d (%.1f MB): plain %.2f us (%.0f GB/s), cublas %.2f us (%.2fx plain)\n", s.name, s.N, s.K, bytes / 1e6,
                plain, bytes / plain / 1e3, cub, cub / plain);
    const CUtensorMap txm = make_map(x, kM, s.K, kM);
    for (int BN : s.bns) {
      const int nblocks = (s.N + BN - 1) / BN;
      int splits = 1;
      while (nblocks * splits * 2 <= sms * 1.1) splits *= 2;
      const int kbps = (KB + splits - 1) / splits;
      const int stages = std::min(32, (208 * 1024) / (kXBytes + BN * 128));
      const size_t smem = stages * (kXBytes + BN * 128) + 1024;
      std::vector<CUtensorMap> maps(R);
      for (int r = 0; r < R; ++r) maps[r] = make_map(w[r], s.N, s.K, BN);
      auto launch = [&](Kernel k, int r, bool tiled_layout, const uint8_t* wt) {
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3(splits, nblocks);
        cfg.blockDim = dim3(160);
        cfg.dynamicSmemBytes = smem;
        cfg.stream = stream;
        CK(cudaLaunchKernelEx(&cfg, k, maps[r], txm, wt, tiled_layout, KB, kbps, stages, out, sink));
      };
      std::printf("  block_n %d, split %d: %d CTAs, %d stages\n", BN, splits, nblocks * splits, stages);
      for (int level = kW; level <= kEpiWide; ++level) {
        if ((level == kEpi || level == kEpiWide) && splits > 1) continue;
        if (level >= kMmaWide && BN == 64) continue;  // n64 is one instruction already
        const Kernel k = kernel_for(BN, level);
        CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, 220 * 1024));
        float us[2];
        for (int t = 0; t < 2; ++t) us[t] = graph_us([&](int r) { launch(k, r, t == 1, w[r]); }, R);
        std::printf("    %s tma2d %6.2f us (%.2fx plain, %.2fx cublas)   tiled %6.2f us (%.2fx plain, %.2fx cublas)\n",
                    level_names[level], us[0], us[0] / plain, us[0] / cub, us[1], us[1] / plain, us[1] / cub);
        if (level != kEpi && level != kEpiWide) continue;
        // Correctness of the full kernel on copy 0, both layouts, against cuBLAS.
        cublas(w[0], s.N, s.K, ref);
        repack_tiled<<<4 * sms, 256, 0, stream>>>(reinterpret_cast<const __nv_bfloat16*>(w[0]), tiled, s.N, s.K, BN);
        std::vector<__nv_bfloat16> hr(static_cast<size_t>(kM) * s.N), ho(static_cast<size_t>(kM) * nblocks * BN);
        CK(cudaMemcpyAsync(hr.data(), ref, hr.size() * 2, cudaMemcpyDeviceToHost, stream));
        for (int t = 0; t < 2; ++t) {
          CK(cudaMemsetAsync(out, 0, ho.size() * 2, stream));
          launch(k, 0, t == 1, t == 1 ? tiled : w[0]);
          CK(cudaMemcpyAsync(ho.data(), out, ho.size() * 2, cudaMemcpyDeviceToHost, stream));
          CK(cudaStreamSynchronize(stream));
          double err = 0, mag = 0;
          for (int m = 0; m < kM; ++m)
            for (int n = 0; n < s.N; ++n) {
              const double a = __bfloat162float(hr[static_cast<size_t>(m) * s.N + n]);
              const double b = __bfloat162float(ho[static_cast<size_t>(m) * nblocks * BN + n]);
              err = std::max(err, std::fabs(a - b));
              mag = std::max(mag, std::fabs(a));
            }
          const bool ok = err <= 0.02 * mag;
          failures += !ok;
          std::printf("      check %s: max |ours - cublas| %.3g of max |cublas| %.3g: %s\n", t ? "tiled" : "tma2d", err, mag,
                      ok ? "ok" : "WRONG");
        }
      }
    }
    std::fflush(stdout);
  }
  CK(cudaDeviceSynchronize());
  std::printf("\n%s\n", failures ? "CHECK FAILED" : "all checks ok");
  return failures ? 1 : 0;
}
