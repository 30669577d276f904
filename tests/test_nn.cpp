// Modules: finite-difference gradient checks in double for every module, and the forward
// results of the mixed-precision policies against the fp64 model with the same weights.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include <trident/trident.hpp>

#include "gradcheck.hpp"

using namespace trident;
using trident_test::f64;
using trident_test::gradcheck;
using trident_test::random_input;

namespace {

template <class M>
void check_module(nn::parameter_store<f64>& store, M& m, tensor<double>& x, const char* what, double tol = 1e-6) {
  if (!store.allocated()) store.allocate();
  generator g(3);
  nn::init_module(m, g);
  const auto r = gradcheck(
      store, x, [&](nn::context<f64>& ctx, tensor_view<const double> in) { return m.forward(ctx, in); },
      [&](nn::context<f64>& ctx, tensor_view<const double> dy) { return m.backward(ctx, dy); });
  INFO(what << ": worst " << r.worst);
  CHECK(r.checked > 0);
  CHECK(r.max_rel_error < tol);
}

}  // namespace

TEST_CASE("gradient check: linear, with bias and each fused activation") {
  for (auto act : {activation::none, activation::relu, activation::gelu, activation::gelu_tanh}) {
    nn::parameter_store<f64> store;
    nn::linear<f64> fc(store, "fc", 13, 7, true, act);
    auto x = random_input({5, 13}, 11);
    INFO("activation " << to_string(act));
    check_module(store, fc, x, "linear");
  }
  nn::parameter_store<f64> store;
  nn::linear<f64> fc(store, "fc", 6, 4, false);
  auto x = random_input({2, 3, 6}, 12);  // leading dimensions are batch dimensions
  check_module(store, fc, x, "linear without bias, 3-d input");
}

TEST_CASE("gradient check: relu, gelu, gelu_tanh, flatten") {
  nn::parameter_store<f64> store;
  store.allocate();
  auto x = random_input({4, 3, 5}, 21);
  nn::relu<f64> r;
  check_module(store, r, x, "relu");
  nn::gelu<f64> g;
  check_module(store, g, x, "gelu");
  nn::gelu_tanh<f64> gt;
  check_module(store, gt, x, "gelu_tanh");
  nn::flatten<f64> fl;
  check_module(store, fl, x, "flatten");
}

TEST_CASE("gradient check: layer_norm with and without affine parameters") {
  {
    nn::parameter_store<f64> store;
    nn::layer_norm<f64> ln(store, "ln", 9);
    store.allocate();
    generator g(4);
    ln.init(g);
    // non-trivial gamma/beta, so their gradients and the input's depend on them
    uniform(store.params(), g, 0.5, 1.5);
    auto x = random_input({6, 9}, 31);
    const auto r = gradcheck(
        store, x, [&](nn::context<f64>& ctx, tensor_view<const double> in) { return ln.forward(ctx, in); },
        [&](nn::context<f64>& ctx, tensor_view<const double> dy) { return ln.backward(ctx, dy); });
    INFO("worst " << r.worst);
    CHECK(r.max_rel_error < 1e-6);
  }
  nn::parameter_store<f64> store;
  nn::layer_norm<f64> ln(store, "ln", 5, 1e-5, false);
  auto x = random_input({3, 2, 5}, 32);
  check_module(store, ln, x, "layer_norm without affine");
}

TEST_CASE("gradient check: dropout with a fixed mask") {
  nn::parameter_store<f64> store;
  store.allocate();
  nn::dropout<f64> dp(0.3);
  auto x = random_input({7, 11}, 41);
  generator gen(5);
  const auto r = gradcheck(
      store, x,
      [&](nn::context<f64>& ctx, tensor_view<const double> in) {
        ctx.rng = &gen;
        return dp.forward(ctx, in);
      },
      [&](nn::context<f64>& ctx, tensor_view<const double> dy) { return dp.backward(ctx, dy); },
      [&] { gen.set_offset(0); });
  INFO("worst " << r.worst);
  CHECK(r.max_rel_error < 1e-6);
}

TEST_CASE("dropout: the kept fraction, the scaling, eval mode") {
  using P = policy<fp32, cpu>;
  nn::arena<cpu> mem;
  generator gen(9);
  nn::context<P> ctx{mem, true, &gen};
  nn::dropout<P> dp(0.25);
  auto x = tensor<float>({1 << 16});
  fill(x, 2.0);
  auto y = dp.forward(ctx, x.view());
  index_t kept = 0;
  for (index_t i = 0; i < y.numel(); ++i) {
    REQUIRE((y(i) == 0.0f || y(i) == 2.0f / 0.75f));
    kept += y(i) != 0.0f;
  }
  CHECK(std::fabs(static_cast<double>(kept) / static_cast<double>(y.numel()) - 0.75) < 0.01);
  ctx.training = false;
  auto z = dp.forward(ctx, x.view());
  CHECK(sum(z) == doctest::Approx(2.0 * (1 << 16)));
  ctx.rng = nullptr;
  ctx.training = true;
  CHECK_THROWS_WITH_AS(dp.forward(ctx, x.view()), doctest::Contains("generator"), error);
  CHECK_THROWS_AS(nn::dropout<P>(1.0), error);
}

TEST_CASE("softmax cross-entropy: value, gradient check, label smoothing, ignore index") {
  nn::arena<cpu> mem;
  nn::context<f64> ctx{mem, true, nullptr};
  // value against the formula
  {
    const auto logits = from_vector<double>({2, 3}, {1.0, 2.0, 3.0, 0.5, 0.5, -1.0});
    const std::vector<std::int32_t> labels = {2, 0};
    nn::softmax_cross_entropy<f64> ce;
    const double l = ce.forward(ctx, logits.view(), labels);
    const double l0 = -(3.0 - std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0)));
    const double l1 = -(0.5 - std::log(2 * std::exp(0.5) + std::exp(-1.0)));
    CHECK(l == doctest::Approx((l0 + l1) / 2).epsilon(1e-14));
  }
  for (double eps : {0.0, 0.1}) {
    for (std::int32_t ignore : {-100, 1}) {
      auto x = random_input({6, 5}, 51, -3.0, 3.0);
      const std::vector<std::int32_t> labels = {0, 1, 4, 2, 1, 3};
      nn::cross_entropy_options opt;
      opt.label_smoothing = eps;
      opt.ignore_index = ignore;
      nn::softmax_cross_entropy<f64> ce(opt);
      // reference loss in plain double
      double ref = 0;
      int count = 0;
      for (int r = 0; r < 6; ++r) {
        if (labels[r] == ignore) continue;
        double z = 0;
        for (int c = 0; c < 5; ++c) z += std::exp(x(r, c));
        double lp_sum = 0;
        for (int c = 0; c < 5; ++c) lp_sum += x(r, c) - std::log(z);
        ref += -(1 - eps) * (x(r, labels[r]) - std::log(z)) - eps / 5 * lp_sum;
        ++count;
      }
      mem.reset();
      const double l = ce.forward(ctx, x.view(), labels);
      INFO("eps " << eps << " ignore " << ignore);
      CHECK(l == doctest::Approx(ref / count).epsilon(1e-13));
      // gradient of the mean loss by central differences, scaled by a loss scale of 8
      auto g = contiguous(ce.backward(ctx, 8.0));
      for (index_t i = 0; i < x.numel(); i += 3) {
        const double saved = x.data()[i];
        x.data()[i] = saved + 1e-6;
        const double lp = ce.forward(ctx, x.view(), labels);
        x.data()[i] = saved - 1e-6;
        const double lm = ce.forward(ctx, x.view(), labels);
        x.data()[i] = saved;
        REQUIRE(g.data()[i] == doctest::Approx(8.0 * (lp - lm) / 2e-6).epsilon(1e-6));
      }
    }
  }
  // bad labels and shapes
  const auto logits = from_vector<double>({2, 3}, {0, 0, 0, 0, 0, 0});
  nn::softmax_cross_entropy<f64> ce;
  const std::vector<std::int32_t> bad = {0, 3};
  CHECK_THROWS_WITH_AS(ce.forward(ctx, logits.view(), bad), doctest::Contains("label 3 of row 1"), error);
  const std::vector<std::int32_t> short_labels = {0};
  CHECK_THROWS_WITH_AS(ce.forward(ctx, logits.view(), short_labels), doctest::Contains("(2, 3)"), shape_error);
}

TEST_CASE("gradient check: a sequential MLP end to end") {
  nn::parameter_store<f64> store;
  nn::sequential<f64, nn::flatten<f64>, nn::linear<f64>, nn::layer_norm<f64>, nn::linear<f64>> mlp(
      nn::flatten<f64>{}, nn::linear<f64>(store, "fc1", 12, 10, true, activation::gelu_tanh),
      nn::layer_norm<f64>(store, "ln", 10), nn::linear<f64>(store, "fc2", 10, 4));
  auto x = random_input({3, 2, 6}, 61);
  check_module(store, mlp, x, "mlp");
  CHECK(store.infos().size() == 6);
  CHECK(store.count() == 12 * 10 + 10 + 10 + 10 + 10 * 4 + 4);
}

TEST_CASE_TEMPLATE("mixed-precision forward matches the fp64 model with the same weights", P, policy<fp32, cpu>,
                   policy<bf16_mixed, cpu>, policy<fp16_mixed, cpu>) {
  using S = typename P::storage_type;
  nn::parameter_store<P> store;
  nn::linear<P> fc1(store, "fc1", 64, 48, true, activation::relu);
  nn::layer_norm<P> ln(store, "ln", 48);
  nn::linear<P> fc2(store, "fc2", 48, 10);
  store.allocate();
  nn::parameter_store<f64> ref_store;
  nn::linear<f64> r1(ref_store, "fc1", 64, 48, true, activation::relu);
  nn::layer_norm<f64> rln(ref_store, "ln", 48);
  nn::linear<f64> r2(ref_store, "fc2", 48, 10);
  ref_store.allocate();
  generator g(8);
  fc1.init(g);
  ln.init(g);
  fc2.init(g);
  store.master_from_params();
  // the reference gets the policy's (rounded) weights, tensor by tensor (the flat buffers'
  // padding differs with the element size)
  for (int i = 0; i < static_cast<int>(store.infos().size()); ++i) {
    copy(store.param(nn::parameter_handle{i}), ref_store.param(nn::parameter_handle{i}));
  }
  auto x = tensor<float>({16, 64});
  uniform(x, g, -1, 1);
  const auto xs = cast<S>(x);
  const auto xd = cast<double>(xs);
  nn::arena<cpu> mem, ref_mem;
  nn::context<P> ctx{mem, false, nullptr};
  nn::context<f64> rctx{ref_mem, false, nullptr};
  const auto y = to_vector(cast<double>(fc2.forward(ctx, ln.forward(ctx, fc1.forward(ctx, xs.view())))));
  const auto yr = to_vector(r2.forward(rctx, rln.forward(rctx, r1.forward(rctx, xd.view()))));
  // each layer rounds its output to the storage type once
  const double tol = std::is_same_v<S, float> ? 1e-5 : std::is_same_v<S, half> ? 8e-3 : 6e-2;
  for (std::size_t i = 0; i < y.size(); ++i) REQUIRE(std::fabs(y[i] - yr[i]) <= tol * (1.0 + std::fabs(yr[i])));
}

TEST_CASE("modules reject wrong shapes with both shapes in the message") {
  using P = policy<fp32, cpu>;
  nn::parameter_store<P> store;
  nn::linear<P> fc(store, "fc", 4, 3);
  nn::layer_norm<P> ln(store, "ln", 3);
  store.allocate();
  nn::arena<cpu> mem;
  nn::context<P> ctx{mem, true, nullptr};
  auto x = tensor<float>({2, 5});
  CHECK_THROWS_WITH_AS(fc.forward(ctx, x.view()), doctest::Contains("(2, 5)"), shape_error);
  CHECK_THROWS_WITH_AS(ln.forward(ctx, x.view()), doctest::Contains("(2, 5)"), shape_error);
  auto ok = tensor<float>({2, 4});
  fc.forward(ctx, ok.view());
  auto bad_dy = tensor<float>({2, 4});
  CHECK_THROWS_WITH_AS(fc.backward(ctx, bad_dy.view()), doctest::Contains("(2, 3)"), shape_error);
  CHECK_THROWS_AS(nn::linear<P>(store, "late", 2, 2), error);  // declared after allocate()
  nn::parameter_store<P> s2;
  nn::linear<P> a(s2, "x", 2, 2);
  CHECK_THROWS_WITH_AS(nn::linear<P>(s2, "x", 2, 2), doctest::Contains("declared twice"), error);
}

TEST_CASE("the arena reuses one block after the first step") {
  nn::arena<cpu> mem;
  for (int step = 0; step < 3; ++step) {
    mem.reset();
    for (int i = 0; i < 10; ++i) {
      auto t = mem.allocate<float>({1000, 100});
      REQUIRE(reinterpret_cast<std::uintptr_t>(t.data()) % 64 == 0);
    }
  }
  CHECK(mem.peak_bytes() == 10 * 400000);
  CHECK(mem.capacity_bytes() == mem.peak_bytes());  // merged into one block of the peak size
}

namespace {

/// A user-defined model holding modules: y = fc2(gelu(fc1(x))) + skip(x), a residual block
/// written by hand (not a sequential), with its own backward that joins the two branches.
template <class P>
struct residual_block {
  using S = typename P::storage_type;
  nn::linear<P> fc1, fc2, skip;
  nn::gelu<P> act;
  residual_block(nn::parameter_store<P>& store, index_t in, index_t hidden, index_t out)
      : fc1(store, "block.fc1", in, hidden), fc2(store, "block.fc2", hidden, out), skip(store, "block.skip", in, out, false) {}
  void init(generator& g) {
    fc1.init(g);
    fc2.init(g);
    skip.init(g);
  }
  tensor_view<S, cpu> forward(nn::context<P>& ctx, tensor_view<const S, cpu> x) {
    auto main = fc2.forward(ctx, act.forward(ctx, fc1.forward(ctx, x)));
    auto side = skip.forward(ctx, x);
    auto y = ctx.template allocate<S>(main.shape());
    add(main, side, y);
    return y;
  }
  tensor_view<S, cpu> backward(nn::context<P>& ctx, tensor_view<const S, cpu> dy) {
    auto d_main = fc1.backward(ctx, act.backward(ctx, fc2.backward(ctx, dy)));
    auto d_side = skip.backward(ctx, dy);
    auto dx = ctx.template allocate<S>(d_main.shape());
    add(d_main, d_side, dx);
    return dx;
  }
  std::int64_t flops() const { return nn::flops_of(fc1) + nn::flops_of(fc2) + nn::flops_of(skip); }
};

}  // namespace

TEST_CASE("gradient check: a user-defined model holding modules, inside a sequential") {
  nn::parameter_store<f64> store;
  using block = residual_block<f64>;
  static_assert(nn::module<block, f64>);
  // Braces: the modules are built (and declare their tensors) left to right.
  nn::sequential<f64, block, nn::relu<f64>, nn::linear<f64>> model{block(store, 6, 10, 5), nn::relu<f64>{},
                                                                   nn::linear<f64>(store, "head", 5, 3)};
  auto x = random_input({4, 6}, 51);
  check_module(store, model, x, "residual block + relu + linear");
  // Its parameters are views into one flat buffer, in declaration order, 64-byte aligned.
  const auto& infos = store.infos();
  REQUIRE(infos.size() == 7);
  CHECK(infos[0].name == "block.fc1.weight");
  CHECK(infos[4].name == "block.skip.weight");
  CHECK(infos[6].name == "head.bias");
  for (const auto& p : infos) CHECK(p.offset % 8 == 0);  // 8 doubles = 64 bytes
  // FLOPs of the last forward: 2·rows·(in·out) per linear layer.
  CHECK(model.flops() == 2 * 4 * (6 * 10 + 10 * 5 + 6 * 5 + 5 * 3));
  CHECK(model.backward_flops() == 2 * model.flops());  // the block counts none itself: twice its forward
}

TEST_CASE("linear without input gradient: the same dW and db, an empty dx") {
  using P = policy<fp32, cpu>;
  auto grads_of = [](bool input_grad, bool& dx_empty) {
    nn::parameter_store<P> store;
    nn::linear<P> fc(store, "fc", 96, 40, true, activation::relu);
    store.allocate();
    generator g(8);
    fc.init(g);
    fc.set_input_grad(input_grad);
    CHECK(fc.input_grad() == input_grad);
    auto x = tensor<float>({33, 96});
    auto dy = tensor<float>({33, 40});
    uniform(x, g, -1.0, 1.0);
    uniform(dy, g, -1.0, 1.0);
    nn::arena<cpu> mem;
    nn::context<P> ctx{mem, true, nullptr};
    store.zero_grad();
    fc.forward(ctx, x.view());
    dx_empty = fc.backward(ctx, dy.view()).empty();
    // FLOPs: forward 2·33·96·40; backward the weight gradient, plus dx when wanted.
    CHECK(fc.flops() == 2 * 33 * 96 * 40);
    CHECK(fc.backward_flops() == (input_grad ? 2 : 1) * fc.flops());
    return to_vector(store.grads());
  };
  bool with_empty = true, without_empty = false;
  const auto with = grads_of(true, with_empty);
  const auto without = grads_of(false, without_empty);
  CHECK_FALSE(with_empty);
  CHECK(without_empty);
  CHECK(with == without);
}
