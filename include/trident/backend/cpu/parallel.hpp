#pragma once
/// @file backend/cpu/parallel.hpp
/// OpenMP loop helpers for the CPU kernels. Without OpenMP everything runs on the calling
/// thread; inside an existing parallel region, kernels run serially on the calling thread.

#include <algorithm>

#include "../../config.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace trident::cpu_kernels {

/// Threads a kernel may use now (1 inside a parallel region or without OpenMP).
inline int available_threads() noexcept {
#if defined(_OPENMP)
  return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}

/// Calls f(begin, end, chunk_index) on disjoint chunks covering [0, n), one per thread, each a multiple of
/// `align` elements (except the last), using no more threads than keeps `min_chunk` elements
/// each. Chunks are contiguous and in thread order, so per-thread partial results merged in
/// thread order are deterministic for a given thread count.
template <class F>
void parallel_chunks(index_t n, index_t min_chunk, index_t align, F&& f) {
  const int max_threads = available_threads();
  const index_t by_work = min_chunk > 0 ? n / min_chunk : n;
  const int threads = static_cast<int>(std::max<index_t>(1, std::min<index_t>(max_threads, by_work)));
  if (threads <= 1) {
    if (n > 0) f(index_t{0}, n, 0);
    return;
  }
  index_t chunk = (n + threads - 1) / threads;
  chunk = (chunk + align - 1) / align * align;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const index_t begin = std::min<index_t>(n, static_cast<index_t>(t) * chunk);
    const index_t end = std::min<index_t>(n, begin + chunk);
    if (begin < end) f(begin, end, t);
  }
#else
  f(index_t{0}, n, 0);
#endif
}

/// Number of chunks parallel_chunks would use, for sizing per-thread partial results.
inline int chunk_count(index_t n, index_t min_chunk) noexcept {
  const index_t by_work = min_chunk > 0 ? n / min_chunk : n;
  return static_cast<int>(std::max<index_t>(1, std::min<index_t>(available_threads(), by_work)));
}

}  // namespace trident::cpu_kernels
