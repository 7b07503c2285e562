// Paged decode attention, split-KV ("flash-decoding"): one query token per sequence attends over
// its KV entries, scattered in fixed-size blocks of the pool [num_blocks, block_size, Hk, D].
// This header holds the launch dispatch over head dim and GQA width; the kernel is in
// paged_decode_slots.cuh.
#pragma once

#include "paged_common.cuh"
#include "paged_decode_slots.cuh"

namespace modelyard {
namespace paged {

template <typename T, typename C, int D, int NG>
void launch_main(const Params<T, C>& p, int num_seqs, cudaStream_t stream) {
  const dim3 grid(p.num_kv_heads * p.head_groups, num_seqs, p.num_splits);
  if (p.variant == 3) {
    paged_decode_kernel_v2<T, C, D, NG, 3><<<grid, kThreads, 0, stream>>>(p);
  } else {
    paged_decode_kernel_v2<T, C, D, NG, 2><<<grid, kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename C, int D>
void dispatch_ng(const Params<T, C>& p, int ng, int num_seqs, cudaStream_t stream) {
  switch (ng) {
    case 1:
      return launch_main<T, C, D, 1>(p, num_seqs, stream);
    case 2:
      return launch_main<T, C, D, 2>(p, num_seqs, stream);
    case 4:
      return launch_main<T, C, D, 4>(p, num_seqs, stream);
    case 8:
      return launch_main<T, C, D, 8>(p, num_seqs, stream);
    default:
      TORCH_CHECK(false, "paged_decode_attention: internal error, heads per CTA ", num(ng));
  }
}

// Launches the main kernel (and the split reduction). Instantiated once per (query, cache) type
// pair, each in its own translation unit, so they compile in parallel.
template <typename T, typename C>
void run(const Params<T, C>& p, int ng, int num_seqs, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(C);
  switch (p.head_dim) {
    case 64:
      dispatch_ng<T, C, 64>(p, ng, num_seqs, stream);
      break;
    case 80:
      dispatch_ng<T, C, 80>(p, ng, num_seqs, stream);
      break;
    case 96:
      dispatch_ng<T, C, 96>(p, ng, num_seqs, stream);
      break;
    case 128:
      dispatch_ng<T, C, 128>(p, ng, num_seqs, stream);
      break;
    case 256:
      if constexpr (256 / VEC <= 32) {
        dispatch_ng<T, C, 256>(p, ng, num_seqs, stream);
        break;
      }
      [[fallthrough]];
    default:
      TORCH_CHECK(false, "paged_decode_attention: head_dim ", num(p.head_dim),
                  " is not compiled (64, 80, 96, 128 and, for 16-bit types, 256 are)");
  }
  if (p.num_splits > 1) {
    const dim3 grid(p.num_heads, num_seqs);
    paged_decode_reduce_kernel<T, C><<<grid, 128, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace paged
}  // namespace modelyard
