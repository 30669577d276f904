#pragma once
/// @file backend/cpu/conv_kernels.hpp
/// conv_kernels<cpu>: convolution (im2col + GEMM), pooling and batch-norm kernels on the CPU.
///
/// Convolution hands the samples of a batch out to threads one at a time; a thread unfolds
/// its sample into its own (C_in*kh*kw, OH*OW) buffer and runs a single-threaded GEMM on it,
/// so the unfolded matrix is still in cache when the GEMM reads it. Weight gradients are
/// summed per fixed block of samples and the blocks merged in order. Pooling and batch norm
/// work on (sample, channel) planes, handed out in chunks the same way; batch norm's
/// statistics are summed per thread over fixed ranges of planes and merged in thread order.
/// Results do not depend on scheduling. All scratch memory comes from the step's arena.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../../core/activation.hpp"
#include "../../core/tensor.hpp"
#include "../../nn/arena.hpp"
#include "../../nn/batch_norm.hpp"
#include "../../nn/conv2d.hpp"
#include "../../nn/pooling.hpp"
#include "gemm.hpp"
#include "intrinsics.hpp"
#include "kernels.hpp"
#include "parallel.hpp"

namespace trident::nn {

namespace conv_cpu {

/// Per-thread slices of one arena allocation: `count` slices of `n` elements each, every
/// slice starting on a 64-byte boundary.
template <class T>
struct slices {
  T* base = nullptr;
  index_t stride = 0;
  T* operator[](index_t i) const noexcept { return base + i * stride; }
};
template <class T>
slices<T> take(arena<cpu>& mem, index_t n, index_t count) {
  slices<T> s;
  s.stride = (n * static_cast<index_t>(sizeof(T)) + 63) / 64 * 64 / static_cast<index_t>(sizeof(T));
  s.base = static_cast<T*>(mem.allocate_bytes(static_cast<std::size_t>(std::max<index_t>(1, s.stride * count)) * sizeof(T)));
  return s;
}

template <class T>
inline constexpr bool is_wide = std::is_same_v<T, float> || std::is_same_v<T, double>;

/// The output positions o in [0, out) whose tap k of a window reads inside the input:
/// 0 <= o * stride - pad + k < in.
struct span {
  index_t lo, hi;
};
constexpr span valid_positions(index_t k, index_t pad, index_t stride, index_t in, index_t out) noexcept {
  const index_t lo = pad - k > 0 ? (pad - k + stride - 1) / stride : 0;
  const index_t t = in - 1 + pad - k;
  const index_t hi = t < 0 ? 0 : std::min(out, t / stride + 1);
  return {std::min(lo, hi), hi};
}

/// Zeroes the columns outside `cols` in the rows `rows` of a (rows, OW) plane. Column by
/// column: the runs are a few elements long, too short for a memset call each.
template <class T>
void clear_columns(T* plane, span rows, span cols, index_t OW) noexcept {
  const T zero = static_cast<T>(0.0f);
  for (index_t q = 0; q < cols.lo; ++q)
    for (index_t oh = rows.lo; oh < rows.hi; ++oh) plane[oh * OW + q] = zero;
  for (index_t q = cols.hi; q < OW; ++q)
    for (index_t oh = rows.lo; oh < rows.hi; ++oh) plane[oh * OW + q] = zero;
}

/// Whether the output grid equals the input grid shifted per tap: stride 1 and "same"
/// padding (OH = H, OW = W). Then tap (i, j) of every output position reads the input at a
/// fixed offset, and a row of the unfolded matrix is one contiguous copy of the plane.
constexpr bool shifted_taps(const conv_geometry& g) noexcept {
  return g.stride.h == 1 && g.stride.w == 1 && g.out_height == g.height && g.out_width == g.width;
}

/// Unfolds one sample x (C, H, W) into col (C*kh*kw, OH*OW): row (c, i, j) holds the input
/// that tap (i, j) of every output position reads, zero where it falls in the padding.
template <class T>
void im2col(const T* x, T* col, const conv_geometry& g) {
  const index_t H = g.height, W = g.width, OW = g.out_width, P = g.out_plane(), plane = H * W;
  const index_t kh = g.kernel.h, kw = g.kernel.w, sh = g.stride.h, sw = g.stride.w, ph = g.padding.h, pw = g.padding.w;
  const T zero = static_cast<T>(0.0f);
  const bool shifted = shifted_taps(g);
  for (index_t c = 0; c < g.channels; ++c) {
    const T* xc = x + c * plane;
    for (index_t i = 0; i < kh; ++i) {
      const span rows = valid_positions(i, ph, sh, H, g.out_height);
      for (index_t j = 0; j < kw; ++j) {
        T* row = col + ((c * kh + i) * kw + j) * P;
        const span cols = valid_positions(j, pw, sw, W, OW);
        if (shifted) {
          // One copy of the rows in range (clipped to the plane), then the columns that
          // wrapped around into a neighbouring row are cleared.
          const index_t d = (i - ph) * W + (j - pw);
          const index_t s0 = std::max(rows.lo * OW, -d), s1 = std::max(s0, std::min(rows.hi * OW, plane - d));
          std::fill(row, row + s0, zero);
          std::memcpy(static_cast<void*>(row + s0), xc + s0 + d, static_cast<std::size_t>(s1 - s0) * sizeof(T));
          std::fill(row + s1, row + P, zero);
          clear_columns(row, rows, cols, OW);
          continue;
        }
        const index_t len = cols.hi - cols.lo;
        std::fill(row, row + rows.lo * OW, zero);
        for (index_t oh = rows.lo; oh < rows.hi; ++oh) {
          T* r = row + oh * OW + cols.lo;
          const T* xr = xc + (oh * sh - ph + i) * W + (cols.lo * sw - pw + j);
          if (sw == 1) {
            for (index_t q = 0; q < len; ++q) r[q] = xr[q];
          } else {
            for (index_t q = 0; q < len; ++q) r[q] = xr[q * sw];
          }
        }
        clear_columns(row, rows, cols, OW);
        std::fill(row + rows.hi * OW, row + P, zero);
      }
    }
  }
}

/// The adjoint of im2col: dx (C, H, W) = the sum of every element of col (C*kh*kw, OH*OW)
/// at the input position it was read from. col is scratch: its elements that fall in the
/// padding may be overwritten.
template <class T>
void col2im(T* col, T* dx, const conv_geometry& g) {
  const index_t H = g.height, W = g.width, OW = g.out_width, P = g.out_plane(), plane = H * W;
  const index_t kh = g.kernel.h, kw = g.kernel.w, sh = g.stride.h, sw = g.stride.w, ph = g.padding.h, pw = g.padding.w;
  const bool shifted = shifted_taps(g);
  // With shifted taps and an odd window, the centre tap covers every position once and
  // is stored first instead of clearing dx.
  const bool centre = shifted && kh == 2 * ph + 1 && kw == 2 * pw + 1;
  for (index_t c = 0; c < g.channels; ++c) {
    T* xc = dx + c * plane;
    if (centre) {
      const T* row = col + ((c * kh + ph) * kw + pw) * P;
      std::memcpy(static_cast<void*>(xc), row, static_cast<std::size_t>(plane) * sizeof(T));
    } else {
      std::fill(xc, xc + plane, T(0));
    }
    for (index_t i = 0; i < kh; ++i) {
      const span rows = valid_positions(i, ph, sh, H, g.out_height);
      for (index_t j = 0; j < kw; ++j) {
        if (centre && i == ph && j == pw) continue;
        T* row = col + ((c * kh + i) * kw + j) * P;
        const span cols = valid_positions(j, pw, sw, W, OW);
        if (shifted) {
          // Clear the columns that would wrap into a neighbouring row, then add the rows in
          // range (clipped to the plane) as one span.
          clear_columns(row, rows, cols, OW);
          const index_t d = (i - ph) * W + (j - pw);
          const index_t s0 = std::max(rows.lo * OW, -d), s1 = std::min(rows.hi * OW, plane - d);
          T* xd = xc + d;
          TRIDENT_SIMD()
          for (index_t p = s0; p < s1; ++p) xd[p] += row[p];
          continue;
        }
        const index_t len = cols.hi - cols.lo;
        for (index_t oh = rows.lo; oh < rows.hi; ++oh) {
          const T* r = row + oh * OW + cols.lo;
          T* xr = xc + (oh * sh - ph + i) * W + (cols.lo * sw - pw + j);
          if (sw == 1) {
            TRIDENT_SIMD()
            for (index_t q = 0; q < len; ++q) xr[q] += r[q];
          } else {
            for (index_t q = 0; q < len; ++q) xr[q * sw] += r[q];
          }
        }
      }
    }
  }
}

/// out[i] = f(in[i]) for n elements, computing in C: float and double are read and written
/// directly; 2-byte types are widened and narrowed a chunk at a time.
template <class C, class T, class F>
void map_plane(const T* in, T* out, index_t n, F&& f) {
  if constexpr (std::is_same_v<T, C>) {
    TRIDENT_SIMD()
    for (index_t i = 0; i < n; ++i) out[i] = f(in[i]);
  } else {
    constexpr index_t chunk = cpu_kernels::convert_chunk;
    alignas(64) C a[chunk];
    alignas(64) C b[chunk];
    for (index_t s = 0; s < n; s += chunk) {
      const index_t m = std::min(chunk, n - s);
      const C* p = cpu_kernels::widen<C>(in + s, a, m);
      TRIDENT_SIMD()
      for (index_t i = 0; i < m; ++i) b[i] = f(p[i]);
      cpu_kernels::narrow(b, out + s, m);
    }
  }
}

/// out[i] = f(a[i], b[i]) for n elements, computing in C (see map_plane).
template <class C, class T, class F>
void zip_plane(const T* a, const T* b, T* out, index_t n, F&& f) {
  if constexpr (std::is_same_v<T, C>) {
    TRIDENT_SIMD()
    for (index_t i = 0; i < n; ++i) out[i] = f(a[i], b[i]);
  } else {
    constexpr index_t chunk = cpu_kernels::convert_chunk;
    alignas(64) C wa[chunk];
    alignas(64) C wb[chunk];
    alignas(64) C r[chunk];
    for (index_t s = 0; s < n; s += chunk) {
      const index_t m = std::min(chunk, n - s);
      const C* pa = cpu_kernels::widen<C>(a + s, wa, m);
      const C* pb = cpu_kernels::widen<C>(b + s, wb, m);
      TRIDENT_SIMD()
      for (index_t i = 0; i < m; ++i) r[i] = f(pa[i], pb[i]);
      cpu_kernels::narrow(r, out + s, m);
    }
  }
}

/// Sums over n elements in double: blocks of up to convert_chunk elements are summed in the
/// compute type with SIMD (2-byte types widened first), the block sums in double.
template <class T, class F>
double block_sum(const T* a, index_t n, F&& f) {
  using C = cpu_kernels::compute_of<T>;
  alignas(64) C buf[cpu_kernels::convert_chunk];
  double total = 0;
  for (index_t s = 0; s < n; s += cpu_kernels::convert_chunk) {
    const index_t m = std::min(cpu_kernels::convert_chunk, n - s);
    const C* p = cpu_kernels::widen<C>(a + s, buf, m);
    C acc = 0;
    TRIDENT_SIMD(reduction(+ : acc))
    for (index_t i = 0; i < m; ++i) acc += f(p[i]);
    total += static_cast<double>(acc);
  }
  return total;
}

/// sum(d) and sum(d * (x - mean)) over n elements, as block_sum.
template <class T>
void block_sums_2(const T* d, const T* x, index_t n, double mean, double& sd, double& sdx) {
  using C = cpu_kernels::compute_of<T>;
  alignas(64) C bd[cpu_kernels::convert_chunk];
  alignas(64) C bx[cpu_kernels::convert_chunk];
  const C m0 = static_cast<C>(mean);
  for (index_t s = 0; s < n; s += cpu_kernels::convert_chunk) {
    const index_t m = std::min(cpu_kernels::convert_chunk, n - s);
    const C* pd = cpu_kernels::widen<C>(d + s, bd, m);
    const C* px = cpu_kernels::widen<C>(x + s, bx, m);
    C a = 0, b = 0;
    TRIDENT_SIMD(reduction(+ : a, b))
    for (index_t i = 0; i < m; ++i) {
      a += pd[i];
      b += pd[i] * (px[i] - m0);
    }
    sd += static_cast<double>(a);
    sdx += static_cast<double>(b);
  }
}

/// Threads for n independent items (1 inside a parallel region or without OpenMP).
inline int threads_for(index_t n) noexcept {
  return static_cast<int>(std::max<index_t>(1, std::min<index_t>(cpu_kernels::available_threads(), n)));
}

/// Calls body(item, thread) for every item in [0, n) on `threads` threads, which take items
/// one at a time from a shared counter: on a shared machine a thread that is held up just
/// takes fewer. With one thread the items run on the caller, outside any parallel region
/// (so that a GEMM inside may thread itself).
template <class F>
void dynamic_for(index_t n, int threads, F&& body) {
#if defined(_OPENMP)
  if (threads > 1 && n > 1) {
    std::atomic<index_t> next{0};
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num();
      for (index_t i = next.fetch_add(1, std::memory_order_relaxed); i < n; i = next.fetch_add(1, std::memory_order_relaxed)) {
        body(i, t);
      }
    }
    return;
  }
#endif
  (void)threads;
  for (index_t i = 0; i < n; ++i) body(i, 0);
}

/// Threads for_chunks uses on n items in chunks of `grain`.
inline int chunk_threads(index_t n, index_t grain) noexcept { return threads_for((n + grain - 1) / grain); }

/// Calls f(begin, end, thread) on the chunks [c*grain, (c+1)*grain) of [0, n), handed out
/// to threads one at a time (see dynamic_for). For loops without reductions.
template <class F>
void for_chunks(index_t n, index_t grain, F&& f) {
  const index_t chunks = (n + grain - 1) / grain;
  dynamic_for(chunks, threads_for(chunks), [&](index_t c, int t) { f(c * grain, std::min(n, (c + 1) * grain), t); });
}

/// Blocks of samples whose weight gradients are summed separately (and merged in block
/// order, so the result does not depend on which thread took which block): about 8 samples
/// each, at most 16 MiB of partial sums in all, at least one per thread.
inline index_t reduction_blocks(index_t batch, index_t bytes_per_block, int threads) noexcept {
  const index_t by_batch = (batch + 7) / 8;
  const index_t by_memory = std::max<index_t>(1, (index_t{16} << 20) / std::max<index_t>(1, bytes_per_block));
  return std::max<index_t>(1, std::min(batch, std::max<index_t>(std::min(by_batch, by_memory), threads)));
}

/// The largest plane (H * W) the 2x2 max pool widens at once for 2-byte types.
inline constexpr index_t pool_plane = 4096;

/// One output row of a 2x2, stride-2 max pool from input rows r0 and r1 (float): y[o] = the
/// first largest of r0[2o], r0[2o+1], r1[2o], r1[2o+1] (a NaN replacing it wherever one
/// comes, as PyTorch's comparison does), idx[o] its position base + 2o + {0, 1, W, W+1}.
inline void max_pool_2x2_row(const float* r0, const float* r1, index_t n, float* y, std::int32_t* idx, std::int32_t base,
                             std::int32_t w) noexcept {
  index_t o = 0;
#if defined(TRIDENT_HAS_AVX512)
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512i one = _mm512_set1_epi32(1), kw = _mm512_set1_epi32(w), kw1 = _mm512_set1_epi32(w + 1);
  for (; o < n; o += 16) {
    const index_t m = std::min<index_t>(16, n - o), in = 2 * m;
    const auto lo = static_cast<__mmask16>(in >= 16 ? 0xFFFFu : (1u << in) - 1u);
    const auto hi = static_cast<__mmask16>(in >= 32 ? 0xFFFFu : in > 16 ? (1u << (in - 16)) - 1u : 0u);
    const auto out = static_cast<__mmask16>(m >= 16 ? 0xFFFFu : (1u << m) - 1u);
    const __m512 p0 = _mm512_maskz_loadu_ps(lo, r0 + 2 * o), p1 = _mm512_maskz_loadu_ps(hi, r0 + 2 * o + 16);
    const __m512 q0 = _mm512_maskz_loadu_ps(lo, r1 + 2 * o), q1 = _mm512_maskz_loadu_ps(hi, r1 + 2 * o + 16);
    const __m512 a = _mm512_permutex2var_ps(p0, even, p1), b = _mm512_permutex2var_ps(p0, odd, p1);
    const __m512 c = _mm512_permutex2var_ps(q0, even, q1), d = _mm512_permutex2var_ps(q0, odd, q1);
    __m512 best = a;
    __m512i k = _mm512_setzero_si512();
    __mmask16 t = _mm512_cmp_ps_mask(b, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q);
    best = _mm512_mask_mov_ps(best, t, b);
    k = _mm512_mask_mov_epi32(k, t, one);
    t = _mm512_cmp_ps_mask(c, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(c, c, _CMP_UNORD_Q);
    best = _mm512_mask_mov_ps(best, t, c);
    k = _mm512_mask_mov_epi32(k, t, kw);
    t = _mm512_cmp_ps_mask(d, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q);
    best = _mm512_mask_mov_ps(best, t, d);
    k = _mm512_mask_mov_epi32(k, t, kw1);
    const __m512i pos = _mm512_add_epi32(_mm512_add_epi32(_mm512_set1_epi32(base + static_cast<std::int32_t>(2 * o)), even), k);
    _mm512_mask_storeu_ps(y + o, out, best);
    _mm512_mask_storeu_epi32(idx + o, out, pos);
  }
#endif
  for (; o < n; ++o) {
    const float a = r0[2 * o], b = r0[2 * o + 1], c = r1[2 * o], d = r1[2 * o + 1];
    float m = a;
    std::int32_t k = 0;
    if (b > m || std::isnan(b)) m = b, k = 1;
    if (c > m || std::isnan(c)) m = c, k = w;
    if (d > m || std::isnan(d)) m = d, k = w + 1;
    y[o] = m;
    idx[o] = base + static_cast<std::int32_t>(2 * o) + k;
  }
}

/// Planes of at least ~16K elements per thread.
inline index_t plane_grain(index_t plane) noexcept { return std::max<index_t>(1, 16384 / std::max<index_t>(plane, 1)); }

/// One window of a pooling layer: its clamped rows [h0, h1) and columns [w0, w1), and the
/// size of the unclamped window within the padded input (count_include_pad's divisor).
struct window {
  index_t h0, h1, w0, w1, padded_size;
};
inline window window_at(const conv_geometry& g, index_t oh, index_t ow) noexcept {
  index_t h0 = oh * g.stride.h - g.padding.h, w0 = ow * g.stride.w - g.padding.w;
  index_t h1 = std::min(h0 + g.kernel.h, g.height + g.padding.h), w1 = std::min(w0 + g.kernel.w, g.width + g.padding.w);
  const index_t padded = (h1 - h0) * (w1 - w0);
  h0 = std::max<index_t>(h0, 0);
  w0 = std::max<index_t>(w0, 0);
  h1 = std::min(h1, g.height);
  w1 = std::min(w1, g.width);
  return {h0, h1, w0, w1, padded};
}

}  // namespace conv_cpu

template <>
struct conv_kernels<cpu> {
  template <class T>
  using view = tensor_view<T, cpu>;

  // --- convolution ---------------------------------------------------------------------

  /// y (N, C_out, OH, OW) = act(conv(x (N, C_in, H, W), w (C_out, C_in, kh, kw)) + bias);
  /// act is none or relu.
  template <class S>
  static void conv2d_forward(arena<cpu>& mem, view<S> y, view<const S> x, view<const S> w, view<const S> bias,
                             const conv_geometry& g, activation act) {
    using A = cpu_kernels::compute_of<S>;
    constexpr bool same = std::is_same_v<S, A>;
    const index_t K = g.patch(), P = g.out_plane(), Co = g.out_channels, in_sample = g.channels * g.in_plane();
    if (g.batch == 0 || P == 0) return;
    const int threads = conv_cpu::threads_for(g.batch);
    const bool direct = g.pointwise(), relu = act == activation::relu;
    const auto col = conv_cpu::take<S>(mem, direct ? 0 : K * P, threads);
    const auto acc = conv_cpu::take<A>(mem, same ? 0 : Co * P, threads);
    A* b = nullptr;
    if (!bias.empty()) {
      b = conv_cpu::take<A>(mem, Co, 1)[0];
      for (index_t co = 0; co < Co; ++co) b[co] = cpu_kernels::load<S, A>(bias.data()[co]);
    }
    conv_cpu::dynamic_for(g.batch, threads, [&](index_t n, int t) {
      const S* xn = x.data() + n * in_sample;
      const S* src = xn;
      if (!direct) {
        conv_cpu::im2col(xn, col[t], g);
        src = col[t];
      }
      S* yn = y.data() + n * Co * P;
      A* c;
      if constexpr (same) {
        c = yn;
      } else {
        c = acc[t];
      }
      cpu_kernels::gemm(false, false, Co, P, K, A(1), w.data(), K, src, P, A(0), c, P);
      if (b || relu) {
        for (index_t co = 0; co < Co; ++co) {
          A* row = c + co * P;
          const A v = b ? b[co] : A(0);
          if (relu) {
            TRIDENT_SIMD()
            for (index_t p = 0; p < P; ++p) row[p] = std::max(row[p] + v, A(0));
          } else {
            TRIDENT_SIMD()
            for (index_t p = 0; p < P; ++p) row[p] += v;
          }
        }
      }
      if constexpr (!same) cpu_kernels::narrow(c, yn, Co * P);
    });
  }

  /// Backward of conv2d_forward (y is its output, read when act is relu): dw += dz x^T per
  /// sample, db += the sums of dz, dx = col2im(w^T dz) (skipped when dx is empty), where dz
  /// is dy through the activation's derivative.
  template <class S, class G>
  static void conv2d_backward(arena<cpu>& mem, view<S> dx, view<G> dw, view<G> db, view<const S> dy, view<const S> y,
                              view<const S> x, view<const S> w, const conv_geometry& g, activation act) {
    using A = cpu_kernels::compute_of<S>;
    constexpr bool same = std::is_same_v<S, A>;
    const index_t K = g.patch(), P = g.out_plane(), Co = g.out_channels, in_sample = g.channels * g.in_plane();
    const bool want_dx = !dx.empty(), want_db = !db.empty(), relu = act == activation::relu;
    if (g.batch == 0) return;
    if (P == 0) {
      if (want_dx) std::fill(dx.data(), dx.data() + dx.numel(), static_cast<S>(0.0f));
      return;
    }
    const int threads = conv_cpu::threads_for(g.batch);
    const bool direct = g.pointwise();
    // Per thread: the unfolded sample, dz, w^T dz (for a pointwise window: dx itself, in
    // A) and the input gradient in A before it is narrowed.
    const auto col = conv_cpu::take<S>(mem, direct ? 0 : K * P, threads);
    const auto dz = conv_cpu::take<S>(mem, relu ? Co * P : 0, threads);
    const auto dcol = conv_cpu::take<A>(mem, want_dx && !(direct && same) ? K * P : 0, threads);
    const auto dxacc = conv_cpu::take<A>(mem, want_dx && !same && !direct ? in_sample : 0, threads);
    // Per block of samples: the weight (transposed) and bias gradients, merged in block order after.
    const index_t blocks = conv_cpu::reduction_blocks(g.batch, Co * K * static_cast<index_t>(sizeof(A)), threads);
    const index_t per_block = (g.batch + blocks - 1) / blocks;
    const auto dwb = conv_cpu::take<A>(mem, Co * K, blocks);
    const auto dbb = conv_cpu::take<double>(mem, want_db ? Co : 0, blocks);
    // w^T (K, C_out), so that the input-gradient GEMM reads both operands row-major.
    S* wt = nullptr;
    if (want_dx) {
      wt = conv_cpu::take<S>(mem, K * Co, 1)[0];
      for (index_t co = 0; co < Co; ++co)
        for (index_t k = 0; k < K; ++k) wt[k * Co + co] = w.data()[co * K + k];
    }
    conv_cpu::dynamic_for(blocks, threads, [&](index_t blk, int t) {
      const index_t n0 = blk * per_block, n1 = std::min(g.batch, n0 + per_block);
      if (want_db) std::fill(dbb[blk], dbb[blk] + Co, 0.0);
      if (n0 >= n1) std::fill(dwb[blk], dwb[blk] + Co * K, A(0));
      for (index_t n = n0; n < n1; ++n) {
        const S* xn = x.data() + n * in_sample;
        const S* src = xn;
        if (!direct) {
          conv_cpu::im2col(xn, col[t], g);
          src = col[t];
        }
        const S* dzn = dy.data() + n * Co * P;
        if (relu) {
          conv_cpu::zip_plane<A>(dzn, y.data() + n * Co * P, dz[t], Co * P, [](A d, A v) { return v > A(0) ? d : A(0); });
          dzn = dz[t];
        }
        // dw^T (K, C_out) += col dz^T: the wide dimension of the two becomes the GEMM's columns.
        cpu_kernels::gemm(false, true, K, Co, P, A(1), src, P, dzn, P, n == n0 ? A(0) : A(1), dwb[blk], Co);
        if (want_db) {
          for (index_t co = 0; co < Co; ++co) dbb[blk][co] += conv_cpu::block_sum(dzn + co * P, P, [](A v) { return v; });
        }
        if (!want_dx) continue;
        S* dxn = dx.data() + n * in_sample;
        A* d;
        if constexpr (same) {
          d = direct ? dxn : dcol[t];
        } else {
          d = dcol[t];
        }
        cpu_kernels::gemm(false, false, K, P, Co, A(1), wt, Co, dzn, P, A(0), d, P);
        if (direct) {
          if constexpr (!same) cpu_kernels::narrow(d, dxn, in_sample);
        } else {
          A* target;
          if constexpr (same) {
            target = dxn;
          } else {
            target = dxacc[t];
          }
          conv_cpu::col2im(d, target, g);
          if constexpr (!same) cpu_kernels::narrow(target, dxn, in_sample);
        }
      }
    });
    // Merge the blocks' sums (of dw^T) in block order.
    G* gw = dw.data();
    for (index_t k = 0; k < K; ++k) {
      for (index_t co = 0; co < Co; ++co) {
        A s = cpu_kernels::load<G, A>(gw[co * K + k]);
        for (index_t b = 0; b < blocks; ++b) s += dwb[b][k * Co + co];
        gw[co * K + k] = static_cast<G>(s);
      }
    }
    if (want_db) {
      for (index_t co = 0; co < Co; ++co) {
        double s = cpu_kernels::load<G, double>(db.data()[co]);
        for (index_t b = 0; b < blocks; ++b) s += dbb[b][co];
        db.data()[co] = static_cast<G>(s);
      }
    }
  }

  // --- pooling -------------------------------------------------------------------------

  /// y = the maximum of each window; argmax = its position in the (H, W) plane (the first
  /// one in row-major order; a NaN wins).
  template <class S>
  static void max_pool2d_forward(view<S> y, std::int32_t* argmax, view<const S> x, const conv_geometry& g) {
    using C = cpu_kernels::compute_of<S>;
    const index_t in_plane = g.in_plane(), out_plane = g.out_plane(), OW = g.out_width, W = g.width;
    const bool fast22 = g.kernel.h == 2 && g.kernel.w == 2 && g.stride.h == 2 && g.stride.w == 2 && g.padding.h == 0 &&
                        g.padding.w == 0 && (conv_cpu::is_wide<S> || in_plane <= conv_cpu::pool_plane);
    conv_cpu::for_chunks(g.batch * g.channels, conv_cpu::plane_grain(in_plane), [&](index_t q0, index_t q1, int) {
      // 2-byte types: the plane widened to float, and the output plane before narrowing
      alignas(64) C plane_in[conv_cpu::pool_plane];
      alignas(64) C plane_out[conv_cpu::pool_plane / 4];
      for (index_t q = q0; q < q1; ++q) {
        const S* xs = x.data() + q * in_plane;
        S* ys = y.data() + q * out_plane;
        std::int32_t* is = argmax + q * out_plane;
        if constexpr (std::is_same_v<C, float>) {
          if (fast22) {
            const C* xf = cpu_kernels::widen<C>(xs, plane_in, in_plane);
            C* yf;
            if constexpr (std::is_same_v<S, C>) {
              yf = ys;
            } else {
              yf = plane_out;
            }
            for (index_t oh = 0; oh < g.out_height; ++oh) {
              conv_cpu::max_pool_2x2_row(xf + 2 * oh * W, xf + (2 * oh + 1) * W, OW, yf + oh * OW, is + oh * OW,
                                         static_cast<std::int32_t>(2 * oh * W), static_cast<std::int32_t>(W));
            }
            if constexpr (!std::is_same_v<S, C>) cpu_kernels::narrow(plane_out, ys, out_plane);
            continue;
          }
        }
        for (index_t oh = 0; oh < g.out_height; ++oh) {
          for (index_t ow = 0; ow < OW; ++ow) {
            const conv_cpu::window wd = conv_cpu::window_at(g, oh, ow);
            index_t best = wd.h0 * W + wd.w0;
            C m = -std::numeric_limits<C>::infinity();
            for (index_t ih = wd.h0; ih < wd.h1; ++ih) {
              for (index_t iw = wd.w0; iw < wd.w1; ++iw) {
                const C v = cpu_kernels::load<S, C>(xs[ih * W + iw]);
                if (v > m || std::isnan(v)) {
                  m = v;
                  best = ih * W + iw;
                }
              }
            }
            ys[oh * OW + ow] = xs[best];
            is[oh * OW + ow] = static_cast<std::int32_t>(best);
          }
        }
      }
    });
  }

  /// dx = the output gradient sent back to each window's argmax (summed where windows overlap).
  template <class S>
  static void max_pool2d_backward(arena<cpu>& mem, view<S> dx, view<const S> dy, const std::int32_t* argmax,
                                  const conv_geometry& g) {
    const index_t out_plane = g.out_plane();
    pool_backward(mem, dx, g, [&](auto* dxs, index_t q) {
      using T = std::remove_pointer_t<decltype(dxs)>;
      const S* dys = dy.data() + q * out_plane;
      const std::int32_t* is = argmax + q * out_plane;
      for (index_t o = 0; o < out_plane; ++o) add_to(dxs[is[o]], cpu_kernels::load<S, cpu_kernels::compute_of<T>>(dys[o]));
    });
  }

  /// y = the mean of each window (padding counted in the divisor when count_include_pad).
  template <class S>
  static void avg_pool2d_forward(view<S> y, view<const S> x, const conv_geometry& g, bool count_include_pad) {
    using C = cpu_kernels::compute_of<S>;
    const index_t in_plane = g.in_plane(), out_plane = g.out_plane(), OW = g.out_width, W = g.width;
    conv_cpu::for_chunks(g.batch * g.channels, conv_cpu::plane_grain(in_plane), [&](index_t q0, index_t q1, int) {
      for (index_t q = q0; q < q1; ++q) {
        const S* xs = x.data() + q * in_plane;
        S* ys = y.data() + q * out_plane;
        for (index_t oh = 0; oh < g.out_height; ++oh) {
          for (index_t ow = 0; ow < OW; ++ow) {
            const conv_cpu::window wd = conv_cpu::window_at(g, oh, ow);
            C s = 0;
            for (index_t ih = wd.h0; ih < wd.h1; ++ih)
              for (index_t iw = wd.w0; iw < wd.w1; ++iw) s += cpu_kernels::load<S, C>(xs[ih * W + iw]);
            const index_t div = count_include_pad ? wd.padded_size : (wd.h1 - wd.h0) * (wd.w1 - wd.w0);
            ys[oh * OW + ow] = static_cast<S>(s / static_cast<C>(div));
          }
        }
      }
    });
  }

  /// dx = each output gradient spread evenly over its window.
  template <class S>
  static void avg_pool2d_backward(arena<cpu>& mem, view<S> dx, view<const S> dy, const conv_geometry& g,
                                  bool count_include_pad) {
    const index_t out_plane = g.out_plane(), OW = g.out_width, W = g.width;
    pool_backward(mem, dx, g, [&](auto* dxs, index_t q) {
      using T = std::remove_pointer_t<decltype(dxs)>;
      using C = cpu_kernels::compute_of<T>;
      const S* dys = dy.data() + q * out_plane;
      for (index_t oh = 0; oh < g.out_height; ++oh) {
        for (index_t ow = 0; ow < OW; ++ow) {
          const conv_cpu::window wd = conv_cpu::window_at(g, oh, ow);
          const index_t div = count_include_pad ? wd.padded_size : (wd.h1 - wd.h0) * (wd.w1 - wd.w0);
          const C v = cpu_kernels::load<S, C>(dys[oh * OW + ow]) / static_cast<C>(div);
          for (index_t ih = wd.h0; ih < wd.h1; ++ih)
            for (index_t iw = wd.w0; iw < wd.w1; ++iw) add_to(dxs[ih * W + iw], v);
        }
      }
    });
  }

  // --- batch normalisation -------------------------------------------------------------

  /// Batch statistics of x (N, C, ...) per channel: mean, invstd = 1/sqrt(var + eps) with
  /// the biased variance; running_mean and running_var (unbiased) move by `momentum`.
  template <class S, class St>
  static void batch_norm_train_statistics(arena<cpu>& mem, view<St> mean, view<St> invstd, view<St> running_mean,
                                          view<St> running_var, view<const S> x, index_t channels, double eps,
                                          double momentum) {
    const index_t C = channels, N = x.size(0), L = x.numel() / std::max<index_t>(1, N * C), planes = N * C;
    const index_t M = N * L;
    const index_t grain = conv_cpu::plane_grain(L);
    const int threads = cpu_kernels::chunk_count(planes, grain);
    const auto part = conv_cpu::take<double>(mem, C, threads);
    const auto mu = conv_cpu::take<double>(mem, C, 1)[0];
    auto sweep = [&](auto&& fold) {
      for (int t = 0; t < threads; ++t) std::fill(part[t], part[t] + C, 0.0);
      cpu_kernels::parallel_chunks(planes, grain, 1, [&](index_t q0, index_t q1, int t) {
        for (index_t q = q0; q < q1; ++q) part[t][q % C] += fold(x.data() + q * L, q % C);
      });
    };
    using Cm = cpu_kernels::compute_of<S>;
    sweep([&](const S* p, index_t) { return conv_cpu::block_sum(p, L, [](Cm v) { return v; }); });
    for (index_t c = 0; c < C; ++c) {
      double s = 0;
      for (int t = 0; t < threads; ++t) s += part[t][c];
      mu[c] = s / static_cast<double>(M);
    }
    sweep([&](const S* p, index_t c) {
      const Cm m = static_cast<Cm>(mu[c]);
      return conv_cpu::block_sum(p, L, [=](Cm v) { return (v - m) * (v - m); });
    });
    const double unbias = static_cast<double>(M) / static_cast<double>(std::max<index_t>(1, M - 1));
    for (index_t c = 0; c < C; ++c) {
      double s = 0;
      for (int t = 0; t < threads; ++t) s += part[t][c];
      const double var = s / static_cast<double>(M);
      mean.data()[c] = static_cast<St>(mu[c]);
      invstd.data()[c] = static_cast<St>(1.0 / std::sqrt(var + eps));
      running_mean.data()[c] =
          static_cast<St>((1.0 - momentum) * static_cast<double>(running_mean.data()[c]) + momentum * mu[c]);
      running_var.data()[c] =
          static_cast<St>((1.0 - momentum) * static_cast<double>(running_var.data()[c]) + momentum * var * unbias);
    }
  }

  /// mean = running_mean, invstd = 1/sqrt(running_var + eps).
  template <class St>
  static void batch_norm_eval_statistics(view<St> mean, view<St> invstd, view<St> running_mean, view<St> running_var,
                                         double eps) {
    for (index_t c = 0; c < mean.numel(); ++c) {
      mean.data()[c] = running_mean.data()[c];
      invstd.data()[c] = static_cast<St>(1.0 / std::sqrt(static_cast<double>(running_var.data()[c]) + eps));
    }
  }

  /// y = (x - mean) * invstd * gamma + beta per channel of x (N, C, ...).
  template <class S, class St>
  static void batch_norm_normalize(view<S> y, view<const S> x, view<const St> mean, view<const St> invstd,
                                   view<const S> gamma, view<const S> beta, index_t channels) {
    using Cm = cpu_kernels::compute_of<S>;
    const index_t C = channels, N = x.size(0), L = x.numel() / std::max<index_t>(1, N * C);
    conv_cpu::for_chunks(N * C, conv_cpu::plane_grain(L), [&](index_t q0, index_t q1, int) {
      for (index_t q = q0; q < q1; ++q) {
        const index_t c = q % C;
        const double a = static_cast<double>(invstd.data()[c]) * cpu_kernels::load<S, double>(gamma.data()[c]);
        const Cm scale = static_cast<Cm>(a);
        const Cm shift = static_cast<Cm>(cpu_kernels::load<S, double>(beta.data()[c]) - static_cast<double>(mean.data()[c]) * a);
        conv_cpu::map_plane<Cm>(x.data() + q * L, y.data() + q * L, L, [=](Cm v) { return v * scale + shift; });
      }
    });
  }

  /// Backward of batch_norm_normalize. With batch statistics, the gradient flows through
  /// the mean and variance too: dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat));
  /// with running statistics, dx = gamma * invstd * dy. dgamma += sum(dy * xhat), dbeta += sum(dy).
  template <class S, class G, class St>
  static void batch_norm_backward(arena<cpu>& mem, view<S> dx, view<G> dgamma, view<G> dbeta, view<const S> dy,
                                  view<const S> x, view<const St> mean, view<const St> invstd, view<const S> gamma,
                                  index_t channels, bool batch_statistics) {
    using Cm = cpu_kernels::compute_of<S>;
    const index_t C = channels, N = x.size(0), L = x.numel() / std::max<index_t>(1, N * C), planes = N * C;
    const double M = static_cast<double>(N * L);
    const index_t grain = conv_cpu::plane_grain(L);
    const int threads = cpu_kernels::chunk_count(planes, grain);
    const auto s1 = conv_cpu::take<double>(mem, C, threads);  // sum dy
    const auto s2 = conv_cpu::take<double>(mem, C, threads);  // sum dy * (x - mean)
    for (int t = 0; t < threads; ++t) {
      std::fill(s1[t], s1[t] + C, 0.0);
      std::fill(s2[t], s2[t] + C, 0.0);
    }
    cpu_kernels::parallel_chunks(planes, grain, 1, [&](index_t q0, index_t q1, int t) {
      for (index_t q = q0; q < q1; ++q) {
        const index_t c = q % C;
        conv_cpu::block_sums_2(dy.data() + q * L, x.data() + q * L, L, static_cast<double>(mean.data()[c]), s1[t][c], s2[t][c]);
      }
    });
    const auto k = conv_cpu::take<double>(mem, 3 * C, 1)[0];  // per channel: dy, (x - mean) and constant coefficients
    for (index_t c = 0; c < C; ++c) {
      double a = 0, b = 0;
      for (int t = 0; t < threads; ++t) {
        a += s1[t][c];
        b += s2[t][c];
      }
      const double is = static_cast<double>(invstd.data()[c]);
      const double gm = cpu_kernels::load<S, double>(gamma.data()[c]);
      dbeta.data()[c] = static_cast<G>(cpu_kernels::load<G, double>(dbeta.data()[c]) + a);
      dgamma.data()[c] = static_cast<G>(cpu_kernels::load<G, double>(dgamma.data()[c]) + b * is);
      k[3 * c] = gm * is;
      k[3 * c + 1] = batch_statistics ? -gm * is * is * is * b / M : 0.0;
      k[3 * c + 2] = batch_statistics ? -gm * is * a / M : 0.0;
    }
    conv_cpu::for_chunks(planes, grain, [&](index_t q0, index_t q1, int) {
      for (index_t q = q0; q < q1; ++q) {
        const index_t c = q % C;
        const Cm k0 = static_cast<Cm>(k[3 * c]), k1 = static_cast<Cm>(k[3 * c + 1]), k2 = static_cast<Cm>(k[3 * c + 2]);
        const Cm m = static_cast<Cm>(mean.data()[c]);
        conv_cpu::zip_plane<Cm>(dy.data() + q * L, x.data() + q * L, dx.data() + q * L, L,
                                [=](Cm d, Cm v) { return d * k0 + (v - m) * k1 + k2; });
      }
    });
  }

 private:
  template <class T, class C>
  static void add_to(T& dst, C v) noexcept {
    dst = static_cast<T>(cpu_kernels::load<T, C>(dst) + v);
  }

  /// Runs `scatter(dx_plane, q)` for each (sample, channel) plane q, on a cleared plane:
  /// dx's own when it can accumulate exactly (float, double, or windows that do not
  /// overlap), else a per-thread plane of the compute type, narrowed into dx after.
  template <class S, class F>
  static void pool_backward(arena<cpu>& mem, view<S> dx, const conv_geometry& g, F&& scatter) {
    using C = cpu_kernels::compute_of<S>;
    const index_t in_plane = g.in_plane(), planes = g.batch * g.channels, grain = conv_cpu::plane_grain(in_plane);
    const bool direct = conv_cpu::is_wide<S> || g.disjoint();
    const int threads = conv_cpu::chunk_threads(planes, grain);
    const auto scratch = conv_cpu::take<C>(mem, direct ? 0 : in_plane, threads);
    conv_cpu::for_chunks(planes, grain, [&](index_t q0, index_t q1, int t) {
      for (index_t q = q0; q < q1; ++q) {
        S* dxs = dx.data() + q * in_plane;
        if (direct) {
          std::fill(dxs, dxs + in_plane, static_cast<S>(0.0f));
          scatter(dxs, q);
        } else {
          C* acc = scratch[t];
          std::fill(acc, acc + in_plane, C(0));
          scatter(acc, q);
          cpu_kernels::narrow(acc, dxs, in_plane);
        }
      }
    });
  }
};

}  // namespace trident::nn
