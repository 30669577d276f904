// Knowledge distillation: Hinton's loss against the formula written out in double (value,
// gradient by central differences, α = 0 as plain cross-entropy, the T² scaling and its
// high-temperature limit, logit matching), bad input; the teacher–student trainer: its loss is
// the loss module's, its gradients are the module's, accumulation gives one big batch's step,
// the teacher is left alone, and a small student distilled from a trained teacher (fp32, or
// converted to int8) learns.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <trident/distill.hpp>
#include <trident/io/batches.hpp>
#include <trident/quant.hpp>
#include <trident/trident.hpp>

#include "blobs_fixture.hpp"

using namespace trident;

namespace {

using f64 = policy<fp64, cpu>;
using fp32p = policy<fp32, cpu>;
using bf16p = policy<bf16_mixed, cpu>;

/// Hinton's loss and its gradient written out from the formula, in double, without shifts.
struct reference {
  double loss = 0, kd = 0, ce = 0;
  std::vector<double> grad;  // d(mean loss)/d(student logits)
};

std::vector<double> softmax(const double* z, int c, double t) {
  std::vector<double> p(static_cast<std::size_t>(c));
  double s = 0;
  for (int j = 0; j < c; ++j) s += p[static_cast<std::size_t>(j)] = std::exp(z[j] / t);
  for (auto& v : p) v /= s;
  return p;
}

reference hinton_reference(const std::vector<double>& zs, const std::vector<double>& zt, const std::vector<std::int32_t>& y,
                           int n, int c, double t, double alpha) {
  reference r;
  r.grad.assign(zs.size(), 0.0);
  for (int i = 0; i < n; ++i) {
    const auto ps_t = softmax(zs.data() + i * c, c, t), pt_t = softmax(zt.data() + i * c, c, t);
    const auto ps = softmax(zs.data() + i * c, c, 1.0);
    double kl = 0;
    for (int j = 0; j < c; ++j) kl += pt_t[j] * std::log(pt_t[j] / ps_t[j]);
    r.kd += t * t * kl / n;
    r.ce += -std::log(ps[static_cast<std::size_t>(y[i])]) / n;
    for (int j = 0; j < c; ++j) {
      r.grad[static_cast<std::size_t>(i * c + j)] =
          alpha * t * (ps_t[j] - pt_t[j]) / n + (1 - alpha) * (ps[j] - (j == y[i] ? 1.0 : 0.0)) / n;
    }
  }
  r.loss = alpha * r.kd + (1 - alpha) * r.ce;
  return r;
}

std::vector<double> random_values(std::size_t n, std::uint64_t seed, double lo, double hi) {
  auto x = tensor<double>({static_cast<index_t>(n)});
  generator g(seed);
  uniform(x, g, lo, hi);
  return to_vector(x);
}

std::vector<std::int32_t> random_labels(int n, int c, std::uint64_t seed) {
  const auto u = random_values(static_cast<std::size_t>(n), seed, 0.0, static_cast<double>(c));
  std::vector<std::int32_t> y;
  for (double v : u) y.push_back(std::min(c - 1, static_cast<std::int32_t>(v)));
  return y;
}

}  // namespace

TEST_CASE("hinton loss: value and gradient against the formula in double, for several T and alpha") {
  nn::arena<cpu> mem;
  nn::context<f64> ctx{mem, true, nullptr};
  const int n = 7, c = 5;
  const auto zs = random_values(n * c, 11, -3.0, 3.0), zt = random_values(n * c, 12, -4.0, 4.0);
  const auto y = random_labels(n, c, 13);
  const auto s = from_vector<double>({n, c}, zs), t = from_vector<double>({n, c}, zt);
  for (double temp : {1.0, 2.5, 8.0}) {
    for (double alpha : {0.0, 0.3, 0.9, 1.0}) {
      INFO("T " << temp << " alpha " << alpha);
      const auto ref = hinton_reference(zs, zt, y, n, c, temp, alpha);
      distill::hinton_loss<f64> loss({.temperature = temp, .alpha = alpha});
      mem.reset();
      const double l = loss.forward(ctx, s.view(), t.view(), y);
      CHECK(l == doctest::Approx(ref.loss).epsilon(1e-12));
      CHECK(loss.distillation_term() == doctest::Approx(ref.kd).epsilon(1e-12));
      CHECK(loss.cross_entropy_term() == doctest::Approx(ref.ce).epsilon(1e-12));
      CHECK(loss.count() == n);
      // the gradient, scaled by a loss scale of 4, against the formula
      const auto g = to_vector(loss.backward(ctx, 4.0));
      for (std::size_t i = 0; i < g.size(); ++i) REQUIRE(g[i] == doctest::Approx(4.0 * ref.grad[i]).epsilon(1e-12).scale(1e-15));
    }
  }
}

TEST_CASE("hinton loss: the gradient by central differences in double") {
  nn::arena<cpu> mem;
  nn::context<f64> ctx{mem, true, nullptr};
  const int n = 6, c = 4;
  auto s = from_vector<double>({n, c}, random_values(n * c, 21, -2.0, 2.0));
  const auto t = from_vector<double>({n, c}, random_values(n * c, 22, -2.0, 2.0));
  const auto y = random_labels(n, c, 23);
  for (double temp : {1.0, 3.0}) {
    distill::hinton_loss<f64> loss({.temperature = temp, .alpha = 0.7});
    mem.reset();
    loss.forward(ctx, s.view(), t.view(), y);
    const auto g = to_vector(loss.backward(ctx, 1.0));
    double worst = 0;
    for (index_t i = 0; i < s.numel(); ++i) {
      const double saved = s.data()[i], h = 1e-6;
      s.data()[i] = saved + h;
      const double lp = loss.forward(ctx, s.view(), t.view(), y);
      s.data()[i] = saved - h;
      const double lm = loss.forward(ctx, s.view(), t.view(), y);
      s.data()[i] = saved;
      const double numeric = (lp - lm) / (2 * h);
      worst = std::max(worst, std::abs(numeric - g[static_cast<std::size_t>(i)]) /
                                  std::max(1e-8, std::abs(numeric) + std::abs(g[static_cast<std::size_t>(i)])));
    }
    INFO("T " << temp);
    CHECK(worst < 1e-7);
  }
}

TEST_CASE("hinton loss: alpha = 0 is plain cross-entropy, whatever the teacher says") {
  nn::arena<cpu> mem;
  nn::context<f64> ctx{mem, true, nullptr};
  const int n = 9, c = 6;
  const auto s = from_vector<double>({n, c}, random_values(n * c, 31, -3.0, 3.0));
  const auto t = from_vector<double>({n, c}, random_values(n * c, 32, -30.0, 30.0));
  const auto y = random_labels(n, c, 33);
  nn::softmax_cross_entropy<f64> ce;
  const double l_ce = ce.forward(ctx, s.view(), y);
  const auto g_ce = to_vector(ce.backward(ctx, 2.0));
  for (double temp : {1.0, 5.0}) {
    distill::hinton_loss<f64> kd({.temperature = temp, .alpha = 0.0});
    CHECK(kd.forward(ctx, s.view(), t.view(), y) == doctest::Approx(l_ce).epsilon(1e-14));
    const auto g = to_vector(kd.backward(ctx, 2.0));
    for (std::size_t i = 0; i < g.size(); ++i) REQUIRE(g[i] == doctest::Approx(g_ce[i]).epsilon(1e-13).scale(1e-16));
  }
}

TEST_CASE("hinton loss: T² keeps the soft gradient's scale; at high T the soft term is logit matching") {
  nn::arena<cpu> mem;
  nn::context<f64> ctx{mem, true, nullptr};
  const int n = 5, c = 8;
  auto zs = random_values(n * c, 41, -2.0, 2.0), zt = random_values(n * c, 42, -2.0, 2.0);
  // zero-mean rows, as the paper's limit assumes
  for (auto* z : {&zs, &zt}) {
    for (int i = 0; i < n; ++i) {
      double m = 0;
      for (int j = 0; j < c; ++j) m += (*z)[static_cast<std::size_t>(i * c + j)] / c;
      for (int j = 0; j < c; ++j) (*z)[static_cast<std::size_t>(i * c + j)] -= m;
    }
  }
  const auto s = from_vector<double>({n, c}, zs), t = from_vector<double>({n, c}, zt);
  const std::vector<std::int32_t> y = {0, 1, 2, 3, 4};
  // Hinton et al. 2015, section 2.1: with zero-mean logits and T ≫ |z|, the gradient of the
  // soft term per row is (z_s − z_t) / (C T²) before the T² factor, so T²·KL → Σ (z_s − z_t)² / 2C.
  double matching = 0;
  std::vector<double> matching_grad(zs.size());
  for (std::size_t i = 0; i < zs.size(); ++i) {
    const double d = zs[i] - zt[i];
    matching += d * d / (2.0 * c) / n;
    matching_grad[i] = d / (static_cast<double>(c) * n);
  }
  double previous_norm = 0;
  for (double temp : {10.0, 100.0, 1000.0}) {
    distill::hinton_loss<f64> kd({.temperature = temp, .alpha = 1.0});
    mem.reset();
    const double l = kd.forward(ctx, s.view(), t.view(), y);
    const auto g = to_vector(kd.backward(ctx, 1.0));
    double err = 0, norm = 0, ref_norm = 0;
    for (std::size_t i = 0; i < g.size(); ++i) {
      err += (g[i] - matching_grad[i]) * (g[i] - matching_grad[i]);
      norm += g[i] * g[i];
      ref_norm += matching_grad[i] * matching_grad[i];
    }
    INFO("T " << temp);
    // the relative distance to the limit falls as 1/T
    CHECK(std::sqrt(err / ref_norm) < 2.0 / temp);
    CHECK(std::abs(l - matching) / matching < 2.0 / temp);
    // and the gradient's size stays put as T grows (without T² it would shrink as 1/T²)
    if (previous_norm > 0) CHECK(std::sqrt(norm) == doctest::Approx(previous_norm).epsilon(0.25));
    previous_norm = std::sqrt(norm);
  }
  // the T² factor itself: the soft term at T is T² times the KL divergence at T
  for (double temp : {0.5, 2.0, 6.0}) {
    const auto ref = hinton_reference(zs, zt, y, n, c, temp, 1.0);
    double kl = 0;
    for (int i = 0; i < n; ++i) {
      const auto pt = softmax(zt.data() + i * c, c, temp), ps = softmax(zs.data() + i * c, c, temp);
      for (int j = 0; j < c; ++j) kl += pt[j] * (std::log(pt[j]) - std::log(ps[j])) / n;
    }
    distill::hinton_loss<f64> kd({.temperature = temp, .alpha = 1.0});
    CHECK(kd.forward(ctx, s.view(), t.view(), y) == doctest::Approx(temp * temp * kl).epsilon(1e-12));
    CHECK(ref.kd == doctest::Approx(temp * temp * kl).epsilon(1e-12));
  }
}

TEST_CASE("hinton loss: max-shifted, so huge logits give the shifted logits' loss; a teacher equal to the student costs nothing") {
  nn::arena<cpu> mem;
  nn::context<f64> ctx{mem, true, nullptr};
  const int n = 4, c = 5;
  const auto zs = random_values(n * c, 51, -3.0, 3.0), zt = random_values(n * c, 52, -3.0, 3.0);
  const auto y = random_labels(n, c, 53);
  std::vector<double> zs_big = zs, zt_big = zt;
  for (auto& v : zs_big) v += 3e4;
  for (auto& v : zt_big) v -= 5e4;
  distill::hinton_loss<f64> kd({.temperature = 0.7, .alpha = 0.6});
  const double small = kd.forward(ctx, from_vector<double>({n, c}, zs).view(), from_vector<double>({n, c}, zt).view(), y);
  const auto bs = from_vector<double>({n, c}, zs_big), bt = from_vector<double>({n, c}, zt_big);
  const double big = kd.forward(ctx, bs.view(), bt.view(), y);
  CHECK(std::isfinite(big));
  CHECK(big == doctest::Approx(small).epsilon(1e-9));
  // KL(p ‖ p) = 0: only the hard term is left
  const auto same = from_vector<double>({n, c}, zs);
  kd.forward(ctx, same.view(), same.view(), y);
  CHECK(std::abs(kd.distillation_term()) < 1e-14);
}

TEST_CASE("hinton loss: fp32, and a bf16 student under an fp32 teacher, match the double formula") {
  const int n = 33, c = 10;
  const auto zs = random_values(n * c, 61, -4.0, 4.0), zt = random_values(n * c, 62, -4.0, 4.0);
  const auto y = random_labels(n, c, 63);
  {
    nn::arena<cpu> mem;
    nn::context<fp32p> ctx{mem, true, nullptr};
    const auto s = cast<float>(from_vector<double>({n, c}, zs)), t = cast<float>(from_vector<double>({n, c}, zt));
    const auto zs32 = to_vector(cast<double>(s)), zt32 = to_vector(cast<double>(t));
    const auto ref = hinton_reference(zs32, zt32, y, n, c, 3.0, 0.8);
    distill::hinton_loss<fp32p> kd({.temperature = 3.0, .alpha = 0.8});
    CHECK(kd.forward(ctx, s.view(), t.view(), y) == doctest::Approx(ref.loss).epsilon(1e-5));
    const auto g = to_vector(cast<double>(kd.backward(ctx, 1.0)));
    for (std::size_t i = 0; i < g.size(); ++i) REQUIRE(g[i] == doctest::Approx(ref.grad[i]).epsilon(1e-5).scale(1e-3));  // differences of probabilities: absolute ~1e-8
  }
  {
    nn::arena<cpu> mem;
    nn::context<bf16p> ctx{mem, true, nullptr};
    const auto s = cast<bfloat16>(from_vector<double>({n, c}, zs));
    const auto t = cast<float>(from_vector<double>({n, c}, zt));
    const auto ref = hinton_reference(to_vector(cast<double>(s)), to_vector(cast<double>(t)), y, n, c, 2.0, 0.5);
    distill::hinton_loss<bf16p, float> kd({.temperature = 2.0, .alpha = 0.5});
    CHECK(kd.forward(ctx, s.view(), t.view(), y) == doctest::Approx(ref.loss).epsilon(1e-5));
    const auto g = to_vector(cast<double>(kd.backward(ctx, 1.0)));
    // the gradient is stored in bf16: 8 bits of mantissa
    for (std::size_t i = 0; i < g.size(); ++i) REQUIRE(g[i] == doctest::Approx(ref.grad[i]).epsilon(1.0 / 128).scale(1e-6));
  }
}

TEST_CASE("hinton loss: bad parameters, shapes, labels and a NaN teacher are refused with what was wrong") {
  CHECK_THROWS_WITH_AS(distill::hinton_loss<f64>({.temperature = 0.0}), doctest::Contains("temperature"), error);
  CHECK_THROWS_WITH_AS(distill::hinton_loss<f64>({.temperature = -2.0}), doctest::Contains("-2"), error);
  CHECK_THROWS_AS(distill::hinton_loss<f64>({.temperature = std::numeric_limits<double>::quiet_NaN()}), error);
  CHECK_THROWS_AS(distill::hinton_loss<f64>({.temperature = std::numeric_limits<double>::infinity()}), error);
  CHECK_THROWS_WITH_AS(distill::hinton_loss<f64>({.alpha = 1.5}), doctest::Contains("alpha"), error);
  CHECK_THROWS_AS(distill::hinton_loss<f64>({.alpha = -0.1}), error);
  CHECK_THROWS_AS(distill::hinton_loss<f64>({.alpha = std::numeric_limits<double>::quiet_NaN()}), error);

  nn::arena<cpu> mem;
  nn::context<f64> ctx{mem, true, nullptr};
  distill::hinton_loss<f64> kd;
  auto s = from_vector<double>({3, 4}, random_values(12, 71, -1.0, 1.0));
  auto t = from_vector<double>({3, 4}, random_values(12, 72, -1.0, 1.0));
  const auto t5 = from_vector<double>({3, 5}, random_values(15, 73, -1.0, 1.0));
  const std::vector<std::int32_t> y = {0, 3, 1};
  CHECK_THROWS_WITH_AS(kd.forward(ctx, s.view(), t5.view(), y), doctest::Contains("(3, 5)"), shape_error);
  const std::vector<std::int32_t> two = {0, 1};
  CHECK_THROWS_AS(kd.forward(ctx, s.view(), t.view(), two), shape_error);
  const std::vector<std::int32_t> out_of_range = {0, 4, 1};
  CHECK_THROWS_WITH_AS(kd.forward(ctx, s.view(), t.view(), out_of_range), doctest::Contains("label 4 of row 1"), error);
  t.data()[2 * 4 + 1] = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH_AS(kd.forward(ctx, s.view(), t.view(), y), doctest::Contains("teacher's logit at row 2, class 1 is nan"),
                       error);
  t.data()[2 * 4 + 1] = 0.5;
  t.data()[0] = std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH_AS(kd.forward(ctx, s.view(), t.view(), y), doctest::Contains("row 0, class 0 is inf"), error);
  t.data()[0] = 0.5;
  // a NaN student logit is the trainer's business (divergence, or an fp16 overflow to skip)
  s.data()[5] = std::numeric_limits<double>::quiet_NaN();
  CHECK(std::isnan(kd.forward(ctx, s.view(), t.view(), y)));
}

// ---------------------------------------------------------------------------------------------
// The trainer

namespace {

using blobs_fixture::blobs;

template <class P>
struct mlp {
  nn::parameter_store<P> store;
  nn::sequential<P, nn::linear<P>, nn::linear<P>> net;
  mlp(int hidden, int classes, std::uint64_t seed)
      : net(nn::linear<P>(store, "fc1", 8, hidden, true, activation::relu), nn::linear<P>(store, "fc2", hidden, classes)) {
    store.allocate();
    generator g(seed);
    net.init(g);
    store.master_from_params();
  }
};

template <class P>
std::vector<double> values_of(tensor_view<typename P::storage_type, cpu> v) {
  return to_vector(cast<double>(v));
}

/// A teacher with nothing but forward: logits = x·Wᵀ for a fixed W (classes, 8), as a quantized
/// or otherwise frozen model would be.
template <class P>
struct frozen_linear {
  using S = typename P::storage_type;
  tensor<S> w;
  index_t forwards = 0;
  explicit frozen_linear(int classes) : w({classes, 8}) {
    for (index_t k = 0; k < classes; ++k)
      for (index_t j = 0; j < 8; ++j) w.data()[k * 8 + j] = static_cast<S>((j % classes) == k ? 3.0 : -1.0);
  }
  tensor_view<S, cpu> forward(nn::context<P>& ctx, tensor_view<const S, cpu> x) {
    CHECK(!ctx.training);
    ++forwards;
    auto y = ctx.template allocate<S>({x.size(0), w.size(0)});
    for (index_t i = 0; i < x.size(0); ++i)
      for (index_t k = 0; k < w.size(0); ++k) {
        double s = 0;
        for (index_t j = 0; j < 8; ++j) s += static_cast<double>(x(i, j)) * static_cast<double>(w(k, j));
        y(i, k) = static_cast<S>(s);
      }
    return y;
  }
};

}  // namespace

TEST_CASE("distill::trainer: the batch loss is the loss module's, the gradients are its, accumulation is one batch") {
  blobs data(48, 3, 1);
  // fp32: the optimizers run in fp32 (or mixed) precision, not fp64
  const auto& x = data.x;
  mlp<fp32p> teacher(24, 3, 7);
  auto run = [&](int k, std::vector<double>* grads_out, double* loss_out, double* expected_out) {
    mlp<fp32p> student(6, 3, 9);
    // what the loss module says of the untouched student, and its gradients
    nn::arena<cpu> mem, tmem;
    nn::context<fp32p> tctx{tmem, false, nullptr};
    nn::context<fp32p> ctx{mem, true, nullptr};
    const auto tl = teacher.net.forward(tctx, x.view());
    distill::hinton_loss<fp32p> loss({.temperature = 2.0, .alpha = 0.75});
    const auto sl = student.net.forward(ctx, x.view());
    const double expected = loss.forward(ctx, sl, tl, data.y);
    student.store.zero_grad();
    student.net.backward(ctx, loss.backward(ctx, 1.0));
    const auto expected_grads = to_vector(cast<double>(student.store.grads()));
    const double expected_kd = loss.distillation_term(), expected_ce = loss.cross_entropy_term();

    optim::sgd opt({.lr = 0.3});
    distill::trainer<fp32p, decltype(student.net), decltype(teacher.net), optim::sgd> t(
        student.net, student.store, teacher.net, opt,
        {.gradient_accumulation_steps = k, .loss = {.temperature = 2.0, .alpha = 0.75}, .progress = false, .out = nullptr});
    const auto r = t.train_batch(x.view(), data.y);
    INFO("accumulation " << k);
    // micro-batches are separate GEMMs: the same sums, grouped otherwise, in fp32
    const double tol = k == 1 ? 1e-12 : 1e-6;
    CHECK(r.loss == doctest::Approx(expected).epsilon(tol));
    CHECK(r.distillation == doctest::Approx(expected_kd).epsilon(tol));
    CHECK(r.cross_entropy == doctest::Approx(expected_ce).epsilon(tol));
    CHECK(r.loss == doctest::Approx(0.75 * r.distillation + 0.25 * r.cross_entropy).epsilon(1e-12));
    CHECK(r.counted == 48);
    // the optimizer does not zero the gradients: they are what the step used
    const auto grads = to_vector(cast<double>(student.store.grads()));
    REQUIRE(grads.size() == expected_grads.size());
    for (std::size_t i = 0; i < grads.size(); ++i) REQUIRE(grads[i] == doctest::Approx(expected_grads[i]).epsilon(1e-5).scale(1e-7));
    // a second step: the loss of the stepped student, as the module gives it
    mem.reset();
    tmem.reset();
    const auto tl2 = teacher.net.forward(tctx, x.view());
    const double expected2 = loss.forward(ctx, student.net.forward(ctx, x.view()), tl2, data.y);
    const auto r2 = t.train_batch(x.view(), data.y);
    CHECK(r2.loss == doctest::Approx(expected2).epsilon(tol));
    CHECK(r2.loss < r.loss);
    *loss_out = r2.loss;
    *expected_out = expected2;
    *grads_out = to_vector(cast<double>(student.store.master()));
  };
  std::vector<double> one, acc;
  double l1 = 0, e1 = 0, l3 = 0, e3 = 0;
  run(1, &one, &l1, &e1);
  run(3, &acc, &l3, &e3);
  CHECK(l3 == doctest::Approx(l1).epsilon(1e-6));
  double worst = 0;
  for (std::size_t i = 0; i < one.size(); ++i) worst = std::max(worst, std::abs(acc[i] - one[i]));
  CHECK(worst < 2e-6);
}

TEST_CASE("distill::trainer: a small student learns from a trained teacher, left as it was, and from its int8 conversion") {
  blobs train_set(512, 4, 3), test_set(256, 4, 4);
  io::batch_loader<float> tl(train_set.x.view(), train_set.y, {.batch_size = 32, .seed = 1});
  io::batch_loader<float> el(test_set.x.view(), test_set.y, {.batch_size = 100, .shuffle = false});
  mlp<fp32p> teacher(32, 4, 5);
  {
    optim::sgd opt({.lr = 0.1, .momentum = 0.9});
    train::trainer<fp32p, decltype(teacher.net), optim::sgd> t(teacher.net, teacher.store, opt,
                                                              {.epochs = 4, .progress = false, .out = nullptr});
    REQUIRE(t.fit(tl, &el).last_eval.accuracy > 0.95);
  }
  const auto teacher_params = values_of<fp32p>(teacher.store.params());
  const auto dir = std::filesystem::temp_directory_path() / "trident_test_distill";
  std::filesystem::create_directories(dir);
  const auto csv = (dir / "distill.csv").string();

  mlp<fp32p> student(6, 4, 8);
  optim::sgd opt({.lr = 0.1, .momentum = 0.9});
  std::FILE* sink = std::tmpfile();
  distill::trainer<fp32p, decltype(student.net), decltype(teacher.net), optim::sgd> t(
      student.net, student.store, teacher.net, opt,
      {.epochs = 4, .loss = {.temperature = 3.0, .alpha = 0.8}, .csv_path = csv, .log_every = 8, .progress = false, .out = sink});
  const auto before = t.evaluate(el);
  const auto first = t.train_batch(train_set.x.view().slice(0, 0, 32), std::span(train_set.y).first(32));
  const auto s = t.fit(tl, &el);
  std::fclose(sink);
  CHECK(before.accuracy < 0.6);
  CHECK(s.steps == 1 + 4 * 16);
  CHECK(s.last_eval.samples == 256);
  CHECK(s.last_eval.accuracy > 0.93);
  CHECK(s.last_train.loss < 0.3 * first.loss);
  CHECK(t.evaluate_teacher(el).accuracy > 0.95);
  // the teacher: not one parameter changed, and its arena holds one eval forward of one batch
  CHECK(values_of<fp32p>(teacher.store.params()) == teacher_params);
  CHECK(t.teacher_activations().capacity_bytes() > 0);
  CHECK(s.memory.parameters == student.store.bytes());
  // the log: a header, a row every 8 steps, and one per epoch with the eval metrics
  std::ifstream in(csv);
  std::string line;
  std::getline(in, line);
  CHECK(line ==
        "step,epoch,lr,train_loss,train_distillation,train_cross_entropy,train_acc,eval_loss,eval_acc,samples_per_s,"
        "loss_scale,skipped_steps");
  int rows = 0;
  while (std::getline(in, line)) ++rows;
  CHECK(rows == 4 * 2 + 4);
  std::filesystem::remove_all(dir);

  // A quantized teacher: the same teacher converted to int8 (quant::qlinear layers, inference only).
  auto int8_teacher = quant::convert<quant::dynamic_int8<quant::per_row>>(teacher.net, teacher.store);
  mlp<fp32p> student2(6, 4, 8);
  optim::sgd opt2({.lr = 0.1, .momentum = 0.9});
  distill::trainer<fp32p, decltype(student2.net), decltype(int8_teacher), optim::sgd> t2(
      student2.net, student2.store, int8_teacher, opt2, {.epochs = 4, .loss = {.temperature = 3.0, .alpha = 0.8}, .progress = false, .out = nullptr});
  CHECK(t2.evaluate_teacher(el).accuracy > 0.95);
  const auto s2 = t2.fit(tl, &el);
  CHECK(s2.last_eval.accuracy > 0.93);
  CHECK(s2.last_train.loss < 0.3 * first.loss);
}

TEST_CASE("distill::trainer: a forward-only fp32 teacher teaches a bf16 student; its NaN is named") {
  blobs data(96, 4, 6);
  frozen_linear<fp32p> teacher(4);
  mlp<bf16p> student(12, 4, 3);
  optim::sgd opt({.lr = 0.2, .momentum = 0.9});
  using T = distill::trainer<bf16p, decltype(student.net), frozen_linear<fp32p>, optim::sgd, train::constant_lr, fp32p>;
  T t(student.net, student.store, teacher, opt, {.loss = {.temperature = 2.0, .alpha = 1.0}, .progress = false, .out = nullptr});
  const auto xb = cast<bfloat16>(data.x);
  double first = 0, last = 0;
  for (int step = 0; step < 60; ++step) {
    const auto r = t.train_batch(xb.view(), data.y);
    if (step == 0) first = r.distillation;
    last = r.distillation;
  }
  CHECK(teacher.forwards == 60);
  CHECK(last < 0.25 * first);
  teacher.w.data()[3] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(t.train_batch(xb.view(), data.y), doctest::Contains("teacher's logit at row 0, class 0 is nan"), error);
}

TEST_CASE("distill::trainer: an fp16 student with loss scaling, clipping and a warm-up schedule learns from an fp32 teacher") {
  using fp16p = policy<fp16_mixed, cpu>;
  blobs data(128, 4, 9);
  mlp<fp32p> teacher(32, 4, 5);
  {
    optim::sgd opt({.lr = 0.1, .momentum = 0.9});
    train::trainer<fp32p, decltype(teacher.net), optim::sgd> t(teacher.net, teacher.store, opt, {.progress = false, .out = nullptr});
    for (int step = 0; step < 60; ++step) t.train_batch(data.x.view(), data.y);
  }
  mlp<fp16p> student(8, 4, 2);
  optim::sgd opt({.lr = 0.2, .momentum = 0.9});
  sched::warmup_lr warmup(opt, {.warmup_min_lr = 0.0, .warmup_num_steps = 10, .warmup_type = sched::warmup_kind::linear});
  using T = distill::trainer<fp16p, decltype(student.net), decltype(teacher.net), optim::sgd, sched::warmup_lr, fp32p>;
  T t(student.net, student.store, teacher.net, opt,
      {.gradient_accumulation_steps = 2, .step = {.gradient_clipping = 1.0}, .loss = {.temperature = 2.0, .alpha = 0.7},
       .progress = false, .out = nullptr},
      warmup);
  const auto xh = cast<half>(data.x);
  double first = 0, last = 0;
  int applied = 0;
  for (int step = 0; step < 80; ++step) {
    const auto r = t.train_batch(xh.view(), data.y);
    CHECK(r.step.loss_scale > 1.0);  // the loss was scaled before backward
    if (r.step.applied) {
      ++applied;
      CHECK(r.step.grad_norm >= 0.0);
      CHECK(r.step.clip <= 1.0);
    }
    if (step == 0) first = r.loss;
    last = r.loss;
  }
  CHECK(applied >= 70);
  CHECK(t.lr() == doctest::Approx(0.2));  // the warm-up is over: the scheduler stepped with every applied step
  CHECK(last < 0.3 * first);
}

TEST_CASE("distill::trainer: bad options and mismatched batches are refused") {
  mlp<fp32p> student(4, 3, 1), teacher(8, 3, 2);
  optim::sgd opt({.lr = 0.1});
  using T = distill::trainer<fp32p, decltype(student.net), decltype(teacher.net), optim::sgd>;
  CHECK_THROWS_AS(T(student.net, student.store, teacher.net, opt, {.gradient_accumulation_steps = 0}), error);
  CHECK_THROWS_AS(T(student.net, student.store, teacher.net, opt, {.epochs = -1}), error);
  CHECK_THROWS_WITH_AS(T(student.net, student.store, teacher.net, opt, {.loss = {.temperature = 0.0}}),
                       doctest::Contains("temperature"), error);
  CHECK_THROWS_WITH_AS(T(student.net, student.store, teacher.net, opt, {.loss = {.alpha = 2.0}}), doctest::Contains("alpha"),
                       error);
  T t(student.net, student.store, teacher.net, opt, {.progress = false, .out = nullptr});
  tensor<float> x({4, 8});
  const std::vector<std::int32_t> y = {0, 1, 2};
  CHECK_THROWS_AS(t.train_batch(x.view(), y), shape_error);
  const std::vector<std::int32_t> bad = {0, 1, 2, 7};
  CHECK_THROWS_WITH_AS(t.train_batch(x.view(), bad), doctest::Contains("label 7"), error);
}
