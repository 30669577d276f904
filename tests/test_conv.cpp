// Convolution, pooling and batch norm: forward values against direct loops in double,
// finite-difference gradient checks in double, running statistics against hand computation,
// the mixed-precision policies against the fp64 model with the same weights, error
// messages, and the small Fashion-MNIST CNN end to end.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include <trident/trident.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "gradcheck.hpp"

using namespace trident;
using trident_test::f64;
using trident_test::gradcheck;
using trident_test::random_input;

namespace {

/// One convolution configuration.
struct conv_case {
  index_t n, cin, cout, h, w;
  nn::extent2 kernel, stride, padding;
  bool bias;
  activation act = activation::none;
};

std::string describe(const conv_case& c) {
  return "N " + std::to_string(c.n) + " C_in " + std::to_string(c.cin) + " C_out " + std::to_string(c.cout) + " HxW " +
         std::to_string(c.h) + "x" + std::to_string(c.w) + " kernel " + c.kernel.str() + " stride " + c.stride.str() +
         " padding " + c.padding.str() + (c.bias ? " bias" : " no bias") + " act " + to_string(c.act);
}

const std::vector<conv_case>& conv_cases() {
  static const std::vector<conv_case> cases = {
      {2, 3, 4, 7, 6, 3, 1, 1, true},                      // "same" padding: the shifted-tap paths
      {2, 3, 4, 7, 6, 3, 1, 1, true, activation::relu},    // with the fused ReLU
      {2, 2, 3, 8, 5, {2, 3}, {2, 1}, {0, 2}, false},      // non-square, mixed strides
      {3, 1, 2, 9, 9, 5, 2, 2, true},                      // stride 2, padding 2
      {2, 4, 5, 5, 5, 1, 1, 0, true},                      // pointwise: no unfolding
      {2, 3, 2, 6, 7, {3, 1}, {1, 2}, {1, 0}, true},       // tall kernel
      {2, 2, 3, 7, 8, 3, 3, 0, false},                     // stride equal to the kernel, leftover columns
      {1, 2, 2, 3, 4, {5, 4}, 1, {1, 0}, true},            // kernel as large as the padded input
      {2, 2, 3, 6, 6, 2, 1, 1, true},                      // even kernel, stride 1, output larger than the input
      {2, 2, 2, 5, 6, {3, 5}, 1, {1, 2}, true},            // "same" padding, non-square
  };
  return cases;
}

/// y = act(b + sum w x) by direct loops, in double.
std::vector<double> direct_conv(const conv_case& c, const std::vector<double>& x, const std::vector<double>& w,
                                const std::vector<double>& b) {
  const index_t oh = (c.h + 2 * c.padding.h - c.kernel.h) / c.stride.h + 1;
  const index_t ow = (c.w + 2 * c.padding.w - c.kernel.w) / c.stride.w + 1;
  std::vector<double> y(static_cast<std::size_t>(c.n * c.cout * oh * ow));
  for (index_t n = 0; n < c.n; ++n)
    for (index_t co = 0; co < c.cout; ++co)
      for (index_t i = 0; i < oh; ++i)
        for (index_t j = 0; j < ow; ++j) {
          double s = c.bias ? b[static_cast<std::size_t>(co)] : 0.0;
          for (index_t ci = 0; ci < c.cin; ++ci)
            for (index_t ki = 0; ki < c.kernel.h; ++ki)
              for (index_t kj = 0; kj < c.kernel.w; ++kj) {
                const index_t ih = i * c.stride.h - c.padding.h + ki, iw = j * c.stride.w - c.padding.w + kj;
                if (ih < 0 || ih >= c.h || iw < 0 || iw >= c.w) continue;
                s += w[static_cast<std::size_t>(((co * c.cin + ci) * c.kernel.h + ki) * c.kernel.w + kj)] *
                     x[static_cast<std::size_t>(((n * c.cin + ci) * c.h + ih) * c.w + iw)];
              }
          if (c.act == activation::relu) s = std::max(s, 0.0);
          y[static_cast<std::size_t>(((n * c.cout + co) * oh + i) * ow + j)] = s;
        }
  return y;
}

/// Max or average pooling by direct loops, in double (PyTorch's semantics).
std::vector<double> direct_pool(bool max, const std::vector<double>& x, index_t n, index_t ch, index_t h, index_t w,
                                nn::extent2 k, nn::extent2 s, nn::extent2 p, bool count_include_pad = true) {
  const index_t oh = (h + 2 * p.h - k.h) / s.h + 1, ow = (w + 2 * p.w - k.w) / s.w + 1;
  std::vector<double> y(static_cast<std::size_t>(n * ch * oh * ow));
  for (index_t q = 0; q < n * ch; ++q)
    for (index_t i = 0; i < oh; ++i)
      for (index_t j = 0; j < ow; ++j) {
        double m = -std::numeric_limits<double>::infinity(), sum = 0;
        index_t count = 0;
        for (index_t a = 0; a < k.h; ++a)
          for (index_t b = 0; b < k.w; ++b) {
            const index_t ih = i * s.h - p.h + a, iw = j * s.w - p.w + b;
            if (ih < 0 || ih >= h || iw < 0 || iw >= w) continue;
            const double v = x[static_cast<std::size_t>((q * h + ih) * w + iw)];
            m = std::max(m, v);
            sum += v;
            ++count;
          }
        y[static_cast<std::size_t>((q * oh + i) * ow + j)] =
            max ? m : sum / static_cast<double>(count_include_pad ? k.h * k.w : count);
      }
  return y;
}

template <class M>
trident_test::gradcheck_result check_grad(nn::parameter_store<f64>& store, M& m, tensor<double>& x, bool training = true) {
  return gradcheck(
      store, x,
      [&](nn::context<f64>& ctx, tensor_view<const double> in) {
        ctx.training = training;
        return m.forward(ctx, in);
      },
      [&](nn::context<f64>& ctx, tensor_view<const double> dy) { return m.backward(ctx, dy); });
}

/// Copies every parameter of `from` into `to` (the same modules declared in the same order).
template <class P, class Q>
void copy_params(nn::parameter_store<P>& from, nn::parameter_store<Q>& to) {
  REQUIRE(from.infos().size() == to.infos().size());
  for (int i = 0; i < static_cast<int>(from.infos().size()); ++i) {
    copy(from.param(nn::parameter_handle{i}), to.param(nn::parameter_handle{i}));
  }
  to.master_from_params();
}

}  // namespace

// --- conv2d ---------------------------------------------------------------------------------

TEST_CASE("conv2d forward matches a direct convolution in double") {
  for (const auto& c : conv_cases()) {
    INFO(describe(c));
    nn::parameter_store<f64> store;
    nn::conv2d<f64> conv(store, "conv", c.cin, c.cout, c.kernel, c.stride, c.padding, c.bias, c.act);
    store.allocate();
    generator g(5);
    conv.init(g);
    auto x = random_input({c.n, c.cin, c.h, c.w}, 17);
    nn::arena<cpu> mem;
    nn::context<f64> ctx{mem, true, nullptr};
    const auto y = to_vector(conv.forward(ctx, x.view()));
    const auto w = to_vector(store.param(conv.weight()));
    const auto b = c.bias ? to_vector(store.param(conv.bias())) : std::vector<double>{};
    const auto ref = direct_conv(c, to_vector(x), w, b);
    REQUIRE(y.size() == ref.size());
    for (std::size_t i = 0; i < y.size(); ++i) REQUIRE(y[i] == doctest::Approx(ref[i]).epsilon(1e-12).scale(1.0));
  }
  // A strided input (H and W swapped in the view) is read as its contiguous copy would be.
  nn::parameter_store<f64> store;
  nn::conv2d<f64> conv(store, "conv", 2, 3, {3, 2}, {1, 2}, 1);
  store.allocate();
  generator g(5);
  conv.init(g);
  auto x = random_input({2, 2, 5, 7}, 19);
  nn::arena<cpu> mem;
  nn::context<f64> ctx{mem, true, nullptr};
  const auto strided = to_vector(conv.forward(ctx, x.view().transpose(2, 3)));
  const auto dense = contiguous(x.view().transpose(2, 3));
  CHECK(strided == to_vector(conv.forward(ctx, dense.view())));
}

TEST_CASE("gradient check: conv2d over strides, paddings, kernel shapes, bias and the fused ReLU") {
  for (const auto& c : conv_cases()) {
    INFO(describe(c));
    nn::parameter_store<f64> store;
    nn::conv2d<f64> conv(store, "conv", c.cin, c.cout, c.kernel, c.stride, c.padding, c.bias, c.act);
    store.allocate();
    generator g(6);
    conv.init(g);
    auto x = random_input({c.n, c.cin, c.h, c.w}, 23);
    const auto r = check_grad(store, conv, x);
    INFO("worst " << r.worst);
    CHECK(r.checked > 0);
    CHECK(r.max_rel_error < 1e-6);
  }
}

TEST_CASE("conv2d: initialisation bounds, parameter shapes, skipping the input gradient") {
  nn::parameter_store<f64> store;
  nn::conv2d<f64> conv(store, "c", 3, 8, {3, 5}, 1, {1, 2});
  nn::conv2d<f64> nb(store, "nb", 2, 2, 1, 1, 0, false);
  store.allocate();
  CHECK(store.info(conv.weight()).extents == shape{8, 3, 3, 5});
  CHECK(store.info(conv.bias()).extents == shape{8});
  CHECK(store.info(conv.weight()).weight_decay);
  CHECK_FALSE(store.info(conv.bias()).weight_decay);
  CHECK_FALSE(nb.bias().valid());
  generator g(7);
  conv.init(g);
  const double bound = 1.0 / std::sqrt(3.0 * 3 * 5);
  double lo = 1, hi = -1;
  for (double v : to_vector(store.param(conv.weight()))) {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  CHECK(lo >= -bound);
  CHECK(hi <= bound);
  CHECK(hi - lo > 1.8 * bound);  // 360 draws cover the range
  for (double v : to_vector(store.param(conv.bias()))) CHECK(std::fabs(v) <= bound);

  // Without the input gradient: dx is zero, the parameter gradients are unchanged.
  auto x = random_input({2, 3, 6, 7}, 31);
  nn::arena<cpu> mem;
  nn::context<f64> ctx{mem, true, nullptr};
  auto dy = random_input({2, 8, 6, 7}, 32);
  store.zero_grad();
  conv.forward(ctx, x.view());
  conv.backward(ctx, dy.view());
  const auto full = to_vector(store.grads());
  store.zero_grad();
  conv.set_input_gradient(false);
  CHECK_FALSE(conv.input_gradient());
  conv.forward(ctx, x.view());
  const auto dx = to_vector(conv.backward(ctx, dy.view()));
  CHECK(std::all_of(dx.begin(), dx.end(), [](double v) { return v == 0.0; }));
  CHECK(to_vector(store.grads()) == full);
}

TEST_CASE("conv2d: gradients accumulate across backward calls and do not depend on the thread schedule") {
  using P = policy<fp32, cpu>;
  nn::parameter_store<P> store;
  nn::conv2d<P> conv(store, "c", 4, 6, 3, 1, 1);
  store.allocate();
  generator g(8);
  conv.init(g);
  auto x = tensor<float>({37, 4, 9, 9});
  auto dy = tensor<float>({37, 6, 9, 9});
  uniform(x, g, -1, 1);
  uniform(dy, g, -1, 1);
  nn::arena<cpu> mem;
  nn::context<P> ctx{mem, true, nullptr};
  auto run = [&] {
    mem.reset();
    conv.forward(ctx, x.view());
    return to_vector(conv.backward(ctx, dy.view()));
  };
  store.zero_grad();
  const auto dx1 = run();
  const auto g1 = to_vector(store.grads());
  for (int rep = 0; rep < 3; ++rep) {
    store.zero_grad();
    REQUIRE(run() == dx1);
    REQUIRE(to_vector(store.grads()) == g1);  // bit for bit
  }
#if defined(_OPENMP)
  // one thread takes every block of samples in order: the same sums
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  store.zero_grad();
  const auto dx_serial = run();
  omp_set_num_threads(threads);
  CHECK(dx_serial == dx1);
  CHECK(to_vector(store.grads()) == g1);
#endif
  run();  // accumulates: twice the single-step gradient
  const auto g2 = to_vector(store.grads());
  float largest = 0;
  for (float v : g1) largest = std::max(largest, std::fabs(v));
  for (std::size_t i = 0; i < g1.size(); ++i) REQUIRE(std::fabs(g2[i] - 2.0f * g1[i]) <= 1e-5f * largest);
}

// --- pooling --------------------------------------------------------------------------------

TEST_CASE("max_pool2d and avg_pool2d forward match direct loops in double") {
  struct pool_case {
    index_t h, w;
    nn::extent2 k, s, p;
  };
  const pool_case cases[] = {
      {8, 6, 2, 2, 0},               // the 2x2 fast path
      {7, 9, 2, 2, 0},               // odd sizes: the last row and column are dropped
      {7, 7, 3, 2, 1},               // overlapping windows, padding
      {6, 8, {2, 3}, {1, 2}, {1, 1}},  // non-square
      {5, 5, 5, 1, 0},               // one window
      {9, 4, {3, 1}, {3, 1}, {1, 0}},
  };
  nn::arena<cpu> mem;
  nn::context<f64> ctx{mem, true, nullptr};
  for (const auto& c : cases) {
    INFO("HxW " << c.h << "x" << c.w << " kernel " << c.k.str() << " stride " << c.s.str() << " padding " << c.p.str());
    auto x = random_input({2, 3, c.h, c.w}, 41);
    const auto xv = to_vector(x);
    nn::max_pool2d<f64> mp(c.k, c.s, c.p);
    const auto ym = to_vector(mp.forward(ctx, x.view()));
    CHECK(ym == direct_pool(true, xv, 2, 3, c.h, c.w, c.k, c.s, c.p));
    for (bool include : {true, false}) {
      nn::avg_pool2d<f64> ap(c.k, c.s, c.p, include);
      const auto ya = to_vector(ap.forward(ctx, x.view()));
      const auto ref = direct_pool(false, xv, 2, 3, c.h, c.w, c.k, c.s, c.p, include);
      REQUIRE(ya.size() == ref.size());
      for (std::size_t i = 0; i < ya.size(); ++i) REQUIRE(ya[i] == doctest::Approx(ref[i]).epsilon(1e-14));
    }
  }
  // max_pool2d(k) and avg_pool2d(k): stride = kernel, no padding
  nn::max_pool2d<f64> mp(3);
  CHECK(mp.stride() == nn::extent2(3));
  CHECK(mp.padding() == nn::extent2(0));
  nn::avg_pool2d<f64> ap(nn::extent2{2, 3});
  CHECK(ap.stride() == nn::extent2(2, 3));
  CHECK(ap.count_include_pad());
}

TEST_CASE("gradient check: max_pool2d and avg_pool2d, overlapping and padded windows") {
  nn::parameter_store<f64> store;
  store.allocate();
  struct pool_case {
    nn::extent2 k, s, p;
  };
  const pool_case cases[] = {{2, 2, 0}, {3, 2, 1}, {{2, 3}, {1, 2}, {1, 1}}, {3, 3, 1}};
  for (const auto& c : cases) {
    INFO("kernel " << c.k.str() << " stride " << c.s.str() << " padding " << c.p.str());
    auto x = random_input({2, 2, 7, 6}, 51);
    nn::max_pool2d<f64> mp(c.k, c.s, c.p);
    const auto rm = check_grad(store, mp, x);
    INFO("max: worst " << rm.worst);
    CHECK(rm.max_rel_error < 1e-6);
    for (bool include : {true, false}) {
      nn::avg_pool2d<f64> ap(c.k, c.s, c.p, include);
      const auto ra = check_grad(store, ap, x);
      INFO("avg (count_include_pad " << include << "): worst " << ra.worst);
      CHECK(ra.max_rel_error < 1e-6);
    }
  }
}

TEST_CASE_TEMPLATE("max_pool2d sends the gradient to the first largest element of each window", P, policy<fp32, cpu>,
                   policy<bf16_mixed, cpu>, policy<fp16_mixed, cpu>, policy<fp64, cpu>) {
  using S = typename P::storage_type;
  nn::arena<cpu> mem;
  nn::context<P> ctx{mem, true, nullptr};
  // 2x2 windows of a 4x4 plane: ties in every window, in different positions
  const std::vector<float> v = {1, 1, 0, 2,   //
                                0, 1, 2, 2,   //
                                3, 0, 5, 5,   //
                                3, 3, 5, 4};
  const auto x = cast<S>(from_vector<float>({1, 1, 4, 4}, v));
  auto dy = cast<S>(from_vector<float>({1, 1, 2, 2}, {1, 2, 3, 4}));
  nn::max_pool2d<P> mp(2);
  const auto y = to_vector(cast<float>(mp.forward(ctx, x.view())));
  CHECK(y == std::vector<float>{1, 2, 3, 5});
  const auto dx = to_vector(cast<float>(mp.backward(ctx, dy.view())));
  CHECK(dx == std::vector<float>{1, 0, 0, 2,  //
                                 0, 0, 0, 0,  //
                                 3, 0, 4, 0,  //
                                 0, 0, 0, 0});
  // overlapping windows (3x3, stride 1) add up where they share the maximum
  nn::max_pool2d<P> mp3(3, 1, 0);
  const auto y3 = to_vector(cast<float>(mp3.forward(ctx, x.view())));
  CHECK(y3 == std::vector<float>{5, 5, 5, 5});
  auto dy3 = cast<S>(from_vector<float>({1, 1, 2, 2}, {1, 2, 3, 4}));
  const auto dx3 = to_vector(cast<float>(mp3.backward(ctx, dy3.view())));
  std::vector<float> expect(16, 0.0f);
  expect[10] = 1 + 2 + 3 + 4;
  CHECK(dx3 == expect);
}

// --- batch_norm -----------------------------------------------------------------------------

TEST_CASE("gradient check: batch_norm in training mode, (N, C) and (N, C, H, W)") {
  for (bool four_d : {false, true}) {
    INFO((four_d ? "(N, C, H, W)" : "(N, C)"));
    nn::parameter_store<f64> store;
    nn::batch_norm<f64> bn(store, "bn", 3);
    store.allocate();
    generator g(9);
    bn.init(g);
    uniform(store.params(), g, 0.5, 1.5);  // non-trivial gamma and beta
    auto x = four_d ? random_input({3, 3, 4, 5}, 61) : random_input({6, 3}, 62);
    const auto r = check_grad(store, bn, x);
    INFO("worst " << r.worst);
    CHECK(r.checked > 0);
    CHECK(r.max_rel_error < 1e-6);
  }
}

TEST_CASE("gradient check: batch_norm in eval mode uses the running statistics") {
  for (bool four_d : {false, true}) {
    INFO((four_d ? "(N, C, H, W)" : "(N, C)"));
    nn::parameter_store<f64> store;
    nn::batch_norm<f64> bn(store, "bn", 4);
    store.allocate();
    generator g(10);
    bn.init(g);
    uniform(store.params(), g, 0.5, 1.5);
    uniform(bn.running_mean(), g, -0.5, 0.5);
    uniform(bn.running_var(), g, 0.5, 2.0);
    auto x = four_d ? random_input({2, 4, 3, 3}, 63) : random_input({5, 4}, 64);
    const auto r = check_grad(store, bn, x, false);
    INFO("worst " << r.worst);
    CHECK(r.max_rel_error < 1e-6);
    // eval mode leaves the running statistics alone
    CHECK(bn.num_batches_tracked() == 0);
  }
}

TEST_CASE_TEMPLATE("batch_norm: running statistics after a few steps, and eval mode, against hand computation", P,
                   policy<fp64, cpu>, policy<fp32, cpu>, policy<bf16_mixed, cpu>) {
  using S = typename P::storage_type;
  const double tol = std::is_same_v<S, double> ? 1e-12 : std::is_same_v<S, float> ? 1e-5 : 1e-2;
  for (bool four_d : {false, true}) {
    INFO((four_d ? "(N, C, H, W)" : "(N, C)"));
    const index_t N = 4, C = 3, H = four_d ? 3 : 1, W = four_d ? 2 : 1, L = H * W;
    const double eps = 1e-3, momentum = 0.2;
    nn::parameter_store<P> store;
    nn::batch_norm<P> bn(store, "bn", C, eps, momentum);
    store.allocate();
    generator g(11);
    bn.init(g);
    const auto gamma = from_vector<float>({C}, {0.5f, 1.5f, -1.0f});
    const auto beta = from_vector<float>({C}, {0.25f, -0.5f, 1.0f});
    copy(gamma, store.param(bn.weight()));
    copy(beta, store.param(bn.bias()));
    std::vector<double> rm(static_cast<std::size_t>(C), 0.0), rv(static_cast<std::size_t>(C), 1.0);
    nn::arena<cpu> mem;
    nn::context<P> ctx{mem, true, nullptr};
    const shape s = four_d ? shape{N, C, H, W} : shape{N, C};
    for (int step = 0; step < 3; ++step) {
      auto xf = tensor<float>(s);
      uniform(xf, g, -2.0 + step, 3.0 + step);
      const auto x = cast<S>(xf);
      const auto xv = to_vector(cast<double>(x));
      mem.reset();
      const auto y = to_vector(cast<double>(bn.forward(ctx, x.view())));
      for (index_t c = 0; c < C; ++c) {
        double m = 0, v = 0;
        for (index_t n = 0; n < N; ++n)
          for (index_t l = 0; l < L; ++l) m += xv[static_cast<std::size_t>((n * C + c) * L + l)];
        m /= static_cast<double>(N * L);
        for (index_t n = 0; n < N; ++n)
          for (index_t l = 0; l < L; ++l) v += std::pow(xv[static_cast<std::size_t>((n * C + c) * L + l)] - m, 2);
        const double var = v / static_cast<double>(N * L);
        for (index_t n = 0; n < N; ++n)
          for (index_t l = 0; l < L; ++l) {
            const std::size_t i = static_cast<std::size_t>((n * C + c) * L + l);
            const double ref = (xv[i] - m) / std::sqrt(var + eps) * gamma(c) + beta(c);
            REQUIRE(y[i] == doctest::Approx(ref).epsilon(tol).scale(1.0));
          }
        rm[static_cast<std::size_t>(c)] = (1 - momentum) * rm[static_cast<std::size_t>(c)] + momentum * m;
        rv[static_cast<std::size_t>(c)] =
            (1 - momentum) * rv[static_cast<std::size_t>(c)] + momentum * v / static_cast<double>(N * L - 1);
      }
    }
    CHECK(bn.num_batches_tracked() == 3);
    const auto got_m = to_vector(cast<double>(bn.running_mean()));
    const auto got_v = to_vector(cast<double>(bn.running_var()));
    const double stat_tol = std::is_same_v<S, double> ? 1e-12 : 1e-5;  // statistics of the (rounded) input
    for (index_t c = 0; c < C; ++c) {
      CHECK(got_m[static_cast<std::size_t>(c)] == doctest::Approx(rm[static_cast<std::size_t>(c)]).epsilon(stat_tol));
      CHECK(got_v[static_cast<std::size_t>(c)] == doctest::Approx(rv[static_cast<std::size_t>(c)]).epsilon(stat_tol));
    }
    // eval: normalised with the running statistics, which stay as they are
    ctx.training = false;
    auto xf = tensor<float>(s);
    uniform(xf, g, -1.0, 1.0);
    const auto x = cast<S>(xf);
    const auto xv = to_vector(cast<double>(x));
    mem.reset();
    const auto y = to_vector(cast<double>(bn.forward(ctx, x.view())));
    for (std::size_t i = 0; i < y.size(); ++i) {
      const auto c = static_cast<index_t>(i / static_cast<std::size_t>(L)) % C;
      const auto cu = static_cast<std::size_t>(c);
      const double ref = (xv[i] - rm[cu]) / std::sqrt(rv[cu] + eps) * gamma(c) + beta(c);
      REQUIRE(y[i] == doctest::Approx(ref).epsilon(tol).scale(1.0));
    }
    CHECK(bn.num_batches_tracked() == 3);
    CHECK(to_vector(cast<double>(bn.running_mean())) == got_m);
    // init() resets the statistics
    bn.init(g);
    CHECK(bn.num_batches_tracked() == 0);
    CHECK(to_vector(cast<double>(bn.running_var())) == std::vector<double>(static_cast<std::size_t>(C), 1.0));
  }
}

// --- mixed precision ------------------------------------------------------------------------

namespace {

/// conv -> batch norm -> max pool -> conv (fused ReLU) -> 1x1 conv -> avg pool, every policy.
template <class P>
struct conv_stack {
  nn::conv2d<P> c1;
  nn::batch_norm<P> bn;
  nn::max_pool2d<P> mp;
  nn::conv2d<P> c2;
  nn::conv2d<P> c3;
  nn::avg_pool2d<P> ap;
  explicit conv_stack(nn::parameter_store<P>& s)
      : c1(s, "c1", 3, 8, 3, 1, 1), bn(s, "bn", 8), mp(2), c2(s, "c2", 8, 6, {3, 2}, {2, 1}, {1, 0}, true, activation::relu),
        c3(s, "c3", 6, 5, 1), ap(3, 2, 1) {}
  void init(generator& g) {
    c1.init(g);
    bn.init(g);
    c2.init(g);
    c3.init(g);
  }
  auto forward(nn::context<P>& ctx, tensor_view<const typename P::storage_type> x) {
    return ap.forward(ctx, c3.forward(ctx, c2.forward(ctx, mp.forward(ctx, bn.forward(ctx, c1.forward(ctx, x))))));
  }
  auto backward(nn::context<P>& ctx, tensor_view<const typename P::storage_type> dy) {
    return c1.backward(ctx, bn.backward(ctx, mp.backward(ctx, c2.backward(ctx, c3.backward(ctx, ap.backward(ctx, dy))))));
  }
};

}  // namespace

TEST_CASE_TEMPLATE("mixed precision: conv, batch norm and pooling match the fp64 model with the same weights", P,
                   policy<fp32, cpu>, policy<bf16_mixed, cpu>, policy<fp16_mixed, cpu>) {
  using S = typename P::storage_type;
  nn::parameter_store<P> store;
  conv_stack<P> net(store);
  store.allocate();
  nn::parameter_store<f64> ref_store;
  conv_stack<f64> ref(ref_store);
  ref_store.allocate();
  generator g(12);
  net.init(g);
  ref.init(g);
  store.master_from_params();
  copy_params(store, ref_store);  // the reference gets the policy's (rounded) weights
  auto xf = tensor<float>({4, 3, 12, 10});
  uniform(xf, g, -1, 1);
  const auto xs = cast<S>(xf);
  const auto xd = cast<double>(xs);
  for (bool training : {true, false}) {
    INFO((training ? "training" : "eval"));
    nn::arena<cpu> mem, ref_mem;
    nn::context<P> ctx{mem, training, nullptr};
    nn::context<f64> rctx{ref_mem, training, nullptr};
    const auto yv = net.forward(ctx, xs.view());
    const shape yshape = yv.shape();
    const auto y = to_vector(cast<double>(yv));
    const auto yr = to_vector(ref.forward(rctx, xd.view()));
    REQUIRE(y.size() == yr.size());
    // each layer rounds its output to the storage type once (bf16: 2^-9, half: 2^-12
    // relative); the largest difference seen is about a tenth of the bound
    const double tol = std::is_same_v<S, float> ? 1e-6 : std::is_same_v<S, half> ? 2e-3 : 1.5e-2;
    double worst = 0;
    for (std::size_t i = 0; i < y.size(); ++i) worst = std::max(worst, std::fabs(y[i] - yr[i]) / (1.0 + std::fabs(yr[i])));
    INFO("worst relative difference " << worst);
    CHECK(worst <= tol);
    if (!training) continue;
    // the gradients too, within the same kind of tolerance
    auto dyf = tensor<float>(yshape);
    uniform(dyf, g, -1, 1);
    const auto dys = cast<S>(dyf);
    const auto dyd = cast<double>(dys);
    store.zero_grad();
    ref_store.zero_grad();
    mem.reset();
    ref_mem.reset();
    net.forward(ctx, xs.view());
    ref.forward(rctx, xd.view());
    const auto dx = to_vector(cast<double>(net.backward(ctx, dys.view())));
    const auto dxr = to_vector(ref.backward(rctx, dyd.view()));
    // Relative L2 error. Rounded to the storage type, a few windows of the max pool pick
    // another maximum, which moves single elements of the gradient; the batch norm's
    // backward (which projects out the mean and the normalised input) amplifies that in the
    // gradients below it (c1 and the input): with bf16's 8 bits, to a few percent.
    auto rel_l2 = [](const std::vector<double>& got, const std::vector<double>& ref) {
      double num = 0, den = 0;
      for (std::size_t k = 0; k < ref.size(); ++k) {
        num += (got[k] - ref[k]) * (got[k] - ref[k]);
        den += ref[k] * ref[k];
      }
      return std::sqrt(num / std::max(den, 1e-300));
    };
    const double gtol = std::is_same_v<S, float> ? 1e-5 : std::is_same_v<S, half> ? 2e-3 : 2e-2;
    const double below_bn = std::is_same_v<S, bfloat16> ? 10 * gtol : gtol;
    for (int i = 0; i < static_cast<int>(store.infos().size()); ++i) {
      const auto& name = store.infos()[static_cast<std::size_t>(i)].name;
      if (name == "c1.bias") continue;  // zero up to rounding: the batch norm removes it
      const double e = rel_l2(to_vector(cast<double>(store.grad(nn::parameter_handle{i}))),
                              to_vector(ref_store.grad(nn::parameter_handle{i})));
      INFO(name << ": relative L2 error " << e);
      CHECK(e <= (name == "c1.weight" ? below_bn : gtol));
    }
    const double e = rel_l2(dx, dxr);
    INFO("input gradient: relative L2 error " << e);
    CHECK(e <= below_bn);
  }
}

// --- errors ---------------------------------------------------------------------------------

TEST_CASE("convolutional modules reject bad sizes and shapes with the module and the shapes in the message") {
  using P = policy<fp32, cpu>;
  nn::parameter_store<P> store;
  nn::conv2d<P> conv(store, "conv1", 3, 8, 3, 1, 0);
  nn::batch_norm<P> bn(store, "bn1", 8);
  store.allocate();
  nn::arena<cpu> mem;
  nn::context<P> ctx{mem, true, nullptr};

  auto x3 = tensor<float>({2, 3, 5});
  CHECK_THROWS_WITH_AS(conv.forward(ctx, x3.view()), doctest::Contains("(2, 3, 5)"), shape_error);
  CHECK_THROWS_WITH_AS(conv.forward(ctx, x3.view()), doctest::Contains("'conv1'"), shape_error);
  auto wrong_c = tensor<float>({2, 4, 6, 6});
  CHECK_THROWS_WITH_AS(conv.forward(ctx, wrong_c.view()), doctest::Contains("(2, 4, 6, 6)"), shape_error);
  CHECK_THROWS_WITH_AS(conv.forward(ctx, wrong_c.view()), doctest::Contains("(N, 3, H, W)"), shape_error);
  auto small = tensor<float>({1, 3, 2, 5});
  CHECK_THROWS_WITH_AS(conv.forward(ctx, small.view()), doctest::Contains("kernel (3, 3) is larger than the padded input (2, 5)"),
                       shape_error);
  auto ok = tensor<float>({2, 3, 5, 5});
  conv.forward(ctx, ok.view());
  auto bad_dy = tensor<float>({2, 8, 5, 5});
  CHECK_THROWS_WITH_AS(conv.backward(ctx, bad_dy.view()), doctest::Contains("(2, 8, 3, 3)"), shape_error);

  CHECK_THROWS_WITH_AS(nn::conv2d<P>(store, "late", 1, 1, 1), doctest::Contains("after allocate"), error);
  nn::parameter_store<P> s2;
  CHECK_THROWS_WITH_AS(nn::conv2d<P>(s2, "c", 0, 4, 3), doctest::Contains("in_channels 0"), shape_error);
  CHECK_THROWS_WITH_AS(nn::conv2d<P>(s2, "c", 1, 4, {3, 0}), doctest::Contains("kernel (3, 0)"), shape_error);
  CHECK_THROWS_WITH_AS(nn::conv2d<P>(s2, "c", 1, 4, 3, 0), doctest::Contains("stride (0, 0)"), shape_error);
  CHECK_THROWS_WITH_AS(nn::conv2d<P>(s2, "c", 1, 4, 3, 1, -1), doctest::Contains("padding (-1, -1)"), shape_error);
  CHECK_THROWS_WITH_AS(nn::conv2d<P>(s2, "c", 1, 4, 3, 1, 0, true, activation::gelu), doctest::Contains("gelu"), error);

  CHECK_THROWS_WITH_AS(nn::max_pool2d<P>(0), doctest::Contains("nn::max_pool2d"), shape_error);
  CHECK_THROWS_WITH_AS(nn::avg_pool2d<P>(2, {1, -2}), doctest::Contains("stride (1, -2)"), shape_error);
  CHECK_THROWS_WITH_AS(nn::max_pool2d<P>(3, 1, 2), doctest::Contains("at most half the kernel"), shape_error);
  nn::max_pool2d<P> mp(3);
  auto tiny = tensor<float>({1, 2, 2, 4});
  CHECK_THROWS_WITH_AS(mp.forward(ctx, tiny.view()), doctest::Contains("nn::max_pool2d: kernel (3, 3) is larger"), shape_error);
  CHECK_THROWS_WITH_AS(mp.forward(ctx, x3.view()), doctest::Contains("(2, 3, 5)"), shape_error);
  nn::avg_pool2d<P> ap(2);
  CHECK_THROWS_WITH_AS(ap.forward(ctx, x3.view()), doctest::Contains("nn::avg_pool2d"), shape_error);
  auto pooled_in = tensor<float>({1, 2, 4, 4});
  mp.forward(ctx, pooled_in.view());
  CHECK_THROWS_WITH_AS(mp.backward(ctx, pooled_in.view()), doctest::Contains("(1, 2, 1, 1)"), shape_error);

  auto bad_bn = tensor<float>({4, 7, 2, 2});
  CHECK_THROWS_WITH_AS(bn.forward(ctx, bad_bn.view()), doctest::Contains("'bn1'"), shape_error);
  CHECK_THROWS_WITH_AS(bn.forward(ctx, bad_bn.view()), doctest::Contains("(4, 7, 2, 2)"), shape_error);
  auto bn3 = tensor<float>({4, 8, 2});
  CHECK_THROWS_WITH_AS(bn.forward(ctx, bn3.view()), doctest::Contains("(N, 8) or (N, 8, H, W)"), shape_error);
  auto one = tensor<float>({1, 8});
  CHECK_THROWS_WITH_AS(bn.forward(ctx, one.view()), doctest::Contains("more than one value per channel"), shape_error);
  ctx.training = false;
  CHECK_NOTHROW(bn.forward(ctx, one.view()));  // eval mode normalises a single sample
  CHECK_THROWS_WITH_AS(nn::batch_norm<P>(s2, "b", 0), doctest::Contains("'b'"), shape_error);
  CHECK_THROWS_AS(nn::batch_norm<P>(s2, "b2", 4, 1e-5, 1.5), error);
}

// --- the Fashion-MNIST CNN ------------------------------------------------------------------

namespace {

template <class P>
using cnn = nn::sequential<P, nn::conv2d<P>, nn::relu<P>, nn::max_pool2d<P>, nn::conv2d<P>, nn::relu<P>, nn::max_pool2d<P>,
                           nn::flatten<P>, nn::linear<P>, nn::linear<P>>;

template <class P>
cnn<P> make_cnn(nn::parameter_store<P>& store) {
  return cnn<P>(nn::conv2d<P>(store, "conv1", 1, 32, 3, 1, 1), nn::relu<P>{}, nn::max_pool2d<P>(2),
                nn::conv2d<P>(store, "conv2", 32, 64, 3, 1, 1), nn::relu<P>{}, nn::max_pool2d<P>(2), nn::flatten<P>{},
                nn::linear<P>(store, "fc1", 3136, 128, true, activation::relu), nn::linear<P>(store, "fc2", 128, 10));
}

}  // namespace

TEST_CASE_TEMPLATE("the Fashion-MNIST CNN runs forward and backward and learns a fixed batch", P, policy<fp32, cpu>,
                   policy<bf16_mixed, cpu>) {
  using S = typename P::storage_type;
  nn::parameter_store<P> store;
  auto net = make_cnn(store);
  store.allocate();
  CHECK(store.count() == 32 * 9 + 32 + 64 * 32 * 9 + 64 + 3136 * 128 + 128 + 128 * 10 + 10);
  generator g(13);
  net.init(g);
  store.master_from_params();
  net.template get<0>().set_input_gradient(false);  // the input is data

  // The same weights in fp64, for the forward values.
  nn::parameter_store<f64> ref_store;
  auto ref = make_cnn(ref_store);
  ref_store.allocate();
  copy_params(store, ref_store);

  const index_t B = 16;
  // Faint noise with a bright band whose row depends on the label.
  auto xf = tensor<float>({B, 1, 28, 28});
  uniform(xf, g, 0, 0.2);
  std::vector<std::int32_t> labels(static_cast<std::size_t>(B));
  for (index_t i = 0; i < B; ++i) {
    const auto label = static_cast<std::int32_t>((i * 7) % 10);
    labels[static_cast<std::size_t>(i)] = label;
    for (index_t r = 2 * label + 4; r < 2 * label + 6; ++r)
      for (index_t c = 4; c < 24; ++c) xf(i, 0, r, c) = 1.0f;
  }
  const auto x = cast<S>(xf);

  nn::arena<cpu> mem, ref_mem;
  nn::context<P> ctx{mem, true, nullptr};
  nn::context<f64> rctx{ref_mem, true, nullptr};
  {
    const auto y = to_vector(cast<double>(net.forward(ctx, x.view())));
    const auto yr = to_vector(ref.forward(rctx, cast<double>(x).view()));
    REQUIRE(y.size() == static_cast<std::size_t>(B * 10));
    const double tol = std::is_same_v<S, float> ? 1e-6 : 1e-2;  // bf16: each layer rounds its output to 8 bits
    double worst = 0;
    for (std::size_t i = 0; i < y.size(); ++i) worst = std::max(worst, std::fabs(y[i] - yr[i]) / (1.0 + std::fabs(yr[i])));
    INFO("worst relative difference against fp64 " << worst);
    CHECK(worst <= tol);
  }
  // A few steps of plain SGD on one batch: the loss goes down.
  nn::softmax_cross_entropy<P> ce;
  double first = 0, last = 0;
  for (int step = 0; step < 10; ++step) {
    mem.reset();
    store.zero_grad();
    const double loss = ce.forward(ctx, net.forward(ctx, x.view()), labels);
    const auto dx = net.backward(ctx, ce.backward(ctx));
    CHECK(dx.shape() == shape{B, 1, 28, 28});
    REQUIRE(std::isfinite(loss));
    if (step == 0) {
      first = loss;
      const auto grads = to_vector(cast<double>(store.grads()));
      double norm = 0;
      for (double v : grads) {
        REQUIRE(std::isfinite(v));
        norm += v * v;
      }
      CHECK(norm > 0);
    }
    last = loss;
    axpby(1.0, store.master(), -0.2, store.grads(), store.master());
    store.params_from_master();
  }
  INFO("loss " << first << " -> " << last);
  CHECK(last < 0.7 * first);
}
