// Host-side argument checks shared by the ops that write K/V rows into the paged cache
// (reshape_and_cache in cache_kernels.cu, rotary_embedding_and_cache in pos_encoding_kernels.cu).
#pragma once

#include <ATen/core/Tensor.h>

namespace modelyard {

// key / value [T, Hk, D] with a contiguous head dim, caches [NB, BS, Hk, D] contiguous of the key's
// dtype or float8_e4m3fn, slot_mapping [T] int64, positive scales (1 unless fp8). Raises with `op`
// in the message; returns true for an fp8 cache.
bool check_kv_write(const char* op, const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const at::Tensor& slot_mapping, double k_scale, double v_scale);

}  // namespace modelyard
