#pragma once
/// @file backend/cpu/qgemm/kernel_amx.hpp
/// AMX-INT8 GEMM: TDPBUSD multiplies a 16 x 64 uint8 tile of A by a 64 x 16 int8 tile of W
/// (16 rows of 4-byte k groups: exactly 1 KiB of one packed panel) into a 16 x 16 int32 tile,
/// exactly. A 32 x 32 block of C lives in four accumulator tiles (tmm0..3), with two A tiles
/// (tmm4, tmm5: rows 0-15 and 16-31) and two W tiles (tmm6, tmm7: two adjacent panels); each
/// 64-deep step of k is four TDPBUSD.
///
/// A is read in "tile order": per 32-row strip and 64-deep k step, its two A tiles, each 1 KiB
/// contiguous (loaded with a 64-byte stride: no cache-set conflicts between the rows, and
/// sequential for the prefetchers). The dynamic linear quantizes straight into that order;
/// int8_gemm copies each strip of a row-major A first (32 x kp bytes, reused by all columns). Tile
/// configuration and the Linux permission request (arch_prctl) are the fp32 GEMM's
/// (gemm/kernel_amx.hpp: amx_usable, amx_configure: eight 16 x 64-byte tiles).

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.hpp"
#include "packing.hpp"
#include "store_avx512.hpp"

#if defined(TRIDENT_HAS_AMX_INT8) && defined(TRIDENT_HAS_AMX_BF16) && defined(TRIDENT_HAS_AVX512)
#define TRIDENT_HAS_QGEMM_AMX 1
#include <cpuid.h>

#include "../gemm/kernel_amx.hpp"

namespace trident::cpu_kernels::qgemm {

/// Whether the CPU has AMX-INT8 (cpuid leaf 7: edx bit 25) and Linux grants the tile state.
inline bool amx_int8_usable() noexcept {
  static const bool ok = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return false;
    if (((edx >> 25) & 1u) == 0) return false;
    return cpu_kernels::detail::amx_usable();
  }();
  return ok;
}

/// Configures the calling thread's tiles (eight 16 rows x 64 bytes).
inline void amx_int8_begin() noexcept {
  (void)amx_int8_usable();
  cpu_kernels::detail::amx_configure();
}
inline void amx_int8_end() noexcept { _tile_release(); }

namespace detail {

/// 32 rows x (one or two panels) of C from k steps of 64 (kp bytes). a: the strip in tile
/// order (amx_strip_offset: 2 KiB per k step, rows 0-15 then 16-31); b0: the first panel;
/// Two: whether the second panel (b0 + pstride) is computed too. The int32 tile lands in t
/// (32 x 32, row stride 32).
template <bool Two>
inline void amx_block(const std::uint8_t* a, const std::int8_t* b0, index_t pstride, index_t kp,
                      std::int32_t* t) noexcept {
  _tile_zero(0);
  _tile_zero(2);
  if constexpr (Two) {
    _tile_zero(1);
    _tile_zero(3);
  }
  const std::int8_t* b1 = b0 + pstride;
  for (index_t kb = 0; kb < kp; kb += 64) {
    _tile_loadd(4, a + kb * 32, 64);
    _tile_loadd(6, b0 + kb * 16, 64);
    _tile_loadd(5, a + kb * 32 + 1024, 64);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(2, 5, 6);
    if constexpr (Two) {
      _tile_loadd(7, b1 + kb * 16, 64);
      _tile_dpbusd(1, 4, 7);
      _tile_dpbusd(3, 5, 7);
    }
  }
  _tile_stored(0, t, 128);
  _tile_stored(2, t + 16 * 32, 128);
  if constexpr (Two) {
    _tile_stored(1, t + 16, 128);
    _tile_stored(3, t + 16 * 32 + 16, 128);
  }
}

}  // namespace detail

/// C[i0:i1, j0:j1] (through `sp`) with TDPBUSD, 32-row strip by strip; i0 a multiple of 32,
/// j0 of 16. A is either row-major (leading dimension lda; each strip is first copied into
/// abuf, 32 * w.kp bytes, in tile order) or, when `a_tiled`, already in tile order, strip s
/// at a + s * 32 * w.kp (the dynamic linear's scratch). The calling thread has run
/// amx_int8_begin().
inline void gemm_amx(const std::uint8_t* a, index_t lda, bool a_tiled, index_t m, index_t i0, index_t i1,
                     const packed_view& w, index_t j0, index_t j1, const store_params& sp, std::uint8_t* abuf) noexcept {
  const index_t kp = w.kp, pstride = qpanel_cols * kp;
  alignas(64) std::int32_t t[32 * 32];
  for (index_t is = i0; is < i1; is += 32) {
    const index_t mr = std::min<index_t>(32, i1 - is);
    const std::uint8_t* as = a + (is / 32) * 32 * kp;
    if (!a_tiled) {
      for (index_t r = 0; r < 32; ++r) amx_strip_row(is + r < m ? a + (is + r) * lda : nullptr, w.k, kp, r, abuf);
      as = abuf;
    }
    for (index_t jp = j0; jp < j1; jp += 2 * qpanel_cols) {
      const index_t ncols = std::min<index_t>(2 * qpanel_cols, j1 - jp);
      const std::int8_t* b = w.panel(jp / qpanel_cols);
      if (ncols > qpanel_cols) {
        detail::amx_block<true>(as, b, pstride, kp, t);
      } else {
        detail::amx_block<false>(as, b, pstride, kp, t);
      }
      const panel_store s0(sp, jp, ncols);
      for (index_t r = 0; r < mr; ++r) s0.row(is + r, _mm512_load_si512(t + 32 * r));
      if (ncols > qpanel_cols) {
        const panel_store s1(sp, jp + 16, ncols - 16);
        for (index_t r = 0; r < mr; ++r) s1.row(is + r, _mm512_load_si512(t + 32 * r + 16));
      }
    }
  }
}

}  // namespace trident::cpu_kernels::qgemm

#endif  // TRIDENT_HAS_AMX_INT8 && TRIDENT_HAS_AMX_BF16 && TRIDENT_HAS_AVX512
