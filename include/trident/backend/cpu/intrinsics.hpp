#pragma once
/// @file backend/cpu/intrinsics.hpp
/// <immintrin.h>, included once for all of trident's SIMD code. GCC 12's AVX-512 intrinsic
/// headers start some results from a self-initialised "undefined" register, which its
/// -Wuninitialized then reports at every inlining site (GCC bug 105593, fixed in GCC 13).
/// The warnings are silenced for the header's own lines only, so that they stay on for ours.

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#include <immintrin.h>
#endif
#endif
