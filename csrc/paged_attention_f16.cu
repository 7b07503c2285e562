// Instantiation of the paged decode kernels for query __half, cache __half (one translation unit per
// type pair: parallel builds).
#include "paged_attention.cuh"

namespace modelyard {
namespace paged {
template void run<__half, __half>(const Params<__half, __half>&, int, int, cudaStream_t);
}  // namespace paged
}  // namespace modelyard
