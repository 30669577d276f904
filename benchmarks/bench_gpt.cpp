// P4: training a GPT (nn::gpt: nanoGPT's model) on random tokens of a 65-character vocabulary,
// as peers/torch_gpt.py does in PyTorch (run-gpt.sh alternates the two):
//
//   small: block 64, batch 12, 4 layers, 4 heads, width 128   (nanoGPT's CPU shakespeare_char)
//   large: block 256, batch 8, 6 layers, 6 heads, width 384
//
// A step is forward, cross-entropy, backward, global-norm clipping at 1.0 and AdamW (lr 1e-3,
// betas 0.9/0.99, weight decay 0.1 on 2-D weights), then zeroing the gradients. Each round
// times fp32 then bf16_mixed steps (median of the steps made in `min_seconds`, on one fixed
// batch) and measures the FMA ceiling (register-only FMA chains on every thread) in the same
// round; the table gives medians over the rounds of tokens/s, of GFLOP/s at nanoGPT's
// 6N + 12 L T d FLOPs per token (N parameters without the position table), and of that rate
// against the ceiling (MFU). Before timing, the loss of each precision must fall over 20 steps
// on the fixed batch, so that a fast wrong model cannot pass.
//
//   bench_gpt [--shape small|large] [--rounds 3] [--min-seconds 2] [--json]
//   bench_gpt --memory [--shape large] [--checkpoint]   one fp32 run's memory, by part
//
// Environment (docs/BENCHMARKS.md): OMP_NUM_THREADS=2 OMP_PROC_BIND=true.
#include <trident/trident.hpp>
#include <trident/train/memory.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common.hpp"

namespace {

using namespace trident;

struct shape_spec {
  const char* name;
  index_t block, batch, layers, heads, width;
};
constexpr shape_spec small_shape{"small", 64, 12, 4, 4, 128};
constexpr shape_spec large_shape{"large", 256, 8, 6, 6, 384};
constexpr index_t vocab = 65;

/// The model, its optimizer and one fixed batch of random tokens.
/// @tparam P the policy bundle
template <policy_bundle P>
struct run {
  shape_spec s;
  nn::parameter_store<P> store;
  nn::gpt<P> model;
  optim::adamw opt{{.lr = 1e-3, .beta1 = 0.9, .beta2 = 0.99, .weight_decay = 0.1}};
  train::step_control<P> control{{.gradient_clipping = 1.0}};
  nn::arena<cpu> memory;
  std::vector<std::int32_t> x, y;

  explicit run(const shape_spec& sh, bool checkpoint = false)
      : s(sh), model(store, {vocab, sh.block, sh.layers, sh.heads, sh.width, 0.0, true}) {
    model.set_checkpointing(checkpoint);
    store.allocate();
    generator gen(1234);
    model.init(gen);
    store.master_from_params();
    x.resize(static_cast<std::size_t>(sh.batch * sh.block));
    y.resize(x.size());
    bench::random_tokens(x, y, vocab);
  }

  double step() {
    memory.reset();
    nn::context<P> ctx{memory, true, nullptr};
    const double loss = model.forward(ctx, x, s.batch, y);
    model.backward(ctx, control.loss_scale());
    control.step(store, opt);
    store.zero_grad();
    return loss;
  }
  index_t tokens() const { return s.batch * s.block; }
  /// nanoGPT's estimate: 6 N + 12 L T d per token.
  double flop_per_token() const {
    return 6.0 * static_cast<double>(model.parameter_count()) + 12.0 * static_cast<double>(s.layers * s.block * s.width);
  }
};

/// Loss before and after 20 steps on the fixed batch.
template <policy_bundle P>
void check_learning(const shape_spec& sh, double& first, double& last) {
  run<P> r(sh);
  first = r.step();
  for (int i = 0; i < 19; ++i) last = r.step();
}

int memory_report(const shape_spec& sh, bool checkpoint) {
  const std::size_t before = train::resident_bytes();
  run<policy<fp32, cpu>> r(sh, checkpoint);
  for (int i = 0; i < 5; ++i) r.step();
  const std::size_t peak = train::peak_resident_bytes();
  std::size_t state = 0;
  for (const auto& st : r.opt.state_tensors()) state += static_cast<std::size_t>(st.values.numel()) * sizeof(float);
  const std::size_t params = r.store.bytes(), act = r.memory.capacity_bytes() + r.model.checkpoint_scratch_bytes();
  const auto mib = [](std::size_t b) { return static_cast<double>(b) / (1024.0 * 1024.0); };
  std::printf("# bench_gpt --memory: %s shape, fp32, activation checkpointing %s\n", sh.name, checkpoint ? "on" : "off");
  std::printf("| part | MiB |\n|---|---|\n");
  std::printf("| parameters + gradients | %.2f |\n", mib(params));
  std::printf("| optimizer state (AdamW m, v) | %.2f |\n", mib(state));
  std::printf("| activations (step arena%s) | %.2f |\n", checkpoint ? " + recomputation scratch" : "", mib(act));
  std::printf("| process before the model | %.2f |\n", mib(before));
  std::printf("| peak resident (VmHWM) | %.2f |\n", mib(peak));
  std::printf("{\"bench\":\"gpt_memory\",\"shape\":\"%s\",\"checkpoint\":%d,\"activations_mib\":%.2f,\"peak_rss_mib\":%.2f}\n",
              sh.name, checkpoint ? 1 : 0, mib(act), mib(peak));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  shape_spec sh = small_shape;
  bench::run_options args{3, 2.0};
  bool memory = false, checkpoint = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--shape") && i + 1 < argc) {
      const std::string v = argv[++i];
      if (v == "small") {
        sh = small_shape;
      } else if (v == "large") {
        sh = large_shape;
      } else {
        std::fprintf(stderr, "bench_gpt: --shape takes small or large, got '%s'\n", v.c_str());
        return 2;
      }
    } else if (args.parse(i, argc, argv)) {
    } else if (!std::strcmp(argv[i], "--memory")) {
      memory = true;
    } else if (!std::strcmp(argv[i], "--checkpoint")) {
      checkpoint = true;
    } else {
      std::fprintf(stderr, "usage: %s [--shape small|large] [--rounds R] [--min-seconds S] [--json] [--memory [--checkpoint]]\n",
                   argv[0]);
      return 2;
    }
  }
  try {
    if (memory) return memory_report(sh, checkpoint);
    double f0 = 0, f1 = 0, b0 = 0, b1 = 0;
    check_learning<policy<fp32, cpu>>(sh, f0, f1);
    check_learning<policy<bf16_mixed, cpu>>(sh, b0, b1);
    const bool ok = f1 < f0 - 0.5 && b1 < b0 - 0.5;
    run<policy<fp32, cpu>> f32(sh);
    run<policy<bf16_mixed, cpu>> b16(sh);
    const double fpt = f32.flop_per_token();
    std::vector<double> tf, tb, ceiling, mfu_f, mfu_b;
    for (int r = 0; r < args.rounds; ++r) {
      tf.push_back(static_cast<double>(f32.tokens()) / bench::median_seconds_per_call([&] { f32.step(); }, args.min_seconds));
      tb.push_back(static_cast<double>(b16.tokens()) / bench::median_seconds_per_call([&] { b16.step(); }, args.min_seconds));
      ceiling.push_back(bench::fma_ceiling_gflops(0.2));
      mfu_f.push_back(tf.back() * fpt * 1e-9 / ceiling.back());
      mfu_b.push_back(tb.back() * fpt * 1e-9 / ceiling.back());
    }
    std::printf("# bench_gpt: %s shape (block %lld, batch %lld, %lld layers, %lld heads, width %lld), %d threads, %d rounds, "
                "N = %lld, %.2f MFLOP/token; loss over 20 steps: fp32 %.3f -> %.3f, bf16_mixed %.3f -> %.3f -> %s\n",
                sh.name, static_cast<long long>(sh.block), static_cast<long long>(sh.batch),
                static_cast<long long>(sh.layers), static_cast<long long>(sh.heads), static_cast<long long>(sh.width),
                cpu_kernels::available_threads(), args.rounds, static_cast<long long>(f32.model.parameter_count()), fpt * 1e-6,
                f0, f1, b0, b1, ok ? "ok" : "NOT LEARNING");
    if (!ok) return 1;
    std::printf("| precision | tokens/s | GFLOP/s | MFU (vs FMA ceiling) |\n|---|---|---|---|\n");
    std::printf("| ours fp32 | %s | %.1f | %.3f |\n", bench::spread(tf, "%.0f").c_str(), bench::median(tf) * fpt * 1e-9,
                bench::median(mfu_f));
    std::printf("| ours bf16_mixed | %s | %.1f | %.3f |\n", bench::spread(tb, "%.0f").c_str(), bench::median(tb) * fpt * 1e-9,
                bench::median(mfu_b));
    std::printf("# FMA ceiling (fp32): %s GFLOP/s\n", bench::spread(ceiling, "%.0f").c_str());
    if (args.json) {
      std::printf("{\"bench\":\"gpt\",\"shape\":\"%s\",\"threads\":%d,\"fp32\":%.1f,\"bf16_mixed\":%.1f,\"ceiling\":%.1f,"
                  "\"mflop_per_token\":%.4f}\n",
                  sh.name, cpu_kernels::available_threads(), bench::median(tf), bench::median(tb), bench::median(ceiling),
                  fpt * 1e-6);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gpt: %s\n", e.what());
    return 1;
  }
}
