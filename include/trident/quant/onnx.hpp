#pragma once
/// @file quant/onnx.hpp
/// The element arithmetic of quantization, exactly as ONNX QuantizeLinear and DequantizeLinear
/// define it:
///
///   q = saturate(round(x / scale) + zero_point)      rounding half to even
///   x = (q - zero_point) * scale
///
/// saturate clamps to the range of the quantized type: [0, 255] for uint8, [-128, 127] for
/// int8, [-8, 7] for int4 (ONNX's INT4; two per byte, the first element in the low nibble).
/// x / scale is computed in float, as ONNX's reference does, then rounded to the nearest
/// integer with ties to even. A NaN or infinite input has no quantized value: quantizing one
/// is an error that names the tensor and the position; so is a scale that is not finite and
/// positive.

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "../config.hpp"
#include "../core/error.hpp"

namespace trident::quant {

/// A value that cannot be quantized (NaN, infinity) or a quantization parameter that is
/// invalid (a scale that is not finite and positive, a zero point out of range).
class quantization_error : public error {
 public:
  using error::error;
};

/// The 4-bit signed type of ONNX (INT4): values in [-8, 7], stored two per byte.
struct int4_t {
  std::int8_t value;
};

/// The integer range of a quantized type.
template <class Q>
struct qrange;
template <>
struct qrange<std::uint8_t> {
  static constexpr int lo = 0, hi = 255;
  static constexpr const char* name = "uint8";
};
template <>
struct qrange<std::int8_t> {
  static constexpr int lo = -128, hi = 127;
  static constexpr const char* name = "int8";
};
template <>
struct qrange<int4_t> {
  static constexpr int lo = -8, hi = 7;
  static constexpr const char* name = "int4";
};

/// x rounded to the nearest integer, ties to even (IEEE roundTiesToEven, independent of the
/// current rounding mode).
inline float round_half_even(float x) noexcept {
  const float r = std::round(x);  // ties away from zero
  if (std::fabs(x - std::trunc(x)) == 0.5f) {
    // a tie: round() went away from zero; step back when that landed on an odd integer
    return std::fmod(r, 2.0f) != 0.0f ? r - std::copysign(1.0f, x) : r;
  }
  return r;
}

/// Throws quantization_error unless `scale` is finite and positive. `what` names the tensor.
inline void check_scale(float scale, const std::string& what) {
  if (!(scale > 0.0f) || !std::isfinite(scale)) {
    throw quantization_error("quantize '" + what + "': the scale must be finite and positive, got " +
                             std::to_string(scale));
  }
}

/// ONNX QuantizeLinear of one value, as an int in [qrange<Q>::lo, qrange<Q>::hi]. The caller
/// has checked that x is finite and the scale valid (quantize_checked does both).
template <class Q>
inline int quantize_value(float x, float scale, int zero_point) noexcept {
  const float r = round_half_even(x / scale) + static_cast<float>(zero_point);
  if (!(r > static_cast<float>(qrange<Q>::lo))) return qrange<Q>::lo;  // also catches NaN from a huge x / tiny scale
  if (r > static_cast<float>(qrange<Q>::hi)) return qrange<Q>::hi;
  return static_cast<int>(r);
}

/// quantize_value with the checks: x must be finite. `what` and `index` name the element in
/// the error.
template <class Q>
inline int quantize_checked(float x, float scale, int zero_point, const std::string& what, index_t index) {
  if (!std::isfinite(x)) {
    throw quantization_error("quantize '" + what + "': element " + std::to_string(index) + " is " +
                             (std::isnan(x) ? std::string("NaN") : std::string("infinite")) +
                             ", which has no quantized value");
  }
  return quantize_value<Q>(x, scale, zero_point);
}

/// ONNX DequantizeLinear of one value.
inline float dequantize_value(int q, float scale, int zero_point) noexcept {
  return static_cast<float>(q - zero_point) * scale;
}

/// Packs two int4 values into one byte, the first in the low nibble (ONNX's order).
inline std::uint8_t pack_int4(int first, int second) noexcept {
  return static_cast<std::uint8_t>((static_cast<unsigned>(first) & 0xFu) | ((static_cast<unsigned>(second) & 0xFu) << 4));
}

/// The int4 value in the low (i even) or high (i odd) nibble of `byte`, sign-extended.
inline int unpack_int4(std::uint8_t byte, index_t i) noexcept {
  const int nibble = (i & 1) ? (byte >> 4) : (byte & 0xF);
  return nibble >= 8 ? nibble - 16 : nibble;
}

}  // namespace trident::quant
