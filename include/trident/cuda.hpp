#pragma once
#if !defined(__CUDACC__)
#error "trident/cuda.hpp must be compiled by nvcc (as CUDA): give the file a .cu extension or set its LANGUAGE to CUDA in CMake (set_source_files_properties(f.cpp PROPERTIES LANGUAGE CUDA)), and link trident::cuda. Host-only code can include trident/backend/cuda/api.hpp instead."
#else  // the rest only under nvcc, so that the #error above is the one message
/// @file cuda.hpp
/// trident with the CUDA backend: everything in trident.hpp, plus the `cuda` device
/// (backend/cuda/device.hpp), its kernels (backend/cuda/kernels.cuh) and the host-side API
/// (backend/cuda/api.hpp: errors, device count, streams, cuda_settings). Opt-in: needs nvcc
/// and the trident::cuda CMake target (CUDA runtime, cuBLAS, cuBLASLt).
///
/// Note: the CUDA headers define a global `half` (CUDA's __half). trident's 2-byte type is
/// trident::half; write it qualified in code that also has `using namespace trident;`.

#include "trident.hpp"

#include "backend/cuda/api.hpp"
#include "backend/cuda/device.hpp"
#include "backend/cuda/kernels.cuh"

#endif  // defined(__CUDACC__)
