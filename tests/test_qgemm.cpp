// Tests of the int8 GEMM (trident/quant/packed_int8.hpp, backend/cpu/qgemm/): every kernel the
// CPU has against exact int64 sums computed here, weight quantization and dynamic activation
// quantization against the ONNX definitions written out in double, and the int8 linear layer
// against a double-precision computation from the same quantized values.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <trident/backend/cpu/device.hpp>
#include <trident/quant/packed_int8.hpp>

namespace {

// The thread counts the GEMMs choose must not depend on how busy the machine was a moment ago
// (the adaptive policy of backend/cpu/gemm/common.hpp): the multi-threaded paths of the
// drivers (row strips claimed by threads, columns split when rows are few) are part of what
// is tested. Set before any test runs.
const bool fixed_threading = [] { return ::setenv("TRIDENT_GEMM_ADAPTIVE", "0", 1) == 0; }();

using trident::activation;
using trident::index_t;
namespace q = trident::quant;

/// The kernels this CPU and build can run (scalar always).
std::vector<q::int8_kernel> kernels_here() {
  std::vector<q::int8_kernel> ks{q::int8_kernel::scalar};
  for (auto k : {q::int8_kernel::avx512_vnni, q::int8_kernel::amx_int8}) {
    if (q::kernel_available(k)) ks.push_back(k);
  }
  return ks;
}

/// Round half to even in double, independent of std::round's ties-away.
double rint_even(double x) {
  const double f = std::floor(x), d = x - f;
  if (d < 0.5) return f;
  if (d > 0.5) return f + 1;
  return std::fmod(f, 2.0) == 0.0 ? f : f + 1;
}

/// Whether x (a quotient computed in double) is so close to a half-integer that float
/// division may land on the other side of it (then either rounding is ONNX's).
bool near_tie(double x) {
  const double d = std::fabs(x - std::floor(x) - 0.5);
  return d != 0.0 && d < 1e-6 * std::max(1.0, std::fabs(x));
}

struct gemm_case {
  index_t m, n, k;
  index_t pad_a = 0, pad_c = 0;
};

/// Runs int8_gemm on (a, q) and checks every element against the int64 sum, and that the
/// padding of C is untouched.
void check_gemm(const gemm_case& g, const std::vector<std::uint8_t>& a, const std::vector<std::int8_t>& wq,
                const std::string& what) {
  const index_t lda = g.k + g.pad_a, ldc = g.n + g.pad_c;
  std::vector<float> scales(static_cast<std::size_t>(g.n), 1.0f);
  const q::packed_int8_weight w(wq.data(), scales.data(), g.n, g.k);
  const std::int32_t sentinel = 0x5a5a5a5a;
  std::vector<std::int32_t> c(static_cast<std::size_t>(g.m * ldc), sentinel);
  q::int8_gemm(a.data(), g.m, lda, w, c.data(), ldc);
  index_t bad = 0;
  for (index_t i = 0; i < g.m; ++i) {
    for (index_t j = 0; j < ldc; ++j) {
      const std::int32_t got = c[static_cast<std::size_t>(i * ldc + j)];
      std::int64_t want = sentinel;
      if (j < g.n) {
        want = 0;
        for (index_t p = 0; p < g.k; ++p) {
          want += std::int64_t(a[static_cast<std::size_t>(i * lda + p)]) * wq[static_cast<std::size_t>(j * g.k + p)];
        }
      }
      if (got != want && bad++ < 5) {
        FAIL_CHECK(what << " " << g.m << "x" << g.n << "x" << g.k << ": C(" << i << ", " << j << ") = " << got
                        << ", want " << want);
      }
    }
  }
  CHECK_MESSAGE(bad == 0, what << " " << g.m << "x" << g.n << "x" << g.k << ": " << bad << " wrong elements");
}

void random_operands(const gemm_case& g, std::uint32_t seed, std::vector<std::uint8_t>& a, std::vector<std::int8_t>& wq) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> ua(0, 255), uw(-128, 127);
  a.assign(static_cast<std::size_t>(g.m * (g.k + g.pad_a)), 0);
  for (auto& v : a) v = static_cast<std::uint8_t>(ua(gen));
  wq.resize(static_cast<std::size_t>(g.n * g.k));
  for (auto& v : wq) v = static_cast<std::int8_t>(uw(gen));
}

}  // namespace

TEST_CASE("int8_gemm: every kernel gives the exact int32 product on odd, edge and large shapes") {
  const std::vector<gemm_case> cases = {
      {1, 1, 1},       {1, 16, 64},     {1, 17, 3},       {3, 5, 7},         {2, 33, 65},     {15, 15, 63},
      {16, 16, 64},    {17, 17, 65},    {31, 31, 127},    {32, 32, 128},     {33, 47, 129},   {64, 64, 256},
      {65, 97, 200, 3, 5},              {100, 130, 1000}, {7, 300, 1030, 1, 2},                {1, 1024, 1024},
      {40, 96, 4, 0, 0},                {256, 1024, 1024}};
  for (const auto kk : kernels_here()) {
    const q::scoped_int8_kernel force(kk);
    std::uint32_t seed = 7;
    for (const auto& g : cases) {
      std::vector<std::uint8_t> a;
      std::vector<std::int8_t> wq;
      random_operands(g, seed++, a, wq);
      check_gemm(g, a, wq, q::to_string(kk));
    }
  }
}

TEST_CASE("int8_gemm: extreme values (255 x -128 and 255 x 127 over long k) do not saturate") {
  for (const auto kk : kernels_here()) {
    const q::scoped_int8_kernel force(kk);
    for (const gemm_case g : {gemm_case{5, 19, 4099}, gemm_case{33, 35, 16384}}) {
      for (const int wv : {-128, 127}) {
        std::vector<std::uint8_t> a(static_cast<std::size_t>(g.m * g.k), 255);
        std::vector<std::int8_t> wq(static_cast<std::size_t>(g.n * g.k), static_cast<std::int8_t>(wv));
        check_gemm(g, a, wq, std::string(q::to_string(kk)) + " all 255 x " + std::to_string(wv));
      }
      // Alternating extremes: 255 x -128 then 0 x 127, and 255 x 127 then 255 x -128.
      std::vector<std::uint8_t> a(static_cast<std::size_t>(g.m * g.k));
      std::vector<std::int8_t> wq(static_cast<std::size_t>(g.n * g.k));
      for (index_t i = 0; i < g.m * g.k; ++i) a[static_cast<std::size_t>(i)] = (i % 3 == 0) ? 0 : 255;
      for (index_t i = 0; i < g.n * g.k; ++i) wq[static_cast<std::size_t>(i)] = (i % 2 == 0) ? -128 : 127;
      check_gemm(g, a, wq, std::string(q::to_string(kk)) + " alternating extremes");
    }
    // The first value of a 4-byte group at 255 with -128 (VPMADDUBSW would saturate the pair sum).
    const gemm_case g{9, 21, 37};
    std::vector<std::uint8_t> a(static_cast<std::size_t>(g.m * g.k), 255);
    std::vector<std::int8_t> wq(static_cast<std::size_t>(g.n * g.k), -128);
    check_gemm(g, a, wq, std::string(q::to_string(kk)) + " pairs of 255 x -128");
  }
}

TEST_CASE("int8_gemm: the largest k that stays exact, and beyond it an error") {
  const index_t kmax = trident::cpu_kernels::qgemm::max_exact_k;
  CHECK(255LL * 128 * kmax < (1LL << 31));
  CHECK(255LL * 128 * (kmax + 1) >= (1LL << 31));
  const std::vector<std::int8_t> wq(static_cast<std::size_t>(kmax + 1), 1);
  const float s = 1.0f;
  CHECK_THROWS_AS(q::packed_int8_weight(wq.data(), &s, 1, kmax + 1), trident::shape_error);
  for (const auto kk : kernels_here()) {
    const q::scoped_int8_kernel force(kk);
    const gemm_case g{2, 3, kmax};
    std::vector<std::uint8_t> a(static_cast<std::size_t>(g.m * g.k), 255);
    std::vector<std::int8_t> w(static_cast<std::size_t>(g.n * g.k), -128);
    check_gemm(g, a, w, std::string(q::to_string(kk)) + " k = max_exact_k");
  }
}

TEST_CASE("int8_gemm: shape errors") {
  std::vector<std::int8_t> wq(12, 1);
  std::vector<float> s(3, 1.0f);
  const q::packed_int8_weight w(wq.data(), s.data(), 3, 4);
  std::vector<std::uint8_t> a(40, 1);
  std::vector<std::int32_t> c(40);
  CHECK_THROWS_AS(q::int8_gemm(a.data(), 0, 4, w, c.data(), 3), trident::shape_error);
  CHECK_THROWS_AS(q::int8_gemm(a.data(), 2, 3, w, c.data(), 3), trident::shape_error);  // lda < k
  CHECK_THROWS_AS(q::int8_gemm(a.data(), 2, 4, w, c.data(), 2), trident::shape_error);  // ldc < n
  CHECK_THROWS_AS(q::int8_gemm(a.data(), 2, 4, q::packed_int8_weight{}, c.data(), 3), trident::shape_error);
  CHECK_THROWS_AS(q::packed_int8_weight(wq.data(), s.data(), 0, 4), trident::shape_error);
  s[1] = 0.0f;
  CHECK_THROWS_AS(q::packed_int8_weight(wq.data(), s.data(), 3, 4), q::quantization_error);
  std::vector<float> wf(12, 0.5f);
  CHECK_THROWS_AS(q::packed_int8_weight::quantize(wf.data(), 3, 4, 3), trident::shape_error);
  // Forcing a kernel this CPU or build lacks is an error, not a silent fallback.
  for (const auto kk : {q::int8_kernel::avx512_vnni, q::int8_kernel::amx_int8}) {
    if (!q::kernel_available(kk)) {
      CHECK_THROWS_WITH_AS(q::scoped_int8_kernel{kk}, doctest::Contains("not available"), trident::error);
    }
  }
}

TEST_CASE("packed_int8_weight: layout round trip, row sums and bytes") {
  std::mt19937 gen(3);
  std::uniform_int_distribution<int> uw(-128, 127);
  for (const auto& [n, k] : {std::pair<index_t, index_t>{1, 1}, {17, 5}, {33, 130}, {64, 64}}) {
    std::vector<std::int8_t> wq(static_cast<std::size_t>(n * k));
    for (auto& v : wq) v = static_cast<std::int8_t>(uw(gen));
    std::vector<float> s(static_cast<std::size_t>(n));
    for (index_t j = 0; j < n; ++j) s[static_cast<std::size_t>(j)] = 0.01f * static_cast<float>(j + 1);
    const q::packed_int8_weight w(wq.data(), s.data(), n, k);
    CHECK(w.out() == n);
    CHECK(w.in() == k);
    for (index_t j = 0; j < n; ++j) {
      std::int32_t sum = 0;
      for (index_t p = 0; p < k; ++p) {
        REQUIRE(w.value(j, p) == wq[static_cast<std::size_t>(j * k + p)]);
        sum += wq[static_cast<std::size_t>(j * k + p)];
      }
      CHECK(w.row_sums()[static_cast<std::size_t>(j)] == sum);
      CHECK(w.scales()[static_cast<std::size_t>(j)] == s[static_cast<std::size_t>(j)]);
    }
    // Packed values (n rounded up to 16, k to 64) + n scales + n sums.
    const auto padded = static_cast<std::size_t>(((n + 15) / 16 * 16) * ((k + 63) / 64 * 64));
    CHECK(w.bytes() == padded + static_cast<std::size_t>(n) * 8);
    CHECK_THROWS_AS((void)w.value(n, 0), trident::shape_error);
    const q::packed_int8_weight copy = w;  // copies own their bytes
    CHECK(copy.value(n - 1, k - 1) == w.value(n - 1, k - 1));
  }
}

TEST_CASE("packed_int8_weight::quantize: symmetric per channel, ties to even, as ONNX QuantizeLinear") {
  // Row 0: max |w| = 127 gives scale 1 exactly; its values hit the ties.
  // Row 1: a zero row (scale 1, all zeros). Row 2: random, with a padded leading dimension.
  // Row 3: max at a negative value. Row 4: tiny values.
  const index_t n = 5, k = 11, ldw = 13;
  std::vector<float> w(static_cast<std::size_t>(n * ldw), 99.0f);
  const float row0[k] = {127.0f, 2.5f, 3.5f, -2.5f, -3.5f, 0.5f, -0.5f, 1.5f, 126.5f, -126.5f, 0.0f};
  std::mt19937 gen(11);
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  for (index_t p = 0; p < k; ++p) {
    w[static_cast<std::size_t>(p)] = row0[p];
    w[static_cast<std::size_t>(ldw + p)] = 0.0f;
    w[static_cast<std::size_t>(2 * ldw + p)] = u(gen);
    w[static_cast<std::size_t>(3 * ldw + p)] = 0.1f * static_cast<float>(p) - 0.9f;
    w[static_cast<std::size_t>(4 * ldw + p)] = 1e-30f * static_cast<float>(p + 1);
  }
  w[static_cast<std::size_t>(3 * ldw + 4)] = -7.0f;
  const auto pw = q::packed_int8_weight::quantize(w.data(), n, k, ldw, "fc.weight");
  const int want_row0[k] = {127, 2, 4, -2, -4, 0, 0, 2, 126, -126, 0};
  for (index_t p = 0; p < k; ++p) CHECK(pw.value(0, p) == want_row0[p]);
  CHECK(pw.scales()[0] == 1.0f);
  CHECK(pw.scales()[1] == 1.0f);
  for (index_t p = 0; p < k; ++p) CHECK(pw.value(1, p) == 0);
  // The reference: scale = max|w| / 127 (a float division), q = clamp(rint_even(w / scale), -128, 127).
  for (index_t j = 0; j < n; ++j) {
    double amax = 0;
    for (index_t p = 0; p < k; ++p) amax = std::max(amax, std::fabs(double(w[static_cast<std::size_t>(j * ldw + p)])));
    const float scale = amax > 0 ? static_cast<float>(amax / 127.0) : 1.0f;
    CHECK(pw.scales()[static_cast<std::size_t>(j)] == scale);
    for (index_t p = 0; p < k; ++p) {
      const double x = double(w[static_cast<std::size_t>(j * ldw + p)]) / double(scale);
      const double want = std::clamp(rint_even(x), -128.0, 127.0);
      if (near_tie(x)) {
        CHECK(std::fabs(pw.value(j, p) - x) <= 0.5 + 1e-6);
      } else {
        CHECK_MESSAGE(pw.value(j, p) == want, "row " << j << " k " << p << " w/scale " << x);
      }
    }
  }
  CHECK(pw.value(3, 4) == -127);  // the extreme maps to -127 (symmetric: -128 never occurs)
}

TEST_CASE("packed_int8_weight::quantize rejects NaN and infinity, naming the tensor and the element") {
  std::vector<float> w(12, 0.25f);
  w[7] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(q::packed_int8_weight::quantize(w.data(), 3, 4, 4, "fc2.weight"),
                       "quantize 'fc2.weight': element 7 is NaN, which has no quantized value", q::quantization_error);
  w[7] = 0.0f;
  w[10] = -std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH_AS(q::packed_int8_weight::quantize(w.data(), 3, 4, 4),
                       "quantize 'weight': element 10 is infinite, which has no quantized value", q::quantization_error);
}

namespace {

/// ONNX DynamicQuantizeLinear of one range, written out: x_min = min(0, min x), x_max =
/// max(0, max x), scale = (x_max - x_min) / 255 (float arithmetic, as the ONNX reference on
/// float32 arrays), zero point = rint(clip(-x_min / scale, 0, 255)).
void onnx_dynamic_params(const float* x, index_t n, float& scale, int& zero) {
  float lo = 0.0f, hi = 0.0f;
  for (index_t p = 0; p < n; ++p) {
    lo = std::min(lo, x[p]);
    hi = std::max(hi, x[p]);
  }
  scale = (hi - lo) / 255.0f;
  if (scale == 0.0f) scale = 1.0f;
  zero = static_cast<int>(rint_even(std::clamp(-double(lo) / double(scale), 0.0, 255.0)));
}

/// Checks q against QuantizeLinear(x, scale, zero) in double (near-ties may go either way).
void check_quantized_row(const float* x, index_t n, float scale, int zero, const std::uint8_t* qrow, const std::string& what) {
  for (index_t p = 0; p < n; ++p) {
    const double r = double(x[p]) / double(scale);
    const double want = std::clamp(rint_even(r) + zero, 0.0, 255.0);
    if (near_tie(r)) {
      CHECK(std::fabs(double(qrow[p]) - std::clamp(r + zero, 0.0, 255.0)) <= 0.5 + 1e-6);
    } else if (double(qrow[p]) != want) {
      FAIL_CHECK(what << " element " << p << ": x = " << x[p] << ", q = " << int(qrow[p]) << ", want " << want);
      return;
    }
  }
}

}  // namespace

TEST_CASE("quantize_row_u8: the vector path equals quant::quantize_value bit for bit, near ties included") {
  namespace qk = trident::cpu_kernels::qgemm;
  CHECK(fixed_threading);
  std::mt19937 gen(17);
  std::uniform_real_distribution<float> us(1e-3f, 1.0f);
  std::uniform_int_distribution<int> uz(0, 255), uh(-300, 300), ud(-6, 6);
  std::uniform_real_distribution<float> ux(-300.0f, 300.0f);
  index_t ties = 0;
  for (int trial = 0; trial < 400; ++trial) {
    const float scale = trial == 0 ? 1.0f : trial == 1 ? 1e-40f : us(gen);  // 1e-40: subnormal, no reciprocal
    const int zero = uz(gen);
    std::vector<float> x(203);
    for (std::size_t p = 0; p < x.size(); ++p) {
      if (p % 3 == 0) {
        // A half-integer times the scale, moved by a few ulps: x / scale lands on or near a tie.
        float v = (static_cast<float>(uh(gen)) + 0.5f) * scale;
        for (int s = ud(gen); s != 0; s += s > 0 ? -1 : 1) v = std::nextafter(v, s > 0 ? 1e30f : -1e30f);
        x[p] = v;
        ++ties;
      } else {
        x[p] = ux(gen) * scale;
      }
    }
    std::vector<std::uint8_t> got(x.size());
    qk::quantize_row_u8(x.data(), static_cast<index_t>(x.size()), scale, zero, got.data());
    for (std::size_t p = 0; p < x.size(); ++p) {
      const int want = q::quantize_value<std::uint8_t>(x[p], scale, zero);
      if (got[p] != want) {
        FAIL_CHECK("x = " << x[p] << ", scale = " << scale << ", zero = " << zero << ": " << int(got[p]) << ", want " << want);
        break;
      }
    }
  }
  CHECK(ties > 1000);
}

TEST_CASE("quantize_dynamic_u8: ONNX DynamicQuantizeLinear per row and per tensor") {
  const index_t m = 6, k = 37, ldx = 40, ldq = 41;
  std::vector<float> x(static_cast<std::size_t>(m * ldx), 1e30f);
  std::mt19937 gen(5);
  std::uniform_real_distribution<float> u(-2.0f, 3.0f);
  for (index_t p = 0; p < k; ++p) {
    x[static_cast<std::size_t>(0 * ldx + p)] = u(gen);                                // mixed signs
    x[static_cast<std::size_t>(1 * ldx + p)] = 0.5f + 0.25f * static_cast<float>(p);  // all positive: zero point 0
    x[static_cast<std::size_t>(2 * ldx + p)] = -0.1f - 0.3f * static_cast<float>(p);  // all negative: zero point 255
    x[static_cast<std::size_t>(3 * ldx + p)] = 0.0f;                                  // zero row: scale 1
    x[static_cast<std::size_t>(4 * ldx + p)] = static_cast<float>(p) - 18.0f;         // ties of x / scale
    x[static_cast<std::size_t>(5 * ldx + p)] = 1e-3f * u(gen);
  }
  SUBCASE("per row") {
    std::vector<std::uint8_t> qv(static_cast<std::size_t>(m * ldq), 7);
    std::vector<float> scales(m);
    std::vector<std::int32_t> zeros(m);
    q::quantize_dynamic_u8(x.data(), m, k, ldx, q::granularity::per_row, qv.data(), ldq, scales.data(), zeros.data());
    for (index_t i = 0; i < m; ++i) {
      float s;
      int z;
      onnx_dynamic_params(&x[static_cast<std::size_t>(i * ldx)], k, s, z);
      CHECK(scales[static_cast<std::size_t>(i)] == s);
      CHECK(zeros[static_cast<std::size_t>(i)] == z);
      check_quantized_row(&x[static_cast<std::size_t>(i * ldx)], k, s, z, &qv[static_cast<std::size_t>(i * ldq)],
                          "row " + std::to_string(i));
      for (index_t p = k; p < ldq; ++p) CHECK(qv[static_cast<std::size_t>(i * ldq + p)] == 7);  // padding untouched
    }
    CHECK(zeros[1] == 0);
    CHECK(zeros[2] == 255);
    CHECK(scales[3] == 1.0f);
    CHECK(zeros[3] == 0);
    for (index_t p = 0; p < k; ++p) CHECK(qv[static_cast<std::size_t>(3 * ldq + p)] == 0);
    CHECK(qv[static_cast<std::size_t>(2 * ldq + k - 1)] == 0);  // the minimum of a negative row maps to 0
    CHECK(qv[static_cast<std::size_t>(1 * ldq + k - 1)] == 255);  // the maximum of a positive row to 255
  }
  SUBCASE("per tensor") {
    std::vector<std::uint8_t> qv(static_cast<std::size_t>(m * ldq));
    float scale = 0;
    std::int32_t zero = -1;
    q::quantize_dynamic_u8(x.data(), m, k, ldx, q::granularity::per_tensor, qv.data(), ldq, &scale, &zero);
    std::vector<float> dense(static_cast<std::size_t>(m * k));
    for (index_t i = 0; i < m; ++i)
      for (index_t p = 0; p < k; ++p) dense[static_cast<std::size_t>(i * k + p)] = x[static_cast<std::size_t>(i * ldx + p)];
    float s;
    int z;
    onnx_dynamic_params(dense.data(), m * k, s, z);
    CHECK(scale == s);
    CHECK(zero == z);
    for (index_t i = 0; i < m; ++i) {
      check_quantized_row(&x[static_cast<std::size_t>(i * ldx)], k, s, z, &qv[static_cast<std::size_t>(i * ldq)],
                          "row " + std::to_string(i));
    }
  }
  SUBCASE("NaN and infinity are rejected with the element") {
    std::vector<std::uint8_t> qv(static_cast<std::size_t>(m * ldq));
    std::vector<float> scales(m);
    std::vector<std::int32_t> zeros(m);
    x[static_cast<std::size_t>(2 * ldx + 5)] = std::numeric_limits<float>::infinity();
    CHECK_THROWS_WITH_AS(q::quantize_dynamic_u8(x.data(), m, k, ldx, q::granularity::per_row, qv.data(), ldq,
                                                scales.data(), zeros.data()),
                         "quantize 'activation': element 79 is infinite, which has no quantized value",
                         q::quantization_error);
    CHECK_THROWS_AS(q::quantize_dynamic_u8(x.data(), m, k, ldx, q::granularity::per_tensor, qv.data(), ldq,
                                           scales.data(), zeros.data()),
                    q::quantization_error);
  }
}

namespace {

/// y from the quantized operands in double: act(sa_i · sw_j · (Σ a q − za_i Σ q) + bias_j).
std::vector<double> linear_reference(const std::vector<std::uint8_t>& a, index_t m, index_t lda, const q::packed_int8_weight& w,
                                     const float* sa, const std::int32_t* za, bool per_row, const float* bias, activation act,
                                     std::vector<double>* magnitude = nullptr) {
  const index_t n = w.out(), k = w.in();
  std::vector<double> y(static_cast<std::size_t>(m * n));
  if (magnitude) magnitude->assign(static_cast<std::size_t>(m * n), 0.0);
  for (index_t i = 0; i < m; ++i) {
    const index_t r = per_row ? i : 0;
    for (index_t j = 0; j < n; ++j) {
      std::int64_t s = 0;
      for (index_t p = 0; p < k; ++p) {
        s += (std::int64_t(a[static_cast<std::size_t>(i * lda + p)]) - (za ? za[r] : 0)) * w.value(j, p);
      }
      const double prod = double(sa[r]) * double(w.scales()[static_cast<std::size_t>(j)]) * double(s);
      double v = prod + (bias ? double(bias[j]) : 0.0);
      if (magnitude) (*magnitude)[static_cast<std::size_t>(i * n + j)] = std::fabs(prod) + (bias ? std::fabs(double(bias[j])) : 0.0);
      if (act == activation::relu) v = std::max(v, 0.0);
      y[static_cast<std::size_t>(i * n + j)] = v;
    }
  }
  return y;
}

/// |got - want| <= 4 float roundings of the epilogue's magnitude (int32 -> float, two
/// products, one sum), element by element.
void check_close(const std::vector<float>& y, index_t ldy, const std::vector<double>& want, const std::vector<double>& mag,
                 index_t m, index_t n, const std::string& what) {
  const double u = std::numeric_limits<float>::epsilon() / 2;
  index_t bad = 0;
  for (index_t i = 0; i < m; ++i) {
    for (index_t j = 0; j < n; ++j) {
      const double got = y[static_cast<std::size_t>(i * ldy + j)], w = want[static_cast<std::size_t>(i * n + j)];
      const double tol = 5 * u * mag[static_cast<std::size_t>(i * n + j)] + 1e-30;
      if (!(std::fabs(got - w) <= tol) && bad++ < 5) {
        FAIL_CHECK(what << ": y(" << i << ", " << j << ") = " << got << ", want " << w << " (tolerance " << tol << ")");
      }
    }
  }
  CHECK_MESSAGE(bad == 0, what << ": " << bad << " elements off");
}

}  // namespace

TEST_CASE("int8_linear and dynamic_int8_linear against double from the same quantized values") {
  struct shape_case {
    index_t m, n, k;
  };
  const std::vector<shape_case> shapes = {{1, 1, 1}, {1, 40, 70}, {3, 17, 33}, {33, 65, 129}, {70, 100, 256}, {256, 256, 512}};
  for (const auto kk : kernels_here()) {
    const q::scoped_int8_kernel force(kk);
    std::uint32_t seed = 100;
    for (const auto& sh : shapes) {
      const index_t m = sh.m, n = sh.n, k = sh.k, ldx = k + 3, ldy = n + 2;
      std::mt19937 gen(seed++);
      std::normal_distribution<float> nd(0.0f, 1.0f);
      std::vector<float> wf(static_cast<std::size_t>(n * k)), x(static_cast<std::size_t>(m * ldx)), bias(n);
      for (auto& v : wf) v = 0.05f * nd(gen);
      for (auto& v : x) v = nd(gen) + 0.3f;
      for (auto& v : bias) v = nd(gen);
      const auto w = q::packed_int8_weight::quantize(wf.data(), n, k, k);
      for (const auto g : {q::granularity::per_tensor, q::granularity::per_row}) {
        for (const auto act : {activation::none, activation::relu}) {
          for (const bool with_bias : {false, true}) {
            const bool per_row = g == q::granularity::per_row;
            const std::string what = std::string(q::to_string(kk)) + " " + std::to_string(m) + "x" + std::to_string(n) +
                                     "x" + std::to_string(k) + (per_row ? " per row" : " per tensor") +
                                     (with_bias ? " bias" : "") + (act == activation::relu ? " relu" : "");
            const float* b = with_bias ? bias.data() : nullptr;
            // The quantized activations, through the (separately tested) quantize_dynamic_u8.
            std::vector<std::uint8_t> a(static_cast<std::size_t>(m * k));
            std::vector<float> sa(static_cast<std::size_t>(m));
            std::vector<std::int32_t> za(static_cast<std::size_t>(m));
            q::quantize_dynamic_u8(x.data(), m, k, ldx, g, a.data(), k, sa.data(), za.data());
            std::vector<double> mag;
            const auto want = linear_reference(a, m, k, w, sa.data(), za.data(), per_row, b, act, &mag);
            std::vector<float> y(static_cast<std::size_t>(m * ldy), -7.0f);
            q::int8_epilogue e;
            e.a_scale = sa.data();
            e.a_zero = za.data();
            e.g = g;
            e.bias = b;
            e.act = act;
            q::int8_linear(a.data(), m, k, w, y.data(), ldy, e);
            check_close(y, ldy, want, mag, m, n, "int8_linear " + what);
            // Symmetric activations (no zero point): the same call with a_zero null.
            {
              std::vector<double> mag0;
              const auto want0 = linear_reference(a, m, k, w, sa.data(), nullptr, per_row, b, act, &mag0);
              std::vector<float> y0(static_cast<std::size_t>(m * ldy), -7.0f);
              q::int8_epilogue e0 = e;
              e0.a_zero = nullptr;
              q::int8_linear(a.data(), m, k, w, y0.data(), ldy, e0);
              check_close(y0, ldy, want0, mag0, m, n, "int8_linear without zero point " + what);
            }
            std::vector<float> y2(static_cast<std::size_t>(m * ldy), -7.0f);
            q::dynamic_int8_linear(x.data(), m, ldx, w, y2.data(), ldy, b, act, g);
            check_close(y2, ldy, want, mag, m, n, "dynamic_int8_linear " + what);
            for (index_t i = 0; i < m; ++i) {
              for (index_t j = n; j < ldy; ++j) {
                CHECK(y[static_cast<std::size_t>(i * ldy + j)] == -7.0f);
                CHECK(y2[static_cast<std::size_t>(i * ldy + j)] == -7.0f);
              }
            }
          }
        }
      }
    }
  }
}

TEST_CASE("dynamic_int8_linear: the error against the fp32 product stays within the quantization bound") {
  // x = sa (a - za) + ex, |ex| <= sa / 2; w = sw q + ew, |ew| <= sw / 2. Then
  // |x·w - x̂·ŵ| <= Σ_k (|x̂_k| sw / 2 + |ŵ_k| sa / 2 + sa sw / 4), with |x̂| <= |x| + sa / 2, |ŵ| <= |w| + sw / 2.
  const index_t m = 48, n = 72, k = 300;
  std::mt19937 gen(21);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> wf(static_cast<std::size_t>(n * k)), x(static_cast<std::size_t>(m * k)), bias(n);
  for (auto& v : wf) v = 0.1f * u(gen);
  for (auto& v : x) v = 2.0f * u(gen) + 0.5f;
  for (auto& v : bias) v = u(gen);
  const auto w = q::packed_int8_weight::quantize(wf.data(), n, k, k);
  for (const auto g : {q::granularity::per_tensor, q::granularity::per_row}) {
    std::vector<float> y(static_cast<std::size_t>(m * n));
    q::dynamic_int8_linear(x.data(), m, k, w, y.data(), n, bias.data(), activation::none, g);
    std::vector<std::uint8_t> a(static_cast<std::size_t>(m * k));
    std::vector<float> sa(static_cast<std::size_t>(m));
    std::vector<std::int32_t> za(static_cast<std::size_t>(m));
    q::quantize_dynamic_u8(x.data(), m, k, k, g, a.data(), k, sa.data(), za.data());
    double worst = 0;
    for (index_t i = 0; i < m; ++i) {
      const double s_a = sa[static_cast<std::size_t>(g == q::granularity::per_row ? i : 0)];
      for (index_t j = 0; j < n; ++j) {
        const double s_w = w.scales()[static_cast<std::size_t>(j)];
        double exact = bias[static_cast<std::size_t>(j)], bound = 0;
        for (index_t p = 0; p < k; ++p) {
          const double xv = x[static_cast<std::size_t>(i * k + p)], wv = wf[static_cast<std::size_t>(j * k + p)];
          exact += xv * wv;
          bound += (std::fabs(xv) + s_a / 2) * s_w / 2 + (std::fabs(wv) + s_w / 2) * s_a / 2 + s_a * s_w / 4;
        }
        const double err = std::fabs(double(y[static_cast<std::size_t>(i * n + j)]) - exact);
        CHECK(err <= bound * (1 + 1e-5) + 1e-5);
        worst = std::max(worst, err / bound);
      }
    }
    // The bound is a worst case; random rounding errors stay well inside it.
    CHECK(worst < 0.5);
  }
}

TEST_CASE("dynamic_int8_linear: bad input") {
  std::vector<float> wf(12, 0.5f), x(20, 1.0f), y(20);
  const auto w = q::packed_int8_weight::quantize(wf.data(), 3, 4, 4);
  CHECK_THROWS_AS(q::dynamic_int8_linear(x.data(), 0, 4, w, y.data(), 3), trident::shape_error);
  CHECK_THROWS_AS(q::dynamic_int8_linear(x.data(), 2, 3, w, y.data(), 3), trident::shape_error);
  CHECK_THROWS_AS(q::dynamic_int8_linear(x.data(), 2, 4, w, y.data(), 2), trident::shape_error);
  CHECK_THROWS_AS(q::dynamic_int8_linear(x.data(), 2, 4, w, y.data(), 3, nullptr, activation::gelu), trident::error);
  for (const auto g : {q::granularity::per_tensor, q::granularity::per_row}) {
    x[6] = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH_AS(q::dynamic_int8_linear(x.data(), 2, 5, w, y.data(), 3, nullptr, activation::none, g),
                         "quantize 'activation': element 5 is NaN, which has no quantized value", q::quantization_error);
    x[6] = 1.0f;
  }
  q::int8_epilogue e;  // no a_scale
  std::vector<std::uint8_t> a(8, 1);
  CHECK_THROWS_AS(q::int8_linear(a.data(), 2, 4, w, y.data(), 3, e), trident::error);
}

TEST_CASE("tensor-view forms: packed_int8_weight::quantize and dynamic_int8_linear") {
  const index_t m = 5, n = 24, k = 40, ldx = 48;
  std::mt19937 gen(9);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto wt = trident::tensor<float>::uninitialized({n, k});
  auto bias = trident::tensor<float>::uninitialized({n});
  std::vector<float> xbuf(static_cast<std::size_t>(m * ldx));
  for (index_t i = 0; i < n * k; ++i) wt.data()[i] = nd(gen);
  for (index_t i = 0; i < n; ++i) bias.data()[i] = nd(gen);
  for (auto& v : xbuf) v = nd(gen);
  const auto w1 = q::packed_int8_weight::quantize(wt);
  const auto w2 = q::packed_int8_weight::quantize(wt.data(), n, k, k);
  for (index_t j = 0; j < n; ++j) {
    CHECK(w1.scales()[static_cast<std::size_t>(j)] == w2.scales()[static_cast<std::size_t>(j)]);
    for (index_t p = 0; p < k; ++p) REQUIRE(w1.value(j, p) == w2.value(j, p));
  }
  // x: a view with a row stride wider than its rows.
  const trident::tensor_view<const float> x(xbuf.data(), trident::layout(trident::shape{m, k}, trident::strides{ldx, 1}));
  auto y = trident::tensor<float>::uninitialized({m, n});
  std::vector<float> y2(static_cast<std::size_t>(m * n));
  for (const auto g : {q::granularity::per_tensor, q::granularity::per_row}) {
    q::dynamic_int8_linear(x, w1, y, bias, activation::relu, g);
    q::dynamic_int8_linear(xbuf.data(), m, ldx, w2, y2.data(), n, bias.data(), activation::relu, g);
    for (index_t i = 0; i < m * n; ++i) REQUIRE(y.data()[i] == y2[static_cast<std::size_t>(i)]);
  }
  auto y_bad = trident::tensor<float>::uninitialized({m, n + 1});
  CHECK_THROWS_AS(q::dynamic_int8_linear(x, w1, y_bad), trident::shape_error);
  auto b_bad = trident::tensor<float>::uninitialized({n - 1});
  CHECK_THROWS_AS(q::dynamic_int8_linear(x, w1, y, b_bad), trident::shape_error);
  const trident::tensor_view<const float> col_major(wt.data(), trident::layout(trident::shape{k, n}, trident::strides{1, k}));
  CHECK_THROWS_AS(q::packed_int8_weight::quantize(col_major), trident::shape_error);
}

TEST_CASE("quantize_static_u8: ONNX QuantizeLinear with given parameters, and its checks") {
  const index_t m = 3, k = 21, ldx = 25, ldq = 22;
  std::vector<float> x(static_cast<std::size_t>(m * ldx), 0.0f);
  std::mt19937 gen(4);
  std::uniform_real_distribution<float> u(-4.0f, 4.0f);
  for (auto& v : x) v = u(gen);
  x[0] = 0.075f;    // near the tie 2.5 of x / scale
  x[1] = 1e9f;      // saturates at 255
  x[2] = -1e9f;     // saturates at 0
  const float scale = 0.03f;
  const std::int32_t zero = 100;
  std::vector<std::uint8_t> qv(static_cast<std::size_t>(m * ldq), 9);
  q::quantize_static_u8(x.data(), m, k, ldx, scale, zero, qv.data(), ldq, "fc1 input");
  for (index_t i = 0; i < m; ++i) {
    check_quantized_row(&x[static_cast<std::size_t>(i * ldx)], k, scale, zero, &qv[static_cast<std::size_t>(i * ldq)],
                        "row " + std::to_string(i));
    CHECK(qv[static_cast<std::size_t>(i * ldq + k)] == 9);
  }
  CHECK(qv[1] == 255);
  CHECK(qv[2] == 0);
  CHECK_THROWS_AS(q::quantize_static_u8(x.data(), m, k, ldx, 0.0f, zero, qv.data(), ldq), q::quantization_error);
  CHECK_THROWS_AS(q::quantize_static_u8(x.data(), m, k, ldx, scale, 256, qv.data(), ldq), q::quantization_error);
  x[static_cast<std::size_t>(ldx + 3)] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(q::quantize_static_u8(x.data(), m, k, ldx, scale, zero, qv.data(), ldq, "fc1 input"),
                       "quantize 'fc1 input': element 24 is NaN, which has no quantized value", q::quantization_error);
}
