// precision_tour: fits a multi-output linear least-squares model by full-batch gradient descent with plain
// trident tensor ops (GEMM, element-wise, reductions), compiled once per precision policy.
// Each binary prints the loss curve, the error of the fitted weights, the time and the GEMM
// throughput, so that running the three side by side shows what the precision changes:
// bf16 and fp16 store the data in half the bytes and multiply faster, and their rounding
// leaves a visible floor in the error that fp32 does not have.
//
//   precision_tour_fp32 [samples] [features] [outputs] [steps]
//   precision_tour_bf16 ...      precision_tour_fp16 ...
#include <trident/trident.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#ifndef TRIDENT_EXAMPLE_PRECISION
#define TRIDENT_EXAMPLE_PRECISION fp32
#endif

namespace {

using namespace trident;
using Policy = policy<TRIDENT_EXAMPLE_PRECISION, cpu>;
using S = Policy::storage_type;  // data and the working copy of the weights
using M = Policy::master_type;   // the weights being optimised

index_t arg(int argc, char** argv, int i, index_t fallback) {
  if (argc <= i) return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(argv[i], &end, 10);
  if (*end != '\0' || v <= 0) {
    std::fprintf(stderr, "precision_tour: argument %d ('%s') must be a positive integer\n", i, argv[i]);
    std::exit(2);
  }
  return static_cast<index_t>(v);
}

}  // namespace

int main(int argc, char** argv) {
  const index_t n = arg(argc, argv, 1, 8192), d = arg(argc, argv, 2, 512), k = arg(argc, argv, 3, 64),
                steps = arg(argc, argv, 4, 100);
  std::printf("trident %s precision tour: policy %s (storage %zu bytes, master %zu bytes), %lld samples x %lld features -> %lld outputs\n",
              version_string, Policy::traits::name, sizeof(S), sizeof(M), static_cast<long long>(n), static_cast<long long>(d),
              static_cast<long long>(k));

  // Data: x ~ U(-1, 1), true weights ~ N(0, 1), y = x w* + 0.01 noise. Generated in float,
  // stored in the policy's storage type.
  generator gen(2024);
  tensor<float> xf({n, d}), w_true({d, k}), noise({n, k});
  uniform(xf, gen, -1.0, 1.0);
  normal(w_true, gen);
  normal(noise, gen, 0.0, 0.01);
  tensor<float> y = matmul(xf, w_true);
  add(y, noise, y);
  const tensor<S> x = cast<S>(xf);

  // Gradient descent on L(w) = sum over outputs of mean((x w - y)^2): grad = (2/n) x^T (x w - y).
  // The step size 1/L for this well-conditioned problem (E[x^T x / n] = I/3) is ~1.5.
  const double lr = 1.0;
  tensor<M> w({d, k});
  tensor<S> w_s({d, k});
  tensor<float> pred({n, k}), grad({d, k});
  tensor<S> resid_s({n, k});
  double gemm_seconds = 0;
  const auto start = std::chrono::steady_clock::now();
  double loss = 0;
  for (index_t step = 0; step <= steps; ++step) {
    copy(w, w_s);  // the working copy in storage precision
    const auto t0 = std::chrono::steady_clock::now();
    gemm(x, w_s, pred);  // (n, d) x (d, k)
    gemm_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    sub(pred, y, pred);  // residual, in float
    loss = std::pow(l2_norm(pred), 2) / static_cast<double>(n * k);
    if (step % (steps / 10 > 0 ? steps / 10 : 1) == 0 || step == steps) {
      std::printf("  step %5lld  loss %.6e\n", static_cast<long long>(step), loss);
    }
    if (step == steps) break;
    if (!std::isfinite(loss)) {
      std::fprintf(stderr, "precision_tour: the loss is not finite at step %lld\n", static_cast<long long>(step));
      return 1;
    }
    copy(pred, resid_s);
    const auto t1 = std::chrono::steady_clock::now();
    gemm(x.t(), resid_s, grad);  // (d, n) x (n, k), reading x transposed in place
    gemm_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
    axpby(1.0, w, -lr * 2.0 / static_cast<double>(n), grad, w);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double rel_err = l2_norm(sub(w, w_true)) / l2_norm(w_true);
  const double flops = 4.0 * static_cast<double>(n) * static_cast<double>(d) * static_cast<double>(k) * static_cast<double>(steps + 1);
  std::printf("final loss %.6e (noise floor %.1e), relative weight error %.3e\n", loss, 1e-4, rel_err);
  std::printf("time %.3f s, of which GEMM %.3f s (%.1f GFLOP/s)\n", seconds, gemm_seconds, flops / gemm_seconds * 1e-9);
  // A fit that did not converge is a failure of the example, whatever the precision.
  const double bound = sizeof(S) == 4 ? 1e-3 : 2e-2;
  if (!(rel_err < bound)) {
    std::fprintf(stderr, "precision_tour: the relative weight error %.3e exceeds %.0e\n", rel_err, bound);
    return 1;
  }
  return 0;
}
