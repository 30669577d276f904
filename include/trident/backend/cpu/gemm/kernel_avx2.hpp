#pragma once
/// @file kernel_avx2.hpp
/// AVX2/FMA fp32 micro-kernel: a 6 x 16 tile in 12 ymm accumulators, A broadcast, two B
/// vectors per k. Compiled only when the target has AVX2, FMA and F16C.

#include "common.hpp"
#include "vec_math.hpp"

#if defined(TRIDENT_HAS_AVX2)
#include "../intrinsics.hpp"

// GCC 12 reports false -Wmaybe-uninitialized inside AVX-512 intrinsics (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace trident::cpu_kernels {

/// AVX2 fp32 micro-kernel (6 x 16).
struct kernel_avx2_f32 {
  using value_type = float;   ///< accumulate/output type
  using packed_type = float;  ///< element type of the packed panels
  static constexpr int mr = 6;   ///< tile rows
  static constexpr int nr = 16;  ///< tile columns
  static constexpr int kg = 1;   ///< k elements grouped per packed entry
  static constexpr index_t mc_blk = 144;   ///< rows of A per L2 block
  static constexpr index_t kc_blk = 256;   ///< depth of a K block
  static constexpr index_t nc_blk = 3072;  ///< columns of B per packed panel

  /// Computes the tile from `kc` packed k steps and stores its mr x nr corner into C.
  static void run(index_t kc, const float* TRIDENT_RESTRICT a, const float* TRIDENT_RESTRICT b, float* c,
                  index_t ldc, index_t mr, index_t nr, const detail::tile_store<float>& ts) noexcept {
    __m256 acc[6][2];
TRIDENT_UNROLL(6)
    for (int i = 0; i < 6; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
TRIDENT_UNROLL(2)
    for (index_t p = 0; p < kc; ++p) {
      const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
TRIDENT_UNROLL(6)
      for (int i = 0; i < 6; ++i) {
        const __m256 av = _mm256_broadcast_ss(a + i);
        acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
      }
      a += 6;
      b += 16;
    }
    if (mr == 6 && nr == 16) {
      const __m256 alpha = _mm256_set1_ps(ts.alpha);
      const bool read_c = !ts.first || ts.beta != 0.0f;
      const __m256 cscale = ts.first ? _mm256_set1_ps(ts.beta) : _mm256_set1_ps(1.0f);
      __m256 bias0 = _mm256_setzero_ps(), bias1 = _mm256_setzero_ps();
      if (ts.last && ts.bias != nullptr) {
        bias0 = _mm256_loadu_ps(ts.bias);
        bias1 = _mm256_loadu_ps(ts.bias + 8);
      }
TRIDENT_UNROLL(6)
      for (int i = 0; i < 6; ++i) {
        float* ci = c + i * ldc;
        __m256 x0 = _mm256_mul_ps(acc[i][0], alpha), x1 = _mm256_mul_ps(acc[i][1], alpha);
        if (read_c) {
          x0 = _mm256_fmadd_ps(_mm256_loadu_ps(ci), cscale, x0);
          x1 = _mm256_fmadd_ps(_mm256_loadu_ps(ci + 8), cscale, x1);
        }
        if (ts.last) {
          x0 = detail::activation_avx2(ts.act, _mm256_add_ps(x0, bias0));
          x1 = detail::activation_avx2(ts.act, _mm256_add_ps(x1, bias1));
        }
        _mm256_storeu_ps(ci, x0);
        _mm256_storeu_ps(ci + 8, x1);
      }
    } else {
      alignas(32) float t[6][16];
      for (int i = 0; i < 6; ++i) {
        _mm256_store_ps(t[i], acc[i][0]);
        _mm256_store_ps(t[i] + 8, acc[i][1]);
      }
      detail::store_tile_scalar(&t[0][0], 16, c, ldc, mr, nr, ts);
    }
  }
};

}  // namespace trident::cpu_kernels

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // TRIDENT_HAS_AVX2
