#pragma once
/// @file backend/cpu/kernels.hpp
/// kernels<cpu>: the CPU implementation of the kernel table declared in core/kernels.hpp.
/// Loops over strided operands first merge the dimensions they can, so that the common
/// cases (contiguous, or contiguous with a broadcast operand) become one flat loop that the
/// compiler vectorises; 2-byte types go through the SIMD conversions in chunks.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

#include "../../core/kernels.hpp"
#include "../../core/rng.hpp"
#include "../../core/tensor.hpp"
#include "../../ops/functors.hpp"
#include "../../precision/convert.hpp"
#include "device.hpp"
#include "gemm.hpp"
#include "intrinsics.hpp"
#include "parallel.hpp"

namespace trident {

namespace cpu_kernels {

/// Elements below which a loop stays on one thread (thread start-up costs ~µs).
inline constexpr index_t parallel_grain = 32768;
/// Elements converted at a time when 2-byte operands are widened to float.
inline constexpr index_t convert_chunk = 512;

/// Operands of one loop with their dimensions merged: extents and one stride row per operand.
template <int N>
struct loop_plan {
  int rank = 0;
  index_t ext[max_rank]{};
  index_t st[N][max_rank]{};
};

/// Drops extent-1 dimensions and merges adjacent ones that every operand steps through
/// contiguously. An empty shape gives rank 0 with numel() == 0 handled by the caller.
template <int N>
loop_plan<N> make_plan(const shape& s, const strides* const (&st)[N]) {
  loop_plan<N> p;
  for (int d = 0; d < s.rank(); ++d) {
    if (s[d] == 1) continue;
    const int r = p.rank;
    bool merge = r > 0;
    for (int k = 0; k < N && merge; ++k) merge = p.st[k][r - 1] == (*st[k])[d] * s[d];
    if (merge) {
      p.ext[r - 1] *= s[d];
      for (int k = 0; k < N; ++k) p.st[k][r - 1] = (*st[k])[d];
    } else {
      p.ext[r] = s[d];
      for (int k = 0; k < N; ++k) p.st[k][r] = (*st[k])[d];
      ++p.rank;
    }
  }
  if (p.rank == 0) {  // a single element
    p.rank = 1;
    p.ext[0] = 1;
    for (int k = 0; k < N; ++k) p.st[k][0] = 1;
  }
  return p;
}

/// Runs span(offsets[N], count) over every innermost row of the plan, spread over threads.
/// `offsets[k]` is operand k's element offset of the span's first element; along the span
/// operand k steps by plan.st[k][rank-1]. When there are fewer rows than threads (a flat
/// array is one row), rows are cut into pieces so that every thread gets work.
template <int N, class Span>
void for_each_span(const loop_plan<N>& p, Span&& span) {
  const int r = p.rank;
  const index_t inner = p.ext[r - 1];
  index_t rows = 1;
  for (int d = 0; d < r - 1; ++d) rows *= p.ext[d];
  const index_t threads = available_threads();
  index_t pieces = 1;
  if (rows < threads && rows * inner >= 2 * parallel_grain) {
    pieces = std::min<index_t>((threads + rows - 1) / rows, std::max<index_t>(1, inner / 4096));
  }
  const index_t piece = (inner + pieces - 1) / pieces;
  const index_t piece_len = (piece + 15) / 16 * 16;  // cache-line multiples for fp32
  const index_t items = rows * pieces;
  const index_t grain = std::max<index_t>(1, parallel_grain / std::max<index_t>(pieces > 1 ? piece_len : inner, 1));
  parallel_chunks(items, grain, 1, [&](index_t begin, index_t end, int) {
    for (index_t w = begin; w < end; ++w) {
      const index_t q = w / pieces, j = w % pieces;
      const index_t first = j * piece_len;
      if (first >= inner) continue;
      const index_t count = std::min(piece_len, inner - first);
      index_t off[N] = {};
      index_t rem = q;
      for (int d = r - 2; d >= 0; --d) {
        const index_t i = rem % p.ext[d];
        rem /= p.ext[d];
        for (int k = 0; k < N; ++k) off[k] += i * p.st[k][d];
      }
      for (int k = 0; k < N; ++k) off[k] += first * p.st[k][r - 1];
      span(off, count);
    }
  });
}

template <class T>
inline constexpr bool is_wide_v = std::is_same_v<std::remove_const_t<T>, float> || std::is_same_v<std::remove_const_t<T>, double>;

/// Loads n elements at unit stride as compute type C into buf (or points at them directly).
template <class C, class T>
TRIDENT_ALWAYS_INLINE const C* widen(const T* p, C* buf, index_t n) noexcept {
  if constexpr (std::is_same_v<std::remove_const_t<T>, C>) {
    return p;
  } else if constexpr (std::is_same_v<C, float> && !is_wide_v<T>) {
    simd::convert(p, buf, static_cast<std::size_t>(n));
    return buf;
  } else {
    for (index_t i = 0; i < n; ++i) buf[i] = static_cast<C>(static_cast<float>(p[i]));
    return buf;
  }
}

/// Stores n compute values to a unit-stride destination of element type T.
template <class T, class C>
TRIDENT_ALWAYS_INLINE void narrow(const C* buf, T* p, index_t n) noexcept {
  if constexpr (std::is_same_v<C, float> && !is_wide_v<T>) {
    simd::convert(buf, p, static_cast<std::size_t>(n));
  } else {
    for (index_t i = 0; i < n; ++i) p[i] = static_cast<T>(buf[i]);
  }
}

template <class T, class C>
TRIDENT_ALWAYS_INLINE C load(const T& x) noexcept {
  if constexpr (is_wide_v<T>) {
    return static_cast<C>(x);
  } else {
    return static_cast<C>(static_cast<float>(x));
  }
}

/// The compute type for a set of element types: double if any is double, else float.
template <class... T>
using compute_of = std::conditional_t<(std::is_same_v<std::remove_const_t<T>, double> || ...), double, float>;

/// Folds n contiguous values into a double with a sum-like reducer (fold(acc, x) built
/// from + and *). Floats are folded in float over blocks of 1024 (64 lanes, so each lane
/// adds only 16 values), and the block results in double: as accurate as double
/// accumulation for all practical purposes, and light enough in instructions to keep up
/// with memory bandwidth, which converting every element to double does not.
template <class Reducer, class T>
double dense_fold(const Reducer& red, const T* x, index_t n) noexcept {
  constexpr int lanes = 64;
  double part[lanes];
  for (double& v : part) v = red.template init<double>();
  index_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    constexpr index_t block = 1024;
    for (; i + block <= n; i += block) {
      float f[lanes];
      for (float& v : f) v = red.template init<float>();
      for (index_t b = 0; b < block; b += lanes) {
        // Two blocks ahead, one line per 16 floats: the hardware prefetcher alone leaves
        // a single read stream per thread short of the bandwidth.
        for (int l = 0; l < lanes; l += 16) __builtin_prefetch(x + i + 2 * block + b + l);
        TRIDENT_SIMD()
        for (int j = 0; j < lanes; ++j) f[j] = red.fold(f[j], x[i + b + j]);
      }
      for (int j = 0; j < lanes; ++j) part[j] = red.merge(part[j], static_cast<double>(f[j]));
    }
  }
  for (; i + lanes <= n; i += lanes) {
    TRIDENT_SIMD()
    for (int j = 0; j < lanes; ++j) part[j] = red.fold(part[j], static_cast<double>(x[i + j]));
  }
  double acc = red.template init<double>();
  for (; i < n; ++i) acc = red.fold(acc, static_cast<double>(x[i]));
  for (double v : part) acc = red.merge(acc, v);
  return acc;
}

/// Output size from which element-wise kernels write with non-temporal (streaming) stores:
/// beyond the caches, they save the read-for-ownership of every destination line.
inline constexpr std::size_t streaming_threshold = std::size_t{16} << 20;

/// Copies `bytes` from a cache-hot buffer to dst, with streaming stores on the 64-byte
/// aligned part when the target has AVX-512 (ends with the sfence that orders them).
inline void stream_store(void* dst, const void* src, std::size_t bytes) noexcept {
#if defined(TRIDENT_HAS_AVX512)
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
  const std::size_t head = std::min<std::size_t>(bytes, (64 - reinterpret_cast<std::uintptr_t>(d) % 64) % 64);
  std::memcpy(d, s, head);
  d += head;
  s += head;
  bytes -= head;
  for (; bytes >= 64; bytes -= 64, d += 64, s += 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d), _mm512_loadu_si512(s));
  }
  std::memcpy(d, s, bytes);
  _mm_sfence();
#else
  std::memcpy(dst, src, bytes);
#endif
}

/// How a dense span reads an input of element type T: bfloat16 is widened inside the
/// compute loop (a shift, which vectorises with it); half goes through the F16C conversion
/// into a buffer of the compute type first; float and double are read as they are.
template <class C, class T>
using lane_source_t = std::conditional_t<std::is_same_v<std::remove_const_t<T>, half>, C, std::remove_const_t<T>>;

template <class C, class U>
TRIDENT_ALWAYS_INLINE C lane(const U* p, index_t i) noexcept {
  if constexpr (std::is_same_v<U, bfloat16>) {
    return static_cast<C>(trident::detail::bfloat16_bits_to_float(p[i].bits));
  } else {
    return static_cast<C>(p[i]);
  }
}

/// Chunk [c, c+m) of an input with stride 1, or 0 (a broadcast scalar, repeated into buf).
template <class C, class T>
TRIDENT_ALWAYS_INLINE const lane_source_t<C, T>* input_chunk(const T* x, index_t stride, index_t c, index_t m,
                                                             lane_source_t<C, T>* buf) noexcept {
  using U = lane_source_t<C, T>;
  if (stride == 0) {
    U v;
    if constexpr (std::is_same_v<U, std::remove_const_t<T>>) {
      v = *x;
    } else {
      v = load<T, C>(*x);
    }
    for (index_t i = 0; i < m; ++i) buf[i] = v;
    return buf;
  }
  if constexpr (std::is_same_v<U, std::remove_const_t<T>>) {
    return x + c;
  } else {
    return widen<C>(x + c, buf, m);
  }
}

/// Writes one compute value as element type T (bfloat16 rounds inline, so the compute loop
/// still vectorises).
template <class T, class C>
TRIDENT_ALWAYS_INLINE void put(T* p, index_t i, C v) noexcept {
  if constexpr (std::is_same_v<T, bfloat16>) {
    p[i].bits = trident::detail::float_to_bfloat16_bits(static_cast<float>(v));
  } else {
    p[i] = static_cast<T>(v);
  }
}

/// Element-wise ops with a hand-vectorised fp32 form, for ops whose scalar form calls libm
/// (erf, exp) and so does not vectorise: vector_form<Op>::apply(__m512...) on 16 lanes.
template <class Op>
struct vector_form {
  static constexpr bool value = false;
};
#if defined(TRIDENT_HAS_AVX512)
template <>
struct vector_form<ops::gelu> {
  static constexpr bool value = true;
  static TRIDENT_ALWAYS_INLINE __m512 apply(__m512 x) noexcept { return detail::activation_avx512(activation::gelu, x); }
};
template <>
struct vector_form<ops::gelu_backward> {
  static constexpr bool value = true;
  static TRIDENT_ALWAYS_INLINE __m512 apply(__m512 dy, __m512 x) noexcept { return detail::gelu_backward_avx512(dy, x); }
};
#endif

/// out[i] = op(in_k[i]...) over a span whose output is contiguous and whose inputs are
/// contiguous or broadcast scalars, a chunk at a time so that the loop body vectorises:
/// bfloat16 is converted inside the loop, half through F16C buffers. With `stream`, each
/// finished chunk goes to memory with non-temporal stores.
template <class C, class Op, class To, class... Ti>
void dense_span(const Op& op, To* o, index_t n, bool stream, const index_t* in_stride, const Ti*... x) {
  constexpr std::size_t K = sizeof...(Ti);
  // The loop writes D: To itself, except half, which is computed in C and narrowed after.
  using D = std::conditional_t<std::is_same_v<To, half>, C, To>;
  std::tuple<lane_source_t<C, Ti>*...> bufs;
  alignas(64) unsigned char storage[K][convert_chunk * sizeof(C)];
  [&]<std::size_t... I>(std::index_sequence<I...>) {
    ((std::get<I>(bufs) = reinterpret_cast<lane_source_t<C, Ti>*>(storage[I])), ...);
  }(std::index_sequence_for<Ti...>{});
  alignas(64) D out_buf[convert_chunk];
  alignas(64) To narrow_buf[convert_chunk];
  for (index_t c = 0; c < n; c += convert_chunk) {
    const index_t m = std::min(convert_chunk, n - c);
    const auto xs = [&]<std::size_t... I>(std::index_sequence<I...>) {
      return std::make_tuple(input_chunk<C>(x, in_stride[I], c, m, std::get<I>(bufs))...);
    }(std::index_sequence_for<Ti...>{});
    D* dst = out_buf;
    if constexpr (std::is_same_v<D, To>) {
      if (!stream) dst = o + c;
    }
    if constexpr (vector_form<Op>::value && std::is_same_v<C, float>) {
      // 16 lanes at a time through the op's hand-vectorised form, the tail element-wise.
      index_t i = 0;
      for (; i + 16 <= m; i += 16) {
        alignas(64) float in[K][16], r[16];
        [&]<std::size_t... I>(std::index_sequence<I...>) {
          ([&] {
            for (int l = 0; l < 16; ++l) in[I][l] = lane<C>(std::get<I>(xs), i + l);
          }(), ...);
          _mm512_store_ps(r, vector_form<Op>::apply(_mm512_load_ps(in[I])...));
        }(std::make_index_sequence<K>{});
        for (int l = 0; l < 16; ++l) put(dst, i + l, r[l]);
      }
      for (; i < m; ++i) put(dst, i, std::apply([&](const auto*... p) { return op(lane<C>(p, i)...); }, xs));
    } else if constexpr (K == 1) {
      const auto* x0 = std::get<0>(xs);
      TRIDENT_SIMD()
      for (index_t i = 0; i < m; ++i) put(dst, i, op(lane<C>(x0, i)));
    } else if constexpr (K == 2) {
      const auto* x0 = std::get<0>(xs);
      const auto* x1 = std::get<1>(xs);
      TRIDENT_SIMD()
      for (index_t i = 0; i < m; ++i) put(dst, i, op(lane<C>(x0, i), lane<C>(x1, i)));
    } else {
      for (index_t i = 0; i < m; ++i) {
        put(dst, i, std::apply([&](const auto*... p) { return op(lane<C>(p, i)...); }, xs));
      }
    }
    if (dst == out_buf) {
      if constexpr (std::is_same_v<D, To>) {
        stream_store(o + c, out_buf, static_cast<std::size_t>(m) * sizeof(To));
      } else if (stream) {
        narrow(out_buf, narrow_buf, m);
        stream_store(o + c, narrow_buf, static_cast<std::size_t>(m) * sizeof(To));
      } else {
        narrow(out_buf, o + c, m);
      }
    }
  }
}

/// The general case: any strides, element by element.
template <class C, class Op, class To, class... Ti>
void strided_span(const Op& op, To* o, index_t so, index_t n, const index_t* in_stride, const Ti*... x) {
  for (index_t i = 0; i < n; ++i) {
    o[i * so] = [&]<std::size_t... I>(std::index_sequence<I...>) {
      return static_cast<To>(op(load<Ti, C>(x[i * in_stride[I]])...));
    }(std::index_sequence_for<Ti...>{});
  }
}

/// out = op(in...) element-wise; inputs already broadcast to out's shape.
template <class Op, class To, class... Ti>
void elementwise(const Op& op, tensor_view<To, cpu> out, tensor_view<const Ti, cpu>... in) {
  using C = compute_of<To, Ti...>;
  constexpr int N = 1 + static_cast<int>(sizeof...(Ti));
  if (out.empty()) return;
  const strides* st[N] = {&out.strides(), &in.strides()...};
  const auto p = make_plan<N>(out.shape(), st);
  const int last = p.rank - 1;
  const index_t so = p.st[0][last];
  index_t in_stride[N - 1];
  bool dense = so == 1;
  for (int k = 1; k < N; ++k) {
    in_stride[k - 1] = p.st[k][last];
    dense = dense && (in_stride[k - 1] == 0 || in_stride[k - 1] == 1);
  }
  const bool stream = dense && p.rank == 1 && static_cast<std::size_t>(out.numel()) * sizeof(To) >= streaming_threshold;
  const auto base = std::make_tuple(in.data()...);
  for_each_span(p, [&](const index_t* off, index_t n) {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      if (dense) {
        dense_span<C>(op, out.data() + off[0], n, stream, in_stride, (std::get<I>(base) + off[I + 1])...);
      } else {
        strided_span<C>(op, out.data() + off[0], so, n, in_stride, (std::get<I>(base) + off[I + 1])...);
      }
    }(std::index_sequence_for<Ti...>{});
  });
}

}  // namespace cpu_kernels

/// The CPU backend.
template <>
struct kernels<cpu> {
  template <class T>
  using view = tensor_view<T, cpu>;

  static void copy_to_host(void* dst, const void* src, std::size_t bytes) noexcept {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  static void copy_from_host(void* dst, const void* src, std::size_t bytes) noexcept {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  static void copy_within(void* dst, const void* src, std::size_t bytes) noexcept {
    if (!bytes) return;
    auto* d = static_cast<unsigned char*>(dst);
    const auto* s = static_cast<const unsigned char*>(src);
    cpu_kernels::parallel_chunks(static_cast<index_t>(bytes), 1 << 20, 64, [&](index_t b, index_t e, int) {
      std::memcpy(d + b, s + b, static_cast<std::size_t>(e - b));
    });
  }

  /// out = v (converted to out's element type).
  template <class T>
  static void fill(view<T> out, double v) {
    if (out.empty()) return;
    const T value = static_cast<T>(v);
    const strides* st[1] = {&out.strides()};
    const auto p = cpu_kernels::make_plan<1>(out.shape(), st);
    cpu_kernels::for_each_span(p, [&](const index_t* off, index_t n) {
      T* o = out.data() + off[0];
      const index_t s = p.st[0][p.rank - 1];
      if (s == 1) {
        std::fill(o, o + n, value);
      } else {
        for (index_t i = 0; i < n; ++i) o[i * s] = value;
      }
    });
  }

  /// out = op(in), in broadcast to out's shape.
  template <class Op, class To, class Ti>
  static void map(const Op& op, view<To> out, view<const Ti> in) {
    cpu_kernels::elementwise(op, out, in);
  }

  /// out = op(a, b), a and b broadcast to out's shape.
  template <class Op, class To, class Ta, class Tb>
  static void zip(const Op& op, view<To> out, view<const Ta> a, view<const Tb> b) {
    cpu_kernels::elementwise(op, out, a, b);
  }

  /// Fills out from the counter-based stream described by `spec`.
  template <class T>
  static void random(view<T> out, const random_spec& spec) {
    const index_t n = out.numel();
    if (n == 0) return;
    const bool contiguous = out.is_contiguous();
    const index_t blocks = (n + 3) / 4;
    cpu_kernels::parallel_chunks(blocks, 2048, 16, [&](index_t b0, index_t b1, int) {
      for (index_t q = b0; q < b1; ++q) {
        const philox_block r = spec.block(static_cast<std::uint64_t>(q) * 4);
        for (index_t i = q * 4; i < std::min(n, q * 4 + 4); ++i) {
          const double v = spec.value(r, static_cast<std::uint64_t>(i));
          T& dst = contiguous ? out.data()[i] : out.data()[out.layout().offset_of_linear(i)];
          dst = static_cast<T>(v);
        }
      }
    });
  }

  /// Reduces the last axis of `in` into `out` (in's shape without its last axis). Sums
  /// accumulate in double.
  template <class Reducer, class To, class Ti>
  static void reduce_last(const Reducer& red, view<To> out, view<const Ti> in) {
    using A = std::conditional_t<std::is_same_v<Reducer, ops::max_reducer>, cpu_kernels::compute_of<Ti>, double>;
    const int r = in.rank();
    const index_t len = in.size(r - 1), step = in.stride(r - 1);
    if (out.empty()) return;
    // A column reduction (the reduced axis is strided, the one before it is contiguous, as
    // when summing a (batch, features) matrix over the batch): accumulate whole rows.
    if (r >= 2 && step != 1 && in.stride(r - 2) == 1 && out.stride(r - 2) == 1 && len > 1) {
      const index_t width = in.size(r - 2);
      index_t outer = 1;
      for (int d = 0; d < r - 2; ++d) outer *= in.size(d);
      const auto in_outer = in.layout(), out_outer = out.layout();
      for (index_t q = 0; q < outer; ++q) {
        index_t oi = 0, oo = 0, rem = q;
        for (int d = r - 3; d >= 0; --d) {
          const index_t e = in.size(d);
          oi += (rem % e) * in_outer.stride[d];
          oo += (rem % e) * out_outer.stride[d];
          rem /= e;
        }
        cpu_kernels::parallel_chunks(width, std::max<index_t>(64, cpu_kernels::parallel_grain / len), 16,
                                     [&](index_t j0, index_t j1, int) {
          constexpr index_t tile = 256;
          A acc[tile];
          for (index_t j = j0; j < j1; j += tile) {
            const index_t m = std::min(tile, j1 - j);
            for (index_t i = 0; i < m; ++i) acc[i] = red.template init<A>();
            for (index_t k = 0; k < len; ++k) {
              const Ti* row = in.data() + oi + k * step + j;
TRIDENT_SIMD()
              for (index_t i = 0; i < m; ++i) acc[i] = red.fold(acc[i], cpu_kernels::load<Ti, A>(row[i]));
            }
            To* o = out.data() + oo + j;
            for (index_t i = 0; i < m; ++i) o[i] = static_cast<To>(red.finish(acc[i], len));
          }
        });
      }
      return;
    }
    // Row reductions: one output element per row of `in`.
    index_array ext{}, in_st{};
    for (int d = 0; d < r - 1; ++d) {
      ext[d] = in.size(d);
      in_st[d] = in.stride(d);
    }
    const shape outer_shape(r - 1, ext);
    const index_t rows = outer_shape.numel();
    const layout in_outer(outer_shape, in_st);
    cpu_kernels::parallel_chunks(rows, std::max<index_t>(1, cpu_kernels::parallel_grain / std::max<index_t>(len, 1)), 1,
                                 [&](index_t q0, index_t q1, int) {
      for (index_t q = q0; q < q1; ++q) {
        const Ti* x = in.data() + in_outer.offset_of_linear(q);
        A acc = red.template init<A>();
        if (step == 1 && cpu_kernels::is_wide_v<Ti> && !std::is_same_v<Reducer, ops::max_reducer>) {
TRIDENT_SIMD(reduction(+ : acc))
          for (index_t i = 0; i < len; ++i) acc = red.fold(acc, static_cast<A>(x[i]));
        } else {
          for (index_t i = 0; i < len; ++i) acc = red.fold(acc, cpu_kernels::load<Ti, A>(x[i * step]));
        }
        out.data()[out.layout().offset_of_linear(q)] = static_cast<To>(red.finish(acc, len));
      }
    });
  }

  /// Reduces every element of `in` to one value (sums in double, per-thread partials merged
  /// in thread order).
  template <class Reducer, class T>
  static double reduce_all(const Reducer& red, view<const T> in) {
    using A = double;
    const index_t n = in.numel();
    if (n == 0) return red.finish(red.template init<A>(), 0);
    const strides* st[1] = {&in.strides()};
    const auto p = cpu_kernels::make_plan<1>(in.shape(), st);
    if (p.rank == 1) {  // one flat run with a constant stride
      const index_t s = p.st[0][0];
      const int chunks = cpu_kernels::chunk_count(n, cpu_kernels::parallel_grain);
      std::vector<A> partial(static_cast<std::size_t>(chunks), red.template init<A>());
      cpu_kernels::parallel_chunks(n, cpu_kernels::parallel_grain, 16, [&](index_t b, index_t e, int c) {
        A acc = red.template init<A>();
        const T* x = in.data();
        if (s == 1 && !std::is_same_v<Reducer, ops::max_reducer>) {
          if constexpr (cpu_kernels::is_wide_v<T>) {
            acc = cpu_kernels::dense_fold(red, x + b, e - b);
          } else {
            float buf[cpu_kernels::convert_chunk];
            for (index_t i = b; i < e; i += cpu_kernels::convert_chunk) {
              const index_t m = std::min(cpu_kernels::convert_chunk, e - i);
              acc = red.merge(acc, cpu_kernels::dense_fold(red, cpu_kernels::widen<float>(x + i, buf, m), m));
            }
          }
        } else {
          for (index_t i = b; i < e; ++i) acc = red.fold(acc, cpu_kernels::load<T, A>(x[i * s]));
        }
        partial[static_cast<std::size_t>(c)] = acc;
      });
      A acc = red.template init<A>();
      for (const A& v : partial) acc = red.merge(acc, v);
      return red.finish(acc, n);
    }
    A acc = red.template init<A>();
    for (index_t i = 0; i < n; ++i) acc = red.fold(acc, cpu_kernels::load<T, A>(in.data()[in.layout().offset_of_linear(i)]));
    return red.finish(acc, n);
  }

  /// Softmax (or log-softmax) along the last axis, rows spread over threads. Max-shifted.
  template <class To, class Ti>
  static void softmax_last(view<To> out, view<const Ti> in, bool log) {
    using C = cpu_kernels::compute_of<To, Ti>;
    const int r = in.rank();
    const index_t len = in.size(r - 1), si = in.stride(r - 1), so = out.stride(r - 1);
    index_array ext{}, ist{}, ost{};
    for (int d = 0; d < r - 1; ++d) {
      ext[d] = in.size(d);
      ist[d] = in.stride(d);
      ost[d] = out.stride(d);
    }
    const shape outer(r - 1, ext);
    const layout lin(outer, ist), lout(outer, ost);
    if (len == 0) return;
    cpu_kernels::parallel_chunks(outer.numel(), std::max<index_t>(1, cpu_kernels::parallel_grain / len), 1,
                                 [&](index_t q0, index_t q1, int) {
      std::vector<C> row(static_cast<std::size_t>(len));
      for (index_t q = q0; q < q1; ++q) {
        const Ti* x = in.data() + lin.offset_of_linear(q);
        To* o = out.data() + lout.offset_of_linear(q);
        C mx = -std::numeric_limits<C>::infinity();
        for (index_t i = 0; i < len; ++i) {
          row[i] = cpu_kernels::load<Ti, C>(x[i * si]);
          mx = ops::max_reducer::fold(mx, row[i]);
        }
        if (mx == -std::numeric_limits<C>::infinity()) mx = 0;  // all -inf: keep exp finite-shifted
        C sum = 0;
        for (index_t i = 0; i < len; ++i) {
          row[i] -= mx;
          sum += std::exp(row[i]);
        }
        if (log) {
          const C lse = std::log(sum);
          for (index_t i = 0; i < len; ++i) o[i * so] = static_cast<To>(row[i] - lse);
        } else {
          const C inv = C(1) / sum;
          for (index_t i = 0; i < len; ++i) o[i * so] = static_cast<To>(std::exp(row[i]) * inv);
        }
      }
    });
  }

  /// Batched strided GEMM with epilogue (backend/cpu/gemm.hpp).
  template <class Ti, class Tc>
  static void gemm(const gemm_call<Ti, Tc>& g) {
    const cpu_kernels::gemm_epilogue ep{g.bias, g.act};
    if (g.batch == 1) {
      cpu_kernels::gemm(g.trans_a, g.trans_b, g.m, g.n, g.k, g.alpha, g.a, g.lda, g.b, g.ldb, g.beta, g.c, g.ldc, ep);
    } else {
      cpu_kernels::gemm_batched(g.batch, g.trans_a, g.trans_b, g.m, g.n, g.k, g.alpha, g.a, g.lda, g.stride_a, g.b, g.ldb,
                                g.stride_b, g.beta, g.c, g.ldc, g.stride_c, ep);
    }
  }
};

}  // namespace trident
