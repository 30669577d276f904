#pragma once
/// @file optim/vec.hpp
/// The small float-vector type the optimizer kernels are written in: one kernel body, written
/// once as a generic lambda, runs on AVX-512 (16 lanes), AVX2 (8 lanes) or plain floats (the
/// tail and the portable path) with the same operations in the same order. Explicit vectors
/// rather than `omp simd` because the loops need sqrt and division without errno branches
/// (GCC does not vectorise std::sqrt under the default -fmath-errno).

#include <cmath>

#include "../config.hpp"

#if defined(TRIDENT_HAS_AVX512) || defined(TRIDENT_HAS_AVX2)
#include "../backend/cpu/intrinsics.hpp"
#endif

namespace trident::optim::detail {

/// One float; also the tail of every vector loop.
struct vec1 {
  static constexpr int width = 1;
  float v;
  static vec1 load(const float* p) noexcept { return {*p}; }
  static vec1 set1(float x) noexcept { return {x}; }
  void store(float* p) const noexcept { *p = v; }
  friend vec1 operator+(vec1 a, vec1 b) noexcept { return {a.v + b.v}; }
  friend vec1 operator-(vec1 a, vec1 b) noexcept { return {a.v - b.v}; }
  friend vec1 operator*(vec1 a, vec1 b) noexcept { return {a.v * b.v}; }
  friend vec1 operator/(vec1 a, vec1 b) noexcept { return {a.v / b.v}; }
  friend vec1 sqrt(vec1 a) noexcept { return {std::sqrt(a.v)}; }
  friend vec1 min(vec1 a, vec1 b) noexcept { return {b.v < a.v ? b.v : a.v}; }
  /// Sum of squares in double.
  struct dacc {
    double s = 0;
    void add_sq(vec1 x) noexcept {
      const double d = x.v;
      s += d * d;
    }
    double sum() const noexcept { return s; }
  };
};

#if defined(TRIDENT_HAS_AVX512)
/// 16 floats (AVX-512).
struct vec16 {
  static constexpr int width = 16;
  __m512 v;
  static vec16 load(const float* p) noexcept { return {_mm512_loadu_ps(p)}; }
  static vec16 set1(float x) noexcept { return {_mm512_set1_ps(x)}; }
  void store(float* p) const noexcept { _mm512_storeu_ps(p, v); }
  friend vec16 operator+(vec16 a, vec16 b) noexcept { return {_mm512_add_ps(a.v, b.v)}; }
  friend vec16 operator-(vec16 a, vec16 b) noexcept { return {_mm512_sub_ps(a.v, b.v)}; }
  friend vec16 operator*(vec16 a, vec16 b) noexcept { return {_mm512_mul_ps(a.v, b.v)}; }
  friend vec16 operator/(vec16 a, vec16 b) noexcept { return {_mm512_div_ps(a.v, b.v)}; }
  friend vec16 sqrt(vec16 a) noexcept { return {_mm512_sqrt_ps(a.v)}; }
  friend vec16 min(vec16 a, vec16 b) noexcept { return {_mm512_min_ps(a.v, b.v)}; }
  struct dacc {
    __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
    void add_sq(vec16 x) noexcept {
      const __m512d a = _mm512_cvtps_pd(_mm512_castps512_ps256(x.v));
      const __m512d b = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x.v), 1)));
      lo = _mm512_fmadd_pd(a, a, lo);
      hi = _mm512_fmadd_pd(b, b, hi);
    }
    double sum() const noexcept { return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi)); }
  };
};
using vecf = vec16;
#elif defined(TRIDENT_HAS_AVX2)
/// 8 floats (AVX2).
struct vec8 {
  static constexpr int width = 8;
  __m256 v;
  static vec8 load(const float* p) noexcept { return {_mm256_loadu_ps(p)}; }
  static vec8 set1(float x) noexcept { return {_mm256_set1_ps(x)}; }
  void store(float* p) const noexcept { _mm256_storeu_ps(p, v); }
  friend vec8 operator+(vec8 a, vec8 b) noexcept { return {_mm256_add_ps(a.v, b.v)}; }
  friend vec8 operator-(vec8 a, vec8 b) noexcept { return {_mm256_sub_ps(a.v, b.v)}; }
  friend vec8 operator*(vec8 a, vec8 b) noexcept { return {_mm256_mul_ps(a.v, b.v)}; }
  friend vec8 operator/(vec8 a, vec8 b) noexcept { return {_mm256_div_ps(a.v, b.v)}; }
  friend vec8 sqrt(vec8 a) noexcept { return {_mm256_sqrt_ps(a.v)}; }
  friend vec8 min(vec8 a, vec8 b) noexcept { return {_mm256_min_ps(b.v, a.v)}; }
  struct dacc {
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
    void add_sq(vec8 x) noexcept {
      const __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(x.v));
      const __m256d b = _mm256_cvtps_pd(_mm256_extractf128_ps(x.v, 1));
      lo = _mm256_fmadd_pd(a, a, lo);
      hi = _mm256_fmadd_pd(b, b, hi);
    }
    double sum() const noexcept {
      alignas(32) double t[4];
      _mm256_store_pd(t, _mm256_add_pd(lo, hi));
      return (t[0] + t[1]) + (t[2] + t[3]);
    }
  };
};
using vecf = vec8;
#else
using vecf = vec1;
#endif

/// Calls body(V{}, i) for i = 0, W, 2W, ... with the widest vector V, then body(vec1{}, i) for
/// the remaining elements. `body` is a generic lambda: [&]<class V>(V, index_t i) { ... }.
template <class Body>
TRIDENT_ALWAYS_INLINE void for_each_vector(index_t n, Body&& body) {
  index_t i = 0;
  if constexpr (vecf::width > 1) {
    for (; i + vecf::width <= n; i += vecf::width) body(vecf{}, i);
  }
  for (; i < n; ++i) body(vec1{}, i);
}

}  // namespace trident::optim::detail
