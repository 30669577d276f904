#pragma once
/// @file backend/cpu/qgemm/kernel_vnni.hpp
/// AVX512-VNNI int8 GEMM: VPDPBUSD multiplies the four uint8 of A at (i, 4q .. 4q+3),
/// broadcast to every lane, by the four int8 of W in each lane's 32-bit word (one row of a
/// packed panel: 16 columns) and adds the four products to the lane's int32 sum, exactly (no
/// 16-bit intermediate, unlike VPMADDUBSW). A register tile of up to 6 rows x 4 panels (24
/// zmm accumulators) is held over all of k; A is read in place (4 bytes per row and step),
/// W from its packed panels.

#include <cstdint>
#include <cstring>

#include "common.hpp"
#include "packing.hpp"
#include "store_avx512.hpp"

#if defined(TRIDENT_HAS_AVX512) && defined(__AVX512VNNI__)
#define TRIDENT_HAS_QGEMM_VNNI 1

namespace trident::cpu_kernels::qgemm {

namespace detail {

/// acc += Σ of the four u8 x s8 products of each 32-bit lane of a and b (VPDPBUSD). Written
/// in asm because GCC 12 does not tie the intrinsic's accumulator to its destination: it
/// copies every accumulator each step and spills the register tile to the stack.
TRIDENT_ALWAYS_INLINE void dpbusd(__m512i& acc, __m512i a, __m512i b) noexcept {
#if defined(__GNUC__)
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
#else
  acc = _mm512_dpbusd_epi32(acc, a, b);
#endif
}

/// The 32-bit word of A row `ai` at k = 4q (bytes beyond k are zero when `tail` < 4 bytes remain).
TRIDENT_ALWAYS_INLINE int a_word(const std::uint8_t* ai, index_t q) noexcept {
  int v;
  std::memcpy(&v, ai + 4 * q, 4);
  return v;
}

inline int a_word_tail(const std::uint8_t* ai, index_t q, index_t bytes) noexcept {
  int v = 0;
  std::memcpy(&v, ai + 4 * q, static_cast<std::size_t>(bytes));
  return v;
}

/// MR rows x NP panels of C from `quads` full 4-byte steps of k plus, when tail > 0, one step
/// of `tail` bytes. a: the tile's first row; b: its first panel (panels `pstride` bytes apart).
template <int MR, int NP>
inline void vnni_tile(const std::uint8_t* a, index_t lda, const std::int8_t* b, index_t pstride, index_t quads,
                      index_t tail, index_t i0, index_t j0, index_t ncols, const store_params& sp) noexcept {
  __m512i acc[MR][NP];
  TRIDENT_UNROLL(6)
  for (int r = 0; r < MR; ++r) {
    TRIDENT_UNROLL(4)
    for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_setzero_si512();
  }
  for (index_t q = 0; q < quads; ++q) {
    __m512i bv[NP];
    TRIDENT_UNROLL(4)
    for (int p = 0; p < NP; ++p) bv[p] = _mm512_load_si512(reinterpret_cast<const void*>(b + p * pstride + q * 64));
    TRIDENT_UNROLL(6)
    for (int r = 0; r < MR; ++r) {
      const __m512i av = _mm512_set1_epi32(a_word(a + r * lda, q));
      TRIDENT_UNROLL(4)
      for (int p = 0; p < NP; ++p) dpbusd(acc[r][p], av, bv[p]);
    }
  }
  if (tail > 0) {
    __m512i bv[NP];
    TRIDENT_UNROLL(4)
    for (int p = 0; p < NP; ++p) bv[p] = _mm512_load_si512(reinterpret_cast<const void*>(b + p * pstride + quads * 64));
    TRIDENT_UNROLL(6)
    for (int r = 0; r < MR; ++r) {
      const __m512i av = _mm512_set1_epi32(a_word_tail(a + r * lda, quads, tail));
      TRIDENT_UNROLL(4)
      for (int p = 0; p < NP; ++p) dpbusd(acc[r][p], av, bv[p]);
    }
  }
  TRIDENT_UNROLL(4)
  for (int p = 0; p < NP; ++p) {
    const panel_store st(sp, j0 + 16 * p, ncols - 16 * p);
    TRIDENT_UNROLL(6)
    for (int r = 0; r < MR; ++r) st.row(i0 + r, acc[r][p]);
  }
}

template <int MR>
inline void vnni_tile_np(int np, const std::uint8_t* a, index_t lda, const std::int8_t* b, index_t pstride,
                         index_t quads, index_t tail, index_t i0, index_t j0, index_t ncols,
                         const store_params& sp) noexcept {
  switch (np) {
    case 4: vnni_tile<MR, 4>(a, lda, b, pstride, quads, tail, i0, j0, ncols, sp); break;
    case 3: vnni_tile<MR, 3>(a, lda, b, pstride, quads, tail, i0, j0, ncols, sp); break;
    case 2: vnni_tile<MR, 2>(a, lda, b, pstride, quads, tail, i0, j0, ncols, sp); break;
    default: vnni_tile<MR, 1>(a, lda, b, pstride, quads, tail, i0, j0, ncols, sp); break;
  }
}

}  // namespace detail

/// Register tile of the VNNI kernel.
inline constexpr index_t vnni_mr = 6, vnni_np = 4;

/// C[i0:i1, j0:j1] (through `sp`) with VPDPBUSD. j0 is a multiple of 16. `a_padded`: A's rows
/// hold zeros from k up to a multiple of 4, so the last partial step may read them.
inline void gemm_vnni(const std::uint8_t* a, index_t lda, bool a_padded, index_t i0, index_t i1, const packed_view& w,
                      index_t j0, index_t j1, const store_params& sp) noexcept {
  index_t quads = w.k / 4, tail = w.k % 4;
  if (a_padded && tail > 0) {
    ++quads;
    tail = 0;
  }
  const index_t pstride = qpanel_cols * w.kp;
  // Column chunks of 4 panels (the register tile's width); within one, all rows, so that the
  // chunk's packed W (64 KiB for k = 1024) is reused from L2 by every row tile.
  for (index_t jc = j0; jc < j1; jc += vnni_np * qpanel_cols) {
    const index_t ncols = std::min(vnni_np * qpanel_cols, j1 - jc);
    const int np = static_cast<int>(ceil_div(ncols, qpanel_cols));
    const std::int8_t* b = w.panel(jc / qpanel_cols);
    for (index_t i = i0; i < i1; i += vnni_mr) {
      const index_t mr = std::min(vnni_mr, i1 - i);
      const std::uint8_t* ai = a + i * lda;
      switch (mr) {
        case 6: detail::vnni_tile_np<6>(np, ai, lda, b, pstride, quads, tail, i, jc, ncols, sp); break;
        case 5: detail::vnni_tile_np<5>(np, ai, lda, b, pstride, quads, tail, i, jc, ncols, sp); break;
        case 4: detail::vnni_tile_np<4>(np, ai, lda, b, pstride, quads, tail, i, jc, ncols, sp); break;
        case 3: detail::vnni_tile_np<3>(np, ai, lda, b, pstride, quads, tail, i, jc, ncols, sp); break;
        case 2: detail::vnni_tile_np<2>(np, ai, lda, b, pstride, quads, tail, i, jc, ncols, sp); break;
        default: detail::vnni_tile_np<1>(np, ai, lda, b, pstride, quads, tail, i, jc, ncols, sp); break;
      }
    }
  }
}

}  // namespace trident::cpu_kernels::qgemm

#endif  // TRIDENT_HAS_AVX512 && __AVX512VNNI__
