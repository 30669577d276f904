// P1: memory bandwidth of trident's element-wise and reduction kernels against STREAM's own
// loops (copy c = a, triad a = b + s*c, and a sum), compiled the same way and measured in the
// same run, interleaved, over arrays far larger than the caches. Bandwidth is counted as
// STREAM counts it (copy 8 B, triad 12 B, sum 4 B per element); the median of the rounds is
// reported with the ratio ours / STREAM.
//
//   bench_bandwidth [elements = 64Mi] [rounds = 10]
#include <trident/trident.hpp>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "common.hpp"

namespace {

using namespace trident;
using bench::median;
using bench::seconds_of;
using bench::stream_triad;

// STREAM's other kernels, as in stream.c (the triad is in common.hpp).
void stream_copy(const float* a, float* c, index_t n) {
#pragma omp parallel for schedule(static)
  for (index_t j = 0; j < n; ++j) c[j] = a[j];
}
double stream_sum(const float* a, index_t n) {
  double s = 0;
#pragma omp parallel for schedule(static) reduction(+ : s)
  for (index_t j = 0; j < n; ++j) s += a[j];
  return s;
}

struct row {
  std::string name;
  double bytes_per_element;
  std::function<void()> ours, peer;
  std::vector<double> t_ours{}, t_peer{};
};

}  // namespace

int main(int argc, char** argv) {
  const index_t n = argc > 1 ? std::atoll(argv[1]) : (index_t{64} << 20);
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 10;
  if (n <= 0 || rounds <= 0) {
    std::fprintf(stderr, "usage: bench_bandwidth [elements > 0] [rounds > 0]\n");
    return 2;
  }
  tensor<float> a({n}), b({n}), c({n});
  generator gen(1);
  uniform(a, gen);
  uniform(b, gen);
  uniform(c, gen);
  tensor<bfloat16> ab({n}), bb({n}), cb({n});
  copy(a, ab);
  copy(b, bb);
  copy(c, cb);
  const float s = 3.0f;
  volatile double sink = 0;

  std::vector<row> rows;
  rows.push_back({"copy fp32 (8 B/elem)", 8, [&] { copy(a, c); }, [&] { stream_copy(a.data(), c.data(), n); }});
  rows.push_back({"triad fp32 (12 B/elem)", 12, [&] { axpby(1.0, b, s, c, a); },
                  [&] { stream_triad(a.data(), b.data(), c.data(), s, n); }});
  rows.push_back({"add fp32 (12 B/elem)", 12, [&] { add(b, c, a); }, [&] { stream_triad(a.data(), b.data(), c.data(), 1.0f, n); }});
  rows.push_back({"sum fp32 (4 B/elem)", 4, [&] { sink = sink + sum(a); }, [&] { sink = sink + stream_sum(a.data(), n); }});
  rows.push_back({"l2_norm fp32 (4 B/elem)", 4, [&] { sink = sink + l2_norm(a); }, [&] { sink = sink + stream_sum(a.data(), n); }});
  // bf16 triad moves half the bytes; compared with the fp32 STREAM triad in bytes per second.
  rows.push_back({"triad bf16 (6 B/elem)", 6, [&] { axpby(1.0, bb, s, cb, ab); },
                  [&] { stream_triad(a.data(), b.data(), c.data(), s, n); }});

  for (auto& r : rows) {  // warm-up: page in, spin up the threads
    r.ours();
    r.peer();
  }
  for (int i = 0; i < rounds; ++i) {
    for (auto& r : rows) {
      r.t_peer.push_back(seconds_of(r.peer));
      r.t_ours.push_back(seconds_of(r.ours));
    }
  }

  const double elems = static_cast<double>(n);
  // The STREAM triad of this run is the bar every kernel is held to (docs/BENCHMARKS.md, P1).
  const auto& triad = rows[1];
  const double triad_gbps = 12.0 * elems / median(triad.t_peer) * 1e-9;
  std::printf("# P1 bandwidth, %lld elements per array, %d rounds, threads %d, median GB/s (STREAM counting)\n",
              static_cast<long long>(n), rounds, cpu_kernels::available_threads());
  std::printf("# STREAM triad in this run: %.2f GB/s\n", triad_gbps);
  std::printf("| kernel | trident GB/s | STREAM-loop peer GB/s | trident / peer | trident / STREAM triad |\n|---|---|---|---|---|\n");
  for (auto& r : rows) {
    // the peer of 'add' and of the bf16 triad is the fp32 STREAM triad (12 B/elem)
    const double peer_bytes = (r.name.rfind("triad bf16", 0) == 0 || r.name.rfind("add", 0) == 0) ? 12 : r.bytes_per_element;
    const double ours = r.bytes_per_element * elems / median(r.t_ours) * 1e-9;
    const double peer = peer_bytes * elems / median(r.t_peer) * 1e-9;
    std::printf("| %s | %.2f | %.2f | %.3f | %.3f |\n", r.name.c_str(), ours, peer, ours / peer, ours / triad_gbps);
  }
  return sink == 12345.678 ? 1 : 0;  // keeps the reductions alive
}
