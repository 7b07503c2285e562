// Host side of paged decode attention: checks, launch shape (heads per CTA, split count), scratch.
// Nothing here reads device memory, so the op is safe inside CUDA graph capture.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <type_traits>

#include "ops.h"
#include "paged_attention.cuh"

namespace modelyard {
namespace paged {
extern template void run<float, float>(const Params<float, float>&, int, int, cudaStream_t);
extern template void run<__half, __half>(const Params<__half, __half>&, int, int, cudaStream_t);
extern template void run<__nv_bfloat16, __nv_bfloat16>(const Params<__nv_bfloat16, __nv_bfloat16>&, int, int,
                                                       cudaStream_t);
extern template void run<__half, fp8_e4m3>(const Params<__half, fp8_e4m3>&, int, int, cudaStream_t);
extern template void run<__nv_bfloat16, fp8_e4m3>(const Params<__nv_bfloat16, fp8_e4m3>&, int, int, cudaStream_t);

// Default variant, measured on an H200: the plain slot kernel, except
// for 16-bit GQA caches, where the prefetching one is ~6% faster (for MHA it is 5-10% slower, and for
// fp8 caches up to 1.6x slower: its registers cost occupancy).
int default_variant(bool fp8, int group) { return !fp8 && group > 1 ? 3 : 2; }

// Query heads per CTA: the smallest compiled width that covers the GQA group (at most 8; larger
// groups take several CTAs per KV head).
int heads_per_cta(int group) {
  const int g = std::min(group, 8);
  return g <= 1 ? 1 : g <= 2 ? 2 : g <= 4 ? 4 : 8;
}

// Split only when (sequence, head group) pairs alone leave SMs idle, then aim at 4 CTAs per SM;
// never splits shorter than kMinSplitTokens. Measured on an H200: a grid
// that already covers the SMs loses 10-20% to splitting (partials + the reduce launch), a small
// batch with long contexts gains 3-4x.
int choose_splits(int64_t base_ctas, int64_t max_len, int num_sms) {
  if (base_ctas >= num_sms) return 1;
  const int64_t target = 4LL * num_sms;
  const int64_t by_len = std::max<int64_t>(1, ceil_div(max_len, kMinSplitTokens));
  return static_cast<int>(std::min<int64_t>({ceil_div(target, base_ctas), by_len, kMaxSplits}));
}

// Fills the kernel parameters for query type T and cache element C and launches.
template <typename T, typename C>
void launch(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
            const at::Tensor& seq_lens, at::Tensor& out, at::Tensor& part_out, at::Tensor& part_max,
            at::Tensor& part_sum, double qk_scale, double v_scale, int head_groups, int block_shift, int splits,
            int64_t variant, int ng, cudaStream_t stream) {
  Params<T, C> p{};
  p.q = reinterpret_cast<const T*>(q.data_ptr());
  p.k_cache = reinterpret_cast<const C*>(k_cache.data_ptr());
  p.v_cache = reinterpret_cast<const C*>(v_cache.data_ptr());
  p.block_tables = block_tables.data_ptr<int>();
  p.seq_lens = seq_lens.data_ptr<int>();
  p.out = reinterpret_cast<T*>(out.data_ptr());
  p.part_out = splits > 1 ? part_out.data_ptr<float>() : nullptr;
  p.part_max = splits > 1 ? part_max.data_ptr<float>() : nullptr;
  p.part_sum = splits > 1 ? part_sum.data_ptr<float>() : nullptr;
  p.q_stride_s = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.bt_stride = block_tables.stride(0);
  p.num_heads = static_cast<int>(q.size(1));
  p.num_kv_heads = static_cast<int>(k_cache.size(2));
  p.head_dim = static_cast<int>(q.size(2));
  p.head_groups = head_groups;
  p.block_shift = block_shift;
  p.num_splits = splits;
  p.scale_log2 = static_cast<float>(qk_scale * 1.4426950408889634);
  p.v_scale = static_cast<float>(v_scale);
  p.variant = variant != 0 ? static_cast<int>(variant)
                           : default_variant(std::is_same_v<C, fp8_e4m3>, p.num_heads / p.num_kv_heads);
  run<T, C>(p, ng, static_cast<int>(q.size(0)), stream);
}
}  // namespace paged

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                  int64_t max_seq_len, int64_t num_splits, int64_t variant, double k_scale,
                                  double v_scale) {
  TORCH_CHECK(q.is_cuda() && k_cache.is_cuda() && v_cache.is_cuda() && block_tables.is_cuda() && seq_lens.is_cuda(),
              "paged_decode_attention: all tensors must be on CUDA");
  TORCH_CHECK(q.dim() == 3, "paged_decode_attention: q must be [num_seqs, num_heads, head_dim], got ",
              shape(q.sizes()));
  TORCH_CHECK(
      k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
      "paged_decode_attention: k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode_attention: caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(),
              "paged_decode_attention: k_cache and v_cache dtypes differ");
  const bool fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(fp8 ? (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16)
                  : k_cache.scalar_type() == q.scalar_type(),
              "paged_decode_attention: the cache must have q's dtype, or be float8_e4m3fn with a float16/bfloat16 q");
  TORCH_CHECK(k_scale > 0 && v_scale > 0, "paged_decode_attention: k_scale and v_scale must be positive");
  TORCH_CHECK(fp8 || (k_scale == 1.0 && v_scale == 1.0),
              "paged_decode_attention: k_scale / v_scale apply to an fp8 cache only");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.stride(1) == 1,
              "paged_decode_attention: block_tables must be int32 [num_seqs, max_blocks] with contiguous rows");
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 && seq_lens.is_contiguous(),
              "paged_decode_attention: seq_lens must be a contiguous int32 vector");

  const int64_t S = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), Hk = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "paged_decode_attention: head_dim of q (", num(D), ") and cache (",
              num(k_cache.size(3)), ") differ");
  TORCH_CHECK(Hk > 0 && Hq % Hk == 0, "paged_decode_attention: num_heads ", num(Hq),
              " is not a multiple of num_kv_heads ", num(Hk));
  TORCH_CHECK(BS > 0 && (BS & (BS - 1)) == 0, "paged_decode_attention: block_size must be a power of two, got ",
              num(BS));
  TORCH_CHECK(block_tables.size(1) >= 1, "paged_decode_attention: block_tables needs at least one column");
  TORCH_CHECK(seq_lens.size(0) == S && block_tables.size(0) >= S,
              "paged_decode_attention: seq_lens / block_tables do not cover ", num(S), " sequences");
  const int64_t vec = 16 / q.element_size();
  TORCH_CHECK(!fp8 || D % 16 == 0, "paged_decode_attention: an fp8 cache needs head_dim % 16 == 0, got ", num(D));
  TORCH_CHECK(q.stride(2) == 1 && q.stride(0) % vec == 0 && q.stride(1) % vec == 0 &&
                  reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0,
              "paged_decode_attention: q rows must be 16-byte aligned with a contiguous head dim");
  TORCH_CHECK(num_splits >= 0 && num_splits <= paged::kMaxSplits, "paged_decode_attention: num_splits must be in [0, ",
              num(paged::kMaxSplits), "], got ", num(num_splits));
  TORCH_CHECK(variant == 0 || variant == 2 || variant == 3,
              "paged_decode_attention: variant must be 0 (auto), 2 or 3, got ", num(variant));
  TORCH_CHECK(D == 64 || D == 80 || D == 96 || D == 128 || (D == 256 && q.element_size() == 2),
              "paged_decode_attention: head_dim ", num(D),
              " is not compiled (64, 80, 96, 128 and, for 16-bit types, 256 are)");

  const c10::cuda::OptionalCUDAGuard guard(q.device());
  at::Tensor out = at::empty({S, Hq, D}, q.options());
  if (S == 0) return out;

  const int group = static_cast<int>(Hq / Hk);
  const int ng = paged::heads_per_cta(group);
  const int head_groups = static_cast<int>(ceil_div(group, ng));
  int block_shift = 0;
  while ((int64_t{1} << block_shift) < BS) ++block_shift;

  int splits = static_cast<int>(num_splits);
  if (splits == 0) {
    const int64_t max_len = max_seq_len > 0 ? max_seq_len : block_tables.size(1) * BS;
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()));
    splits = paged::choose_splits(S * Hk * head_groups, max_len, sms);
  }
  at::Tensor part_out, part_max, part_sum;
  if (splits > 1) {
    const auto fopt = q.options().dtype(at::kFloat);
    part_out = at::empty({S, Hq, splits, D}, fopt);
    part_max = at::empty({S, Hq, splits}, fopt);
    part_sum = at::empty({S, Hq, splits}, fopt);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  MODELYARD_DISPATCH_FLOAT_TYPES(q.scalar_type(), "paged_decode_attention", [&] {
    if (fp8) {
      if constexpr (!std::is_same_v<scalar_t, float>) {
        paged::launch<scalar_t, fp8_e4m3>(q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_max,
                                          part_sum, scale * k_scale, v_scale, head_groups, block_shift, splits, variant,
                                          ng, stream);
      }
    } else {
      paged::launch<scalar_t, scalar_t>(q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_max, part_sum,
                                        scale, 1.0, head_groups, block_shift, splits, variant, ng, stream);
    }
  });
  return out;
}

}  // namespace modelyard
