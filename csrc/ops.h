// Host entry points of the CUDA ops; torch_bindings.cpp registers them as torch.ops.modelyard.*.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>

namespace modelyard {

// q [S, Hq, D], caches [NB, BS, Hk, D], block_tables [S, MB] int32, seq_lens [S] int32 -> [S, Hq, D].
// max_seq_len (<= 0: block_tables width * BS), num_splits (0: automatic) and variant (0: automatic,
// 2: slot kernel, 3: slot kernel with prefetch) only shape the launch; the result does not depend on them.
// The caches have q's dtype, or float8_e4m3fn (then entries are multiplied by k_scale / v_scale).
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                  int64_t max_seq_len, int64_t num_splits, int64_t variant, double k_scale,
                                  double v_scale);

// key / value [T, Hk, D] -> caches [NB, BS, Hk, D] at slot_mapping [T] int64 (negative slots skipped).
// A float8_e4m3fn cache stores key / k_scale and value / v_scale, rounded and saturated to e4m3.
void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                       const at::Tensor& slot_mapping, double k_scale, double v_scale);

// x [T, H], weight [H] -> [T, H].
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// out [T] float32 <- 1 / sqrt(mean(x_row^2) + eps) for each row of x [T, H]: the folded norms' scale
// (engine/models/decoder.py), read by rotary_embedding_and_cache and silu_and_mul (norm_scale).
void rms_scale(const at::Tensor& x, double eps, at::Tensor& out);

// -> (rms_norm(x + residual), x + residual), both new tensors.
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps);

// The fp8 linear layers' inputs straight from the norm (EngineConfig(quantization="fp8")): the same
// results as per_token_quant_fp8(rms_norm(x, weight, eps)), bit for bit, without the 16-bit row in
// memory -> (q [T, H] float8_e4m3fn, scales [T, 1] float32).
std::tuple<at::Tensor, at::Tensor> rms_norm_quant_fp8(const at::Tensor& x, const at::Tensor& weight, double eps);

// -> (q, scales) of per_token_quant_fp8(rms_norm(x + residual)), and x + residual [T, H].
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_add_rms_norm_quant_fp8(const at::Tensor& x,
                                                                            const at::Tensor& residual,
                                                                            const at::Tensor& weight, double eps);

// In place on query [T, Hq*D] / [T, Hq, D] and key [T, Hk*D] / [T, Hk, D];
// cos_sin_cache [max_pos, D] float32 rows [cos | sin].
void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, int64_t head_dim,
                      const at::Tensor& cos_sin_cache, bool is_neox);

// rotary_embedding on query and key, then reshape_and_cache of the rotated key and value [T, Hk, D],
// in one launch; the same results as the two ops in sequence. With norm_x [T, H], q, k and v are first
// scaled in place by each token's RMSNorm scale 1 / sqrt(mean(norm_x^2) + norm_eps), reduced in the
// kernel, or with norm_scale [T] float32 by that scale computed already (rms_scale) (folded norms).
void rotary_embedding_and_cache(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                                at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                                const at::Tensor& slot_mapping, int64_t head_dim, const at::Tensor& cos_sin_cache,
                                bool is_neox, double k_scale, double v_scale,
                                const std::optional<at::Tensor>& norm_x, double norm_eps,
                                const std::optional<at::Tensor>& norm_scale);

// x [..., 2I] -> silu(x[..., :I]) * x[..., I:]  [..., I]. With norm_x [rows, H], both halves of a row are
// first scaled by that row's RMSNorm scale 1 / sqrt(mean(norm_x^2) + norm_eps) and rounded, or with
// norm_scale [rows] float32 by that scale computed already (rms_scale) (folded norms).
at::Tensor silu_and_mul(const at::Tensor& x, const std::optional<at::Tensor>& norm_x, double norm_eps,
                        const std::optional<at::Tensor>& norm_scale);

// x [..., 2I] -> per_token_quant_fp8(silu_and_mul(x)) bit for bit: (q [..., I] float8_e4m3fn,
// scales [..., 1] float32).
std::tuple<at::Tensor, at::Tensor> silu_and_mul_quant_fp8(const at::Tensor& x);

// x [M, K] (float32 / float16 / bfloat16, contiguous last dim) -> (q [M, K] float8_e4m3fn,
// scales [M, 1] float32) with x ~= q * scales row by row: scale = max(|x_row|, 1e-12) / 448.
std::tuple<at::Tensor, at::Tensor> per_token_quant_fp8(const at::Tensor& x);

// cuBLASLt linear layer out [M, N] = x [M, K] w [N, K]^T (+ bias [N]) with an explicit algorithm
// (lt_gemm.cu). x, w bfloat16 / float16 (out_dtype the same), or float8_e4m3fn with x_scale [M] and
// w_scale [N] float32 (out = (x * x_scale)(w * w_scale)^T in out_dtype, 16-bit).
// lt_gemm_algos -> (algos [n, 64] uint8 CPU, info [n, 8] int64 CPU: algo id, tile id, split-k, stages id,
// reduction scheme, cluster shape id, custom option, workspace bytes): the heuristic's candidates, best
// first (at most 64), or, wide, the heuristic's best configurations of every algorithm id, each also
// with other split-k values (at most max_algos <= 4096; see lt_gemm.cu); lt_gemm runs one of those rows.
std::tuple<at::Tensor, at::Tensor> lt_gemm_algos(const at::Tensor& x, const at::Tensor& w,
                                                 const std::optional<at::Tensor>& bias,
                                                 const std::optional<at::Tensor>& x_scale,
                                                 const std::optional<at::Tensor>& w_scale, at::ScalarType out_dtype,
                                                 int64_t max_algos, bool wide);
at::Tensor lt_gemm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& w_scale,
                   at::ScalarType out_dtype, const at::Tensor& algo);
// out [M, N] += x [M, K] w [N, K]^T in place, 16-bit, with an algorithm from lt_gemm_algos (the
// residual add of the decoder's folded norms, done by the GEMM: cuBLASLt's C = D with beta 1).
void lt_gemm_add_(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& algo);

// Programmatic dependent launch for the kernels that support it (common.cuh): on when `enabled` and
// the current device has compute capability >= 9.0, else off; returns the previous setting. The decode
// CUDA graphs' capture turns it on (engine/cuda_graphs.py); it is off otherwise.
bool set_pdl(bool enabled);

// Small-batch decode GEMMs (skinny_gemm.cu): x [M <= 64, K] w [N, K]^T (+ bias [N]) -> [M, N], 16-bit.
// skinny_gemm_configs() -> int64 [n, 6] CPU, one row per config usable on the current device: block_n,
// threads, most rows M, most split_k, kind (0: mma.sync, sm_80+; 1: TMA + wgmma, tma_gemm.cu, sm_90a
// builds; 2: the same with the rows split over a CTA pair, split_k 1; 3: x shared by a cluster of
// column blocks through TMA multicast, split_k 1), CTAs an SM holds (at most 2);
// empty below compute capability 8.0. split_k CTAs (one cluster) share each block_n columns' K.
at::Tensor skinny_gemm_configs();
at::Tensor skinny_gemm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                       int64_t config, int64_t split_k);
// out [M, N] += x w^T in place (the folded norms' residual add), same kernels and checks.
void skinny_gemm_add_(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, int64_t config, int64_t split_k);

}  // namespace modelyard
