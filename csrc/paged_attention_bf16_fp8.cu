// Instantiation of the paged decode kernels for query __nv_bfloat16, cache fp8_e4m3 (one translation unit per
// type pair: parallel builds).
#include "paged_attention.cuh"

namespace modelyard {
namespace paged {
template void run<__nv_bfloat16, fp8_e4m3>(const Params<__nv_bfloat16, fp8_e4m3>&, int, int, cudaStream_t);
}  // namespace paged
}  // namespace modelyard
