#pragma once
// Test bodies for tensor operations, written once and instantiated per policy: for the cpu
// device in tests/test_ops.cpp and for the cuda device in tests/cuda/test_cuda.cu. Each
// compares against a reference computed on the host in double from the same (rounded) inputs.
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <numeric>

#include "common.hpp"

namespace trident_test {

/// double reference of C = act(alpha op(A) op(B) + beta C + bias), row-major, one matrix.
inline std::vector<double> gemm_reference(const std::vector<double>& a, const std::vector<double>& b, std::vector<double> c,
                                          index_t m, index_t n, index_t k, bool ta, bool tb, double alpha, double beta,
                                          const std::vector<double>* bias, trident::activation act) {
  for (index_t i = 0; i < m; ++i) {
    for (index_t j = 0; j < n; ++j) {
      double acc = 0;
      for (index_t p = 0; p < k; ++p) {
        const double av = ta ? a[static_cast<std::size_t>(p * m + i)] : a[static_cast<std::size_t>(i * k + p)];
        const double bv = tb ? b[static_cast<std::size_t>(j * k + p)] : b[static_cast<std::size_t>(p * n + j)];
        acc += av * bv;
      }
      double v = alpha * acc + (beta != 0 ? beta * c[static_cast<std::size_t>(i * n + j)] : 0.0);
      if (bias) v += (*bias)[static_cast<std::size_t>(j)];
      c[static_cast<std::size_t>(i * n + j)] = trident::apply_activation(act, v);
    }
  }
  return c;
}

}  // namespace trident_test

TEST_CASE_TEMPLATE_DEFINE("element-wise binary ops broadcast like NumPy", P, binary_ops_id) {
  using namespace trident;
  using namespace trident_test;
  using T = typename P::storage_type;
  using D = typename P::device;
  const shape sa{3, 1, 5}, sb{4, 5}, so{3, 4, 5};
  const auto va = sample<T>(sa.numel(), 1), vb = sample<T>(sb.numel(), 2, 0.5, 3.0);
  const auto a = make<T, D>(sa, va);
  const auto b = make<T, D>(sb, vb);
  auto ref = [&](auto f) {
    std::vector<double> r(static_cast<std::size_t>(so.numel()));
    for (index_t i = 0; i < so.numel(); ++i) {
      const auto idx = unravel(i, so);
      r[static_cast<std::size_t>(i)] = f(va[static_cast<std::size_t>(ravel_broadcast(idx, sa))], vb[static_cast<std::size_t>(ravel_broadcast(idx, sb))]);
    }
    return r;
  };
  const double tol = tolerance<T>();
  check_close(values(add(a, b)), ref([](double x, double y) { return x + y; }), tol, 0, "add");
  check_close(values(sub(a, b)), ref([](double x, double y) { return x - y; }), tol, tol, "sub");
  check_close(values(mul(a, b)), ref([](double x, double y) { return x * y; }), tol, 0, "mul");
  check_close(values(div(a, b)), ref([](double x, double y) { return x / y; }), tol, 0, "div");
  check_close(values(maximum(a, b)), ref([](double x, double y) { return std::max(x, y); }), 0, 0, "maximum");
  check_close(values(minimum(b, a)), ref([](double x, double y) { return std::min(x, y); }), 0, 0, "minimum");

  // out-parameter form, into a strided (transposed) destination
  auto out = tensor<T, D>({5, 4, 3});
  add(a, b, out.permute({2, 1, 0}));
  const auto got = values(out);
  const auto want = ref([](double x, double y) { return x + y; });
  std::vector<double> permuted(want.size());
  for (index_t i = 0; i < 3; ++i)
    for (index_t j = 0; j < 4; ++j)
      for (index_t k = 0; k < 5; ++k) permuted[static_cast<std::size_t>(k * 12 + j * 3 + i)] = want[static_cast<std::size_t>(i * 20 + j * 5 + k)];
  check_close(got, permuted, tol, 0, "add into a permuted view");

  // axpby over strided inputs (a transposed view), like a triad
  const auto x = make<T, D>({6, 7}, sample<T>(42, 3));
  const auto y = make<T, D>({7, 6}, sample<T>(42, 4));
  auto z = tensor<T, D>({6, 7});
  axpby(0.5, x, -2.0, y.t(), z);
  const auto vx = values(x), vy = values(y);
  std::vector<double> wz(42);
  for (index_t i = 0; i < 6; ++i)
    for (index_t j = 0; j < 7; ++j) wz[static_cast<std::size_t>(i * 7 + j)] = 0.5 * vx[static_cast<std::size_t>(i * 7 + j)] - 2.0 * vy[static_cast<std::size_t>(j * 6 + i)];
  check_close(values(z), wz, tol, tol, "axpby with a transposed operand");

  // mismatched shapes name both
  const auto c = make<T, D>({3, 4}, sample<T>(12, 5));
  CHECK_THROWS_WITH_AS(add(c, b), doctest::Contains("(3, 4) and (4, 5)"), shape_error);
  CHECK_THROWS_AS(add(a, b, tensor<T, D>({3, 4, 4})), shape_error);
}

TEST_CASE_TEMPLATE_DEFINE("element-wise unary ops match their formulas", P, unary_ops_id) {
  using namespace trident;
  using namespace trident_test;
  using T = typename P::storage_type;
  using D = typename P::device;
  const shape s{2, 3, 33};
  const auto v = sample<T>(s.numel(), 7, -4.0, 4.0);
  const auto x = make<T, D>(s, v);
  auto ref = [&](auto f) {
    std::vector<double> r(v.size());
    std::transform(v.begin(), v.end(), r.begin(), f);
    return r;
  };
  const double tol = tolerance<T>() * 2;
  check_close(values(relu(x)), ref([](double t) { return t > 0 ? t : 0.0; }), 0, 0, "relu");
  check_close(values(gelu(x)), ref([](double t) { return 0.5 * t * (1 + std::erf(t / std::sqrt(2.0))); }), tol, 1e-6, "gelu");
  check_close(values(gelu_tanh(x)),
              ref([](double t) { return 0.5 * t * (1 + std::tanh(std::sqrt(2 / M_PI) * (t + 0.044715 * t * t * t))); }), tol, 1e-6,
              "gelu_tanh");
  check_close(values(exp(x)), ref([](double t) { return std::exp(t); }), tol, 0, "exp");
  check_close(values(tanh(x)), ref([](double t) { return std::tanh(t); }), tol, 1e-6, "tanh");
  check_close(values(sigmoid(x)), ref([](double t) { return 1 / (1 + std::exp(-t)); }), tol, 1e-6, "sigmoid");
  check_close(values(abs(x)), ref([](double t) { return std::fabs(t); }), 0, 0, "abs");
  check_close(values(neg(x)), ref([](double t) { return -t; }), 0, 0, "neg");
  check_close(values(scale(x, 0.25)), ref([](double t) { return 0.25 * t; }), 0, 0, "scale by a power of two");
  const auto pos = make<T, D>(s, sample<T>(s.numel(), 8, 0.1, 9.0));
  const auto vp = values(pos);
  std::vector<double> wl(vp.size()), ws(vp.size());
  for (std::size_t i = 0; i < vp.size(); ++i) {
    wl[i] = std::log(vp[i]);
    ws[i] = std::sqrt(vp[i]);
  }
  check_close(values(log(pos)), wl, tol, tol, "log");
  check_close(values(sqrt(pos)), ws, tol, 0, "sqrt");
  // in place on a slice: only the slice changes
  auto y = make<T, D>(s, v);
  auto part = y.slice(2, 5, 20, 3);
  relu(part, part);
  const auto vy = values(y);
  for (index_t i = 0; i < s.numel(); ++i) {
    const index_t k = i % 33;
    const bool in_slice = k >= 5 && k < 20 && (k - 5) % 3 == 0;
    const double w = in_slice ? std::max(0.0, v[static_cast<std::size_t>(i)]) : v[static_cast<std::size_t>(i)];
    REQUIRE(vy[static_cast<std::size_t>(i)] == w);
  }
}

TEST_CASE_TEMPLATE_DEFINE("reductions over all elements and along each axis", P, reduce_id) {
  using namespace trident;
  using namespace trident_test;
  using T = typename P::storage_type;
  using D = typename P::device;
  const shape s{4, 5, 37};
  const auto v = sample<T>(s.numel(), 11, -3.0, 3.0);
  const auto x = make<T, D>(s, v);
  double ws = 0, wss = 0, wm = -INFINITY;
  for (double t : v) {
    ws += t;
    wss += t * t;
    wm = std::max(wm, t);
  }
  const double n = static_cast<double>(v.size());
  // Whole-tensor results are returned in double; the device may accumulate in float.
  const double atol = n * 3.0 * 1e-6;
  CHECK(std::fabs(sum(x) - ws) <= atol);
  CHECK(std::fabs(mean(x) - ws / n) <= atol / n);
  CHECK(max(x) == wm);
  CHECK(std::fabs(l2_norm(x) - std::sqrt(wss)) <= 1e-5 * std::sqrt(wss));

  for (int axis = 0; axis < 3; ++axis) {
    const index_t len = s[axis];
    index_array ext{};
    for (int d = 0, k = 0; d < 3; ++d)
      if (d != axis) ext[k++] = s[d];
    const shape so(2, ext);
    std::vector<double> rs(static_cast<std::size_t>(so.numel()), 0.0), rm(rs.size(), -INFINITY), rq(rs.size(), 0.0);
    for (index_t i = 0; i < s.numel(); ++i) {
      const auto idx = unravel(i, s);
      index_t o = 0;
      for (int d = 0; d < 3; ++d)
        if (d != axis) o = o * s[d] + idx[static_cast<std::size_t>(d)];
      const double t = v[static_cast<std::size_t>(i)];
      rs[static_cast<std::size_t>(o)] += t;
      rm[static_cast<std::size_t>(o)] = std::max(rm[static_cast<std::size_t>(o)], t);
      rq[static_cast<std::size_t>(o)] += t * t;
    }
    std::vector<double> rmean(rs.size()), rl2(rs.size());
    for (std::size_t i = 0; i < rs.size(); ++i) {
      rmean[i] = rs[i] / static_cast<double>(len);
      rl2[i] = std::sqrt(rq[i]);
    }
    const double tol = tolerance<T>();
    const double sum_atol = static_cast<double>(len) * 3.0 * (tolerance<T>() + 1e-6);
    INFO("axis " << axis);
    check_close(values(sum(x, axis)), rs, tol, sum_atol, "sum along an axis");
    check_close(values(mean(x, axis)), rmean, tol, sum_atol / static_cast<double>(len), "mean along an axis");
    check_close(values(max(x, axis)), rm, 0, 0, "max along an axis");
    check_close(values(l2_norm(x, axis)), rl2, tol, 1e-6, "l2_norm along an axis");
    // keepdim output and negative axes
    index_array kext{};
    for (int d = 0; d < 3; ++d) kext[d] = d == axis ? 1 : s[d];
    auto kd = tensor<T, D>(shape(3, kext));
    sum(x, axis - 3, kd);
    check_close(values(kd), rs, tol, sum_atol, "sum with keepdim output");
  }
  // max propagates NaN
  auto y = make<T, D>({2, 3}, {1, 2, 3, 4, 5, 6});
  fill(y.slice(1, 1, 2), std::numeric_limits<double>::quiet_NaN());
  CHECK(std::isnan(max(y)));
  const auto my = values(max(y, 1));
  CHECK(std::isnan(my[0]));
  CHECK(std::isnan(my[1]));
  const auto mc = values(max(y, 0));
  CHECK(mc[0] == 4.0);
  CHECK(std::isnan(mc[1]));
  CHECK(mc[2] == 6.0);
  // bad axis and bad output shapes name the shapes
  CHECK_THROWS_WITH_AS(sum(x, 3), doctest::Contains("(4, 5, 37)"), shape_error);
  CHECK_THROWS_WITH_AS(sum(x, 1, tensor<T, D>({4, 36})), doctest::Contains("(4, 36)"), shape_error);
}

TEST_CASE_TEMPLATE_DEFINE("softmax and log-softmax along an axis are max-shifted", P, softmax_id) {
  using namespace trident;
  using namespace trident_test;
  using T = typename P::storage_type;
  using D = typename P::device;
  const shape s{3, 50, 4};
  auto v = sample<T>(s.numel(), 21, -8.0, 8.0);
  v[0] = 80.0;  // exp(80) overflows float: only a max-shifted softmax survives it
  const auto x = make<T, D>(s, v);
  for (int axis : {1, 2}) {
    std::vector<double> ws(v.size()), wl(v.size());
    const index_t len = s[axis];
    for (index_t i = 0; i < s.numel(); ++i) {
      auto idx = unravel(i, s);
      double mx = -INFINITY, z = 0;
      for (index_t k = 0; k < len; ++k) {
        idx[static_cast<std::size_t>(axis)] = k;
        mx = std::max(mx, v[static_cast<std::size_t>(idx[0] * 200 + idx[1] * 4 + idx[2])]);
      }
      for (index_t k = 0; k < len; ++k) {
        idx[static_cast<std::size_t>(axis)] = k;
        z += std::exp(v[static_cast<std::size_t>(idx[0] * 200 + idx[1] * 4 + idx[2])] - mx);
      }
      ws[static_cast<std::size_t>(i)] = std::exp(v[static_cast<std::size_t>(i)] - mx) / z;
      wl[static_cast<std::size_t>(i)] = v[static_cast<std::size_t>(i)] - mx - std::log(z);
    }
    INFO("axis " << axis);
    check_close(values(softmax(x, axis)), ws, tolerance<T>() * 2, 1e-7, "softmax");
    check_close(values(log_softmax(x, axis)), wl, tolerance<T>() * 2, tolerance<T>() * 4, "log_softmax");
  }
  // rows sum to one
  const auto sm = values(softmax(x, -1));
  for (index_t r = 0; r < 150; ++r) {
    double z = 0;
    for (index_t k = 0; k < 4; ++k) z += sm[static_cast<std::size_t>(r * 4 + k)];
    REQUIRE(std::fabs(z - 1.0) <= 4 * tolerance<T>());
  }
  CHECK_THROWS_AS(softmax(x, 1, tensor<T, D>({3, 4, 50})), shape_error);
}

TEST_CASE_TEMPLATE_DEFINE("gemm: transposes, epilogues, batches, against double", P, gemm_id) {
  using namespace trident;
  using namespace trident_test;
  using T = typename P::storage_type;
  using D = typename P::device;
  using Acc = gemm_accumulate_t<T>;
  // accumulation over k in the accumulate type after inputs rounded to T
  const double rtol = std::is_same_v<T, double> ? 1e-12 : 2e-5;
  for (const auto& [m, n, k] : {std::array<index_t, 3>{1, 1, 1}, {7, 5, 3}, {33, 17, 65}, {64, 48, 129}}) {
    for (bool ta : {false, true}) {
      for (bool tb : {false, true}) {
        const auto va = sample<T>(m * k, 100 + m, -1, 1), vb = sample<T>(k * n, 200 + n, -1, 1);
        const auto vc = sample<Acc>(m * n, 300 + k, -1, 1);
        const auto a = make<T, D>(ta ? shape{k, m} : shape{m, k}, va);
        const auto b = make<T, D>(tb ? shape{n, k} : shape{k, n}, vb);
        auto c = make<Acc, D>({m, n}, vc);
        const auto vbias = sample<float>(n, 400 + n, -1, 1);
        const auto bias = make<float, D>({n}, vbias);
        gemm_options opt;
        opt.trans_a = ta;
        opt.trans_b = tb;
        opt.alpha = 0.75;
        opt.beta = 0.5;
        opt.act = activation::gelu_tanh;
        gemm(a, b, c, opt, bias);
        const auto want = gemm_reference(va, vb, vc, m, n, k, ta, tb, 0.75, 0.5, &vbias, activation::gelu_tanh);
        INFO("m=" << m << " n=" << n << " k=" << k << " ta=" << ta << " tb=" << tb);
        check_close(values(c), want, rtol, rtol * static_cast<double>(k), "gemm with bias and gelu_tanh");
        // the same product through a transposed view instead of the option
        auto c2 = tensor<Acc, D>({m, n});
        gemm(ta ? a.t() : a.view(), tb ? b.t() : b.view(), c2);
        const auto want2 = gemm_reference(va, vb, vc, m, n, k, ta, tb, 1.0, 0.0, nullptr, activation::none);
        check_close(values(c2), want2, rtol, rtol * static_cast<double>(k), "gemm of transposed views");
      }
    }
  }
  // relu and exact gelu epilogues; beta = 0 ignores NaN in C
  {
    const index_t m = 9, n = 20, k = 31;
    const auto va = sample<T>(m * k, 1), vb = sample<T>(k * n, 2);
    const auto a = make<T, D>({m, k}, va);
    const auto b = make<T, D>({k, n}, vb);
    for (auto act : {activation::relu, activation::gelu}) {
      auto c = tensor<Acc, D>({m, n});
      fill(c, std::numeric_limits<double>::quiet_NaN());
      gemm_options opt;
      opt.act = act;
      gemm(a, b, c, opt);
      const auto want = gemm_reference(va, vb, std::vector<double>(static_cast<std::size_t>(m * n)), m, n, k, false, false, 1, 0,
                                       nullptr, act);
      INFO("activation " << to_string(act));
      check_close(values(c), want, rtol, rtol * static_cast<double>(k), "gemm epilogue");
    }
  }
  // batched: A (4, m, k) times a shared B (k, n) (broadcast), and matmul of batches
  {
    const index_t batch = 4, m = 10, n = 12, k = 16;
    const auto va = sample<T>(batch * m * k, 5), vb = sample<T>(k * n, 6), vb3 = sample<T>(batch * k * n, 7);
    const auto a = make<T, D>({batch, m, k}, va);
    const auto b = make<T, D>({k, n}, vb);
    const auto b3 = make<T, D>({batch, k, n}, vb3);
    const auto c = values(matmul(a, b));
    const auto c3 = values(matmul(a, b3));
    for (index_t i = 0; i < batch; ++i) {
      const std::vector<double> ai(va.begin() + i * m * k, va.begin() + (i + 1) * m * k);
      const std::vector<double> bi(vb3.begin() + i * k * n, vb3.begin() + (i + 1) * k * n);
      const auto w = gemm_reference(ai, vb, std::vector<double>(static_cast<std::size_t>(m * n)), m, n, k, false, false, 1, 0, nullptr,
                                    activation::none);
      const auto w3 = gemm_reference(ai, bi, std::vector<double>(static_cast<std::size_t>(m * n)), m, n, k, false, false, 1, 0, nullptr,
                                     activation::none);
      check_close(std::vector<double>(c.begin() + i * m * n, c.begin() + (i + 1) * m * n), w, rtol, rtol * k, "batched, shared B");
      check_close(std::vector<double>(c3.begin() + i * m * n, c3.begin() + (i + 1) * m * n), w3, rtol, rtol * k, "batched");
    }
  }
  // shapes that do not multiply name all three
  const auto a = make<T, D>({3, 4}, sample<T>(12, 1));
  const auto b = make<T, D>({5, 6}, sample<T>(30, 2));
  auto c = tensor<Acc, D>({3, 6});
  CHECK_THROWS_WITH_AS(gemm(a, b, c), doctest::Contains("(3, 4)"), shape_error);
  CHECK_THROWS_WITH_AS(gemm(a, b, c), doctest::Contains("(5, 6)"), shape_error);
}

TEST_CASE_TEMPLATE_DEFINE("random fills are seeded, counter-based and well distributed", P, random_id) {
  using namespace trident;
  using namespace trident_test;
  using T = typename P::storage_type;
  using D = typename P::device;
  const index_t n = 1 << 16;
  generator g1(42), g2(42), g3(43);
  auto u1 = tensor<T, D>({n});
  auto u2 = tensor<T, D>({n});
  auto u3 = tensor<T, D>({n});
  uniform(u1, g1, -1.0, 3.0);
  uniform(u2, g2, -1.0, 3.0);
  uniform(u3, g3, -1.0, 3.0);
  const auto a = values(u1), b = values(u2), c = values(u3);
  CHECK(a == b);
  CHECK(a != c);
  double s = 0, ss = 0;
  for (double x : a) {
    REQUIRE(x >= -1.0);
    REQUIRE(x <= 3.0);  // rounding to a 2-byte type may reach the upper bound
    s += x;
    ss += x * x;
  }
  const double mean = s / n, var = ss / n - mean * mean;
  // U(-1, 3): mean 1, variance 16/12; the sample mean's standard error is ~0.0045
  CHECK(std::fabs(mean - 1.0) < 0.03);
  CHECK(std::fabs(var - 16.0 / 12.0) < 0.03);
  // normal: moments, and the stream continues (second fill differs from the first)
  auto z = tensor<T, D>({n});
  normal(z, g1, 2.0, 0.5);
  const auto vz = values(z);
  double zs = 0, zss = 0, z4 = 0;
  for (double x : vz) zs += x;
  const double zm = zs / n;
  for (double x : vz) {
    zss += (x - zm) * (x - zm);
    z4 += std::pow((x - zm) / 0.5, 4);
  }
  CHECK(std::fabs(zm - 2.0) < 0.02);
  CHECK(std::fabs(std::sqrt(zss / n) - 0.5) < 0.01);
  CHECK(std::fabs(z4 / n - 3.0) < 0.15);  // kurtosis of a normal
  // element i depends only on (seed, offset, i): filling a strided view gives the same
  // values, in the view's row-major order, as a contiguous fill
  auto m = tensor<T, D>({64, 32});
  generator g4(7), g5(7);
  uniform(m.t(), g4);
  auto m2 = tensor<T, D>({32, 64});
  uniform(m2, g5);
  const auto vm = values(m), vm2 = values(m2);
  for (index_t i = 0; i < 32; ++i)
    for (index_t j = 0; j < 64; ++j) REQUIRE(vm[static_cast<std::size_t>(j * 32 + i)] == vm2[static_cast<std::size_t>(i * 64 + j)]);
}

TEST_CASE_TEMPLATE_DEFINE("copies between layouts, types and the host", P, copy_id) {
  using namespace trident;
  using namespace trident_test;
  using T = typename P::storage_type;
  using D = typename P::device;
  const auto v = sample<T>(2 * 3 * 4, 9);
  const auto x = make<T, D>({2, 3, 4}, v);
  // a permuted view made contiguous holds the permuted order
  const auto p = contiguous(x.permute({2, 0, 1}));
  CHECK(p.shape() == shape{4, 2, 3});
  const auto vp = values(p);
  for (index_t i = 0; i < 2; ++i)
    for (index_t j = 0; j < 3; ++j)
      for (index_t k = 0; k < 4; ++k) REQUIRE(vp[static_cast<std::size_t>(k * 6 + i * 3 + j)] == v[static_cast<std::size_t>(i * 12 + j * 4 + k)]);
  // round trip through the host and through float
  const auto host = to<cpu>(x);
  const auto back = to<D>(host);
  CHECK(values(back) == v);
  std::vector<double> as_float(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) as_float[i] = static_cast<double>(static_cast<float>(v[i]));
  const auto f = cast<float>(x);
  CHECK(values(f) == as_float);  // exact for the 2-byte types, rounded for double
  const auto again = cast<T>(f);
  CHECK(values(again) == as_float);
  // clone is deep
  auto cl = x.clone();
  fill(cl, 0.0);
  CHECK(values(x) == v);
  // strided copy into a slice
  auto dst = tensor<T, D>({2, 3, 8});
  copy(x, dst.slice(2, 0, 8, 2));
  const auto vd = values(dst);
  for (index_t i = 0; i < 24; ++i) {
    const index_t k = i % 4, rest = i / 4;
    REQUIRE(vd[static_cast<std::size_t>(rest * 8 + 2 * k)] == v[static_cast<std::size_t>(i)]);
    REQUIRE(vd[static_cast<std::size_t>(rest * 8 + 2 * k + 1)] == 0.0);
  }
  CHECK_THROWS_WITH_AS(copy(x, tensor<T, D>({2, 4, 3})), doctest::Contains("(2, 4, 3)"), shape_error);
}
