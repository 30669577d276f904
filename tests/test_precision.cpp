// half and bfloat16: hand-derived encodings, the rounding rules at their edges, limits and
// layout. The exhaustive agreement of every SIMD path with these references is in
// test_convert_exhaustive.cpp.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <type_traits>

#include <trident/precision/bfloat16.hpp>
#include <trident/precision/convert.hpp>
#include <trident/precision/half.hpp>
#include <trident/precision/policy.hpp>

using trident::bfloat16;
using trident::half;

namespace {
float from_bits(std::uint32_t u) { return std::bit_cast<float>(u); }
std::uint16_t hbits(float f) { return half(f).bits; }
std::uint16_t bbits(float f) { return bfloat16(f).bits; }
}  // namespace

TEST_CASE("half and bfloat16 are two-byte, trivially copyable, standard-layout types") {
  static_assert(sizeof(half) == 2 && alignof(half) == 2);
  static_assert(sizeof(bfloat16) == 2 && alignof(bfloat16) == 2);
  static_assert(std::is_trivially_copyable_v<half> && std::is_standard_layout_v<half>);
  static_assert(std::is_trivially_copyable_v<bfloat16> && std::is_standard_layout_v<bfloat16>);
  static_assert(std::is_trivially_default_constructible_v<half>);
  // Conversions are usable in constant expressions.
  static_assert(half(1.0f).bits == 0x3c00);
  static_assert(bfloat16(1.0f).bits == 0x3f80);
  CHECK(true);
}

TEST_CASE("float -> half: exact values, ties to even, overflow, subnormals, NaN") {
  // exactly representable
  CHECK(hbits(0.0f) == 0x0000);
  CHECK(hbits(-0.0f) == 0x8000);
  CHECK(hbits(1.0f) == 0x3c00);
  CHECK(hbits(-2.0f) == 0xc000);
  CHECK(hbits(0.5f) == 0x3800);
  CHECK(hbits(65504.0f) == 0x7bff);           // largest finite half
  CHECK(hbits(std::ldexp(1.0f, -14)) == 0x0400);  // smallest normal
  CHECK(hbits(std::ldexp(1.0f, -24)) == 0x0001);  // smallest subnormal
  CHECK(hbits(std::ldexp(1023.0f, -24)) == 0x03ff);
  // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to even (down to 1.0)
  CHECK(hbits(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);
  // 1 + 3*2^-11 is halfway between 1+2^-10 (odd) and 1+2^-9 (even): rounds up
  CHECK(hbits(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);
  // just above the halfway point rounds up
  CHECK(hbits(std::nextafter(1.0f + std::ldexp(1.0f, -11), 2.0f)) == 0x3c01);
  // overflow: 65519.99 rounds to 65504, 65520 (halfway to 2^16) ties to even -> inf
  CHECK(hbits(std::nextafter(65520.0f, 0.0f)) == 0x7bff);
  CHECK(hbits(65520.0f) == 0x7c00);
  CHECK(hbits(-1e10f) == 0xfc00);
  CHECK(hbits(std::numeric_limits<float>::infinity()) == 0x7c00);
  CHECK(hbits(-std::numeric_limits<float>::infinity()) == 0xfc00);
  // subnormal rounding: 2^-25 is halfway between 0 and 2^-24 -> even (0)
  CHECK(hbits(std::ldexp(1.0f, -25)) == 0x0000);
  CHECK(hbits(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 0x0001);
  CHECK(hbits(-std::ldexp(1.0f, -26)) == 0x8000);
  // 1.5 * 2^-24 is halfway between 1 and 2 units: ties to even (2)
  CHECK(hbits(std::ldexp(1.5f, -24)) == 0x0002);
  // the largest subnormal plus half a unit carries into the smallest normal
  CHECK(hbits(std::ldexp(1023.5f, -24)) == 0x0400);
  // float subnormals are far below half's range
  CHECK(hbits(from_bits(0x00000001)) == 0x0000);
  // NaN: quiet, sign and top payload kept
  CHECK(hbits(from_bits(0x7fc00000)) == 0x7e00);
  CHECK(hbits(from_bits(0xffc00000)) == 0xfe00);
  CHECK(hbits(from_bits(0x7f800001)) == 0x7e00);          // signalling, payload below the kept bits
  CHECK(hbits(from_bits(0x7fa02000)) == (0x7e00 | 0x101)); // payload bits 22..13 kept
  CHECK(trident::isnan(half(std::nanf(""))));
}

TEST_CASE("half -> float is exact for every encoding") {
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const half h = half::from_bits(static_cast<std::uint16_t>(b));
    const float f = h;
    const std::uint32_t exp = (b >> 10) & 0x1f, mant = b & 0x3ff;
    const double sign = (b & 0x8000) ? -1.0 : 1.0;
    if (exp == 0x1f) {
      if (mant == 0) {
        CHECK(f == static_cast<float>(sign * INFINITY));
      } else {
        CHECK(std::isnan(f));
        CHECK(((std::bit_cast<std::uint32_t>(f) >> 13) & 0x3ff) == (mant | 0x200));  // payload kept, quieted
      }
      continue;
    }
    // value = sign * mant * 2^-24 (subnormal) or sign * (1024 + mant) * 2^(exp-25)
    const double expected = exp == 0 ? sign * std::ldexp(static_cast<double>(mant), -24)
                                     : sign * std::ldexp(static_cast<double>(1024 + mant), static_cast<int>(exp) - 25);
    REQUIRE(static_cast<double>(f) == expected);
    CHECK(std::signbit(f) == ((b & 0x8000) != 0));
    // and the round trip is the identity
    CHECK(half(f).bits == b);
  }
}

TEST_CASE("float -> bfloat16: ties to even, carry into the exponent, overflow, subnormals, NaN") {
  CHECK(bbits(0.0f) == 0x0000);
  CHECK(bbits(-0.0f) == 0x8000);
  CHECK(bbits(1.0f) == 0x3f80);
  CHECK(bbits(-1.5f) == 0xbfc0);
  // 1 + 2^-8: halfway between 1 and 1 + 2^-7 -> even (1)
  CHECK(bbits(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);
  // 1 + 3*2^-8: halfway between 0x3f81 (odd) and 0x3f82 -> 0x3f82
  CHECK(bbits(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3f82);
  CHECK(bbits(std::nextafter(1.0f + std::ldexp(1.0f, -8), 2.0f)) == 0x3f81);
  // mantissa all ones rounds up into the next binade
  CHECK(bbits(from_bits(0x3fffffff)) == 0x4000);
  // the largest float rounds to infinity; the largest bfloat16 stays
  CHECK(bbits(std::numeric_limits<float>::max()) == 0x7f80);
  CHECK(bbits(from_bits(0x7f7f0000)) == 0x7f7f);
  CHECK(bbits(from_bits(0x7f7f7fff)) == 0x7f7f);
  CHECK(bbits(from_bits(0x7f7f8000)) == 0x7f80);  // tie, odd -> up -> inf
  CHECK(bbits(-std::numeric_limits<float>::infinity()) == 0xff80);
  // subnormals are rounded, not flushed
  CHECK(bbits(from_bits(0x00000001)) == 0x0000);
  CHECK(bbits(from_bits(0x00008000)) == 0x0000);  // tie -> even (0)
  CHECK(bbits(from_bits(0x00018000)) == 0x0002);  // tie -> even (2)
  CHECK(bbits(from_bits(0x00008001)) == 0x0001);
  CHECK(bbits(from_bits(0x807fffff)) == 0x8080);  // largest subnormal carries to the smallest normal
  // NaN: quiet bit set, sign and top payload kept; never turns into infinity
  CHECK(bbits(from_bits(0x7f800001)) == 0x7fc0);
  CHECK(bbits(from_bits(0xff812345)) == 0xffc1);
  CHECK(bbits(from_bits(0x7fffffff)) == 0x7fff);
  // bfloat16 -> float is the 16-bit shift
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const float f = bfloat16::from_bits(static_cast<std::uint16_t>(b));
    REQUIRE(std::bit_cast<std::uint32_t>(f) == (b << 16));
  }
}

TEST_CASE("numeric_limits of half and bfloat16 match their definitions") {
  using hl = std::numeric_limits<half>;
  using bl = std::numeric_limits<bfloat16>;
  CHECK(float(hl::max()) == 65504.0f);
  CHECK(float(hl::lowest()) == -65504.0f);
  CHECK(float(hl::min()) == std::ldexp(1.0f, -14));
  CHECK(float(hl::denorm_min()) == std::ldexp(1.0f, -24));
  CHECK(float(hl::epsilon()) == std::ldexp(1.0f, -10));
  CHECK(std::isinf(float(hl::infinity())));
  CHECK(std::isnan(float(hl::quiet_NaN())));
  CHECK(float(bl::max()) == from_bits(0x7f7f0000));
  CHECK(float(bl::min()) == std::numeric_limits<float>::min());
  CHECK(float(bl::epsilon()) == std::ldexp(1.0f, -7));
  CHECK(float(bl::denorm_min()) == from_bits(0x00010000));
  CHECK(std::isnan(float(bl::quiet_NaN())));
  // epsilon is the gap after 1
  CHECK(float(half::from_bits(0x3c01)) - 1.0f == float(hl::epsilon()));
  CHECK(float(bfloat16::from_bits(0x3f81)) - 1.0f == float(bl::epsilon()));
}

TEST_CASE("precision policies name the type of each role") {
  using namespace trident;
  static_assert(std::is_same_v<storage_t<fp32>, float> && std::is_same_v<master_t<fp32>, float>);
  static_assert(std::is_same_v<storage_t<bf16_mixed>, bfloat16> && std::is_same_v<gradient_t<bf16_mixed>, float>);
  static_assert(std::is_same_v<storage_t<fp16_mixed>, half> && std::is_same_v<gradient_t<fp16_mixed>, half>);
  static_assert(std::is_same_v<master_t<fp16_mixed>, float> && std::is_same_v<accumulate_t<bf16_mixed>, float>);
  static_assert(precision_traits<fp16_mixed>::loss_scaling && !precision_traits<bf16_mixed>::loss_scaling);
  static_assert(precision_policy<fp32> && precision_policy<bf16_mixed> && precision_policy<fp16_mixed>);
  static_assert(!precision_policy<float> && !precision_policy<int> && !precision_policy<half>);
  CHECK(std::string(precision_traits<bf16_mixed>::name) == "bf16_mixed");
}

TEST_CASE("bulk conversions handle any length and alignment") {
  using namespace trident;
  alignas(64) float in[67];
  for (int i = 0; i < 67; ++i) in[i] = std::ldexp(static_cast<float>(i * 37 - 1000), -7) + 0.001f * i;
  for (int offset = 0; offset < 3; ++offset) {
    for (int n : {0, 1, 7, 8, 15, 16, 17, 31, 33, 64}) {
      half h[70];
      bfloat16 b[70];
      float back[70];
      simd::convert(in + offset, h + offset, static_cast<std::size_t>(n));
      simd::convert(in + offset, b + offset, static_cast<std::size_t>(n));
      for (int i = 0; i < n; ++i) {
        REQUIRE(h[offset + i].bits == half(in[offset + i]).bits);
        REQUIRE(b[offset + i].bits == bfloat16(in[offset + i]).bits);
      }
      simd::convert(h + offset, back, static_cast<std::size_t>(n));
      for (int i = 0; i < n; ++i) REQUIRE(back[i] == float(h[offset + i]));
      simd::convert(b + offset, back, static_cast<std::size_t>(n));
      for (int i = 0; i < n; ++i) REQUIRE(back[i] == float(b[offset + i]));
    }
  }
}
