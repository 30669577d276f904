#pragma once
/// @file common.hpp
/// Pieces shared by every GEMM path: the fused epilogue, the per-tile store parameters,
/// element conversions used while packing, reusable packing workspaces and the OpenMP helpers.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <type_traits>

#include "../../../config.hpp"
#include "../../../core/activation.hpp"
#include "../../../precision/bfloat16.hpp"
#include "../../../precision/half.hpp"

#if defined(TRIDENT_HAS_OPENMP)
#include <omp.h>
#endif

namespace trident::cpu_kernels {

/// Fused epilogue applied once to each finished element of C: c = act(c + bias[j]).
struct gemm_epilogue {
  const float* bias = nullptr;       ///< per column of C (length n), or nullptr
  activation act = activation::none;  ///< applied after the bias
};

namespace detail {

/// What a micro-kernel does when it stores its finished register tile into C.
/// `first`: this is the first K block, so C is scaled by beta (and not read at all when
/// beta == 0); otherwise the partial product is added to C. `last`: the last K block, so the
/// bias (already offset to the tile's first column) and the activation are applied.
template <class V>
struct tile_store {
  V alpha = V(1);                    ///< scales the product
  V beta = V(0);                     ///< scales the old C on the first K block
  bool first = true;                 ///< first K block
  bool last = true;                  ///< last K block
  const float* bias = nullptr;       ///< bias of the tile's first column, or nullptr
  activation act = activation::none;  ///< applied on the last K block
};

/// Stores one finished value `acc` (the product, not yet scaled) into `*c` (scalar path).
template <class V>
TRIDENT_ALWAYS_INLINE void store_one(V* c, V acc, const tile_store<V>& ts, index_t j) noexcept {
  V x = ts.alpha * acc;
  if (ts.first) {
    if (ts.beta != V(0)) x += ts.beta * *c;
  } else {
    x += *c;
  }
  if (ts.last) {
    if (ts.bias != nullptr) x += static_cast<V>(ts.bias[j]);
    x = apply_activation(ts.act, x);
  }
  *c = x;
}

/// Stores an mr x nr tile held in a dense buffer `t` (row stride `ldt`) into C.
template <class V>
inline void store_tile_scalar(const V* t, index_t ldt, V* c, index_t ldc, index_t mr, index_t nr,
                              const tile_store<V>& ts) noexcept {
  for (index_t i = 0; i < mr; ++i) {
    for (index_t j = 0; j < nr; ++j) store_one(c + i * ldc + j, t[i * ldt + j], ts, j);
  }
}

/// C = act(beta * C + bias): the whole GEMM when k == 0 or alpha == 0 (A and B are not read).
template <class V>
inline void scale_c_only(index_t m, index_t n, V beta, V* c, index_t ldc, const gemm_epilogue& ep) noexcept {
  for (index_t i = 0; i < m; ++i) {
    V* ci = c + i * ldc;
    for (index_t j = 0; j < n; ++j) {
      V x = beta == V(0) ? V(0) : beta * ci[j];
      if (ep.bias != nullptr) x += static_cast<V>(ep.bias[j]);
      ci[j] = apply_activation(ep.act, x);
    }
  }
}

/// Converts one input element to the packed type (exact widening, or a bit copy).
template <class P, class T>
TRIDENT_ALWAYS_INLINE P convert_element(T x) noexcept {
  if constexpr (std::is_same_v<P, T>) {
    return x;
  } else if constexpr (std::is_same_v<P, bfloat16>) {
    return bfloat16(static_cast<float>(x));
  } else {
    return static_cast<P>(static_cast<float>(x));
  }
}

/// Zero of the packed type.
template <class P>
TRIDENT_ALWAYS_INLINE P zero_element() noexcept {
  if constexpr (std::is_same_v<P, bfloat16>) {
    return bfloat16::from_bits(0);
  } else {
    return P(0);
  }
}

/// Element (i, p) of op(X) for a row-major X with leading dimension ld.
template <class T>
TRIDENT_ALWAYS_INLINE const T& op_at(const T* x, bool trans, index_t ld, index_t i, index_t p) noexcept {
  return trans ? x[p * ld + i] : x[i * ld + p];
}

constexpr index_t ceil_div(index_t a, index_t b) noexcept { return (a + b - 1) / b; }
constexpr index_t round_up(index_t a, index_t b) noexcept { return ceil_div(a, b) * b; }

/// A grow-only, 64-byte-aligned scratch buffer. One per thread per use (thread_local),
/// so repeated GEMMs do not pay for allocation and page faults every call.
class workspace {
 public:
  workspace() = default;
  workspace(const workspace&) = delete;
  workspace& operator=(const workspace&) = delete;
  ~workspace() { std::free(data_); }

  /// Returns at least `bytes` bytes of storage; previous contents are not preserved.
  void* get(std::size_t bytes) {
    if (bytes > size_) {
      std::free(data_);
      size_ = (bytes + 4095) & ~std::size_t(4095);
      data_ = std::aligned_alloc(4096, size_);
      if (data_ == nullptr) {
        size_ = 0;
        throw std::bad_alloc();
      }
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  std::size_t size_ = 0;
};

/// The calling thread's workspace number `slot` (slots let one GEMM hold several buffers).
inline workspace& thread_workspace(int slot) {
  thread_local workspace ws[4];
  return ws[slot];
}

/// Process-wide memory of how well threading has been going. On a shared machine a helper
/// thread can lose its core to another process for a whole scheduler slice (several ms),
/// and every fork/join then waits for it. When a threaded GEMM spent much of its time
/// waiting for its helpers, GEMMs too small to amortise such a stall run on the calling
/// thread alone for a while (20 ms, doubling while the stalls persist, up to 1 s); then
/// threading is tried again. TRIDENT_GEMM_ADAPTIVE=0 in the environment turns this off.
struct threading_health {
  std::atomic<std::int64_t> single_until_ns{0};  ///< small GEMMs stay single-threaded until then
  std::atomic<std::int64_t> backoff_ns{0};       ///< length of the last such window
};

inline threading_health& gemm_threading_health() noexcept {
  static threading_health h;
  return h;
}

/// Monotonic time in nanoseconds.
inline std::int64_t monotonic_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

/// Whether the adaptive policy above is on (read once).
inline bool gemm_adaptive_threading() noexcept {
  static const bool on = [] {
    const char* e = std::getenv("TRIDENT_GEMM_ADAPTIVE");
    return e == nullptr || e[0] != '0';
  }();
  return on;
}

/// Threads a GEMM of `flops` operations should use, given the rate one thread reaches on it
/// (flop/s): 1 inside an existing parallel region, when the problem is too small to amortise
/// a fork/join, or while helpers have recently been stalling and the problem is small.
inline int gemm_threads(double flops, double single_thread_rate = 1.5e11) noexcept {
#if defined(TRIDENT_HAS_OPENMP)
  if (omp_in_parallel()) return 1;
  if (flops < 2.0e6) return 1;
  const int t = omp_get_max_threads();
  if (t <= 1) return 1;
  // Below ~10 ms on one thread, one stalled helper costs more than a second thread gains.
  if (gemm_adaptive_threading() && flops / single_thread_rate < 10e-3 &&
      monotonic_ns() < gemm_threading_health().single_until_ns.load(std::memory_order_relaxed)) {
    return 1;
  }
  // Give each thread at least ~1 MFLOP.
  const double cap = flops / 1.0e6;
  return static_cast<int>(std::max(1.0, std::min(static_cast<double>(t), cap)));
#else
  (void)flops;
  (void)single_thread_rate;
  return 1;
#endif
}

/// Records how a threaded GEMM went: `wall_ns` in all, `waited_ns` of which the calling
/// thread spent waiting for its helpers (for packing they had claimed, and at the join).
inline void report_threading(std::int64_t wall_ns, std::int64_t waited_ns) noexcept {
  if (!gemm_adaptive_threading()) return;
  threading_health& h = gemm_threading_health();
  if (waited_ns > 200000 && waited_ns * 3 > wall_ns) {
    const std::int64_t prev = h.backoff_ns.load(std::memory_order_relaxed);
    const std::int64_t next = std::clamp<std::int64_t>(prev * 2, 20000000, 1000000000);
    h.backoff_ns.store(next, std::memory_order_relaxed);
    h.single_until_ns.store(monotonic_ns() + next, std::memory_order_relaxed);
  } else if (waited_ns * 10 < wall_ns) {
    h.backoff_ns.store(0, std::memory_order_relaxed);
  }
}

/// Splits [0, total) in units of `unit` into `parts` nearly equal contiguous ranges;
/// returns range number `idx` as [begin, end).
inline void split_range(index_t total, index_t unit, index_t parts, index_t idx, index_t& begin,
                        index_t& end) noexcept {
  const index_t units = ceil_div(total, unit);
  const index_t base = units / parts, extra = units % parts;
  const index_t u0 = idx * base + std::min(idx, extra);
  const index_t u1 = u0 + base + (idx < extra ? 1 : 0);
  begin = std::min(total, u0 * unit);
  end = std::min(total, u1 * unit);
}

}  // namespace detail
}  // namespace trident::cpu_kernels
