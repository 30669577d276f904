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
#include <trident/parallel/thread_comm.hpp>

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
  const double lr = 0.01, b1 = 0.9, b2 = 0.99, eps = 1e-3, wd = 0.1;  // eps large enough to tell where it is added
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
            r.p[j] -= lr * r.lr_scale * d;
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

TEST_CASE_TEMPLATE("optim: adagrad with lr_decay, weight decay and an initial accumulator matches PyTorch's Adagrad", P,
                   OPTIM_POLICIES) {
  fixture<P> f;
  const double lr = 0.05, lr_decay = 0.1, wd = 0.02, init = 0.1, eps = 1e-10;
  default_groups(f.ref, wd);
  for (auto& r : f.ref) r.s.assign(r.p.size(), init);
  optim::adagrad opt({.lr = lr, .lr_decay = lr_decay, .weight_decay = wd, .initial_accumulator_value = init, .eps = eps});
  run(f, opt,
      [&](ref_tensor& r, const std::vector<double>& g0, int t) {
        const double clr = lr * r.lr_scale / (1 + (t - 1) * lr_decay);
        for (std::size_t j = 0; j < g0.size(); ++j) {
          const double g = g0[j] + r.wd * r.p[j];
          r.s[j] += g * g;
          r.p[j] -= clr * g / (std::sqrt(r.s[j]) + eps);
        }
      },
      "adagrad");
  CHECK(opt.state_tensors()[0].name == "sum");
}

TEST_CASE_TEMPLATE("optim: lamb matches DeepSpeed FusedLamb's formula (per-tensor trust ratio, clamped)", P, OPTIM_POLICIES) {
  for (const bool inside : {false, true}) {
    fixture<P> f;
    const double lr = 0.01, b1 = 0.9, b2 = 0.999, eps = 1e-6, wd = 0.01, max_c = 10, min_c = 0.01;
    default_groups(f.ref, wd);
    optim::lamb opt({.lr = lr, .beta1 = b1, .beta2 = b2, .eps = eps, .weight_decay = wd, .eps_inside_sqrt = inside});
    std::vector<double> ratios;
    run(f, opt,
        [&](ref_tensor& r, const std::vector<double>& g, int t) {
          const double step = lr * r.lr_scale * std::sqrt(1 - std::pow(b2, t)) / (1 - std::pow(b1, t));
          std::vector<double> u(g.size());
          double w2 = 0, u2 = 0;
          for (std::size_t j = 0; j < g.size(); ++j) {
            r.m[j] = b1 * r.m[j] + (1 - b1) * g[j];
            r.v[j] = b2 * r.v[j] + (1 - b2) * g[j] * g[j];
            const double denom = inside ? std::sqrt(r.v[j] + eps) : std::sqrt(r.v[j]) + eps;
            u[j] = r.m[j] / denom + r.wd * r.p[j];
            w2 += r.p[j] * r.p[j];
            u2 += u[j] * u[j];
          }
          double ratio = 1;
          if (w2 != 0 && u2 != 0) ratio = std::clamp(std::sqrt(w2) / std::sqrt(u2), min_c, max_c);
          if (t == 5) ratios.push_back(ratio);
          for (std::size_t j = 0; j < g.size(); ++j) r.p[j] -= step * ratio * u[j];
        },
        inside ? "lamb eps inside sqrt" : "lamb");
    REQUIRE(opt.trust_ratios().size() == ratios.size());
    for (std::size_t i = 0; i < ratios.size(); ++i) CHECK(opt.trust_ratios()[i] == doctest::Approx(ratios[i]).epsilon(1e-5));
  }
}

TEST_CASE("optim: lamb clamps the trust ratio and uses 1 for a zero tensor") {
  nn::parameter_store<policy<fp32, cpu>> s;
  s.declare("zero", {9});
  s.declare("big", {7});
  s.allocate();
  for (index_t j = 0; j < 7; ++j) s.param(nn::parameter_handle{1}).data()[j] = 1000.0f;  // ‖θ‖ ≫ ‖u‖
  for (index_t i = 0; i < s.size(); ++i) s.grads().data()[i] = 0.5f;
  optim::lamb opt({.lr = 1e-3});
  opt.step(s);
  CHECK(opt.trust_ratios()[0] == 1.0);   // ‖θ‖ = 0
  CHECK(opt.trust_ratios()[1] == 10.0);  // clamped to max_coeff
}

TEST_CASE_TEMPLATE("optim: custom parameter groups take their own lr scale and weight decay", P, OPTIM_POLICIES) {
  fixture<P> f;
  const double lr = 0.01, wd = 0.1;
  default_groups(f.ref, wd);
  // fc2.weight: half the lr and its own decay; fc1.bias: decayed after all (a name-selected group)
  f.ref[2].lr_scale = 0.5;
  f.ref[2].wd = 0.3;
  f.ref[1].wd = wd;
  optim::adamw opt({.lr = lr, .weight_decay = wd},
                   {{.name = "fc2", .selects = optim::prefix("fc2."), .lr_scale = 0.5, .weight_decay = 0.3},
                    {.name = "decayed bias", .selects = optim::names({"fc1.bias"})}});
  run(f, opt,
      [&](ref_tensor& r, const std::vector<double>& g, int t) {
        const double l = lr * r.lr_scale, bc1 = 1 - std::pow(0.9, t), bc2 = 1 - std::pow(0.999, t);
        for (std::size_t j = 0; j < g.size(); ++j) {
          r.p[j] *= 1 - l * r.wd;
          r.m[j] = 0.9 * r.m[j] + 0.1 * g[j];
          r.v[j] = 0.999 * r.v[j] + 0.001 * g[j] * g[j];
          r.p[j] -= l / bc1 * r.m[j] / (std::sqrt(r.v[j]) / std::sqrt(bc2) + 1e-8);
        }
      },
      "adamw groups", 4);
  REQUIRE(opt.groups().size() == 4);
  CHECK(opt.groups()[0].tensors == std::vector<int>{2});
  CHECK(opt.groups()[1].tensors == std::vector<int>{1});
  CHECK(opt.groups()[2].tensors == std::vector<int>{0});
  CHECK(opt.groups()[3].tensors == std::vector<int>{3});
}

TEST_CASE_TEMPLATE("optim: large tensors split across threads match the reference", P, OPTIM_POLICIES) {
  // chunks of >= 32 Ki elements: several threads, boundaries inside and between tensors
  fixture<P> f({{"a.weight", 100003}, {"b.bias", 5}, {"c.weight", 70001}});
  const double lr = 0.003, wd = 0.02;
  default_groups(f.ref, wd);
  optim::adamw opt({.lr = lr, .weight_decay = wd});
  run(f, opt,
      [&](ref_tensor& r, const std::vector<double>& g, int t) {
        const double bc1 = 1 - std::pow(0.9, t), bc2 = 1 - std::pow(0.999, t);
        for (std::size_t j = 0; j < g.size(); ++j) {
          r.p[j] *= 1 - lr * r.wd;
          r.m[j] = 0.9 * r.m[j] + 0.1 * g[j];
          r.v[j] = 0.999 * r.v[j] + 0.001 * g[j] * g[j];
          r.p[j] -= lr / bc1 * r.m[j] / (std::sqrt(r.v[j]) / std::sqrt(bc2) + 1e-8);
        }
      },
      "adamw large", 2);
}

TEST_CASE("optim: step leaves gradients alone (accumulation is the caller's)") {
  fixture<policy<fp16_mixed, cpu>> f;
  f.set_grads(1, 1.0);
  std::vector<std::uint16_t> before(static_cast<std::size_t>(f.store.size()));
  for (index_t i = 0; i < f.store.size(); ++i) before[static_cast<std::size_t>(i)] = f.store.grads().data()[i].bits;
  optim::sgd opt({.lr = 0.1, .momentum = 0.9});
  opt.step(f.store);
  for (index_t i = 0; i < f.store.size(); ++i) REQUIRE(f.store.grads().data()[i].bits == before[static_cast<std::size_t>(i)]);
}

TEST_CASE_TEMPLATE("optim: grad_norm, clip_factor and first_nonfinite", P, OPTIM_POLICIES) {
  fixture<P> f;
  const auto g = f.set_grads(3, 1.0);
  double want = 0;
  for (const auto& t : g) {
    for (double x : t) want += x * x;
  }
  auto gn = optim::grad_norm(f.store);
  CHECK(gn.finite);
  CHECK(gn.norm == doctest::Approx(std::sqrt(want)).epsilon(1e-12));
  CHECK(optim::first_nonfinite(f.store).empty());

  // PyTorch's clip_grad_norm_: max_norm / (norm + 1e-6), clamped to 1
  CHECK(optim::clip_factor(10.0, 1.0) == doctest::Approx(1.0 / (10.0 + 1e-6)).epsilon(1e-15));
  CHECK(optim::clip_factor(0.5, 1.0) == 1.0);
  CHECK(optim::clip_factor(std::numeric_limits<double>::infinity(), 1.0) == 0.0);
  CHECK(std::isnan(optim::clip_factor(std::numeric_limits<double>::quiet_NaN(), 1.0)));
  CHECK_THROWS_WITH_AS(optim::clip_factor(1.0, 0.0), doctest::Contains("max_norm"), trident::error);

  // clipping through grad_scale: one step with the clip factor equals a step on clipped grads
  {
    fixture<P> a, b;
    a.set_grads(1, 1.0);
    const auto gb = b.set_grads(1, 1.0);
    const double norm = optim::grad_norm(a.store).norm, c = optim::clip_factor(norm, 0.25);
    CHECK(c < 1.0);
    optim::sgd oa({.lr = 0.5});
    oa.step(a.store, c);
    for (std::size_t t = 0; t < b.ref.size(); ++t) {
      for (std::size_t j = 0; j < gb[t].size(); ++j) b.ref[t].p[j] -= 0.5 * static_cast<double>(static_cast<float>(c)) * gb[t][j];
    }
    a.ref = b.ref;
    a.check("sgd clipped", 1);
  }

  using G = typename P::gradient_type;
  const index_t at = f.store.infos()[2].offset + 4;
  for (const float bad : {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
    const G saved = f.store.grads().data()[at];
    f.store.grads().data()[at] = to_storage<G>(bad);
    gn = optim::grad_norm(f.store);
    CHECK_FALSE(gn.finite);
    CHECK(optim::first_nonfinite(f.store) == "fc2.weight");
    f.store.grads().data()[at] = saved;
  }
  if constexpr (std::is_same_v<G, half>) {
    // an fp16 overflow: a finite float that rounds to half infinity
    f.store.grads().data()[f.store.infos()[0].offset] = half(70000.0f);
    CHECK_FALSE(optim::grad_norm(f.store).finite);
    CHECK(optim::first_nonfinite(f.store) == "fc1.weight");
  }
}

TEST_CASE("optim: bad hyperparameters and misuse get a clear error") {
  using E = trident::error;
  CHECK_THROWS_WITH_AS(optim::adamw({.lr = -1e-3}), doctest::Contains("learning rate"), E);
  CHECK_THROWS_WITH_AS(optim::adamw({.beta1 = 1.0}), doctest::Contains("beta1"), E);
  CHECK_THROWS_WITH_AS(optim::adam({.beta2 = -0.1}), doctest::Contains("beta2"), E);
  CHECK_THROWS_WITH_AS(optim::adamw({.eps = 0.0}), doctest::Contains("eps"), E);
  CHECK_THROWS_WITH_AS(optim::adagrad({.eps = -1.0}), doctest::Contains("eps"), E);
  CHECK_THROWS_WITH_AS(optim::adamw({.weight_decay = -0.1}), doctest::Contains("weight_decay"), E);
  CHECK_THROWS_WITH_AS(optim::sgd({.momentum = -0.5}), doctest::Contains("momentum"), E);
  CHECK_THROWS_WITH_AS(optim::sgd({.momentum = 0.9, .dampening = 0.1, .nesterov = true}), doctest::Contains("Nesterov"), E);
  CHECK_THROWS_WITH_AS(optim::sgd({.nesterov = true}), doctest::Contains("Nesterov"), E);
  CHECK_THROWS_WITH_AS(optim::adagrad({.lr_decay = -1}), doctest::Contains("lr_decay"), E);
  CHECK_THROWS_WITH_AS(optim::adagrad({.initial_accumulator_value = -1}), doctest::Contains("initial_accumulator_value"), E);
  CHECK_THROWS_WITH_AS(optim::lamb({.max_coeff = 0.001}), doctest::Contains("max_coeff"), E);
  CHECK_THROWS_WITH_AS(optim::adamw({}, {{.name = "g", .selects = nullptr}}), doctest::Contains("no predicate"), E);
  CHECK_THROWS_WITH_AS(optim::adamw({}, {{.name = "g", .selects = optim::prefix("x"), .lr_scale = -1}}), doctest::Contains("lr_scale"), E);

  optim::adamw opt;
  CHECK_THROWS_WITH_AS(opt.set_lr(std::numeric_limits<double>::quiet_NaN()), doctest::Contains("learning rate"), E);
  CHECK_THROWS_WITH_AS(opt.set_betas(0.9, 1.5), doctest::Contains("beta2"), E);

  nn::parameter_store<policy<fp32, cpu>> unallocated;
  unallocated.declare("w", {3});
  CHECK_THROWS_WITH_AS(opt.step(unallocated), doctest::Contains("not allocated"), E);
  CHECK_THROWS_WITH_AS(optim::grad_norm(unallocated), doctest::Contains("not allocated"), E);

  fixture<policy<fp32, cpu>> f;
  CHECK_THROWS_WITH_AS(opt.step(f.store, 0.0), doctest::Contains("grad_scale"), E);
  CHECK_THROWS_WITH_AS(opt.step(f.store, std::numeric_limits<double>::infinity()), doctest::Contains("grad_scale"), E);
  opt.step(f.store);
  fixture<policy<fp32, cpu>> other({{"w", 3}});
  CHECK_THROWS_WITH_AS(opt.step(other.store), doctest::Contains("created for a parameter store"), E);

  optim::adamw typo({}, {{.name = "embeddings", .selects = optim::prefix("embed.")}});
  CHECK_THROWS_WITH_AS(typo.step(f.store), doctest::Contains("'embeddings' selects no tensor"), E);
}

TEST_CASE("optim: lr, step count and restored state") {
  fixture<policy<fp32, cpu>> a, b;
  optim::adamw oa({.lr = 0.01}), ob({.lr = 0.01});
  CHECK(oa.lr() == 0.01);
  oa.set_lr(0.02);
  ob.set_lr(0.02);
  CHECK(oa.hyperparameters().lr == 0.02);
  for (int t = 1; t <= 2; ++t) {
    a.set_grads(t, 1.0);
    oa.step(a.store);
  }
  // resume b from a's state: params, moments, step count
  ob.init(b.store);
  for (index_t i = 0; i < a.store.size(); ++i) b.store.params().data()[i] = a.store.params().data()[i];
  auto sa = oa.state_tensors();
  auto sb = ob.state_tensors();
  for (std::size_t k = 0; k < sa.size(); ++k) {
    for (index_t i = 0; i < sa[k].values.numel(); ++i) sb[k].values.data()[i] = sa[k].values.data()[i];
  }
  ob.set_step_count(oa.step_count());
  a.set_grads(3, 1.0);
  b.set_grads(3, 1.0);
  oa.step(a.store);
  ob.step(b.store);
  for (index_t i = 0; i < a.store.size(); ++i) REQUIRE(a.store.params().data()[i] == b.store.params().data()[i]);
  CHECK(ob.step_count() == 3);
}

TEST_CASE_TEMPLATE("optim: zeroing gradients inside the step equals step then zero_grad, bit for bit", P, OPTIM_POLICIES) {
  auto run = [](auto make, bool fused_zero) {
    fixture<P> f;
    auto opt = make();
    opt.set_zero_grad_in_step(fused_zero);
    for (int step = 1; step <= 3; ++step) {
      f.set_grads(step, 1.0);
      opt.step(f.store, 0.5);
      if (!fused_zero) f.store.zero_grad();
      for (index_t i = 0; i < f.store.size(); ++i) REQUIRE(static_cast<float>(f.store.grads().data()[i]) == 0.0f);
    }
    std::vector<float> out;
    for (index_t i = 0; i < f.store.size(); ++i) out.push_back(f.store.master().data()[i]);
    return out;
  };
  auto sgd = [] { return optim::sgd({.lr = 0.1, .momentum = 0.9, .weight_decay = 0.01, .nesterov = true}); };
  auto adamw = [] { return optim::adamw({.lr = 1e-2}); };
  auto adagrad = [] { return optim::adagrad({.lr = 0.1}); };
  auto lamb = [] { return optim::lamb({.lr = 1e-2}); };
  CHECK(run(sgd, true) == run(sgd, false));
  CHECK(run(adamw, true) == run(adamw, false));
  CHECK(run(adagrad, true) == run(adagrad, false));
  CHECK(run(lamb, true) == run(lamb, false));
}

namespace {

/// Steps `steps` times the whole store of one fixture with `make()`, and the same store of a
/// second fixture cut into `cuts.size() - 1` shards, each stepped by its own optimizer on its
/// own rank thread with gradients and master in memory of its own (as a ZeRO rank holds
/// them); LAMB's per-tensor norms are summed across the ranks. Masters must agree to float
/// rounding, params must be the rounded master, and state must cover the shard only.
template <class P, class Make>
void check_shards(Make make, const std::vector<index_t>& cut_fractions, const char* what, double rel = 1e-6) {
  using G = typename P::gradient_type;
  using S = typename P::storage_type;
  fixture<P> whole, sharded;
  auto opt = make();
  const index_t n = whole.store.size();
  std::vector<index_t> cuts;
  for (index_t c : cut_fractions) cuts.push_back(c < 0 ? n : std::min(c, n));
  const int ranks = static_cast<int>(cuts.size()) - 1;
  // each rank's master copy, taken once from the store (as a ZeRO rank takes its partition)
  std::vector<std::vector<float>> master(static_cast<std::size_t>(ranks));
  for (int r = 0; r < ranks; ++r) {
    for (index_t i = cuts[static_cast<std::size_t>(r)]; i < cuts[static_cast<std::size_t>(r) + 1]; ++i) {
      master[static_cast<std::size_t>(r)].push_back(sharded.store.master().data()[i]);
    }
  }
  const int steps = 4;
  std::vector<std::vector<std::vector<G>>> grads(static_cast<std::size_t>(steps) + 1);
  for (int t = 1; t <= steps; ++t) {
    whole.set_grads(t, 1024.0);
    opt.step(whole.store, 1.0 / 1024.0);
    sharded.set_grads(t, 1024.0);
    for (int r = 0; r < ranks; ++r) {
      const G* g = sharded.store.grads().data();
      grads[static_cast<std::size_t>(t)].emplace_back(g + cuts[static_cast<std::size_t>(r)], g + cuts[static_cast<std::size_t>(r) + 1]);
    }
  }
  run_ranks(ranks, [&](thread_comm& comm) {
    const auto r = static_cast<std::size_t>(comm.rank());
    auto o = make();
    for (int t = 1; t <= steps; ++t) {
      optim::flat_shard<P> sh{cuts[r], cuts[r + 1], grads[static_cast<std::size_t>(t)][r].data(), master[r].data(),
                              sharded.store.params().data() + cuts[r],
                              [&](double* x, index_t k) { comm.all_reduce(x, k, reduce_op::sum); }};
      if constexpr (std::is_same_v<S, float>) sh.master = sharded.store.params().data() + cuts[r];  // fp32: params are the master
      o.step(sharded.store, sh, 1.0 / 1024.0);
    }
    CHECK(o.bound_range() == std::pair<index_t, index_t>{cuts[r], cuts[r + 1]});
    for (const auto& st : o.state_tensors()) CHECK(st.values.numel() == cuts[r + 1] - cuts[r]);
    CHECK(o.step_count() == steps);
  });
  double worst = 0;
  for (int r = 0; r < ranks; ++r) {
    for (index_t i = cuts[static_cast<std::size_t>(r)]; i < cuts[static_cast<std::size_t>(r) + 1]; ++i) {
      const double want = whole.store.master().data()[i];
      const float m = std::is_same_v<S, float> ? static_cast<float>(sharded.store.params().data()[i])
                                                : master[static_cast<std::size_t>(r)][static_cast<std::size_t>(i - cuts[static_cast<std::size_t>(r)])];
      worst = std::max(worst, std::fabs(m - want) / (1e-7 + rel * std::fabs(want)));
      if constexpr (!std::is_same_v<S, float>) REQUIRE(sharded.store.params().data()[i].bits == S(m).bits);
    }
  }
  INFO(what);
  CHECK(worst <= 1.0);
}

}  // namespace

TEST_CASE_TEMPLATE("optim: every optimizer steps disjoint shards of the flat buffers as it steps the whole store", P, OPTIM_POLICIES) {
  // cuts inside tensors, unaligned, an empty shard, and one shard being everything
  for (const auto& cuts : std::vector<std::vector<index_t>>{{0, 21, 70, -1}, {0, 64, 64, -1}, {0, -1}}) {
    check_shards<P>([] { return optim::adamw({.lr = 1e-2, .weight_decay = 0.1}); }, cuts, "adamw");
    check_shards<P>([] { return optim::adam({.lr = 1e-2, .weight_decay = 0.1}); }, cuts, "adam");
    check_shards<P>([] { return optim::sgd({.lr = 0.1, .momentum = 0.9, .weight_decay = 0.01, .nesterov = true}); }, cuts, "sgd");
    check_shards<P>([] { return optim::sgd({.lr = 0.1}); }, cuts, "sgd without momentum");
    check_shards<P>([] { return optim::adagrad({.lr = 0.1, .lr_decay = 0.01, .initial_accumulator_value = 0.1}); }, cuts, "adagrad");
    check_shards<P>([] { return optim::lamb({.lr = 1e-2, .weight_decay = 0.01}); }, cuts, "lamb");
  }
}

TEST_CASE("optim: a shard outside the store, without buffers, or a second range is refused") {
  using P = policy<bf16_mixed, cpu>;
  fixture<P> f;
  optim::adamw opt;
  std::vector<float> master(static_cast<std::size_t>(f.store.size()));
  const index_t n = f.store.size();
  using E = trident::error;
  CHECK_THROWS_WITH_AS(opt.step(f.store, optim::flat_shard<P>{0, n + 1, f.store.grads().data(), master.data(), f.store.params().data()}),
                       doctest::Contains("not inside the store"), E);
  CHECK_THROWS_WITH_AS(opt.step(f.store, optim::flat_shard<P>{0, 16, nullptr, master.data(), f.store.params().data()}),
                       doctest::Contains("lacks its gradients"), E);
  opt.step(f.store, optim::flat_shard<P>{0, 16, f.store.grads().data(), master.data(), f.store.params().data()});
  CHECK(opt.state_bytes() == 2 * 16 * sizeof(float));
  CHECK_THROWS_WITH_AS(opt.step(f.store, optim::flat_shard<P>{16, 32, f.store.grads().data() + 16, master.data(), f.store.params().data() + 16}),
                       doctest::Contains("covers flat elements [0, 16)"), E);
  CHECK_THROWS_WITH_AS(opt.step(f.store), doctest::Contains(("cannot step [0, " + std::to_string(n) + ")").c_str()), E);
}
