// Paged decode attention, split-KV ("flash-decoding"): one query token per sequence attends over
// its KV entries, scattered in fixed-size blocks of the pool [num_blocks, block_size, Hk, D].
// This header holds the launch dispatch over head dim and GQA width; the kernels are in
// paged_decode_slots.cuh (default) and paged_decode_tile.cuh.
#pragma once

#include "paged_common.cuh"
#include "paged_decode_slots.cuh"
#include "paged_decode_tile.cuh"

namespace modelyard {
namespace paged {

template <typename T, int D, int NG>
void launch_main(const Params<T>& p, int num_seqs, cudaStream_t stream) {
  const dim3 grid(p.num_kv_heads * p.head_groups, num_seqs, p.num_splits);
  if (p.variant == 2) {
    paged_decode_kernel_v2<T, D, NG><<<grid, kThreads, 0, stream>>>(p);
  } else {
    paged_decode_kernel<T, D, NG><<<grid, kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void dispatch_ng(const Params<T>& p, int ng, int num_seqs, cudaStream_t stream) {
  switch (ng) {
    case 1: return launch_main<T, D, 1>(p, num_seqs, stream);
    case 2: return launch_main<T, D, 2>(p, num_seqs, stream);
    case 4: return launch_main<T, D, 4>(p, num_seqs, stream);
    case 8: return launch_main<T, D, 8>(p, num_seqs, stream);
    default: TORCH_CHECK(false, "paged_decode_attention: internal error, heads per CTA ", num(ng));
  }
}

// Launches the main kernel (and the split reduction). Instantiated once per dtype, each in its own
// translation unit, so the three dtypes compile in parallel.
template <typename T>
void run(const Params<T>& p, int ng, int num_seqs, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  switch (p.head_dim) {
    case 64: dispatch_ng<T, 64>(p, ng, num_seqs, stream); break;
    case 80: dispatch_ng<T, 80>(p, ng, num_seqs, stream); break;
    case 96: dispatch_ng<T, 96>(p, ng, num_seqs, stream); break;
    case 128: dispatch_ng<T, 128>(p, ng, num_seqs, stream); break;
    case 256:
      if constexpr (256 / VEC <= 32) {
        dispatch_ng<T, 256>(p, ng, num_seqs, stream);
        break;
      }
      [[fallthrough]];
    default:
      TORCH_CHECK(false, "paged_decode_attention: head_dim ", num(p.head_dim),
                  " is not compiled (64, 80, 96, 128 and, for 16-bit types, 256 are)");
  }
  if (p.num_splits > 1) {
    const dim3 grid(p.num_heads, num_seqs);
    paged_decode_reduce_kernel<T><<<grid, 128, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace paged
}  // namespace modelyard
