#pragma once
/// @file backend/cpu/qgemm/packing.hpp
/// Packs row-major int8 weights (n x k) into the panel layout of common.hpp and computes the
/// per-row sums that the zero-point compensation of the epilogue needs.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.hpp"

namespace trident::cpu_kernels::qgemm {

/// A packed int8 B operand as the kernels see it.
struct packed_view {
  const std::int8_t* data = nullptr;  ///< ceil(n / 16) panels of 16 * kp bytes
  index_t n = 0;                      ///< columns of C (rows of W)
  index_t k = 0;                      ///< true depth
  index_t kp = 0;                     ///< padded depth, a multiple of qk_block

  /// Panel p (columns 16p .. 16p+15).
  const std::int8_t* panel(index_t p) const noexcept { return data + p * qpanel_cols * kp; }
};

/// Bytes of the packed layout of an n x k matrix.
constexpr index_t packed_bytes(index_t n, index_t k) noexcept {
  return round_up(n, qpanel_cols) * round_up(k, qk_block);
}

/// Packs q (n x k, row-major, leading dimension ldq) into `out` (packed_bytes(n, k) bytes,
/// zero-filled beforehand) and writes Σ_k q[j, k] to row_sum[j].
inline void pack_int8(const std::int8_t* q, index_t n, index_t k, index_t ldq, std::int8_t* TRIDENT_RESTRICT out,
                      std::int32_t* row_sum) noexcept {
  const index_t kp = round_up(k, qk_block);
  for (index_t j = 0; j < n; ++j) {
    const std::int8_t* src = q + j * ldq;
    std::int8_t* dst = out + (j / qpanel_cols) * qpanel_cols * kp + (j % qpanel_cols) * 4;
    std::int32_t s = 0;
    for (index_t p = 0; p < k; ++p) {
      dst[(p / 4) * 64 + (p % 4)] = src[p];
      s += src[p];
    }
    row_sum[j] = s;
  }
}

/// The A operand of the AMX kernel is stored in "tile order": 32-row strips, each 32 x kp
/// bytes, in which every 64-deep k step holds the strip's two 16 x 64 A tiles, 1 KiB each.
/// Byte offset of A(i, k) (i within its 32-row strip) in a strip stored in tile order: per k
/// step of 64, the two 16 x 64 A tiles, each 1 KiB contiguous.
constexpr index_t amx_strip_offset(index_t i, index_t k) noexcept {
  return (k / 64) * 2048 + (i / 16) * 1024 + (i % 16) * 64 + k % 64;
}

/// Copies row r (k bytes, zeros up to kp; a null src: all zeros) into a tile-ordered strip.
inline void amx_strip_row(const std::uint8_t* src, index_t k, index_t kp, index_t r, std::uint8_t* strip) noexcept {
  std::uint8_t* dst = strip + (r / 16) * 1024 + (r % 16) * 64;
  for (index_t kb = 0; kb < kp; kb += 64, dst += 2048) {
    const index_t n = src == nullptr ? 0 : std::clamp<index_t>(k - kb, 0, 64);
    if (n > 0) std::memcpy(dst, src + kb, static_cast<std::size_t>(n));
    if (n < 64) std::memset(dst + n, 0, static_cast<std::size_t>(64 - n));
  }
}

}  // namespace trident::cpu_kernels::qgemm
