#pragma once
/// @file vec_math.hpp
/// Vectorised activations for the GEMM epilogues (AVX-512 and AVX2 versions, each compiled
/// only when the target has the instructions). exp uses a degree-6 polynomial after range
/// reduction (about 1 ulp); erf uses the Abramowitz–Stegun 7.1.26 form (absolute error
/// below 1.5e-7), arranged so that GELU of large negative inputs keeps its relative accuracy.

#include "../../../config.hpp"
#include "../../../core/activation.hpp"

#if defined(TRIDENT_HAS_AVX512) || defined(TRIDENT_HAS_AVX2)
#include "../intrinsics.hpp"
#endif

// GCC 12 reports false -Wmaybe-uninitialized inside AVX-512 intrinsics (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace trident::cpu_kernels::detail {

namespace vm {
inline constexpr float log2e = 1.44269504088896341f;
inline constexpr float ln2_hi = 0.693359375f;
inline constexpr float ln2_lo = -2.12194440e-4f;
inline constexpr float exp_lo = -103.0f;  // exp underflows to 0 well before this
inline constexpr float exp_hi = 88.8f;    // and overflows to +inf past this
inline constexpr float c2 = 1.0f / 2, c3 = 1.0f / 6, c4 = 1.0f / 24, c5 = 1.0f / 120, c6 = 1.0f / 720;
// Abramowitz–Stegun 7.1.26: erfc(z) ~ t*(a1 + t*(a2 + ...)) * exp(-z^2), t = 1/(1 + p z), z >= 0.
inline constexpr float as_p = 0.3275911f;
inline constexpr float as_a1 = 0.254829592f, as_a2 = -0.284496736f, as_a3 = 1.421413741f,
                       as_a4 = -1.453152027f, as_a5 = 1.061405429f;
inline constexpr float sqrt_half = 0.70710678118654752f;
inline constexpr float gelu_tanh_k0 = 0.79788456080286536f;  // sqrt(2/pi)
inline constexpr float gelu_tanh_k1 = 0.044715f;
}  // namespace vm

#if defined(TRIDENT_HAS_AVX512)
/// Mask of the first `cols` lanes (clamped to 0..16) of a 16-lane vector.
TRIDENT_ALWAYS_INLINE __mmask16 lane_mask(index_t cols) noexcept {
  return cols >= 16 ? __mmask16(0xffff) : cols <= 0 ? __mmask16(0) : __mmask16((1u << cols) - 1u);
}

/// exp(x), lane-wise.
TRIDENT_ALWAYS_INLINE __m512 exp_avx512(__m512 x) noexcept {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(vm::exp_lo)), _mm512_set1_ps(vm::exp_hi));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(vm::log2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(vm::ln2_hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(vm::ln2_lo), r);
  __m512 p = _mm512_set1_ps(vm::c6);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(vm::c5));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(vm::c4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(vm::c3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(vm::c2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

/// The two terms of exact GELU and its derivative, lane-wise: s = 1 + erf(x / sqrt 2) and
/// g = exp(-x^2 / 2). With z = |x| / sqrt 2 and q = erfc(z) = poly(t) exp(-z^2): s = q for
/// x < 0 (keeping its relative accuracy far out in the tail) and 2 - q otherwise.
TRIDENT_ALWAYS_INLINE void gelu_terms_avx512(__m512 x, __m512& s, __m512& g) noexcept {
  const __m512 z = _mm512_abs_ps(_mm512_mul_ps(x, _mm512_set1_ps(vm::sqrt_half)));
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(z, _mm512_set1_ps(vm::as_p), _mm512_set1_ps(1.0f)));
  __m512 p = _mm512_set1_ps(vm::as_a5);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(vm::as_a4));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(vm::as_a3));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(vm::as_a2));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(vm::as_a1));
  p = _mm512_mul_ps(p, t);
  g = exp_avx512(_mm512_mul_ps(_mm512_mul_ps(z, z), _mm512_set1_ps(-1.0f)));
  const __m512 q = _mm512_mul_ps(p, g);
  const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  s = _mm512_mask_blend_ps(neg, _mm512_sub_ps(_mm512_set1_ps(2.0f), q), q);
}

/// dy * GELU'(x) = dy * (s / 2 + x * g / sqrt(2 pi)), lane-wise (exact GELU's derivative).
TRIDENT_ALWAYS_INLINE __m512 gelu_backward_avx512(__m512 dy, __m512 x) noexcept {
  __m512 s, g;
  gelu_terms_avx512(x, s, g);
  const __m512 d = _mm512_fmadd_ps(_mm512_mul_ps(x, g), _mm512_set1_ps(0.39894228040143267794f),
                                   _mm512_mul_ps(s, _mm512_set1_ps(0.5f)));
  return _mm512_mul_ps(dy, d);
}

/// act(x), lane-wise.
TRIDENT_ALWAYS_INLINE __m512 activation_avx512(activation act, __m512 x) noexcept {
  switch (act) {
    case activation::none: return x;
    case activation::relu: return _mm512_max_ps(x, _mm512_setzero_ps());
    case activation::gelu_tanh: {
      // 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u))
      const __m512 x2 = _mm512_mul_ps(x, x);
      const __m512 u = _mm512_mul_ps(
          _mm512_mul_ps(x, _mm512_set1_ps(vm::gelu_tanh_k0)),
          _mm512_fmadd_ps(x2, _mm512_set1_ps(vm::gelu_tanh_k1), _mm512_set1_ps(1.0f)));
      const __m512 e = exp_avx512(_mm512_mul_ps(u, _mm512_set1_ps(-2.0f)));
      return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    }
    case activation::gelu: {
      __m512 s, g;
      gelu_terms_avx512(x, s, g);
      return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), s);
    }
  }
  return x;
}
#endif  // TRIDENT_HAS_AVX512

#if defined(TRIDENT_HAS_AVX2)
/// exp(x), lane-wise (AVX2).
TRIDENT_ALWAYS_INLINE __m256 exp_avx2(__m256 x) noexcept {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(vm::log2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(vm::ln2_hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(vm::ln2_lo), r);
  __m256 p = _mm256_set1_ps(vm::c6);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(vm::c5));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(vm::c4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(vm::c3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(vm::c2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // 2^n for n in [-126, 128]: split in two halves so neither exponent field overflows.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

/// act(x), lane-wise (AVX2).
TRIDENT_ALWAYS_INLINE __m256 activation_avx2(activation act, __m256 x) noexcept {
  switch (act) {
    case activation::none: return x;
    case activation::relu: return _mm256_max_ps(x, _mm256_setzero_ps());
    case activation::gelu_tanh: {
      const __m256 x2 = _mm256_mul_ps(x, x);
      const __m256 u = _mm256_mul_ps(
          _mm256_mul_ps(x, _mm256_set1_ps(vm::gelu_tanh_k0)),
          _mm256_fmadd_ps(x2, _mm256_set1_ps(vm::gelu_tanh_k1), _mm256_set1_ps(1.0f)));
      const __m256 e = exp_avx2(_mm256_mul_ps(u, _mm256_set1_ps(-2.0f)));
      return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    }
    case activation::gelu: {
      const __m256 sign_mask = _mm256_set1_ps(-0.0f);
      const __m256 z = _mm256_andnot_ps(sign_mask, _mm256_mul_ps(x, _mm256_set1_ps(vm::sqrt_half)));
      const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(z, _mm256_set1_ps(vm::as_p), _mm256_set1_ps(1.0f)));
      __m256 p = _mm256_set1_ps(vm::as_a5);
      p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(vm::as_a4));
      p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(vm::as_a3));
      p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(vm::as_a2));
      p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(vm::as_a1));
      p = _mm256_mul_ps(p, t);
      const __m256 q = _mm256_mul_ps(p, exp_avx2(_mm256_mul_ps(_mm256_mul_ps(z, z), _mm256_set1_ps(-1.0f))));
      const __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
      const __m256 s = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(2.0f), q), q, neg);
      return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)), s);
    }
  }
  return x;
}
#endif  // TRIDENT_HAS_AVX2

}  // namespace trident::cpu_kernels::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
