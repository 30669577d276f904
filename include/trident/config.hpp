#pragma once
/// @file config.hpp
/// Compiler and instruction-set facts, read once here so that the rest of the library
/// asks plain `constexpr bool`s instead of repeating preprocessor tests.

#include <cstddef>
#include <cstdint>

// Functions callable from both host and device code. Under g++ this expands to nothing.
#if defined(__CUDACC__)
#define TRIDENT_HD __host__ __device__
#define TRIDENT_HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define TRIDENT_HD
#define TRIDENT_HOST_DEVICE_INLINE inline
#endif

#if defined(__GNUC__) || defined(__clang__)
#define TRIDENT_RESTRICT __restrict__
#define TRIDENT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define TRIDENT_RESTRICT
#define TRIDENT_ALWAYS_INLINE inline
#endif

// SIMD kernels are host code. nvcc's device pass never sees them; its host pass sees the
// same ISA macros as g++ does with the same -march flags.
#if !defined(__CUDA_ARCH__)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define TRIDENT_HAS_AVX512 1
#endif
#if defined(__AVX512BF16__) && defined(TRIDENT_HAS_AVX512)
#define TRIDENT_HAS_AVX512BF16 1
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TRIDENT_HAS_AVX2 1
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define TRIDENT_HAS_AMX_BF16 1
#endif
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define TRIDENT_HAS_AMX_INT8 1
#endif
#endif

#if defined(_OPENMP)
#define TRIDENT_HAS_OPENMP 1
#endif

// A loop the compiler should vectorise: `omp simd` with OpenMP (clauses such as
// reduction(+ : acc) pass through), GCC's ivdep without it, nothing elsewhere.
#define TRIDENT_PRAGMA(x) _Pragma(#x)
#if defined(_OPENMP)
#define TRIDENT_SIMD(...) TRIDENT_PRAGMA(omp simd __VA_ARGS__)
#elif defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define TRIDENT_SIMD(...) TRIDENT_PRAGMA(GCC ivdep)
#else
#define TRIDENT_SIMD(...)
#endif

// Fully unrolls a short loop of a known trip count in host SIMD code (GCC's pragma; nothing
// for compilers that do not know it, nvcc's front end included).
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define TRIDENT_UNROLL(n) TRIDENT_PRAGMA(GCC unroll n)
#else
#define TRIDENT_UNROLL(n)
#endif

// Unrolls a loop in CUDA device code; the host pass of nvcc (and g++) sees nothing.
#if defined(__CUDA_ARCH__)
#define TRIDENT_CUDA_UNROLL TRIDENT_PRAGMA(unroll)
#else
#define TRIDENT_CUDA_UNROLL
#endif

namespace trident {

/// Signed index type used for extents, strides and offsets.
using index_t = std::int64_t;

/// Alignment of every host allocation: one cache line, one AVX-512 register.
inline constexpr std::size_t host_alignment = 64;

/// What the compiler was told the target CPU can do. Kernels choose their path from these.
namespace isa {
#if defined(TRIDENT_HAS_AVX512)
inline constexpr bool avx512 = true;
#else
inline constexpr bool avx512 = false;
#endif
#if defined(TRIDENT_HAS_AVX512BF16)
inline constexpr bool avx512_bf16 = true;
#else
inline constexpr bool avx512_bf16 = false;
#endif
#if defined(TRIDENT_HAS_AVX2)
inline constexpr bool avx2 = true;
#else
inline constexpr bool avx2 = false;
#endif
#if defined(TRIDENT_HAS_AMX_BF16)
inline constexpr bool amx_bf16 = true;
#else
inline constexpr bool amx_bf16 = false;
#endif
#if defined(TRIDENT_HAS_AMX_INT8)
inline constexpr bool amx_int8 = true;
#else
inline constexpr bool amx_int8 = false;
#endif
#if defined(TRIDENT_HAS_OPENMP)
inline constexpr bool openmp = true;
#else
inline constexpr bool openmp = false;
#endif
}  // namespace isa

}  // namespace trident
