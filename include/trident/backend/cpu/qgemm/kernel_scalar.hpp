#pragma once
/// @file backend/cpu/qgemm/kernel_scalar.hpp
/// The portable int8 GEMM: exact int32 sums of uint8 A times the packed int8 W, one 16-column
/// panel at a time. It is the reference path, and the one used on CPUs without VNNI.

#include <cstdint>

#include "common.hpp"
#include "packing.hpp"

namespace trident::cpu_kernels::qgemm {

/// C[i0:i1, j0:j1] (through the epilogue `sp`) from A (row-major u8, leading dimension lda)
/// and the packed W. j0 is a multiple of 16.
inline void gemm_scalar(const std::uint8_t* a, index_t lda, index_t i0, index_t i1, const packed_view& w, index_t j0,
                        index_t j1, const store_params& sp) noexcept {
  const index_t quads = ceil_div(w.k, 4);
  for (index_t jp = j0; jp < j1; jp += qpanel_cols) {
    const std::int8_t* panel = w.panel(jp / qpanel_cols);
    const index_t nr = std::min(qpanel_cols, j1 - jp);
    for (index_t i = i0; i < i1; ++i) {
      const std::uint8_t* ai = a + i * lda;
      std::int32_t acc[qpanel_cols] = {};
      for (index_t q = 0; q < quads; ++q) {
        const std::int8_t* row = panel + q * 64;
        const index_t kn = std::min<index_t>(4, w.k - 4 * q);
        for (index_t t = 0; t < kn; ++t) {
          const std::int32_t x = ai[4 * q + t];
          for (index_t c = 0; c < qpanel_cols; ++c) acc[c] += x * row[c * 4 + t];
        }
      }
      for (index_t c = 0; c < nr; ++c) store_value(sp, i, jp + c, acc[c]);
    }
  }
}

}  // namespace trident::cpu_kernels::qgemm
