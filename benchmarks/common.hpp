#pragma once
/// @file benchmarks/common.hpp
/// What the benchmarks that need only trident share: medians, timing loops, and STREAM's triad
/// loop (as in bench_bandwidth.cpp and stream.c), so that a benchmark can measure the machine's
/// bandwidth in the same run as its own workload and report against it.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include <trident/backend/cpu/device.hpp>
#include <trident/core/tensor.hpp>

namespace trident::bench {

/// Random token ids in [0, vocab) for inputs x and targets y (the same fixed sequence in every
/// benchmark that trains on random tokens: bench_gpt, bench_dp_gpt).
inline void random_tokens(std::vector<std::int32_t>& x, std::vector<std::int32_t>& y, std::int64_t vocab) {
  std::uint64_t r = 42;
  const auto next = [&] {
    r = r * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<std::int32_t>((r >> 33) % static_cast<std::uint64_t>(vocab));
  };
  for (std::size_t i = 0; i < x.size(); ++i) {
    x[i] = next();
    y[i] = next();
  }
}

using clock_type = std::chrono::steady_clock;

/// The options every benchmark takes: --rounds R, --min-seconds S (per measurement), --json.
struct run_options {
  int rounds;
  double min_seconds;
  bool json = false;

  /// Consumes argv[i] (and its value, moving i onto it) when it is one of these options.
  bool parse(int& i, int argc, char** argv) {
    const std::string a = argv[i];
    if (a == "--rounds" && i + 1 < argc) {
      rounds = std::atoi(argv[++i]);
    } else if (a == "--min-seconds" && i + 1 < argc) {
      min_seconds = std::atof(argv[++i]);
    } else if (a == "--json") {
      json = true;
    } else {
      return false;
    }
    return true;
  }
};

/// The median (0 for an empty vector).
inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

inline double min_of(const std::vector<double>& v) { return v.empty() ? 0 : *std::min_element(v.begin(), v.end()); }
inline double max_of(const std::vector<double>& v) { return v.empty() ? 0 : *std::max_element(v.begin(), v.end()); }

/// Seconds one call of f takes.
inline double seconds_of(const std::function<void()>& f) {
  const auto t0 = clock_type::now();
  f();
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

/// Median seconds per call of f over calls made for at least min_seconds (and at least
/// min_calls calls), after one untimed call.
inline double median_seconds_per_call(const std::function<void()>& f, double min_seconds, int min_calls = 3) {
  f();
  std::vector<double> t;
  double total = 0;
  while (total < min_seconds || static_cast<int>(t.size()) < min_calls) {
    t.push_back(seconds_of(f));
    total += t.back();
  }
  return median(t);
}

/// STREAM's triad a = b + s*c, as in stream.c: OpenMP parallel for over plain arrays.
inline void stream_triad(float* a, const float* b, const float* c, float s, index_t n) {
#pragma omp parallel for schedule(static)
  for (index_t j = 0; j < n; ++j) a[j] = b[j] + s * c[j];
}

/// STREAM triad bandwidth (GB/s, 12 B per element as STREAM counts) over three arrays of n
/// floats: the median of `reps` calls (bench_bandwidth's statistic; STREAM itself reports the
/// best). The arrays are paged in at construction by the threads that will use them.
class triad_meter {
 public:
  explicit triad_meter(index_t n) : n_(n), a_(tensor<float>::uninitialized({n})), b_(tensor<float>::uninitialized({n})),
                                    c_(tensor<float>::uninitialized({n})) {
    float* a = a_.data();
    float* b = b_.data();
    float* c = c_.data();
#pragma omp parallel for schedule(static)
    for (index_t j = 0; j < n; ++j) {
      a[j] = 1.0f;
      b[j] = 2.0f;
      c[j] = 0.5f;
    }
  }
  double gbps(int reps = 5) {
    std::vector<double> t;
    for (int r = 0; r < reps; ++r) t.push_back(seconds_of([&] { stream_triad(a_.data(), b_.data(), c_.data(), 3.0f, n_); }));
    return 12.0 * static_cast<double>(n_) / median(t) * 1e-9;
  }

 private:
  index_t n_;
  tensor<float> a_, b_, c_;
};

/// GFLOP/s of independent register-only FMA chains on every thread: the FMA ceiling of the
/// machine right now, measured in the same run as the GEMMs.
inline double fma_ceiling_gflops(double seconds) {
  double total = 0;
#if defined(_OPENMP)
#pragma omp parallel reduction(+ : total)
#endif
  {
#if defined(__AVX512F__)
    using vec = float __attribute__((vector_size(64)));
#elif defined(__AVX__)
    using vec = float __attribute__((vector_size(32)));
#else
    using vec = float __attribute__((vector_size(16)));
#endif
    constexpr int chains = 24, lanes = sizeof(vec) / sizeof(float);
    vec acc[chains];
    for (int i = 0; i < chains; ++i) acc[i] = vec{} + 0.001f * float(i);
    vec x = vec{} + 0.999f, y = vec{} + 1e-7f;
    long iters = 0;
    const auto t0 = clock_type::now();
    double elapsed = 0;
    do {
      for (int rep = 0; rep < 4096; ++rep) {
#pragma GCC unroll 24
        for (int i = 0; i < chains; ++i) acc[i] = acc[i] * x + y;  // contracted to FMA at -O3 -march=native
        __asm__ volatile("" : "+x"(x));
      }
      iters += 4096;
      elapsed = std::chrono::duration<double>(clock_type::now() - t0).count();
    } while (elapsed < seconds);
    float sink = 0;
    for (int i = 0; i < chains; ++i) sink += acc[i][0];
    total += 2.0 * chains * lanes * double(iters) / elapsed * 1e-9 + (sink == 1234.5f ? 1e-9 : 0.0);
  }
  return total;
}

/// "median [min, max]" of v, formatted with `fmt` (e.g. "%.2f").
inline std::string spread(const std::vector<double>& v, const char* fmt = "%.2f") {
  char a[32], b[32], c[32];
  std::snprintf(a, sizeof a, fmt, median(v));
  std::snprintf(b, sizeof b, fmt, min_of(v));
  std::snprintf(c, sizeof c, fmt, max_of(v));
  return std::string(a) + " [" + b + ", " + c + "]";
}

}  // namespace trident::bench
