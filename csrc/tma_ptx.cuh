// PTX wrappers for Hopper (sm_90a) TMA + wgmma kernels: mbarriers, TMA box loads (multicast too),
// cluster barriers, wgmma shared-memory descriptors and the wgmma instructions. Shared by
// csrc/tma_gemm.cu and benchmarks/gemm_stream.cu; plain CUDA, no torch headers, so the benchmark
// builds with nvcc alone. Defined only where the sm_90a features are (the device pass for sm_90a).
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace modelyard {

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

// The same, multicast: the box lands at `dst` and completes the barrier at `bar` (offsets in this
// CTA's shared memory) in every CTA of the cluster whose bit is set in `mask`.
__device__ __forceinline__ void tma_load_multicast(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar,
                                                   uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar), "h"(mask)
      : "memory");
}
// Arrives on the barrier at offset `bar` of cluster rank `rank`'s shared memory (this CTA's included).
// The default semantics (release, CTA scope), as CUTLASS's ClusterBarrier: an explicit
// .release.cluster made every arrival wait for the SM's loads in flight, so the pipeline drained at
// each stage (3x slower, NOTES-perf.md v10).
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(bar), "r"(rank));
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(remote) : "memory");
}
// Every thread of every CTA of the cluster arrives (release) / waits for all to have arrived (acquire).
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire;" ::: "memory"); }

// wgmma shared-memory descriptor of a K-major tile of 128-byte rows in the 128B swizzle, 8-row
// groups 1024 bytes apart (start address and strides in 16-byte units; layout type 1 = 128B swizzle).
// Adding 2 (32 bytes) moves to the next k16 slice of the rows.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (1ull << 16) | (static_cast<uint64_t>(1024 >> 4) << 32) |
         (1ull << 62);
}

// One wgmma.mma_async of SHAPE with float32 accumulators ACC (operands %0..), descriptors A and B
// and scale-d P (their operand numbers, after the accumulators), bf16 or f16 by T; the accumulator
// constraints follow.
#define MY_WGMMA_TYPED(TYPE, SHAPE, ACC, A, B, P, ...)                                                    \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " P ", 0;\n"                                             \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." TYPE "." TYPE " " ACC ", " A ", " B         \
               ", p, 1, 1, 0, 0;\n}\n"                                                                    \
               : __VA_ARGS__                                                                              \
               : "l"(a), "l"(b), "r"(1))
#define MY_WGMMA(...)                                         \
  do {                                                        \
    if constexpr (std::is_same_v<T, __nv_bfloat16>)           \
      MY_WGMMA_TYPED("bf16", __VA_ARGS__);                    \
    else                                                      \
      MY_WGMMA_TYPED("f16", __VA_ARGS__);                     \
  } while (0)
#define MY_D8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                 "+f"(d[i + 6]), "+f"(d[i + 7])
// d[64 x 64] += a[64 x 16] b[64 x 16]^T, both from shared memory. d's layout: thread t of the
// warpgroup holds d[8 j + {0..3}] = rows 16 (t / 32) + (t % 32) / 4 (+ 8 for the last two), columns
// 8 j + 2 (t % 4) + {0, 1}.
template <typename T>
__device__ __forceinline__ void wgmma_64x64(float (&d)[32], uint64_t a, uint64_t b) {
  MY_WGMMA("m64n64k16",
           "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "
           "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}",
           "%32", "%33", "%34", MY_D8(0), MY_D8(8), MY_D8(16), MY_D8(24));
}
// d[64 x 32] += a[64 x 16] b[32 x 16]^T, both from shared memory; d's layout as wgmma_64x64's over
// 32 columns (j < 4).
template <typename T>
__device__ __forceinline__ void wgmma_64x32(float (&d)[16], uint64_t a, uint64_t b) {
  MY_WGMMA("m64n32k16", "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}", "%16", "%17",
           "%18", MY_D8(0), MY_D8(8));
}
// d[64 x N] += a[64 x 16] b[N x 16]^T in one instruction, N = 128, 192, 256: d's layout as
// wgmma_64x64's over N columns (j < N / 8), i.e. N / 64 wgmma_64x64 accumulators back to back. A is read
// from shared memory once per instruction, not once per 64 columns. MY_R32_q: accumulator operands
// %32q..%32q+31 (string pieces); MY_D32(i): their constraints, d[i..i+31].
#define MY_R32_0 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define MY_R32_1 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define MY_R32_2 "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
                 "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
#define MY_R32_3 "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
                 "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define MY_D32(i) MY_D8(i), MY_D8(i + 8), MY_D8(i + 16), MY_D8(i + 24)
template <typename T>
__device__ __forceinline__ void wgmma_64x128(float (&d)[64], uint64_t a, uint64_t b) {
  MY_WGMMA("m64n128k16", "{" MY_R32_0 ", " MY_R32_1 "}", "%64", "%65", "%66", MY_D32(0), MY_D32(32));
}
template <typename T>
__device__ __forceinline__ void wgmma_64x192(float (&d)[96], uint64_t a, uint64_t b) {
  MY_WGMMA("m64n192k16", "{" MY_R32_0 ", " MY_R32_1 ", " MY_R32_2 "}", "%96", "%97", "%98", MY_D32(0), MY_D32(32),
           MY_D32(64));
}
template <typename T>
__device__ __forceinline__ void wgmma_64x256(float (&d)[128], uint64_t a, uint64_t b) {
  MY_WGMMA("m64n256k16", "{" MY_R32_0 ", " MY_R32_1 ", " MY_R32_2 ", " MY_R32_3 "}", "%128", "%129", "%130",
           MY_D32(0), MY_D32(32), MY_D32(64), MY_D32(96));
}
#undef MY_D32
#undef MY_R32_3
#undef MY_R32_2
#undef MY_R32_1
#undef MY_R32_0
// d[64 x 64 NC] += a b^T as the widest single instruction: acc[c] holds columns [64 c, 64 c + 64),
// wgmma_64x64's layout each (NC = 1..4; the accumulators are one contiguous fragment).
template <typename T, int NC>
__device__ __forceinline__ void wgmma_64xN(float (&acc)[NC][32], uint64_t a, uint64_t b) {
  static_assert(NC >= 1 && NC <= 4, "m64n64 to m64n256");
  auto& d = reinterpret_cast<float(&)[NC * 32]>(acc);
  if constexpr (NC == 1) wgmma_64x64<T>(acc[0], a, b);
  if constexpr (NC == 2) wgmma_64x128<T>(d, a, b);
  if constexpr (NC == 3) wgmma_64x192<T>(d, a, b);
  if constexpr (NC == 4) wgmma_64x256<T>(d, a, b);
}
#undef MY_D8
#undef MY_WGMMA
#undef MY_WGMMA_TYPED
// Writes this consumer thread's (tid < 128) m64n<64 NC> accumulators into a float tile in shared
// memory, row r at red + r * RS (wgmma_64x64's layout per 64 columns): the epilogues' first step.
template <int NC, int RS>
__device__ __forceinline__ void store_acc_tile(float* red, const float (&acc)[NC][32], int tid) {
  const int lane = tid & 31, row0 = 16 * (tid >> 5) + (lane >> 2), col0 = 2 * (lane & 3);
#pragma unroll
  for (int c = 0; c < NC; ++c)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        *reinterpret_cast<float2*>(red + (row0 + 8 * h) * RS + c * 64 + 8 * j + col0) =
            make_float2(acc[c][4 * j + 2 * h], acc[c][4 * j + 2 * h + 1]);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Keeps the compiler from touching accumulators while a wgmma that writes them is in flight.
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace modelyard
