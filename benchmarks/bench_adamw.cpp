// P3: one AdamW step (lr 1e-3, β = (0.9, 0.999), ε 1e-8, weight decay 0.01) over the flat fp32
// buffers of a parameter_store of 64Mi parameters, against the machine's STREAM triad measured
// in the same process, round by round (the PyTorch peer is peers/torch_adamw.py; run-adamw.sh
// alternates the two).
//
// An AdamW step reads θ, g, m, v and writes θ, m, v: 28 bytes per parameter, every written line
// having been read, so 28 B is also the real traffic. The triad is counted as STREAM counts it
// (12 B per element; its real traffic is 16 B with the write-allocate of a). Each round times
// the triad (median of 5 calls) and then the step (median of the steps made in `min_seconds`),
// and the table reports the medians over the rounds of ms/step, GB/s and the per-round ratio
// step GB/s / triad GB/s. Before timing, a sample of parameters is checked against the update
// written out in double after a few steps, so a fast wrong kernel cannot pass.
//
//   bench_adamw [--elements 67108864] [--tensors 1] [--rounds 5] [--min-seconds 1] [--json]
//
// Environment (docs/BENCHMARKS.md): OMP_NUM_THREADS=2 OMP_PROC_BIND=true.
#include <trident/backend/cpu/kernels.hpp>
#include <trident/nn/parameters.hpp>
#include <trident/optim/adam.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common.hpp"

namespace {

using namespace trident;
using P = policy<fp32, cpu>;

constexpr double lr = 1e-3, wd = 0.01, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;

/// Element `i` of a deterministic pattern in [-1, 1) (no generator state: any thread, any order).
float pattern(index_t i, std::uint32_t salt) {
  std::uint32_t x = static_cast<std::uint32_t>(i) * 2654435761u ^ salt;
  x ^= x >> 15;
  x *= 2246822519u;
  x ^= x >> 13;
  return static_cast<float>(x >> 8) * (2.0f / 16777216.0f) - 1.0f;
}

}  // namespace

int main(int argc, char** argv) {
  index_t elements = index_t{64} << 20;
  int tensors = 1;
  bench::run_options args{5, 1.0};
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--elements") && i + 1 < argc) {
      elements = std::atoll(argv[++i]);
    } else if (!std::strcmp(argv[i], "--tensors") && i + 1 < argc) {
      tensors = std::atoi(argv[++i]);
    } else if (args.parse(i, argc, argv)) {
    } else {
      std::fprintf(stderr, "usage: %s [--elements N] [--tensors K] [--rounds R] [--min-seconds S] [--json]\n", argv[0]);
      return 2;
    }
  }
  if (elements <= 0 || tensors <= 0 || args.rounds <= 0 || elements % tensors != 0) {
    std::fprintf(stderr, "bench_adamw: elements must be a positive multiple of tensors, rounds positive\n");
    return 2;
  }

  // The store: `tensors` tensors of elements/tensors parameters each, all weight-decayed.
  nn::parameter_store<P> store;
  for (int t = 0; t < tensors; ++t) {
    std::string name = "w";
    name += std::to_string(t);
    store.declare(name, {elements / tensors});
  }
  store.allocate();
  const index_t n = store.size();
  float* theta = store.params().data();
  float* grad = store.grads().data();
#pragma omp parallel for schedule(static)
  for (index_t i = 0; i < n; ++i) {
    theta[i] = pattern(i, 0x9e3779b9u);
    grad[i] = pattern(i, 0x85ebca6bu);
  }
  optim::adamw opt({lr, beta1, beta2, eps, wd});
  opt.init(store);  // state paged in by the threads that step it

  // Check a sample against the update in double after `check_steps` steps with these gradients.
  constexpr int check_steps = 3;
  std::mt19937_64 pick(7);
  std::vector<index_t> sample(4096);
  for (auto& i : sample) i = static_cast<index_t>(pick() % static_cast<std::uint64_t>(n));
  std::vector<double> p0(sample.size()), g0(sample.size());
  for (std::size_t k = 0; k < sample.size(); ++k) {
    p0[k] = theta[sample[k]];
    g0[k] = grad[sample[k]];
  }
  for (int s = 0; s < check_steps; ++s) opt.step(store);
  double err = 0;
  for (std::size_t k = 0; k < sample.size(); ++k) {
    double p = p0[k], m = 0, v = 0;
    const double g = g0[k];
    for (int t = 1; t <= check_steps; ++t) {
      p *= 1.0 - lr * wd;
      m = beta1 * m + (1 - beta1) * g;
      v = beta2 * v + (1 - beta2) * g * g;
      const double bc1 = 1 - std::pow(beta1, t), bc2 = 1 - std::pow(beta2, t);
      p -= lr / bc1 * m / (std::sqrt(v) / std::sqrt(bc2) + eps);
    }
    err = std::max(err, std::fabs(p - double(theta[sample[k]])) / (std::fabs(p) + 1e-3));
  }
  const bool ok = err < 1e-5;

  bench::triad_meter triad(elements);
  const int threads = cpu_kernels::available_threads();
  std::printf("# bench_adamw: %lld parameters in %d tensor(s), %d threads, %d rounds, check after %d steps: "
              "max rel. error %.2e -> %s\n",
              static_cast<long long>(store.count()), tensors, threads, args.rounds, check_steps, err, ok ? "ok" : "FAILED");
  const double bytes = 28.0 * static_cast<double>(store.count());
  std::vector<double> ms, gbps, tri, frac;
  for (int r = 0; r < args.rounds; ++r) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    tri.push_back(triad.gbps(5));
    const double s = bench::median_seconds_per_call([&] { opt.step(store); }, args.min_seconds);
    ms.push_back(s * 1e3);
    gbps.push_back(bytes / s * 1e-9);
    frac.push_back(gbps.back() / tri.back());
  }
  std::printf("| metric | median [min, max] over %d rounds |\n|---|---|\n", args.rounds);
  std::printf("| ours AdamW ms/step | %s |\n", bench::spread(ms).c_str());
  std::printf("| ours AdamW GB/s (28 B/param) | %s |\n", bench::spread(gbps).c_str());
  std::printf("| ours AdamW Mparam/s | %.1f |\n", static_cast<double>(store.count()) / bench::median(ms) * 1e-3);
  std::printf("| STREAM triad GB/s (12 B/elem) | %s |\n", bench::spread(tri).c_str());
  std::printf("| AdamW GB/s / triad GB/s | %s |\n", bench::spread(frac, "%.3f").c_str());
  // The triad's real traffic is 16 B/element (the write-allocate of a); AdamW's is its 28 B.
  std::printf("| AdamW / triad, real traffic (28 B vs 16 B) | %.3f |\n", bench::median(frac) * 12.0 / 16.0);
  if (args.json) {
    std::printf("{\"bench\":\"adamw\",\"threads\":%d,\"params\":%lld,\"tensors\":%d,\"ms_step\":%.4f,\"gbps\":%.3f,"
                "\"triad_gbps\":%.3f,\"frac_triad\":%.4f,\"err\":%.3g}\n",
                threads, static_cast<long long>(store.count()), tensors, bench::median(ms), bench::median(gbps),
                bench::median(tri), bench::median(frac), err);
  }
  return ok ? 0 : 1;
}
