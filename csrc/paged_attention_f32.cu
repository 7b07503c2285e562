// float instantiation of the paged decode kernels (one translation unit per dtype: parallel builds).
#include "paged_attention.cuh"

namespace modelyard {
namespace paged {
template void run<float>(const Params<float>&, int, int, cudaStream_t);
}  // namespace paged
}  // namespace modelyard
