// Instantiation of the paged decode kernels for query __nv_bfloat16, cache __nv_bfloat16 (one translation unit per
// type pair: parallel builds).
#include "paged_attention.cuh"

namespace modelyard {
namespace paged {
template void run<__nv_bfloat16, __nv_bfloat16>(const Params<__nv_bfloat16, __nv_bfloat16>&, int, int, cudaStream_t);
}  // namespace paged
}  // namespace modelyard
