// Fused causal attention (backend/cpu/attention.hpp) against a plain double reference that
// materialises the whole masked softmax: forward y and lse, backward dqkv by the textbook
// formulas, a finite-difference check, dropout with the mask rebuilt from its random_spec,
// causality, thread-count independence and argument checks.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include <trident/backend/cpu/attention.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

using namespace trident;
using cpu_kernels::attention_backward;
using cpu_kernels::attention_forward;
using cpu_kernels::attention_options;

namespace {

struct shape {
  index_t B, T, H, D;
};

template <class E>
using acc_of = std::conditional_t<std::is_same_v<E, double>, double, float>;

template <class E>
double to_double(E x) {
  return static_cast<double>(static_cast<acc_of<E>>(x));
}

/// n values uniform in [-a, a], rounded to E.
template <class E>
std::vector<E> random_values(std::size_t n, std::uint64_t seed, double a) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-a, a);
  std::vector<E> v(n);
  for (auto& x : v) x = static_cast<E>(u(rng));
  return v;
}

template <class E>
std::vector<double> widen(const std::vector<E>& v) {
  std::vector<double> r(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) r[i] = to_double(v[i]);
  return r;
}

/// Dropout multiplier of weight (b, h, i, j): 1 without dropout; else 0 or 1/(1-p) from the spec.
using mask_fn = std::function<double(index_t, index_t, index_t, index_t)>;

mask_fn no_dropout() {
  return [](index_t, index_t, index_t, index_t) { return 1.0; };
}

mask_fn dropout_mask(const shape& s, const attention_options& o) {
  return [s, o](index_t b, index_t h, index_t i, index_t j) {
    const auto n = static_cast<std::uint64_t>(((b * s.H + h) * s.T + i) * s.T + j);
    const double u = o.dropout_rng.value(o.dropout_rng.block(n), n);
    return u >= o.dropout ? 1.0 / (1.0 - o.dropout) : 0.0;
  };
}

struct reference {
  std::vector<double> y, lse, dqkv;
};

/// Plain attention in double: full T x T masked softmax per head, y = (P * Z) V, and the backward
/// dV = (P Z)^T dY, dP = (dY V^T) * Z, dS = P * (dP - rowsum(P * dP)), dQ = scale dS K, dK = scale dS^T Q.
reference reference_attention(const shape& s, const std::vector<double>& qkv, const std::vector<double>& dy,
                              double scale, const mask_fn& z) {
  const index_t B = s.B, T = s.T, H = s.H, D = s.D, C = H * D, ld = 3 * C;
  reference r;
  r.y.assign(static_cast<std::size_t>(B * T * C), 0.0);
  r.lse.assign(static_cast<std::size_t>(B * H * T), 0.0);
  r.dqkv.assign(static_cast<std::size_t>(B * T * ld), 0.0);
  auto q = [&](index_t b, index_t i, index_t h, index_t d) { return qkv[(b * T + i) * ld + h * D + d]; };
  auto k = [&](index_t b, index_t i, index_t h, index_t d) { return qkv[(b * T + i) * ld + C + h * D + d]; };
  auto v = [&](index_t b, index_t i, index_t h, index_t d) { return qkv[(b * T + i) * ld + 2 * C + h * D + d]; };
  std::vector<double> P(T * T), dP(T * T);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h) {
      std::fill(P.begin(), P.end(), 0.0);
      for (index_t i = 0; i < T; ++i) {
        double mx = -std::numeric_limits<double>::infinity();
        for (index_t j = 0; j <= i; ++j) {
          double dot = 0;
          for (index_t d = 0; d < D; ++d) dot += q(b, i, h, d) * k(b, j, h, d);
          P[i * T + j] = scale * dot;
          mx = std::max(mx, P[i * T + j]);
        }
        double sum = 0;
        for (index_t j = 0; j <= i; ++j) sum += std::exp(P[i * T + j] - mx);
        const double lse = mx + std::log(sum);
        r.lse[(b * H + h) * T + i] = lse;
        for (index_t j = 0; j <= i; ++j) P[i * T + j] = std::exp(P[i * T + j] - lse);
        for (index_t d = 0; d < D; ++d) {
          double acc = 0;
          for (index_t j = 0; j <= i; ++j) acc += P[i * T + j] * z(b, h, i, j) * v(b, j, h, d);
          r.y[(b * T + i) * C + h * D + d] = acc;
        }
      }
      if (dy.empty()) continue;
      auto g = [&](index_t i, index_t d) { return dy[(b * T + i) * C + h * D + d]; };
      for (index_t i = 0; i < T; ++i) {
        double rowsum = 0;
        for (index_t j = 0; j <= i; ++j) {
          double dot = 0;
          for (index_t d = 0; d < D; ++d) dot += g(i, d) * v(b, j, h, d);
          dP[i * T + j] = dot * z(b, h, i, j);
          rowsum += P[i * T + j] * dP[i * T + j];
        }
        for (index_t j = 0; j <= i; ++j) dP[i * T + j] = P[i * T + j] * (dP[i * T + j] - rowsum);  // dS
      }
      for (index_t i = 0; i < T; ++i)
        for (index_t d = 0; d < D; ++d) {
          double dq = 0;
          for (index_t j = 0; j <= i; ++j) dq += dP[i * T + j] * k(b, j, h, d);
          r.dqkv[(b * T + i) * ld + h * D + d] = scale * dq;
        }
      for (index_t j = 0; j < T; ++j)
        for (index_t d = 0; d < D; ++d) {
          double dk = 0, dv = 0;
          for (index_t i = j; i < T; ++i) {
            dk += dP[i * T + j] * q(b, i, h, d);
            dv += P[i * T + j] * z(b, h, i, j) * g(i, d);
          }
          r.dqkv[(b * T + j) * ld + C + h * D + d] = scale * dk;
          r.dqkv[(b * T + j) * ld + 2 * C + h * D + d] = dv;
        }
    }
  return r;
}

/// max |a - r| / max |r| over the elements selected by `keep` (all when empty).
template <class E>
double rel_error(const std::vector<E>& a, const std::vector<double>& r, const std::function<bool(std::size_t)>& keep = {}) {
  double err = 0, scale = 0;
  for (std::size_t i = 0; i < r.size(); ++i) {
    if (keep && !keep(i)) continue;
    err = std::max(err, std::abs(to_double(a[i]) - r[i]));
    scale = std::max(scale, std::abs(r[i]));
  }
  return scale > 0 ? err / scale : err;
}

template <class E>
double tolerance() {
  if constexpr (std::is_same_v<E, double>) return 1e-12;
  else if constexpr (std::is_same_v<E, float>) return 1e-5;
  else return 1e-2;
}

/// Runs forward and backward of the kernel and the reference on the same (E-rounded) inputs and
/// checks y, lse and dq, dk, dv.
template <class E>
void check_against_reference(const shape& s, const attention_options& o, std::uint64_t seed) {
  using A = acc_of<E>;
  const index_t C = s.H * s.D;
  const auto qkv = random_values<E>(static_cast<std::size_t>(s.B * s.T * 3 * C), seed, 1.5);
  const auto dy = random_values<E>(static_cast<std::size_t>(s.B * s.T * C), seed + 1, 1.0);
  std::vector<E> y(static_cast<std::size_t>(s.B * s.T * C));
  std::vector<A> lse(static_cast<std::size_t>(s.B * s.H * s.T));
  std::vector<E> dqkv(static_cast<std::size_t>(s.B * s.T * 3 * C), static_cast<E>(123.0));  // written, not accumulated
  attention_forward<E, A>(s.B, s.T, s.H, s.D, qkv.data(), y.data(), lse.data(), o);
  attention_backward<E, A>(s.B, s.T, s.H, s.D, qkv.data(), y.data(), dy.data(), lse.data(), dqkv.data(), o);
  const double scale = o.scale == 0 ? 1 / std::sqrt(static_cast<double>(s.D)) : o.scale;
  const auto ref = reference_attention(s, widen(qkv), widen(dy), scale, o.dropout > 0 ? dropout_mask(s, o) : no_dropout());
  const double tol = tolerance<E>();
  INFO("B=" << s.B << " T=" << s.T << " H=" << s.H << " D=" << s.D << " dropout=" << o.dropout);
  CHECK(rel_error(y, ref.y) < tol);
  CHECK(rel_error(lse, ref.lse) < tol);
  const auto part = [&](index_t which) {
    return [=](std::size_t i) { return static_cast<index_t>(i) % (3 * C) / C == which; };
  };
  CHECK(rel_error(dqkv, ref.dqkv, part(0)) < tol);  // dq
  CHECK(rel_error(dqkv, ref.dqkv, part(1)) < tol);  // dk
  CHECK(rel_error(dqkv, ref.dqkv, part(2)) < tol);  // dv
}

const std::vector<shape> shapes = {
    {1, 1, 1, 8}, {2, 7, 3, 8}, {1, 64, 1, 32}, {1, 65, 3, 32}, {2, 130, 1, 64},
    {1, 130, 3, 8}, {2, 33, 3, 64}, {1, 70, 1, 20}, {1, 100, 1, 80},
};

}  // namespace

TEST_CASE_TEMPLATE("attention forward and backward match the double reference", E, double, float, bfloat16) {
  std::uint64_t seed = 1;
  for (const auto& s : shapes) check_against_reference<E>(s, {}, seed += 7);
  attention_options o;
  o.scale = 0.7;  // an explicit scale instead of 1/sqrt(D)
  check_against_reference<E>({2, 67, 3, 32}, o, 99);
}

TEST_CASE("attention_backward<double> agrees with finite differences of sum(W * y)") {
  const shape s{1, 68, 2, 8};  // two key tiles, the second short
  const index_t C = s.H * s.D, n = s.B * s.T * 3 * C;
  auto qkv = random_values<double>(static_cast<std::size_t>(n), 5, 1.5);
  const auto w = random_values<double>(static_cast<std::size_t>(s.B * s.T * C), 6, 1.0);
  std::vector<double> y(w.size()), lse(static_cast<std::size_t>(s.B * s.H * s.T)), dqkv(qkv.size());
  const attention_options o;
  auto loss = [&] {
    attention_forward<double, double>(s.B, s.T, s.H, s.D, qkv.data(), y.data(), lse.data(), o);
    double l = 0;
    for (std::size_t i = 0; i < y.size(); ++i) l += w[i] * y[i];
    return l;
  };
  loss();
  attention_backward<double, double>(s.B, s.T, s.H, s.D, qkv.data(), y.data(), w.data(), lse.data(), dqkv.data(), o);
  double worst = 0;
  int checked = 0;
  for (index_t i = 0; i < n; i += 5) {
    const double x = qkv[i], eps = 1e-6;
    qkv[i] = x + eps;
    const double lp = loss();
    qkv[i] = x - eps;
    const double lm = loss();
    qkv[i] = x;
    const double fd = (lp - lm) / (2 * eps);
    worst = std::max(worst, std::abs(fd - dqkv[i]) / std::max(1.0, std::abs(fd)));
    ++checked;
  }
  INFO("worst " << worst << " over " << checked);
  CHECK(worst < 1e-7);
}

TEST_CASE_TEMPLATE("attention dropout uses the mask of its random_spec, forward and backward", E, double, float, bfloat16) {
  attention_options o;
  o.dropout = 0.3;
  o.dropout_rng = random_spec{1234, 77, distribution::uniform, 0, 1};
  check_against_reference<E>({2, 130, 3, 32}, o, 3);
  check_against_reference<E>({1, 9, 2, 8}, o, 4);  // T not a multiple of 4: rows start mid-block

  // The fraction of kept causal weights is near 1 - p (51,090 weights: sigma ~ 0.002).
  const shape s{2, 130, 3, 32};
  const auto z = dropout_mask(s, o);
  double kept = 0, total = 0;
  for (index_t b = 0; b < s.B; ++b)
    for (index_t h = 0; h < s.H; ++h)
      for (index_t i = 0; i < s.T; ++i)
        for (index_t j = 0; j <= i; ++j) {
          kept += z(b, h, i, j) != 0;
          total += 1;
        }
  CHECK(std::abs(kept / total - 0.7) < 0.01);
}

TEST_CASE("attention with dropout: another seed gives another output, the same seed the same bits") {
  const shape s{1, 40, 2, 16};
  const index_t C = s.H * s.D;
  const auto qkv = random_values<float>(static_cast<std::size_t>(s.T * 3 * C), 8, 1.0);
  std::vector<float> y1(static_cast<std::size_t>(s.T * C)), y2(y1.size()), y3(y1.size()), lse(static_cast<std::size_t>(s.H * s.T));
  attention_options o;
  o.dropout = 0.5;
  o.dropout_rng.seed = 1;
  attention_forward<float, float>(s.B, s.T, s.H, s.D, qkv.data(), y1.data(), lse.data(), o);
  attention_forward<float, float>(s.B, s.T, s.H, s.D, qkv.data(), y2.data(), lse.data(), o);
  o.dropout_rng.seed = 2;
  attention_forward<float, float>(s.B, s.T, s.H, s.D, qkv.data(), y3.data(), lse.data(), o);
  CHECK(y1 == y2);
  CHECK(y1 != y3);
}

TEST_CASE_TEMPLATE("attention is causal: a later token's q, k, v do not change earlier outputs", E, double, float, bfloat16) {
  using A = acc_of<E>;
  const shape s{2, 130, 3, 32};
  const index_t C = s.H * s.D, t = 70;
  auto qkv = random_values<E>(static_cast<std::size_t>(s.B * s.T * 3 * C), 11, 1.5);
  std::vector<E> y1(static_cast<std::size_t>(s.B * s.T * C)), y2(y1.size());
  std::vector<A> l1(static_cast<std::size_t>(s.B * s.H * s.T)), l2(l1.size());
  attention_forward<E, A>(s.B, s.T, s.H, s.D, qkv.data(), y1.data(), l1.data(), {});
  for (index_t b = 0; b < s.B; ++b)
    for (index_t c = 0; c < 3 * C; ++c) qkv[(b * s.T + t) * 3 * C + c] = static_cast<E>(3.0 - to_double(qkv[(b * s.T + t) * 3 * C + c]));
  attention_forward<E, A>(s.B, s.T, s.H, s.D, qkv.data(), y2.data(), l2.data(), {});
  bool earlier_same = true, later_changed = false;
  for (index_t b = 0; b < s.B; ++b)
    for (index_t i = 0; i < s.T; ++i)
      for (index_t c = 0; c < C; ++c) {
        const auto at = static_cast<std::size_t>((b * s.T + i) * C + c);
        const bool same = to_double(y1[at]) == to_double(y2[at]);
        if (i < t) earlier_same = earlier_same && same;
        if (i == t && !same) later_changed = true;
      }
  for (index_t bh = 0; bh < s.B * s.H; ++bh)
    for (index_t i = 0; i < t; ++i) earlier_same = earlier_same && l1[bh * s.T + i] == l2[bh * s.T + i];
  CHECK(earlier_same);
  CHECK(later_changed);
}

#if defined(_OPENMP)
TEST_CASE("attention gives the same bits for 1 and 2 threads") {
  const shape s{2, 130, 3, 32};
  const index_t C = s.H * s.D;
  const auto qkv = random_values<float>(static_cast<std::size_t>(s.B * s.T * 3 * C), 21, 1.5);
  const auto dy = random_values<float>(static_cast<std::size_t>(s.B * s.T * C), 22, 1.0);
  attention_options o;
  o.dropout = 0.1;
  auto run = [&](int threads) {
    const int before = omp_get_max_threads();
    omp_set_num_threads(threads);
    std::vector<float> y(dy.size()), lse(static_cast<std::size_t>(s.B * s.H * s.T)), dqkv(qkv.size());
    attention_forward<float, float>(s.B, s.T, s.H, s.D, qkv.data(), y.data(), lse.data(), o);
    attention_backward<float, float>(s.B, s.T, s.H, s.D, qkv.data(), y.data(), dy.data(), lse.data(), dqkv.data(), o);
    omp_set_num_threads(before);
    y.insert(y.end(), lse.begin(), lse.end());
    y.insert(y.end(), dqkv.begin(), dqkv.end());
    return y;
  };
  CHECK(run(1) == run(2));
}
#endif

TEST_CASE("attention rejects bad arguments") {
  std::vector<float> qkv(3 * 4 * 8, 0.5f), y(4 * 8), dy(4 * 8), lse(4), dqkv(qkv.size());
  const attention_options ok;
  auto fwd = [&](index_t B, index_t T, index_t H, index_t D, const attention_options& o) {
    attention_forward<float, float>(B, T, H, D, qkv.data(), y.data(), lse.data(), o);
  };
  auto bwd = [&](index_t B, index_t T, index_t H, index_t D, const attention_options& o) {
    attention_backward<float, float>(B, T, H, D, qkv.data(), y.data(), dy.data(), lse.data(), dqkv.data(), o);
  };
  CHECK_NOTHROW(fwd(1, 4, 1, 8, ok));
  CHECK_NOTHROW(bwd(1, 4, 1, 8, ok));
  CHECK_THROWS_AS(fwd(0, 4, 1, 8, ok), shape_error);
  CHECK_THROWS_AS(fwd(1, -1, 1, 8, ok), shape_error);
  CHECK_THROWS_AS(bwd(1, 4, 0, 8, ok), shape_error);
  CHECK_THROWS_AS(bwd(1, 4, 1, 0, ok), shape_error);
  for (double p : {1.0, -0.1, 1.5, std::nan("")}) {
    attention_options o;
    o.dropout = p;
    CHECK_THROWS_AS(fwd(1, 4, 1, 8, o), error);
    CHECK_THROWS_AS(bwd(1, 4, 1, 8, o), error);
  }
  CHECK_THROWS_AS((attention_forward<float, float>(1, 4, 1, 8, nullptr, y.data(), lse.data(), ok)), error);
}
