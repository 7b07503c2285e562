// Instantiation of the paged decode kernels for query __half, cache fp8_e4m3 (one translation unit per
// type pair: parallel builds).
#include "paged_attention.cuh"

namespace modelyard {
namespace paged {
template void run<__half, fp8_e4m3>(const Params<__half, fp8_e4m3>&, int, int, cudaStream_t);
}  // namespace paged
}  // namespace modelyard
