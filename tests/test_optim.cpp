// Optimizers against references written out here in double: several steps on a store of
// odd-sized tensors (so padding and alignment are exercised), per precision policy. Mixed
// precision: the fp32 master follows the reference and params are exactly the rounded master.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <trident/trident.hpp>
#include <trident/optim/optim.hpp>

using namespace trident;

namespace {

/// The reference model: per tensor, parameters and optimizer state in double.
struct ref_tensor {
  std::string name;
  index_t offset = 0;
  std::vector<double> p, m, v, b, s;
  double lr_scale = 1;
  double wd = 0;
};

template <class T>
T to_storage(double x) {
  if constexpr (std::is_same_v<T, float>) {
    return static_cast<float>(x);
  } else {
    return T(static_cast<float>(x));
  }
}

/// A deterministic value in [-1, 1).
double pseudo(std::uint64_t k) {
  k = (k + 0x9e3779b97f4a7c15ull) * 0xbf58476d1ce4e5b9ull;
  k ^= k >> 31;
  return static_cast<double>(k >> 11) * 0x1p-52 - 1.0;
}

/// The gradient of element j of tensor t at step `step` (unscaled).
double grad_value(int step, std::size_t t, index_t j) {
  return 0.5 * std::sin(0.37 * static_cast<double>(j) + 1.3 * static_cast<double>(t) + 0.71 * step) + 0.05 * pseudo(1000u * t + j);
}

/// A store of four odd-sized tensors; biases and norms are out of the decay group.
template <class P>
struct fixture {
  nn::parameter_store<P> store;
  std::vector<ref_tensor> ref;

  explicit fixture(std::vector<std::pair<std::string, index_t>> tensors = {{"fc1.weight", 35}, {"fc1.bias", 5}, {"fc2.weight", 33}, {"norm.weight", 13}}) {
    for (const auto& [name, n] : tensors) {
      const bool decay = name.find("weight") != std::string::npos && name.rfind("norm", 0) != 0;
      store.declare(name, {n}, decay);
    }
    store.allocate();
    using S = typename P::storage_type;
    for (std::size_t t = 0; t < store.infos().size(); ++t) {
      const auto& info = store.infos()[t];
      ref_tensor r;
      r.name = info.name;
      r.offset = info.offset;
      for (index_t j = 0; j < info.numel(); ++j) {
        const S x = to_storage<S>(pseudo(7919u * t + j));
        store.params().data()[info.offset + j] = x;
        r.p.push_back(static_cast<double>(static_cast<float>(x)));
      }
      r.m.assign(r.p.size(), 0.0);
      r.v.assign(r.p.size(), 0.0);
      r.b.assign(r.p.size(), 0.0);
      r.s.assign(r.p.size(), 0.0);
      ref.push_back(std::move(r));
    }
    store.master_from_params();
  }

  /// Writes this step's gradients times `loss_scale` into the store; returns the gradients the
  /// optimizer will see after multiplying by 1/loss_scale, read back from the stored type.
  std::vector<std::vector<double>> set_grads(int step, double loss_scale) {
    using G = typename P::gradient_type;
    std::vector<std::vector<double>> g(ref.size());
    for (std::size_t t = 0; t < ref.size(); ++t) {
      for (std::size_t j = 0; j < ref[t].p.size(); ++j) {
        const G x = to_storage<G>(grad_value(step, t, static_cast<index_t>(j)) * loss_scale);
        store.grads().data()[ref[t].offset + static_cast<index_t>(j)] = x;
        g[t].push_back(static_cast<double>(static_cast<float>(x)) / loss_scale);
      }
    }
    return g;
  }

  /// The master follows the reference; params are exactly the rounded master; padding is zero.
  void check(const char* what, int step, double rel = 1e-5, double abs = 2e-6) {
    using S = typename P::storage_type;
    const float* master = store.master().data();
    const S* params = store.params().data();
    double worst = 0;
    for (const auto& r : ref) {
      for (std::size_t j = 0; j < r.p.size(); ++j) {
        const index_t i = r.offset + static_cast<index_t>(j);
        const double err = std::fabs(static_cast<double>(master[i]) - r.p[j]);
        worst = std::max(worst, err / (abs + rel * std::fabs(r.p[j])));
        if constexpr (!std::is_same_v<S, float>) {
          REQUIRE_MESSAGE(params[i].bits == S(master[i]).bits, what << ": params[" << i << "] is not the rounded master");
        }
      }
    }
    INFO(what << " step " << step);
    CHECK(worst <= 1.0);
    // padding stays zero in params (and master)
    for (std::size_t t = 0; t < ref.size(); ++t) {
      const index_t end = t + 1 < ref.size() ? ref[t + 1].offset : store.size();
      for (index_t i = ref[t].offset + static_cast<index_t>(ref[t].p.size()); i < end; ++i) {
        REQUIRE(static_cast<float>(params[i]) == 0.0f);
        REQUIRE(master[i] == 0.0f);
      }
    }
  }
};

/// Runs `steps` steps of `opt` and of `ref_step` side by side, with a loss scale of 1024 undone
/// by grad_scale (exact: a power of two).
template <class P, class Opt, class RefStep>
void run(fixture<P>& f, Opt& opt, RefStep&& ref_step, const char* what, int steps = 5, double rel = 1e-5, double abs = 2e-6) {
  const double loss_scale = 1024.0;
  for (int t = 1; t <= steps; ++t) {
    const auto g = f.set_grads(t, loss_scale);
    for (std::size_t i = 0; i < f.ref.size(); ++i) ref_step(f.ref[i], g[i], t);
    opt.step(f.store, 1.0 / loss_scale);
    f.check(what, t, rel, abs);
  }
  CHECK(opt.step_count() == steps);
}

/// Sets each reference tensor's lr scale and weight decay as the default groups do.
void default_groups(std::vector<ref_tensor>& ref, double wd) {
  for (auto& r : ref) {
    const bool decay = r.name.find("weight") != std::string::npos && r.name.rfind("norm", 0) != 0;
    r.wd = decay ? wd : 0.0;
    r.lr_scale = 1.0;
  }
}

}  // namespace

#define OPTIM_POLICIES policy<fp32, cpu>, policy<bf16_mixed, cpu>, policy<fp16_mixed, cpu>

TEST_CASE_TEMPLATE("optim: adamw matches PyTorch's AdamW formula", P, OPTIM_POLICIES) {
  fixture<P> f;
  const double lr = 0.01, b1 = 0.9, b2 = 0.99, eps = 1e-8, wd = 0.1;
  default_groups(f.ref, wd);
  optim::adamw opt({.lr = lr, .beta1 = b1, .beta2 = b2, .eps = eps, .weight_decay = wd});
  run(f, opt,
      [&](ref_tensor& r, const std::vector<double>& g, int t) {
        const double l = lr * r.lr_scale, bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
        for (std::size_t j = 0; j < g.size(); ++j) {
          r.p[j] *= 1 - l * r.wd;
          r.m[j] = b1 * r.m[j] + (1 - b1) * g[j];
          r.v[j] = b2 * r.v[j] + (1 - b2) * g[j] * g[j];
          r.p[j] -= l / bc1 * r.m[j] / (std::sqrt(r.v[j]) / std::sqrt(bc2) + eps);
        }
      },
      "adamw");
  // state by PyTorch's names, over the flat layout
  auto st = opt.state_tensors();
  REQUIRE(st.size() == 2);
  CHECK(st[0].name == "exp_avg");
  CHECK(st[1].name == "exp_avg_sq");
  CHECK(st[0].values.numel() == f.store.size());
  for (const auto& r : f.ref) {
    for (std::size_t j = 0; j < r.m.size(); ++j) {
      REQUIRE(std::fabs(st[0].values.data()[r.offset + static_cast<index_t>(j)] - r.m[j]) <= 1e-6 + 1e-5 * std::fabs(r.m[j]));
      REQUIRE(std::fabs(st[1].values.data()[r.offset + static_cast<index_t>(j)] - r.v[j]) <= 1e-9 + 1e-5 * std::fabs(r.v[j]));
    }
  }
  // the default groups: decayed weights, undecayed bias and norm
  REQUIRE(opt.groups().size() == 2);
  CHECK(opt.groups()[0].name == "decay");
  CHECK(opt.groups()[0].tensors == std::vector<int>{0, 2});
  CHECK(opt.groups()[1].name == "no_decay");
  CHECK(opt.groups()[1].tensors == std::vector<int>{1, 3});
}

TEST_CASE_TEMPLATE("optim: adam (L2 weight decay) matches PyTorch's Adam formula", P, OPTIM_POLICIES) {
  fixture<P> f;
  const double lr = 0.02, b1 = 0.8, b2 = 0.999, eps = 1e-6, wd = 0.05;
  default_groups(f.ref, wd);
  optim::adam opt({.lr = lr, .beta1 = b1, .beta2 = b2, .eps = eps, .weight_decay = wd});
  run(f, opt,
      [&](ref_tensor& r, const std::vector<double>& g0, int t) {
        const double l = lr * r.lr_scale, bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
        for (std::size_t j = 0; j < g0.size(); ++j) {
          const double g = g0[j] + r.wd * r.p[j];
          r.m[j] = b1 * r.m[j] + (1 - b1) * g;
          r.v[j] = b2 * r.v[j] + (1 - b2) * g * g;
          r.p[j] -= l / bc1 * r.m[j] / (std::sqrt(r.v[j]) / std::sqrt(bc2) + eps);
        }
      },
      "adam");
}

TEST_CASE_TEMPLATE("optim: sgd with momentum, dampening, Nesterov and weight decay matches PyTorch's SGD", P, OPTIM_POLICIES) {
  for (const bool nesterov : {false, true}) {
    fixture<P> f;
    const double lr = 0.05, mu = 0.9, damp = nesterov ? 0.0 : 0.25, wd = 0.01;
    default_groups(f.ref, wd);
    optim::sgd opt({.lr = lr, .momentum = mu, .dampening = damp, .weight_decay = wd, .nesterov = nesterov});
    run(f, opt,
        [&](ref_tensor& r, const std::vector<double>& g0, int t) {
          for (std::size_t j = 0; j < g0.size(); ++j) {
            double d = g0[j] + r.wd * r.p[j];
            r.b[j] = t == 1 ? d : mu * r.b[j] + (1 - damp) * d;  // the buffer starts as a copy of d
            d = nesterov ? d + mu * r.b[j] : r.b[j];
            r.p[j] -= lr * r.r_lr(lr) * 0 + lr * r.lr_scale * d - lr * d + lr * d;
          }
        },
        nesterov ? "sgd nesterov" : "sgd momentum");
    CHECK(opt.state_tensors().size() == 1);
    CHECK(opt.state_tensors()[0].name == "momentum_buffer");
  }
  SUBCASE("plain SGD keeps no state") {
    fixture<P> f;
    default_groups(f.ref, 0.0);
    optim::sgd opt({.lr = 0.1});
    run(f, opt, [&](ref_tensor& r, const std::vector<double>& g, int) {
      for (std::size_t j = 0; j < g.size(); ++j) r.p[j] -= 0.1 * g[j];
    }, "sgd", 3);
    CHECK(opt.state_tensors().empty());
  }
}
