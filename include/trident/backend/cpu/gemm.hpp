#pragma once
/// @file gemm.hpp
/// CPU GEMM: C(m x n) = act(alpha * op(A) * op(B) + beta * C + bias), row-major, for fp32,
/// double, bf16 inputs (AMX-BF16, AVX512-BF16 or widened to fp32) and half inputs (widened
/// to fp32 while packing), plus strided batched versions. Threads with OpenMP when the
/// translation unit is built with it; runs single-threaded inside an existing parallel region.
///
/// Paths are chosen at compile time from the ISA macros of config.hpp, except AMX, which
/// also needs the kernel's permission at run time (asked once per process). Every path is
/// reachable explicitly through `paths::` so that tests can check each one.
///
/// Threads share the work through atomic counters, not a fixed split, so a core that is
/// busy with another process just takes less of it. GEMMs of under ~10 ms run on the
/// calling thread alone for a while after a threaded GEMM was seen waiting for a stalled
/// helper (see detail::report_threading; TRIDENT_GEMM_ADAPTIVE=0 turns this off).
/// Packing buffers are kept per thread (thread_local, grow-only) and reused by later calls:
/// a few MiB per thread, up to 32 MiB for the calling thread on very large problems.

#include "../../config.hpp"
#include "../../core/activation.hpp"
#include "../../precision/bfloat16.hpp"
#include "../../precision/half.hpp"
#include "gemm/blocked.hpp"
#include "gemm/common.hpp"
#include "gemm/kernel_amx.hpp"
#include "gemm/kernel_avx2.hpp"
#include "gemm/kernel_avx512.hpp"
#include "gemm/kernel_scalar.hpp"
#include "parallel.hpp"

namespace trident::cpu_kernels {

/// The fp32 micro-kernel the public entry points use on this target (for AVX-512, the
/// wide one; gemm_f32_auto picks the narrow one when it wastes less work on padding).
#if defined(TRIDENT_HAS_AVX512)
using default_f32_kernel = kernel_avx512_f32;
#elif defined(TRIDENT_HAS_AVX2)
using default_f32_kernel = kernel_avx2_f32;
#else
using default_f32_kernel = kernel_scalar<float, 4, 16>;
#endif

/// The double micro-kernel (portable; vectorised by the compiler).
using default_f64_kernel = kernel_scalar<double, 6, 16>;

/// Explicitly chosen implementations, for tests and benchmarks. They accept the same
/// arguments and give the same results (up to rounding) as the public `gemm` overloads.
namespace paths {

/// Runs the blocked GEMM with micro-kernel `Kernel`; inputs of type T are converted to
/// Kernel::packed_type while packing. Handles empty sizes, k == 0 and alpha == 0.
/// @tparam Kernel micro-kernel policy (see kernel_scalar for the members it provides)
template <class Kernel, class T>
void gemm_with(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, typename Kernel::value_type alpha,
               const T* a, index_t lda, const T* b, index_t ldb, typename Kernel::value_type beta,
               typename Kernel::value_type* c, index_t ldc, const gemm_epilogue& ep = {}) {
  using V = typename Kernel::value_type;
  if (m <= 0 || n <= 0) return;
  if (k <= 0 || alpha == V(0)) {
    detail::scale_c_only(m, n, beta, c, ldc, ep);
    return;
  }
  const int threads = detail::gemm_threads(2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k));
  detail::gemm_blocked<Kernel>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep, threads);
}

}  // namespace paths

namespace detail {

/// Per-thread scratch for C^T while a GEMM is computed transposed (grow-only, like the packing
/// buffers: up to 8 MiB, see transposed_pays).
inline workspace& transposed_c_workspace() {
  thread_local workspace ws;
  return ws;
}

/// Whether a threaded fp32 GEMM is faster computed transposed, C^T = op(B)^T op(A)^T, into a
/// scratch and then stored transposed. So it is for few rows and many columns: the blocked
/// loop shares a packed B panel of k x n (megabytes, streamed from L3 by every row block) and
/// has few row blocks to hand out; transposed, the shared panel is k x m (it stays in L2) and
/// the n rows make many blocks. Measured at 2 threads (m x n x k): 256 x 1024 x 1024 with B
/// transposed (a linear layer's forward) 1.16-1.22x, not transposed 1.09x; 128 x 1024 x 1024
/// 1.39x; 512 x 2048 x 512 1.05x. It does not pay at k = 256 (0.97x), for rows that fill the
/// transposed problem's 32-column tiles badly (48 rows: 0.8x), or on one thread (0.94-1.01x).
inline bool transposed_pays(index_t m, index_t n, index_t k) noexcept {
  if (!(m >= 64 && m <= 512 && m % 32 == 0 && n >= 2 * m && k >= 512 && m * n <= (index_t{1} << 21))) return false;
  return gemm_threads(2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k)) > 1;
}

/// C (m x n, ldc) = act(T^T + beta * C + bias) for T (n x m, row-major, leading dimension m):
/// the store of a GEMM computed transposed. Threads split the rows of C in blocks of 16; C is
/// not read when beta == 0.
inline void store_transposed(index_t m, index_t n, const float* t, float beta, float* c, index_t ldc,
                             const gemm_epilogue& ep) {
  parallel_chunks(ceil_div(m, 16), 4, 1, [&](index_t b0, index_t b1, int) {
    for (index_t i0 = b0 * 16; i0 < std::min(m, b1 * 16); i0 += 16) {
      const index_t mi = std::min<index_t>(16, m - i0);
      for (index_t j0 = 0; j0 < n; j0 += 16) {
        const index_t nj = std::min<index_t>(16, n - j0);
#if defined(TRIDENT_HAS_AVX512)
        const __mmask16 imask = lane_mask(mi), jmask = lane_mask(nj);
        __m512 r[16];
        for (int j = 0; j < 16; ++j) {
          r[j] = j < nj ? _mm512_maskz_loadu_ps(imask, t + (j0 + j) * m + i0) : _mm512_setzero_ps();
        }
        transpose16x16(r);  // r[i]: columns j0.. of row i0 + i of C
        const __m512 bias = ep.bias != nullptr ? _mm512_maskz_loadu_ps(jmask, ep.bias + j0) : _mm512_setzero_ps();
        const __m512 vbeta = _mm512_set1_ps(beta);
        for (index_t i = 0; i < mi; ++i) {
          float* ci = c + (i0 + i) * ldc + j0;
          __m512 x = _mm512_add_ps(r[i], bias);
          if (beta != 0.0f) x = _mm512_fmadd_ps(vbeta, _mm512_maskz_loadu_ps(jmask, ci), x);
          _mm512_mask_storeu_ps(ci, jmask, activation_avx512(ep.act, x));
        }
#else
        for (index_t i = 0; i < mi; ++i) {
          float* ci = c + (i0 + i) * ldc + j0;
          for (index_t j = 0; j < nj; ++j) {
            float x = t[(j0 + j) * m + i0 + i];
            if (beta != 0.0f) x += beta * ci[j];
            if (ep.bias != nullptr) x += ep.bias[j0 + j];
            ci[j] = apply_activation(ep.act, x);
          }
        }
#endif
      }
    }
  });
}

}  // namespace detail

namespace paths {

/// fp32-accumulating GEMM with the best fp32 micro-kernel for this shape (inputs of type T
/// are widened to fp32 while packing); computed transposed where that pays (detail::transposed_pays).
template <class T>
void gemm_f32_auto(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, float alpha, const T* a, index_t lda,
                   const T* b, index_t ldb, float beta, float* c, index_t ldc, const gemm_epilogue& ep = {}) {
  if (alpha != 0.0f && detail::transposed_pays(m, n, k)) {
    float* t = static_cast<float*>(detail::transposed_c_workspace().get(static_cast<std::size_t>(m * n) * sizeof(float)));
    gemm_f32_auto(!trans_b, !trans_a, n, m, k, alpha, b, ldb, a, lda, 0.0f, t, m);
    detail::store_transposed(m, n, t, beta, c, ldc, ep);
    return;
  }
#if defined(TRIDENT_HAS_AVX512)
  // A 64-wide tile pads n up to a multiple of 64; use 32-wide tiles when that wastes > 10%.
  if (detail::round_up(n, 64) * 10 > detail::round_up(n, 32) * 11) {
    gemm_with<kernel_avx512_f32_narrow>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep);
    return;
  }
#endif
  gemm_with<default_f32_kernel>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep);
}

/// True when the AMX-BF16 path can run in this process (compiled in, CPU has it, and the
/// operating system granted the tile state).
inline bool amx_available() noexcept {
#if defined(TRIDENT_HAS_AMX_BF16) && defined(TRIDENT_HAS_AVX512)
  return detail::amx_usable();
#else
  return false;
#endif
}

/// True when the AVX512-BF16 dot-product path is compiled in.
inline constexpr bool avx512_bf16_available = isa::avx512_bf16 && isa::avx512;

/// bf16 GEMM without bf16 instructions: widened to fp32 while packing, portable micro-kernel.
inline void gemm_bf16_scalar(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, float alpha,
                             const bfloat16* a, index_t lda, const bfloat16* b, index_t ldb, float beta, float* c,
                             index_t ldc, const gemm_epilogue& ep = {}) {
  gemm_with<kernel_scalar<float, 4, 16>>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep);
}

/// bf16 GEMM with AVX512-BF16 dot products (avx512_bf16_available); without them, falls back
/// to widening to fp32 with the best fp32 kernel.
inline void gemm_bf16_avx512(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, float alpha,
                             const bfloat16* a, index_t lda, const bfloat16* b, index_t ldb, float beta, float* c,
                             index_t ldc, const gemm_epilogue& ep = {}) {
#if defined(TRIDENT_HAS_AVX512BF16)
  // As for fp32: 32-wide tiles where padding n to a multiple of 64 wastes > 10%.
  if (detail::round_up(n, 64) * 10 > detail::round_up(n, 32) * 11) {
    gemm_with<kernel_avx512_bf16_narrow>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep);
  } else {
    gemm_with<kernel_avx512_bf16>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep);
  }
#else
  gemm_f32_auto(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep);
#endif
}

/// bf16 GEMM on AMX tiles (amx_available()); without them, falls back to gemm_bf16_avx512.
inline void gemm_bf16_amx(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, float alpha,
                          const bfloat16* a, index_t lda, const bfloat16* b, index_t ldb, float beta, float* c,
                          index_t ldc, const gemm_epilogue& ep = {}) {
#if defined(TRIDENT_HAS_AMX_BF16) && defined(TRIDENT_HAS_AVX512)
  if (detail::amx_usable()) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0 || alpha == 0.0f) {
      detail::scale_c_only(m, n, beta, c, ldc, ep);
      return;
    }
    const int threads =
        detail::gemm_threads(2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k), 8e11);
    detail::gemm_amx_bf16(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep, threads);
    return;
  }
#endif
  gemm_bf16_avx512(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep);
}

}  // namespace paths

/// C(m×n) = act(alpha * op(A) * op(B) + beta * C + bias). Row-major, leading dimensions in
/// elements. op(A) is m×k: A is stored m×k (lda >= k) when !trans_a, k×m (lda >= m) when
/// trans_a; likewise B (k×n). beta == 0 means C is write-only (never read: may hold NaN).
/// alpha == 0 or k == 0 leaves C = act(beta * C + bias) without reading A or B.
inline void gemm(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, float alpha, const float* a,
                 index_t lda, const float* b, index_t ldb, float beta, float* c, index_t ldc,
                 const gemm_epilogue& ep = {}) {
  paths::gemm_f32_auto(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep);
}

/// Double-precision GEMM (reference quality, cache-blocked; used by gradient checks).
/// The bias is read as float.
inline void gemm(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, double alpha, const double* a,
                 index_t lda, const double* b, index_t ldb, double beta, double* c, index_t ldc,
                 const gemm_epilogue& ep = {}) {
  paths::gemm_with<default_f64_kernel>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep);
}

/// bf16 inputs, fp32 accumulation and output: AMX-BF16 when available, else AVX512-BF16
/// dot products, else widened to fp32.
inline void gemm(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, float alpha, const bfloat16* a,
                 index_t lda, const bfloat16* b, index_t ldb, float beta, float* c, index_t ldc,
                 const gemm_epilogue& ep = {}) {
  paths::gemm_bf16_amx(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep);
}

/// half inputs, fp32 accumulation and output (panels widened to fp32 while packing).
inline void gemm(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, float alpha, const half* a,
                 index_t lda, const half* b, index_t ldb, float beta, float* c, index_t ldc,
                 const gemm_epilogue& ep = {}) {
  paths::gemm_f32_auto(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep);
}

/// Strided batched GEMM: `batch` independent GEMMs with A_i = a + i*stride_a, B_i = b +
/// i*stride_b, C_i = c + i*stride_c (a stride of 0 shares an operand, e.g. a weight; the
/// C_i must not overlap). Small problems run one matrix per thread; large ones thread
/// inside each GEMM.
/// @tparam T input element type (float, double, bfloat16 or half)
/// @tparam Acc accumulate/output type (float, or double for double inputs)
template <class T, class Acc>
void gemm_batched(index_t batch, bool trans_a, bool trans_b, index_t m, index_t n, index_t k, Acc alpha,
                  const T* a, index_t lda, index_t stride_a, const T* b, index_t ldb, index_t stride_b, Acc beta,
                  Acc* c, index_t ldc, index_t stride_c, const gemm_epilogue& ep = {}) {
  static_assert(std::is_same_v<Acc, double> == std::is_same_v<T, double>,
                "gemm_batched: double inputs accumulate in double, the others in float");
  if (batch <= 0 || m <= 0 || n <= 0) return;
#if defined(TRIDENT_HAS_OPENMP)
  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  const int nt = omp_in_parallel() ? 1 : omp_get_max_threads();
  // Across the batch when each GEMM alone is too small to thread well, or when the batch
  // divides evenly among the threads.
  const bool across = nt > 1 && batch > 1 && (flops < 3.0e7 || batch % nt == 0 || batch >= 4 * nt);
  if (across) {
    const int threads = static_cast<int>(std::min<index_t>(nt, batch));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (index_t i = 0; i < batch; ++i) {
      gemm(trans_a, trans_b, m, n, k, alpha, a + i * stride_a, lda, b + i * stride_b, ldb, beta, c + i * stride_c,
           ldc, ep);
    }
    return;
  }
#endif
  for (index_t i = 0; i < batch; ++i) {
    gemm(trans_a, trans_b, m, n, k, alpha, a + i * stride_a, lda, b + i * stride_b, ldb, beta, c + i * stride_c, ldc,
         ep);
  }
}

}  // namespace trident::cpu_kernels
