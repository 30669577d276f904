// Weight-only quantization: group-wise int8/int4 formats against a reference written from the
// ONNX QuantizeLinear definition, the dequantised view, the dequantising GEMM against a double
// GEMM of the dequantised weights, and the on-disk container.

#include <doctest/doctest.h>

#include <atomic>
#include <cfenv>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <new>
#include <unistd.h>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "trident/quant/weight_only.hpp"

using namespace trident;
using quant::int4_t;

// Every allocation of this test binary is counted, so that a test can show that a piece of
// code allocates nothing.
namespace {
std::atomic<long> g_allocations{0};
}  // namespace

// The replacements pair malloc with free; GCC 12 cannot see that and warns (-Wmismatched-new-delete).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void* operator new(std::size_t n) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace {

std::vector<float> random_weights(index_t n, std::uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = d(gen);
  return v;
}

// ONNX QuantizeLinear written out independently: the quotient x / scale in float (ONNX's
// reference computes it in float32), rounded to nearest with ties to even (nearbyint under the
// default rounding mode, in double), saturated to [lo, hi].
int onnx_reference(float x, float scale, int lo, int hi) {
  REQUIRE(std::fegetround() == FE_TONEAREST);
  const double r = std::nearbyint(static_cast<double>(x / scale));
  return static_cast<int>(std::clamp(r, static_cast<double>(lo), static_cast<double>(hi)));
}

// The reference quantization of W (out x in, row stride ldw) per the format's definition.
struct reference_quant {
  std::vector<int> q;         // out x in
  std::vector<float> scales;  // out x in/group
};
reference_quant reference_quantize(const std::vector<float>& w, index_t out, index_t in, index_t ldw, index_t group,
                                   int qmax, int lo, int hi) {
  reference_quant r;
  r.q.resize(static_cast<std::size_t>(out * in));
  for (index_t j = 0; j < out; ++j) {
    for (index_t g0 = 0; g0 < in; g0 += group) {
      double amax = 0.0;
      for (index_t k = g0; k < g0 + group; ++k) amax = std::max(amax, std::fabs(static_cast<double>(w[j * ldw + k])));
      const float scale = amax == 0.0 ? 1.0f : static_cast<float>(amax) / static_cast<float>(qmax);
      r.scales.push_back(scale);
      for (index_t k = g0; k < g0 + group; ++k) r.q[j * in + k] = onnx_reference(w[j * ldw + k], scale, lo, hi);
    }
  }
  return r;
}

template <class Q>
void check_against_reference(index_t out, index_t in, index_t ldw, index_t group, std::uint32_t seed) {
  constexpr bool four = std::is_same_v<Q, int4_t>;
  const auto w = random_weights(out * ldw, seed, -3.0f, 3.0f);
  const auto qw = quant::groupwise_weight<Q>::quantize(w.data(), out, in, ldw, group);
  const auto ref = reference_quantize(w, out, in, ldw, group, four ? 7 : 127, four ? -8 : -128, four ? 7 : 127);
  REQUIRE(qw.out() == out);
  REQUIRE(qw.in() == in);
  REQUIRE(qw.group() == group);
  REQUIRE(qw.scales().size() == ref.scales.size());
  REQUIRE(qw.data().size() == static_cast<std::size_t>(four ? out * in / 2 : out * in));
  CHECK(qw.bytes() == qw.data().size() + 4 * ref.scales.size());
  int scale_mismatch = 0, value_mismatch = 0, byte_mismatch = 0;
  for (std::size_t i = 0; i < ref.scales.size(); ++i) scale_mismatch += qw.scales()[i] != ref.scales[i];
  for (index_t j = 0; j < out; ++j) {
    for (index_t k = 0; k < in; ++k) {
      const int q = ref.q[j * in + k];
      value_mismatch += qw.value(j, k) != q;
      // The raw bytes: int8 two's complement; int4 the first of a pair in the low nibble.
      const std::uint8_t byte = qw.data()[static_cast<std::size_t>(four ? j * in / 2 + k / 2 : j * in + k)];
      const int stored = four ? ((k % 2 == 0 ? byte & 0xF : byte >> 4) ^ 8) - 8 : static_cast<int>(static_cast<std::int8_t>(byte));
      byte_mismatch += stored != q;
    }
  }
  CHECK(scale_mismatch == 0);
  CHECK(value_mismatch == 0);
  CHECK(byte_mismatch == 0);
}

}  // namespace

TEST_CASE("groupwise_weight: quantize matches the ONNX reference for int8 and int4, several groups") {
  check_against_reference<std::int8_t>(37, 256, 256, 32, 1);
  check_against_reference<std::int8_t>(5, 384, 400, 128, 2);  // row stride > in
  check_against_reference<std::int8_t>(4, 12, 12, 3, 3);      // any divisor of in
  check_against_reference<std::int8_t>(3, 7, 7, 7, 4);
  check_against_reference<int4_t>(37, 256, 256, 32, 5);
  check_against_reference<int4_t>(5, 384, 390, 128, 6);
  check_against_reference<int4_t>(4, 12, 12, 3, 7);  // groups that split a byte
}

TEST_CASE("groupwise_weight: ties to even, the scale, all-zero groups, hand-derived") {
  SUBCASE("int8: a group whose max is 127 has scale 1; halves round to even") {
    const std::vector<float> w = {127, 2.5f, 3.5f, -2.5f, -3.5f, 0.5f, 1.5f, -0.5f,  // group 0: scale 1
                                  0, 0, 0, 0, 0, 0, 0, 0,                            // group 1: all zero
                                  -254, 1, -1, 3, 127, 128, -129, 0.999f};           // group 2: scale 2
    const auto q = quant::groupwise_weight<std::int8_t>::quantize(w.data(), 1, 24, 24, 8);
    const std::vector<int> expected = {127, 2, 4, -2, -4, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                       -127, 0, 0, 2, 64, 64, -64, 0};  // 1/2 -> 0, 3/2 -> 2, 127/2 -> 64, 128/2 = 64, -129/2 -> -64
    for (index_t k = 0; k < 24; ++k) CHECK_MESSAGE(q.value(0, k) == expected[k], "k = " << k);
    CHECK(q.scales()[0] == 1.0f);
    CHECK(q.scales()[1] == 1.0f);  // all zero
    CHECK(q.scales()[2] == 2.0f);
  }
  SUBCASE("int4: scale max/7, ties to even, and the nibble order of the packed bytes") {
    const std::vector<float> w = {7, 0.5f, 1.5f, 2.5f, -6.5f, -7, 6.5f, -0.5f};
    const auto q = quant::groupwise_weight<int4_t>::quantize(w.data(), 1, 8, 8, 8);
    const std::vector<int> expected = {7, 0, 2, 2, -6, -7, 6, 0};
    for (index_t k = 0; k < 8; ++k) CHECK_MESSAGE(q.value(0, k) == expected[k], "k = " << k);
    REQUIRE(q.data().size() == 4);
    CHECK(q.data()[0] == 0x07);  // (7, 0): first in the low nibble
    CHECK(q.data()[1] == 0x22);  // (2, 2)
    CHECK(q.data()[2] == 0x9A);  // (-6 = 0xA, -7 = 0x9)
    CHECK(q.data()[3] == 0x06);  // (6, 0)
  }
  SUBCASE("int4 values stay in [-8, 7] and the extreme of each group maps to +-7") {
    const auto w = random_weights(16 * 64, 11, -5.0f, 5.0f);
    const auto q = quant::groupwise_weight<int4_t>::quantize(w.data(), 16, 64, 64, 32);
    for (index_t j = 0; j < 16; ++j) {
      for (index_t g = 0; g < 2; ++g) {
        int extreme = 0;
        for (index_t k = g * 32; k < g * 32 + 32; ++k) {
          CHECK(q.value(j, k) >= -8);
          CHECK(q.value(j, k) <= 7);
          extreme = std::max(extreme, std::abs(q.value(j, k)));
        }
        CHECK(extreme == 7);
      }
    }
  }
  SUBCASE("saturation: from_packed keeps -8, the int4 minimum, and int8's -128") {
    auto q4 = quant::groupwise_weight<int4_t>::from_packed({0x87}, {0.5f}, 1, 2, 2);
    CHECK(q4.value(0, 0) == 7);
    CHECK(q4.value(0, 1) == -8);
    CHECK(q4.dequantized()(0, 1) == -4.0f);
    auto q8 = quant::groupwise_weight<std::int8_t>::from_packed({0x80, 0x7F}, {0.25f}, 1, 2, 2);
    CHECK(q8.value(0, 0) == -128);
    CHECK(q8.value(0, 1) == 127);
    CHECK(q8.dequantized()(0, 0) == -32.0f);
  }
}

TEST_CASE("groupwise_weight: NaN, infinity and bad shapes are rejected with their names") {
  auto w = random_weights(4 * 64, 3);
  w[2 * 64 + 5] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(quant::groupwise_weight<std::int8_t>::quantize(w.data(), 4, 64, 64, 32, "fc.weight"),
                       doctest::Contains("'fc.weight': element (2, 5) is NaN"), quant::quantization_error);
  w[2 * 64 + 5] = 0.0f;
  w[3 * 64 + 63] = -std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH_AS(quant::groupwise_weight<int4_t>::quantize(w.data(), 4, 64, 64, 32, "fc.weight"),
                       doctest::Contains("element (3, 63) is infinite"), quant::quantization_error);
  w[3 * 64 + 63] = 0.0f;
  CHECK_THROWS_WITH_AS(quant::groupwise_weight<std::int8_t>::quantize(w.data(), 4, 64, 64, 48),
                       doctest::Contains("in 64 is not a multiple of group 48"), shape_error);
  CHECK_THROWS_WITH_AS(quant::groupwise_weight<int4_t>::quantize(w.data(), 4, 63, 64, 7),
                       doctest::Contains("in 63 must be even"), shape_error);
  CHECK_THROWS_WITH_AS(quant::groupwise_weight<std::int8_t>::quantize(w.data(), 4, 64, 32, 32),
                       doctest::Contains("row stride 32 is smaller than in 64"), shape_error);
  CHECK_THROWS_AS(quant::groupwise_weight<std::int8_t>::quantize(w.data(), 4, 64, 64, 0), shape_error);
  CHECK_THROWS_WITH_AS(quant::groupwise_weight<std::int8_t>::from_packed(std::vector<std::uint8_t>(10), {1.0f}, 1, 12, 12),
                       doctest::Contains("10 bytes of values"), shape_error);
  CHECK_THROWS_WITH_AS(quant::groupwise_weight<int4_t>::from_packed(std::vector<std::uint8_t>(6), {1.0f, 0.0f}, 1, 12, 6),
                       doctest::Contains("scale 1 is 0"), quant::quantization_error);
}

TEST_CASE("dequantized(): a view whose every element is value * scale, allocating nothing") {
  const index_t out = 9, in = 96;
  const auto w = random_weights(out * in, 21);
  const auto q8 = quant::groupwise_weight<std::int8_t>::quantize(w.data(), out, in, in, 32);
  const auto q4 = quant::groupwise_weight<int4_t>::quantize(w.data(), out, in, in, 32);
  const auto before = g_allocations.load();
  const auto d8 = q8.dequantized();
  const auto d4 = q4.dequantized();
  const auto copy4 = d4;  // a copy of the view is another view
  int wrong = 0;
  for (index_t j = 0; j < out; ++j) {
    for (index_t k = 0; k < in; ++k) {
      // value * scale in float is the correctly rounded product: the double product rounded.
      wrong += d8(j, k) != static_cast<float>(static_cast<double>(q8.value(j, k)) * q8.scales()[j * 3 + k / 32]);
      wrong += d4(j, k) != static_cast<float>(static_cast<double>(q4.value(j, k)) * q4.scales()[j * 3 + k / 32]);
      wrong += copy4(j, k) != d4(j, k);
      // dequantisation stays close to the weight: within half a step
      wrong += std::fabs(d8(j, k) - w[j * in + k]) > 0.5f * q8.scales()[j * 3 + k / 32] * 1.0001f;
    }
  }
  const auto after = g_allocations.load();
  CHECK(wrong == 0);
  CHECK(after == before);
  CHECK(d8.extent(0) == out);
  CHECK(d8.extent(1) == in);
  CHECK(d4.size() == out * in);
  CHECK(d8.data_handle().values == q8.data().data());  // it reads the packed bytes in place
  CHECK(d4.data_handle().values == q4.data().data());
  CHECK(d4.data_handle().scales == q4.scales().data());
  static_assert(std::is_trivially_copyable_v<quant::dequantized_view<int4_t>>);
  // The accessor policy on its own: offset() moves values and scales to a row or group start.
  const auto& acc = d4.accessor();
  CHECK(acc.access(acc.offset(d4.data_handle(), 2 * in), 5) == d4(2, 5));
  CHECK(acc.access(acc.offset(d4.data_handle(), 2 * in + 64), 3) == d4(2, 67));
  const auto tail = d8.slice_rows(4, 9);
  CHECK(tail.rows() == 5);
  CHECK(tail(1, 40) == d8(5, 40));
}

namespace {

// y = act(x W^T + bias) in double with W the dequantised weights: value * scale exactly.
template <class Q>
std::vector<double> reference_linear(const std::vector<float>& x, index_t m, index_t ldx,
                                     const quant::groupwise_weight<Q>& w, const float* bias, activation act,
                                     std::vector<double>* abs_sum) {
  const index_t n = w.out(), k = w.in();
  std::vector<double> y(static_cast<std::size_t>(m * n));
  abs_sum->assign(y.size(), 0.0);
  for (index_t i = 0; i < m; ++i) {
    for (index_t j = 0; j < n; ++j) {
      double s = 0.0, a = 0.0;
      for (index_t p = 0; p < k; ++p) {
        const double wjp = static_cast<double>(w.value(j, p)) * static_cast<double>(w.scales()[j * (k / w.group()) + p / w.group()]);
        s += static_cast<double>(x[i * ldx + p]) * wjp;
        a += std::fabs(static_cast<double>(x[i * ldx + p]) * wjp);
      }
      if (bias != nullptr) s += bias[j];
      if (act == activation::relu) s = std::max(s, 0.0);
      y[i * n + j] = s;
      (*abs_sum)[i * n + j] = a + (bias != nullptr ? std::fabs(bias[j]) : 0.0);
    }
  }
  return y;
}

// Runs y = act(x W^T + bias) through the public entry (path < 0) or one path explicitly:
// 0 direct, 1 blocked, 2 blocked transposed, 3 streamed, on `threads` threads.
template <class Q>
void run_linear(int path, int threads, const float* x, index_t m, index_t ldx, const quant::groupwise_weight<Q>& w,
                float* y, index_t ldy, const float* bias, activation act) {
  namespace wp = cpu_kernels::weight_only_paths;
  const cpu_kernels::gemm_epilogue ep{bias, act};
  switch (path) {
    case 0: wp::direct(x, m, ldx, w.kernel_view(), y, ldy, ep, threads); break;
    case 1: wp::blocked(x, m, ldx, w.kernel_view(), y, ldy, ep, threads); break;
    case 2: wp::blocked_transposed(x, m, ldx, w.kernel_view(), y, ldy, ep, threads); break;
    case 3: wp::streamed(x, m, ldx, w.kernel_view(), y, ldy, ep, threads); break;
    default: quant::weight_only_linear(x, m, ldx, w, y, ldy, bias, act); break;
  }
}

template <class Q>
void check_linear(index_t m, index_t n, index_t k, index_t group, bool with_bias, activation act, std::uint32_t seed,
                  int path = -1, int threads = 1) {
  CAPTURE(path);
  CAPTURE(threads);
  CAPTURE(m);
  CAPTURE(n);
  CAPTURE(k);
  CAPTURE(group);
  CAPTURE(with_bias);
  const auto wf = random_weights(n * k, seed, -0.5f, 0.5f);
  const auto w = quant::groupwise_weight<Q>::quantize(wf.data(), n, k, k, group);
  const index_t ldx = k + 3, ldy = n + 5;
  const auto x = random_weights(m * ldx, seed + 1);
  const auto bias = random_weights(n, seed + 2);
  const float sentinel = 12345.0f;
  std::vector<float> y(static_cast<std::size_t>(m * ldy), sentinel);
  run_linear(path, threads, x.data(), m, ldx, w, y.data(), ldy, with_bias ? bias.data() : nullptr, act);
  std::vector<double> abs_sum;
  const auto ref = reference_linear(x, m, ldx, w, with_bias ? bias.data() : nullptr, act, &abs_sum);
  int bad = 0, padding = 0;
  double worst = 0.0;
  for (index_t i = 0; i < m; ++i) {
    for (index_t j = 0; j < ldy; ++j) {
      if (j >= n) {
        padding += y[i * ldy + j] != sentinel;
        continue;
      }
      // fp32 accumulation of k products: a few ulps of the sum of magnitudes.
      const double err = std::fabs(y[i * ldy + j] - ref[i * n + j]);
      const double tol = 1e-6 * abs_sum[i * n + j] + 1e-30;
      worst = std::max(worst, err / tol);
      bad += err > tol;
    }
  }
  CHECK_MESSAGE(bad == 0, "worst error / tolerance " << worst);
  CHECK(padding == 0);
}

}  // namespace

TEST_CASE("weight_only_linear matches a double GEMM of the dequantised weights") {
  const activation none = activation::none, relu = activation::relu;
  SUBCASE("int8") {
    check_linear<std::int8_t>(1, 96, 256, 32, true, none, 100);
    check_linear<std::int8_t>(7, 130, 256, 128, true, relu, 101);
    check_linear<std::int8_t>(16, 64, 384, 128, false, none, 102);
    check_linear<std::int8_t>(17, 100, 256, 32, true, relu, 103);   // blocked path, odd m, narrow tile
    check_linear<std::int8_t>(65, 256, 640, 32, true, none, 104);   // several K blocks, wide tile
    check_linear<std::int8_t>(33, 50, 72, 24, true, relu, 105);     // a group that is no multiple of 16
    check_linear<std::int8_t>(3, 50, 72, 24, false, relu, 106);
  }
  SUBCASE("int4") {
    check_linear<int4_t>(1, 96, 256, 32, true, none, 200);
    check_linear<int4_t>(5, 130, 256, 128, true, relu, 201);
    check_linear<int4_t>(16, 64, 384, 128, false, none, 202);
    check_linear<int4_t>(19, 100, 256, 32, true, relu, 203);
    check_linear<int4_t>(129, 192, 640, 128, true, relu, 204);
    check_linear<int4_t>(33, 50, 72, 24, true, none, 205);
    check_linear<int4_t>(2, 50, 72, 6, false, none, 206);
  }
  SUBCASE("through the public entry's thresholds: the last direct m and the first blocked one") {
    check_linear<std::int8_t>(32, 70, 128, 32, true, relu, 107);   // direct
    check_linear<int4_t>(33, 70, 128, 32, true, relu, 207);        // streamed
    check_linear<int4_t>(257, 96, 256, 128, true, relu, 208);      // blocked
    check_linear<std::int8_t>(256, 520, 4160, 32, false, none, 108);  // blocked (m k > 2^20), transposed when threaded
  }
  SUBCASE("m = 0 writes nothing; bad strides are rejected") {
    const auto wf = random_weights(8 * 32, 7);
    const auto w = quant::groupwise_weight<std::int8_t>::quantize(wf.data(), 8, 32, 32, 32);
    quant::weight_only_linear<std::int8_t>(nullptr, 0, 32, w, nullptr, 8);
    std::vector<float> x(64), y(16);
    CHECK_THROWS_WITH_AS(quant::weight_only_linear(x.data(), 2, 16, w, y.data(), 8),
                         doctest::Contains("x's row stride 16 is smaller than the weights' in 32"), shape_error);
    CHECK_THROWS_WITH_AS(quant::weight_only_linear(x.data(), 2, 32, w, y.data(), 4),
                         doctest::Contains("y's row stride 4 is smaller than the weights' out 8"), shape_error);
  }
}

TEST_CASE("weight_only_linear: every path (direct, blocked, blocked transposed, streamed) on 1 and 2 threads") {
  for (int threads : {1, 2}) {
    for (int path : {0, 1, 2, 3}) {
      check_linear<std::int8_t>(5, 70, 256, 32, true, activation::relu, 300, path, threads);
      check_linear<std::int8_t>(64, 130, 512, 128, true, activation::none, 301, path, threads);
      check_linear<int4_t>(3, 70, 256, 128, true, activation::relu, 302, path, threads);
      check_linear<int4_t>(96, 200, 640, 32, false, activation::relu, 303, path, threads);
      check_linear<int4_t>(9, 30, 60, 12, true, activation::none, 304, path, threads);  // group not a multiple of 16
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The on-disk container (quant/storage.hpp).

#include <filesystem>
#include <fstream>
#include <iterator>

#include "trident/quant/storage.hpp"

namespace {

std::filesystem::path temp_file(const std::string& stem) {
  return std::filesystem::temp_directory_path() /
         ("trident_wo_" + stem + "_" + std::to_string(static_cast<long>(::getpid())) + ".tqw");
}

std::string read_all(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void write_all(const std::filesystem::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// An independent writer of the documented format, for files the library would never write.
struct file_writer {
  std::string body;
  template <class T>
  void put(T v) {
    body.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  void entry(std::uint32_t format, const std::string& name, std::uint64_t out, std::uint64_t in, std::uint64_t group,
             std::uint64_t value_bytes, std::uint64_t scales) {
    put(format);
    put(static_cast<std::uint32_t>(name.size()));
    body += name;
    put(out);
    put(in);
    put(group);
    put(value_bytes);
    put(scales);
    body.append(static_cast<std::size_t>(value_bytes), '\x01');
    for (std::uint64_t i = 0; i < scales; ++i) put(0.5f);
  }
  std::string file(std::uint32_t entries, std::uint32_t version = 1) const {
    std::string f = "TRDNTQW\n";
    auto put_to = [&](auto v) { f.append(reinterpret_cast<const char*>(&v), sizeof v); };
    put_to(version);
    put_to(entries);
    put_to(static_cast<std::uint64_t>(32 + body.size()));
    std::uint64_t h = 14695981039346656037ull;  // FNV-1a 64 of the body
    for (unsigned char c : body) h = (h ^ c) * 1099511628211ull;
    put_to(h);
    return f + body;
  }
};

}  // namespace

TEST_CASE("quant::save / quant::load: a round trip is exact, for every format") {
  const auto w1 = random_weights(37 * 64, 31);
  const auto w2 = random_weights(5 * 256, 32);
  const auto w3 = random_weights(7 * 48, 33);
  const auto w4 = random_weights(4 * 12, 34);
  std::vector<quant::weight_entry> entries;
  entries.push_back({"blocks.0.fc1.weight", quant::groupwise_weight<std::int8_t>::quantize(w1.data(), 37, 64, 64, 32)});
  entries.push_back({"blocks.0.fc2.weight", quant::groupwise_weight<int4_t>::quantize(w2.data(), 5, 256, 256, 128)});
  entries.push_back({"head", quant::packed_int8_weight::quantize(w3.data(), 7, 48, 48)});
  entries.push_back({"", quant::groupwise_weight<int4_t>::quantize(w4.data(), 4, 12, 12, 3)});
  const auto path = temp_file("roundtrip");
  quant::save(path, entries);
  CHECK_FALSE(std::filesystem::exists(path.string() + ".tmp"));
  const auto loaded = quant::load(path);
  REQUIRE(loaded.size() == entries.size());
  for (std::size_t e = 0; e < entries.size(); ++e) {
    CAPTURE(e);
    CHECK(loaded[e].name == entries[e].name);
    REQUIRE(loaded[e].weight.index() == entries[e].weight.index());
    std::visit(
        [&](const auto& a) {
          using W = std::decay_t<decltype(a)>;
          const W& b = std::get<W>(loaded[e].weight);
          CHECK(b.out() == a.out());
          CHECK(b.in() == a.in());
          REQUIRE(b.scales().size() == a.scales().size());
          CHECK(std::memcmp(b.scales().data(), a.scales().data(), a.scales().size() * 4) == 0);
          int diff = 0;
          for (index_t j = 0; j < a.out(); ++j) {
            for (index_t k = 0; k < a.in(); ++k) diff += a.value(j, k) != b.value(j, k);
          }
          CHECK(diff == 0);
          if constexpr (!std::is_same_v<W, quant::packed_int8_weight>) {
            CHECK(b.group() == a.group());
            CHECK(std::vector<std::uint8_t>(b.data().begin(), b.data().end()) ==
                  std::vector<std::uint8_t>(a.data().begin(), a.data().end()));
          }
        },
        entries[e].weight);
  }
  // A loaded weight computes exactly what the saved one did.
  const auto& a = quant::get<quant::groupwise_weight<int4_t>>(entries, "blocks.0.fc2.weight");
  const auto& b = quant::get<quant::groupwise_weight<int4_t>>(loaded, "blocks.0.fc2.weight");
  const auto x = random_weights(3 * 256, 35);
  std::vector<float> ya(15), yb(15);
  quant::weight_only_linear(x.data(), 3, 256, a, ya.data(), 5);
  quant::weight_only_linear(x.data(), 3, 256, b, yb.data(), 5);
  CHECK(ya == yb);
  CHECK_THROWS_WITH_AS(quant::get<quant::groupwise_weight<std::int8_t>>(loaded, "head"),
                       doctest::Contains("'head' is stored as int8 per-channel"), error);
  CHECK_THROWS_WITH_AS(quant::get<quant::packed_int8_weight>(loaded, "tail"), doctest::Contains("no weight named 'tail'"),
                       error);
  // Saving again replaces the file whole.
  entries.pop_back();
  quant::save(path, entries);
  CHECK(quant::load(path).size() == 3);
  std::filesystem::remove(path);
  // Duplicate names and an unwritable place are refused, naming the file.
  entries.push_back({"head", quant::packed_int8_weight::quantize(w3.data(), 7, 48, 48)});
  CHECK_THROWS_WITH_AS(quant::save(path, entries), doctest::Contains("two entries are named 'head'"), error);
  entries.pop_back();
  CHECK_THROWS_WITH_AS(quant::save("/nonexistent-dir/x.tqw", entries), doctest::Contains("/nonexistent-dir/x.tqw.tmp"), error);
  CHECK_THROWS_WITH_AS(quant::load("/nonexistent-dir/x.tqw"), doctest::Contains("cannot open '/nonexistent-dir/x.tqw'"),
                       error);
}

TEST_CASE("quant::load rejects truncated, foreign, future, corrupt and inconsistent files") {
  const auto w = random_weights(16 * 64, 41);
  std::vector<quant::weight_entry> entries;
  entries.push_back({"fc", quant::groupwise_weight<int4_t>::quantize(w.data(), 16, 64, 64, 32)});
  const auto path = temp_file("bad");
  quant::save(path, entries);
  const std::string good = read_all(path);
  const std::string name = path.string();
  auto load_error = [&](const std::string& bytes) -> std::string {
    write_all(path, bytes);
    try {
      quant::load(path);
    } catch (const error& e) {
      return e.what();
    }
    return "(no error)";
  };
  auto has = [](const std::string& msg, const std::string& what) {
    INFO(msg);
    CHECK(msg.find(what) != std::string::npos);
  };
  SUBCASE("truncated") {
    for (std::size_t keep : {good.size() - 1, good.size() / 2, std::size_t(40), std::size_t(32)}) {
      const auto msg = load_error(good.substr(0, keep));
      has(msg, "'" + name + "'");
      has(msg, "truncated: " + std::to_string(keep) + " bytes, the header says " + std::to_string(good.size()));
    }
    has(load_error(good.substr(0, 20)), "truncated while reading the file size");
    has(load_error(good + "xx"), "2 bytes after the end the header gives");
  }
  SUBCASE("wrong magic") {
    std::string bad = good;
    bad[3] = 'X';
    has(load_error(bad), "not a trident quantized-weights file (bad magic)");
    has(load_error(""), "bad magic");
    has(load_error(read_all(path).substr(0, 0) + "TRDNTW01"), "bad magic");  // the fp32 weights file's magic
  }
  SUBCASE("wrong version") {
    std::string bad = good;
    bad[8] = 2;
    has(load_error(bad), "version 2 is not supported (this build reads version 1)");
  }
  SUBCASE("corrupt values") {
    std::string bad = good;
    bad[bad.size() - 70] ^= 0x10;
    has(load_error(bad), "corrupt (hash mismatch)");
  }
  SUBCASE("bad dims and inconsistent counts") {
    file_writer f;
    f.entry(3, "fc", 4, 64, 48, 128, 4);
    has(load_error(f.file(1)), "entry 0 'fc' (int4 group-wise) has bad dims: out 4, in 64, group 48 (in is not a multiple");
    f = {};
    f.entry(2, "fc", 0, 64, 32, 0, 0);
    has(load_error(f.file(1)), "has bad dims: out 0, in 64, group 32");
    f = {};
    f.entry(3, "odd", 2, 9, 3, 9, 6);
    has(load_error(f.file(1)), "int4 rows need an even in");
    f = {};
    f.entry(1, "pc", 4, 64, 32, 256, 8);
    has(load_error(f.file(1)), "a per-channel weight has one group per row");
    f = {};
    f.entry(2, "fc", 4, 64, 32, 200, 8);
    has(load_error(f.file(1)), "holds 200 value bytes, its dims (out 4, in 64, group 32) take 256");
    f = {};
    f.entry(3, "fc", 4, 64, 32, 128, 7);
    has(load_error(f.file(1)), "holds 7 scales, its dims (out 4, in 64, group 32) take 8");
    f = {};
    f.entry(9, "fc", 4, 64, 32, 128, 8);
    has(load_error(f.file(1)), "entry 0 has an unknown format 9");
    f = {};
    f.entry(2, "a", 2, 32, 32, 64, 2);
    f.entry(2, "a", 2, 32, 32, 64, 2);
    has(load_error(f.file(2)), "the name 'a' appears twice");
    f = {};
    f.entry(2, "a", 2, 32, 32, 64, 2);
    f.entry(2, "b", 2, 32, 32, 64, 2);
    has(load_error(f.file(3)), "truncated while reading entry 2's format");
    has(load_error(f.file(1)), "121 bytes left over after 1 entries");  // 4 + 4 + 1 + 5 * 8 + 64 + 2 * 4
    // A well-formed file from the independent writer loads, with its values.
    f = {};
    f.entry(3, "ok", 2, 32, 16, 32, 4);
    write_all(path, f.file(1));
    const auto ok = quant::load(path);
    const auto& w4 = quant::get<quant::groupwise_weight<int4_t>>(ok, "ok");
    CHECK(w4.value(1, 30) == 1);  // byte 0x01: low nibble 1, high nibble 0
    CHECK(w4.value(1, 31) == 0);
    CHECK(w4.dequantized()(1, 30) == 0.5f);
  }
  std::filesystem::remove(path);
}

TEST_CASE("quant::save: a 1024 x 1024 layer takes within 5% of its ideal size on disk") {
  const index_t n = 1024;
  const auto w = random_weights(n * n, 51);
  struct layout {
    quant::stored_weight weight;
    double ideal;  // values at 8 or 4 bits + one fp32 scale per group
  };
  std::vector<layout> cases;
  cases.push_back({quant::packed_int8_weight::quantize(w.data(), n, n, n), n * n + 4.0 * n});
  cases.push_back({quant::groupwise_weight<std::int8_t>::quantize(w.data(), n, n, n, 32), n * n + 4.0 * n * n / 32});
  cases.push_back({quant::groupwise_weight<std::int8_t>::quantize(w.data(), n, n, n, 128), n * n + 4.0 * n * n / 128});
  cases.push_back({quant::groupwise_weight<int4_t>::quantize(w.data(), n, n, n, 32), n * n / 2 + 4.0 * n * n / 32});
  cases.push_back({quant::groupwise_weight<int4_t>::quantize(w.data(), n, n, n, 128), n * n / 2 + 4.0 * n * n / 128});
  const auto path = temp_file("size");
  for (auto& c : cases) {
    CAPTURE(c.weight.index());
    CHECK(static_cast<double>(quant::ideal_bytes(c.weight)) == c.ideal);
    quant::save(path, {{"layer", std::move(c.weight)}});
    const auto size = static_cast<double>(std::filesystem::file_size(path));
    CHECK(size >= c.ideal);
    CHECK(size <= 1.05 * c.ideal);
    CHECK(size - c.ideal < 128);  // in fact only the header and the entry's fields
  }
  std::filesystem::remove(path);
}
