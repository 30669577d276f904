#pragma once
/// @file qgemm_weight_only.hpp
/// The dequantising GEMM of weight-only quantization: Y (m x n) = act(X (m x k) W^T + bias),
/// X in fp32, W (n x k) stored as int8 or int4 with one fp32 scale per group of `group`
/// consecutive k of a row. W is never dequantised as a whole:
///
/// - Many rows of X (m > small_m_max): the blocked fp32 GEMM of gemm/blocked.hpp runs
///   unchanged, with its micro-kernels and blocking; only the packing of B differs. B is
///   described by a `groupwise_b<Bits>` and gemm_blocked's call pack_b_panels<P, NR, KG>(b, ...)
///   finds the overload below by argument-dependent lookup (groupwise_b lives in the same
///   namespace), which dequantises each micro-panel of W^T straight into the fp32 packed
///   layout (q * scale; 16 x 16 blocks converted and transposed in registers). The weight
///   bytes read are 1/4 (int8) or 1/8 (int4) of fp32's, the packed panels are the same.
/// - Few rows (m <= small_m_max: decoding, small batches, memory bound): a direct kernel
///   that reads each byte of W once. Rows of W are dequantised a few at a time into an L1
///   buffer and dotted with every row of X; the reduction along k stays in registers.
///
/// int8 values are widened and scaled (q * s, exact: |q| <= 128 has 8 significant bits, so
/// q * s is the correctly rounded product the reference forms); int4 values pass through a
/// 16-entry table of level * s per (row, group), indexed by the nibbles (VPERMPS).

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../../config.hpp"
#include "../../core/activation.hpp"
#include "gemm/blocked.hpp"
#include "gemm/common.hpp"
#include "gemm/kernel_avx2.hpp"
#include "gemm/kernel_avx512.hpp"
#include "gemm/kernel_scalar.hpp"
#include "gemm/packing.hpp"
#include "gemm/vec_math.hpp"

#if defined(TRIDENT_HAS_AVX512)
#include "intrinsics.hpp"
#endif

// GCC 12 reports false -Wmaybe-uninitialized inside AVX-512 intrinsics (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace trident::cpu_kernels {

namespace detail {

/// A group-wise quantized weight W (n x k) as the kernels read it: row j's values at
/// data + j * row_bytes (int8: one per byte; int4: two per byte, the first in the low
/// nibble), its scales at scales + j * (k / group).
/// @tparam Bits 8 or 4
template <int Bits>
struct groupwise_b {
  static_assert(Bits == 8 || Bits == 4, "groupwise_b: 8 or 4 bits");
  const std::uint8_t* data = nullptr;
  const float* scales = nullptr;
  index_t n = 0;      ///< rows of W (outputs)
  index_t k = 0;      ///< columns of W (inputs)
  index_t group = 0;  ///< consecutive k sharing a scale; divides k

  index_t row_bytes() const noexcept { return Bits == 8 ? k : k / 2; }
  index_t groups() const noexcept { return k / group; }
  /// The integer W(j, p).
  int value(index_t j, index_t p) const noexcept {
    const std::uint8_t* row = data + j * row_bytes();
    if constexpr (Bits == 8) {
      return static_cast<std::int8_t>(row[p]);
    } else {
      const int nibble = (p & 1) ? (row[p >> 1] >> 4) : (row[p >> 1] & 0xF);
      return nibble >= 8 ? nibble - 16 : nibble;
    }
  }
  /// W(j, p) dequantised: value * scale.
  float at(index_t j, index_t p) const noexcept {
    return static_cast<float>(value(j, p)) * scales[j * groups() + p / group];
  }
};

#if defined(TRIDENT_HAS_AVX512)
/// The 16 int4 levels -8..7 as floats, in nibble order (index = nibble: 0..7, then -8..-1).
TRIDENT_ALWAYS_INLINE __m512 int4_levels() noexcept {
  return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
}

/// 16 consecutive int8 values at p, as floats times `scale`.
TRIDENT_ALWAYS_INLINE __m512 dequant16_int8(const std::uint8_t* p, __m512 scale) noexcept {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), scale);
}

/// 16 consecutive int4 values (8 bytes at p, ONNX nibble order) through `table` (level * scale).
TRIDENT_ALWAYS_INLINE __m512 dequant16_int4(const std::uint8_t* p, __m512 table) noexcept {
  // Byte t widened to a 64-bit lane: its low dword indexes with bits 0..3 (the low nibble,
  // element 2t), and the byte shifted up by 28 puts the high nibble at bits 32..35 (element
  // 2t+1). VPERMPS reads only the low 4 bits of each index.
  const __m512i b = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m512i idx = _mm512_or_si512(b, _mm512_slli_epi64(b, 28));
  return _mm512_permutexvar_ps(idx, table);
}

/// Elements [p, p+16) of row j of W, dequantised (p + 16 <= k, one group: group % 16 == 0).
template <int Bits>
TRIDENT_ALWAYS_INLINE __m512 dequant16(const groupwise_b<Bits>& w, index_t j, index_t p) noexcept {
  const float s = w.scales[j * w.groups() + p / w.group];
  if constexpr (Bits == 8) {
    return dequant16_int8(w.data + j * w.k + p, _mm512_set1_ps(s));
  } else {
    return dequant16_int4(w.data + j * (w.k / 2) + p / 2, _mm512_mul_ps(int4_levels(), _mm512_set1_ps(s)));
  }
}
#endif

/// Packs micro-panels of op(B) = W^T for the blocked GEMM, dequantising on the way: panel q
/// covers columns (rows of W) j0 + q*NR .., clipped to j_end, for k in [k0, k0+kc), into
/// out + q * NR * kcp, entry (p*NR + j)*KG + g = W(j0 + q*NR + j, k0 + p*KG + g) * scale.
/// Columns and k beyond W are zero. Found by gemm_blocked through argument-dependent lookup.
template <class P, int NR, int KG, int Bits>
inline void pack_b_panels(const groupwise_b<Bits>* wp, bool trans, index_t ldb, index_t j0, index_t j_end,
                          index_t count, index_t k0, index_t kc, index_t kcp, P* TRIDENT_RESTRICT out) noexcept {
  (void)trans;
  (void)ldb;
  const groupwise_b<Bits>& w = *wp;
#if defined(TRIDENT_HAS_AVX512)
  if constexpr (KG == 1 && std::is_same_v<P, float> && NR % 16 == 0) {
    if (w.group % 16 == 0 && k0 % 16 == 0) {
      for (index_t q = 0; q < count; ++q) {
        const index_t jq = j0 + q * NR;
        const index_t nr = std::min<index_t>(NR, j_end - jq);
        P* o = out + q * NR * kcp;
        for (int v = 0; v < NR / 16; ++v) {
          const index_t jv = jq + 16 * v;
          const index_t rows = std::clamp<index_t>(nr - 16 * v, 0, 16);
          for (index_t p = 0; p < kc; p += 16) {
            const index_t kk = std::min<index_t>(16, kc - p);
            __m512 r[16];
            if (kk == 16) {
              for (int j = 0; j < 16; ++j) r[j] = j < rows ? dequant16(w, jv + j, k0 + p) : _mm512_setzero_ps();
            } else {
              // The last, partial block of k (kc is not a multiple of 16): element by element.
              for (int j = 0; j < 16; ++j) {
                alignas(64) float t[16] = {};
                for (index_t g = 0; g < kk && j < rows; ++g) t[g] = w.at(jv + j, k0 + p + g);
                r[j] = _mm512_load_ps(t);
              }
            }
            transpose16x16(r);
            for (index_t g = 0; g < kk; ++g) _mm512_store_ps(o + (p + g) * NR + 16 * v, r[g]);
          }
        }
      }
      return;
    }
  }
#endif
  for (index_t q = 0; q < count; ++q) {
    const index_t jq = j0 + q * NR;
    const index_t nr = std::min<index_t>(NR, j_end - jq);
    P* o = out + q * NR * kcp;
    const index_t groups = ceil_div(kc, KG);
    for (index_t p = 0; p < groups; ++p) {
      for (int j = 0; j < NR; ++j) {
        for (int g = 0; g < KG; ++g) {
          const index_t kk = p * KG + g;
          o[(p * NR + j) * KG + g] = (j < nr && kk < kc) ? convert_element<P>(w.at(jq + j, k0 + kk)) : zero_element<P>();
        }
      }
    }
  }
}

/// Largest m the direct (few rows) kernel takes; more rows go through the blocked GEMM.
inline constexpr index_t small_m_max = 16;

/// Rows of W dequantised together by the direct kernel (its L1 buffer holds JB x k floats).
inline constexpr index_t small_jb = 4;

/// The direct kernel on rows [j0, j1) of W: Y(i, j) = act(sum_p X(i, p) W(j, p) + bias[j]).
template <int Bits>
inline void weight_only_small_rows(const float* x, index_t m, index_t ldx, const groupwise_b<Bits>& w, float* y,
                                   index_t ldy, const gemm_epilogue& ep, index_t j0, index_t j1, float* buf) {
  const index_t k = w.k;
  for (index_t jb = j0; jb < j1; jb += small_jb) {
    const index_t nj = std::min(small_jb, j1 - jb);
    // Dequantise rows jb .. jb+nj of W into buf (nj x k).
    for (index_t j = 0; j < nj; ++j) {
      float* b = buf + j * k;
      index_t p = 0;
#if defined(TRIDENT_HAS_AVX512)
      if (w.group % 16 == 0) {
        for (; p < k; p += 16) _mm512_storeu_ps(b + p, dequant16(w, jb + j, p));
      }
#endif
      for (; p < k; ++p) b[p] = w.at(jb + j, p);
    }
    for (index_t i = 0; i < m; ++i) {
      const float* xi = x + i * ldx;
      for (index_t j = 0; j < nj; ++j) {
        const float* b = buf + j * k;
        float acc = 0.0f;
        index_t p = 0;
#if defined(TRIDENT_HAS_AVX512)
        __m512 va = _mm512_setzero_ps();
        for (; p + 16 <= k; p += 16) va = _mm512_fmadd_ps(_mm512_loadu_ps(xi + p), _mm512_loadu_ps(b + p), va);
        acc = _mm512_reduce_add_ps(va);
#endif
        for (; p < k; ++p) acc += xi[p] * b[p];
        if (ep.bias != nullptr) acc += ep.bias[jb + j];
        y[i * ldy + jb + j] = apply_activation(ep.act, acc);
      }
    }
  }
}

}  // namespace detail

/// Y (m x n, ldy) = act(X (m x k, ldx) W^T + bias): see the file comment. Threads with OpenMP
/// like the fp32 GEMM (single-threaded inside a parallel region).
template <int Bits>
void weight_only_gemm(const float* x, index_t m, index_t ldx, const detail::groupwise_b<Bits>& w, float* y,
                      index_t ldy, const gemm_epilogue& ep = {}) {
  const index_t n = w.n, k = w.k;
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    detail::scale_c_only(m, n, 0.0f, y, ldy, ep);
    return;
  }
  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  if (m <= detail::small_m_max) {
    // Memory bound: split the rows of W across the threads (bytes of W, not flops, decide).
    const double bytes = static_cast<double>(n) * static_cast<double>(w.row_bytes());
    const int threads = detail::gemm_threads(std::max(flops, bytes * 64.0));
    const index_t blocks = detail::ceil_div(n, detail::small_jb);
    detail::run_parallel(threads, [&](int tid, int nt, std::int64_t*) {
      float* buf = static_cast<float*>(
          detail::thread_workspace(2).get(static_cast<std::size_t>(detail::small_jb * k) * sizeof(float)));
      index_t b0, b1;
      detail::split_range(blocks, 1, nt, tid, b0, b1);
      detail::weight_only_small_rows(x, m, ldx, w, y, ldy, ep, b0 * detail::small_jb,
                                     std::min(n, b1 * detail::small_jb), buf);
    });
    return;
  }
  const int threads = detail::gemm_threads(flops);
#if defined(TRIDENT_HAS_AVX512)
  if (detail::round_up(n, 64) * 10 > detail::round_up(n, 32) * 11) {
    detail::gemm_blocked<kernel_avx512_f32_narrow>(false, true, m, n, k, 1.0f, x, ldx, &w, 0, 0.0f, y, ldy, ep,
                                                   threads);
    return;
  }
  detail::gemm_blocked<kernel_avx512_f32>(false, true, m, n, k, 1.0f, x, ldx, &w, 0, 0.0f, y, ldy, ep, threads);
#elif defined(TRIDENT_HAS_AVX2)
  detail::gemm_blocked<kernel_avx2_f32>(false, true, m, n, k, 1.0f, x, ldx, &w, 0, 0.0f, y, ldy, ep, threads);
#else
  detail::gemm_blocked<kernel_scalar<float, 4, 16>>(false, true, m, n, k, 1.0f, x, ldx, &w, 0, 0.0f, y, ldy, ep,
                                                    threads);
#endif
}

}  // namespace trident::cpu_kernels

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
