#pragma once

// SHIM for compile-only checking (cuda-check). The CPU torch wheel does not ship this
// CMake-generated header. Content mirrors pytorch/pytorch c10/cuda/impl/cuda_cmake_macros.h.in
// as configured for a Linux CUDA wheel (shared libs, CUDA 13.0 toolkit).
// Nothing in torch's public headers reads TORCH_CUDA_VERSION_*; only C10_CUDA_BUILD_SHARED_LIBS
// is consulted (by c10/cuda/CUDAMacros.h, and only on _WIN32).

#define C10_CUDA_BUILD_SHARED_LIBS

#define TORCH_CUDA_VERSION_MAJOR 13
#define TORCH_CUDA_VERSION_MINOR 0
#define TORCH_CUDA_VERSION_PATCH 0
#define TORCH_CUDA_VERSION_BUILD 0
