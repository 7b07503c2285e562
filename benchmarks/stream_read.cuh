// The plain streaming read both yardsticks time: benchmarks/gemm_stream.cu (a GEMM's weights against
// reading the same bytes) and benchmarks/stream_floor.py (a decode step's reads, kernel by kernel).
// Reads n 16-byte words with 8 independent loads in flight per thread; the xor keeps them live.
#pragma once

struct alignas(16) V16 {
  unsigned a, b, c, d;
};
__global__ void __launch_bounds__(256) stream_read(const V16* __restrict__ p, long n, unsigned* out) {
  constexpr int U = 8;
  unsigned acc = 0;
  const long stride = static_cast<long>(gridDim.x) * blockDim.x;
  long i = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x;
  for (; i + (U - 1) * stride < n; i += U * stride) {
    V16 a[U];
#pragma unroll
    for (int u = 0; u < U; ++u) a[u] = p[i + u * stride];
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= a[u].a ^ a[u].b ^ a[u].c ^ a[u].d;
  }
  for (; i < n; i += stride) acc ^= p[i].a;
  if (acc == 0x9e3779b9u) out[0] = acc;  // (almost) never: the loads must not be optimized away
}
