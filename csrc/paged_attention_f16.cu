// __half instantiation of the paged decode kernels (one translation unit per dtype: parallel builds).
#include "paged_attention.cuh"

namespace modelyard {
namespace paged {
template void run<__half>(const Params<__half>&, int, int, cudaStream_t);
}  // namespace paged
}  // namespace modelyard
