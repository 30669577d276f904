#pragma once
/// @file kernel_avx512.hpp
/// AVX-512 micro-kernels: fp32 FMA (MR rows x 32 columns, 2*MR zmm accumulators, A
/// broadcast from memory, two B vectors per k) and bf16 dot-product (VDPBF16PS on k pairs,
/// same register tile). Compiled only when the target has AVX-512 (and AVX512-BF16).

#include "common.hpp"
#include "vec_math.hpp"

#if defined(TRIDENT_HAS_AVX512)
#include "../intrinsics.hpp"

// GCC 12 reports false -Wmaybe-uninitialized inside AVX-512 intrinsics (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace trident::cpu_kernels {

namespace detail {

/// Stores the first mr rows and nr columns of an MR x (16*NV) register tile into C, with
/// the scaling, bias and activation that `ts` asks for.
template <int MR, int NV>
TRIDENT_ALWAYS_INLINE void store_tile_avx512(__m512 (&acc)[MR][NV], float* c, index_t ldc, index_t mr,
                                             index_t nr, const tile_store<float>& ts) noexcept {
  __mmask16 mask[NV];
  __m512 biasv[NV];
  for (int v = 0; v < NV; ++v) {
    mask[v] = lane_mask(nr - 16 * v);
    biasv[v] = (ts.last && ts.bias != nullptr) ? _mm512_maskz_loadu_ps(mask[v], ts.bias + 16 * v)
                                               : _mm512_setzero_ps();
  }
  const __m512 alpha = _mm512_set1_ps(ts.alpha);
  const __m512 beta = _mm512_set1_ps(ts.beta);
  const bool read_c = !ts.first || ts.beta != 0.0f;
  const __m512 cscale = ts.first ? beta : _mm512_set1_ps(1.0f);
  const bool full = nr == 16 * NV;
TRIDENT_UNROLL(32)
  for (int i = 0; i < MR; ++i) {
    if (i >= mr) break;
    float* ci = c + i * ldc;
TRIDENT_UNROLL(8)
    for (int v = 0; v < NV; ++v) {
      __m512 x = _mm512_mul_ps(acc[i][v], alpha);
      if (read_c) {
        const __m512 old = full ? _mm512_loadu_ps(ci + 16 * v) : _mm512_maskz_loadu_ps(mask[v], ci + 16 * v);
        x = _mm512_fmadd_ps(old, cscale, x);
      }
      if (ts.last) {
        x = _mm512_add_ps(x, biasv[v]);
        x = activation_avx512(ts.act, x);
      }
      if (full) {
        _mm512_storeu_ps(ci + 16 * v, x);
      } else {
        _mm512_mask_storeu_ps(ci + 16 * v, mask[v], x);
      }
    }
  }
}

}  // namespace detail

/// AVX-512 fp32 micro-kernel: an MR x (16*NV) tile, packed A broadcast, packed B loaded.
/// @tparam MR rows of the register tile (MR*NV + NV <= 31)
/// @tparam NV 16-float vectors per row
/// @tparam PF software prefetch distance for packed A, in k steps (0: none)
/// @tparam PFB software prefetch distance for packed B, in k steps (0: none)
template <int MR, int NV, int PF = 0, int PFB = 0>
struct kernel_avx512_f32_t {
  using value_type = float;   ///< accumulate/output type
  using packed_type = float;  ///< element type of the packed panels
  static constexpr int mr = MR;       ///< tile rows
  static constexpr int nr = 16 * NV;  ///< tile columns
  static constexpr int kg = 1;        ///< k elements grouped per packed entry
  static constexpr index_t mc_blk = 256 / MR * MR;  ///< rows of A per L2 block
  static constexpr index_t kc_blk = 256;            ///< depth of a K block
  static constexpr index_t nc_blk = 4096;           ///< columns of B per packed panel

  /// Computes the tile from `kc` packed k steps and stores its mr x nr corner into C.
  static void run(index_t kc, const float* TRIDENT_RESTRICT a, const float* TRIDENT_RESTRICT b, float* c,
                  index_t ldc, index_t mr, index_t nr, const detail::tile_store<float>& ts) noexcept {
    __m512 acc[MR][NV];
TRIDENT_UNROLL(32)
    for (int i = 0; i < MR; ++i) {
TRIDENT_UNROLL(8)
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
    }
    // The tile's rows of C are read or written at the end: fetch every line of them now.
TRIDENT_UNROLL(32)
    for (int i = 0; i < MR; ++i) {
      if (i >= mr) break;
TRIDENT_UNROLL(8)
      for (int v = 0; v < NV; ++v) _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + 16 * v), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + nr - 1), _MM_HINT_T0);
    }
TRIDENT_UNROLL(2)
    for (index_t p = 0; p < kc; ++p) {
      __m512 bv[NV];
TRIDENT_UNROLL(8)
      for (int v = 0; v < NV; ++v) bv[v] = _mm512_load_ps(b + 16 * v);
      if constexpr (PF > 0) _mm_prefetch(reinterpret_cast<const char*>(a + PF * MR), _MM_HINT_T0);
      if constexpr (PFB > 0) {
TRIDENT_UNROLL(8)
        for (int v = 0; v < NV; ++v) _mm_prefetch(reinterpret_cast<const char*>(b + PFB * 16 * NV + 16 * v), _MM_HINT_T0);
      }
TRIDENT_UNROLL(32)
      for (int i = 0; i < MR; ++i) {
        const __m512 av = _mm512_set1_ps(a[i]);
TRIDENT_UNROLL(8)
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
      }
      a += MR;
      b += 16 * NV;
    }
    detail::store_tile_avx512<MR, NV>(acc, c, ldc, mr, nr, ts);
  }
};

/// The AVX-512 fp32 micro-kernel for wide outputs: 6 x 64 (24 accumulators, 4 B vectors and
/// 6 broadcasts per k: the fewest loads per FMA, measured fastest at 1024-2048). Its B
/// micro-panel (64 KiB at kc 256) outgrows L1, so B is prefetched 8 k steps ahead.
using kernel_avx512_f32 = kernel_avx512_f32_t<6, 4, 0, 8>;
/// The AVX-512 fp32 micro-kernel for narrow outputs (n <= 32, or n just above a multiple of
/// 32), where a 64-wide tile would waste much of its work on padding: 14 x 32.
using kernel_avx512_f32_narrow = kernel_avx512_f32_t<14, 2, 0, 8>;

#if defined(TRIDENT_HAS_AVX512BF16)
/// AVX512-BF16 micro-kernel: bf16 panels packed in k pairs, VDPBF16PS into fp32 accumulators.
/// @tparam MR rows of the register tile
/// @tparam NV 16-column vectors per row
template <int MR, int NV>
struct kernel_avx512_bf16_t {
  using value_type = float;      ///< accumulate/output type
  using packed_type = bfloat16;  ///< element type of the packed panels
  static constexpr int mr = MR;       ///< tile rows
  static constexpr int nr = 16 * NV;  ///< tile columns
  static constexpr int kg = 2;        ///< k pairs: one 32-bit entry holds k and k+1
  static constexpr index_t mc_blk = 20 * MR;  ///< rows of A per L2 block
  static constexpr index_t kc_blk = 512;      ///< depth of a K block (a multiple of 2)
  static constexpr index_t nc_blk = 3072;     ///< columns of B per packed panel

  /// Computes the tile from `kc` (even) packed k steps and stores its mr x nr corner into C.
  static void run(index_t kc, const bfloat16* TRIDENT_RESTRICT a, const bfloat16* TRIDENT_RESTRICT b, float* c,
                  index_t ldc, index_t mr, index_t nr, const detail::tile_store<float>& ts) noexcept {
    __m512 acc[MR][NV];
TRIDENT_UNROLL(32)
    for (int i = 0; i < MR; ++i) {
TRIDENT_UNROLL(8)
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
    }
    const index_t pairs = kc / 2;
TRIDENT_UNROLL(2)
    for (index_t p = 0; p < pairs; ++p) {
      __m512i bv[NV];
TRIDENT_UNROLL(8)
      for (int v = 0; v < NV; ++v) bv[v] = _mm512_load_si512(reinterpret_cast<const void*>(b + 32 * v));
      _mm_prefetch(reinterpret_cast<const char*>(a + 16 * MR), _MM_HINT_T0);
TRIDENT_UNROLL(32)
      for (int i = 0; i < MR; ++i) {
        std::int32_t pair;
        __builtin_memcpy(&pair, a + 2 * i, 4);
        const __m512i av = _mm512_set1_epi32(pair);
TRIDENT_UNROLL(8)
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)av, (__m512bh)bv[v]);
      }
      a += 2 * MR;
      b += 32 * NV;
    }
    detail::store_tile_avx512<MR, NV>(acc, c, ldc, mr, nr, ts);
  }
};

/// The AVX512-BF16 micro-kernel for wide outputs: 6 x 64 (24 accumulators, 4 B vectors and 6
/// broadcasts per k pair), as for fp32: faster than the 14 x 32 tile on the AMD EPYC (Zen 5)
/// development machine (benchmarks/RESULTS.md, GEMM). CPUs with AMX take the AMX path instead.
using kernel_avx512_bf16 = kernel_avx512_bf16_t<6, 4>;
/// The AVX512-BF16 micro-kernel for narrow outputs, where a 64-wide tile would waste much of
/// its work on padding: 14 x 32.
using kernel_avx512_bf16_narrow = kernel_avx512_bf16_t<14, 2>;
#endif  // TRIDENT_HAS_AVX512BF16

}  // namespace trident::cpu_kernels

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // TRIDENT_HAS_AVX512
