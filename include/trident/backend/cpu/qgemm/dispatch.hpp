#pragma once
/// @file backend/cpu/qgemm/dispatch.hpp
/// The int8 GEMM drivers: which kernel runs (what the CPU has, the shape, a scoped override),
/// and how the work is cut between OpenMP threads.
///
/// Kernel: AMX-INT8 when the CPU has it (cpuid, and Linux grants the tile state) and C has at
/// least 16 rows; else AVX512-VNNI when the CPU has it; else the scalar kernel. Each is
/// compiled in when the target allows it (__AVX512VNNI__, __AMX_INT8__) and used when cpuid
/// says the CPU runs it. qgemm::scoped_kernel forces one for the calling thread.
///
/// Threads: C (m x n) is cut into row blocks (32 rows, two AMX tiles) and, when the row blocks
/// alone cannot keep the threads busy, column blocks; threads claim blocks from a shared
/// counter (on a shared machine, a thread whose core is taken just claims fewer). In the
/// dynamic linear a thread quantizes the rows of the strip it claimed and multiplies them
/// while they are still in its cache. The thread count follows the fp32 GEMM's policy
/// (gemm/common.hpp: gemm_threads).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "../gemm/blocked.hpp"
#include "../gemm/common.hpp"
#include "common.hpp"
#include "kernel_amx.hpp"
#include "kernel_scalar.hpp"
#include "kernel_vnni.hpp"
#include "packing.hpp"
#include "quantize.hpp"

namespace trident::cpu_kernels::qgemm {

/// Whether kernel `k` was compiled in and this CPU (and OS) can run it.
inline bool kernel_available(kernel k) noexcept {
  switch (k) {
    case kernel::automatic:
    case kernel::scalar: return true;
    case kernel::avx512_vnni:
#if defined(TRIDENT_HAS_QGEMM_VNNI)
      return detail::cpu_has_vnni();
#else
      return false;
#endif
    case kernel::amx_int8:
#if defined(TRIDENT_HAS_QGEMM_AMX)
      return amx_int8_usable();
#else
      return false;
#endif
  }
  return false;
}

/// Forces the int8 GEMMs called from this thread to use one kernel while it lives (tests,
/// benchmarks). Throws trident::error when the kernel is not available here.
class scoped_kernel {
 public:
  explicit scoped_kernel(kernel k) : prev_(detail::kernel_override()) {
    if (!kernel_available(k)) {
      throw error(std::string("int8 GEMM: kernel '") + to_string(k) + "' is not available on this CPU or build");
    }
    detail::kernel_override() = k;
  }
  scoped_kernel(const scoped_kernel&) = delete;
  scoped_kernel& operator=(const scoped_kernel&) = delete;
  ~scoped_kernel() { detail::kernel_override() = prev_; }

 private:
  kernel prev_;
};

namespace detail {

/// Rows per row block of C.
inline constexpr index_t row_block = 32;

/// The kernel for an m x n x k product: the override when one is set, else the best one.
/// AMX when the CPU has it and C has at least 16 rows (an A tile's worth) and the product is
/// not tiny (tile configuration and the 32 x 32 blocks cost more than they save); else VNNI.
inline kernel choose_kernel(index_t m, index_t n, index_t k) noexcept {
  const kernel forced = kernel_override();
  if (forced != kernel::automatic) return forced;
  if (m >= 16 && n >= 32 && k >= 64 && kernel_available(kernel::amx_int8)) return kernel::amx_int8;
  if (kernel_available(kernel::avx512_vnni)) return kernel::avx512_vnni;
  return kernel::scalar;
}

/// The rate (ops/s) one thread reaches with kernel `kk`, for the threading decision.
inline double single_thread_rate(kernel kk) noexcept {
  switch (kk) {
    case kernel::amx_int8: return 2.0e12;
    case kernel::avx512_vnni: return 6.0e11;
    default: return 2.0e10;
  }
}

/// How C is cut into blocks.
struct block_grid {
  index_t row_blocks = 0, col_blocks = 1, cols = 0;  ///< cols: columns per column block (a multiple of 32)
  index_t items() const noexcept { return row_blocks * col_blocks; }
};

inline block_grid make_grid(index_t m, index_t n, int nthreads) noexcept {
  block_grid g;
  g.row_blocks = ceil_div(m, row_block);
  g.col_blocks = 1;
  if (g.row_blocks < 2 * nthreads && nthreads > 1) {
    g.col_blocks = std::min(ceil_div(n, 32), ceil_div(2 * static_cast<index_t>(nthreads), g.row_blocks));
  }
  g.cols = round_up(ceil_div(n, g.col_blocks), 32);
  g.col_blocks = ceil_div(n, g.cols);
  return g;
}

/// One thread's state for one kernel (AMX: the tile configuration and a packing buffer).
struct thread_ctx {
  kernel kk = kernel::scalar;
  std::uint8_t* abuf = nullptr;  ///< AMX: a 32-row strip of A, padded to kp
};

inline void thread_begin(thread_ctx& t, const packed_view& w) {
#if defined(TRIDENT_HAS_QGEMM_AMX)
  if (t.kk == kernel::amx_int8) {
    t.abuf = static_cast<std::uint8_t*>(cpu_kernels::detail::thread_workspace(1).get(static_cast<std::size_t>(32 * w.kp)));
    amx_int8_begin();
  }
#else
  (void)t;
  (void)w;
#endif
}
inline void thread_end(thread_ctx& t) noexcept {
#if defined(TRIDENT_HAS_QGEMM_AMX)
  if (t.kk == kernel::amx_int8) amx_int8_end();
#else
  (void)t;
#endif
}

/// C[i0:i1, j0:j1] through `sp` with kernel t.kk. A (m rows) is row-major u8 with leading
/// dimension lda; `a_padded`: A's rows may be read up to w.kp bytes (zeros beyond k). With
/// the AMX kernel, a padded A is in tile order instead (packing.hpp: amx_strip_offset).
inline void run_block(thread_ctx& t, const std::uint8_t* a, index_t m, index_t lda, bool a_padded, index_t i0,
                      index_t i1, const packed_view& w, index_t j0, index_t j1, const store_params& sp) noexcept {
  switch (t.kk) {
#if defined(TRIDENT_HAS_QGEMM_AMX)
    case kernel::amx_int8: gemm_amx(a, lda, a_padded, m, i0, i1, w, j0, j1, sp, t.abuf); break;
#endif
#if defined(TRIDENT_HAS_QGEMM_VNNI)
    case kernel::avx512_vnni: gemm_vnni(a, lda, a_padded, i0, i1, w, j0, j1, sp); break;
#endif
    default:
      (void)a_padded;
      (void)m;
      gemm_scalar(a, lda, i0, i1, w, j0, j1, sp);
      break;
  }
}

/// Runs block b of grid g.
inline void run_grid_block(thread_ctx& t, const block_grid& g, index_t b, const std::uint8_t* a, index_t m, index_t lda,
                           bool a_padded, const packed_view& w, const store_params& sp) noexcept {
  const index_t rb = b / g.col_blocks, cb = b % g.col_blocks;
  const index_t i0 = rb * row_block, i1 = std::min(m, i0 + row_block);
  const index_t j0 = cb * g.cols, j1 = std::min(w.n, j0 + g.cols);
  run_block(t, a, m, lda, a_padded, i0, i1, w, j0, j1, sp);
}

}  // namespace detail

/// C = A · Wᵀ through the epilogue `sp`, A m x w.k (row-major u8, leading dimension lda).
/// Threads claim blocks from a shared counter: on a shared machine a thread whose core is
/// busy elsewhere just takes fewer of them.
inline void gemm_u8s8(const std::uint8_t* a, index_t m, index_t lda, const packed_view& w, const store_params& sp) {
  const kernel kk = detail::choose_kernel(m, w.n, w.k);
  const double ops = 2.0 * static_cast<double>(m) * static_cast<double>(w.n) * static_cast<double>(w.k);
  const int nthreads = cpu_kernels::detail::gemm_threads(ops, detail::single_thread_rate(kk));
  const detail::block_grid g = detail::make_grid(m, w.n, nthreads);
  std::atomic<index_t> next{0};
  cpu_kernels::detail::run_parallel(nthreads, [&](int tid, int nt, std::int64_t* waited) {
    (void)tid;
    (void)nt;
    (void)waited;
    detail::thread_ctx t;
    t.kk = kk;
    detail::thread_begin(t, w);
    for (index_t b = next.fetch_add(1, std::memory_order_relaxed); b < g.items();
         b = next.fetch_add(1, std::memory_order_relaxed)) {
      detail::run_grid_block(t, g, b, a, m, lda, false, w, sp);
    }
    detail::thread_end(t);
  });
}

/// The rows [i0, i1) of x quantized dynamically into q, with per-row parameters (per_row) or
/// the given per-tensor ones: row-major (leading dimension ldq = kp, zero padding up to kp) or,
/// when `tiled`, in the AMX kernel's tile order (row i at strip i / 32; `row_buf`: kp bytes of
/// scratch; rows from m up to the end of the last strip are zeroed). Returns false when a row
/// held a NaN or infinity (the caller reports it).
inline bool quantize_rows(const float* x, index_t ldx, index_t m, index_t k, index_t kp, index_t i0, index_t i1,
                          bool per_row, std::uint8_t* q, index_t ldq, float* scales, std::int32_t* zeros, bool tiled,
                          std::uint8_t* row_buf) noexcept {
  bool ok = true;
  for (index_t i = i0; i < i1; ++i) {
    const float* xi = x + i * ldx;
    float s = scales[0];
    std::int32_t z = zeros[0];
    if (per_row) {
      const value_range r = range_of(xi, k);
      if (!r.finite) {
        ok = false;
        continue;
      }
      dynamic_params(r.lo, r.hi, s, z);
      scales[i] = s;
      zeros[i] = z;
    }
    if (tiled) {
      quantize_row_u8(xi, k, s, z, row_buf);
      amx_strip_row(row_buf, k, kp, i % 32, q + (i / 32) * 32 * kp);
    } else {
      quantize_row_u8(xi, k, s, z, q + i * ldq);
      if (kp > k) std::fill(q + i * ldq + k, q + i * ldq + kp, std::uint8_t(0));
    }
  }
  if (tiled && i1 == m && i1 > i0) {
    for (index_t i = m; i < round_up(m, 32); ++i) amx_strip_row(nullptr, k, kp, i % 32, q + (i / 32) * 32 * kp);
  }
  return ok;
}

/// y = act(dequantized (quantize_dynamic(x) · Wᵀ) + bias), fused. When there are enough
/// 32-row strips, a thread claims a strip, quantizes its rows into a shared scratch (in the
/// AMX kernel's tile order when that kernel runs) and multiplies them by all of W while they
/// are in its cache. With few rows, the columns are split too: the rows are quantized first,
/// evenly, then the blocks are claimed. Per tensor, the threads first find the range
/// together. Returns false when x held a NaN or infinity (y is then unspecified).
inline bool dynamic_linear(const float* x, index_t m, index_t ldx, const packed_view& w, const float* w_scale,
                           const std::int32_t* row_sum, float* y, index_t ldy, const float* bias, activation act,
                           bool per_row) {
  const kernel kk = detail::choose_kernel(m, w.n, w.k);
  const double ops = 2.0 * static_cast<double>(m) * static_cast<double>(w.n) * static_cast<double>(w.k);
  const int nthreads = cpu_kernels::detail::gemm_threads(ops, detail::single_thread_rate(kk));
  const detail::block_grid g = detail::make_grid(m, w.n, nthreads);
  const bool tiled = kk == kernel::amx_int8;
  const index_t ldq = w.kp;
  // Scratch: the quantized rows (whole strips), then the per-row scales and zero points.
  const std::size_t qbytes = static_cast<std::size_t>(round_up(m, 32) * ldq);
  auto* scratch = static_cast<std::uint8_t*>(cpu_kernels::detail::thread_workspace(0).get(
      qbytes + static_cast<std::size_t>(m) * (sizeof(float) + sizeof(std::int32_t)) + 64));
  std::uint8_t* q = scratch;
  auto* scales = reinterpret_cast<float*>(scratch + qbytes);
  auto* zeros = reinterpret_cast<std::int32_t*>(scales + m);

  store_params sp;
  sp.out_f32 = y;
  sp.ld = ldy;
  sp.a_scale = scales;
  sp.a_zero = zeros;
  sp.per_row = per_row;
  sp.w_scale = w_scale;
  sp.row_sum = row_sum;
  sp.bias = bias;
  sp.act = act;

  std::atomic<bool> ok{true};
  std::atomic<index_t> next{0};
  const bool shared_rows = g.col_blocks > 1;
  std::vector<value_range> ranges(static_cast<std::size_t>(nthreads));
  cpu_kernels::detail::run_parallel(nthreads, [&](int tid, int nt, std::int64_t* waited) {
    (void)waited;
    // Per tensor, every thread computes the same parameters into its own copy, read by its epilogue.
    float scale_t = 1.0f;
    std::int32_t zero_t = 0;
    if (!per_row) {
      value_range r;
      for (index_t i = m * tid / nt; i < m * (tid + 1) / nt; ++i) r.merge(range_of(x + i * ldx, w.k));
      ranges[static_cast<std::size_t>(tid)] = r;
#if defined(TRIDENT_HAS_OPENMP)
#pragma omp barrier
#endif
      value_range all;
      for (int t = 0; t < nt; ++t) all.merge(ranges[static_cast<std::size_t>(t)]);
      if (!all.finite) {
        ok.store(false, std::memory_order_relaxed);
        return;  // every thread sees the same range and leaves here
      }
      dynamic_params(all.lo, all.hi, scale_t, zero_t);
    }
    float* sc = per_row ? scales : &scale_t;
    std::int32_t* zc = per_row ? zeros : &zero_t;
    store_params tsp = sp;
    tsp.a_scale = sc;
    tsp.a_zero = zc;
    std::uint8_t* row_buf =
        tiled ? static_cast<std::uint8_t*>(cpu_kernels::detail::thread_workspace(2).get(static_cast<std::size_t>(w.kp)))
              : nullptr;
    auto quantize = [&](index_t r0, index_t r1) {
      if (!quantize_rows(x, ldx, m, w.k, w.kp, r0, r1, per_row, q, ldq, sc, zc, tiled, row_buf)) {
        ok.store(false, std::memory_order_relaxed);
      }
    };
    detail::thread_ctx t;
    t.kk = kk;
    if (shared_rows) {
      quantize(m * tid / nt, m * (tid + 1) / nt);
#if defined(TRIDENT_HAS_OPENMP)
#pragma omp barrier
#endif
      if (!ok.load(std::memory_order_relaxed)) return;
      detail::thread_begin(t, w);
      for (index_t b = next.fetch_add(1, std::memory_order_relaxed); b < g.items();
           b = next.fetch_add(1, std::memory_order_relaxed)) {
        detail::run_grid_block(t, g, b, q, m, ldq, true, w, tsp);
      }
    } else {
      detail::thread_begin(t, w);
      for (index_t s = next.fetch_add(1, std::memory_order_relaxed); s < g.row_blocks;
           s = next.fetch_add(1, std::memory_order_relaxed)) {
        const index_t i0 = s * detail::row_block, i1 = std::min(m, i0 + detail::row_block);
        quantize(i0, i1);
        detail::run_block(t, q, m, ldq, true, i0, i1, w, 0, w.n, tsp);
      }
    }
    detail::thread_end(t);
  });
  return ok.load();
}

}  // namespace trident::cpu_kernels::qgemm
