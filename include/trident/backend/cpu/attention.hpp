#pragma once
/// @file backend/cpu/attention.hpp
/// Fused causal multi-head self-attention on the CPU, forward and backward, in the manner of
/// FlashAttention-2 (Dao, 2023): the T x T scores are never stored, only one Br x Bc tile of
/// them per thread at a time.
///
/// Layout. qkv is (B, T, 3C) row-major with C = H*D, as a Linear(C -> 3C) writes it: q in
/// columns [0, C), k in [C, 2C), v in [2C, 3C); head h uses columns h*D .. h*D+D-1 of each.
/// y is (B, T, C) (head h in columns h*D...), lse is (B, H, T).
///
/// Inside the tiles everything is the accumulate type Acc (bf16 storage is widened to fp32
/// exactly); rows of D values are padded with zeros to Dp = a multiple of 16 so that the
/// AVX-512 loops need no tails, and score tiles have a fixed row stride of Bc = 64.
///
/// Forward, one (b, h, query tile of Br rows) per task: Q is loaded once, pre-multiplied by the
/// scale; for each key tile at or left of the diagonal, K^T (Dp x Bc) and V (Bc x Dp) are
/// loaded, S = Q K^T is formed, and an online softmax keeps per row the running max m and sum
/// l, rescaling the output accumulator O by exp(m_old - m_new) before O += P V. Key tiles
/// above the diagonal are skipped; on the diagonal tile only columns j <= i are used (and
/// computed, to 16-column granularity). At the end y = O / l and lse = m + log l.
///
/// Backward, one (b, h) per task (each owns its columns of dqkv, so tasks never race and the
/// result does not depend on the thread count): Q (scaled), dY and Dvec_i = dY_i . Y_i are
/// loaded for the whole head together with a dQ accumulator; for each key tile j (K, K^T,
/// V^T and dK, dV accumulators in L1/L2) and each query tile i >= j: S = Q K^T,
/// P = exp(S - lse), dV += P^T dY, dP = dY V^T, dS = P * (dP - Dvec), dQ += dS K,
/// dK += dS^T Q (the scale is folded into Q for dK and applied once to dQ at the end).
///
/// Dropout (p > 0): weight (b, h, i, j) is kept iff u >= p with u drawn from the counter-based
/// stream at n = ((b*H + h)*T + i)*T + j; kept weights are scaled by 1/(1-p). lse stays that of
/// the undropped softmax; the backward regenerates the same mask, so nothing is stored.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../../config.hpp"
#include "../../core/error.hpp"
#include "../../core/rng.hpp"
#include "../../precision/bfloat16.hpp"
#include "../../precision/convert.hpp"
#include "gemm/vec_math.hpp"
#include "parallel.hpp"

#if defined(TRIDENT_HAS_AVX512)
#include "intrinsics.hpp"
#endif

// GCC 12 reports false -Wmaybe-uninitialized inside AVX-512 intrinsics (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace trident::cpu_kernels {

/// Options of one attention call.
struct attention_options {
  double scale = 0;            ///< multiplies q.k; 0 means 1/sqrt(D)
  double dropout = 0;          ///< probability of dropping an attention weight (training), in [0, 1)
  random_spec dropout_rng{};   ///< counter-based stream for the dropout mask (trident/core/rng.hpp)
};

namespace detail::attn {

inline constexpr index_t br = 64;  ///< query rows per tile
inline constexpr index_t bc = 64;  ///< keys per tile; also the row stride of every score tile
inline constexpr index_t vec = 16; ///< D is padded to a multiple of this (one zmm of floats)
static_assert(br == bc, "the diagonal logic assumes square tiles");

/// D rounded up to whole vectors: the row stride of every D-wide tile.
constexpr index_t padded(index_t d) noexcept { return (d + vec - 1) / vec * vec; }

/// The storage/accumulate pairs the kernels support.
template <class Elem, class Acc>
inline constexpr bool supported_v = (std::is_same_v<Elem, double> && std::is_same_v<Acc, double>) ||
                                    (std::is_same_v<Elem, float> && std::is_same_v<Acc, float>) ||
                                    (std::is_same_v<Elem, bfloat16> && std::is_same_v<Acc, float>);

/// Per-thread scratch, kept between calls (OpenMP keeps its pool threads alive), so that a
/// call allocates nothing once the shapes have been seen. Returns n elements, 64-byte aligned.
template <class Acc>
Acc* thread_scratch(index_t n) {
  thread_local std::vector<Acc> mem;
  constexpr index_t pad = 64 / sizeof(Acc);
  if (static_cast<index_t>(mem.size()) < n + pad) mem.resize(static_cast<std::size_t>(n + pad));
  const auto addr = reinterpret_cast<std::uintptr_t>(mem.data());
  return mem.data() + ((64 - addr % 64) % 64) / sizeof(Acc);
}

/// Carves consecutive 64-byte aligned pieces out of a scratch block.
template <class Acc>
struct carver {
  Acc* p;
  /// The next n elements (rounded up to whole cache lines).
  Acc* take(index_t n) noexcept {
    Acc* r = p;
    p += (n + vec - 1) / vec * vec;
    return r;
  }
  /// Elements `take` would consume for n.
  static constexpr index_t size(index_t n) noexcept { return (n + vec - 1) / vec * vec; }
};

/// Runs f(u) for u in [0, n) over the available threads, one task at a time (dynamic
/// schedule: causal tasks differ in cost). Each task's result is independent of which thread
/// runs it, so the output is the same for every thread count.
template <class F>
void parallel_tasks(index_t n, F&& f) {
#if defined(_OPENMP)
  const int threads = static_cast<int>(std::min<index_t>(available_threads(), n));
  if (threads > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (index_t u = 0; u < n; ++u) f(u);
    return;
  }
#endif
  for (index_t u = 0; u < n; ++u) f(u);
}

/// Throws for sizes, pointers or options the kernels cannot take.
inline void check_arguments(const char* fn, index_t B, index_t T, index_t H, index_t D, bool pointers_ok,
                            const attention_options& o) {
  if (B <= 0 || T <= 0 || H <= 0 || D <= 0)
    throw shape_error(std::string(fn) + ": B, T, H and D must be positive, got B=" + std::to_string(B) +
                      " T=" + std::to_string(T) + " H=" + std::to_string(H) + " D=" + std::to_string(D));
  if (!pointers_ok) throw error(std::string(fn) + ": a tensor pointer is null");
  if (!(o.dropout >= 0 && o.dropout < 1))
    throw error(std::string(fn) + ": dropout must be in [0, 1), got " + std::to_string(o.dropout));
  if (!std::isfinite(o.scale)) throw error(std::string(fn) + ": scale must be finite, got " + std::to_string(o.scale));
}

/// The scale applied to q.k: o.scale, or 1/sqrt(D) when it is 0.
inline double effective_scale(const attention_options& o, index_t D) {
  return o.scale == 0 ? 1.0 / std::sqrt(static_cast<double>(D)) : o.scale;
}

// --- loads and stores ---------------------------------------------------------------------

/// Asks for the cache lines of a row of D elements that will be loaded soon.
template <class Elem>
TRIDENT_ALWAYS_INLINE void prefetch_row(const Elem* p, index_t D) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  const char* c = reinterpret_cast<const char*>(p);
  for (index_t off = 0; off < D * static_cast<index_t>(sizeof(Elem)); off += 64) __builtin_prefetch(c + off, 0, 3);
#else
  (void)p;
  (void)D;
#endif
}

/// Cache-line prefetches handed out a few at a time from inside the tile products, so that
/// the rows a task will write (its outputs) and the rows the next task will read (its inputs)
/// are on their way while this task computes. The rows of qkv, y and dqkv are ld elements
/// apart, more than a page, so the hardware prefetchers do not find them, and loading or
/// storing them in a tight loop runs at the latency of memory (a store miss holds up the
/// store buffer). Spreading the lines over the products keeps the line-fill buffers from
/// filling up. The pace: the task's lines over the number of pumps the thread's previous
/// task made (tasks of a call have about the same shape). Only a hint: results do not
/// depend on it. Calls whose tensors fit the caches (worth_prefetching) queue nothing.
class prefetch_queue {
 public:
  /// Queues rows [0, rows) of `bytes` bytes each, the first at p and the others `stride`
  /// bytes apart; `write` if they will be stored to.
  void add(const void* p, index_t rows, index_t stride, index_t bytes, bool write) noexcept {
    if (n_ == max_ranges || rows <= 0 || bytes <= 0) return;
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    const index_t lines = static_cast<index_t>((a % 64 + static_cast<std::uintptr_t>(bytes) + 63) / 64);
    ranges_[n_++] = {reinterpret_cast<const char*>(a - a % 64), rows, stride, lines, write};
    total_ += rows * lines;
  }
  /// Sets the pace once everything is queued.
  void start() noexcept {
    const index_t expected = std::max<index_t>(last_pumps(), 16);
    per_pump_ = (total_ + expected - 1) / expected + 1;
  }
  /// Issues the next few lines.
  TRIDENT_ALWAYS_INLINE void pump() noexcept {
    ++pumps_;
    if (cur_ < n_) issue();
  }
  ~prefetch_queue() { last_pumps() = pumps_; }

 private:
  static constexpr int max_ranges = 16;
  struct range {
    const char* p;
    index_t rows, stride, lines;
    bool write;
  };
  static index_t& last_pumps() noexcept {
    thread_local index_t n = 0;
    return n;
  }
  void issue() noexcept {
    for (index_t i = 0; i < per_pump_ && cur_ < n_; ++i) {
      const range& r = ranges_[cur_];
#if defined(__GNUC__) || defined(__clang__)
      const char* a = r.p + row_ * r.stride + line_ * 64;
      if (r.write)
        __builtin_prefetch(a, 1, 3);
      else
        __builtin_prefetch(a, 0, 2);  // to L2: the next task's inputs
#endif
      if (++line_ == r.lines) {
        line_ = 0;
        if (++row_ == r.rows) {
          row_ = 0;
          ++cur_;
        }
      }
    }
  }
  range ranges_[max_ranges]{};
  int n_ = 0, cur_ = 0;
  index_t row_ = 0, line_ = 0, total_ = 0, per_pump_ = 1, pumps_ = 0;
};

/// Whether a call touching `bytes` of tensors gains from prefetch_queue: below a few MiB they
/// stay in L2 between calls and the prefetches only cost instructions.
inline bool worth_prefetching(std::size_t bytes) noexcept { return bytes > (std::size_t{4} << 20); }

/// dst[0, D) = scale * src[0, D) widened to Acc; dst[D, Dp) = 0.
template <class Elem, class Acc>
TRIDENT_ALWAYS_INLINE void load_row(const Elem* src, index_t D, index_t Dp, Acc scale, Acc* dst) noexcept {
#if defined(TRIDENT_HAS_AVX512)
  if constexpr (std::is_same_v<Acc, float>) {
    const __m512 sv = _mm512_set1_ps(scale);
    for (index_t d = 0; d < Dp; d += vec) {
      const __mmask16 k = lane_mask(D - d);  // masked lanes read nothing and become the zero padding
      __m512 x;
      if constexpr (std::is_same_v<Elem, float>) {
        x = _mm512_maskz_loadu_ps(k, src + d);
      } else {
        const __m256i h = _mm256_maskz_loadu_epi16(k, src + d);
        x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      }
      _mm512_storeu_ps(dst + d, _mm512_mul_ps(x, sv));
    }
    return;
  }
#endif
  if constexpr (std::is_same_v<Elem, Acc>) {
    std::memcpy(dst, src, static_cast<std::size_t>(D) * sizeof(Acc));
  } else {
    simd::convert(src, dst, static_cast<std::size_t>(D));
  }
  if (scale != Acc(1)) {
    TRIDENT_SIMD()
    for (index_t d = 0; d < D; ++d) dst[d] *= scale;
  }
  for (index_t d = D; d < Dp; ++d) dst[d] = Acc(0);
}

/// dst[0, D) = scale * src[0, D) narrowed to Elem (round to nearest even; tmp: D elements of scratch).
template <class Elem, class Acc>
TRIDENT_ALWAYS_INLINE void store_row(const Acc* src, index_t D, Acc scale, Elem* dst, Acc* tmp) noexcept {
#if defined(TRIDENT_HAS_AVX512)
  if constexpr (std::is_same_v<Acc, float>) {
    const __m512 sv = _mm512_set1_ps(scale);
    for (index_t d = 0; d < D; d += vec) {
      const __mmask16 k = lane_mask(D - d);
      const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(src + d), sv);
      if constexpr (std::is_same_v<Elem, float>) {
        _mm512_mask_storeu_ps(dst + d, k, x);
      } else {
        _mm256_mask_storeu_epi16(dst + d, k, simd::detail::bf16_round_avx512(x));
      }
    }
    return;
  }
#endif
  if constexpr (std::is_same_v<Elem, Acc>) {
    TRIDENT_SIMD()
    for (index_t d = 0; d < D; ++d) dst[d] = src[d] * scale;
  } else {
    TRIDENT_SIMD()
    for (index_t d = 0; d < D; ++d) tmp[d] = src[d] * scale;
    simd::convert(tmp, dst, static_cast<std::size_t>(D));
  }
}

/// a[0, Dp) . b[0, Dp) for rows padded to whole vectors (16 lanes of partial sums with AVX-512).
template <class Acc>
TRIDENT_ALWAYS_INLINE Acc dot_padded(const Acc* a, const Acc* b, index_t Dp) noexcept {
#if defined(TRIDENT_HAS_AVX512)
  if constexpr (std::is_same_v<Acc, float>) {
    __m512 acc = _mm512_setzero_ps();
    for (index_t d = 0; d < Dp; d += vec) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  Acc acc = 0;
  for (index_t d = 0; d < Dp; ++d) acc += a[d] * b[d];
  return acc;
}

#if defined(TRIDENT_HAS_AVX512)
/// Transposes a 16 x 16 block held in 16 registers (unpack 32-bit, unpack 64-bit, then two
/// rounds of 128-bit lane shuffles).
TRIDENT_ALWAYS_INLINE void transpose16x16(__m512 (&r)[16]) noexcept {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i+k], 128-bit lane L: column 4L+k of rows 4i..4i+3
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int k = 0; k < 4; ++k) {  // row 4L+k of the result: lane L of r[k], r[4+k], r[8+k], r[12+k]
    const __m512 x0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x44), x1 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xEE);
    const __m512 y0 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x44), y1 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xEE);
    t[k] = _mm512_shuffle_f32x4(x0, y0, 0x88);
    t[4 + k] = _mm512_shuffle_f32x4(x0, y0, 0xDD);
    t[8 + k] = _mm512_shuffle_f32x4(x1, y1, 0x88);
    t[12 + k] = _mm512_shuffle_f32x4(x1, y1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

/// Transposes rows [0, nk) of a (bc x Dp) tile into a (Dp x bc) tile; columns [nk, bc) are zeroed.
template <class Acc>
TRIDENT_ALWAYS_INLINE void transpose_tile(const Acc* x, index_t nk, index_t Dp, Acc* xt) noexcept {
#if defined(TRIDENT_HAS_AVX512)
  if constexpr (std::is_same_v<Acc, float>) {
    for (index_t c0 = 0; c0 < bc; c0 += 16)
      for (index_t d0 = 0; d0 < Dp; d0 += 16) {
        __m512 r[16];
        for (index_t i = 0; i < 16; ++i)
          r[i] = c0 + i < nk ? _mm512_loadu_ps(x + (c0 + i) * Dp + d0) : _mm512_setzero_ps();
        transpose16x16(r);
        for (index_t i = 0; i < 16; ++i) _mm512_storeu_ps(xt + (d0 + i) * bc + c0, r[i]);
      }
    return;
  }
#endif
  for (index_t d = 0; d < Dp; ++d) {
    Acc* out = xt + d * bc;
    for (index_t c = 0; c < nk; ++c) out[c] = x[c * Dp + d];
    for (index_t c = nk; c < bc; ++c) out[c] = Acc(0);
  }
}

/// The dropout multipliers of keys j0 .. j0+count-1 of one query row: z[c] = keep if the
/// weight at stream position n0 + c survives, else 0. One Philox block serves 4 positions.
template <class Acc>
void dropout_multipliers(const attention_options& o, std::uint64_t n0, index_t count, Acc keep, Acc* z) noexcept {
  const random_spec& rng = o.dropout_rng;
  std::uint64_t cached = ~std::uint64_t{0};
  philox_block blk{};
  for (index_t c = 0; c < count; ++c) {
    const std::uint64_t n = n0 + static_cast<std::uint64_t>(c);
    if (n / 4 != cached) {
      blk = rng.block(n);
      cached = n / 4;
    }
    z[c] = rng.value(blk, n) >= o.dropout ? keep : Acc(0);
  }
}

// --- tile products, portable versions (double, and float without AVX-512) ----------------

/// s[r][c] = a[r] . bt[:, c] for rows [0, rows) and the columns each row block needs:
/// all nk keys, or on the diagonal tile (diag) only c <= r.
template <class Acc>
void scores_generic(const Acc* a, index_t lda, index_t rows, const Acc* bt, index_t Dp, bool diag, index_t nk,
                    Acc* s, prefetch_queue& pf) noexcept {
  for (index_t r = 0; r < rows; ++r) {
    pf.pump();
    const index_t nc = diag ? std::min(nk, r + 1) : nk;
    Acc* sr = s + r * bc;
    for (index_t c = 0; c < nc; ++c) sr[c] = Acc(0);
    for (index_t d = 0; d < Dp; ++d) {
      const Acc x = a[r * lda + d];
      const Acc* b = bt + d * bc;
      TRIDENT_SIMD()
      for (index_t c = 0; c < nc; ++c) sr[c] += x * b[c];
    }
  }
}

/// out[r][0, Dp) += sum over c of p[r][c] * m[c][0, Dp), c over the keys row r may see.
template <class Acc>
void rows_times_keys_generic(const Acc* p, index_t rows, bool diag, index_t nk, const Acc* m, index_t Dp, Acc* out,
                             index_t ldo, prefetch_queue& pf) noexcept {
  for (index_t r = 0; r < rows; ++r) {
    pf.pump();
    const index_t nc = diag ? std::min(nk, r + 1) : nk;
    Acc* o = out + r * ldo;
    for (index_t c = 0; c < nc; ++c) {
      const Acc x = p[r * bc + c];
      const Acc* mc = m + c * Dp;
      TRIDENT_SIMD()
      for (index_t d = 0; d < Dp; ++d) o[d] += x * mc[d];
    }
  }
}

/// out[c][0, Dp) += sum over r of p[r][c] * x[r][0, Dp), for keys c < nk and the rows that see them.
template <class Acc>
void keys_times_rows_generic(const Acc* p, index_t rows, bool diag, index_t nk, const Acc* x, index_t ldx,
                             index_t Dp, Acc* out, prefetch_queue& pf) noexcept {
  for (index_t c = 0; c < nk; ++c) {
    pf.pump();
    Acc* o = out + c * Dp;
    for (index_t r = diag ? c : 0; r < rows; ++r) {
      const Acc w = p[r * bc + c];
      const Acc* xr = x + r * ldx;
      TRIDENT_SIMD()
      for (index_t d = 0; d < Dp; ++d) o[d] += w * xr[d];
    }
  }
}

/// One row of the online softmax: folds scores s[0, valid) into the running max m and sum l,
/// writes P = exp(s - m_new) over s (zeros in [valid, bc)) and returns exp(m_old - m_new).
template <class Acc>
Acc softmax_row_generic(Acc* s, index_t valid, Acc& m, Acc& l) noexcept {
  Acc mx = m;
  for (index_t c = 0; c < valid; ++c) mx = std::max(mx, s[c]);
  const Acc alpha = std::exp(m - mx);
  Acc sum = 0;
  for (index_t c = 0; c < valid; ++c) {
    s[c] = std::exp(s[c] - mx);
    sum += s[c];
  }
  for (index_t c = valid; c < bc; ++c) s[c] = Acc(0);
  l = l * alpha + sum;
  m = mx;
  return alpha;
}

/// One row of the backward: P = exp(s - lse) written over s, dS = P * (dP - dvec) over dp
/// (dP = dp * z with dropout, and pd = P * z), zeros in [valid, bc).
template <class Acc>
void backward_row_generic(Acc* s, Acc* dp, Acc* pd, const Acc* z, index_t valid, Acc lse, Acc dvec) noexcept {
  for (index_t c = 0; c < valid; ++c) {
    const Acc p = std::exp(s[c] - lse);
    Acc g = dp[c];
    if (z) {
      pd[c] = p * z[c];
      g *= z[c];
    }
    s[c] = p;
    dp[c] = p * (g - dvec);
  }
  for (index_t c = valid; c < bc; ++c) {
    s[c] = Acc(0);
    dp[c] = Acc(0);
    if (z) pd[c] = Acc(0);
  }
}

// --- tile products, AVX-512 versions (float) ----------------------------------------------

#if defined(TRIDENT_HAS_AVX512)

/// Calls f(std::integral_constant<int, R>{}) for a runtime 1 <= r <= 8.
template <class F>
TRIDENT_ALWAYS_INLINE void with_rows(index_t r, F&& f) {
  switch (r) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

/// Calls f(std::integral_constant<int, NV>{}) for a runtime 1 <= nv <= 4.
template <class F>
TRIDENT_ALWAYS_INLINE void with_vectors(index_t nv, F&& f) {
  switch (nv) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

/// Rows per register block for NV vectors of output per row (R*NV accumulators <= 16).
constexpr index_t block_rows(index_t nv) noexcept { return nv <= 2 ? 8 : 4; }

/// s[r][0, 16*NV) = a[r] . bt[:, 0, 16*NV) for R rows: R*NV zmm accumulators, rows of bt
/// loaded once per d and shared by the R broadcast a[r][d].
template <int R, int NV>
TRIDENT_ALWAYS_INLINE void scores_block_avx512(const float* a, index_t lda, const float* bt, index_t Dp,
                                               float* s) noexcept {
  __m512 acc[R][NV];
  TRIDENT_UNROLL(8)
  for (int r = 0; r < R; ++r)
    TRIDENT_UNROLL(4)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (index_t d = 0; d < Dp; ++d) {
    __m512 b[NV];
    TRIDENT_UNROLL(4)
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(bt + d * bc + 16 * v);
    TRIDENT_UNROLL(8)
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * lda + d]);
      TRIDENT_UNROLL(4)
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(x, b[v], acc[r][v]);
    }
  }
  TRIDENT_UNROLL(8)
  for (int r = 0; r < R; ++r)
    TRIDENT_UNROLL(4)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(s + r * bc + 16 * v, acc[r][v]);
}

/// scores_generic for float with AVX-512 register blocks (columns to 16-column granularity).
inline void scores_avx512(const float* a, index_t lda, index_t rows, const float* bt, index_t Dp, bool diag,
                          index_t nk, float* s, prefetch_queue& pf) noexcept {
  constexpr index_t rb = 4;
  for (index_t r0 = 0; r0 < rows; r0 += rb) {
    pf.pump();
    const index_t nr = std::min(rb, rows - r0);
    const index_t nc = diag ? std::min(nk, r0 + nr) : nk;
    with_rows(nr, [&](auto R) {
      if constexpr (R.value <= rb)
        with_vectors((nc + 15) / 16,
                     [&](auto NV) { scores_block_avx512<R.value, NV.value>(a + r0 * lda, lda, bt, Dp, s + r0 * bc); });
    });
  }
}

/// out[r][0, 16*NV) += sum_{c < nc} p[r][c] * m[c][0, 16*NV) for R rows.
template <int R, int NV>
TRIDENT_ALWAYS_INLINE void rows_times_keys_block_avx512(const float* p, index_t nc, const float* m, index_t ldm,
                                                        float* out, index_t ldo) noexcept {
  __m512 acc[R][NV];
  TRIDENT_UNROLL(8)
  for (int r = 0; r < R; ++r)
    TRIDENT_UNROLL(4)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_loadu_ps(out + r * ldo + 16 * v);
  for (index_t c = 0; c < nc; ++c) {
    __m512 b[NV];
    TRIDENT_UNROLL(4)
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(m + c * ldm + 16 * v);
    TRIDENT_UNROLL(8)
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(p[r * bc + c]);
      TRIDENT_UNROLL(4)
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(x, b[v], acc[r][v]);
    }
  }
  TRIDENT_UNROLL(8)
  for (int r = 0; r < R; ++r)
    TRIDENT_UNROLL(4)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + r * ldo + 16 * v, acc[r][v]);
}

/// rows_times_keys_generic for float with AVX-512 register blocks.
inline void rows_times_keys_avx512(const float* p, index_t rows, bool diag, index_t nk, const float* m, index_t Dp,
                                   float* out, index_t ldo, prefetch_queue& pf) noexcept {
  for (index_t g0 = 0; g0 < Dp; g0 += 64) {
    const index_t nv = std::min<index_t>(4, (Dp - g0) / 16);
    const index_t rb = block_rows(nv);
    for (index_t r0 = 0; r0 < rows; r0 += rb) {
      pf.pump();
      const index_t nr = std::min(rb, rows - r0);
      const index_t nc = diag ? std::min(nk, r0 + nr) : nk;
      with_vectors(nv, [&](auto NV) {
        with_rows(nr, [&](auto R) {
          if constexpr (R.value * NV.value <= 16)
            rows_times_keys_block_avx512<R.value, NV.value>(p + r0 * bc, nc, m + g0, Dp, out + r0 * ldo + g0, ldo);
        });
      });
    }
  }
}

/// out[k][0, 16*NV) += sum_{r in [r0, r1)} p[r][k] * x[r][0, 16*NV) for R keys k.
template <int R, int NV>
TRIDENT_ALWAYS_INLINE void keys_times_rows_block_avx512(const float* p, index_t r0, index_t r1, const float* x,
                                                        index_t ldx, float* out, index_t ldo) noexcept {
  __m512 acc[R][NV];
  TRIDENT_UNROLL(8)
  for (int k = 0; k < R; ++k)
    TRIDENT_UNROLL(4)
    for (int v = 0; v < NV; ++v) acc[k][v] = _mm512_loadu_ps(out + k * ldo + 16 * v);
  for (index_t r = r0; r < r1; ++r) {
    __m512 b[NV];
    TRIDENT_UNROLL(4)
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(x + r * ldx + 16 * v);
    TRIDENT_UNROLL(8)
    for (int k = 0; k < R; ++k) {
      const __m512 w = _mm512_set1_ps(p[r * bc + k]);
      TRIDENT_UNROLL(4)
      for (int v = 0; v < NV; ++v) acc[k][v] = _mm512_fmadd_ps(w, b[v], acc[k][v]);
    }
  }
  TRIDENT_UNROLL(8)
  for (int k = 0; k < R; ++k)
    TRIDENT_UNROLL(4)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + k * ldo + 16 * v, acc[k][v]);
}

/// keys_times_rows_generic for float with AVX-512 register blocks.
inline void keys_times_rows_avx512(const float* p, index_t rows, bool diag, index_t nk, const float* x, index_t ldx,
                                   index_t Dp, float* out, prefetch_queue& pf) noexcept {
  for (index_t g0 = 0; g0 < Dp; g0 += 64) {
    const index_t nv = std::min<index_t>(4, (Dp - g0) / 16);
    const index_t kb = block_rows(nv);
    for (index_t c0 = 0; c0 < nk; c0 += kb) {
      pf.pump();
      const index_t nr = std::min(kb, nk - c0);
      const index_t r0 = diag ? c0 : 0;  // rows before the first key of the block cannot see it
      if (r0 >= rows) break;
      with_vectors(nv, [&](auto NV) {
        with_rows(nr, [&](auto R) {
          if constexpr (R.value * NV.value <= 16)
            keys_times_rows_block_avx512<R.value, NV.value>(p + c0, r0, rows, x + g0, ldx, out + c0 * Dp + g0, Dp);
        });
      });
    }
  }
}

/// softmax_row_generic for float: 4 vectors, lanes past `valid` masked.
inline float softmax_row_avx512(float* s, index_t valid, float& m, float& l) noexcept {
  static_assert(bc == 64, "four vectors per score row");
  __m512 mx = _mm512_set1_ps(m);
  for (int v = 0; v < 4; ++v)
    mx = _mm512_mask_max_ps(mx, lane_mask(valid - 16 * v), mx, _mm512_loadu_ps(s + 16 * v));
  const float m_new = _mm512_reduce_max_ps(mx);
  const float alpha = std::exp(m - m_new);
  const __m512 shift = _mm512_set1_ps(m_new);
  __m512 sum = _mm512_setzero_ps();
  for (int v = 0; v < 4; ++v) {
    const __mmask16 k = lane_mask(valid - 16 * v);
    const __m512 e = _mm512_maskz_mov_ps(k, exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * v), shift)));
    _mm512_storeu_ps(s + 16 * v, e);
    sum = _mm512_add_ps(sum, e);
  }
  l = l * alpha + _mm512_reduce_add_ps(sum);
  m = m_new;
  return alpha;
}

/// backward_row_generic for float: 4 vectors, lanes past `valid` masked.
inline void backward_row_avx512(float* s, float* dp, float* pd, const float* z, index_t valid, float lse,
                                float dvec) noexcept {
  const __m512 shift = _mm512_set1_ps(lse), dv = _mm512_set1_ps(dvec);
  for (int v = 0; v < 4; ++v) {
    const __mmask16 k = lane_mask(valid - 16 * v);
    const __m512 p = _mm512_maskz_mov_ps(k, exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * v), shift)));
    __m512 g = _mm512_maskz_loadu_ps(k, dp + 16 * v);
    if (z) {
      const __m512 zv = _mm512_maskz_loadu_ps(k, z + 16 * v);
      _mm512_storeu_ps(pd + 16 * v, _mm512_mul_ps(p, zv));
      g = _mm512_mul_ps(g, zv);
    }
    _mm512_storeu_ps(s + 16 * v, p);
    _mm512_storeu_ps(dp + 16 * v, _mm512_mul_ps(p, _mm512_sub_ps(g, dv)));
  }
}

#endif  // TRIDENT_HAS_AVX512

// --- dispatch -----------------------------------------------------------------------------

/// s = a . bt over the needed columns (see scores_generic).
template <class Acc>
TRIDENT_ALWAYS_INLINE void scores(const Acc* a, index_t lda, index_t rows, const Acc* bt, index_t Dp, bool diag,
                                  index_t nk, Acc* s, prefetch_queue& pf) noexcept {
#if defined(TRIDENT_HAS_AVX512)
  if constexpr (std::is_same_v<Acc, float>) return scores_avx512(a, lda, rows, bt, Dp, diag, nk, s, pf);
#endif
  scores_generic(a, lda, rows, bt, Dp, diag, nk, s, pf);
}

/// out += p . m (see rows_times_keys_generic).
template <class Acc>
TRIDENT_ALWAYS_INLINE void rows_times_keys(const Acc* p, index_t rows, bool diag, index_t nk, const Acc* m, index_t Dp,
                                           Acc* out, index_t ldo, prefetch_queue& pf) noexcept {
#if defined(TRIDENT_HAS_AVX512)
  if constexpr (std::is_same_v<Acc, float>) return rows_times_keys_avx512(p, rows, diag, nk, m, Dp, out, ldo, pf);
#endif
  rows_times_keys_generic(p, rows, diag, nk, m, Dp, out, ldo, pf);
}

/// out += p^T . x (see keys_times_rows_generic).
template <class Acc>
TRIDENT_ALWAYS_INLINE void keys_times_rows(const Acc* p, index_t rows, bool diag, index_t nk, const Acc* x,
                                           index_t ldx, index_t Dp, Acc* out, prefetch_queue& pf) noexcept {
#if defined(TRIDENT_HAS_AVX512)
  if constexpr (std::is_same_v<Acc, float>) return keys_times_rows_avx512(p, rows, diag, nk, x, ldx, Dp, out, pf);
#endif
  keys_times_rows_generic(p, rows, diag, nk, x, ldx, Dp, out, pf);
}

/// One online-softmax row (see softmax_row_generic).
template <class Acc>
TRIDENT_ALWAYS_INLINE Acc softmax_row(Acc* s, index_t valid, Acc& m, Acc& l) noexcept {
#if defined(TRIDENT_HAS_AVX512)
  if constexpr (std::is_same_v<Acc, float>) return softmax_row_avx512(s, valid, m, l);
#endif
  return softmax_row_generic(s, valid, m, l);
}

/// One backward row (see backward_row_generic).
template <class Acc>
TRIDENT_ALWAYS_INLINE void backward_row(Acc* s, Acc* dp, Acc* pd, const Acc* z, index_t valid, Acc lse,
                                        Acc dvec) noexcept {
#if defined(TRIDENT_HAS_AVX512)
  if constexpr (std::is_same_v<Acc, float>) return backward_row_avx512(s, dp, pd, z, valid, lse, dvec);
#endif
  backward_row_generic(s, dp, pd, z, valid, lse, dvec);
}

}  // namespace detail::attn

/// Causal multi-head self-attention forward: y = softmax(scale * q k^T, masked j <= i) v per head.
/// qkv: (B, T, 3*C) row-major, C = H*D, as a Linear(C -> 3C) produces it: q in columns [0, C), k in [C, 2C),
/// v in [2C, 3C); head h uses columns h*D .. h*D+D-1 of each. y: (B, T, C), head h in columns h*D... (written).
/// lse: (B, H, T) log-sum-exp of each row of the scaled, masked scores (written; backward needs it).
/// Causal: query i attends to keys j <= i.
/// @tparam Elem storage type of qkv and y (double, float or bfloat16)
/// @tparam Acc accumulate type (double for double, float otherwise); also lse's type
template <class Elem, class Acc>
void attention_forward(index_t B, index_t T, index_t H, index_t D, const Elem* qkv, Elem* y, Acc* lse,
                       const attention_options& o) {
  using namespace detail::attn;
  static_assert(supported_v<Elem, Acc>, "attention_forward: supported (storage, accumulate) pairs are "
                                        "(double, double), (float, float) and (bfloat16, float)");
  check_arguments("attention_forward", B, T, H, D, qkv && y && lse, o);
  const index_t C = H * D, ld = 3 * C, Dp = padded(D), nqt = (T + br - 1) / br, BH = B * H;
  const Acc scale = static_cast<Acc>(effective_scale(o, D));
  const bool drop = o.dropout > 0;
  const Acc keep = static_cast<Acc>(1.0 / (1.0 - o.dropout));
  // A task is one head's run of query tiles: its keys and values are loaded (and K transposed)
  // once per task. Whole heads when there are enough of them to keep the threads busy, else
  // heads are split into groups of query tiles. Rows never depend on the grouping.
  const index_t groups = std::clamp<index_t>((4 * available_threads() + BH - 1) / BH, 1, nqt);
  const index_t per_group = (nqt + groups - 1) / groups;
  using cv = carver<Acc>;
  const index_t scratch = nqt * (cv::size(Dp * bc) + cv::size(bc * Dp)) + 2 * cv::size(br * Dp) +
                          cv::size(br * bc) + 2 * cv::size(br) + cv::size(std::max(Dp, bc));
  const bool prefetch = worth_prefetching(static_cast<std::size_t>(4 * B * T * C) * sizeof(Elem));  // qkv and y

  parallel_tasks(BH * groups, [&](index_t u) {
    const index_t grp = groups - 1 - u / BH;  // the costliest (last) query tiles first
    const index_t bh = u % BH, b = bh / H, h = bh % H;
    const index_t qt_begin = grp * per_group, qt_end = std::min(nqt, qt_begin + per_group);
    if (qt_begin >= qt_end) return;
    cv ws{thread_scratch<Acc>(scratch)};
    Acc* kt_all = ws.take(qt_end * Dp * bc);  // per key tile: (Dp, bc) keys transposed
    Acc* v_all = ws.take(qt_end * bc * Dp);   // per key tile: (bc, Dp) values
    Acc* q = ws.take(br * Dp);                // (br, Dp) scaled queries
    Acc* out = ws.take(br * Dp);              // (br, Dp) output accumulator O
    Acc* s = ws.take(br * bc);                // (br, bc) scores, then weights
    Acc* m = ws.take(br);                     // running row max
    Acc* l = ws.take(br);                     // running row sum
    Acc* row = ws.take(std::max(Dp, bc));     // a staged row; dropout multipliers
    const Elem* base = qkv + b * T * ld + h * D;
    const index_t row_bytes = D * static_cast<index_t>(sizeof(Elem));

    // Prefetched while computing: this task's rows of y, then the next task's q, k, v (the
    // thread that is free next takes task u + threads, or near it).
    prefetch_queue pf;
    if (prefetch) pf.add(y + (b * T + qt_begin * br) * C + h * D, std::min(T, qt_end * br) - qt_begin * br,
           C * static_cast<index_t>(sizeof(Elem)), row_bytes, true);
    if (const index_t un = u + available_threads(); prefetch && un < BH * groups) {
      const index_t gn = groups - 1 - un / BH, bhn = un % BH;
      const index_t qbn = gn * per_group, qen = std::min(nqt, qbn + per_group);
      if (qbn < qen) {
        const Elem* bn = qkv + (bhn / H) * T * ld + (bhn % H) * D;
        const index_t keys = std::min(T, qen * bc), stride = ld * static_cast<index_t>(sizeof(Elem));
        pf.add(bn + C, keys, stride, row_bytes, false);
        pf.add(bn + 2 * C, keys, stride, row_bytes, false);
        pf.add(bn + qbn * br * ld, std::min(T, qen * br) - qbn * br, stride, row_bytes, false);
      }
    }
    pf.start();

    const index_t nkeys = std::min(T, qt_end * bc);
    for (index_t j = 0; j < nkeys; ++j) {
      if (j + 16 < nkeys) {
        prefetch_row(base + C + (j + 16) * ld, D);
        prefetch_row(base + 2 * C + (j + 16) * ld, D);
      }
      load_row(base + C + j * ld, D, Dp, Acc(1), out + (j % bc) * Dp);  // O's space stages a key tile
      load_row(base + 2 * C + j * ld, D, Dp, Acc(1), v_all + j * Dp);
      if (j % bc == bc - 1 || j == nkeys - 1)
        transpose_tile(out, j % bc + 1, Dp, kt_all + (j / bc) * Dp * bc);  // zeros past T
    }

    for (index_t qt = qt_begin; qt < qt_end; ++qt) {
      const index_t i0 = qt * br, nq = std::min(br, T - i0);
      for (index_t r = 0; r < nq; ++r) {
        if (r + 16 < nq) prefetch_row(base + (i0 + r + 16) * ld, D);
        load_row(base + (i0 + r) * ld, D, Dp, scale, q + r * Dp);
      }
      std::fill(out, out + nq * Dp, Acc(0));
      std::fill(m, m + nq, -std::numeric_limits<Acc>::infinity());
      std::fill(l, l + nq, Acc(0));

      for (index_t jt = 0; jt <= qt; ++jt) {
        const index_t j0 = jt * bc, nk = std::min(bc, T - j0);
        const bool diag = jt == qt;
        scores(q, Dp, nq, kt_all + jt * Dp * bc, Dp, diag, nk, s, pf);
        for (index_t r = 0; r < nq; ++r) {
          const index_t valid = diag ? std::min(nk, r + 1) : nk;
          Acc* sr = s + r * bc;
          const Acc alpha = softmax_row(sr, valid, m[r], l[r]);
          if (alpha != Acc(1)) {
            Acc* orow = out + r * Dp;
            TRIDENT_SIMD()
            for (index_t d = 0; d < Dp; ++d) orow[d] *= alpha;
          }
          if (drop) {
            const auto n0 = static_cast<std::uint64_t>((bh * T + i0 + r) * T + j0);
            dropout_multipliers(o, n0, valid, keep, row);
            TRIDENT_SIMD()
            for (index_t c = 0; c < valid; ++c) sr[c] *= row[c];
          }
        }
        rows_times_keys(s, nq, diag, nk, v_all + j0 * Dp, Dp, out, Dp, pf);
      }

      for (index_t r = 0; r < nq; ++r) {
        store_row(out + r * Dp, D, Acc(1) / l[r], y + (b * T + i0 + r) * C + h * D, row);
        lse[bh * T + i0 + r] = m[r] + std::log(l[r]);
      }
    }
  });
}

/// Causal multi-head self-attention backward (FlashAttention-2), from the forward's y and lse.
/// dqkv (B, T, 3C) is written (not accumulated): dq, dk, dv in the same column layout as qkv.
/// Each (b, h) is one task, so the result is bit-identical for every thread count.
/// @tparam Elem storage type of qkv, y, dy and dqkv (double, float or bfloat16)
/// @tparam Acc accumulate type (double for double, float otherwise); also lse's type
template <class Elem, class Acc>
void attention_backward(index_t B, index_t T, index_t H, index_t D, const Elem* qkv, const Elem* y, const Elem* dy,
                        const Acc* lse, Elem* dqkv, const attention_options& o) {
  using namespace detail::attn;
  static_assert(supported_v<Elem, Acc>, "attention_backward: supported (storage, accumulate) pairs are "
                                        "(double, double), (float, float) and (bfloat16, float)");
  check_arguments("attention_backward", B, T, H, D, qkv && y && dy && lse && dqkv, o);
  const index_t C = H * D, ld = 3 * C, Dp = padded(D), nqt = (T + br - 1) / br, BH = B * H;
  const Acc scale = static_cast<Acc>(effective_scale(o, D));
  const bool drop = o.dropout > 0;
  const Acc keep = static_cast<Acc>(1.0 / (1.0 - o.dropout));
  using cv = carver<Acc>;
  const index_t scratch = 3 * cv::size(T * Dp) + cv::size(T) + 3 * cv::size(bc * Dp) + 2 * cv::size(Dp * bc) +
                          3 * cv::size(br * bc) + 2 * cv::size(std::max(Dp, bc));
  const bool prefetch = worth_prefetching(static_cast<std::size_t>(8 * B * T * C) * sizeof(Elem));  // all but lse

  parallel_tasks(BH, [&](index_t bh) {
    const index_t b = bh / H, h = bh % H;
    cv ws{thread_scratch<Acc>(scratch)};
    Acc* q = ws.take(T * Dp);     // (T, Dp) scaled queries of the head
    Acc* g = ws.take(T * Dp);     // (T, Dp) dY
    Acc* dq = ws.take(T * Dp);    // (T, Dp) dQ accumulator (unscaled)
    Acc* dvec = ws.take(T);       // rowsum(dY * Y)
    Acc* k = ws.take(bc * Dp);    // (bc, Dp) keys of the current key tile
    Acc* dk = ws.take(bc * Dp);   // (bc, Dp)
    Acc* dv = ws.take(bc * Dp);   // (bc, Dp)
    Acc* kt = ws.take(Dp * bc);   // (Dp, bc) keys transposed
    Acc* vt = ws.take(Dp * bc);   // (Dp, bc) values transposed
    Acc* s = ws.take(br * bc);    // scores, then P
    Acc* dp = ws.take(br * bc);   // dY V^T, then dS
    Acc* pd = ws.take(br * bc);   // P with dropout applied
    Acc* row = ws.take(std::max(Dp, bc));
    Acc* z = ws.take(std::max(Dp, bc));
    const Elem* base = qkv + b * T * ld + h * D;
    const Acc* lse_h = lse + bh * T;
    const index_t row_bytes = D * static_cast<index_t>(sizeof(Elem)), stride = ld * static_cast<index_t>(sizeof(Elem));
    const index_t cstride = C * static_cast<index_t>(sizeof(Elem));

    // Prefetched while computing: this task's rows of dqkv in the order they are stored (per key
    // tile dq, dk, dv), then the next task's q, k, v, dy and y (see prefetch_queue).
    prefetch_queue pf;
    Elem* dst_h = dqkv + b * T * ld + h * D;
    for (index_t t0 = 0; prefetch && t0 < T; t0 += bc)
      for (index_t part = 0; part < 3; ++part)
        pf.add(dst_h + t0 * ld + part * C, std::min(bc, T - t0), stride, row_bytes, true);
    if (const index_t bn = bh + available_threads(); prefetch && bn < BH) {
      const Elem* basen = qkv + (bn / H) * T * ld + (bn % H) * D;
      for (index_t part = 0; part < 3; ++part) pf.add(basen + part * C, T, stride, row_bytes, false);
      pf.add(dy + (bn / H) * T * C + (bn % H) * D, T, cstride, row_bytes, false);
      pf.add(y + (bn / H) * T * C + (bn % H) * D, T, cstride, row_bytes, false);
    }
    pf.start();

    for (index_t i = 0; i < T; ++i) {
      if (i + 16 < T) {
        prefetch_row(base + (i + 16) * ld, D);
        prefetch_row(dy + (b * T + i + 16) * C + h * D, D);
        prefetch_row(y + (b * T + i + 16) * C + h * D, D);
      }
      load_row(base + i * ld, D, Dp, scale, q + i * Dp);
      load_row(dy + (b * T + i) * C + h * D, D, Dp, Acc(1), g + i * Dp);
      load_row(y + (b * T + i) * C + h * D, D, Dp, Acc(1), row);
      dvec[i] = dot_padded(g + i * Dp, row, Dp);
    }
    std::fill(dq, dq + T * Dp, Acc(0));

    for (index_t jt = 0; jt < nqt; ++jt) {
      const index_t j0 = jt * bc, nk = std::min(bc, T - j0);
      for (index_t c = 0; c < nk; ++c) {
        if (j0 + c + 16 < T) {
          prefetch_row(base + C + (j0 + c + 16) * ld, D);
          prefetch_row(base + 2 * C + (j0 + c + 16) * ld, D);
        }
        load_row(base + C + (j0 + c) * ld, D, Dp, Acc(1), k + c * Dp);
        load_row(base + 2 * C + (j0 + c) * ld, D, Dp, Acc(1), dv + c * Dp);  // dv's space stages V
      }
      transpose_tile(k, nk, Dp, kt);
      transpose_tile(dv, nk, Dp, vt);
      std::fill(dk, dk + nk * Dp, Acc(0));
      std::fill(dv, dv + nk * Dp, Acc(0));

      for (index_t qt = jt; qt < nqt; ++qt) {
        const index_t i0 = qt * br, nq = std::min(br, T - i0);
        const bool diag = qt == jt;
        scores(q + i0 * Dp, Dp, nq, kt, Dp, diag, nk, s, pf);
        scores(g + i0 * Dp, Dp, nq, vt, Dp, diag, nk, dp, pf);
        for (index_t r = 0; r < nq; ++r) {
          const index_t valid = diag ? std::min(nk, r + 1) : nk;
          if (drop) {
            const auto n0 = static_cast<std::uint64_t>((bh * T + i0 + r) * T + j0);
            dropout_multipliers(o, n0, valid, keep, z);
          }
          backward_row(s + r * bc, dp + r * bc, pd + r * bc, drop ? z : nullptr, valid, lse_h[i0 + r], dvec[i0 + r]);
        }
        keys_times_rows(drop ? pd : s, nq, diag, nk, g + i0 * Dp, Dp, Dp, dv, pf);  // dV += P^T dY
        keys_times_rows(dp, nq, diag, nk, q + i0 * Dp, Dp, Dp, dk, pf);             // dK += dS^T (scale Q)
        rows_times_keys(dp, nq, diag, nk, k, Dp, dq + i0 * Dp, Dp, pf);              // dQ += dS K
        if (diag)  // the last contribution to these rows of dQ (key tiles run left to right)
          for (index_t r = 0; r < nq; ++r) store_row(dq + (i0 + r) * Dp, D, scale, dst_h + (i0 + r) * ld, row);
      }

      for (index_t c = 0; c < nk; ++c) {
        Elem* dst = dqkv + (b * T + j0 + c) * ld + h * D;
        store_row(dk + c * Dp, D, Acc(1), dst + C, row);
        store_row(dv + c * Dp, D, Acc(1), dst + 2 * C, row);
      }
    }
  });
}

}  // namespace trident::cpu_kernels

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
