// Host entry points of the CUDA ops; torch_bindings.cpp registers them as torch.ops.modelyard.*.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

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
// in one launch; the same results as the two ops in sequence.
void rotary_embedding_and_cache(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                                const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                                const at::Tensor& slot_mapping, int64_t head_dim, const at::Tensor& cos_sin_cache,
                                bool is_neox, double k_scale, double v_scale);

// x [..., 2I] -> silu(x[..., :I]) * x[..., I:]  [..., I].
at::Tensor silu_and_mul(const at::Tensor& x);

// x [..., 2I] -> per_token_quant_fp8(silu_and_mul(x)) bit for bit: (q [..., I] float8_e4m3fn,
// scales [..., 1] float32).
std::tuple<at::Tensor, at::Tensor> silu_and_mul_quant_fp8(const at::Tensor& x);

// x [M, K] (float32 / float16 / bfloat16, contiguous last dim) -> (q [M, K] float8_e4m3fn,
// scales [M, 1] float32) with x ~= q * scales row by row: scale = max(|x_row|, 1e-12) / 448.
std::tuple<at::Tensor, at::Tensor> per_token_quant_fp8(const at::Tensor& x);

}  // namespace modelyard
