// Pruning: magnitude masks (layer-wise, global) and 2:4 against reference sorts written here;
// the gradual schedule against Zhu and Gupta's formula in double; masked training (AdamW, SGD
// with momentum, weight decay) against the masked update written out in double, and under
// distributed_step (data parallel, ZeRO-1/2/3 over two thread ranks) against single-process
// masked training; structured shrinking (MLP rows, CNN channels through eval-mode batch norm,
// GPT heads): the smaller model computes what the dense one computes with the units zeroed.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <set>
#include <span>
#include <string>
#include <vector>

#include <trident/parallel/thread_comm.hpp>
#include <trident/parallel/zero.hpp>
#include <trident/prune.hpp>
#include <trident/trident.hpp>

#include "zero_fixture.hpp"

using namespace trident;

namespace {

using P32 = policy<fp32, cpu>;

/// round(x), ties to even, written out (the count rule of mask.hpp).
index_t round_half_even(double x) {
  const double f = std::floor(x), d = x - f;
  if (d < 0.5) return static_cast<index_t>(f);
  if (d > 0.5) return static_cast<index_t>(f) + 1;
  return static_cast<index_t>(f) + (static_cast<index_t>(f) % 2 != 0 ? 1 : 0);
}

/// A store of three tensors: a (7, 13), a.bias (7), b (5, 11), with random weights and planted
/// ties (equal magnitudes, of both signs, inside and across tensors).
struct tie_store {
  nn::parameter_store<P32> store;
  nn::parameter_handle a, bias, b;
  tie_store() {
    a = store.declare("a.weight", {7, 13});
    bias = store.declare("a.bias", {7}, false);
    b = store.declare("b.weight", {5, 11});
    store.allocate();
    generator g(17);
    normal(store.params(), g, 0.0, 1.0);
    float* pa = store.param(a).data();
    float* pb = store.param(b).data();
    for (int i : {3, 9, 20, 41, 77}) pa[i] = (i % 2 ? -1.0f : 1.0f) * 0.25f;
    for (int i : {2, 30, 54}) pb[i] = (i % 2 ? 0.25f : -0.25f);
    pa[5] = 0.0f;
    pa[6] = -0.0f;
  }
  std::vector<double> values(nn::parameter_handle h) {
    auto v = store.param(h);
    return std::vector<double>(v.data(), v.data() + v.numel());
  }
};

/// Positions of the k smallest |v|, by a stable sort (equal magnitudes keep position order).
std::set<index_t> reference_smallest(const std::vector<double>& v, index_t k) {
  std::vector<index_t> idx(v.size());
  std::iota(idx.begin(), idx.end(), index_t{0});
  std::stable_sort(idx.begin(), idx.end(), [&](index_t x, index_t y) { return std::fabs(v[x]) < std::fabs(v[y]); });
  return std::set<index_t>(idx.begin(), idx.begin() + k);
}

std::set<index_t> pruned_of(const prune::tensor_mask& m) {
  std::set<index_t> s;
  for (index_t i = 0; i < m.numel(); ++i)
    if (!m.keep[static_cast<std::size_t>(i)]) s.insert(i);
  return s;
}

}  // namespace

TEST_CASE("prune: the count rule rounds half to even") {
  nn::parameter_store<P32> store;
  store.declare("w", {2, 5});
  store.allocate();
  generator g(1);
  normal(store.params(), g, 0.0, 1.0);
  CHECK(prune::magnitude_layerwise(store, 0.25).pruned() == 2);  // 2.5 -> 2
  CHECK(prune::magnitude_layerwise(store, 0.75).pruned() == 8);  // 7.5 -> 8
  CHECK(prune::magnitude_layerwise(store, 0.0).pruned() == 0);
  CHECK(prune::magnitude_layerwise(store, 1.0).pruned() == 10);
  CHECK_THROWS_WITH_AS(prune::magnitude_layerwise(store, 1.5), doctest::Contains("sparsity must be in [0, 1], got 1.5"), error);
  CHECK_THROWS_WITH_AS(prune::magnitude_global(store, std::nan("")), doctest::Contains("sparsity must be in [0, 1]"), error);
  CHECK_THROWS_WITH_AS(prune::magnitude_layerwise(store, 0.5, prune::named({"nope"})), doctest::Contains("selects no tensor"), error);
  store.params().data()[3] = std::nanf("");
  CHECK_THROWS_WITH_AS(prune::magnitude_layerwise(store, 0.5), doctest::Contains("'w' holds NaN at element 3"), error);
}

TEST_CASE("prune: layer-wise magnitude pruning prunes exactly round(s n) per tensor, the smallest, ties by position") {
  tie_store t;
  for (double s : {0.1, 0.37, 0.5, 0.9}) {
    INFO("sparsity " << s);
    const auto masks = prune::magnitude_layerwise(t.store, s);
    REQUIRE(masks.tensors().size() == 2);  // the bias is not a matrix
    CHECK(masks.find(t.bias.index) == nullptr);
    for (auto h : {t.a, t.b}) {
      const auto* m = masks.find(h.index);
      REQUIRE(m != nullptr);
      const auto v = t.values(h);
      const index_t k = round_half_even(s * static_cast<double>(v.size()));
      CHECK(m->pruned() == k);
      CHECK(pruned_of(*m) == reference_smallest(v, k));
    }
  }
  // a sparsity whose threshold cuts through the five planted magnitudes 0.25 of a (positions
  // 3, 9, 20, 41, 77): the two earlier ones go, the three later ones stay
  {
    const auto v = t.values(t.a);
    index_t below = 0;
    for (double x : v) below += std::fabs(x) < 0.25;
    const auto masks = prune::magnitude_layerwise(t.store, (static_cast<double>(below) + 2.1) / 91.0);
    const auto pa = pruned_of(*masks.find(t.a.index));
    CHECK(static_cast<index_t>(pa.size()) == below + 2);
    CHECK(pa.count(3) == 1);
    CHECK(pa.count(9) == 1);
    CHECK(pa.count(20) == 0);
    CHECK(pa.count(41) == 0);
    CHECK(pa.count(77) == 0);
    CHECK(pa.count(5) == 1);  // +0 and -0 are the smallest
    CHECK(pa.count(6) == 1);
  }
  const auto masks = prune::magnitude_layerwise(t.store, 0.37);
  const auto pa = pruned_of(*masks.find(t.a.index));

  // apply zeroes exactly the pruned elements; the report counts them
  prune::apply(t.store, masks);
  const auto r = prune::report_sparsity(t.store);
  REQUIRE(r.tensors.size() == 2);
  for (std::size_t j = 0; j < 2; ++j) CHECK(r.tensors[j].zeros == masks.tensors()[j].pruned());
  CHECK(r.zeros == masks.pruned());
  CHECK(r.global() == doctest::Approx(static_cast<double>(masks.pruned()) / (91 + 55)));
  const float* pa_data = t.store.param(t.a).data();
  for (index_t i = 0; i < 91; ++i) CHECK((pa_data[i] == 0.0f) == (pa.count(i) == 1));
}

TEST_CASE("prune: global magnitude pruning ranks all selected tensors together") {
  tie_store t;
  // b ten times larger: global pruning takes mostly a
  float* pb = t.store.param(t.b).data();
  for (index_t i = 0; i < 55; ++i) pb[i] *= 10.0f;
  pb[7] = 0.25f;  // ties with a's 0.25s; a's come first in the flat order
  for (double s : {0.2, 0.45, 0.6}) {
    INFO("sparsity " << s);
    const auto masks = prune::magnitude_global(t.store, s);
    std::vector<double> all = t.values(t.a);
    const auto vb = t.values(t.b);
    all.insert(all.end(), vb.begin(), vb.end());
    const index_t k = round_half_even(s * static_cast<double>(all.size()));
    const auto ref = reference_smallest(all, k);
    CHECK(masks.pruned() == k);
    std::set<index_t> got;
    for (index_t i : pruned_of(*masks.find(t.a.index))) got.insert(i);
    for (index_t i : pruned_of(*masks.find(t.b.index))) got.insert(91 + i);
    CHECK(got == ref);
    CHECK(masks.find(t.a.index)->sparsity() > masks.find(t.b.index)->sparsity());
  }
}

TEST_CASE("prune: 2:4 keeps the two largest magnitudes of every group of four along the input dimension") {
  nn::parameter_store<P32> store;
  auto w = store.declare("fc.weight", {6, 16});
  auto c = store.declare("conv.weight", {4, 2, 2, 2});  // rows of 8: groups over C_in kh kw
  store.allocate();
  generator g(5);
  normal(store.params(), g, 0.0, 1.0);
  float* pw = store.param(w).data();
  // ties: a group of four equal magnitudes, and one with a tie at the boundary
  pw[0] = 0.5f, pw[1] = -0.5f, pw[2] = 0.5f, pw[3] = -0.5f;
  pw[4] = 2.0f, pw[5] = 0.3f, pw[6] = -0.3f, pw[7] = 0.1f;
  const auto masks = prune::n_m(store, 2, 4);
  for (auto h : {w, c}) {
    const auto* m = masks.find(h.index);
    REQUIRE(m != nullptr);
    const float* p = store.param(h).data();
    CHECK(m->pruned() == m->numel() / 2);
    for (index_t base = 0; base < m->numel(); base += 4) {
      for (index_t i = base; i < base + 4; ++i) {
        // rank of i in its group: larger magnitudes, and equal ones earlier
        int before = 0;
        for (index_t j = base; j < base + 4; ++j) {
          before += std::fabs(p[j]) > std::fabs(p[i]) || (std::fabs(p[j]) == std::fabs(p[i]) && j < i);
        }
        CHECK_MESSAGE(m->keep[static_cast<std::size_t>(i)] == (before < 2 ? 1 : 0), "element " << i);
      }
    }
  }
  const auto* m = masks.find(w.index);
  CHECK(m->keep[0] == 1);
  CHECK(m->keep[1] == 1);
  CHECK(m->keep[2] == 0);
  CHECK(m->keep[3] == 0);
  CHECK(m->keep[4] == 1);
  CHECK(m->keep[5] == 1);
  CHECK(m->keep[6] == 0);
  nn::parameter_store<P32> odd;
  odd.declare("x", {3, 6});
  odd.allocate();
  CHECK_THROWS_WITH_AS(prune::n_m(odd, 2, 4), doctest::Contains("hold 6 elements, not a multiple of m = 4"), shape_error);
  CHECK_THROWS_WITH_AS(prune::n_m(store, 5, 4), doctest::Contains("need 0 <= n <= m"), error);
}

TEST_CASE("prune: the gradual schedule follows Zhu and Gupta's formula") {
  const prune::gradual_schedule s{.initial_sparsity = 0.1, .final_sparsity = 0.85, .start_step = 10, .frequency = 5, .steps = 4};
  // s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 on [t0, t0 + n dt]; s_i before, s_f after
  struct row {
    std::int64_t t;
    double expected;
    bool due;
  };
  const double si = 0.1, sf = 0.85;
  auto formula = [&](double t) { return sf + (si - sf) * std::pow(1.0 - (t - 10.0) / 20.0, 3.0); };
  const row table[] = {{0, si, false},          {9, si, false},          {10, si, true},           {11, formula(11), false},
                       {15, formula(15), true}, {20, formula(20), true}, {23, formula(23), false}, {25, formula(25), true},
                       {29, formula(29), false}, {30, sf, true},         {31, sf, false},          {35, sf, false},
                       {1000, sf, false}};
  for (const auto& r : table) {
    INFO("t = " << r.t);
    CHECK(s.sparsity_at(r.t) == doctest::Approx(r.expected).epsilon(1e-14));
    CHECK(s.update_due(r.t) == r.due);
  }
  // hand values: t = 15: 0.85 - 0.75 * 0.75^3 = 0.53359375; t = 20: 0.85 - 0.75/8 = 0.75625
  CHECK(s.sparsity_at(15) == doctest::Approx(0.53359375).epsilon(1e-14));
  CHECK(s.sparsity_at(20) == doctest::Approx(0.75625).epsilon(1e-14));
  CHECK(s.end_step() == 30);
  CHECK_THROWS_WITH_AS((prune::gradual_schedule{.frequency = 0}.validate()), doctest::Contains("frequency (delta t) must be positive, got 0"), error);
  CHECK_THROWS_WITH_AS((prune::gradual_schedule{.final_sparsity = 1.2}.validate()), doctest::Contains("final_sparsity must be in [0, 1], got 1.2"), error);

  // the pruner: at each update, round(s_t n) of each tensor, and what was pruned stays pruned
  tie_store t;
  prune::gradual_pruner<P32> pruner(t.store, s);
  std::set<index_t> before;
  int updates = 0;
  for (std::int64_t step = 0; step <= 40; ++step) {
    const bool did = pruner.step(step);
    CHECK(did == s.update_due(step));
    if (!did) continue;
    ++updates;
    const auto* m = pruner.masks().find(t.a.index);
    REQUIRE(m != nullptr);
    CHECK(m->pruned() == round_half_even(s.sparsity_at(step) * 91));
    CHECK(pruner.masks().find(t.b.index)->pruned() == round_half_even(s.sparsity_at(step) * 55));
    const auto now = pruned_of(*m);
    CHECK(std::includes(now.begin(), now.end(), before.begin(), before.end()));
    before = now;
    const auto r = prune::report_sparsity(t.store);
    CHECK(r.zeros == pruner.masks().pruned());
  }
  CHECK(updates == 5);
  CHECK(pruner.sparsity() == sf);
}

// --- masked training ------------------------------------------------------------------------

namespace {

using namespace zero_fixture;

/// The optimizers of the masked-training tests and their update rules written out in double.
struct adamw_case {
  static constexpr const char* name = "adamw";
  static constexpr double lr = 1e-2, wd = 0.1, b1 = 0.9, b2 = 0.999, eps = 1e-8;
  static optim::adamw::options options() { return {.lr = lr, .beta1 = b1, .beta2 = b2, .eps = eps, .weight_decay = wd}; }
  using optimizer = optim::adamw;
  std::vector<double> m, v;
  void update(std::vector<double>& p, const std::vector<double>& g, const std::vector<double>& decay, int t) {
    if (m.empty()) m.assign(p.size(), 0.0), v.assign(p.size(), 0.0);
    for (std::size_t i = 0; i < p.size(); ++i) {
      p[i] *= 1.0 - lr * wd * decay[i];
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
      p[i] -= lr / (1 - std::pow(b1, t)) * m[i] / (std::sqrt(v[i]) / std::sqrt(1 - std::pow(b2, t)) + eps);
    }
  }
};
struct sgd_case {
  static constexpr const char* name = "sgd momentum";
  static constexpr double lr = 0.1, mu = 0.9, wd = 1e-2;
  static optim::sgd::options options() { return {.lr = lr, .momentum = mu, .weight_decay = wd}; }
  using optimizer = optim::sgd;
  std::vector<double> buf;
  void update(std::vector<double>& p, const std::vector<double>& g, const std::vector<double>& decay, int t) {
    if (buf.empty()) buf.assign(p.size(), 0.0);
    for (std::size_t i = 0; i < p.size(); ++i) {
      const double d = g[i] + wd * decay[i] * p[i];
      buf[i] = t == 1 ? d : mu * buf[i] + d;
      p[i] -= lr * buf[i];
    }
  }
};

/// The masks of the masked-training tests: half of each weight matrix of the fixture's MLP.
template <class P>
prune::mask_set half_masks(mlp<P>& m) {
  auto masks = prune::magnitude_layerwise(m.store, 0.5);
  prune::apply(m.store, masks);
  return masks;
}

/// keep (1/0) per element of mlp::params() order (padding left out).
template <class P>
std::vector<double> keep_vector(mlp<P>& m, const prune::mask_set& masks) {
  std::vector<double> out;
  for (std::size_t t = 0; t < m.store.infos().size(); ++t) {
    const auto* mk = masks.find(static_cast<int>(t));
    for (index_t i = 0; i < m.store.infos()[t].numel(); ++i) out.push_back(mk ? mk->keep[static_cast<std::size_t>(i)] : 1.0);
  }
  return out;
}

/// Params after each step of single-process masked training on the whole global batch.
template <class Case>
std::vector<std::vector<float>> train_masked_single() {
  mlp<P32> m;
  const auto masks = half_masks(m);
  prune::masked<typename Case::optimizer> opt(masks, Case::options());
  train::step_control<P32> control;
  std::vector<std::vector<float>> out;
  for (int s = 0; s < steps; ++s) {
    m.store.zero_grad();
    m.backward(s, 0, global_batch, 1.0);
    control.step(m.store, opt);
    out.push_back(m.params());
  }
  return out;
}

}  // namespace

TEST_CASE_TEMPLATE("prune: masked training keeps pruned weights at zero and equals the masked update written out", Case, adamw_case,
                   sgd_case) {
  const auto trained = train_masked_single<Case>();

  // the reference: its own copy of the model, params in double, gradients from backward at
  // those params, g <- g * mask, the update in double, p <- p * mask
  mlp<P32> ref;
  const auto masks = half_masks(ref);
  const auto keep = keep_vector(ref, masks);
  std::vector<double> decay;
  for (const auto& info : ref.store.infos())
    for (index_t i = 0; i < info.numel(); ++i) decay.push_back(info.weight_decay ? 1.0 : 0.0);
  std::vector<double> p;
  for (float x : ref.params()) p.push_back(x);
  Case rule;
  double moved = 0;
  for (int s = 0; s < steps; ++s) {
    // load p into the reference store, get the gradient
    std::size_t k = 0;
    for (const auto& info : ref.store.infos())
      for (index_t i = 0; i < info.numel(); ++i) ref.store.params().data()[info.offset + i] = static_cast<float>(p[k++]);
    ref.store.zero_grad();
    ref.backward(s, 0, global_batch, 1.0);
    std::vector<double> g;
    for (const auto& info : ref.store.infos())
      for (index_t i = 0; i < info.numel(); ++i) g.push_back(ref.store.grads().data()[info.offset + i]);
    for (std::size_t i = 0; i < g.size(); ++i) g[i] *= keep[i];
    const auto before = p;
    rule.update(p, g, decay, s + 1);
    for (std::size_t i = 0; i < p.size(); ++i) p[i] *= keep[i];

    const auto& got = trained[static_cast<std::size_t>(s)];
    REQUIRE(got.size() == p.size());
    int pruned = 0;
    double worst = 0;
    for (std::size_t i = 0; i < p.size(); ++i) {
      if (keep[i] == 0.0) {
        ++pruned;
        REQUIRE_MESSAGE(got[i] == 0.0f, Case::name << ": pruned element " << i << " is " << got[i] << " after step " << s);
      } else {
        worst = std::max(worst, std::fabs(got[i] - p[i]) / (1e-6 + 1e-4 * std::fabs(p[i])));
        moved = std::max(moved, std::fabs(p[i] - before[i]));
      }
    }
    CHECK(pruned == masks.pruned());
    CHECK_MESSAGE(worst <= 1.0, Case::name << " step " << s);
  }
  CHECK(moved > 1e-3);

  // without the mask, the same step moves pruned weights (momentum, moments, decay of the update)
  mlp<P32> plain;
  const auto pm = half_masks(plain);
  typename Case::optimizer opt(Case::options());
  for (int s = 0; s < 2; ++s) {
    plain.store.zero_grad();
    plain.backward(s, 0, global_batch, 1.0);
    opt.step(plain.store);
  }
  const auto kv = keep_vector(plain, pm);
  const auto pp = plain.params();
  int revived = 0;
  for (std::size_t i = 0; i < pp.size(); ++i) revived += kv[i] == 0.0 && pp[i] != 0.0f;
  CHECK(revived > 0);
}

TEST_CASE_TEMPLATE("prune: masked training under distributed_step (2 thread ranks) equals single-process masked training", S,
                   data_parallel, zero<1>, zero<2>, zero<3>) {
  auto run = [&]<class Case>(Case) {
    using P = policy<fp32, cpu, S>;
    const auto ref = train_masked_single<Case>();
    std::vector<std::vector<std::vector<float>>> out(2);
    std::vector<double> keep;
    run_ranks(2, [&](thread_comm& comm) {
      mlp<P> m;
      const auto masks = half_masks(m);  // the same weights on every rank: the same masks
      if (comm.rank() == 0) keep = keep_vector(m, masks);
      prune::masked<typename Case::optimizer> opt(masks, Case::options());
      const parallel::distributed_options o{.reduce_bucket_size = 100, .max_in_flight = 3, .param_persistence_threshold = 100};
      parallel::distributed_step<P, thread_comm> dist(m.store, comm, o);
      const index_t b = global_batch * comm.rank() / 2, e = global_batch * (comm.rank() + 1) / 2;
      for (int s = 0; s < steps; ++s) {
        m.store.zero_grad();
        m.backward(s, b, e, dist.loss_scale());
        dist.step(opt);
        out[static_cast<std::size_t>(comm.rank())].push_back(m.params(dist));
      }
    });
    for (int s = 0; s < steps; ++s) {
      INFO(Case::name << " " << S::name << " step " << s);
      const auto& a = out[0][static_cast<std::size_t>(s)];
      const auto& r = ref[static_cast<std::size_t>(s)];
      REQUIRE(a == out[1][static_cast<std::size_t>(s)]);  // the ranks agree bit for bit
      REQUIRE(a.size() == r.size());
      double worst = 0;
      for (std::size_t i = 0; i < a.size(); ++i) {
        if (keep[i] == 0.0) REQUIRE(a[i] == 0.0f);
        worst = std::max(worst, std::fabs(double(a[i]) - r[i]) / (1e-7 + 1e-6 * std::fabs(double(r[i]))));
      }
      CHECK(worst <= 1.0);
    }
  };
  run(adamw_case{});
  run(sgd_case{});
}

TEST_CASE("prune: a masked optimizer trains under train::trainer with a scheduler") {
  using P = P32;
  nn::parameter_store<P> store;
  nn::sequential<P, nn::linear<P>, nn::linear<P>> net{nn::linear<P>(store, "fc1", 8, 32, true, activation::relu),
                                                     nn::linear<P>(store, "fc2", 32, 3)};
  store.allocate();
  generator g(2);
  net.init(g);
  const auto masks = prune::magnitude_global(store, 0.7);
  prune::apply(store, masks);
  prune::masked<optim::adamw> opt(masks, {.lr = 1e-2, .weight_decay = 0.05});
  train::trainer<P, decltype(net), decltype(opt), sched::warmup_lr> t(net, store, opt, {.progress = false, .out = nullptr},
                                                                       sched::warmup_lr({.warmup_min_lr = 0.0, .warmup_max_lr = 1e-2, .warmup_num_steps = 3}));
  const auto& d = data();
  tensor<float> x({global_batch, 8});
  std::copy(d.x.begin(), d.x.begin() + global_batch * 8, x.data());
  const auto before = prune::report_sparsity(store);
  std::vector<float> p0(store.params().data(), store.params().data() + store.size());
  for (int s = 0; s < 4; ++s) t.train_batch(x.view(), std::span<const std::int32_t>(d.y.data(), global_batch));
  const auto after = prune::report_sparsity(store);
  CHECK(after.zeros == masks.pruned());
  CHECK(after.zeros == before.zeros);
  double moved = 0;
  for (index_t i = 0; i < store.size(); ++i) moved = std::max(moved, double(std::fabs(store.params().data()[i] - p0[i])));
  CHECK(moved > 1e-3);
  CHECK(opt.lr() > 0.0);  // the scheduler drove the wrapper's lr
}

// --- structured shrinking -------------------------------------------------------------------

namespace {

template <class P>
struct mlp3 {
  nn::parameter_store<P> store;
  nn::sequential<P, nn::linear<P>, nn::linear<P>, nn::linear<P>> net;
  mlp3(index_t in, index_t h1, index_t h2, index_t out)
      : net(nn::linear<P>(store, "fc1", in, h1, true, activation::relu), nn::linear<P>(store, "fc2", h1, h2, true, activation::gelu),
            nn::linear<P>(store, "fc3", h2, out)) {
    store.allocate();
  }
};

template <class P>
struct cnn {
  nn::parameter_store<P> store;
  nn::sequential<P, nn::conv2d<P>, nn::batch_norm<P>, nn::relu<P>, nn::max_pool2d<P>, nn::conv2d<P>, nn::batch_norm<P>, nn::relu<P>,
                 nn::flatten<P>, nn::linear<P>>
      net;
  cnn(index_t c1, index_t c2)
      : net(nn::conv2d<P>(store, "conv1", 3, c1, 3, 1, 1, true), nn::batch_norm<P>(store, "bn1", c1), nn::relu<P>{},
            nn::max_pool2d<P>(2), nn::conv2d<P>(store, "conv2", c1, c2, 3, 1, 1, true), nn::batch_norm<P>(store, "bn2", c2),
            nn::relu<P>{}, nn::flatten<P>{}, nn::linear<P>(store, "fc", c2 * 4 * 4, 10)) {
    store.allocate();
  }
};

/// Eval-mode forward of `net` on x, as floats.
template <class P, class Net>
std::vector<float> run_eval(Net& net, const tensor<float>& x) {
  nn::arena<cpu> mem;
  nn::context<P> ctx{mem, false, nullptr};
  auto y = net.forward(ctx, x.view());
  return to_vector(y);
}

/// max |a - b| / max |b|.
double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double d = 0, m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    d = std::max(d, std::fabs(double(a[i]) - b[i]));
    m = std::max(m, std::fabs(double(b[i])));
  }
  return d / m;
}

/// Top k of `scores` (ties: earlier), increasing, by a full sort.
std::vector<index_t> reference_top(const std::vector<double>& scores, index_t k) {
  std::vector<index_t> idx(scores.size());
  std::iota(idx.begin(), idx.end(), index_t{0});
  std::stable_sort(idx.begin(), idx.end(), [&](index_t a, index_t b) { return scores[a] > scores[b]; });
  idx.resize(static_cast<std::size_t>(k));
  std::sort(idx.begin(), idx.end());
  return idx;
}

}  // namespace

TEST_CASE("prune: a structurally shrunk MLP computes the dense MLP with the pruned units zeroed") {
  mlp3<P32> dense(20, 48, 40, 5);
  generator g(9);
  dense.net.init(g);
  auto& fc1 = dense.net.get<0>();
  auto& fc2 = dense.net.get<1>();
  auto& fc3 = dense.net.get<2>();
  // the norms, written out: row r of fc1 (L2), of fc2 (L1)
  auto norms = [&](nn::parameter_handle h, bool l1) {
    const auto& info = dense.store.info(h);
    const index_t rows = info.extents[0], cols = info.extents[1];
    std::vector<double> out;
    for (index_t r = 0; r < rows; ++r) {
      double s = 0;
      for (index_t c = 0; c < cols; ++c) {
        const double v = dense.store.param(h).data()[r * cols + c];
        s += l1 ? std::fabs(v) : v * v;
      }
      out.push_back(l1 ? s : std::sqrt(s));
    }
    return out;
  };
  const auto k1 = prune::rank_rows(dense.store, fc1.weight(), 30);
  const auto k2 = prune::rank_rows(dense.store, fc2.weight(), 17, prune::norm::l1);
  CHECK(k1 == reference_top(norms(fc1.weight(), false), 30));
  CHECK(k2 == reference_top(norms(fc2.weight(), true), 17));

  mlp3<P32> small(20, 30, 17, 5);
  // fc2 loses rows (k2) and columns (k1): the chain copies each layer's rows and columns at once
  prune::copy_shrunk_linear_chain(dense.store, {&fc1, &fc2, &fc3}, small.store,
                                  {&small.net.get<0>(), &small.net.get<1>(), &small.net.get<2>()}, {k1, k2});

  tensor<float> x({9, 20});
  generator gx(4);
  normal(x, gx, 0.0, 1.0);
  const auto y_dense = run_eval<P32>(dense.net, x);
  prune::zero_rows(dense.store, fc1.weight(), prune::complement(k1, 48));
  prune::zero_rows(dense.store, fc1.bias(), prune::complement(k1, 48));
  prune::zero_rows(dense.store, fc2.weight(), prune::complement(k2, 40));
  prune::zero_rows(dense.store, fc2.bias(), prune::complement(k2, 40));
  const auto y_zeroed = run_eval<P32>(dense.net, x);
  const auto y_small = run_eval<P32>(small.net, x);
  CHECK(rel_diff(y_small, y_zeroed) < 1e-5);
  CHECK(rel_diff(y_dense, y_zeroed) > 1e-2);  // the pruned units mattered

  const auto sizes = prune::compare_sizes(dense.store, small.store);
  CHECK(sizes.dense_parameters == 20 * 48 + 48 + 48 * 40 + 40 + 40 * 5 + 5);
  CHECK(sizes.shrunk_parameters == 20 * 30 + 30 + 30 * 17 + 17 + 17 * 5 + 5);
  CHECK(sizes.shrunk_bytes == static_cast<std::size_t>(sizes.shrunk_parameters) * 4);

  CHECK_THROWS_WITH_AS(prune::rank_rows(dense.store, fc1.weight(), 49), doctest::Contains("cannot keep 49 of 48"), error);
  CHECK_THROWS_WITH_AS(prune::copy_rows(dense.store, fc1.weight(), small.store, small.net.get<0>().weight(), {0, 2, 2}),
                       doctest::Contains("strictly increasing"), error);
  CHECK_THROWS_WITH_AS(prune::copy_rows(dense.store, fc1.weight(), small.store, small.net.get<0>().weight(), {0, 2, 3}),
                       doctest::Contains("gives (3, 20)"), shape_error);
}

TEST_CASE("prune: a linear pair shrinks exactly (one hidden layer)") {
  // 2-layer net: the pair copy alone gives the whole shrunk model
  using P = P32;
  auto make = [](nn::parameter_store<P>& st, index_t h) {
    return nn::sequential<P, nn::linear<P>, nn::linear<P>>(nn::linear<P>(st, "fc1", 12, h, true, activation::relu),
                                                          nn::linear<P>(st, "fc2", h, 4));
  };
  nn::parameter_store<P> ds, ss;
  auto dn = make(ds, 32);
  ds.allocate();
  auto sn = make(ss, 11);
  ss.allocate();
  generator g(12);
  dn.init(g);
  const auto kept = prune::rank_rows(ds, dn.get<0>().weight(), 11);
  prune::copy_shrunk_linear_pair(ds, dn.get<0>(), dn.get<1>(), ss, sn.get<0>(), sn.get<1>(), kept);
  tensor<float> x({5, 12});
  normal(x, g, 0.0, 1.0);
  prune::zero_rows(ds, dn.get<0>().weight(), prune::complement(kept, 32));
  prune::zero_rows(ds, dn.get<0>().bias(), prune::complement(kept, 32));
  CHECK(rel_diff(run_eval<P>(sn, x), run_eval<P>(dn, x)) < 1e-5);
}

TEST_CASE("prune: a CNN shrunk by output channels (conv -> eval batch norm -> conv / flatten -> linear) matches the zeroed dense CNN") {
  cnn<P32> dense(8, 12);
  generator g(21);
  dense.net.init(g);
  auto& conv1 = dense.net.get<0>();
  auto& bn1 = dense.net.get<1>();
  auto& conv2 = dense.net.get<4>();
  auto& bn2 = dense.net.get<5>();
  auto& fc = dense.net.get<8>();
  // batch norms with non-trivial affine parameters and running statistics
  for (auto* bn : {&bn1, &bn2}) {
    normal(dense.store.param(bn->weight()), g, 1.0, 0.3);
    normal(dense.store.param(bn->bias()), g, 0.0, 0.3);
    normal(bn->running_mean(), g, 0.0, 0.2);
    uniform(bn->running_var(), g, 0.5, 2.0);
  }
  const auto k1 = prune::rank_rows(dense.store, conv1.weight(), 5, prune::norm::l1);
  const auto k2 = prune::rank_rows(dense.store, conv2.weight(), 7);
  cnn<P32> small(5, 7);
  prune::copy_unchanged(dense.store, small.store);
  prune::copy_shrunk_conv_bn(dense.store, conv1, bn1, small.store, small.net.get<0>(), small.net.get<1>(), k1);
  // conv2 keeps output channels k2 of the input channels k1 that conv1 kept
  prune::copy_shrunk_conv_bn(dense.store, conv2, bn2, small.store, small.net.get<4>(), small.net.get<5>(), k2, k1);
  prune::copy_shrunk_linear_input(dense.store, fc, small.store, small.net.get<8>(), k2, 4 * 4);

  tensor<float> x({2, 3, 8, 8});
  normal(x, g, 0.0, 1.0);
  const auto y_dense = run_eval<P32>(dense.net, x);
  const auto p1 = prune::complement(k1, 8), p2 = prune::complement(k2, 12);
  for (auto h : {conv1.weight(), conv1.bias(), bn1.weight(), bn1.bias()}) prune::zero_rows(dense.store, h, p1);
  for (auto h : {conv2.weight(), conv2.bias(), bn2.weight(), bn2.bias()}) prune::zero_rows(dense.store, h, p2);
  const auto y_zeroed = run_eval<P32>(dense.net, x);
  const auto y_small = run_eval<P32>(small.net, x);
  CHECK(rel_diff(y_small, y_zeroed) < 1e-5);
  CHECK(rel_diff(y_dense, y_zeroed) > 1e-2);
  const auto sizes = prune::compare_sizes(dense.store, small.store);
  CHECK(sizes.shrunk_parameters ==
        (5 * 3 * 9 + 5) + 2 * 5 + (7 * 5 * 9 + 7) + 2 * 7 + (10 * 7 * 16 + 10));
  CHECK(sizes.ratio() < 0.7);
}

TEST_CASE("prune: a GPT block shrunk by attention heads matches the block with those heads zeroed") {
  using P = P32;
  const index_t width = 32, heads = 4;
  nn::parameter_store<P> ds;
  nn::transformer_block<P> dense(ds, "h.0", width, heads, true, 0.0);
  ds.allocate();
  generator g(31);
  normal(ds.params(), g, 0.0, 0.3);
  const auto scores = prune::head_norms(ds, dense.attn());
  const auto kept = prune::rank_heads(ds, dense.attn(), 2);
  CHECK(kept == reference_top(scores, 2));
  nn::parameter_store<P> ss;
  nn::transformer_block<P> small(ss, "h.0", width, 2, true, 0.0, width / heads);
  ss.allocate();
  CHECK(small.attn().inner_width() == 16);
  prune::copy_unchanged(ds, ss);
  prune::copy_shrunk_attention(ds, dense.attn(), ss, small.attn(), kept);

  tensor<float> x({2, 6, width});
  normal(x, g, 0.0, 1.0);
  const auto y_dense = run_eval<P>(dense, x);
  prune::zero_heads(ds, dense.attn(), prune::complement(kept, heads));
  const auto y_zeroed = run_eval<P>(dense, x);
  const auto y_small = run_eval<P>(small, x);
  CHECK(rel_diff(y_small, y_zeroed) < 1e-5);
  CHECK(rel_diff(y_dense, y_zeroed) > 1e-2);

  // the attention alone: backward runs at the smaller width too
  nn::arena<cpu> mem;
  nn::context<P> ctx{mem, true, nullptr};
  auto y = small.forward(ctx, x.view());
  auto dx = small.backward(ctx, y);
  CHECK(dx.shape() == x.shape());

  CHECK_THROWS_WITH_AS(prune::copy_shrunk_attention(ds, dense.attn(), ss, small.attn(), {0, 1, 2}), doctest::Contains("keeping 3 heads"),
                       shape_error);
}

TEST_CASE("prune: a GPT with heads pruned per block gives the logits of the dense GPT with those heads zeroed") {
  using P = P32;
  const nn::gpt_config cfg{.vocab_size = 17, .block_size = 8, .n_layer = 2, .n_head = 4, .n_embd = 32};
  nn::parameter_store<P> ds;
  nn::gpt<P> dense(ds, cfg);
  ds.allocate();
  generator g(41);
  normal(ds.params(), g, 0.0, 0.3);
  const auto kept = prune::rank_gpt_heads(ds, dense, {3, 2});
  REQUIRE(kept.size() == 2);
  CHECK(kept[0] == reference_top(prune::head_norms(ds, dense.block(0).attn()), 3));
  CHECK(kept[1] == reference_top(prune::head_norms(ds, dense.block(1).attn()), 2));
  nn::parameter_store<P> ss;
  nn::gpt<P> small(ss, cfg, {3, 2});
  ss.allocate();
  prune::copy_shrunk_gpt_heads(ds, dense, ss, small, kept);

  std::vector<std::int32_t> tokens;
  for (int i = 0; i < 2 * 8; ++i) tokens.push_back((i * 5 + 3) % 17);
  auto logits = [&](nn::gpt<P>& m) {
    nn::arena<cpu> mem;
    nn::context<P> ctx{mem, false, nullptr};
    return to_vector(m.logits(ctx, tokens, 2));
  };
  const auto y_dense = logits(dense);
  for (index_t i = 0; i < 2; ++i) prune::zero_heads(ds, dense.block(i).attn(), prune::complement(kept[static_cast<std::size_t>(i)], 4));
  const auto y_zeroed = logits(dense);
  CHECK(rel_diff(logits(small), y_zeroed) < 1e-5);
  CHECK(rel_diff(y_dense, y_zeroed) > 1e-2);
  CHECK(small.layer_heads() == std::vector<index_t>{3, 2});
  const auto sizes = prune::compare_sizes(ds, ss);
  // each pruned head of width 8 takes 3 * 8 * 32 + 3 * 8 (c_attn) and 32 * 8 (c_proj) parameters
  CHECK(sizes.dense_parameters - sizes.shrunk_parameters == 3 * (3 * 8 * 32 + 3 * 8 + 32 * 8));
  CHECK_THROWS_WITH_AS(nn::gpt<P>(ss, cfg, {3}), doctest::Contains("1 head counts for 2 layers"), error);
}

TEST_CASE("prune: gradual pruning during masked training reaches the final sparsity and keeps every pruned weight at zero") {
  mlp<P32> m;
  const prune::gradual_schedule sched{.initial_sparsity = 0.0, .final_sparsity = 0.8, .start_step = 1, .frequency = 1, .steps = 3};
  prune::gradual_pruner<P32> pruner(m.store, sched, prune::scope::global);
  prune::masked<optim::sgd> opt(pruner.masks(), {.lr = 0.1, .momentum = 0.9, .weight_decay = 1e-2});
  train::step_control<P32> control;
  for (int s = 0; s < steps; ++s) {
    pruner.step(s);
    m.store.zero_grad();
    m.backward(s, 0, global_batch, 1.0);
    control.step(m.store, opt);
    const auto r = prune::report_sparsity(m.store);
    CHECK(r.zeros == pruner.masks().pruned());  // pruned exactly zero, nothing else zero
    CHECK(r.global() == doctest::Approx(sched.sparsity_at(std::min<std::int64_t>(s, sched.end_step()))).epsilon(0.01));
  }
  CHECK(pruner.updates() == 4);
  CHECK(pruner.masks().pruned() == round_half_even(0.8 * (8 * 40 + 40 * 24 + 24 * 3)));
}

TEST_CASE("prune: bf16_mixed masked training zeroes the fp32 master as well, in one process and under ZeRO-2") {
  using P = policy<bf16_mixed, cpu>;
  {
    mlp<P> m;
    const auto masks = half_masks(m);
    prune::masked<optim::adamw> opt(masks, adamw_case::options());
    train::step_control<P> control;
    for (int s = 0; s < 3; ++s) {
      m.store.zero_grad();
      m.backward(s, 0, global_batch, 1.0);
      control.step(m.store, opt);
    }
    int nonzero_master = 0, nonzero_params = 0;
    masks.for_each_pruned(0, m.store.size(), [&](index_t i) {
      nonzero_master += m.store.master().data()[i] != 0.0f;
      nonzero_params += static_cast<float>(m.store.params().data()[i]) != 0.0f;
    });
    CHECK(nonzero_master == 0);
    CHECK(nonzero_params == 0);
    CHECK(prune::report_sparsity(m.store).zeros == masks.pruned());
  }
  using PZ = policy<bf16_mixed, cpu, zero<2>>;
  run_ranks(2, [&](thread_comm& comm) {
    mlp<PZ> m;
    const auto masks = half_masks(m);
    prune::masked<optim::adamw> opt(masks, adamw_case::options());
    parallel::distributed_step<PZ, thread_comm> dist(m.store, comm, {.reduce_bucket_size = 100});
    const index_t b = global_batch * comm.rank() / 2, e = global_batch * (comm.rank() + 1) / 2;
    for (int s = 0; s < 3; ++s) {
      m.store.zero_grad();
      m.backward(s, b, e, dist.loss_scale());
      dist.step(opt);
    }
    const auto [pb, pe] = dist.partition();
    auto master = dist.master();
    int nonzero_master = 0, nonzero_params = 0, pruned_here = 0;
    masks.for_each_pruned(pb, pe, [&](index_t i) {
      ++pruned_here;
      nonzero_master += master.data()[i - pb] != 0.0f;
    });
    masks.for_each_pruned(0, m.store.size(), [&](index_t i) { nonzero_params += static_cast<float>(m.store.params().data()[i]) != 0.0f; });
    CHECK(pruned_here > 0);
    CHECK(nonzero_master == 0);
    CHECK(nonzero_params == 0);
  });
}
