#pragma once
/// @file backend/cpu/qgemm/quantize.hpp
/// Dynamic quantization of activations to uint8 (ONNX DynamicQuantizeLinear), one row at a
/// time: the range of a row (its minimum and maximum, and whether everything is finite), the
/// scale and zero point of a range, and QuantizeLinear of a row. The AVX-512 versions give
/// bit-identical results to the scalar ones (x / scale in float, rounded half to even).

#include <cmath>
#include <cstdint>
#include <limits>

#include "../../../quant/onnx.hpp"
#include "common.hpp"

#if defined(TRIDENT_HAS_AVX512)
#include "../intrinsics.hpp"
#endif

namespace trident::cpu_kernels::qgemm {

/// The range of a run of values.
struct value_range {
  float lo = std::numeric_limits<float>::infinity();
  float hi = -std::numeric_limits<float>::infinity();
  bool finite = true;  ///< false when a NaN or infinity was seen

  void merge(const value_range& o) noexcept {
    lo = std::min(lo, o.lo);
    hi = std::max(hi, o.hi);
    finite = finite && o.finite;
  }
};

/// Minimum, maximum and finiteness of x[0, n).
inline value_range range_of(const float* x, index_t n) noexcept {
  value_range r;
  index_t p = 0;
#if defined(TRIDENT_HAS_AVX512)
  __m512 lo = _mm512_set1_ps(r.lo), hi = _mm512_set1_ps(r.hi);
  const __m512i exp_mask = _mm512_set1_epi32(0x7f800000);
  __mmask16 bad = 0;
  for (; p + 16 <= n; p += 16) {
    const __m512 v = _mm512_loadu_ps(x + p);
    lo = _mm512_min_ps(lo, v);
    hi = _mm512_max_ps(hi, v);
    bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), exp_mask), exp_mask);
  }
  r.lo = _mm512_reduce_min_ps(lo);
  r.hi = _mm512_reduce_max_ps(hi);
  r.finite = bad == 0;
#endif
  for (; p < n; ++p) {
    const float v = x[p];
    if (!std::isfinite(v)) r.finite = false;
    r.lo = std::min(r.lo, v);
    r.hi = std::max(r.hi, v);
  }
  return r;
}

/// ONNX DynamicQuantizeLinear's parameters for the range [lo, hi] (finite):
/// scale = (max(0, hi) - min(0, lo)) / 255, 1 for a range of 0; zero point =
/// saturate(round_half_even(-min(0, lo) / scale)).
inline void dynamic_params(float lo, float hi, float& scale, std::int32_t& zero) noexcept {
  const float lo0 = std::min(0.0f, lo), hi0 = std::max(0.0f, hi);
  scale = (hi0 - lo0) / 255.0f;
  if (!(scale > 0.0f)) scale = 1.0f;
  const float z = quant::round_half_even((0.0f - lo0) / scale);
  zero = static_cast<std::int32_t>(std::clamp(z, 0.0f, 255.0f));
}

/// q[p] = ONNX QuantizeLinear(x[p], scale, zero) as uint8 for p < n (x finite).
///
/// ONNX divides: q = round(x / scale). Division is the slow part of the vector loop, so it
/// multiplies by the reciprocal instead and divides only where that could change the result:
/// fl(x · fl(1/scale)) is within 3 · 2^-24 relative of x / scale and fl(x / scale) within
/// 2^-24, so the two round to different integers only when a half-integer lies within
/// |t| · 2^-21.4 of t = fl(x · fl(1/scale)). Vectors with a lane within |t| · 2^-20 of a
/// half-integer (about one in a thousand) are divided; the result is always exactly ONNX's.
inline void quantize_row_u8(const float* x, index_t n, float scale, std::int32_t zero, std::uint8_t* q) noexcept {
  index_t p = 0;
#if defined(TRIDENT_HAS_AVX512)
  const float inv_s = 1.0f / scale;
  const bool use_inv = std::isfinite(inv_s) && inv_s > 0.0f && std::isnormal(scale);
  const __m512 s = _mm512_set1_ps(scale), inv = _mm512_set1_ps(inv_s), z = _mm512_set1_ps(static_cast<float>(zero));
  const __m512 lo = _mm512_setzero_ps(), hi = _mm512_set1_ps(255.0f), half = _mm512_set1_ps(0.5f);
  const __m512 rel = _mm512_set1_ps(0x1p-20f);
  // x / scale rounded to an integer, plus the zero point, clamped to [0, 255], as int32.
  auto lanes = [&](const float* xp) {
    const __m512 xv = _mm512_loadu_ps(xp);
    __m512 t;
    if (use_inv) {
      t = _mm512_mul_ps(xv, inv);
      const __m512 frac = _mm512_sub_ps(t, _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
      const __m512 dist = _mm512_abs_ps(_mm512_sub_ps(frac, half));
      if (_mm512_cmp_ps_mask(dist, _mm512_mul_ps(_mm512_abs_ps(t), rel), _CMP_LE_OQ) != 0) t = _mm512_div_ps(xv, s);
    } else {
      t = _mm512_div_ps(xv, s);
    }
    // Ties to even, then the zero point and saturation: exactly quant::quantize_value.
    const __m512 r = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_add_ps(r, z), lo), hi));
  };
  // 64 at a time: two saturating packs and a dword transpose put the bytes in order.
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  for (; p + 64 <= n; p += 64) {
    const __m512i ab = _mm512_packs_epi32(lanes(x + p), lanes(x + p + 16));
    const __m512i cd = _mm512_packs_epi32(lanes(x + p + 32), lanes(x + p + 48));
    _mm512_storeu_si512(reinterpret_cast<void*>(q + p), _mm512_permutexvar_epi32(order, _mm512_packus_epi16(ab, cd)));
  }
  for (; p + 16 <= n; p += 16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + p), _mm512_cvtusepi32_epi8(lanes(x + p)));
  }
#endif
  for (; p < n; ++p) q[p] = static_cast<std::uint8_t>(quant::quantize_value<std::uint8_t>(x[p], scale, zero));
}

}  // namespace trident::cpu_kernels::qgemm
