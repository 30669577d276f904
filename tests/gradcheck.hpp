#pragma once
// Finite-difference gradient checks in double precision for trident's modules.
//
// The scalar checked is L = sum_i w_i * y_i with fixed random weights w, so dL/dy = w is what
// backward receives; every input element and parameter element that is checked is perturbed
// by ±h and (L(+h) - L(-h)) / 2h is compared with what backward produced.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <trident/trident.hpp>

namespace trident_test {

using f64 = trident::policy<trident::fp64, trident::cpu>;
using trident::index_t;

/// A tensor of uniform random values in [lo, hi), reproducible from `seed`.
inline trident::tensor<double> random_input(const trident::shape& s, std::uint64_t seed, double lo = -1.5, double hi = 1.5) {
  auto x = trident::tensor<double>(s);
  trident::generator g(seed);
  trident::uniform(x, g, lo, hi);
  return x;
}

struct gradcheck_result {
  double max_rel_error = 0;
  std::string worst;
  int checked = 0;
};

/// Checks a module's input and parameter gradients. `run(ctx, x)` is the forward pass
/// (returning the output view), `back(ctx, dy)` the backward pass (returning dx); both see a
/// fresh arena per evaluation. `reseed()` is called before every forward so that stochastic
/// modules (dropout) draw the same mask each time. The relative error of an element is taken
/// against max(floor, |analytic| + |numeric|): gradients that are zero in theory (a key bias
/// under softmax's shift invariance) leave only the difference quotient's rounding noise.
template <class Forward, class Backward>
gradcheck_result gradcheck(trident::nn::parameter_store<f64>& store, trident::tensor<double>& x, Forward run, Backward back,
                           const std::function<void()>& reseed = [] {}, double h = 1e-6, int max_checks_per_tensor = 40,
                           double floor = 1e-6) {
  using namespace trident;
  nn::arena<cpu> mem;
  generator gen(77);
  nn::context<f64> ctx{mem, true, nullptr};
  // The weights of the scalar: one per output element.
  reseed();
  auto y0 = run(ctx, x.view());
  auto w = tensor<double>(y0.shape());
  uniform(w, gen, -1.0, 1.0);
  auto loss = [&]() {
    mem.reset();
    reseed();
    auto y = run(ctx, x.view());
    double s = 0;
    const auto vy = to_vector(y);
    for (std::size_t i = 0; i < vy.size(); ++i) s += w.data()[i] * vy[i];
    return s;
  };
  // Analytic gradients.
  mem.reset();
  store.zero_grad();
  reseed();
  run(ctx, x.view());
  auto dx = contiguous(back(ctx, w.view()));
  const auto analytic_params = to_vector(store.grads());

  gradcheck_result res;
  auto compare = [&](double analytic, double numeric, const std::string& what) {
    const double err = std::fabs(analytic - numeric) / std::max(floor, std::fabs(analytic) + std::fabs(numeric));
    ++res.checked;
    if (err > res.max_rel_error) {
      res.max_rel_error = err;
      res.worst = what + ": analytic " + std::to_string(analytic) + " numeric " + std::to_string(numeric);
    }
  };
  auto perturb = [&](double* p, index_t n, const std::function<double(index_t)>& analytic, const std::string& name) {
    const index_t step = std::max<index_t>(1, n / max_checks_per_tensor);
    for (index_t i = 0; i < n; i += step) {
      const double saved = p[i];
      p[i] = saved + h;
      const double lp = loss();
      p[i] = saved - h;
      const double lm = loss();
      p[i] = saved;
      compare(analytic(i), (lp - lm) / (2 * h), name + "[" + std::to_string(i) + "]");
    }
  };
  perturb(x.data(), x.numel(), [&](index_t i) { return dx.data()[i]; }, "input");
  for (const auto& info : store.infos()) {
    double* p = store.params().data() + info.offset;  // fp64: params are the master weights
    perturb(p, info.numel(), [&](index_t i) { return analytic_params[static_cast<std::size_t>(info.offset + i)]; },
            info.name);
  }
  return res;
}

}  // namespace trident_test
