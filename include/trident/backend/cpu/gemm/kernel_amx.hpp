#pragma once
/// @file kernel_amx.hpp
/// AMX-BF16 micro-kernel: a 32 x 32 fp32 block of C in four 16 x 16 accumulator tiles
/// (tmm0..3), two A tiles of 16 rows x 32 k (tmm4, tmm5) and two B tiles of 16 k-pairs x
/// 16 columns in the VNNI pair-interleaved layout (tmm6, tmm7); each 32-deep k step is
/// four TDPBF16PS. Operands are packed first:
///
///   A chunk (32 rows x kcp k): row-major, row stride kcp; tile h of step kk is rows
///     16h..16h+15, k 32kk..32kk+31 (loaded with stride 2*kcp bytes).
///   B micro-panel (32 cols x kp k): tile (kk, h) is 1 KiB contiguous at element
///     (2*kk + h) * 512; its row p holds (k 32kk+2p, k 32kk+2p+1) for columns 16h..16h+15.
///
/// The process must be granted the AMX tile state by the kernel (arch_prctl); amx_usable()
/// asks once per process and the caller falls back to another path when it is refused.

#include "blocked.hpp"
#include "common.hpp"
#include "packing.hpp"
#include "vec_math.hpp"

#if defined(TRIDENT_HAS_AMX_BF16) && defined(TRIDENT_HAS_AVX512)
#include <cpuid.h>
#include "../intrinsics.hpp"

#include <atomic>
#include <memory>
#include <sys/syscall.h>
#include <unistd.h>

// GCC 12 reports false -Wmaybe-uninitialized inside AVX-512 intrinsics (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace trident::cpu_kernels {

namespace detail {

/// Asks Linux for permission to use the AMX tile data state (once per process, thread-safe).
/// Returns false when the CPU lacks AMX-BF16 or the kernel refuses.
inline bool amx_usable() noexcept {
  static const bool ok = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return false;
    const bool amx_bf16 = (edx >> 22) & 1u, amx_tile = (edx >> 24) & 1u;
    if (!amx_bf16 || !amx_tile) return false;
#if defined(SYS_arch_prctl)
    constexpr long arch_get_xcomp_perm = 0x1022, arch_req_xcomp_perm = 0x1023, xfeature_xtiledata = 18;
    if (syscall(SYS_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) != 0) return false;
    unsigned long mask = 0;
    if (syscall(SYS_arch_prctl, arch_get_xcomp_perm, &mask) != 0) return false;
    return ((mask >> xfeature_xtiledata) & 1ul) != 0;
#else
    return false;
#endif
  }();
  return ok;
}

/// The 64-byte LDTILECFG operand.
struct alignas(64) amx_tile_config {
  std::uint8_t palette_id;
  std::uint8_t start_row;
  std::uint8_t reserved[14];
  std::uint16_t colsb[16];
  std::uint8_t rows[16];
};

/// Configures tmm0..7 as 16 rows x 64 bytes (palette 1) for the calling thread.
inline void amx_configure() noexcept {
  amx_tile_config cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // Not _tile_loadconfig: GCC 12 declares only 8 bytes of its operand as read, so the
  // stores of colsb/rows above could be removed as dead. Here all 64 bytes are an input.
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg));
}

/// Loads 32 consecutive bf16 (a prefix of `n`, the rest zero) as 16 32-bit words.
TRIDENT_ALWAYS_INLINE __m512i load32_bf16(const bfloat16* x, index_t n) noexcept {
  const __mmask32 m = n >= 32 ? __mmask32(0xffffffffu) : n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1u);
  return _mm512_maskz_loadu_epi16(m, x);
}

/// Loads 16 consecutive bf16 (a prefix of `n`) zero-extended into 32-bit lanes.
TRIDENT_ALWAYS_INLINE __m512i load16_bf16_wide(const bfloat16* x, index_t n) noexcept {
  const __mmask16 m = lane_mask(n);
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x));
}

/// Word j of the result holds (lo[j], hi[j]) for the 16 bf16 rows lo and hi starting at column 0.
TRIDENT_ALWAYS_INLINE __m512i interleave_rows(const bfloat16* lo, const bfloat16* hi, index_t n, bool have_hi) noexcept {
  const __m512i l = load16_bf16_wide(lo, n);
  if (!have_hi) return l;
  return _mm512_or_si512(l, _mm512_slli_epi32(load16_bf16_wide(hi, n), 16));
}

TRIDENT_ALWAYS_INLINE void transpose_words16(__m512i (&r)[16]) noexcept {
  __m512 f[16];
  for (int i = 0; i < 16; ++i) f[i] = _mm512_castsi512_ps(r[i]);
  transpose16x16(f);
  for (int i = 0; i < 16; ++i) r[i] = _mm512_castps_si512(f[i]);
}

}  // namespace detail

/// AMX-BF16 micro-kernel and its packing. A is read as a row-major 32-row panel with any
/// row stride (straight from the caller's matrix when possible, otherwise from a packed
/// copy); B is packed into VNNI tiles, each 1 KiB contiguous.
struct kernel_amx_bf16 {
  /// Called once per thread before its first tile. (Asking for the permission here too
  /// makes a direct use of this kernel safe; the answer is cached.)
  static void thread_begin() noexcept {
    (void)detail::amx_usable();
    detail::amx_configure();
  }
  /// Called once per thread after its last tile.
  static void thread_end() noexcept { _tile_release(); }

  /// Copies rows [i0, i0+mr) x k [k0, k0+kc) of op(A) into a row-major 32 x kcp panel
  /// (row stride kcp, a multiple of 32), zero-filling rows >= mr and k >= kc.
  static void pack_a(const bfloat16* a, bool trans, index_t lda, index_t i0, index_t mr, index_t k0, index_t kc,
                     index_t kcp, bfloat16* TRIDENT_RESTRICT out) noexcept {
    const index_t steps = kcp / 32;
    if (!trans) {
      for (index_t r = 0; r < 32; ++r) {
        bfloat16* o = out + r * kcp;
        const bfloat16* src = a + (i0 + r) * lda + k0;
        for (index_t kk = 0; kk < steps; ++kk) {
          const __m512i x = r < mr ? detail::load32_bf16(src + 32 * kk, kc - 32 * kk) : _mm512_setzero_si512();
          _mm512_store_si512(reinterpret_cast<void*>(o + 32 * kk), x);
        }
      }
      return;
    }
    // Stored k x m: word (q, i) = (A(i, 2q), A(i, 2q+1)); transposing the words gives rows i.
    for (index_t kk = 0; kk < steps; ++kk) {
      const index_t kb = k0 + 32 * kk, kn = std::min<index_t>(32, k0 + kc - kb);
      for (int h = 0; h < 2; ++h) {
        const index_t r0 = 16 * h;
        const index_t rows = std::max<index_t>(0, std::min<index_t>(16, mr - r0));
        __m512i w[16];
        for (int q = 0; q < 16; ++q) {
          const index_t k_lo = 2 * q, k_hi = 2 * q + 1;
          w[q] = (k_lo < kn && rows > 0)
                     ? detail::interleave_rows(a + (kb + k_lo) * lda + i0 + r0, a + (kb + k_hi) * lda + i0 + r0, rows,
                                               k_hi < kn)
                     : _mm512_setzero_si512();
        }
        detail::transpose_words16(w);
        for (int r = 0; r < 16; ++r) _mm512_store_si512(reinterpret_cast<void*>(out + (r0 + r) * kcp + 32 * kk), w[r]);
      }
    }
  }

  /// Packs columns [j0, j0+nr) x k [k0, k0+kc) of op(B) into a 32-column micro-panel of
  /// ceil(kc/32) steps; tile (kk, h) starts at element (2*kk + h) * 512.
  static void pack_b(const bfloat16* b, bool trans, index_t ldb, index_t j0, index_t nr, index_t k0, index_t kc,
                     bfloat16* TRIDENT_RESTRICT out) noexcept {
    if (!trans) {
      pack_b_panels(b, false, ldb, j0, j0 + nr, 1, k0, kc, detail::round_up(kc, 32), out);
      return;
    }
    const index_t steps = detail::ceil_div(kc, 32);
    for (index_t kk = 0; kk < steps; ++kk) {
      const index_t kb = k0 + 32 * kk, kn = std::min<index_t>(32, k0 + kc - kb);
      for (int h = 0; h < 2; ++h) {
        bfloat16* tile = out + (kk * 2 + h) * 512;
        const index_t c0 = 16 * h;
        const index_t cols = std::max<index_t>(0, std::min<index_t>(16, nr - c0));
        // Stored n x k: the pair (k 2p, 2p+1) of column j is one 32-bit word; transpose words.
        __m512i w[16];
        for (int j = 0; j < 16; ++j) {
          w[j] = (j < cols) ? detail::load32_bf16(b + (j0 + c0 + j) * ldb + kb, kn) : _mm512_setzero_si512();
        }
        detail::transpose_words16(w);
        for (int p = 0; p < 16; ++p) _mm512_store_si512(reinterpret_cast<void*>(tile + 32 * p), w[p]);
      }
    }
  }

  /// Packs `count` consecutive 32-column micro-panels starting at column j0 (clipped to
  /// j_end), panel q at out + q * 32 * kp (kp = kc rounded up to 32). Non-transposed B is
  /// read row pair by row pair across all the panels, in long contiguous runs.
  static void pack_b_panels(const bfloat16* b, bool trans, index_t ldb, index_t j0, index_t j_end, index_t count,
                            index_t k0, index_t kc, index_t kp, bfloat16* TRIDENT_RESTRICT out) noexcept {
    if (trans) {
      for (index_t q = 0; q < count; ++q) {
        pack_b(b, trans, ldb, j0 + 32 * q, std::min<index_t>(32, j_end - j0 - 32 * q), k0, kc, out + q * 32 * kp);
      }
      return;
    }
    const __m512i idx0 = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
    const __m512i idx1 = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    const index_t steps = detail::ceil_div(kc, 32);
    for (index_t kk = 0; kk < steps; ++kk) {
      for (int p = 0; p < 16; ++p) {
        const index_t k_lo = 32 * kk + 2 * p, k_hi = k_lo + 1;
        const bfloat16* row_lo = b + (k0 + k_lo) * ldb;
        const bfloat16* row_hi = b + (k0 + k_hi) * ldb;
        for (index_t q = 0; q < count; ++q) {
          const index_t jq = j0 + 32 * q;
          __m512i x = _mm512_setzero_si512(), y = _mm512_setzero_si512();
          if (k_lo < kc) x = detail::load32_bf16(row_lo + jq, j_end - jq);
          if (k_hi < kc) y = detail::load32_bf16(row_hi + jq, j_end - jq);
          // Per 128-bit lane, unpack interleaves 4 columns of the two rows; the 64-bit
          // permutes put columns 0..15 and 16..31 back in order.
          const __m512i lo = _mm512_unpacklo_epi16(x, y), hi = _mm512_unpackhi_epi16(x, y);
          bfloat16* tile = out + q * 32 * kp + kk * 1024 + 32 * p;
          _mm512_store_si512(reinterpret_cast<void*>(tile), _mm512_permutex2var_epi64(lo, idx0, hi));
          _mm512_store_si512(reinterpret_cast<void*>(tile + 512), _mm512_permutex2var_epi64(lo, idx1, hi));
        }
      }
    }
  }

  /// Computes a 32 x 32 block from `kc` (a multiple of 32) k: A rows at `a` with row
  /// stride `lda` elements, B a packed micro-panel. Partial sums live in `acc` (row stride
  /// `ldacc` floats): they are read unless `fresh` and written unless `finish`, in which
  /// case the block is stored into C as `ts` says (its mr x nr corner).
  static void run(index_t kc, const bfloat16* a, index_t lda, const bfloat16* b, float* acc, index_t ldacc,
                  bool fresh, bool finish, float* c, index_t ldc, index_t mr, index_t nr,
                  const detail::tile_store<float>& ts) noexcept {
    const index_t lacc = ldacc * static_cast<index_t>(sizeof(float));
    const index_t la = lda * static_cast<index_t>(sizeof(bfloat16));
    if (fresh) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
    } else {
      _tile_loadd(0, acc, lacc);
      _tile_loadd(1, acc + 16, lacc);
      _tile_loadd(2, acc + 16 * ldacc, lacc);
      _tile_loadd(3, acc + 16 * ldacc + 16, lacc);
    }
    const bool direct = mr == 32 && nr == 32 && ts.alpha == 1.0f && ts.first && ts.beta == 0.0f &&
                        (!ts.last || (ts.bias == nullptr && ts.act == activation::none));
    if (finish && !direct) {
      // The epilogue reads or writes these rows of C at the end: fetch them meanwhile.
      for (index_t i = 0; i < mr; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + nr - 1), _MM_HINT_T0);
      }
    }
    const bfloat16* a1 = a + 16 * lda;
    const index_t steps = kc / 32;
    for (index_t kk = 0; kk < steps; ++kk) {
      // B streams from L2: fetch the step after next into L1 (32 lines) while this one runs.
      // Measured +5-60% at 1024^3 depending on the machine's load, never a loss beyond noise.
      for (int l = 0; l < 1024; l += 32) _mm_prefetch(reinterpret_cast<const char*>(b + 2048 + l), _MM_HINT_T0);
      _tile_loadd(4, a + 32 * kk, la);
      _tile_loadd(6, b, 64);
      _tile_loadd(5, a1 + 32 * kk, la);
      _tile_loadd(7, b + 512, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
      b += 1024;
    }
    if (!finish) {
      _tile_stored(0, acc, lacc);
      _tile_stored(1, acc + 16, lacc);
      _tile_stored(2, acc + 16 * ldacc, lacc);
      _tile_stored(3, acc + 16 * ldacc + 16, lacc);
      return;
    }
    if (direct) {
      // Nothing to add or apply: the tiles go straight into C.
      const index_t lc = ldc * static_cast<index_t>(sizeof(float));
      _tile_stored(0, c, lc);
      _tile_stored(1, c + 16, lc);
      _tile_stored(2, c + 16 * ldc, lc);
      _tile_stored(3, c + 16 * ldc + 16, lc);
      return;
    }
    alignas(64) float t[32][32];
    _tile_stored(0, &t[0][0], 128);
    _tile_stored(1, &t[0][16], 128);
    _tile_stored(2, &t[16][0], 128);
    _tile_stored(3, &t[16][16], 128);
    store(&t[0][0], c, ldc, mr, nr, ts);
  }

 private:
  static void store(const float* t, float* c, index_t ldc, index_t mr, index_t nr,
                    const detail::tile_store<float>& ts) noexcept {
    const __mmask16 m0 = detail::lane_mask(nr), m1 = detail::lane_mask(nr - 16);
    const bool read_c = !ts.first || ts.beta != 0.0f;
    const __m512 alpha = _mm512_set1_ps(ts.alpha);
    const __m512 cscale = ts.first ? _mm512_set1_ps(ts.beta) : _mm512_set1_ps(1.0f);
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    if (ts.last && ts.bias != nullptr) {
      b0 = _mm512_maskz_loadu_ps(m0, ts.bias);
      b1 = _mm512_maskz_loadu_ps(m1, ts.bias + 16);
    }
    for (index_t i = 0; i < mr; ++i) {
      float* ci = c + i * ldc;
      __m512 x0 = _mm512_mul_ps(_mm512_load_ps(t + 32 * i), alpha);
      __m512 x1 = _mm512_mul_ps(_mm512_load_ps(t + 32 * i + 16), alpha);
      if (read_c) {
        x0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m0, ci), cscale, x0);
        x1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m1, ci + 16), cscale, x1);
      }
      if (ts.last) {
        x0 = detail::activation_avx512(ts.act, _mm512_add_ps(x0, b0));
        x1 = detail::activation_avx512(ts.act, _mm512_add_ps(x1, b1));
      }
      _mm512_mask_storeu_ps(ci, m0, x0);
      _mm512_mask_storeu_ps(ci + 16, m1, x1);
    }
  }
};

namespace detail {

/// Blocking and threading of the AMX path. The columns are cut into blocks whose packed B
/// (all of K, at most amx_b_block_bytes) stays in one core's L2. Each thread starts on its
/// own column block, packs that block's B privately and works through the block's row
/// items (groups of 32-row strips), claimed with an atomic counter; when its block runs
/// out it moves on to blocks that still have rows left (packing their B too). Threads
/// therefore never wait for each other's packing: on a shared machine, a thread that
/// loses its core delays the others at most by the rows it has claimed.
///
/// Within an item, a strip walks K in amx_kc_inner-deep chunks whose A part (copied to
/// 16 KiB contiguous) stays in L1 while the block's 32-column B micro-panels stream from
/// L2; partial sums wait in a per-thread scratch, so C is written once.
inline constexpr index_t amx_b_block_bytes = index_t(1) << 20;
inline constexpr index_t amx_kc_inner = 256;

/// The AMX-BF16 GEMM on `nthreads` threads. Precondition: amx_usable().
inline void gemm_amx_bf16(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, float alpha,
                          const bfloat16* a, index_t lda, const bfloat16* b, index_t ldb, float beta, float* c,
                          index_t ldc, const gemm_epilogue& ep, int nthreads) {
  const index_t kp = round_up(k, 32);
  const index_t ncb_cap = std::max<index_t>(32, amx_b_block_bytes / (2 * kp) / 32 * 32);
  const index_t cblocks = ceil_div(n, ncb_cap);
  const index_t ncb = round_up(ceil_div(n, cblocks), 32);
  const index_t strips = ceil_div(m, 32);
  // Row items per block: enough for the threads to balance, long enough to reuse B.
  const index_t items_wanted = std::max<index_t>(1, ceil_div(8 * static_cast<index_t>(nthreads), cblocks));
  const index_t per_item = std::clamp<index_t>(ceil_div(strips, items_wanted), 1, 8);
  const index_t row_items = ceil_div(strips, per_item);
  const index_t ldacc = ncb + 16;  // not a power of two: the strip's rows spread over the L1 sets
  std::unique_ptr<std::atomic<index_t>[]> next(new std::atomic<index_t>[static_cast<std::size_t>(cblocks)]());

  run_parallel(nthreads, [&](int tid, int nt, std::int64_t* waited) {
    (void)waited;
    auto* bbuf = static_cast<bfloat16*>(thread_workspace(2).get(static_cast<std::size_t>(kp * ncb) * 2));
    auto* abuf = static_cast<bfloat16*>(thread_workspace(3).get(static_cast<std::size_t>(32 * amx_kc_inner) * 2 +
                                                                 static_cast<std::size_t>(32 * ldacc) * 4));
    float* accbuf = reinterpret_cast<float*>(abuf + 32 * amx_kc_inner);
    kernel_amx_bf16::thread_begin();
    tile_store<float> ts;
    ts.alpha = alpha;
    ts.beta = beta;
    ts.act = ep.act;
    ts.first = true;
    ts.last = true;
    const index_t start = static_cast<index_t>(tid) * cblocks / nt;
    for (index_t off = 0; off < cblocks; ++off) {
      const index_t cb = (start + off) % cblocks;
      auto& counter = next[static_cast<std::size_t>(cb)];
      index_t r = counter.fetch_add(1, std::memory_order_relaxed);
      if (r >= row_items) continue;
      const index_t jc = cb * ncb, nc = std::min(ncb, n - jc);
      // This block's B, all of K, in 32-column micro-panels of kp x 32.
      for (index_t p0 = 0; p0 < nc; p0 += 8 * 32) {
        const index_t count = std::min<index_t>(8, ceil_div(nc - p0, 32));
        kernel_amx_bf16::pack_b_panels(b, trans_b, ldb, jc + p0, jc + nc, count, 0, k, kp, bbuf + p0 * kp);
      }
      for (; r < row_items; r = counter.fetch_add(1, std::memory_order_relaxed)) {
        const index_t s1 = std::min(strips, (r + 1) * per_item);
        for (index_t s = r * per_item; s < s1; ++s) {
          const index_t ir = 32 * s, mr = std::min<index_t>(32, m - ir);
          for (index_t pk = 0; pk < k; pk += amx_kc_inner) {
            const index_t kci = std::min(amx_kc_inner, k - pk);
            const index_t kcip = round_up(kci, 32);
            kernel_amx_bf16::pack_a(a, trans_a, lda, ir, mr, pk, kci, kcip, abuf);
            const bool fresh = pk == 0, finish = pk + kci == k;
            const bfloat16* bk = bbuf + pk * 32;
            for (index_t jr = 0; jr < nc; jr += 32) {
              ts.bias = ep.bias != nullptr ? ep.bias + jc + jr : nullptr;
              kernel_amx_bf16::run(kcip, abuf, kcip, bk + jr * kp, accbuf + jr, ldacc, fresh, finish,
                                   c + ir * ldc + jc + jr, ldc, mr, std::min<index_t>(32, nc - jr), ts);
            }
          }
        }
      }
    }
    kernel_amx_bf16::thread_end();
  });
}

}  // namespace detail

}  // namespace trident::cpu_kernels

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // TRIDENT_HAS_AMX_BF16 && TRIDENT_HAS_AVX512
