// Linear layers through cuBLASLt with an algorithm chosen by the caller: out[M, N] = x[M, K] w[N, K]^T
// (+ bias[N]) or, lt_gemm_add_, out += x w^T in place (beta 1, C = D), in 16 bits, or in e4m3 with one float32 scale per row of x and per row of w (the
// "outer vector" scaling of cuBLAS >= 12.9; torch._scaled_mm's row-wise mode).
//
// lt_gemm_algos lists the heuristic's candidates for a problem; engine/gemm.py times them on the real
// weights for each decode batch size and keeps the fastest, which lt_gemm then runs (inside the
// decode CUDA graphs). An algorithm is a 64-byte cublasLtMatmulAlgo_t passed around as a CPU uint8
// tensor; lt_gemm re-checks it against the problem (cublasLtMatmulAlgoCheck), so a stale or foreign
// one is an error, not a wrong result. Host-side only: safe inside CUDA graph capture (the workspace
// comes from the caching allocator, i.e. the graph's pool while capturing).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>

#include <cstring>
#include <vector>

#include "common.cuh"
#include "ops.h"

namespace modelyard {
namespace {

constexpr int64_t kAlgoBytes = sizeof(cublasLtMatmulAlgo_t);
constexpr uint64_t kMaxWorkspace = 32ull << 20;
constexpr int64_t kMaxWide = 4096;

void check(cublasStatus_t s, const char* what) {
  TORCH_CHECK(s == CUBLAS_STATUS_SUCCESS, "lt_gemm: ", what, " failed: ", cublasLtGetStatusName(s), " (",
              cublasLtGetStatusString(s), ")");
}

cudaDataType_t cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kHalf: return CUDA_R_16F;
    case at::kFloat8_e4m3fn: return CUDA_R_8F_E4M3;
    default: TORCH_CHECK(false, "lt_gemm: unsupported dtype ", t);
  }
}

// Validates the arguments; returns true for the e4m3 (scaled) form.
bool check_args(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& w_scale,
                at::ScalarType out_dtype) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda(), "lt_gemm: x and w must be CUDA tensors");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "lt_gemm: need x [M, K] and w [N, K], got ",
              shape(x.sizes()), " and ", shape(w.sizes()));
  TORCH_CHECK(x.stride(1) == 1 && w.is_contiguous(), "lt_gemm: x rows and w must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M > 0 && N > 0 && K > 0, "lt_gemm: empty problem");
  const bool fp8 = x.scalar_type() == at::kFloat8_e4m3fn;
  const int64_t align = fp8 ? 16 : 8;  // elements: 16 bytes
  TORCH_CHECK(K % align == 0 && N % align == 0 && x.stride(0) % align == 0 && aligned16(x.data_ptr()) &&
                  aligned16(w.data_ptr()),
              "lt_gemm: K, N and x's row stride must be multiples of ", num(align), " elements, pointers 16-byte aligned");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "lt_gemm: x and w dtypes differ");
  if (fp8) {
    TORCH_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kHalf, "lt_gemm: e4m3 inputs need a 16-bit out_dtype");
    TORCH_CHECK(x_scale && w_scale, "lt_gemm: e4m3 inputs need x_scale and w_scale");
    TORCH_CHECK(x_scale->scalar_type() == at::kFloat && x_scale->is_contiguous() && x_scale->numel() == M &&
                    w_scale->scalar_type() == at::kFloat && w_scale->is_contiguous() && w_scale->numel() == N,
                "lt_gemm: x_scale must be float32 with M elements and w_scale float32 with N elements");
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                "lt_gemm: x must be bfloat16, float16 or float8_e4m3fn, got ", x.scalar_type());
    TORCH_CHECK(out_dtype == x.scalar_type(), "lt_gemm: 16-bit inputs give out_dtype == their dtype");
    TORCH_CHECK(!x_scale && !w_scale, "lt_gemm: scales apply to e4m3 inputs only");
  }
  if (bias) {
    TORCH_CHECK(bias->is_cuda() && bias->dim() == 1 && bias->numel() == N && bias->is_contiguous() &&
                    bias->scalar_type() == out_dtype,
                "lt_gemm: bias must be a contiguous [N] vector of out_dtype");
  }
  return fp8;
}

// The descriptors of one problem. cuBLAS is column-major: D [N, M] = op(A) B with A = w seen as
// K x N (transposed), B = x seen as K x M, D = out seen as N x M.
struct Problem {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;

  Problem(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
          const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& w_scale, at::ScalarType out_dtype,
          bool fp8) {
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    check(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate");
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    set(CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta));
    set(CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb));
    if (bias) {
      const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
      const void* ptr = bias->data_ptr();
      const cudaDataType_t bt = cuda_type(out_dtype);
      set(CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi));
      set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, &ptr, sizeof(ptr));
      set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof(bt));
    }
    if (fp8) {
      const cublasLtMatmulMatrixScale_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
      const void* sa = w_scale->data_ptr();  // one per row of op(A): per output feature
      const void* sb = x_scale->data_ptr();  // one per column of B: per token
      set(CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof(mode));
      set(CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof(mode));
      set(CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sa, sizeof(sa));
      set(CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sb, sizeof(sb));
    }
    check(cublasLtMatrixLayoutCreate(&a, cuda_type(w.scalar_type()), K, N, K), "MatrixLayoutCreate");
    check(cublasLtMatrixLayoutCreate(&b, cuda_type(x.scalar_type()), K, M, x.stride(0)), "MatrixLayoutCreate");
    check(cublasLtMatrixLayoutCreate(&d, cuda_type(out_dtype), N, M, N), "MatrixLayoutCreate");
  }
  ~Problem() {
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
  Problem(const Problem&) = delete;
  Problem& operator=(const Problem&) = delete;

 private:
  void set(cublasLtMatmulDescAttributes_t attr, const void* v, size_t n) {
    check(cublasLtMatmulDescSetAttribute(op, attr, v, n), "MatmulDescSetAttribute");
  }
};

int64_t attr(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t what) {
  size_t written = 0;
  if (what == CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID || what == CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID) {
    uint16_t v = 0;  // the two 16-bit attributes
    return cublasLtMatmulAlgoConfigGetAttribute(&algo, what, &v, sizeof(v), &written) == CUBLAS_STATUS_SUCCESS ? v : -1;
  }
  uint32_t v = 0;
  return cublasLtMatmulAlgoConfigGetAttribute(&algo, what, &v, sizeof(v), &written) == CUBLAS_STATUS_SUCCESS ? v : -1;
}

constexpr int kInfoCols = 8;

// One candidate: the algorithm and its info row (algo id, tile id, split-k, stages id, reduction scheme,
// cluster shape id, custom option, workspace bytes).
void put(at::Tensor& algos, at::Tensor& info, int i, const cublasLtMatmulAlgo_t& algo, size_t workspace) {
  std::memcpy(algos[i].data_ptr(), &algo, kAlgoBytes);
  int64_t* row = info[i].data_ptr<int64_t>();
  const cublasLtMatmulAlgoConfigAttributes_t cols[] = {
      CUBLASLT_ALGO_CONFIG_ID, CUBLASLT_ALGO_CONFIG_TILE_ID, CUBLASLT_ALGO_CONFIG_SPLITK_NUM,
      CUBLASLT_ALGO_CONFIG_STAGES_ID, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID,
      CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION};
  for (int c = 0; c < kInfoCols - 1; ++c) row[c] = attr(algo, cols[c]);
  row[kInfoCols - 1] = static_cast<int64_t>(workspace);
}

using Found = std::vector<std::pair<cublasLtMatmulAlgo_t, size_t>>;

// The heuristic's candidates (best first), at most `most`.
Found heuristic(const Problem& p, int most) {
  const cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulPreference_t pref = nullptr;
  check(cublasLtMatmulPreferenceCreate(&pref), "MatmulPreferenceCreate");
  std::vector<cublasLtMatmulHeuristicResult_t> res(most);
  int n = 0;
  cublasStatus_t s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                          &kMaxWorkspace, sizeof(kMaxWorkspace));
  if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulAlgoGetHeuristic(handle, p.op, p.a, p.b, p.d, p.d, pref, most, res.data(), &n);
  cublasLtMatmulPreferenceDestroy(pref);
  if (s == CUBLAS_STATUS_NOT_SUPPORTED) n = 0;  // no algorithm for this problem: an empty list
  else check(s, "MatmulAlgoGetHeuristic");
  Found out;
  for (int i = 0; i < n; ++i) out.emplace_back(res[i].algo, res[i].workspaceSize);
  return out;
}

template <typename T>
bool set_config(cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t what, T v) {
  return cublasLtMatmulAlgoConfigSetAttribute(&algo, what, &v, sizeof(v)) == CUBLAS_STATUS_SUCCESS;
}

// An array capability of an algorithm (tile ids, stages ids); empty when it lists none.
std::vector<uint32_t> cap_list(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoCapAttributes_t what) {
  size_t bytes = 0;
  std::vector<uint32_t> out;
  if (cublasLtMatmulAlgoCapGetAttribute(&algo, what, nullptr, 0, &bytes) == CUBLAS_STATUS_SUCCESS && bytes > 0) {
    out.resize(bytes / sizeof(uint32_t));
    if (cublasLtMatmulAlgoCapGetAttribute(&algo, what, out.data(), bytes, &bytes) != CUBLAS_STATUS_SUCCESS) out.clear();
  }
  return out;
}

// The wide candidate list: the heuristic's candidates (best first) and their neighbours, each as far as
// cublasLtMatmulAlgoCheck accepts it, without duplicates, at most max_algos:
//   1. every candidate with split-k in kSplits and each reduction scheme its algorithm supports
//      (how many CTAs share K: what decides a skinny decode GEMM's bandwidth);
//   2. every candidate with each (tile, stages) pair its algorithm lists, split-k unchanged.
// (The full space, tiles x stages x split-k x reductions x cluster shapes x custom options over all
// algorithm ids, runs to ~10^5 accepted configurations even for a small problem: too many to time.)
Found wide(const Problem& p, int64_t max_algos) {
  static constexpr uint32_t kSplits[] = {1, 2, 3, 4, 6, 8, 12, 16};
  static constexpr uint32_t kReductions[] = {CUBLASLT_REDUCTION_SCHEME_INPLACE, CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE,
                                             CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE};
  const cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const Found seeds = heuristic(p, 64);
  Found out;
  auto full = [&] { return static_cast<int64_t>(out.size()) >= max_algos; };
  auto add = [&](const cublasLtMatmulAlgo_t& algo) {
    cublasLtMatmulHeuristicResult_t r{};
    if (full() || cublasLtMatmulAlgoCheck(handle, p.op, p.a, p.b, p.d, p.d, &algo, &r) != CUBLAS_STATUS_SUCCESS ||
        r.workspaceSize > kMaxWorkspace)
      return;
    for (const auto& f : out)
      if (std::memcmp(&f.first, &algo, kAlgoBytes) == 0) return;
    out.emplace_back(algo, r.workspaceSize);
  };
  for (const auto& seed : seeds) add(seed.first);
  for (const auto& [seed, _] : seeds) {
    int32_t splitk = 0;
    uint32_t reductions = 0;
    size_t written = 0;
    cublasLtMatmulAlgoCapGetAttribute(&seed, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT, &splitk, sizeof(splitk), &written);
    cublasLtMatmulAlgoCapGetAttribute(&seed, CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK, &reductions,
                                      sizeof(reductions), &written);
    for (uint32_t split : kSplits) {
      if (split > 1 && !splitk) break;
      for (uint32_t red : kReductions) {
        if (split == 1 ? red != kReductions[0] : !(reductions & red)) continue;
        cublasLtMatmulAlgo_t algo = seed;
        if (set_config(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, split) &&
            set_config(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME,
                       split == 1 ? static_cast<uint32_t>(CUBLASLT_REDUCTION_SCHEME_NONE) : red))
          add(algo);
      }
    }
  }
  for (const auto& [seed, _] : seeds) {
    const auto tiles = cap_list(seed, CUBLASLT_ALGO_CAP_TILE_IDS), stages = cap_list(seed, CUBLASLT_ALGO_CAP_STAGES_IDS);
    for (uint32_t tile : tiles)
      for (uint32_t stage : stages) {
        cublasLtMatmulAlgo_t algo = seed;
        if (set_config(algo, CUBLASLT_ALGO_CONFIG_TILE_ID, tile) && set_config(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, stage))
          add(algo);
      }
  }
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lt_gemm_algos(const at::Tensor& x, const at::Tensor& w,
                                                 const std::optional<at::Tensor>& bias,
                                                 const std::optional<at::Tensor>& x_scale,
                                                 const std::optional<at::Tensor>& w_scale, at::ScalarType out_dtype,
                                                 int64_t max_algos, bool wide_list) {
  const bool fp8 = check_args(x, w, bias, x_scale, w_scale, out_dtype);
  const int64_t most = wide_list ? kMaxWide : 64;
  TORCH_CHECK(max_algos >= 1 && max_algos <= most, "lt_gemm_algos: max_algos must be in [1, ", num(most), "]");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  Problem p(x, w, bias, x_scale, w_scale, out_dtype, fp8);
  const Found found = wide_list ? wide(p, max_algos)
                                 : heuristic(p, static_cast<int>(max_algos));
  const int n = static_cast<int>(found.size());
  at::Tensor algos = at::empty({n, kAlgoBytes}, at::TensorOptions().dtype(at::kByte));
  at::Tensor info = at::empty({n, kInfoCols}, at::TensorOptions().dtype(at::kLong));
  for (int i = 0; i < n; ++i) put(algos, info, i, found[i].first, found[i].second);
  return {algos, info};
}

namespace {

// out = x w^T (+ bias) (beta 0), or out += x w^T (beta 1: cuBLASLt's C = D, in place).
void run(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
         const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& w_scale, at::ScalarType out_dtype,
         const at::Tensor& algo, at::Tensor& out, float beta, bool fp8) {
  TORCH_CHECK(algo.device().is_cpu() && algo.scalar_type() == at::kByte && algo.numel() == kAlgoBytes &&
                  algo.is_contiguous(),
              "lt_gemm: algo must be a contiguous CPU uint8 tensor of ", num(kAlgoBytes), " bytes (from lt_gemm_algos)");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  Problem p(x, w, bias, x_scale, w_scale, out_dtype, fp8);
  cublasLtMatmulAlgo_t a;
  std::memcpy(&a, algo.data_ptr(), kAlgoBytes);
  const cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t checked{};
  check(cublasLtMatmulAlgoCheck(handle, p.op, p.a, p.b, p.d, p.d, &a, &checked),
        "MatmulAlgoCheck (the algorithm does not fit this problem)");
  at::Tensor ws;
  if (checked.workspaceSize > 0) ws = at::empty({static_cast<int64_t>(checked.workspaceSize)}, x.options().dtype(at::kByte));
  const float alpha = 1.f;
  check(cublasLtMatmul(handle, p.op, &alpha, w.data_ptr(), p.a, x.data_ptr(), p.b, &beta, out.data_ptr(), p.d,
                       out.data_ptr(), p.d, &a, checked.workspaceSize ? ws.data_ptr() : nullptr, checked.workspaceSize,
                       c10::cuda::getCurrentCUDAStream()),
        "Matmul");
}

}  // namespace

at::Tensor lt_gemm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& w_scale,
                   at::ScalarType out_dtype, const at::Tensor& algo) {
  const bool fp8 = check_args(x, w, bias, x_scale, w_scale, out_dtype);
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options().dtype(out_dtype));
  run(x, w, bias, x_scale, w_scale, out_dtype, algo, out, 0.f, fp8);
  return out;
}

void lt_gemm_add_(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& algo) {
  const bool fp8 = check_args(x, w, std::nullopt, std::nullopt, std::nullopt, x.scalar_type());
  TORCH_CHECK(!fp8, "lt_gemm_add_: 16-bit inputs only");
  TORCH_CHECK(out.device() == x.device() && out.scalar_type() == x.scalar_type() && out.dim() == 2 &&
                  out.size(0) == x.size(0) && out.size(1) == w.size(0) && out.is_contiguous(),
              "lt_gemm_add_: out must be a contiguous [M, N] tensor of x's dtype on x's device");
  run(x, w, std::nullopt, std::nullopt, std::nullopt, x.scalar_type(), algo, out, 1.f, false);
}

}  // namespace modelyard
