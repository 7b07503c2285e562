// __nv_bfloat16 instantiation of the paged decode kernels (one translation unit per dtype: parallel builds).
#include "paged_attention.cuh"

namespace modelyard {
namespace paged {
template void run<__nv_bfloat16>(const Params<__nv_bfloat16>&, int, int, cudaStream_t);
}  // namespace paged
}  // namespace modelyard
