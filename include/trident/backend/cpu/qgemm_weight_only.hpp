#pragma once
/// @file qgemm_weight_only.hpp
/// The dequantising GEMM of weight-only quantization: Y (m x n) = act(X (m x k) W^T + bias),
/// X in fp32, W (n x k) stored as int8 or int4 with one fp32 scale per group of `group`
/// consecutive k of a row. W is never dequantised as a whole. Three ways, by the rows of X:
///
/// - Few rows (m <= small_m_max = 32: decoding, small batches; memory bound): the direct
///   kernel reads each byte of W once, with no packing. Tiles of up to 4 rows of X x 4 rows
///   of W accumulate dot products along k in 16 vector registers, reduced once at the end;
///   W is dequantised in registers as it streams by (m <= 4) or, for more rows, 4 rows at a
///   time into an L1/L2 buffer that every 4 rows of X then read.
/// - Up to 256 rows (and m k <= 2^20): the streamed GEMM. X is packed once for the fp32
///   micro-kernel (kernel_avx512_f32 and its narrow variant, the fp32 GEMM's own); W goes a
///   micro-panel (NR rows x one K block) at a time through a per-thread buffer, dequantised
///   straight into the packed layout and consumed at once by every row tile of X. Each
///   weight is read and dequantised once; no packed copy of W reaches memory.
/// - More rows: the blocked fp32 GEMM of gemm/blocked.hpp, unchanged: its micro-kernels,
///   blocking and threading, with only the packing of W replaced. W is described by a
///   `groupwise_b<Bits>`, and gemm_blocked's calls pack_b_panels<P, NR, KG>(b, ...) and
///   pack_a_panel<P, MR, KG>(a, ...) find the overloads below by argument-dependent lookup
///   (groupwise_b lives in the same namespace), which dequantise micro-panels of W straight
///   into the fp32 packed layout (16 x 16 blocks converted and transposed in registers). W is
///   B (Y = X W^T), or A where the fp32 GEMM computes transposed (Y^T = W X^T; see
///   detail::transposed_pays).
///
/// Every path reads 1/4 (int8) or 1/8 (int4) of fp32's weight bytes and multiplies in fp32.
/// int8 values are widened and scaled (q * s in fp32); int4 values pass through a 16-entry
/// table of level * s per (row, group), indexed by the nibbles (VPERMPS). Either way each
/// dequantised weight is the fp32 product value * scale, bit for bit what the dequantised
/// view (quant/weight_only.hpp) gives.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "../../config.hpp"
#include "../../core/activation.hpp"
#include "gemm.hpp"
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

/// Elements [p, p+16) of row j of W, dequantised (p + 16 <= k, within group g = p / group:
/// group % 16 == 0). `groups` is w.groups(); the callers hoist both divisions out of their loops.
template <int Bits>
TRIDENT_ALWAYS_INLINE __m512 dequant16(const groupwise_b<Bits>& w, index_t j, index_t p, index_t g,
                                       index_t groups) noexcept {
  const float s = w.scales[j * groups + g];
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
      const index_t groups = w.groups();
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
              const index_t g = (k0 + p) / w.group;
              for (int j = 0; j < 16; ++j) r[j] = j < rows ? dequant16(w, jv + j, k0 + p, g, groups) : _mm512_setzero_ps();
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

/// Packs rows [i0, i0+mr) of W, k range [k0, k0+kc), into one micro-panel of MR rows,
/// dequantising on the way: entry (p*MR + i)*KG + g = W(i0 + i, k0 + p*KG + g) * scale. This
/// is the A operand when the product is computed transposed (Y^T = W X^T). Found by
/// gemm_blocked through argument-dependent lookup, like pack_b_panels above.
template <class P, int MR, int KG, int Bits>
inline void pack_a_panel(const groupwise_b<Bits>* wp, bool trans, index_t lda, index_t i0, index_t mr, index_t k0,
                         index_t kc, P* TRIDENT_RESTRICT out) noexcept {
  (void)trans;
  (void)lda;
  const groupwise_b<Bits>& w = *wp;
#if defined(TRIDENT_HAS_AVX512)
  if constexpr (KG == 1 && std::is_same_v<P, float> && MR <= 16) {
    if (w.group % 16 == 0 && k0 % 16 == 0) {
      const index_t groups = w.groups();
      const __mmask16 rows_mask = static_cast<__mmask16>((1u << MR) - 1u);
      for (index_t p = 0; p < kc; p += 16) {
        const index_t kk = std::min<index_t>(16, kc - p);
        __m512 r[16];
        if (kk == 16) {
          const index_t g = (k0 + p) / w.group;
          for (int i = 0; i < 16; ++i) r[i] = i < mr ? dequant16(w, i0 + i, k0 + p, g, groups) : _mm512_setzero_ps();
        } else {
          for (int i = 0; i < 16; ++i) {
            alignas(64) float t[16] = {};
            for (index_t g = 0; g < kk && i < mr; ++g) t[g] = w.at(i0 + i, k0 + p + g);
            r[i] = _mm512_load_ps(t);
          }
        }
        transpose16x16(r);
        for (index_t q = 0; q < kk; ++q) _mm512_mask_storeu_ps(out + (p + q) * MR, rows_mask, r[q]);
      }
      return;
    }
  }
#endif
  const index_t groups = ceil_div(kc, KG);
  for (index_t p = 0; p < groups; ++p) {
    for (int i = 0; i < MR; ++i) {
      for (int g = 0; g < KG; ++g) {
        const index_t kk = p * KG + g;
        out[(p * MR + i) * KG + g] = (i < mr && kk < kc) ? convert_element<P>(w.at(i0 + i, k0 + kk)) : zero_element<P>();
      }
    }
  }
}

/// Largest m the direct (few rows) kernel takes; more rows go through the streamed or blocked GEMM.
inline constexpr index_t small_m_max = 32;

/// Rows of W one tile of the direct kernel covers.
inline constexpr index_t small_jb = 4;

/// Stores y(i, j) = act(s + bias[j]).
TRIDENT_ALWAYS_INLINE void store_dot(float* y, float s, index_t j, const gemm_epilogue& ep) noexcept {
  if (ep.bias != nullptr) s += ep.bias[j];
  *y = apply_activation(ep.act, s);
}

/// The direct kernel, portable: rows [j0, j1) of W, every row of X, one element at a time
/// (any group; used when the group is not a multiple of 16 or without AVX-512).
template <int Bits>
inline void small_rows_scalar(const float* x, index_t m, index_t ldx, const groupwise_b<Bits>& w, float* y,
                              index_t ldy, const gemm_epilogue& ep, index_t j0, index_t j1, float* buf) {
  const index_t k = w.k;
  for (index_t j = j0; j < j1; ++j) {
    for (index_t p = 0; p < k; ++p) buf[p] = w.at(j, p);
    for (index_t i = 0; i < m; ++i) {
      const float* xi = x + i * ldx;
      float acc = 0.0f;
      TRIDENT_SIMD(reduction(+ : acc))
      for (index_t p = 0; p < k; ++p) acc += xi[p] * buf[p];
      store_dot(y + i * ldy + j, acc, j, ep);
    }
  }
}

#if defined(TRIDENT_HAS_AVX512)
/// One tile of the direct kernel: rows [i0, i0+MI) of X against rows j0 .. j0+JB of W (nj of
/// them real; the others repeat the last row and are not stored). `load(jj, p, g)` gives
/// elements [p, p+16) of the tile's row jj, p in group g. Dot products run along k in
/// MI x JB vector accumulators, reduced once at the end.
template <int MI, int JB, class Load>
TRIDENT_ALWAYS_INLINE void dot_tile(const float* x, index_t ldx, index_t k, index_t group, Load&& load, float* y,
                                    index_t ldy, index_t j0, index_t nj, const gemm_epilogue& ep) noexcept {
  __m512 acc[MI][JB];
  TRIDENT_UNROLL(4)
  for (int i = 0; i < MI; ++i) {
    TRIDENT_UNROLL(8)
    for (int jj = 0; jj < JB; ++jj) acc[i][jj] = _mm512_setzero_ps();
  }
  for (index_t g0 = 0, g = 0; g0 < k; g0 += group, ++g) {
    auto rows = load.group(g);  // per-row constants of this group (scales / int4 tables)
    for (index_t p = g0; p < g0 + group; p += 16) {
      __m512 wv[JB];
      TRIDENT_UNROLL(8)
      for (int jj = 0; jj < JB; ++jj) wv[jj] = load(rows, jj, p);
      TRIDENT_UNROLL(4)
      for (int i = 0; i < MI; ++i) {
        const __m512 xv = _mm512_loadu_ps(x + i * ldx + p);
        TRIDENT_UNROLL(8)
        for (int jj = 0; jj < JB; ++jj) acc[i][jj] = _mm512_fmadd_ps(xv, wv[jj], acc[i][jj]);
      }
    }
  }
  TRIDENT_UNROLL(4)
  for (int i = 0; i < MI; ++i) {
    TRIDENT_UNROLL(8)
    for (int jj = 0; jj < JB; ++jj) {
      if (jj < nj) store_dot(y + i * ldy + j0 + jj, _mm512_reduce_add_ps(acc[i][jj]), j0 + jj, ep);
    }
  }
}

/// Reads a tile's rows of W straight from the packed values, dequantising in registers.
template <int Bits, int JB>
struct packed_rows {
  const groupwise_b<Bits>& w;
  const std::uint8_t* row[JB];  ///< packed row of each tile row
  const float* scale[JB];       ///< scales of each tile row

  packed_rows(const groupwise_b<Bits>& wb, index_t j0, index_t nj) noexcept : w(wb) {
    for (int jj = 0; jj < JB; ++jj) {
      const index_t j = j0 + std::min<index_t>(jj, nj - 1);
      row[jj] = w.data + j * w.row_bytes();
      scale[jj] = w.scales + j * w.groups();
    }
  }
  struct group_consts {
    __m512 v[JB];  ///< int8: the scale broadcast; int4: the table level * scale
  };
  TRIDENT_ALWAYS_INLINE group_consts group(index_t g) const noexcept {
    group_consts c;
    TRIDENT_UNROLL(8)
    for (int jj = 0; jj < JB; ++jj) {
      const __m512 s = _mm512_set1_ps(scale[jj][g]);
      c.v[jj] = Bits == 8 ? s : _mm512_mul_ps(int4_levels(), s);
    }
    return c;
  }
  TRIDENT_ALWAYS_INLINE __m512 operator()(const group_consts& c, int jj, index_t p) const noexcept {
    if constexpr (Bits == 8) {
      return dequant16_int8(row[jj] + p, c.v[jj]);
    } else {
      return dequant16_int4(row[jj] + p / 2, c.v[jj]);
    }
  }
};

/// Reads a tile's rows of W from an fp32 buffer (JB rows of k, dequantised beforehand).
template <int JB>
struct buffer_rows {
  const float* buf;
  index_t k;
  struct group_consts {};
  TRIDENT_ALWAYS_INLINE group_consts group(index_t) const noexcept { return {}; }
  TRIDENT_ALWAYS_INLINE __m512 operator()(const group_consts&, int jj, index_t p) const noexcept {
    return _mm512_loadu_ps(buf + jj * k + p);
  }
};

/// Runs dot_tile for `mi` (1..4) rows of X.
template <int JB, class Load>
TRIDENT_ALWAYS_INLINE void dot_tile_rows(index_t mi, const float* x, index_t ldx, index_t k, index_t group,
                                         const Load& load, float* y, index_t ldy, index_t j0, index_t nj,
                                         const gemm_epilogue& ep) noexcept {
  switch (mi) {
    case 1: dot_tile<1, JB>(x, ldx, k, group, load, y, ldy, j0, nj, ep); break;
    case 2: dot_tile<2, JB>(x, ldx, k, group, load, y, ldy, j0, nj, ep); break;
    case 3: dot_tile<3, JB>(x, ldx, k, group, load, y, ldy, j0, nj, ep); break;
    default: dot_tile<4, JB>(x, ldx, k, group, load, y, ldy, j0, nj, ep); break;
  }
}
#endif

#if defined(TRIDENT_HAS_AVX512)
/// X (m x k, ldx) into xp (m x k) with every 32 consecutive elements reordered: the 16 even
/// ones, then the 16 odd ones; the order in which dot_tile_int4_pairs decodes int4 bytes.
inline void deinterleave32(const float* x, index_t m, index_t ldx, index_t k, float* xp) noexcept {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (index_t i = 0; i < m; ++i) {
    for (index_t c = 0; c < k; c += 32) {
      const __m512 a = _mm512_loadu_ps(x + i * ldx + c), b = _mm512_loadu_ps(x + i * ldx + c + 16);
      _mm512_storeu_ps(xp + i * k + c, _mm512_permutex2var_ps(a, even, b));
      _mm512_storeu_ps(xp + i * k + c + 16, _mm512_permutex2var_ps(a, odd, b));
    }
  }
}

/// The direct kernel's int4 tile for m <= 4, two values per byte at a time: 16 bytes widen to
/// 16 dwords; their low nibbles (the even elements) and, shifted, their high nibbles (the odd
/// ones) index the row's table of level * scale. Against X deinterleaved by deinterleave32
/// the sums are those of the plain order, regrouped. Needs group % 32 == 0.
template <int MI, int JB>
TRIDENT_ALWAYS_INLINE void dot_tile_int4_pairs(const float* xp, index_t k, const groupwise_b<4>& w, float* y,
                                               index_t ldy, index_t j0, index_t nj, const gemm_epilogue& ep) noexcept {
  const std::uint8_t* row[JB];
  const float* scale[JB];
  for (int jj = 0; jj < JB; ++jj) {
    const index_t j = j0 + std::min<index_t>(jj, nj - 1);
    row[jj] = w.data + j * (k / 2);
    scale[jj] = w.scales + j * w.groups();
  }
  __m512 acc[MI][JB];
  TRIDENT_UNROLL(4)
  for (int i = 0; i < MI; ++i) {
    TRIDENT_UNROLL(8)
    for (int jj = 0; jj < JB; ++jj) acc[i][jj] = _mm512_setzero_ps();
  }
  for (index_t g0 = 0, g = 0; g0 < k; g0 += w.group, ++g) {
    __m512 table[JB];
    TRIDENT_UNROLL(8)
    for (int jj = 0; jj < JB; ++jj) table[jj] = _mm512_mul_ps(int4_levels(), _mm512_set1_ps(scale[jj][g]));
    for (index_t p = g0; p < g0 + w.group; p += 32) {
      TRIDENT_UNROLL(8)
      for (int jj = 0; jj < JB; ++jj) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row[jj] + p / 2)));
        const __m512 lo = _mm512_permutexvar_ps(v, table[jj]);
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table[jj]);
        TRIDENT_UNROLL(4)
        for (int i = 0; i < MI; ++i) {
          acc[i][jj] = _mm512_fmadd_ps(_mm512_loadu_ps(xp + i * k + p), lo, acc[i][jj]);
          acc[i][jj] = _mm512_fmadd_ps(_mm512_loadu_ps(xp + i * k + p + 16), hi, acc[i][jj]);
        }
      }
    }
  }
  TRIDENT_UNROLL(4)
  for (int i = 0; i < MI; ++i) {
    TRIDENT_UNROLL(8)
    for (int jj = 0; jj < JB; ++jj) {
      if (jj < nj) store_dot(y + i * ldy + j0 + jj, _mm512_reduce_add_ps(acc[i][jj]), j0 + jj, ep);
    }
  }
}
#endif

/// Whether the direct kernel reads int4 two values per byte at a time (dot_tile_int4_pairs).
template <int Bits>
constexpr bool int4_pairs(index_t m, index_t group) noexcept {
  return isa::avx512 && Bits == 4 && m <= 4 && group % 32 == 0;
}

/// The direct kernel on rows [j0, j1) of W: Y(i, j) = act(sum_p X(i, p) W(j, p) + bias[j]).
/// Up to 4 rows of X: W is dequantised in registers as it streams by. More: each block of
/// small_jb rows of W is dequantised once into `buf` (small_jb x k floats, L1/L2) and every
/// 4 rows of X are dotted with it.
/// `xp` is X deinterleaved (deinterleave32) when int4_pairs(m, group), else unused.
template <int Bits>
inline void weight_only_small_rows(const float* x, index_t m, index_t ldx, const groupwise_b<Bits>& w, float* y,
                                   index_t ldy, const gemm_epilogue& ep, index_t j0, index_t j1, float* buf,
                                   const float* xp) {
#if defined(TRIDENT_HAS_AVX512)
  if (w.group % 16 == 0) {
    constexpr int JB = static_cast<int>(small_jb);
    const index_t k = w.k;
    if constexpr (Bits == 4) {
      if (int4_pairs<Bits>(m, w.group)) {
        for (index_t jb = j0; jb < j1; jb += JB) {
          const index_t nj = std::min<index_t>(JB, j1 - jb);
          switch (m) {
            case 1: dot_tile_int4_pairs<1, JB>(xp, k, w, y, ldy, jb, nj, ep); break;
            case 2: dot_tile_int4_pairs<2, JB>(xp, k, w, y, ldy, jb, nj, ep); break;
            case 3: dot_tile_int4_pairs<3, JB>(xp, k, w, y, ldy, jb, nj, ep); break;
            default: dot_tile_int4_pairs<4, JB>(xp, k, w, y, ldy, jb, nj, ep); break;
          }
        }
        return;
      }
    }
    for (index_t jb = j0; jb < j1; jb += JB) {
      const index_t nj = std::min<index_t>(JB, j1 - jb);
      const packed_rows<Bits, JB> packed(w, jb, nj);
      if (m <= 4) {
        dot_tile_rows<JB>(m, x, ldx, k, w.group, packed, y, ldy, jb, nj, ep);
        continue;
      }
      for (index_t g0 = 0, g = 0; g0 < k; g0 += w.group, ++g) {
        const auto c = packed.group(g);
        for (index_t p = g0; p < g0 + w.group; p += 16) {
          TRIDENT_UNROLL(8)
          for (int jj = 0; jj < JB; ++jj) _mm512_storeu_ps(buf + jj * k + p, packed(c, jj, p));
        }
      }
      const buffer_rows<JB> rows{buf, k};
      for (index_t i = 0; i < m; i += 4) {
        dot_tile_rows<JB>(std::min<index_t>(4, m - i), x + i * ldx, ldx, k, w.group, rows, y + i * ldy, ldy, jb, nj,
                          ep);
      }
    }
    return;
  }
#endif
  (void)xp;
  small_rows_scalar(x, m, ldx, w, y, ldy, ep, j0, j1, buf);
}

/// The streamed GEMM: the register-blocked micro-kernel `Kernel` over the whole of X (packed
/// once, m x k floats, shared by the threads) against W one micro-panel (NR rows of W x one
/// K block) at a time: each panel is dequantised into a per-thread buffer (L1/L2) and used at
/// once by every row tile of X, so W is read and dequantised exactly once and no packed copy
/// of it ever reaches memory. The packing of X and then the panels are handed out to the
/// threads through the atomic counters of run_panel (blocked.hpp).
template <class Kernel, int Bits>
void weight_only_streamed(const float* x, index_t m, index_t ldx, const groupwise_b<Bits>& w, float* y, index_t ldy,
                          const gemm_epilogue& ep, int threads) {
  static_assert(Kernel::kg == 1, "weight_only_streamed: fp32 micro-kernels only");
  constexpr index_t MR = Kernel::mr, NR = Kernel::nr;
  const index_t n = w.n, k = w.k;
  const index_t kblocks = ceil_div(k, Kernel::kc_blk);
  const index_t kc_max = round_up(ceil_div(k, kblocks), 16);
  const index_t mtiles = ceil_div(m, MR);
  const index_t panels = ceil_div(n, NR);
  // Packed X: [K block][row tile][kc_max x MR], in the calling thread's workspace.
  float* abuf = static_cast<float*>(
      thread_workspace(1).get(static_cast<std::size_t>(kblocks * mtiles * MR * kc_max) * sizeof(float)));
  auto pack_a = [&](index_t u0, index_t u1) {
    for (index_t u = u0; u < u1; ++u) {
      const index_t kb = u / mtiles, t = u % mtiles;
      const index_t pc = kb * kc_max, kc = std::min(kc_max, k - pc);
      pack_a_panel<float, static_cast<int>(MR), 1>(x, false, ldx, t * MR, std::min(MR, m - t * MR), pc, kc,
                                                   abuf + u * MR * kc_max);
    }
  };
  panel_sync sync;
  run_parallel(threads, [&](int, int nt, std::int64_t* waited) {
    float* bbuf = static_cast<float*>(thread_workspace(0).get(static_cast<std::size_t>(NR * kc_max) * sizeof(float)));
    tile_store<float> ts;
    ts.act = ep.act;
    auto compute = [&](index_t p) {
      const index_t j0 = p * NR, nr = std::min(NR, n - j0);
      ts.bias = ep.bias != nullptr ? ep.bias + j0 : nullptr;
      for (index_t kb = 0; kb < kblocks; ++kb) {
        const index_t pc = kb * kc_max, kc = std::min(kc_max, k - pc);
        pack_b_panels<float, static_cast<int>(NR), 1>(&w, true, 0, j0, n, 1, pc, kc, kc, bbuf);
        ts.first = kb == 0;
        ts.last = kb + 1 == kblocks;
        const float* ak = abuf + kb * mtiles * MR * kc_max;
        for (index_t t = 0; t < mtiles; ++t) {
          Kernel::run(kc, ak + t * MR * kc_max, bbuf, y + t * MR * ldy + j0, ldy, std::min(MR, m - t * MR), nr, ts);
        }
      }
    };
    if (nt == 1) {
      pack_a(0, kblocks * mtiles);
      for (index_t p = 0; p < panels; ++p) compute(p);
      return;
    }
    run_panel(sync, nullptr, 0, kblocks * mtiles, 1, panels, waited, pack_a, compute);
  });
}

/// Largest m the streamed GEMM takes (its packed X, m x k floats, is read once per panel of W).
inline bool streamed_fits(index_t m, index_t k) noexcept { return m <= 256 && m * k <= (index_t{1} << 20); }

}  // namespace detail

/// The implementations of weight_only_gemm, reachable one by one for tests and benchmarks.
/// Each computes Y (m x n, ldy) = act(X (m x k, ldx) W^T + bias) for m >= 1, n >= 1, k >= 1.
namespace weight_only_paths {

/// The direct kernel (see the file comment). Blocks of 32 rows of W are handed out to the
/// `threads` threads through an atomic counter (a thread whose core is busy elsewhere just
/// takes fewer).
template <int Bits>
void direct(const float* x, index_t m, index_t ldx, const detail::groupwise_b<Bits>& w, float* y, index_t ldy,
            const gemm_epilogue& ep, int threads) {
  constexpr index_t rows_per_item = 8 * detail::small_jb;
  const index_t items = detail::ceil_div(w.n, rows_per_item);
  std::atomic<index_t> next{0};
  detail::run_parallel(threads, [&](int, int, std::int64_t*) {
    float* buf = static_cast<float*>(
        detail::thread_workspace(2).get(static_cast<std::size_t>(detail::small_jb * w.k) * sizeof(float)));
    float* xp = nullptr;
#if defined(TRIDENT_HAS_AVX512)
    if (detail::int4_pairs<Bits>(m, w.group)) {
      xp = static_cast<float*>(detail::thread_workspace(3).get(static_cast<std::size_t>(m * w.k) * sizeof(float)));
      detail::deinterleave32(x, m, ldx, w.k, xp);
    }
#endif
    for (;;) {
      const index_t it = next.fetch_add(1, std::memory_order_relaxed);
      if (it >= items) break;
      detail::weight_only_small_rows(x, m, ldx, w, y, ldy, ep, it * rows_per_item,
                                     std::min(w.n, (it + 1) * rows_per_item), buf, xp);
    }
  });
}

/// The streamed GEMM (see detail::weight_only_streamed), micro-kernel chosen as gemm_f32_auto does.
template <int Bits>
void streamed(const float* x, index_t m, index_t ldx, const detail::groupwise_b<Bits>& w, float* y, index_t ldy,
              const gemm_epilogue& ep, int threads) {
#if defined(TRIDENT_HAS_AVX512)
  if (detail::round_up(w.n, 64) * 10 > detail::round_up(w.n, 32) * 11) {
    detail::weight_only_streamed<kernel_avx512_f32_narrow>(x, m, ldx, w, y, ldy, ep, threads);
    return;
  }
#endif
  detail::weight_only_streamed<default_f32_kernel>(x, m, ldx, w, y, ldy, ep, threads);
}

/// The blocked fp32 GEMM (micro-kernel chosen as gemm_f32_auto does) with B = W^T packed by
/// the dequantising pack_b_panels.
template <int Bits>
void blocked(const float* x, index_t m, index_t ldx, const detail::groupwise_b<Bits>& w, float* y, index_t ldy,
             const gemm_epilogue& ep, int threads) {
  const index_t n = w.n, k = w.k;
#if defined(TRIDENT_HAS_AVX512)
  if (detail::round_up(n, 64) * 10 > detail::round_up(n, 32) * 11) {
    detail::gemm_blocked<kernel_avx512_f32_narrow>(false, true, m, n, k, 1.0f, x, ldx, &w, 0, 0.0f, y, ldy, ep,
                                                   threads);
    return;
  }
#endif
  detail::gemm_blocked<default_f32_kernel>(false, true, m, n, k, 1.0f, x, ldx, &w, 0, 0.0f, y, ldy, ep, threads);
}

/// The blocked GEMM computed transposed, Y^T = W X^T, into a scratch stored transposed into Y
/// with the epilogue (as the fp32 GEMM does where detail::transposed_pays): W is the A
/// operand, dequantised by pack_a_panel, and the shared packed panel is X^T.
template <int Bits>
void blocked_transposed(const float* x, index_t m, index_t ldx, const detail::groupwise_b<Bits>& w, float* y,
                        index_t ldy, const gemm_epilogue& ep, int threads) {
  const index_t n = w.n, k = w.k;
  float* t = static_cast<float*>(detail::transposed_c_workspace().get(static_cast<std::size_t>(m * n) * sizeof(float)));
#if defined(TRIDENT_HAS_AVX512)
  if (detail::round_up(m, 64) * 10 > detail::round_up(m, 32) * 11) {
    detail::gemm_blocked<kernel_avx512_f32_narrow>(false, true, n, m, k, 1.0f, &w, 0, x, ldx, 0.0f, t, m, {}, threads);
  } else {
    detail::gemm_blocked<default_f32_kernel>(false, true, n, m, k, 1.0f, &w, 0, x, ldx, 0.0f, t, m, {}, threads);
  }
#else
  detail::gemm_blocked<default_f32_kernel>(false, true, n, m, k, 1.0f, &w, 0, x, ldx, 0.0f, t, m, {}, threads);
#endif
  detail::store_transposed(m, n, t, 0.0f, y, ldy, ep);
}

}  // namespace weight_only_paths

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
    // Memory bound: the bytes of W, not the flops, say whether a second thread pays.
    const double bytes = static_cast<double>(n) * static_cast<double>(w.row_bytes());
    weight_only_paths::direct(x, m, ldx, w, y, ldy, ep, detail::gemm_threads(std::max(flops, bytes * 64.0)));
    return;
  }
  const int threads = detail::gemm_threads(flops);
  if (detail::streamed_fits(m, k)) {
    weight_only_paths::streamed(x, m, ldx, w, y, ldy, ep, threads);
  } else if (detail::transposed_pays(m, n, k)) {
    weight_only_paths::blocked_transposed(x, m, ldx, w, y, ldy, ep, threads);
  } else {
    weight_only_paths::blocked(x, m, ldx, w, y, ldy, ep, threads);
  }
}

}  // namespace trident::cpu_kernels

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
