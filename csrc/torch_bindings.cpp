// Registers the CUDA ops as torch.ops.modelyard.*. The schemas mark what each op mutates
// (Tensor(a!)), so torch.compile / functionalization and CUDA graph capture see the true effects.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(modelyard, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
      "float scale, int max_seq_len=-1, int num_splits=0, int variant=0, float k_scale=1.0, float v_scale=1.0) -> "
      "Tensor");
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_mapping, float k_scale=1.0, float v_scale=1.0) -> ()");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def(
      "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!) key, int head_dim, Tensor cos_sin_cache, "
      "bool is_neox) -> ()");
  m.def(
      "rotary_embedding_and_cache(Tensor positions, Tensor(a!) query, Tensor(b!) key, Tensor value, "
      "Tensor(c!) k_cache, Tensor(d!) v_cache, Tensor slot_mapping, int head_dim, Tensor cos_sin_cache, "
      "bool is_neox, float k_scale=1.0, float v_scale=1.0) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("per_token_quant_fp8(Tensor x) -> (Tensor, Tensor)");
  m.def("rms_norm_quant_fp8(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def(
      "fused_add_rms_norm_quant_fp8(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("silu_and_mul_quant_fp8(Tensor x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(modelyard, CUDA, m) {
  m.impl("paged_decode_attention", &modelyard::paged_decode_attention);
  m.impl("reshape_and_cache", &modelyard::reshape_and_cache);
  m.impl("rms_norm", &modelyard::rms_norm);
  m.impl("fused_add_rms_norm", &modelyard::fused_add_rms_norm);
  m.impl("rotary_embedding", &modelyard::rotary_embedding);
  m.impl("rotary_embedding_and_cache", &modelyard::rotary_embedding_and_cache);
  m.impl("silu_and_mul", &modelyard::silu_and_mul);
  m.impl("per_token_quant_fp8", &modelyard::per_token_quant_fp8);
  m.impl("rms_norm_quant_fp8", &modelyard::rms_norm_quant_fp8);
  m.impl("fused_add_rms_norm_quant_fp8", &modelyard::fused_add_rms_norm_quant_fp8);
  m.impl("silu_and_mul_quant_fp8", &modelyard::silu_and_mul_quant_fp8);
}
