#pragma once
/// @file quant/scheme.hpp
/// Quantization schemes as types: how a quantized linear layer stores its weights and treats
/// its input, chosen at compile time like a precision policy.
///
///   quant::qlinear<P, quant::dynamic_int8<quant::per_row>>          int8 x int8 GEMM, input quantized per row at run time
///   quant::qlinear<P, quant::dynamic_int8<>>                        ... per tensor
///   quant::qlinear<P, quant::static_int8>                           int8 x int8 GEMM, input scale from calibration
///   quant::qlinear<P, quant::weight_only<quant::int4_t, 128>>       int4 weights, group 128, fp32 input
///   quant::qlinear<P, quant::weight_only<std::int8_t, 32>>          int8 weights, group 32, fp32 input
///
/// The int8 x int8 schemes store W as int8, symmetric per output channel (scale = max|w|/127,
/// quant/packed_int8.hpp) and quantize the input to uint8, asymmetric (ONNX
/// DynamicQuantizeLinear's rule when dynamic; an observer's parameters when static). The
/// weight-only schemes store W in int8 or int4 with one scale per group of `Group` inputs
/// (quant/weight_only.hpp) and keep the input in fp32. Every scheme keeps the bias in fp32.

#include <concepts>
#include <cstdint>
#include <type_traits>

#include "../config.hpp"
#include "onnx.hpp"

namespace trident::quant {

/// Activation granularity: one (scale, zero point) for the whole input tensor.
struct per_tensor {
  static constexpr const char* name = "per tensor";
};
/// Activation granularity: one (scale, zero point) per row of the input (per token).
struct per_row {
  static constexpr const char* name = "per row";
};

/// int8 weights (per channel, symmetric), uint8 input quantized at every forward from its
/// own range (ONNX DynamicQuantizeLinear), per tensor or per row.
/// @tparam Granularity per_tensor or per_row
template <class Granularity = per_tensor>
struct dynamic_int8 {
  static_assert(std::is_same_v<Granularity, per_tensor> || std::is_same_v<Granularity, per_row>,
                "quant::dynamic_int8<Granularity>: Granularity must be quant::per_tensor or quant::per_row");
  using granularity = Granularity;
  static constexpr bool int8_gemm = true;
  static constexpr bool calibrated = false;  ///< needs no calibration
  static constexpr int weight_bits = 8;
  static constexpr const char* name =
      std::is_same_v<Granularity, per_row> ? "int8 weights, dynamic uint8 input per row" : "int8 weights, dynamic uint8 input per tensor";
};

/// int8 weights (per channel, symmetric), uint8 input quantized per tensor with a scale and
/// zero point fixed by calibration (an observer) or by quantization-aware training.
struct static_int8 {
  using granularity = per_tensor;
  static constexpr bool int8_gemm = true;
  static constexpr bool calibrated = true;  ///< needs the input's parameters from calibration
  static constexpr int weight_bits = 8;
  static constexpr const char* name = "int8 weights, static uint8 input per tensor";
};

/// Weight-only quantization: W in Q (std::int8_t or int4_t) with one fp32 scale per group of
/// `Group` consecutive inputs; the input stays fp32.
/// @tparam Q std::int8_t or quant::int4_t
/// @tparam Group inputs per scale (32 and 128 are the usual; any positive divisor of the
///         layer's input width works)
template <class Q, index_t Group = 128>
struct weight_only {
  static_assert(std::is_same_v<Q, std::int8_t> || std::is_same_v<Q, int4_t>,
                "quant::weight_only<Q, Group>: Q must be std::int8_t or quant::int4_t");
  static_assert(Group > 0, "quant::weight_only<Q, Group>: the group must be positive");
  using value_type = Q;
  static constexpr index_t group = Group;
  static constexpr bool int8_gemm = false;
  static constexpr bool calibrated = false;
  static constexpr int weight_bits = std::is_same_v<Q, int4_t> ? 4 : 8;
  static constexpr const char* name = std::is_same_v<Q, int4_t> ? "weight-only int4" : "weight-only int8";
};

namespace detail {
template <class S>
inline constexpr bool is_scheme = false;
template <class G>
inline constexpr bool is_scheme<dynamic_int8<G>> = true;
template <>
inline constexpr bool is_scheme<static_int8> = true;
template <class Q, index_t G>
inline constexpr bool is_scheme<weight_only<Q, G>> = true;
}  // namespace detail

/// A quantization scheme of a linear layer.
template <class S>
concept scheme = detail::is_scheme<S>;

/// A scheme whose products run on the int8 x int8 GEMM (dynamic_int8, static_int8).
template <class S>
concept int8_gemm_scheme = scheme<S> && S::int8_gemm;

/// A weight-only scheme.
template <class S>
concept weight_only_scheme = scheme<S> && !S::int8_gemm;

}  // namespace trident::quant
