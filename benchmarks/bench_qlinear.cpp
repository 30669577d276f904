// P7: inference of Linear(1024, 1024) with bias, batch 256, 2 threads: our fp32 linear (the
// fp32 GEMM with the bias fused into its epilogue, as nn::linear's forward runs it) against
// the dynamically quantized int8 linear (quant::dynamic_int8_linear: ONNX DynamicQuantizeLinear
// of the input, per tensor or per row, the exact uint8 x int8 GEMM on AVX512-VNNI / AMX-INT8,
// and the dequantizing epilogue with the bias, fused). The PyTorch peer is
// peers/torch_qlinear.py (torch.ao.quantization.quantize_dynamic with the oneDNN engine);
// run-qlinear.sh alternates the two.
//
// The weights are quantized and packed once, before timing (as a deployed model holds them);
// each timed call quantizes its input anew. Before timing, the int8 output is compared with
// the fp32 output (relative 2-norm error, printed; it must stay below 2%), and the fp32 output
// with a double-precision product, so a fast wrong kernel cannot pass. Each round times fp32,
// int8 per tensor and int8 per row (median of the calls made in `min_seconds`); the table gives
// medians over the rounds and GOP/s at 2 · batch · in · out operations per call.
//
//   bench_qlinear [--batch 256] [--in 1024] [--out 1024] [--rounds 5] [--min-seconds 1] [--json]
//                 [--kernel automatic|scalar|avx512_vnni|amx_int8]
//
// Environment (docs/BENCHMARKS.md): OMP_NUM_THREADS=2 OMP_PROC_BIND=true.
#include <trident/backend/cpu/kernels.hpp>
#include <trident/ops/gemm.hpp>
#include <trident/quant/packed_int8.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common.hpp"

namespace {

using namespace trident;

/// ||a - b|| / ||b|| over n values.
template <class A, class B>
double rel_error(const A* a, const B* b, std::size_t n) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double d = double(a[i]) - double(b[i]);
    num += d * d;
    den += double(b[i]) * double(b[i]);
  }
  return std::sqrt(num / den);
}

}  // namespace

int main(int argc, char** argv) {
  index_t batch = 256, in = 1024, out = 1024;
  bench::run_options args{5, 1.0};
  std::string kernel_name = "automatic";
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--batch") && i + 1 < argc) {
      batch = std::atoll(argv[++i]);
    } else if (!std::strcmp(argv[i], "--in") && i + 1 < argc) {
      in = std::atoll(argv[++i]);
    } else if (!std::strcmp(argv[i], "--out") && i + 1 < argc) {
      out = std::atoll(argv[++i]);
    } else if (!std::strcmp(argv[i], "--kernel") && i + 1 < argc) {
      kernel_name = argv[++i];
    } else if (args.parse(i, argc, argv)) {
    } else {
      std::fprintf(stderr,
                   "usage: %s [--batch N] [--in K] [--out N] [--rounds R] [--min-seconds S] [--json] [--kernel K]\n",
                   argv[0]);
      return 2;
    }
  }
  if (batch <= 0 || in <= 0 || out <= 0 || args.rounds <= 0) {
    std::fprintf(stderr, "bench_qlinear: sizes and rounds must be positive\n");
    return 2;
  }
  std::optional<quant::scoped_int8_kernel> force;
  {
    using K = quant::int8_kernel;
    bool known = false;
    for (const K k : {K::automatic, K::scalar, K::avx512_vnni, K::amx_int8}) {
      if (kernel_name == quant::to_string(k)) {
        known = true;
        if (!quant::kernel_available(k)) {
          std::fprintf(stderr, "bench_qlinear: kernel %s is not available here\n", kernel_name.c_str());
          return 2;
        }
        if (k != K::automatic) force.emplace(k);
      }
    }
    if (!known) {
      std::fprintf(stderr, "bench_qlinear: unknown kernel '%s'\n", kernel_name.c_str());
      return 2;
    }
  }

  // nn.Linear's initialisation: weights and bias uniform in ±1/sqrt(in); inputs standard normal.
  std::mt19937 gen(1234);
  const float bound = 1.0f / std::sqrt(static_cast<float>(in));
  std::uniform_real_distribution<float> uw(-bound, bound);
  std::normal_distribution<float> nx(0.0f, 1.0f);
  auto x = tensor<float>::uninitialized({batch, in});
  auto w = tensor<float>::uninitialized({out, in});
  auto bias = tensor<float>::uninitialized({out});
  auto y32 = tensor<float>::uninitialized({batch, out});
  std::vector<float> y8(static_cast<std::size_t>(batch * out)), y8r(static_cast<std::size_t>(batch * out));
  for (index_t i = 0; i < batch * in; ++i) x.data()[i] = nx(gen);
  for (index_t i = 0; i < out * in; ++i) w.data()[i] = uw(gen);
  for (index_t i = 0; i < out; ++i) bias.data()[i] = uw(gen);

  const auto wq = quant::packed_int8_weight::quantize(w.data(), out, in, in, "fc.weight");
  auto fp32 = [&] { gemm(x, w.t(), y32, gemm_options{}, bias); };
  auto int8 = [&] {
    quant::dynamic_int8_linear(x.data(), batch, in, wq, y8.data(), out, bias.data(), activation::none,
                               quant::granularity::per_tensor);
  };
  auto int8_row = [&] {
    quant::dynamic_int8_linear(x.data(), batch, in, wq, y8r.data(), out, bias.data(), activation::none,
                               quant::granularity::per_row);
  };

  // Correctness first: fp32 against double, int8 against fp32.
  fp32();
  int8();
  int8_row();
  std::vector<double> yd(static_cast<std::size_t>(batch * out));
  for (index_t i = 0; i < batch; ++i) {
    for (index_t j = 0; j < out; ++j) {
      double s = bias.data()[j];
      for (index_t p = 0; p < in; ++p) s += double(x.data()[i * in + p]) * double(w.data()[j * in + p]);
      yd[static_cast<std::size_t>(i * out + j)] = s;
    }
  }
  const auto n_out = static_cast<std::size_t>(batch * out);
  const double err32 = rel_error(y32.data(), yd.data(), n_out);
  const double err8 = rel_error(y8.data(), y32.data(), n_out), err8r = rel_error(y8r.data(), y32.data(), n_out);
  const bool ok = err32 < 1e-5 && err8 < 2e-2 && err8r < 2e-2;
  const int threads = cpu_kernels::available_threads();
  const double ops = 2.0 * double(batch) * double(in) * double(out);
  std::printf("# bench_qlinear: Linear(%lld, %lld) + bias, batch %lld, %d threads, %d rounds, int8 kernel %s; "
              "weights %.2f MiB fp32 -> %.2f MiB packed int8; relative error: fp32 vs fp64 %.2e, int8 per tensor vs "
              "fp32 %.2e, int8 per row vs fp32 %.2e -> %s\n",
              static_cast<long long>(in), static_cast<long long>(out), static_cast<long long>(batch), threads,
              args.rounds, kernel_name.c_str(), double(out * in * 4) / 1048576.0, double(wq.bytes()) / 1048576.0, err32,
              err8, err8r, ok ? "ok" : "FAILED");

  std::vector<double> g32, g8, g8r, ratio, ratio_r;
  for (int r = 0; r < args.rounds; ++r) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    g32.push_back(ops / bench::median_seconds_per_call(fp32, args.min_seconds) * 1e-9);
    g8.push_back(ops / bench::median_seconds_per_call(int8, args.min_seconds) * 1e-9);
    g8r.push_back(ops / bench::median_seconds_per_call(int8_row, args.min_seconds) * 1e-9);
    ratio.push_back(g8.back() / g32.back());
    ratio_r.push_back(g8r.back() / g32.back());
  }
  const auto us = [&](const std::vector<double>& g) {
    std::vector<double> t;
    for (double v : g) t.push_back(ops / (v * 1e9) * 1e6);
    return t;
  };
  std::printf("| linear | us per call | GOP/s |\n|---|---|---|\n");
  std::printf("| ours fp32 | %s | %s |\n", bench::spread(us(g32), "%.0f").c_str(), bench::spread(g32, "%.0f").c_str());
  std::printf("| ours int8 dynamic, per tensor | %s | %s |\n", bench::spread(us(g8), "%.0f").c_str(),
              bench::spread(g8, "%.0f").c_str());
  std::printf("| ours int8 dynamic, per row | %s | %s |\n", bench::spread(us(g8r), "%.0f").c_str(),
              bench::spread(g8r, "%.0f").c_str());
  std::printf("# int8 / fp32: per tensor %s, per row %s (median [min, max] of the per-round ratios; bar >= 2)\n",
              bench::spread(ratio, "%.2f").c_str(), bench::spread(ratio_r, "%.2f").c_str());
  if (args.json) {
    std::printf("{\"bench\":\"qlinear\",\"threads\":%d,\"batch\":%lld,\"in\":%lld,\"out\":%lld,\"kernel\":\"%s\","
                "\"fp32\":%.1f,\"int8\":%.1f,\"int8_row\":%.1f,\"err_int8\":%.3e,\"err_int8_row\":%.3e,\"ok\":%s}\n",
                threads, static_cast<long long>(batch), static_cast<long long>(in), static_cast<long long>(out),
                kernel_name.c_str(), bench::median(g32), bench::median(g8), bench::median(g8r), err8, err8r,
                ok ? "true" : "false");
  }
  return ok ? 0 : 1;
}
