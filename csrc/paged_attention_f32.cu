// Instantiation of the paged decode kernels for query float, cache float (one translation unit per
// type pair: parallel builds).
#include "paged_attention.cuh"

namespace modelyard {
namespace paged {
template void run<float, float>(const Params<float, float>&, int, int, cudaStream_t);
}  // namespace paged
}  // namespace modelyard
