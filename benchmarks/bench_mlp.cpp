// P5: training an MLP 784-1024-1024-10 (linear + ReLU fused into the GEMM epilogue, linear +
// ReLU, linear, softmax cross-entropy), batch 256, SGD(lr 0.01, momentum 0.9), on one fixed
// synthetic batch, in fp32 (policy<fp32, cpu>) and bf16_mixed (policy<bf16_mixed, cpu>: bf16
// weights and activations, fp32 gradients and master weights). A step is forward, loss,
// backward, the optimizer step and zeroing the gradients, as a PyTorch training loop does
// (peers/torch_mlp.py; run-mlp.sh alternates the two). As in PyTorch, the first layer computes
// no input gradient (its input is data), and the gradients are zeroed without a pass of their
// own (the SGD step clears them as it reads them; PyTorch's zero_grad(set_to_none=True)).
//
// Each round times fp32 then bf16_mixed steps (median of the steps made in `min_seconds`) and
// the table gives medians over the rounds of samples/s, of GFLOP/s at 11.17 MFLOP per sample
// (3 x 2 x 1,861,632 multiply-adds, as docs/BENCHMARKS.md counts: forward, weight gradients and
// input gradients of every layer; the first layer's input gradient, 1.61 MFLOP, is counted but
// neither we nor PyTorch compute it) and of the per-round ratio bf16_mixed / fp32. Before
// timing, the gradients of one step of each precision are checked against the fp64 model with
// the same (rounded) weights and inputs, the loss must fall over 21 steps, and the steps must
// leave the gradients zero, so a fast wrong kernel cannot pass.
//
//   bench_mlp [--batch 256] [--rounds 5] [--min-seconds 1] [--json]
//   bench_mlp --memory [--batch 256]   the fp32 run's peak resident memory against its parts
//
// Environment (docs/BENCHMARKS.md): OMP_NUM_THREADS=2 OMP_PROC_BIND=true.
#include <trident/backend/cpu/kernels.hpp>
#include <trident/backend/cpu/nn_kernels.hpp>
#include <trident/nn/linear.hpp>
#include <trident/nn/loss.hpp>
#include <trident/ops/fill.hpp>
#include <trident/optim/sgd.hpp>
#include <trident/train/memory.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "common.hpp"
#include "p5_mlp.hpp"

namespace {

using namespace trident;

using bench::classes;
using bench::hidden;
using bench::in_features;
constexpr double flop_per_sample = 6.0 * (in_features * hidden + hidden * hidden + hidden * classes);

/// The model, its parameters, optimizer, step memory and one synthetic batch.
/// @tparam P the policy bundle
template <policy_bundle P>
struct trainer : bench::p5_mlp<P> {
  explicit trainer(index_t batch) : bench::p5_mlp<P>(batch, 0, batch) {
    this->opt.set_zero_grad_in_step(true);  // the step leaves the gradients zero: no zero_grad() pass
  }

  /// One training step: forward, backward, and the optimizer step, which also zeroes the
  /// gradients for the next one (PyTorch's loop: zero_grad(set_to_none=True), forward,
  /// backward, step).
  void step() {
    this->forward_backward();
    this->opt.step(this->store);
  }
};

/// Max over the tensors of ||grad - reference|| / ||reference|| (2-norms), against the fp64 model
/// with the same weights (params rounded to the storage type) and inputs.
template <policy_bundle P>
double gradient_error(trainer<P>& t) {
  using F64 = policy<fp64, cpu>;
  const index_t batch = t.x.size(0);
  nn::parameter_store<F64> store;
  nn::linear<F64> fc1{store, "fc1", in_features, hidden, true, activation::relu};
  nn::linear<F64> fc2{store, "fc2", hidden, hidden, true, activation::relu};
  nn::linear<F64> fc3{store, "fc3", hidden, classes};
  nn::softmax_cross_entropy<F64> loss_fn;
  store.allocate();
  for (int i = 0; i < static_cast<int>(store.infos().size()); ++i) {
    copy(t.store.param(nn::parameter_handle{i}), store.param(nn::parameter_handle{i}));
  }
  auto x = tensor<double>({batch, in_features});
  copy(t.x, x);
  nn::arena<cpu> memory;
  nn::context<F64> ctx{memory, true, nullptr};
  const auto logits = fc3.forward(ctx, fc2.forward(ctx, fc1.forward(ctx, x.view())));
  loss_fn.forward(ctx, logits, t.labels);
  fc1.backward(ctx, fc2.backward(ctx, fc3.backward(ctx, loss_fn.backward(ctx))));

  t.store.zero_grad();
  t.forward_backward();
  double worst = 0;
  for (int i = 0; i < static_cast<int>(store.infos().size()); ++i) {
    const auto ref = tensor<double>::uninitialized(store.grad(nn::parameter_handle{i}).shape());
    auto got = tensor<double>::uninitialized(ref.shape());
    copy(t.store.grad(nn::parameter_handle{i}), got);
    const auto r = store.grad(nn::parameter_handle{i});
    double err = 0, mag = 0;
    const double* g = got.data();
    const double* e = r.data();
    for (index_t k = 0; k < r.numel(); ++k) {
      err += (g[k] - e[k]) * (g[k] - e[k]);
      mag += e[k] * e[k];
    }
    worst = std::max(worst, mag > 0 ? std::sqrt(err / mag) : std::sqrt(err));
  }
  t.store.zero_grad();
  return worst;
}

}  // namespace

/// The memory bar: peak resident memory of an fp32 training run (this process does nothing
/// else) against parameters + gradients + optimizer state + one batch of activations.
int memory_report(index_t batch) {
  const std::size_t before = train::resident_bytes();
  trainer<policy<fp32, cpu>> t(batch);
  for (int s = 0; s < 50; ++s) t.step();
  const std::size_t peak = train::peak_resident_bytes();
  std::size_t state = 0;
  for (const auto& st : t.opt.state_tensors()) state += static_cast<std::size_t>(st.values.numel()) * sizeof(float);
  const std::size_t params = t.store.bytes(), act = t.memory.capacity_bytes(),
                    data = t.x.bytes() + t.labels.size() * sizeof(std::int32_t);
  const std::size_t parts = params + state + act + data;
  const auto mib = [](std::size_t b) { return static_cast<double>(b) / (1024.0 * 1024.0); };
  std::printf("| part | MiB |\n|---|---|\n");
  std::printf("| parameters + gradients (fp32: no separate master) | %.2f |\n", mib(params));
  std::printf("| optimizer state (momentum) | %.2f |\n", mib(state));
  std::printf("| activations (arena, one batch of %lld) | %.2f |\n", static_cast<long long>(batch), mib(act));
  std::printf("| the batch (inputs, labels) | %.2f |\n", mib(data));
  std::printf("| sum | %.2f |\n", mib(parts));
  std::printf("| process before the model (code, libraries, OpenMP) | %.2f |\n", mib(before));
  std::printf("| peak resident (VmHWM) | %.2f |\n", mib(peak));
  std::printf("peak / sum: %.2f (bar <= 1.5); (peak - process before) / sum: %.2f\n",
              static_cast<double>(peak) / static_cast<double>(parts),
              static_cast<double>(peak - before) / static_cast<double>(parts));
  return 0;
}

int main(int argc, char** argv) {
  index_t batch = 256;
  bench::run_options args{5, 1.0};
  bool memory = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--batch") && i + 1 < argc) {
      batch = std::atoll(argv[++i]);
    } else if (args.parse(i, argc, argv)) {
    } else if (!std::strcmp(argv[i], "--memory")) {
      memory = true;
    } else {
      std::fprintf(stderr, "usage: %s [--batch N] [--rounds R] [--min-seconds S] [--json] [--memory]\n", argv[0]);
      return 2;
    }
  }
  if (batch <= 0 || args.rounds <= 0) {
    std::fprintf(stderr, "bench_mlp: batch and rounds must be positive\n");
    return 2;
  }

  if (memory) return memory_report(batch);

  trainer<policy<fp32, cpu>> f32(batch);
  trainer<policy<bf16_mixed, cpu>> b16(batch);
  const double err32 = gradient_error(f32), err16 = gradient_error(b16);
  // fp32: sums of up to 1024 products (measured ≈4e-7). bf16_mixed: activations and their
  // gradients rounded to bf16 (2^-9); below the last layer the error is dominated by the ReLU
  // units whose pre-activation is within rounding of zero (≈0.1%): each flip moves a whole
  // element, so the norm error there is ≈3% (fc3's own gradients: ≈0.3%).
  const bool ok = err32 < 1e-5 && err16 < 1e-1;
  // The loss must fall on the fixed batch (a step that computes nothing would not).
  f32.step();
  b16.step();
  const double first32 = f32.loss, first16 = b16.loss;
  for (int s = 0; s < 20; ++s) {
    f32.step();
    b16.step();
  }
  const double l32 = f32.loss, l16 = b16.loss;
  // ... and the steps must have left the gradients zero.
  auto grads_zero = [](auto& t) {
    const float* g = t.store.grads().data();
    return std::all_of(g, g + t.store.size(), [](float v) { return v == 0.0f; });
  };
  const bool zeroed = grads_zero(f32) && grads_zero(b16);
  const bool learns = l32 < 0.98 * first32 && l16 < 0.98 * first16 && zeroed;
  const int threads = cpu_kernels::available_threads();
  std::printf("# bench_mlp: 784-1024-1024-10, batch %lld, %d threads, %d rounds; gradients vs fp64: fp32 %.2e, "
              "bf16_mixed %.2e -> %s; loss over 21 steps: fp32 %.3f -> %.3f, bf16_mixed %.3f -> %.3f, gradients left %s -> %s\n",
              static_cast<long long>(batch), threads, args.rounds, err32, err16, ok ? "ok" : "FAILED", first32, l32, first16, l16,
              zeroed ? "zero" : "NONZERO", learns ? "ok" : "FAILED");

  const double samples = static_cast<double>(batch);
  std::vector<double> sps32, sps16, ratio;
  for (int r = 0; r < args.rounds; ++r) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    sps32.push_back(samples / bench::median_seconds_per_call([&] { f32.step(); }, args.min_seconds));
    sps16.push_back(samples / bench::median_seconds_per_call([&] { b16.step(); }, args.min_seconds));
    ratio.push_back(sps16.back() / sps32.back());
  }
  auto gflops = [&](const std::vector<double>& sps) {
    std::vector<double> g;
    for (double s : sps) g.push_back(s * flop_per_sample * 1e-9);
    return g;
  };
  std::printf("| precision | samples/s | GFLOP/s (11.17 MFLOP/sample) |\n|---|---|---|\n");
  std::printf("| ours fp32 | %s | %s |\n", bench::spread(sps32, "%.0f").c_str(), bench::spread(gflops(sps32), "%.1f").c_str());
  std::printf("| ours bf16_mixed | %s | %s |\n", bench::spread(sps16, "%.0f").c_str(),
              bench::spread(gflops(sps16), "%.1f").c_str());
  std::printf("# bf16_mixed / fp32: %s (median [min, max] of the per-round ratios)\n", bench::spread(ratio, "%.3f").c_str());
  if (args.json) {
    std::printf("{\"bench\":\"mlp\",\"threads\":%d,\"batch\":%lld,\"fp32\":%.1f,\"bf16_mixed\":%.1f,\"ratio_bf16\":%.4f,"
                "\"err_fp32\":%.3g,\"err_bf16\":%.3g,\"loss_fp32\":%.4f,\"loss_bf16\":%.4f}\n",
                threads, static_cast<long long>(batch), bench::median(sps32), bench::median(sps16), bench::median(ratio),
                err32, err16, l32, l16);
  }
  return ok && learns ? 0 : 1;
}
