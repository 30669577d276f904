#pragma once
/// @file half.hpp
/// IEEE 754 binary16 ("half"): our own 2-byte type, identical in layout under g++ and nvcc.
/// Conversion from float rounds to nearest, ties to even; NaN stays NaN (quieted, sign and
/// top payload bits kept, as x86 F16C does), overflow goes to infinity, and subnormal
/// results are rounded exactly. Arithmetic is done in float: `half` converts implicitly to
/// float and explicitly from it, so a narrowing store is always visible in the source.

#include <cstdint>
#include <limits>

#include "bits.hpp"

namespace trident {

namespace detail {

/// Reference float -> binary16 conversion (round to nearest even). Every vectorised path
/// in convert.hpp is tested against this on all 2^32 inputs.
TRIDENT_HD constexpr std::uint16_t float_to_half_bits(float f) noexcept {
  const std::uint32_t u = float_to_bits(f);
  const auto sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) {  // NaN: quiet it, keep the top 9 payload bits
    return static_cast<std::uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x03ffu));
  }
  if (a >= 0x477ff000u) {  // >= 65520 (halfway above the largest half, 65504) and Inf
    return static_cast<std::uint16_t>(sign | 0x7c00u);
  }
  if (a >= 0x38800000u) {  // normal half: rebias the exponent, round 13 mantissa bits away
    std::uint32_t r = a - 0x38000000u;
    r += 0x0fffu + ((r >> 13) & 1u);
    return static_cast<std::uint16_t>(sign | (r >> 13));
  }
  const std::uint32_t e = a >> 23;
  if (e < 102) {  // below 2^-25: rounds to (signed) zero; 2^-25 itself ties to zero
    return sign;
  }
  // Subnormal half: value = mant * 2^(e-150), in units of 2^-24 that is mant >> (126-e).
  const std::uint32_t mant = (a & 0x007fffffu) | 0x00800000u;
  const std::uint32_t shift = 126u - e;  // 14..24
  const std::uint32_t rem = mant & ((1u << shift) - 1u);
  const std::uint32_t halfway = 1u << (shift - 1u);
  std::uint32_t m = mant >> shift;
  if (rem > halfway || (rem == halfway && (m & 1u))) ++m;  // may carry into the smallest normal
  return static_cast<std::uint16_t>(sign | m);
}

/// Exact binary16 -> float conversion (signalling NaNs come out quiet, as IEEE 754 and F16C do).
TRIDENT_HD constexpr float half_bits_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x03ffu;
  if (exp == 0x1fu) {  // Inf, or NaN: quieted with its payload kept, as F16C widens it
    return bits_to_float(sign | 0x7f800000u | ((mant ? (mant | 0x0200u) : 0u) << 13));
  }
  if (exp != 0) {
    return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
  }
  if (mant == 0) return bits_to_float(sign);
  // Subnormal: normalise.
  std::uint32_t e = 113;
  while ((mant & 0x0400u) == 0) {
    mant <<= 1;
    --e;
  }
  return bits_to_float(sign | (e << 23) | ((mant & 0x03ffu) << 13));
}

}  // namespace detail

/// IEEE binary16. Standard layout, trivially copyable, exactly two bytes.
struct alignas(2) half {
  std::uint16_t bits;  ///< the raw encoding

  half() = default;
  TRIDENT_HD constexpr explicit half(float f) noexcept : bits(detail::float_to_half_bits(f)) {}
  TRIDENT_HD constexpr explicit half(double d) noexcept : half(static_cast<float>(d)) {}
  TRIDENT_HD constexpr explicit half(int i) noexcept : half(static_cast<float>(i)) {}

  /// Wraps an encoding without converting.
  TRIDENT_HD static constexpr half from_bits(std::uint16_t b) noexcept {
    half h{};
    h.bits = b;
    return h;
  }

  TRIDENT_HD constexpr operator float() const noexcept { return detail::half_bits_to_float(bits); }

  TRIDENT_HD friend constexpr bool operator==(half a, half b) noexcept { return float(a) == float(b); }
};

static_assert(sizeof(half) == 2 && alignof(half) == 2, "half must be exactly two bytes");

TRIDENT_HD constexpr bool isnan(half h) noexcept { return (h.bits & 0x7fffu) > 0x7c00u; }
TRIDENT_HD constexpr bool isinf(half h) noexcept { return (h.bits & 0x7fffu) == 0x7c00u; }
TRIDENT_HD constexpr bool isfinite(half h) noexcept { return (h.bits & 0x7c00u) != 0x7c00u; }

}  // namespace trident

template <>
class std::numeric_limits<trident::half> {
 public:
  static constexpr bool is_specialized = true;
  static constexpr bool is_signed = true;
  static constexpr bool is_integer = false;
  static constexpr bool is_exact = false;
  static constexpr bool has_infinity = true;
  static constexpr bool has_quiet_NaN = true;
  static constexpr bool has_signaling_NaN = true;
  static constexpr bool is_iec559 = true;
  static constexpr std::float_round_style round_style = std::round_to_nearest;
  static constexpr int digits = 11;
  static constexpr int digits10 = 3;
  static constexpr int max_digits10 = 5;
  static constexpr int radix = 2;
  static constexpr int min_exponent = -13;
  static constexpr int max_exponent = 16;
  static constexpr trident::half min() noexcept { return trident::half::from_bits(0x0400); }
  static constexpr trident::half lowest() noexcept { return trident::half::from_bits(0xfbff); }
  static constexpr trident::half max() noexcept { return trident::half::from_bits(0x7bff); }
  static constexpr trident::half epsilon() noexcept { return trident::half::from_bits(0x1400); }
  static constexpr trident::half round_error() noexcept { return trident::half::from_bits(0x3800); }
  static constexpr trident::half infinity() noexcept { return trident::half::from_bits(0x7c00); }
  static constexpr trident::half quiet_NaN() noexcept { return trident::half::from_bits(0x7e00); }
  static constexpr trident::half signaling_NaN() noexcept { return trident::half::from_bits(0x7d00); }
  static constexpr trident::half denorm_min() noexcept { return trident::half::from_bits(0x0001); }
};
