#pragma once
/// @file kernel_scalar.hpp
/// Portable register-blocked micro-kernel in plain C++ (the compiler vectorises the inner
/// row). Used for double (the reference-quality path) and for float when the target has
/// neither AVX2 nor AVX-512.

#include "common.hpp"

namespace trident::cpu_kernels {

/// Portable micro-kernel computing an MR x NR tile of C from packed panels.
/// @tparam V accumulate and output type (float or double)
/// @tparam MR rows of the register tile
/// @tparam NR columns of the register tile
template <class V, int MR, int NR>
struct kernel_scalar {
  using value_type = V;   ///< accumulate/output type
  using packed_type = V;  ///< element type of the packed panels
  static constexpr int mr = MR;  ///< tile rows
  static constexpr int nr = NR;  ///< tile columns
  static constexpr int kg = 1;   ///< k elements grouped per packed entry
  static constexpr index_t mc_blk = 96;    ///< rows of A per L2 block
  static constexpr index_t kc_blk = 256;   ///< depth of a K block
  static constexpr index_t nc_blk = 2048;  ///< columns of B per packed panel

  /// Computes the tile from `kc` steps of packed A (MR per step) and packed B (NR per step)
  /// and stores its top-left mr x nr corner into C as `ts` says.
  static void run(index_t kc, const V* TRIDENT_RESTRICT a, const V* TRIDENT_RESTRICT b, V* c, index_t ldc,
                  index_t mr, index_t nr, const detail::tile_store<V>& ts) noexcept {
#if defined(__GNUC__)
    // The tile as 64-byte GCC vectors: the compiler maps them onto whatever SIMD the target
    // has (or plain registers) and keeps the MR x NV accumulators in registers.
    constexpr int W = 64 / static_cast<int>(sizeof(V));
    static_assert(NR % W == 0, "kernel_scalar: NR must be a multiple of 64 bytes of V");
    constexpr int NV = NR / W;
    typedef V vec __attribute__((vector_size(64)));
    vec acc[MR][NV] = {};
    for (index_t p = 0; p < kc; ++p) {
      vec bv[NV];
      __builtin_memcpy(&bv[0], b, sizeof(bv));
TRIDENT_UNROLL(16)
      for (int i = 0; i < MR; ++i) {
        const V ai = a[i];
TRIDENT_UNROLL(8)
        for (int v = 0; v < NV; ++v) acc[i][v] += ai * bv[v];
      }
      a += MR;
      b += NR;
    }
    V t[MR][NR];
TRIDENT_UNROLL(16)
    for (int i = 0; i < MR; ++i) {
TRIDENT_UNROLL(8)
      for (int v = 0; v < NV; ++v) __builtin_memcpy(&t[i][v * W], &acc[i][v], sizeof(vec));
    }
    detail::store_tile_scalar(&t[0][0], NR, c, ldc, mr, nr, ts);
#else
    V acc[MR][NR] = {};
    for (index_t p = 0; p < kc; ++p) {
      for (int i = 0; i < MR; ++i) {
        const V ai = a[i];
        for (int j = 0; j < NR; ++j) acc[i][j] += ai * b[j];
      }
      a += MR;
      b += NR;
    }
    detail::store_tile_scalar(&acc[0][0], NR, c, ldc, mr, nr, ts);
#endif
  }
};

}  // namespace trident::cpu_kernels
