#pragma once
/// @file bfloat16.hpp
/// bfloat16 (the top 16 bits of an IEEE binary32): our own 2-byte type, identical in layout
/// under g++ and nvcc. Conversion from float rounds to nearest, ties to even; NaN stays NaN
/// (quieted, sign and top payload bits kept, as VCVTNEPS2BF16 does), overflow goes to
/// infinity and subnormals are rounded exactly. Arithmetic is done in float.

#include <cstdint>
#include <limits>

#include "bits.hpp"

namespace trident {

namespace detail {

/// Reference float -> bfloat16 conversion (round to nearest even).
TRIDENT_HD constexpr std::uint16_t float_to_bfloat16_bits(float f) noexcept {
  const std::uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: truncate and set the quiet bit
    return static_cast<std::uint16_t>((u >> 16) | 0x0040u);
  }
  // Adding 0x7fff plus the lowest kept bit rounds to nearest even; a carry out of the
  // mantissa bumps the exponent, and the largest finite floats carry into infinity.
  return static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/// Exact bfloat16 -> float conversion.
TRIDENT_HD constexpr float bfloat16_bits_to_float(std::uint16_t b) noexcept {
  return bits_to_float(static_cast<std::uint32_t>(b) << 16);
}

}  // namespace detail

/// bfloat16: 1 sign bit, 8 exponent bits, 7 mantissa bits.
struct alignas(2) bfloat16 {
  std::uint16_t bits;  ///< the raw encoding

  bfloat16() = default;
  TRIDENT_HD constexpr explicit bfloat16(float f) noexcept : bits(detail::float_to_bfloat16_bits(f)) {}
  TRIDENT_HD constexpr explicit bfloat16(double d) noexcept : bfloat16(static_cast<float>(d)) {}
  TRIDENT_HD constexpr explicit bfloat16(int i) noexcept : bfloat16(static_cast<float>(i)) {}

  /// Wraps an encoding without converting.
  TRIDENT_HD static constexpr bfloat16 from_bits(std::uint16_t b) noexcept {
    bfloat16 h{};
    h.bits = b;
    return h;
  }

  TRIDENT_HD constexpr operator float() const noexcept { return detail::bfloat16_bits_to_float(bits); }

  TRIDENT_HD friend constexpr bool operator==(bfloat16 a, bfloat16 b) noexcept { return float(a) == float(b); }
};

static_assert(sizeof(bfloat16) == 2 && alignof(bfloat16) == 2, "bfloat16 must be exactly two bytes");

TRIDENT_HD constexpr bool isnan(bfloat16 h) noexcept { return (h.bits & 0x7fffu) > 0x7f80u; }
TRIDENT_HD constexpr bool isinf(bfloat16 h) noexcept { return (h.bits & 0x7fffu) == 0x7f80u; }
TRIDENT_HD constexpr bool isfinite(bfloat16 h) noexcept { return (h.bits & 0x7f80u) != 0x7f80u; }

}  // namespace trident

template <>
class std::numeric_limits<trident::bfloat16> {
 public:
  static constexpr bool is_specialized = true;
  static constexpr bool is_signed = true;
  static constexpr bool is_integer = false;
  static constexpr bool is_exact = false;
  static constexpr bool has_infinity = true;
  static constexpr bool has_quiet_NaN = true;
  static constexpr bool has_signaling_NaN = true;
  static constexpr bool is_iec559 = false;
  static constexpr std::float_round_style round_style = std::round_to_nearest;
  static constexpr int digits = 8;
  static constexpr int digits10 = 2;
  static constexpr int max_digits10 = 4;
  static constexpr int radix = 2;
  static constexpr int min_exponent = -125;
  static constexpr int max_exponent = 128;
  static constexpr trident::bfloat16 min() noexcept { return trident::bfloat16::from_bits(0x0080); }
  static constexpr trident::bfloat16 lowest() noexcept { return trident::bfloat16::from_bits(0xff7f); }
  static constexpr trident::bfloat16 max() noexcept { return trident::bfloat16::from_bits(0x7f7f); }
  static constexpr trident::bfloat16 epsilon() noexcept { return trident::bfloat16::from_bits(0x3c00); }
  static constexpr trident::bfloat16 round_error() noexcept { return trident::bfloat16::from_bits(0x3f00); }
  static constexpr trident::bfloat16 infinity() noexcept { return trident::bfloat16::from_bits(0x7f80); }
  static constexpr trident::bfloat16 quiet_NaN() noexcept { return trident::bfloat16::from_bits(0x7fc0); }
  static constexpr trident::bfloat16 signaling_NaN() noexcept { return trident::bfloat16::from_bits(0x7fa0); }
  static constexpr trident::bfloat16 denorm_min() noexcept { return trident::bfloat16::from_bits(0x0001); }
};
