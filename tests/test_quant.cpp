// Quantization modules: observers against PyTorch's formulas worked in double, fake
// quantization against ONNX QuantizeLinear/DequantizeLinear in double, the clipped
// straight-through estimator (exact mask, finite differences), qlinear under every scheme
// against a double computation from its own quantized values, and PTQ / QAT end to end on a
// small classification problem trained here.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <optional>
#include <tuple>
#include <span>
#include <string>
#include <vector>

#include <trident/quant.hpp>
#include <trident/trident.hpp>

using namespace trident;

namespace {

using fp32p = policy<fp32, cpu>;
using bf16p = policy<bf16_mixed, cpu>;

// quantized layers are modules like any other
static_assert(nn::module<quant::qlinear<fp32p, quant::dynamic_int8<quant::per_row>>, fp32p>);
static_assert(nn::module<quant::qlinear<fp32p, quant::static_int8>, fp32p>);
static_assert(nn::module<quant::qlinear<bf16p, quant::weight_only<quant::int4_t, 128>>, bf16p>);
static_assert(nn::module<quant::qat_linear<fp32p, quant::percentile_observer>, fp32p>);
static_assert(nn::module<quant::observed_linear<fp32p>, fp32p>);

/// numpy's round (half to even) in double.
double round_even(double v) { return std::nearbyint(v); }

/// PyTorch's affine (uint8) parameters worked in double.
struct ref_params {
  double scale;
  int zero_point;
};
ref_params ref_affine_u8(double lo, double hi) {
  const double mn = std::min(lo, 0.0), mx = std::max(hi, 0.0);
  double scale = std::max((mx - mn) / 255.0, 1.1920928955078125e-07);
  const double zp = std::clamp(0.0 - round_even(mn / scale), 0.0, 255.0);
  return {scale, static_cast<int>(zp)};
}
ref_params ref_symmetric_s8(double lo, double hi) {
  const double amax = std::max(-std::min(lo, 0.0), std::max(hi, 0.0));
  return {std::max(amax / 127.5, 1.1920928955078125e-07), 0};
}

/// ONNX QuantizeLinear -> DequantizeLinear in double, for uint8 or int8.
double ref_fake_quant(double x, double scale, int zp, int qmin, int qmax) {
  const double q = std::clamp(round_even(x / scale) + zp, static_cast<double>(qmin), static_cast<double>(qmax));
  return (q - zp) * scale;
}

std::vector<float> random_values(std::size_t n, std::uint64_t seed, double lo, double hi) {
  tensor<float> t({static_cast<index_t>(n)});
  generator g(seed);
  uniform(t, g, lo, hi);
  return std::vector<float>(t.data(), t.data() + n);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Observers

TEST_CASE("observer parameters follow PyTorch's formulas (uint8 affine, int8 symmetric)") {
  SUBCASE("hand-worked values") {
    // PyTorch: MinMaxObserver(quint8) on [-1, 0, 2]: scale 3/255, zero point 85
    auto p = quant::affine_qparams<std::uint8_t>(-1.0f, 2.0f);
    CHECK(p.scale == doctest::Approx(3.0 / 255.0).epsilon(1e-7));
    CHECK(p.zero_point == 85);
    // all positive: the range is widened to 0, zero point 0
    p = quant::affine_qparams<std::uint8_t>(0.5f, 2.0f);
    CHECK(p.scale == doctest::Approx(2.0 / 255.0).epsilon(1e-7));
    CHECK(p.zero_point == 0);
    // all negative: zero point at the top of the range
    p = quant::affine_qparams<std::uint8_t>(-3.0f, -1.0f);
    CHECK(p.scale == doctest::Approx(3.0 / 255.0).epsilon(1e-7));
    CHECK(p.zero_point == 255);
    // an empty range: scale is float epsilon
    p = quant::affine_qparams<std::uint8_t>(0.0f, 0.0f);
    CHECK(p.scale == std::numeric_limits<float>::epsilon());
    CHECK(p.zero_point == 0);
    // int8 symmetric: amax / 127.5, zero point 0
    auto s = quant::symmetric_qparams<std::int8_t>(-1.0f, 2.55f);
    CHECK(s.scale == doctest::Approx(2.55 / 127.5).epsilon(1e-7));
    CHECK(s.zero_point == 0);
    s = quant::symmetric_qparams<std::int8_t>(-5.1f, 2.0f);
    CHECK(s.scale == doctest::Approx(5.1 / 127.5).epsilon(1e-7));
    // uint8 symmetric: PyTorch puts the zero point at 128
    CHECK(quant::symmetric_qparams<std::uint8_t>(-1.0f, 1.0f).zero_point == 128);
  }
  SUBCASE("random ranges against the double formulas") {
    const auto lo = random_values(500, 1, -8.0, 3.0), hi = random_values(500, 2, -2.0, 9.0);
    int checked = 0;
    for (std::size_t i = 0; i < lo.size(); ++i) {
      const float a = std::min(lo[i], hi[i]), b = std::max(lo[i], hi[i]);
      const auto p = quant::affine_qparams<std::uint8_t>(a, b);
      const auto r = ref_affine_u8(a, b);
      CHECK(p.scale == doctest::Approx(r.scale).epsilon(1e-6));
      // the zero point is exact unless -min/scale sits on a rounding tie within float error
      const double t = -std::min<double>(a, 0.0) / r.scale;
      if (std::fabs(t - std::floor(t) - 0.5) > 1e-4) {
        CHECK(p.zero_point == r.zero_point);
        ++checked;
      }
      const auto s = quant::symmetric_qparams<std::int8_t>(a, b);
      CHECK(s.scale == doctest::Approx(ref_symmetric_s8(a, b).scale).epsilon(1e-6));
    }
    CHECK(checked > 490);
  }
}

TEST_CASE("minmax_observer: running extrema over tensors; parameters through observer.params<Q>()") {
  quant::minmax_observer obs;
  CHECK(obs.empty());
  CHECK_THROWS_AS((void)obs.params<std::uint8_t>(), error);
  const std::vector<float> a = {-1.5f, 0.3f, 2.0f}, b = {0.5f, 3.0f}, c = {};
  obs.observe(std::span<const float>(a));
  obs.observe(std::span<const float>(b));
  obs.observe(std::span<const float>(c));  // empty: ignored
  CHECK(obs.count() == 2);
  CHECK(obs.lo() == -1.5f);
  CHECK(obs.hi() == 3.0f);
  const auto p = obs.params<std::uint8_t>();
  const auto r = ref_affine_u8(-1.5, 3.0);  // scale 4.5/255, zero point round(85) = 85
  CHECK(p.scale == doctest::Approx(r.scale).epsilon(1e-7));
  CHECK(p.zero_point == 85);
  CHECK(r.zero_point == 85);
  CHECK(obs.params<std::int8_t>().scale == doctest::Approx(3.0 / 127.5).epsilon(1e-7));
  // tensors of any element type and layout
  tensor<bfloat16> t({2, 2});
  fill(t, -4.0);
  obs.observe(t.view().as_const());
  CHECK(obs.lo() == -4.0f);
  // NaN and infinity are refused, naming the observer
  const std::vector<float> bad = {1.0f, std::nanf("")};
  CHECK_THROWS_WITH_AS(obs.observe(std::span<const float>(bad)), doctest::Contains("NaN"), quant::quantization_error);
  obs.reset();
  CHECK(obs.empty());
}

TEST_CASE("moving_average_minmax_observer: m <- m + c (m_batch - m), the first batch as is") {
  quant::moving_average_minmax_observer obs;  // c = 0.01, PyTorch's default
  CHECK(obs.averaging_constant() == 0.01f);
  const std::vector<std::vector<float>> batches = {{-1.0f, 0.0f, 2.0f}, {-3.0f, 4.0f}, {0.5f, 1.0f}};
  double lo = 0, hi = 0;
  for (std::size_t i = 0; i < batches.size(); ++i) {
    obs.observe(std::span<const float>(batches[i]));
    const double bl = *std::min_element(batches[i].begin(), batches[i].end());
    const double bh = *std::max_element(batches[i].begin(), batches[i].end());
    lo = i == 0 ? bl : lo + 0.01 * (bl - lo);
    hi = i == 0 ? bh : hi + 0.01 * (bh - hi);
  }
  // by hand: lo = -1 -> -1.02 -> -1.0048, hi = 2 -> 2.02 -> 2.0098
  CHECK(lo == doctest::Approx(-1.0048).epsilon(1e-12));
  CHECK(hi == doctest::Approx(2.0098).epsilon(1e-12));
  CHECK(obs.lo() == doctest::Approx(lo).epsilon(1e-6));
  CHECK(obs.hi() == doctest::Approx(hi).epsilon(1e-6));
  const auto p = obs.params<std::uint8_t>();
  const auto r = ref_affine_u8(lo, hi);
  CHECK(p.scale == doctest::Approx(r.scale).epsilon(1e-6));
  CHECK(p.zero_point == r.zero_point);
  CHECK_THROWS_AS(quant::moving_average_minmax_observer(0.0f), error);
  quant::moving_average_minmax_observer half(0.5f);
  half.observe(std::span<const float>(batches[0]));
  half.observe(std::span<const float>(batches[1]));
  CHECK(half.lo() == -2.0f);  // -1 + 0.5 (-3 + 1)
  CHECK(half.hi() == 3.0f);   // 2 + 0.5 (4 - 2)
}

TEST_CASE("percentile_observer: numpy's linear-interpolation percentile over every value observed") {
  // 0..999 shuffled, seen in three pieces: percentile(99) = 989.01, percentile(1) = 9.99
  std::vector<float> v(1000);
  std::iota(v.begin(), v.end(), 0.0f);
  for (std::size_t i = 0; i < v.size(); ++i) std::swap(v[i], v[(i * 7919) % v.size()]);
  quant::percentile_observer obs(99.0);
  obs.observe(std::span<const float>(v.data(), 300));
  obs.observe(std::span<const float>(v.data() + 300, 500));
  obs.observe(std::span<const float>(v.data() + 800, 200));
  CHECK(obs.size() == 1000);
  CHECK(obs.hi() == doctest::Approx(989.01).epsilon(1e-6));
  CHECK(obs.lo() == doctest::Approx(9.99).epsilon(1e-6));
  const auto p = obs.params<std::uint8_t>();  // the range is widened to 0
  CHECK(p.scale == doctest::Approx(989.01 / 255.0).epsilon(1e-6));
  CHECK(p.zero_point == 0);

  // the default 99.99th percentile of 10000 normal values and one outlier drops the outlier:
  // rank 10000 * 0.9999 = 9999 is the largest normal value exactly
  tensor<float> n({10000});
  generator g(5);
  normal(n, g, 0.0, 1.0);
  std::vector<float> w(n.data(), n.data() + 10000);
  std::vector<float> sorted = w;
  std::sort(sorted.begin(), sorted.end());
  w.push_back(1000.0f);
  quant::percentile_observer pct;
  quant::minmax_observer mm;
  pct.observe(std::span<const float>(w));
  mm.observe(std::span<const float>(w));
  CHECK(mm.hi() == 1000.0f);
  // of the 10001 values, ranks 10000 * 0.9999 = 9999 and 10000 * 0.0001 = 1: the largest
  // normal value and the second smallest
  CHECK(pct.hi() == doctest::Approx(sorted[9999]).epsilon(1e-6));
  CHECK(pct.lo() == doctest::Approx(sorted[1]).epsilon(1e-6));
  CHECK(pct.params<std::uint8_t>().scale < mm.params<std::uint8_t>().scale / 50);
  CHECK_THROWS_AS(quant::percentile_observer(40.0), error);
}

// ---------------------------------------------------------------------------------------------
// Fake quantization and the clipped STE

TEST_CASE("fake_quantize equals ONNX QuantizeLinear -> DequantizeLinear written in double") {
  const quant::qparams p{0.5f, 10};  // uint8: representable [-5, 122.5]
  // ties go to even; saturation at both ends
  const std::vector<float> x = {0.25f, 0.75f, -0.25f, 1.25f, 122.5f, 123.0f, 500.0f, -5.0f, -5.25f, -100.0f};
  std::vector<float> y(x.size()), mask(x.size());
  quant::fake_quantize<std::uint8_t>(x, p, y, mask, "x");
  const std::vector<float> expect = {0.0f, 1.0f, 0.0f, 1.0f, 122.5f, 122.5f, 122.5f, -5.0f, -5.0f, -5.0f};
  const std::vector<float> expect_mask = {1, 1, 1, 1, 1, 0, 0, 1, 0, 0};
  for (std::size_t i = 0; i < x.size(); ++i) {
    INFO("x = " << x[i]);
    CHECK(y[i] == expect[i]);
    CHECK(y[i] == ref_fake_quant(x[i], 0.5, 10, 0, 255));
    CHECK(mask[i] == expect_mask[i]);
  }
  // random values against the double reference, uint8 and int8
  const auto r = random_values(4000, 3, -3.0, 5.0);
  for (const auto& [qp, lo, hi] : {std::tuple{quant::qparams{0.0173f, 77}, 0, 255}, std::tuple{quant::qparams{0.021f, 0}, -128, 127}}) {
    std::vector<float> fy(r.size()), fm(r.size());
    if (lo == 0) {
      quant::fake_quantize<std::uint8_t>(r, qp, fy, fm, "r");
    } else {
      quant::fake_quantize<std::int8_t>(r, qp, fy, fm, "r");
    }
    int bad = 0, clipped = 0;
    const double rlo = (lo - qp.zero_point) * static_cast<double>(qp.scale), rhi = (hi - qp.zero_point) * static_cast<double>(qp.scale);
    for (std::size_t i = 0; i < r.size(); ++i) {
      const double ref = ref_fake_quant(r[i], qp.scale, qp.zero_point, lo, hi);
      if (std::fabs(fy[i] - ref) > 1e-6 * std::max(1.0, std::fabs(ref))) ++bad;
      const bool inside = r[i] >= rlo && r[i] <= rhi;
      if (fm[i] != (inside ? 1.0f : 0.0f)) ++bad;
      clipped += !inside;
    }
    CHECK(bad == 0);
    CHECK(clipped > 100);  // both regions are exercised
  }
  const std::vector<float> nan = {1.0f, std::nanf("")};
  std::vector<float> ny(2);
  CHECK_THROWS_WITH_AS(quant::fake_quantize<std::uint8_t>(nan, p, ny, {}, "act"), doctest::Contains("element 1 is NaN"),
                       quant::quantization_error);
  CHECK_THROWS_AS(quant::fake_quantize<std::uint8_t>(x, quant::qparams{0.0f, 0}, y, mask, "x"), quant::quantization_error);
}

namespace {

/// The weights fake-quantized per channel in double: scale amax / 127, ties to even.
std::vector<double> ref_weight_fq(const float* w, index_t out, index_t in) {
  std::vector<double> r(static_cast<std::size_t>(out * in));
  for (index_t j = 0; j < out; ++j) {
    double amax = 0;
    for (index_t k = 0; k < in; ++k) amax = std::max(amax, std::fabs(static_cast<double>(w[j * in + k])));
    const double s = amax > 0 ? static_cast<double>(static_cast<float>(amax) / 127.0f) : 1.0;
    for (index_t k = 0; k < in; ++k) r[static_cast<std::size_t>(j * in + k)] = ref_fake_quant(w[j * in + k], s, 0, -128, 127);
  }
  return r;
}

}  // namespace

TEST_CASE("qat_linear: fake-quantized forward, clipped STE backward (exact mask), weight gradients to the master") {
  constexpr index_t rows = 5, in = 12, out = 7;
  nn::parameter_store<fp32p> store;
  quant::qat_linear<fp32p> fc(store, "fc", in, out, true, activation::none, {.freeze_observer_after = 1});
  store.allocate();
  generator g(3);
  fc.init(g);
  nn::arena<cpu> memory;

  // the first training forward sets the observer's range to x0's: [-1, 1]
  tensor<float> x0({rows, in});
  uniform(x0, g, -1.0, 1.0);
  x0.data()[0] = -1.0f;
  x0.data()[1] = 1.5f;  // [-1, 1.5]: scale 2.5 / 255, zero point 102 (no rounding tie)
  {
    nn::context<fp32p> ctx{memory, true, &g};
    fc.forward(ctx, x0.view().as_const());
  }
  CHECK(fc.observer_frozen());
  CHECK(fc.observer().count() == 1);
  const auto p = fc.input_params();
  const auto rp = ref_affine_u8(-1.0, 1.5);
  CHECK(rp.zero_point == 102);
  CHECK(p.scale == doctest::Approx(rp.scale).epsilon(1e-7));
  CHECK(p.zero_point == rp.zero_point);

  // a second input, partly outside the frozen range
  tensor<float> x({rows, in});
  uniform(x, g, -1.6, 1.6);
  tensor<float> dy({rows, out});
  uniform(dy, g, -1.0, 1.0);
  memory.reset();
  store.zero_grad();
  nn::context<fp32p> ctx{memory, true, &g};
  auto y = fc.forward(ctx, x.view().as_const());
  CHECK(fc.observer().count() == 1);  // frozen: not updated
  auto dx = fc.backward(ctx, dy.view().as_const());

  const float* w = store.param(fc.weight()).data();
  const float* b = store.param(fc.bias()).data();
  const auto wq = ref_weight_fq(w, out, in);
  const double lo = (0 - p.zero_point) * static_cast<double>(p.scale), hi = (255 - p.zero_point) * static_cast<double>(p.scale);
  std::vector<double> xq(static_cast<std::size_t>(rows * in));
  int outside = 0;
  for (index_t i = 0; i < rows * in; ++i) {
    xq[static_cast<std::size_t>(i)] = ref_fake_quant(x.data()[i], p.scale, p.zero_point, 0, 255);
  }
  for (index_t i = 0; i < rows; ++i) {
    for (index_t j = 0; j < out; ++j) {
      double acc = b[j];
      for (index_t k = 0; k < in; ++k) acc += xq[static_cast<std::size_t>(i * in + k)] * wq[static_cast<std::size_t>(j * in + k)];
      CHECK(y.data()[i * out + j] == doctest::Approx(acc).epsilon(1e-5));
    }
    for (index_t k = 0; k < in; ++k) {
      const double xv = x.data()[i * in + k];
      const bool inside = xv >= lo && xv <= hi;
      double ref = 0;
      for (index_t j = 0; j < out; ++j) ref += dy.data()[i * out + j] * wq[static_cast<std::size_t>(j * in + k)];
      if (inside) {
        CHECK(dx.data()[i * in + k] == doctest::Approx(ref).epsilon(1e-5));
      } else {
        CHECK(dx.data()[i * in + k] == 0.0f);  // exactly: the clamp cut it
        ++outside;
      }
    }
  }
  CHECK(outside > 5);
  // dW = dy^T fq(x), db = sum dy: into the fp32 master weights' gradient
  const float* gw = store.grad(fc.weight()).data();
  const float* gb = store.grad(fc.bias()).data();
  for (index_t j = 0; j < out; ++j) {
    double sb = 0;
    for (index_t i = 0; i < rows; ++i) sb += dy.data()[i * out + j];
    CHECK(gb[j] == doctest::Approx(sb).epsilon(1e-5));
    for (index_t k = 0; k < in; ++k) {
      double s = 0;
      for (index_t i = 0; i < rows; ++i) s += dy.data()[i * out + j] * xq[static_cast<std::size_t>(i * in + k)];
      CHECK(gw[j * in + k] == doctest::Approx(s).epsilon(1e-5));
    }
  }
}

TEST_CASE("qat_linear: finite differences over many quantization steps match the STE inside the range, 0 outside") {
  // L(x) = sum dy * y(x). Fake quantization is a staircase; over a step h of 40 quantization
  // steps its slope is 1 within 1/40 inside the range and exactly 0 beyond it, which is what the
  // clipped STE says the gradient is.
  constexpr index_t rows = 3, in = 10, out = 4;
  nn::parameter_store<fp32p> store;
  quant::qat_linear<fp32p, quant::minmax_observer> fc(store, "fc", in, out, true, activation::none, {.freeze_observer_after = 1});
  store.allocate();
  generator g(9);
  fc.init(g);
  nn::arena<cpu> memory;
  tensor<float> range({2, in});
  fill(range, 0.0);
  range.data()[0] = -2.0f;
  range.data()[1] = 2.0f;
  {
    nn::context<fp32p> ctx{memory, true, &g};
    fc.forward(ctx, range.view().as_const());
  }
  const auto p = fc.input_params();
  const double s = p.scale, lo = -p.zero_point * s, hi = (255 - p.zero_point) * s;
  const double h = 40 * s;
  tensor<float> x({rows, in}), dy({rows, out});
  uniform(x, g, -1.0, 1.0);
  uniform(dy, g, -1.0, 1.0);
  // a few elements well outside the range
  x.data()[0] = 3.5f;
  x.data()[7] = -4.0f;
  x.data()[15] = 2.9f;
  auto loss = [&](const tensor<float>& in_x) {
    memory.reset();
    nn::context<fp32p> ctx{memory, false, nullptr};
    auto yv = fc.forward(ctx, in_x.view().as_const());
    double l = 0;
    for (index_t i = 0; i < rows * out; ++i) l += static_cast<double>(dy.data()[i]) * yv.data()[i];
    return l;
  };
  memory.reset();
  nn::context<fp32p> ctx{memory, false, nullptr};
  fc.forward(ctx, x.view().as_const());
  auto dxv = fc.backward(ctx, dy.view().as_const());
  std::vector<float> dx(dxv.data(), dxv.data() + rows * in);
  int inside = 0, outside = 0;
  for (index_t e = 0; e < rows * in; ++e) {
    const float x0 = x.data()[e];
    x.data()[e] = static_cast<float>(x0 + h);
    const double lp = loss(x);
    x.data()[e] = static_cast<float>(x0 - h);
    const double lm = loss(x);
    x.data()[e] = x0;
    const double fd = (lp - lm) / (2 * h);
    INFO("element " << e << " x " << x0);
    if (x0 - h > lo && x0 + h < hi) {
      double gnorm = 0;
      for (index_t j = 0; j < out; ++j) gnorm += std::fabs(static_cast<double>(dy.data()[(e / in) * out + j]));
      CHECK(std::fabs(fd - dx[static_cast<std::size_t>(e)]) <= gnorm / 40.0 + 1e-5);
      ++inside;
    } else if (x0 - h > hi || x0 + h < lo) {
      CHECK(fd == 0.0);
      CHECK(dx[static_cast<std::size_t>(e)] == 0.0f);
      ++outside;
    }
  }
  CHECK(inside > 20);
  CHECK(outside == 3);
}

TEST_CASE("qat_linear: loads nn::linear's weights by name; refuses bad input") {
  nn::parameter_store<fp32p> a;
  nn::linear<fp32p> l(a, "fc", 6, 3, true, activation::relu);
  a.allocate();
  generator g(1);
  l.init(g);
  nn::parameter_store<fp32p> b;
  quant::qat_linear<fp32p> q(b, "fc", 6, 3, true, activation::relu);
  b.allocate();
  quant::copy_parameters(a, b);
  for (index_t i = 0; i < 18; ++i) CHECK(b.param(q.weight()).data()[i] == a.param(l.weight()).data()[i]);
  for (index_t i = 0; i < 3; ++i) CHECK(b.param(q.bias()).data()[i] == a.param(l.bias()).data()[i]);
  nn::arena<cpu> memory;
  nn::context<fp32p> ctx{memory, false, nullptr};
  tensor<float> x({2, 6});
  CHECK_THROWS_WITH_AS(q.forward(ctx, x.view().as_const()), doctest::Contains("seen no input"), error);
  tensor<float> bad({2, 5});
  CHECK_THROWS_AS(q.forward(ctx, bad.view().as_const()), shape_error);
  nn::parameter_store<fp32p> c;
  quant::qat_linear<fp32p> other(c, "other", 6, 3);
  c.allocate();
  CHECK_THROWS_WITH_AS(quant::copy_parameters(a, c), doctest::Contains("'other.weight' is not in the source"), error);
}

// ---------------------------------------------------------------------------------------------
// qlinear

namespace {

constexpr index_t q_rows = 7, q_in = 256, q_out = 40;

struct trained_linear {
  nn::parameter_store<fp32p> store;
  nn::linear<fp32p> fc;
  tensor<float> x;
  explicit trained_linear(activation act, bool bias = true) : fc(store, "fc", q_in, q_out, bias, act), x({q_rows, q_in}) {
    store.allocate();
    generator g(17);
    fc.init(g);
    uniform(x, g, -2.0, 3.0);
    x.data()[5] = 9.0f;  // an outlier in row 0
  }
  std::vector<float> fp32_forward() {
    nn::arena<cpu> memory;
    nn::context<fp32p> ctx{memory, false, nullptr};
    auto y = fc.forward(ctx, x.view().as_const());
    return {y.data(), y.data() + q_rows * q_out};
  }
};

double apply_act(double v, activation act) {
  if (act == activation::relu) return std::max(v, 0.0);
  if (act == activation::gelu) return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
  return v;
}

/// The input quantized as ONNX DynamicQuantizeLinear does (per tensor: one range; per row:
/// a range per row), with onnx.hpp's element arithmetic; returns (q, scale, zero) per row.
struct quantized_rows {
  std::vector<int> q;
  std::vector<double> scale;
  std::vector<int> zero;
};
quantized_rows quantize_input(const float* x, index_t rows, index_t in, bool per_row, const quant::qparams* fixed = nullptr) {
  quantized_rows r;
  r.q.resize(static_cast<std::size_t>(rows * in));
  float tlo = 0, thi = 0;
  for (index_t i = 0; i < rows * in; ++i) {
    tlo = std::min(tlo, x[i]);
    thi = std::max(thi, x[i]);
  }
  for (index_t i = 0; i < rows; ++i) {
    float lo = 0, hi = 0;
    for (index_t k = 0; k < in; ++k) {
      lo = std::min(lo, x[i * in + k]);
      hi = std::max(hi, x[i * in + k]);
    }
    if (!per_row) {
      lo = tlo;
      hi = thi;
    }
    float s = (hi - lo) / 255.0f;
    if (s == 0.0f) s = 1.0f;
    int z = static_cast<int>(std::clamp(quant::round_half_even(-lo / s), 0.0f, 255.0f));
    if (fixed != nullptr) {
      s = fixed->scale;
      z = fixed->zero_point;
    }
    r.scale.push_back(s);
    r.zero.push_back(z);
    for (index_t k = 0; k < in; ++k) r.q[static_cast<std::size_t>(i * in + k)] = quant::quantize_value<std::uint8_t>(x[i * in + k], s, z);
  }
  return r;
}

template <class Scheme>
void check_int8_qlinear(activation act, bool per_row, const quant::qparams* fixed = nullptr, double tol_fp32 = 0.05) {
  trained_linear t(act);
  const auto ref32 = t.fp32_forward();
  std::optional<quant::qlinear<fp32p, Scheme>> q;
  if constexpr (Scheme::calibrated) {
    q.emplace(t.fc, t.store, *fixed);
  } else {
    q.emplace(t.fc, t.store);
  }
  CHECK(q->name() == "fc");
  CHECK(q->act() == act);
  nn::arena<cpu> memory;
  nn::context<fp32p> ctx{memory, false, nullptr};
  auto y = q->forward(ctx, t.x.view().as_const());
  CHECK(q->flops() == 2 * q_rows * q_in * q_out);
  const auto& w = q->weights();
  const auto qx = quantize_input(t.x.data(), q_rows, q_in, per_row, fixed);
  const float* bias = t.store.param(t.fc.bias()).data();
  double err = 0, norm = 0;
  for (index_t i = 0; i < q_rows; ++i) {
    for (index_t j = 0; j < q_out; ++j) {
      std::int64_t acc = 0;
      for (index_t k = 0; k < q_in; ++k) {
        acc += static_cast<std::int64_t>(qx.q[static_cast<std::size_t>(i * q_in + k)] - qx.zero[static_cast<std::size_t>(i)]) * w.value(j, k);
      }
      const double ref = apply_act(qx.scale[static_cast<std::size_t>(i)] * static_cast<double>(w.scales()[static_cast<std::size_t>(j)]) *
                                       static_cast<double>(acc) + bias[j], act);
      CHECK(y.data()[i * q_out + j] == doctest::Approx(ref).epsilon(1e-5).scale(1.0));
      err += std::pow(y.data()[i * q_out + j] - ref32[static_cast<std::size_t>(i * q_out + j)], 2);
      norm += std::pow(ref32[static_cast<std::size_t>(i * q_out + j)], 2);
    }
  }
  // and the quantized layer is close to the fp32 one
  CHECK(std::sqrt(err / norm) < tol_fp32);
  // the weights are per-channel symmetric int8 of the fp32 weights: scale max|w| / 127
  const float* wf = t.store.param(t.fc.weight()).data();
  for (index_t j = 0; j < q_out; j += 13) {
    float amax = 0;
    for (index_t k = 0; k < q_in; ++k) amax = std::max(amax, std::fabs(wf[j * q_in + k]));
    CHECK(w.scales()[static_cast<std::size_t>(j)] == amax / 127.0f);
  }
}

}  // namespace

TEST_CASE("qlinear<dynamic_int8>: per tensor and per row, against the int32 sum of its own quantized values in double") {
  for (auto act : {activation::none, activation::relu, activation::gelu}) {
    INFO(to_string(act));
    check_int8_qlinear<quant::dynamic_int8<quant::per_tensor>>(act, false);
    check_int8_qlinear<quant::dynamic_int8<quant::per_row>>(act, true);
  }
}

TEST_CASE("qlinear<static_int8>: the calibrated (scale, zero point), saturating outside the range") {
  const quant::qparams fixed{5.0f / 255.0f, 102};  // [-2, 3]: the outlier 9 saturates
  // the error against fp32 is larger: the range [-2, 3] clips the outlier 9 and its row
  check_int8_qlinear<quant::static_int8>(activation::relu, false, &fixed, 0.15);
  check_int8_qlinear<quant::static_int8>(activation::none, false, &fixed, 0.15);
  trained_linear t(activation::none);
  CHECK_THROWS_AS((quant::qlinear<fp32p, quant::static_int8>(t.fc, t.store, quant::qparams{0.0f, 0})), quant::quantization_error);
  CHECK_THROWS_AS((quant::qlinear<fp32p, quant::static_int8>(t.fc, t.store, quant::qparams{0.1f, 300})), quant::quantization_error);
}

TEST_CASE("qlinear<weight_only>: int8 and int4, groups 32 and 128, against the dequantised weights in double") {
  auto run = [&]<class Q, index_t G>(quant::weight_only<Q, G>, activation act, double tol_fp32) {
    using Scheme = quant::weight_only<Q, G>;
    trained_linear t(act);
    const auto ref32 = t.fp32_forward();
    quant::qlinear<fp32p, Scheme> q(t.fc, t.store);
    nn::arena<cpu> memory;
    nn::context<fp32p> ctx{memory, false, nullptr};
    auto y = q.forward(ctx, t.x.view().as_const());
    const auto& w = q.weights();
    CHECK(w.group() == G);
    const float* bias = t.store.param(t.fc.bias()).data();
    double err = 0, norm = 0;
    for (index_t i = 0; i < q_rows; ++i) {
      for (index_t j = 0; j < q_out; ++j) {
        double acc = bias[j];
        for (index_t k = 0; k < q_in; ++k) {
          acc += static_cast<double>(t.x.data()[i * q_in + k]) * w.value(j, k) * static_cast<double>(w.scale(j, k));
        }
        const double ref = apply_act(acc, act);
        CHECK(y.data()[i * q_out + j] == doctest::Approx(ref).epsilon(1e-5).scale(1.0));
        err += std::pow(y.data()[i * q_out + j] - ref32[static_cast<std::size_t>(i * q_out + j)], 2);
        norm += std::pow(ref32[static_cast<std::size_t>(i * q_out + j)], 2);
      }
    }
    CHECK(std::sqrt(err / norm) < tol_fp32);
  };
  run(quant::weight_only<std::int8_t, 32>{}, activation::relu, 0.02);
  run(quant::weight_only<std::int8_t, 128>{}, activation::none, 0.02);
  run(quant::weight_only<quant::int4_t, 32>{}, activation::gelu, 0.2);
  run(quant::weight_only<quant::int4_t, 128>{}, activation::relu, 0.2);
  trained_linear t(activation::none);
  nn::parameter_store<fp32p> s2;
  nn::linear<fp32p> odd(s2, "odd", 48, 4);
  s2.allocate();
  CHECK_THROWS_WITH_AS((quant::qlinear<fp32p, quant::weight_only<quant::int4_t, 32>>(odd, s2)), doctest::Contains("multiple of the group"),
                       shape_error);
}

TEST_CASE("qlinear: bytes() is the ideal size; backward throws pointing to QAT; bad input is refused") {
  trained_linear t(activation::relu);
  // values at their bit width + fp32 scales + fp32 bias (+ static input scale and zero point)
  constexpr std::size_t values8 = q_out * q_in, bias = 4 * q_out;
  CHECK(quant::qlinear<fp32p, quant::dynamic_int8<quant::per_row>>(t.fc, t.store).bytes() == values8 + 4 * q_out + bias);
  CHECK(quant::qlinear<fp32p, quant::dynamic_int8<>>(t.fc, t.store).bytes() == 10240 + 160 + 160);
  CHECK(quant::qlinear<fp32p, quant::static_int8>(t.fc, t.store, quant::qparams{0.1f, 3}).bytes() == 10560 + 8);
  CHECK(quant::qlinear<fp32p, quant::weight_only<std::int8_t, 32>>(t.fc, t.store).bytes() == 10240 + 40 * 8 * 4 + 160);
  CHECK(quant::qlinear<fp32p, quant::weight_only<quant::int4_t, 128>>(t.fc, t.store).bytes() == 5120 + 40 * 2 * 4 + 160);
  {
    trained_linear nb(activation::none, false);
    CHECK(quant::qlinear<fp32p, quant::weight_only<quant::int4_t, 32>>(nb.fc, nb.store).bytes() == 5120 + 40 * 8 * 4);
  }
  // against the fp32 layer's 4 (out in + out) bytes: about 4x and 7x smaller
  const std::size_t fp32_bytes = 4 * (q_out * q_in + q_out);
  CHECK(quant::qlinear<fp32p, quant::weight_only<quant::int4_t, 128>>(t.fc, t.store).bytes() * 7 < fp32_bytes);

  quant::qlinear<fp32p, quant::dynamic_int8<quant::per_row>> q(t.fc, t.store);
  nn::arena<cpu> memory;
  nn::context<fp32p> ctx{memory, false, nullptr};
  auto y = q.forward(ctx, t.x.view().as_const());
  CHECK_THROWS_WITH_AS(q.backward(ctx, y.as_const()), doctest::Contains("qat_linear"), error);
  tensor<float> bad({3, q_in + 1});
  CHECK_THROWS_WITH_AS(q.forward(ctx, bad.view().as_const()), doctest::Contains("(..., 256)"), shape_error);
  t.x.data()[3] = std::nanf("");
  CHECK_THROWS_AS(q.forward(ctx, t.x.view().as_const()), quant::quantization_error);
  quant::qlinear<fp32p, quant::static_int8> qs(t.fc, t.store, quant::qparams{0.1f, 3});
  CHECK_THROWS_WITH_AS(qs.forward(ctx, t.x.view().as_const()), doctest::Contains("NaN"), quant::quantization_error);
  // a 3-d input keeps its leading dimensions
  tensor<float> x3({2, 3, q_in});
  fill(x3, 0.5);
  auto y3 = q.forward(ctx, x3.view().as_const());
  CHECK(y3.shape() == shape({2, 3, q_out}));
}

TEST_CASE("qlinear under the bf16 policy: the input converted to fp32, the output rounded to bf16") {
  nn::parameter_store<bf16p> store;
  nn::linear<bf16p> fc(store, "fc", 64, 16, true, activation::relu);
  store.allocate();
  generator g(4);
  fc.init(g);
  store.master_from_params();
  tensor<float> xf({5, 64});
  uniform(xf, g, -1.0, 1.0);
  tensor<bfloat16> x({5, 64});
  copy(xf, x);
  nn::arena<cpu> memory;
  nn::context<bf16p> ctx{memory, false, nullptr};
  auto ref = fc.forward(ctx, x.view().as_const());
  quant::qlinear<bf16p, quant::dynamic_int8<quant::per_row>> q(fc, store);
  quant::qlinear<bf16p, quant::weight_only<std::int8_t, 32>> w8(fc, store);
  auto y = q.forward(ctx, x.view().as_const());
  auto y8 = w8.forward(ctx, x.view().as_const());
  for (index_t i = 0; i < 5 * 16; ++i) {
    CHECK(static_cast<float>(y.data()[i]) == doctest::Approx(static_cast<float>(ref.data()[i])).epsilon(0.02).scale(0.5));
    CHECK(static_cast<float>(y8.data()[i]) == doctest::Approx(static_cast<float>(ref.data()[i])).epsilon(0.02).scale(0.5));
  }
}

// ---------------------------------------------------------------------------------------------
// PTQ and QAT end to end

namespace {

constexpr index_t feat = 32, classes = 4, hidden = 64;

/// Four Gaussian classes in 32 dimensions, overlapping: centres ~ N(0, 0.4^2), noise N(0, 1).
struct problem {
  tensor<float> train_x, test_x;
  std::vector<std::int32_t> train_y, test_y;
  problem() : train_x({4096, feat}), test_x({2048, feat}) {
    generator g(21);
    tensor<float> centres({classes, feat});
    normal(centres, g, 0.0, 0.4);
    auto fill_set = [&](tensor<float>& x, std::vector<std::int32_t>& y) {
      normal(x, g, 0.0, 1.0);
      const index_t n = x.size(0);
      for (index_t i = 0; i < n; ++i) {
        const auto c = static_cast<std::int32_t>((i * 5 + i / 7) % classes);
        y.push_back(c);
        for (index_t k = 0; k < feat; ++k) x.data()[i * feat + k] += centres.data()[c * feat + k];
      }
    };
    fill_set(train_x, train_y);
    fill_set(test_x, test_y);
  }
  tensor_view<const float> batch(index_t b, index_t size) const {
    return train_x.view().slice(0, b * size, (b + 1) * size).as_const();
  }
  std::span<const std::int32_t> labels(index_t b, index_t size) const {
    return std::span<const std::int32_t>(train_y.data() + b * size, static_cast<std::size_t>(size));
  }
};

const problem& data() {
  static const problem p;
  return p;
}

/// SGD with momentum over the training set in batches of 64, `steps` steps; after(step) runs
/// after each step (1-based).
template <class Net, class After>
void train_net(Net& net, nn::parameter_store<fp32p>& store, int steps, double lr, After after) {
  const auto& d = data();
  optim::sgd opt({.lr = lr, .momentum = 0.9});
  nn::softmax_cross_entropy<fp32p> loss;
  nn::arena<cpu> memory;
  generator gen(8);
  constexpr index_t bs = 64;
  const index_t batches = d.train_x.size(0) / bs;
  for (int s = 0; s < steps; ++s) {
    memory.reset();
    store.zero_grad();
    nn::context<fp32p> ctx{memory, true, &gen};
    const index_t b = s % batches;
    auto z = net.forward(ctx, d.batch(b, bs));
    loss.forward(ctx, z, d.labels(b, bs));
    net.backward(ctx, loss.backward(ctx));
    opt.step(store);
    after(s + 1);
  }
}

/// Predicted classes of the test set (eval mode).
template <class Net>
std::vector<int> predict(Net& net) {
  const auto& d = data();
  nn::arena<cpu> memory;
  nn::context<fp32p> ctx{memory, false, nullptr};
  auto z = net.forward(ctx, d.test_x.view().as_const());
  std::vector<int> out;
  for (index_t i = 0; i < z.size(0); ++i) {
    const float* row = z.data() + i * classes;
    out.push_back(static_cast<int>(std::max_element(row, row + classes) - row));
  }
  return out;
}

double accuracy(const std::vector<int>& pred) {
  int ok = 0;
  for (std::size_t i = 0; i < pred.size(); ++i) ok += pred[i] == data().test_y[i];
  return static_cast<double>(ok) / static_cast<double>(pred.size());
}

double agreement(const std::vector<int>& a, const std::vector<int>& b) {
  int same = 0;
  for (std::size_t i = 0; i < a.size(); ++i) same += a[i] == b[i];
  return static_cast<double>(same) / static_cast<double>(a.size());
}

using mlp_t = nn::sequential<fp32p, nn::linear<fp32p>, nn::dropout<fp32p>, nn::linear<fp32p>>;

struct trained_mlp {
  nn::parameter_store<fp32p> store;
  mlp_t net;
  trained_mlp()
      : net(nn::linear<fp32p>(store, "fc1", feat, hidden, true, activation::relu), nn::dropout<fp32p>(0.1),
            nn::linear<fp32p>(store, "fc2", hidden, classes)) {
    store.allocate();
    generator g(2);
    net.init(g);
    train_net(net, store, 300, 0.02, [](int) {});
  }
};

}  // namespace

TEST_CASE("PTQ: an MLP trained here, converted under every scheme, keeps its accuracy") {
  trained_mlp m;
  const auto ref = predict(m.net);
  const double acc = accuracy(ref);
  MESSAGE("fp32 test accuracy " << acc);
  REQUIRE(acc > 0.8);  // the problem is learnt, so the comparison means something

  auto check = [&](auto qnet, const char* what, double margin) {
    const auto p = predict(qnet);
    MESSAGE(std::string(what) << ": accuracy " << accuracy(p) << " against fp32 " << acc << ", agreement " << agreement(p, ref));
    CHECK(accuracy(p) >= acc - margin);
    CHECK(agreement(p, ref) > 1.0 - 2 * margin);
    return p;
  };
  // the converted model's type: each linear became a qlinear, dropout kept
  auto dyn = quant::convert<quant::dynamic_int8<quant::per_row>>(m.net, m.store);
  static_assert(std::is_same_v<decltype(dyn), nn::sequential<fp32p, quant::qlinear<fp32p, quant::dynamic_int8<quant::per_row>>,
                                                             nn::dropout<fp32p>, quant::qlinear<fp32p, quant::dynamic_int8<quant::per_row>>>>);
  check(dyn, "dynamic int8 per row", 0.01);
  check(quant::convert<quant::dynamic_int8<quant::per_tensor>>(m.net, m.store), "dynamic int8 per tensor", 0.01);
  check(quant::convert<quant::weight_only<std::int8_t, 32>>(m.net, m.store), "weight-only int8 g32", 0.01);
  check(quant::convert<quant::weight_only<quant::int4_t, 32>>(m.net, m.store), "weight-only int4 g32", 0.03);

  // static: calibrate on 8 training batches of 64, then convert
  const auto& d = data();
  auto calibrated = [&](auto cal, const char* what) {
    nn::arena<cpu> memory;
    for (index_t b = 0; b < 8; ++b) {
      memory.reset();
      nn::context<fp32p> ctx{memory, false, nullptr};
      cal.forward(ctx, d.batch(b, 64));
    }
    auto qnet = quant::convert<quant::static_int8>(cal, m.store);
    check(qnet, what, 0.015);
    return std::pair{std::move(cal), std::move(qnet)};
  };
  auto [cal, qs] = calibrated(quant::calibrate<quant::minmax_observer>(m.net, m.store), "static int8, min-max");
  // the first layer observed the calibration inputs themselves: its range is theirs
  const auto first = d.train_x.view().slice(0, 0, 8 * 64);
  float lo = 0, hi = 0;
  for (index_t i = 0; i < first.numel(); ++i) {
    lo = std::min(lo, first.data()[i]);
    hi = std::max(hi, first.data()[i]);
  }
  CHECK(cal.get<0>().observer().lo() == lo);
  CHECK(cal.get<0>().observer().hi() == hi);
  CHECK(qs.get<0>().input_params() == quant::affine_qparams<std::uint8_t>(lo, hi));
  // the second layer's input is the ReLU output: all >= 0, so its zero point is 0
  CHECK(qs.get<2>().input_params().zero_point == 0);
  calibrated(quant::calibrate<quant::percentile_observer>(m.net, m.store), "static int8, percentile");
  calibrated(quant::calibrate<quant::moving_average_minmax_observer>(m.net, m.store), "static int8, moving average");

  // a converted model is inference only
  nn::arena<cpu> memory;
  nn::context<fp32p> ctx{memory, false, nullptr};
  auto y = dyn.forward(ctx, d.batch(0, 4));
  CHECK_THROWS_WITH_AS(dyn.backward(ctx, y.as_const()), doctest::Contains("inference only"), error);
  // an uncalibrated observed model does not convert
  auto fresh = quant::calibrate<quant::minmax_observer>(m.net, m.store);
  CHECK_THROWS_WITH_AS(quant::convert<quant::static_int8>(fresh, m.store), doctest::Contains("has seen no input"), error);
}

TEST_CASE("QAT: fine-tune the trained MLP with fake quantization, observers frozen after the set step, convert to static int8") {
  trained_mlp m;
  const auto ref = predict(m.net);
  const double acc = accuracy(ref);
  using qat = quant::qat_linear<fp32p>;
  constexpr std::int64_t freeze = 60;
  nn::parameter_store<fp32p> store;
  nn::sequential<fp32p, qat, nn::dropout<fp32p>, qat> net(
      qat(store, "fc1", feat, hidden, true, activation::relu, {.freeze_observer_after = freeze}), nn::dropout<fp32p>(0.1),
      qat(store, "fc2", hidden, classes, true, activation::none, {.freeze_observer_after = freeze}));
  store.allocate();
  quant::copy_parameters(m.store, store);  // the fp32 model's weights, by name

  float lo1 = 0, hi1 = 0, lo2 = 0, hi2 = 0;
  std::vector<float> w_at_freeze;
  train_net(net, store, 150, 0.005, [&](int step) {
    CHECK(net.get<0>().observer_frozen() == (step >= freeze));
    if (step == freeze) {
      lo1 = net.get<0>().observer().lo();
      hi1 = net.get<0>().observer().hi();
      lo2 = net.get<2>().observer().lo();
      hi2 = net.get<2>().observer().hi();
      w_at_freeze.assign(store.params().data(), store.params().data() + store.size());
    }
  });
  CHECK(net.get<0>().steps() == 150);
  CHECK(net.get<0>().observer().count() == freeze);
  CHECK(net.get<2>().observer().count() == freeze);
  // frozen: the ranges at the freeze step are the ranges at the end
  CHECK(net.get<0>().observer().lo() == lo1);
  CHECK(net.get<0>().observer().hi() == hi1);
  CHECK(net.get<2>().observer().lo() == lo2);
  CHECK(net.get<2>().observer().hi() == hi2);
  // while the weights went on training (through the STE into the fp32 master weights)
  double moved = 0;
  for (index_t i = 0; i < store.size(); ++i) moved += std::fabs(store.params().data()[i] - w_at_freeze[static_cast<std::size_t>(i)]);
  CHECK(moved > 1e-3);

  const auto qat_pred = predict(net);
  auto qnet = quant::convert<quant::static_int8>(net, store);
  CHECK(qnet.get<0>().input_params() == net.get<0>().input_params());
  const auto p = predict(qnet);
  MESSAGE("fp32 " << acc << ", QAT " << accuracy(qat_pred) << ", converted to static int8 " << accuracy(p));
  CHECK(accuracy(p) >= acc - 0.015);
  CHECK(agreement(p, qat_pred) > 0.99);  // the converted model computes what QAT simulated

  // logit by logit: the int8 model equals the fake-quantized one up to float rounding
  nn::arena<cpu> memory;
  nn::context<fp32p> ctx{memory, false, nullptr};
  const auto x = data().test_x.view().slice(0, 0, 64).as_const();
  auto zq = net.forward(ctx, x);
  auto zi = qnet.forward(ctx, x);
  double worst = 0;
  for (index_t i = 0; i < zq.numel(); ++i) worst = std::max(worst, static_cast<double>(std::fabs(zq.data()[i] - zi.data()[i])));
  CHECK(worst < 1e-3);
}

// ---------------------------------------------------------------------------------------------
// The quantized GPT

namespace {

/// Token sequences that follow t' = (5 t + 3) mod V four times out of five (else a random
/// token): a rule a small GPT learns in a hundred steps.
void gpt_batch(generator& g, index_t batch, index_t t, index_t vocab, std::vector<std::int32_t>& x, std::vector<std::int32_t>& y) {
  tensor<float> rt({batch * (t + 1) * 2 + batch});
  uniform(rt, g, 0.0, 1.0);
  const float* r = rt.data();
  std::size_t k = 0;
  x.assign(static_cast<std::size_t>(batch * t), 0);
  y.assign(static_cast<std::size_t>(batch * t), 0);
  for (index_t b = 0; b < batch; ++b) {
    auto tok = static_cast<std::int32_t>(r[k++] * static_cast<double>(vocab)) % static_cast<std::int32_t>(vocab);
    for (index_t i = 0; i <= t; ++i) {
      if (i < t) x[static_cast<std::size_t>(b * t + i)] = tok;
      if (i > 0) y[static_cast<std::size_t>(b * t + i - 1)] = tok;
      const double u = r[k++];
      const double v = r[k++];
      tok = u < 0.8 ? static_cast<std::int32_t>((5 * tok + 3) % vocab) : static_cast<std::int32_t>(v * static_cast<double>(vocab)) % static_cast<std::int32_t>(vocab);
    }
  }
}

}  // namespace

TEST_CASE("quantized_gpt: a GPT trained here, its projections in int8 (dynamic per row) and int4: logits and loss stay close") {
  const nn::gpt_config cfg{.vocab_size = 32, .block_size = 32, .n_layer = 2, .n_head = 4, .n_embd = 64};
  nn::parameter_store<fp32p> store;
  nn::gpt<fp32p> model(store, cfg);
  store.allocate();
  generator g(31);
  model.init(g);
  optim::adamw opt({.lr = 3e-3, .beta2 = 0.99, .weight_decay = 0.0});
  nn::arena<cpu> mem;
  const index_t batch = 8, t = 32;
  std::vector<std::int32_t> x, y;
  double first = 0, last = 0;
  for (int step = 0; step < 120; ++step) {
    gpt_batch(g, batch, t, cfg.vocab_size, x, y);
    mem.reset();
    store.zero_grad();
    nn::context<fp32p> ctx{mem};
    last = model.forward(ctx, x, batch, y);
    if (step == 0) first = last;
    model.backward(ctx);
    opt.step(store);
  }
  MESSAGE("GPT training loss " << first << " -> " << last);
  REQUIRE(last < 0.6 * first);  // it learnt the rule: its weights are not the initial noise

  // a held-out batch through the fp32 model
  gpt_batch(g, batch, t, cfg.vocab_size, x, y);
  mem.reset();
  nn::context<fp32p> ctx{mem, false, nullptr};
  const double loss32 = model.forward(ctx, x, batch, y);
  auto z32v = model.logits(ctx, x, batch);
  const std::vector<float> z32(z32v.data(), z32v.data() + z32v.numel());

  auto compare = [&](auto q, const char* what, double max_rel, double max_dloss) {
    nn::arena<cpu> qm;
    nn::context<fp32p> qctx{qm, false, nullptr};
    const double lq = q.forward(qctx, x, batch, y);
    qm.reset();
    auto zq = q.logits(qctx, x, batch);
    REQUIRE(zq.numel() == static_cast<index_t>(z32.size()));
    double err = 0, norm = 0;
    int agree = 0;
    for (index_t i = 0; i < batch * t; ++i) {
      const float* a = z32.data() + i * cfg.vocab_size;
      const float* b = zq.data() + i * cfg.vocab_size;
      for (index_t j = 0; j < cfg.vocab_size; ++j) {
        err += std::pow(static_cast<double>(a[j]) - b[j], 2);
        norm += std::pow(static_cast<double>(a[j]), 2);
      }
      agree += (std::max_element(a, a + cfg.vocab_size) - a) == (std::max_element(b, b + cfg.vocab_size) - b);
    }
    const double rel = std::sqrt(err / norm);
    MESSAGE(std::string(what) << ": logits rel. RMS error " << rel << ", loss " << lq << " vs fp32 " << loss32 << ", top-1 agreement "
                 << agree << "/" << batch * t << ", " << q.bytes() << " bytes");
    CHECK(rel < max_rel);
    CHECK(std::fabs(lq - loss32) < max_dloss);
    CHECK(agree >= batch * t * 95 / 100);
    CHECK(q.flops() == model.flops());
    return q.bytes();
  };
  const std::size_t fp32_bytes = static_cast<std::size_t>(store.count()) * 4;
  CHECK(compare(quant::quantized_gpt<quant::dynamic_int8<quant::per_row>>(model, store), "int8 dynamic per row", 0.01, 0.005) <
        fp32_bytes);
  compare(quant::quantized_gpt<quant::dynamic_int8<quant::per_tensor>>(model, store), "int8 dynamic per tensor", 0.015, 0.005);
  compare(quant::quantized_gpt<quant::weight_only<std::int8_t, 32>>(model, store), "weight-only int8 g32", 0.005, 0.002);
  compare(quant::quantized_gpt<quant::weight_only<quant::int4_t, 32>>(model, store), "weight-only int4 g32", 0.08, 0.02);
  compare(quant::quantized_gpt<quant::dynamic_int8<quant::per_row>>(model, store, {.quantize_head = true}), "int8 per row, head too",
          0.015, 0.005);
  // the quantized projections are the trained layers' weights: block 0's c_fc keeps its GELU
  quant::quantized_gpt<> q(model, store);
  CHECK(q.c_fc(0).act() == activation::gelu);
  CHECK(q.c_attn(1).out_features() == 3 * cfg.n_embd);
  CHECK(q.mlp_proj(1).in_features() == 4 * cfg.n_embd);
  CHECK_THROWS_AS(q.logits(ctx, std::span<const std::int32_t>(x.data(), 33), 1), shape_error);  // 33 > block 32
}

TEST_CASE("convert: nested sequentials convert module by module; parameterless modules are kept") {
  nn::parameter_store<fp32p> store;
  using inner = nn::sequential<fp32p, nn::linear<fp32p>, nn::relu<fp32p>>;
  nn::sequential<fp32p, nn::linear<fp32p>, nn::relu<fp32p>, inner> net(
      nn::linear<fp32p>(store, "a", 64, 32), nn::relu<fp32p>(), inner(nn::linear<fp32p>(store, "b", 32, 8), nn::relu<fp32p>()));
  store.allocate();
  generator g(6);
  net.init(g);
  using Q = quant::qlinear<fp32p, quant::weight_only<std::int8_t, 32>>;
  auto q = quant::convert<quant::weight_only<std::int8_t, 32>>(net, store);
  static_assert(std::is_same_v<decltype(q), nn::sequential<fp32p, Q, nn::relu<fp32p>, nn::sequential<fp32p, Q, nn::relu<fp32p>>>>);
  CHECK(q.get<2>().get<0>().name() == "b");
  tensor<float> x({3, 64});
  uniform(x, g, -1.0, 1.0);
  nn::arena<cpu> memory;
  nn::context<fp32p> ctx{memory, false, nullptr};
  auto y32 = net.forward(ctx, x.view().as_const());
  auto yq = q.forward(ctx, x.view().as_const());
  for (index_t i = 0; i < 3 * 8; ++i) {
    CHECK(yq.data()[i] >= 0.0f);  // the inner ReLU ran
    CHECK(yq.data()[i] == doctest::Approx(y32.data()[i]).epsilon(0.02).scale(0.5));
  }
  CHECK(q.flops() == net.flops());
}
