#pragma once
/// @file packing.hpp
/// Packing of op(A) and op(B) into the micro-panel layouts the register-blocked kernels read.
///
/// A micro-panel (MR rows, kc deep, k grouped by KG): entry ((p*MR + i)*KG + g) holds
/// op(A)(i0+i, k0+p*KG+g). B micro-panel (NR columns): entry ((p*NR + j)*KG + g) holds
/// op(B)(k0+p*KG+g, j0+j). Rows, columns and k beyond the matrix are zero. Inputs are
/// converted to the packed type on the way (half/bf16 widen to float exactly).

#include <cstring>

#include "common.hpp"
#include "vec_math.hpp"

#if defined(TRIDENT_HAS_AVX512) || defined(TRIDENT_HAS_AVX2)
#include "../intrinsics.hpp"
#endif

// GCC 12 reports false -Wmaybe-uninitialized inside AVX-512 intrinsics (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace trident::cpu_kernels::detail {

#if defined(TRIDENT_HAS_AVX512)
/// Converts 16 contiguous inputs (a prefix of `n` of them, the rest zero) to 16 floats.
template <class T>
TRIDENT_ALWAYS_INLINE __m512 load16_as_float(const T* x, __mmask16 mask) noexcept {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(mask, x);
  } else if constexpr (std::is_same_v<T, half>) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, x));
  } else {  // bfloat16
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, x)), 16));
  }
}

/// Transposes the 16x16 block held in r[0..15] (rows) into columns, in place.
TRIDENT_ALWAYS_INLINE void transpose16x16(__m512 (&r)[16]) noexcept {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a0 = _mm512_castps_pd(t[4 * i]), a1 = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d a2 = _mm512_castps_pd(t[4 * i + 2]), a3 = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
  }
  // r[4i + q] now holds, for rows 4i..4i+3, column q of each 128-bit lane.
  for (int q = 0; q < 4; ++q) {
    const __m512 a0 = r[q], a1 = r[4 + q], a2 = r[8 + q], a3 = r[12 + q];
    const __m512 b0 = _mm512_shuffle_f32x4(a0, a1, 0x88);  // lanes 0,2 of a0 | lanes 0,2 of a1
    const __m512 b1 = _mm512_shuffle_f32x4(a0, a1, 0xdd);  // lanes 1,3 ...
    const __m512 b2 = _mm512_shuffle_f32x4(a2, a3, 0x88);
    const __m512 b3 = _mm512_shuffle_f32x4(a2, a3, 0xdd);
    t[q] = _mm512_shuffle_f32x4(b0, b2, 0x88);       // lane 0 of all
    t[8 + q] = _mm512_shuffle_f32x4(b0, b2, 0xdd);   // lane 2
    t[4 + q] = _mm512_shuffle_f32x4(b1, b3, 0x88);   // lane 1
    t[12 + q] = _mm512_shuffle_f32x4(b1, b3, 0xdd);  // lane 3
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

/// Packs rows [i0, i0+mr) of op(A), k range [k0, k0+kc), into one micro-panel of MR rows.
template <class P, int MR, int KG, class T>
inline void pack_a_panel(const T* a, bool trans, index_t lda, index_t i0, index_t mr, index_t k0, index_t kc,
                         P* TRIDENT_RESTRICT out) noexcept {
  const index_t groups = ceil_div(kc, KG);
#if defined(TRIDENT_HAS_AVX512)
  if constexpr (KG == 1 && std::is_same_v<P, float> && MR <= 16) {
    if (!trans) {
      // Rows of A are contiguous in k: load 16 k from each row, transpose, store MR-wide columns.
      const __mmask16 rows_mask = static_cast<__mmask16>((1u << MR) - 1u);
      for (index_t p = 0; p < kc; p += 16) {
        const index_t kk = std::min<index_t>(16, kc - p);
        const __mmask16 kmask = static_cast<__mmask16>(kk >= 16 ? 0xffffu : (1u << kk) - 1u);
        __m512 r[16];
        for (int i = 0; i < 16; ++i) {
          r[i] = (i < mr) ? load16_as_float(a + (i0 + i) * lda + k0 + p, kmask) : _mm512_setzero_ps();
        }
        transpose16x16(r);
        for (index_t q = 0; q < kk; ++q) _mm512_mask_storeu_ps(out + (p + q) * MR, rows_mask, r[q]);
      }
      return;
    }
    // Transposed A: column i0.. of the stored k x m matrix is contiguous in i.
    const __mmask16 mmask = static_cast<__mmask16>((1u << mr) - 1u);
    for (index_t p = 0; p < kc; ++p) {
      const __m512 x = load16_as_float(a + (k0 + p) * lda + i0, mmask);
      _mm512_mask_storeu_ps(out + p * MR, static_cast<__mmask16>((1u << MR) - 1u), x);
    }
    return;
  }
#endif
  for (index_t p = 0; p < groups; ++p) {
    for (int i = 0; i < MR; ++i) {
      for (int g = 0; g < KG; ++g) {
        const index_t kk = p * KG + g;
        out[(p * MR + i) * KG + g] =
            (i < mr && kk < kc) ? convert_element<P>(op_at(a, trans, lda, i0 + i, k0 + kk)) : zero_element<P>();
      }
    }
  }
}

/// Packs columns [j0, j0+nr) of op(B), k range [k0, k0+kc), into one micro-panel of NR columns.
template <class P, int NR, int KG, class T>
inline void pack_b_panel(const T* b, bool trans, index_t ldb, index_t j0, index_t nr, index_t k0, index_t kc,
                         P* TRIDENT_RESTRICT out) noexcept {
  const index_t groups = ceil_div(kc, KG);
#if defined(TRIDENT_HAS_AVX512)
  if constexpr (KG == 1 && std::is_same_v<P, float> && NR % 16 == 0) {
    if (!trans) {
      // Rows of B are contiguous in j.
      for (index_t p = 0; p < kc; ++p) {
        const T* row = b + (k0 + p) * ldb + j0;
        for (int v = 0; v < NR / 16; ++v) {
          _mm512_store_ps(out + p * NR + 16 * v, load16_as_float(row + 16 * v, lane_mask(nr - 16 * v)));
        }
      }
      return;
    }
    // Transposed B: op(B)(k, j) = b[j*ldb + k]; transpose 16 x 16 blocks.
    for (int v = 0; v < NR / 16; ++v) {
      const index_t jv = 16 * v;
      for (index_t p = 0; p < kc; p += 16) {
        const index_t kk = std::min<index_t>(16, kc - p);
        const __mmask16 kmask = static_cast<__mmask16>(kk >= 16 ? 0xffffu : (1u << kk) - 1u);
        __m512 r[16];
        for (int j = 0; j < 16; ++j) {
          r[j] = (jv + j < nr) ? load16_as_float(b + (j0 + jv + j) * ldb + k0 + p, kmask) : _mm512_setzero_ps();
        }
        transpose16x16(r);
        for (index_t q = 0; q < kk; ++q) _mm512_store_ps(out + (p + q) * NR + jv, r[q]);
      }
    }
    return;
  }
#endif
  if constexpr (KG == 1 && std::is_same_v<P, T>) {
    if (!trans) {
      for (index_t p = 0; p < kc; ++p) {
        const T* row = b + (k0 + p) * ldb + j0;
        P* o = out + p * NR;
        for (index_t j = 0; j < nr; ++j) o[j] = row[j];
        for (index_t j = nr; j < NR; ++j) o[j] = zero_element<P>();
      }
      return;
    }
  }
  for (index_t p = 0; p < groups; ++p) {
    for (int j = 0; j < NR; ++j) {
      for (int g = 0; g < KG; ++g) {
        const index_t kk = p * KG + g;
        out[(p * NR + j) * KG + g] =
            (j < nr && kk < kc) ? convert_element<P>(op_at(b, !trans, ldb, j0 + j, k0 + kk)) : zero_element<P>();
      }
    }
  }
}

/// Packs `count` consecutive micro-panels of op(B) starting at column j0 (panel q covers
/// columns j0 + q*NR .. , clipped to j_end) into out + q * NR * kcp. Non-transposed fp32
/// rows are copied row by row across all the panels, so B is read in long contiguous runs.
template <class P, int NR, int KG, class T>
inline void pack_b_panels(const T* b, bool trans, index_t ldb, index_t j0, index_t j_end, index_t count, index_t k0,
                          index_t kc, index_t kcp, P* TRIDENT_RESTRICT out) noexcept {
#if defined(TRIDENT_HAS_AVX512)
  if constexpr (KG == 1 && std::is_same_v<P, float> && NR % 16 == 0) {
    if (!trans) {
      for (index_t p = 0; p < kc; ++p) {
        const T* row = b + (k0 + p) * ldb;
        for (index_t q = 0; q < count; ++q) {
          const index_t jq = j0 + q * NR;
          P* o = out + q * NR * kcp + p * NR;
          for (int v = 0; v < NR / 16; ++v) {
            _mm512_store_ps(o + 16 * v, load16_as_float(row + jq + 16 * v, lane_mask(j_end - jq - 16 * v)));
          }
        }
      }
      return;
    }
  }
#endif
  (void)kcp;
  for (index_t q = 0; q < count; ++q) {
    const index_t jq = j0 + q * NR;
    pack_b_panel<P, NR, KG>(b, trans, ldb, jq, std::min<index_t>(NR, j_end - jq), k0, kc, out + q * NR * kcp);
  }
}

}  // namespace trident::cpu_kernels::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
