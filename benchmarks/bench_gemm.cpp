// P2 / P2b: GEMM, row-major, M = N = K, against OpenBLAS (sgemm) and Eigen, measured in the
// same process, interleaved round by round:
//
//   ours fp32 | OpenBLAS fp32 | Eigen fp32 | ours bf16 (bf16 inputs, fp32 accumulation)
//
// Each measurement repeats the call for at least `min_seconds` and keeps the time per call;
// the table reports the median over the rounds of GFLOP/s and of the per-round ratios.
// Before timing, our results are checked against OpenBLAS (max error relative to max |C|),
// the bf16 one against OpenBLAS on the same (widened) bf16 inputs, so a fast wrong kernel
// cannot pass. A pause separates the libraries so that one's spinning thread pool does not
// steal the cores from the next.
//
//   bench_gemm [--sizes 256,512,1024,2048] [--rounds 7] [--min-seconds 0.25] [--json]
//
// Environment (see docs/BENCHMARKS.md): OMP_NUM_THREADS=2 OMP_PROC_BIND=true
// OPENBLAS_CORETYPE=SkylakeX; the OpenBLAS and Eigen thread counts follow OMP_NUM_THREADS.
#include <trident/backend/cpu/gemm.hpp>

#include <cblas.h>

// Eigen's AVX-512 code trips GCC 12's false -Wmaybe-uninitialized (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <new>
#include <vector>

#include <dirent.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "common.hpp"

extern "C" void openblas_set_num_threads(int);

namespace {

// (cblas.h declares its own global `bfloat16`: ours is always spelled trident::bfloat16 here.)
using trident::index_t;
using trident::bench::clock_type;
using trident::bench::median;

/// Allocator with 64-byte alignment.
template <class T>
struct aligned_allocator {
  using value_type = T;
  aligned_allocator() = default;
  template <class U>
  aligned_allocator(const aligned_allocator<U>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{64}); }
  friend bool operator==(const aligned_allocator&, const aligned_allocator&) { return true; }
};
template <class T>
using aligned_vector = std::vector<T, aligned_allocator<T>>;

/// Seconds per call of f: repeats until min_seconds have passed (at least twice).
double time_per_call(const std::function<void()>& f, double min_seconds) {
  f();  // warm caches, thread pools and packing buffers
  int reps = 0;
  const auto t0 = clock_type::now();
  double elapsed = 0;
  do {
    f();
    ++reps;
    elapsed = std::chrono::duration<double>(clock_type::now() - t0).count();
  } while (elapsed < min_seconds || reps < 2);
  return elapsed / reps;
}

template <class V>
double max_rel_error(const V& got, const V& ref) {
  double err = 0, mag = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    err = std::max(err, std::abs(double(got[i]) - double(ref[i])));
    mag = std::max(mag, std::abs(double(ref[i])));
  }
  return mag > 0 ? err / mag : err;
}

std::vector<index_t> parse_sizes(const char* s) {
  std::vector<index_t> out;
  std::string str(s);
  std::size_t pos = 0;
  while (pos < str.size()) {
    const std::size_t comma = str.find(',', pos);
    out.push_back(std::stoll(str.substr(pos, comma - pos)));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

/// Sets the CPU mask of every thread of this process except the calling one to all online CPUs.
void release_foreign_threads() {
  cpu_set_t all;
  CPU_ZERO(&all);
  const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  for (long i = 0; i < cpus && i < CPU_SETSIZE; ++i) CPU_SET(static_cast<int>(i), &all);
  const pid_t self = static_cast<pid_t>(syscall(SYS_gettid));
  if (DIR* dir = opendir("/proc/self/task")) {
    while (const dirent* e = readdir(dir)) {
      const pid_t tid = static_cast<pid_t>(std::atoi(e->d_name));
      if (tid > 0 && tid != self) sched_setaffinity(tid, sizeof all, &all);
    }
    closedir(dir);
  }
}

struct impl {
  const char* name;
  std::function<void()> run;
  std::vector<double> gflops;
};

}  // namespace

int main(int argc, char** argv) {
  std::vector<index_t> sizes = {256, 512, 1024, 2048};
  trident::bench::run_options args{7, 0.25};
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--sizes") && i + 1 < argc) {
      sizes = parse_sizes(argv[++i]);
    } else if (!args.parse(i, argc, argv)) {
      std::fprintf(stderr, "usage: %s [--sizes 256,512,...] [--rounds N] [--min-seconds S] [--json]\n", argv[0]);
      return 2;
    }
  }
  int threads = 1;
#if defined(_OPENMP)
  threads = omp_get_max_threads();
#endif
  openblas_set_num_threads(threads);
  {
    // With OMP_PROC_BIND=true, libgomp pins this (initial) thread to one core when the
    // program loads, and OpenBLAS's worker threads, created after that, inherit the
    // one-core mask: OpenBLAS would then run both its threads on one core. Give every
    // thread but this one (OpenMP has started no workers yet) all the cores back, as
    // OpenBLAS has in a process of its own.
    std::vector<float> x(256 * 256, 1.0f), y(256 * 256);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, 256, 256, 256, 1.0f, x.data(), 256, x.data(), 256, 0.0f,
                y.data(), 256);
    release_foreign_threads();
  }
  Eigen::setNbThreads(threads);
  const bool amx = trident::cpu_kernels::paths::amx_available();
  std::printf("# bench_gemm: %d threads, OPENBLAS_CORETYPE=%s, bf16 path: %s\n", threads,
              std::getenv("OPENBLAS_CORETYPE") ? std::getenv("OPENBLAS_CORETYPE") : "(unset)",
              amx ? "AMX-BF16" : (trident::cpu_kernels::paths::avx512_bf16_available ? "AVX512-BF16" : "fp32 widening"));
  std::printf("# %5s %-14s %10s %10s %10s  %s\n", "size", "impl", "GFLOP/s", "min", "max", "ratio ours/impl (median of rounds)");

  std::string json_line = "{\"bench\":\"gemm\",\"threads\":" + std::to_string(threads) + ",\"results\":[";
  bool first_json = true;
  bool all_ok = true;
  for (const index_t n : sizes) {
    std::mt19937 gen(42);
    std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
    const std::size_t nn = static_cast<std::size_t>(n * n);
    // 64-byte aligned, as trident's tensors and PyTorch's allocations are (a plain vector's
    // large blocks start 16 bytes into a page, which splits every row of C across lines).
    aligned_vector<float> a(nn), b(nn), c_ours(nn), c_blas(nn), c_eigen(nn), c_bf16(nn), c_ref16(nn);
    aligned_vector<trident::bfloat16> a16(nn), b16(nn);
    aligned_vector<float> a16w(nn), b16w(nn);
    for (std::size_t i = 0; i < nn; ++i) {
      a[i] = uni(gen);
      b[i] = uni(gen);
      a16[i] = trident::bfloat16(a[i]);
      b16[i] = trident::bfloat16(b[i]);
      a16w[i] = float(a16[i]);
      b16w[i] = float(b16[i]);
    }
    using row_major = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    Eigen::Map<const row_major> ea(a.data(), n, n), eb(b.data(), n, n);
    Eigen::Map<row_major> ec(c_eigen.data(), n, n);

    impl impls[] = {
        {"ours fp32",
         [&] {
           trident::cpu_kernels::gemm(false, false, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c_ours.data(), n);
         },
         {}},
        {"openblas fp32",
         [&] {
           cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(n), int(n), int(n), 1.0f, a.data(), int(n),
                       b.data(), int(n), 0.0f, c_blas.data(), int(n));
         },
         {}},
        {"eigen fp32", [&] { ec.noalias() = ea * eb; }, {}},
        {"ours bf16",
         [&] {
           trident::cpu_kernels::gemm(false, false, n, n, n, 1.0f, a16.data(), n, b16.data(), n, 0.0f, c_bf16.data(),
                                      n);
         },
         {}},
    };
    constexpr int n_impls = 4;

    // Correctness first.
    for (auto& im : impls) im.run();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(n), int(n), int(n), 1.0f, a16w.data(), int(n),
                b16w.data(), int(n), 0.0f, c_ref16.data(), int(n));
    const double err32 = max_rel_error(c_ours, c_blas), err_eigen = max_rel_error(c_eigen, c_blas);
    const double err16 = max_rel_error(c_bf16, c_ref16);
    // fp32 sums of n products of numbers in [-1, 1]: differences of a few n*eps relative to max|C|.
    const double bound = 4.0 * double(n) * 1.2e-7 / std::sqrt(double(n));
    const bool ok = err32 < bound && err16 < bound;
    all_ok = all_ok && ok;
    std::printf("# n=%lld check: ours fp32 vs OpenBLAS %.2e, Eigen vs OpenBLAS %.2e, ours bf16 vs OpenBLAS(bf16 inputs) %.2e -> %s\n",
                static_cast<long long>(n), err32, err_eigen, err16, ok ? "ok" : "FAILED");

    const double flops = 2.0 * double(n) * double(n) * double(n);
    std::vector<double> ratio_blas, ratio_eigen, ceiling, frac_ceiling;
    for (int r = 0; r < args.rounds; ++r) {
      std::this_thread::sleep_for(std::chrono::milliseconds(150));
      ceiling.push_back(trident::bench::fma_ceiling_gflops(0.1));
      double gf[n_impls];
      for (int i = 0; i < n_impls; ++i) {
        // Let the previous library's threads go idle (OpenBLAS spins ~0.1 s after a call).
        std::this_thread::sleep_for(std::chrono::milliseconds(150));
        gf[i] = flops / time_per_call(impls[i].run, args.min_seconds) * 1e-9;
        impls[i].gflops.push_back(gf[i]);
      }
      frac_ceiling.push_back(gf[0] / ceiling.back());
      ratio_blas.push_back(gf[0] / gf[1]);
      ratio_eigen.push_back(gf[0] / gf[2]);
    }
    for (int i = 0; i < n_impls; ++i) {
      const auto& g = impls[i].gflops;
      std::string ratio;
      if (i == 1) ratio = "ours/openblas " + std::to_string(median(ratio_blas)).substr(0, 5);
      if (i == 2) ratio = "ours/eigen " + std::to_string(median(ratio_eigen)).substr(0, 5);
      std::printf("  %5lld %-14s %10.1f %10.1f %10.1f  %s\n", static_cast<long long>(n), impls[i].name, median(g),
                  *std::min_element(g.begin(), g.end()), *std::max_element(g.begin(), g.end()), ratio.c_str());
    }
    std::printf("  %5lld %-14s %10.1f %10.1f %10.1f  ours fp32 = %.1f%% of it (median of rounds)\n",
                static_cast<long long>(n), "FMA ceiling", median(ceiling),
                *std::min_element(ceiling.begin(), ceiling.end()), *std::max_element(ceiling.begin(), ceiling.end()),
                100.0 * median(frac_ceiling));
    std::fflush(stdout);
    char buf[640];
    std::snprintf(buf, sizeof buf,
                  "%s{\"n\":%lld,\"ours_fp32\":%.2f,\"openblas_fp32\":%.2f,\"eigen_fp32\":%.2f,\"ours_bf16\":%.2f,"
                  "\"ratio_openblas\":%.4f,\"ratio_eigen\":%.4f,\"fma_ceiling\":%.2f,\"frac_ceiling\":%.4f,"
                  "\"err_fp32\":%.3g,\"err_bf16\":%.3g}",
                  first_json ? "" : ",", static_cast<long long>(n), median(impls[0].gflops), median(impls[1].gflops),
                  median(impls[2].gflops), median(impls[3].gflops), median(ratio_blas), median(ratio_eigen),
                  median(ceiling), median(frac_ceiling), err32,
                  err16);
    json_line += buf;
    first_json = false;
  }
  json_line += "]}";
  if (args.json) std::printf("%s\n", json_line.c_str());
  return all_ok ? 0 : 1;
}

#pragma GCC diagnostic pop
