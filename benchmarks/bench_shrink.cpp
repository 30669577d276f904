// P7: inference latency of a structurally pruned (physically shrunk) MLP against the dense one.
// The MLP 784-1024-1024-10 (ReLU, fp32, batch 256, eval forward) and the same model with its
// two hidden layers cut to 50% and 25% of their units by L2 row norm (prune::rank_rows), built
// at the smaller sizes and filled by prune::copy_shrunk_linear_chain. Reports per model the
// median forward latency, the measured speedup over dense, the ideal speedup (dense FLOPs /
// shrunk FLOPs) and measured / ideal (bar >= 0.7). Each round times the three models one after
// another; the speedups are medians of the per-round ratios. Before timing, each shrunk model's
// output is checked against the dense model with the pruned units zeroed.
//
//   OMP_NUM_THREADS=2 OMP_PROC_BIND=true build-bench/benchmarks/bench_shrink [--batch 256] [--rounds 5]
//       [--min-seconds 0.5] [--json]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include <trident/nn.hpp>
#include <trident/prune.hpp>

#include "common.hpp"

using namespace trident;

namespace {

using P = policy<fp32, cpu>;
constexpr index_t in_features = 784, hidden = 1024, classes = 10;

struct mlp {
  nn::parameter_store<P> store;
  nn::linear<P> fc1, fc2, fc3;
  nn::arena<cpu> memory;
  explicit mlp(index_t h)
      : fc1(store, "fc1", in_features, h, true, activation::relu),
        fc2(store, "fc2", h, h, true, activation::relu),
        fc3(store, "fc3", h, classes) {
    store.allocate();
  }
  /// Eval forward into this model's arena; returns the logits' first element (kept live).
  tensor_view<float, cpu> forward(const tensor<float>& x) {
    memory.reset();
    nn::context<P> ctx{memory, false, nullptr};
    return fc3.forward(ctx, fc2.forward(ctx, fc1.forward(ctx, x.view())));
  }
  /// Forward FLOPs per sample.
  static double flops(index_t h) { return 2.0 * (in_features * h + h * h + h * classes); }
};

/// A copy of `dense` with `keep` units in each hidden layer (by L2 row norm).
std::unique_ptr<mlp> shrink(mlp& dense, index_t keep) {
  auto small = std::make_unique<mlp>(keep);
  const auto k1 = prune::rank_rows(dense.store, dense.fc1.weight(), keep);
  const auto k2 = prune::rank_rows(dense.store, dense.fc2.weight(), keep);
  prune::copy_shrunk_linear_chain(dense.store, {&dense.fc1, &dense.fc2, &dense.fc3}, small->store,
                                  {&small->fc1, &small->fc2, &small->fc3}, {k1, k2});
  return small;
}

/// max |shrunk - zeroed dense| / max |zeroed dense| on x.
double check_exact(mlp& dense, mlp& small, index_t keep, const tensor<float>& x) {
  mlp zeroed(hidden);
  prune::copy_unchanged(dense.store, zeroed.store);
  const auto k1 = prune::rank_rows(dense.store, dense.fc1.weight(), keep);
  const auto k2 = prune::rank_rows(dense.store, dense.fc2.weight(), keep);
  for (auto h : {zeroed.fc1.weight(), zeroed.fc1.bias()}) prune::zero_rows(zeroed.store, h, prune::complement(k1, hidden));
  for (auto h : {zeroed.fc2.weight(), zeroed.fc2.bias()}) prune::zero_rows(zeroed.store, h, prune::complement(k2, hidden));
  const auto a = to_vector(small.forward(x));
  const auto b = to_vector(zeroed.forward(x));
  double d = 0, m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    d = std::max(d, std::fabs(double(a[i]) - b[i]));
    m = std::max(m, std::fabs(double(b[i])));
  }
  return d / m;
}

}  // namespace

int main(int argc, char** argv) {
  bench::run_options run{5, 0.5};
  index_t batch = 256;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (run.parse(i, argc, argv)) continue;
    if (a == "--batch" && i + 1 < argc) {
      batch = std::atoll(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: bench_shrink [--batch N] [--rounds R] [--min-seconds S] [--json]\n");
      return 2;
    }
  }
  if (batch < 1 || run.rounds < 1) {
    std::fprintf(stderr, "bench_shrink: --batch and --rounds must be positive\n");
    return 2;
  }

  mlp dense(hidden);
  generator gen(1234);
  dense.fc1.init(gen);
  dense.fc2.init(gen);
  dense.fc3.init(gen);
  tensor<float> x({batch, in_features});
  uniform(x, gen, -1.0, 1.0);

  const index_t keeps[] = {hidden / 2, hidden / 4};
  std::vector<std::unique_ptr<mlp>> small;
  std::vector<double> exact;
  for (index_t k : keeps) {
    small.push_back(shrink(dense, k));
    exact.push_back(check_exact(dense, *small.back(), k, x));
  }
  const auto sizes_half = prune::compare_sizes(dense.store, small[0]->store);
  const auto sizes_quarter = prune::compare_sizes(dense.store, small[1]->store);

  std::vector<double> t_dense, t_small[2], speed[2];
  for (int r = 0; r < run.rounds; ++r) {
    const double td = bench::median_seconds_per_call([&] { dense.forward(x); }, run.min_seconds);
    t_dense.push_back(td);
    for (int j = 0; j < 2; ++j) {
      const double ts = bench::median_seconds_per_call([&] { small[static_cast<std::size_t>(j)]->forward(x); }, run.min_seconds);
      t_small[j].push_back(ts);
      speed[j].push_back(td / ts);
    }
  }

  const double ideal[2] = {mlp::flops(hidden) / mlp::flops(keeps[0]), mlp::flops(hidden) / mlp::flops(keeps[1])};
  std::printf("MLP 784-1024-1024-10 eval forward, fp32, batch %lld: medians over %d rounds\n", static_cast<long long>(batch), run.rounds);
  std::printf("| model | hidden | ms/batch | GFLOP/s | speedup | ideal | measured/ideal |\n|---|---|---|---|---|---|---|\n");
  const double dm = bench::median(t_dense);
  std::printf("| dense | 1024 | %.3f | %.1f | 1.000 | 1.000 | 1.000 |\n", dm * 1e3, mlp::flops(hidden) * double(batch) / dm * 1e-9);
  const char* names[2] = {"shrunk 50%", "shrunk 25%"};
  for (int j = 0; j < 2; ++j) {
    const double sm = bench::median(t_small[j]), sp = bench::median(speed[j]);
    std::printf("| %s | %lld | %.3f | %.1f | %.3f | %.3f | %.3f |\n", names[j], static_cast<long long>(keeps[j]), sm * 1e3,
                mlp::flops(keeps[j]) * double(batch) / sm * 1e-9, sp, ideal[j], sp / ideal[j]);
  }
  std::printf("measured/ideal (bar >= 0.7): 50%% %.3f, 25%% %.3f\n", bench::median(speed[0]) / ideal[0], bench::median(speed[1]) / ideal[1]);
  std::printf("per-round speedups 50%%: %s; 25%%: %s\n", bench::spread(speed[0], "%.3f").c_str(), bench::spread(speed[1], "%.3f").c_str());
  std::printf("shrunk vs zeroed dense (max rel. difference): 50%% %.2e, 25%% %.2e\n", exact[0], exact[1]);
  std::printf("sizes: 50%%: %s\n       25%%: %s\n", sizes_half.str().c_str(), sizes_quarter.str().c_str());
  if (run.json) {
    std::printf("{\"batch\": %lld, \"dense_ms\": %.6f, \"half_ms\": %.6f, \"quarter_ms\": %.6f, \"speedup_half\": %.6f, "
                "\"speedup_quarter\": %.6f, \"ideal_half\": %.6f, \"ideal_quarter\": %.6f, \"exact_half\": %.3e, \"exact_quarter\": %.3e}\n",
                static_cast<long long>(batch), dm * 1e3, bench::median(t_small[0]) * 1e3, bench::median(t_small[1]) * 1e3,
                bench::median(speed[0]), bench::median(speed[1]), ideal[0], ideal[1], exact[0], exact[1]);
  }
  const bool ok = exact[0] < 1e-5 && exact[1] < 1e-5;
  if (!ok) std::fprintf(stderr, "bench_shrink: a shrunk model does not match the zeroed dense model\n");
  return ok ? 0 : 1;
}
