#pragma once
/// @file backend/cpu/qgemm/store_avx512.hpp
/// The int8 GEMM epilogue on 16 columns at a time (AVX-512): the per-column operands (row
/// sums, weight scales, bias) of one 16-column panel are loaded once, then each row's int32
/// sums are stored or turned into fp32 with the same operations, in the same order, as the
/// scalar store_value, so every path gives bit-identical results.

#include <cstdint>

#include "common.hpp"

#if defined(TRIDENT_HAS_AVX512)
#include "../intrinsics.hpp"

namespace trident::cpu_kernels::qgemm {

/// Mask of the first `cols` of 16 lanes.
TRIDENT_ALWAYS_INLINE __mmask16 qlane_mask(index_t cols) noexcept {
  return cols >= 16 ? __mmask16(0xffff) : cols <= 0 ? __mmask16(0) : __mmask16((1u << cols) - 1u);
}

/// The epilogue of one 16-column panel of C (columns j .. j + cols - 1).
class panel_store {
 public:
  panel_store(const store_params& sp, index_t j, index_t cols) noexcept : sp_(sp), j_(j), mask_(qlane_mask(cols)) {
    if (sp.out_i32 != nullptr) return;
    rs_ = _mm512_maskz_loadu_epi32(mask_, sp.row_sum + j);
    ws_ = _mm512_maskz_loadu_ps(mask_, sp.w_scale + j);
    bias_ = sp.bias != nullptr ? _mm512_maskz_loadu_ps(mask_, sp.bias + j) : _mm512_setzero_ps();
  }

  /// Stores the sums `acc` of row i.
  TRIDENT_ALWAYS_INLINE void row(index_t i, __m512i acc) const noexcept {
    if (sp_.out_i32 != nullptr) {
      _mm512_mask_storeu_epi32(sp_.out_i32 + i * sp_.ld + j_, mask_, acc);
      return;
    }
    const index_t r = sp_.per_row ? i : 0;
    // s - z · row_sum wraps in int32 exactly where the int64 difference of store_value fits.
    if (sp_.a_zero != nullptr) acc = _mm512_sub_epi32(acc, _mm512_mullo_epi32(_mm512_set1_epi32(sp_.a_zero[r]), rs_));
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(_mm512_set1_ps(sp_.a_scale[r]), ws_));
    if (sp_.bias != nullptr) y = _mm512_add_ps(y, bias_);
    if (sp_.act == activation::relu) y = _mm512_max_ps(y, _mm512_setzero_ps());
    _mm512_mask_storeu_ps(sp_.out_f32 + i * sp_.ld + j_, mask_, y);
  }

 private:
  const store_params& sp_;
  index_t j_;
  __mmask16 mask_;
  __m512i rs_ = _mm512_setzero_si512();
  __m512 ws_ = _mm512_setzero_ps(), bias_ = _mm512_setzero_ps();
};

}  // namespace trident::cpu_kernels::qgemm

#endif  // TRIDENT_HAS_AVX512
