// Skinny GEMMs for small decode batches: out[M, N] = x[M, K] w[N, K]^T (+ bias[N]) with M <= 64 rows
// (skinny_gemm_add_: out += x w^T in place, the residual add of the decoder's folded norms),
// bf16 or fp16 with float32 accumulation. `config` picks the kernel: the first kNumMmaConfigs are this
// file's mma.sync kernels (sm_80+), the rest (Hopper builds only) tma_gemm.cu's TMA + wgmma ones.
//
// A decode step's linear layers read every weight once for a handful of rows, so their speed is how
// close they get to the memory bandwidth. At M <= 16 cuBLAS reads 2.3-3.2 TB/s on an H200 for the
// Llama-7B o_proj and down_proj shapes (short kernels whose ramp-up and tail weigh, or split-K plus a
// second reduce kernel); this kernel reads 2.6-3.4 there (benchmarks/RESULTS.md, session 6):
//   - w streams through a 4-stage cp.async pipeline in 64-wide K blocks (128-byte rows, 16-byte
//     chunks XOR-swizzled so ldmatrix is conflict-free), multiplied with mma.sync m16n8k16;
//   - one CTA covers all M rows (x is small and L2-resident), so w is read exactly once;
//   - each CTA owns block_n columns; K is split over the warps of a CTA and, on compute capability
//     9.0+, over the split_k CTAs of a thread-block cluster, whose partial tiles are summed through
//     distributed shared memory: no workspace, no second kernel, a fixed order (deterministic).
// At M >= 32 its mma.sync issue rate, not bandwidth, limits it and cuBLAS wins (NOTES-perf.md, v6):
// that is what tma_gemm.cu's kernels are for. engine/gemm.py times the (config, split_k) candidates
// against cuBLAS per decode batch size and shape and keeps the fastest.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <vector>

#include "common.cuh"
#include "gemm_epilogue.cuh"
#include "skinny_gemm.h"
#include "ops.h"

namespace modelyard {
namespace {

constexpr int kBK = 64;  // K elements per pipeline stage: 128-byte rows of 8 16-byte chunks
constexpr int kStages = 4;
constexpr int kMaxM = 64;
constexpr int kMaxSplit = 8;  // the portable cluster size

// The kernels on offer, indexed by skinny_gemm's `config`: nt n8 tiles per warp, wn warps along N,
// wk warps along K; block_n = 8 nt wn columns per CTA, 32 wn wk threads.
struct Config {
  int nt, wn, wk;
};
constexpr Config kConfigs[] = {{2, 4, 2}, {3, 4, 2}, {4, 4, 2}};  // block_n 64, 96, 128
constexpr int kNumMmaConfigs = sizeof(kConfigs) / sizeof(kConfigs[0]);  // mma.sync; then tma_gemm.cu's

// 16 bytes global -> shared, bypassing L1; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// Byte offset of 16-byte chunk c of tile row r in a stage (rows of 128 bytes, chunks XOR-swizzled).
__device__ __forceinline__ uint32_t tile_offset(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

template <int BM, int BN>
__host__ __device__ constexpr int smem_bytes() {
  constexpr int pipeline = kStages * (BM + BN) * kBK * 2;
  constexpr int reduce = BM * (BN + 8) * 4;
  return pipeline > reduce ? pipeline : reduce;
}

// Grid (split_k, ceil(N / BN)); with split_k > 1 each column block is one cluster of split_k CTAs,
// CTA `split` multiplying K blocks [split * kb_per_split, (split + 1) * kb_per_split). Rows [0, BM)
// of a stage are x, rows [BM, BM + BN) are w; out-of-range chunks (rows past M or N, K past its
// end) are zero-filled, so they add nothing. Warps tile N (WN) and split each stage's k16 slices (WK).
template <typename T, int MT, int NT, int WN, int WK>
__global__ void __launch_bounds__(32 * WN * WK, 1)
    skinny_gemm_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ w,
                       const T* __restrict__ bias, T* out, bool accumulate, int M, int N, int K, int kb_per_split) {
#if __CUDA_ARCH__ >= 800
  constexpr int BM = 16 * MT, BN = 8 * NT * WN, THREADS = 32 * WN * WK;
  constexpr int STAGE_BYTES = (BM + BN) * kBK * 2;
  constexpr int KS_PER_WARP = (kBK / 16) / WK;  // k16 slices of a stage per warp
  constexpr int RS = BN + 8;                    // row stride (floats) of the reduction tile
  static_assert((kBK / 16) % WK == 0, "the warps along K split a stage's k16 slices evenly");
  extern __shared__ __align__(128) uint8_t smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wn = warp % WN, wk = warp / WN;
  const int split = blockIdx.x, splits = gridDim.x, n0 = blockIdx.y * BN;
  const int kb_total = (K + kBK - 1) / kBK;
  const int kb0 = split * kb_per_split;
  const int nkb = max(0, min(kb_per_split, kb_total - kb0));
  const uint32_t sbase = smem_addr(smem);

  auto load_x = [&](int kb) {
    const int k0 = (kb0 + kb) * kBK;
    const uint32_t st = sbase + (kb % kStages) * STAGE_BYTES;
#pragma unroll
    for (int j = 0; j < (BM * 8 + THREADS - 1) / THREADS; ++j) {
      const int i = tid + j * THREADS;
      if (i < BM * 8) {
        const int r = i >> 3, c = i & 7, k = k0 + c * 8;
        const bool valid = r < M && k < K;
        cp_async16(st + tile_offset(r, c), valid ? x + r * x_stride + k : x, valid);
      }
    }
  };
  auto load_w = [&](int kb) {
    const int k0 = (kb0 + kb) * kBK;
    const uint32_t st = sbase + (kb % kStages) * STAGE_BYTES;
#pragma unroll
    for (int j = 0; j < (BN * 8 + THREADS - 1) / THREADS; ++j) {
      const int i = tid + j * THREADS;
      if (i < BN * 8) {
        const int r = i >> 3, c = i & 7, k = k0 + c * 8, n = n0 + r;
        const bool valid = n < N && k < K;
        cp_async16(st + tile_offset(BM + r, c), valid ? w + static_cast<int64_t>(n) * K + k : w, valid);
      }
    }
  };

  // The first stages' weights are requested before pdl_wait (under PDL, while the kernel before is
  // still running: it does not write them), x after it. Group 0 = those weights + stage 0's x, group s
  // = stage s's x, so waiting for group s still means stage s is complete.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s)
    if (s < nkb) load_w(s);
  pdl_wait();
  pdl_trigger();
  const TileShare<BM, BN, THREADS> share(split, splits);
  Vec<T, 4> pre[TileShare<BM, BN, THREADS>::kIters];
  if (accumulate) load_out_share(pre, share, out, M, N, n0);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nkb) load_x(s);
    cp_async_commit();  // group s (possibly empty)
  }
  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

  for (int kb = 0; kb < nkb; ++kb) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kb is visible to all; the slot refilled below was consumed at kb - 1
    if (kb + kStages - 1 < nkb) {
      load_x(kb + kStages - 1);
      load_w(kb + kStages - 1);
    }
    cp_async_commit();

    const uint32_t st = sbase + (kb % kStages) * STAGE_BYTES;
#pragma unroll
    for (int j = 0; j < KS_PER_WARP; ++j) {
      const int ks = wk * KS_PER_WARP + j;
      uint32_t a[MT][4], b[NT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int r = mt * 16 + (lane & 15);
        ldmatrix_x4(a[mt], st + tile_offset(r, ks * 2 + (lane >> 4)));
      }
#pragma unroll
      for (int p = 0; p < NT / 2; ++p) {
        const int r = BM + (wn * NT + 2 * p) * 8 + (lane & 7) + ((lane >> 4) << 3);
        uint32_t t[4];
        ldmatrix_x4(t, st + tile_offset(r, ks * 2 + ((lane >> 3) & 1)));
        b[2 * p][0] = t[0];
        b[2 * p][1] = t[1];
        b[2 * p + 1][0] = t[2];
        b[2 * p + 1][1] = t[3];
      }
      if constexpr (NT % 2 == 1) {
        const int r = BM + (wn * NT + NT - 1) * 8 + (lane & 7);
        ldmatrix_x2(b[NT - 1], st + tile_offset(r, ks * 2 + ((lane >> 3) & 1)));
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma16816<T>(acc[mt][nt], a[mt], b[nt]);
    }
  }

  // The warps along K sum their tiles in shared memory, in a fixed order. Accumulator layout:
  // acc[mt][nt][2h + {0, 1}] is row 16 mt + lane / 4 + 8 h, columns 8 nt + 2 (lane % 4) + {0, 1}.
  cp_async_wait<0>();
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem);
  const int g = lane >> 2, t2 = (lane & 3) * 2;
#pragma unroll
  for (int pass = 0; pass < WK; ++pass) {
    if (wk == pass) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float2* p = reinterpret_cast<float2*>(red + (mt * 16 + g + 8 * h) * RS + (wn * NT + nt) * 8 + t2);
            float2 v = make_float2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
            if (pass > 0) {
              const float2 o = *p;
              v.x += o.x;
              v.y += o.y;
            }
            *p = v;
          }
    }
    __syncthreads();
  }

  cluster_reduce_store<T, BM, BN, RS, THREADS>(red, share, splits, pre, out, bias, accumulate, M, N, n0);
#endif  // __CUDA_ARCH__ >= 800
}

template <typename T, int MT, int NT, int WN, int WK>
void launch(const at::Tensor& x, const at::Tensor& w, const T* bias, at::Tensor& out, bool accumulate, int split_k,
            cudaStream_t stream) {
  constexpr int BM = 16 * MT, BN = 8 * NT * WN, THREADS = 32 * WN * WK, SMEM = smem_bytes<BM, BN>();
  auto kernel = skinny_gemm_kernel<T, MT, NT, WN, WK>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM));
  const int M = static_cast<int>(x.size(0)), K = static_cast<int>(x.size(1)), N = static_cast<int>(w.size(0));
  const int kb_per_split = static_cast<int>(ceil_div(ceil_div(K, kBK), split_k));
  // With PDL (common.cuh) the weights' first stages load while the kernel before ends.
  launch_ex(kernel, dim3(split_k, static_cast<unsigned>(ceil_div(N, BN)), 1), dim3(THREADS, 1, 1), SMEM, split_k,
            stream, static_cast<const T*>(x.data_ptr()), x.stride(0), static_cast<const T*>(w.data_ptr()), bias,
            static_cast<T*>(out.data_ptr()), accumulate, M, N, K, kb_per_split);
}

template <typename T, int MT>
void dispatch_config(int64_t config, const at::Tensor& x, const at::Tensor& w, const T* b, at::Tensor& out,
                     bool acc, int split_k, cudaStream_t stream) {
  static_assert(kNumMmaConfigs == 3, "one case per config");
  switch (config) {
    case 0: return launch<T, MT, 2, 4, 2>(x, w, b, out, acc, split_k, stream);
    case 1: return launch<T, MT, 3, 4, 2>(x, w, b, out, acc, split_k, stream);
    default: return launch<T, MT, 4, 4, 2>(x, w, b, out, acc, split_k, stream);
  }
}

template <typename T>
void dispatch(int64_t config, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
              at::Tensor& out, bool acc, int split_k, cudaStream_t stream) {
  const T* b = bias ? static_cast<const T*>(bias->data_ptr()) : nullptr;
  const int64_t M = x.size(0);
  if (M <= 16) return dispatch_config<T, 1>(config, x, w, b, out, acc, split_k, stream);
  if (M <= 32) return dispatch_config<T, 2>(config, x, w, b, out, acc, split_k, stream);
  return dispatch_config<T, 4>(config, x, w, b, out, acc, split_k, stream);
}

std::pair<int, int> capability(int device) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return {major, minor};
}

// The configs usable on this device: the mma.sync ones from compute capability 8.0, then the TMA ones.
int num_configs(int major, int minor) { return major >= 8 ? kNumMmaConfigs + tma_gemm_num_configs(major, minor) : 0; }

// The most split_k `config` takes: clusters from compute capability 9.0, none for the TMA kernels
// whose cluster does something else (kinds 2 and 3: rows split over a pair, x shared).
int max_split_of(int config, int major) {
  if (major < 9) return 1;
  return config >= kNumMmaConfigs && tma_gemm_kind(config - kNumMmaConfigs) > 1 ? 1 : kMaxSplit;
}

// CTAs of the M = 64 instance one SM holds (by shared memory), at most 2: what the tuner's split_k
// candidates aim at.
template <int NT>
int mma_ctas_per_sm() {
  constexpr int BN = 8 * NT * 4, THREADS = 32 * 4 * 2, SMEM = smem_bytes<64, BN>();
  auto kernel = skinny_gemm_kernel<__nv_bfloat16, 4, NT, 4, 2>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM));
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, THREADS, SMEM));
  return n;
}

}  // namespace

at::Tensor skinny_gemm_configs() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto [major, minor] = capability(device);
  const int64_t n = num_configs(major, minor);
  auto t = at::empty({n, 6}, at::TensorOptions().dtype(at::kLong));
  for (int64_t i = 0; i < n; ++i) {
    int64_t* row = t.data_ptr<int64_t>() + 6 * i;
    if (i < kNumMmaConfigs) {
      const Config& c = kConfigs[i];
      row[0] = 8 * c.nt * c.wn;   // block_n
      row[1] = 32 * c.wn * c.wk;  // threads
      row[4] = 0;                 // kind: mma.sync
      row[5] = i == 0 ? mma_ctas_per_sm<2>() : i == 1 ? mma_ctas_per_sm<3>() : mma_ctas_per_sm<4>();
    } else {
      const TmaGemmInfo info = tma_gemm_info(static_cast<int>(i - kNumMmaConfigs));
      row[0] = info.block_n;
      row[1] = info.threads;
      row[4] = tma_gemm_kind(static_cast<int>(i - kNumMmaConfigs));  // TMA + wgmma: 1 split-K, 2 pair, 3 x shared
      row[5] = info.ctas_per_sm;
    }
    row[2] = kMaxM;                       // most rows
    row[3] = max_split_of(static_cast<int>(i), major);
    row[5] = std::min<int64_t>(row[5], 2);
  }
  return t;
}

namespace {

// Checks the arguments and runs the kernel: returns a new out = x w^T (+ bias), or, given acc,
// adds x w^T into it in place and returns it.
at::Tensor run_skinny(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t config,
                      int64_t split_k, const at::Tensor* acc) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda() && x.device() == w.device(), "skinny_gemm: x and w must be on one CUDA device");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "skinny_gemm: need x [M, K] and w [N, K], got ",
              shape(x.sizes()), " and ", shape(w.sizes()));
  TORCH_CHECK(x.scalar_type() == w.scalar_type() &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf),
              "skinny_gemm: x and w must both be bfloat16 or both float16, got ", x.scalar_type(), " and ",
              w.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= kMaxM, "skinny_gemm: M must be in [1, ", num(kMaxM), "], got ", num(M));
  TORCH_CHECK(N > 0 && K > 0 && N < (1ll << 31) && K < (1ll << 31), "skinny_gemm: bad N or K");
  TORCH_CHECK(x.stride(1) == 1 && w.is_contiguous(), "skinny_gemm: x rows and w must be contiguous");
  TORCH_CHECK(K % 8 == 0 && N % 8 == 0 && x.stride(0) % 8 == 0 && aligned16(x.data_ptr()) && aligned16(w.data_ptr()),
              "skinny_gemm: K, N and x's row stride must be multiples of 8 elements, pointers 16-byte aligned");
  const auto [major, minor] = capability(x.get_device());
  TORCH_CHECK(major >= 8, "skinny_gemm: needs compute capability 8.0+");
  const int configs = num_configs(major, minor);
  TORCH_CHECK(config >= 0 && config < configs, "skinny_gemm: config must be in [0, ", num(configs), "), got ",
              num(config));
  const int64_t max_split = std::min<int64_t>(max_split_of(static_cast<int>(config), major), ceil_div(K, kBK));
  TORCH_CHECK(split_k >= 1 && split_k <= max_split, "skinny_gemm: split_k must be in [1, ", num(max_split),
              "] here (K = ", num(K), "), got ", num(split_k));
  if (bias) {
    TORCH_CHECK(bias->device() == x.device() && bias->dim() == 1 && bias->numel() == N && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type(),
                "skinny_gemm: bias must be a contiguous [N] vector of x's dtype on x's device");
  }
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  if (acc) {
    TORCH_CHECK(acc->device() == x.device() && acc->scalar_type() == x.scalar_type() && acc->dim() == 2 &&
                    acc->size(0) == M && acc->size(1) == N && acc->is_contiguous(),
                "skinny_gemm_add_: out must be a contiguous [M, N] tensor of x's dtype on x's device");
  }
  at::Tensor out = acc ? *acc : at::empty({M, N}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int s = static_cast<int>(split_k);
  if (config >= kNumMmaConfigs)
    tma_gemm_run(static_cast<int>(config - kNumMmaConfigs), x, w, bias, out, acc != nullptr, s, stream);
  else if (x.scalar_type() == at::kBFloat16)
    dispatch<__nv_bfloat16>(config, x, w, bias, out, acc != nullptr, s, stream);
  else
    dispatch<__half>(config, x, w, bias, out, acc != nullptr, s, stream);
  return out;
}

}  // namespace

at::Tensor skinny_gemm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                       int64_t config, int64_t split_k) {
  return run_skinny(x, w, bias, config, split_k, nullptr);
}

void skinny_gemm_add_(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, int64_t config, int64_t split_k) {
  run_skinny(x, w, std::nullopt, config, split_k, &out);
}

}  // namespace modelyard
