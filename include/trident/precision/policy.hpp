#pragma once
/// @file precision/policy.hpp
/// Precision policies: empty tag types whose traits say which type each role uses.
///
/// | policy       | storage  | compute | gradient | master | accumulate | loss scaling |
/// |--------------|----------|---------|----------|--------|------------|--------------|
/// | `fp32`       | float    | float   | float    | float  | float      | no           |
/// | `bf16_mixed` | bfloat16 | float   | float    | float  | float      | no           |
/// | `fp16_mixed` | half     | float   | half     | float  | float      | dynamic      |
/// | `fp64`       | double   | double  | double   | double | double     | no           |
///
/// fp64 is not a training precision anyone needs for speed; it is what gradient checks and
/// reference runs use.
/// storage: weights and activations as kernels read them; compute: the arithmetic inside a
/// kernel; gradient: what backward writes; master: the optimizer's copy of the weights;
/// accumulate: GEMM and reduction accumulators.

#include <concepts>
#include <type_traits>

#include "../fwd.hpp"
#include "bfloat16.hpp"
#include "half.hpp"

namespace trident {

/// Full single precision everywhere.
struct fp32 {};
/// fp16 weights/activations/gradients, fp32 master weights, dynamic loss scaling.
struct fp16_mixed {};
/// bf16 weights/activations, fp32 gradients and master weights, no loss scaling.
struct bf16_mixed {};
/// Double precision everywhere (gradient checks, references).
struct fp64 {};

namespace detail {
template <class>
inline constexpr bool dependent_false = false;
}

/// Traits of a precision policy. The primary template is for types that are not one, and
/// says so; each policy specialises it.
/// @tparam Precision a precision policy tag
template <class Precision>
struct precision_traits {
  static_assert(detail::dependent_false<Precision>,
                "trident::precision_traits<P>: P is not a precision policy; use trident::fp32, trident::fp16_mixed "
                "or trident::bf16_mixed (or specialise trident::precision_traits for your own tag)");
};

template <>
struct precision_traits<fp32> {
  using storage_type = float;
  using compute_type = float;
  using gradient_type = float;
  using master_type = float;
  using accumulate_type = float;
  static constexpr const char* name = "fp32";
  static constexpr bool loss_scaling = false;
};

template <>
struct precision_traits<bf16_mixed> {
  using storage_type = bfloat16;
  using compute_type = float;
  using gradient_type = float;
  using master_type = float;
  using accumulate_type = float;
  static constexpr const char* name = "bf16_mixed";
  static constexpr bool loss_scaling = false;
};

template <>
struct precision_traits<fp64> {
  using storage_type = double;
  using compute_type = double;
  using gradient_type = double;
  using master_type = double;
  using accumulate_type = double;
  static constexpr const char* name = "fp64";
  static constexpr bool loss_scaling = false;
};

template <>
struct precision_traits<fp16_mixed> {
  using storage_type = half;
  using compute_type = float;
  using gradient_type = half;
  using master_type = float;
  using accumulate_type = float;
  static constexpr const char* name = "fp16_mixed";
  static constexpr bool loss_scaling = true;
};

namespace detail {
template <class P>
inline constexpr bool is_builtin_precision =
    std::is_same_v<P, fp32> || std::is_same_v<P, bf16_mixed> || std::is_same_v<P, fp16_mixed> || std::is_same_v<P, fp64>;
}  // namespace detail

/// Whether P is meant as a precision policy. Naming a member of the primary precision_traits
/// would fire its static_assert inside the concept, so recognition goes through this flag
/// (as std::ranges::enable_view does): a user-defined policy specialises precision_traits
/// and sets this to true.
template <class P>
inline constexpr bool enable_precision_policy = detail::is_builtin_precision<P>;

/// A precision policy: an empty tag with traits naming the five roles' types.
template <class P>
concept precision_policy = enable_precision_policy<P> && std::is_empty_v<P> && requires {
  typename precision_traits<P>::storage_type;
  typename precision_traits<P>::compute_type;
  typename precision_traits<P>::gradient_type;
  typename precision_traits<P>::master_type;
  typename precision_traits<P>::accumulate_type;
  { precision_traits<P>::name } -> std::convertible_to<const char*>;
  { precision_traits<P>::loss_scaling } -> std::convertible_to<bool>;
};

template <precision_policy P>
using storage_t = typename precision_traits<P>::storage_type;
template <precision_policy P>
using compute_t = typename precision_traits<P>::compute_type;
template <precision_policy P>
using gradient_t = typename precision_traits<P>::gradient_type;
template <precision_policy P>
using master_t = typename precision_traits<P>::master_type;
template <precision_policy P>
using accumulate_t = typename precision_traits<P>::accumulate_type;

/// Element types a tensor may hold.
template <class T>
concept element_type = std::is_same_v<std::remove_const_t<T>, float> || std::is_same_v<std::remove_const_t<T>, double> ||
                       std::is_same_v<std::remove_const_t<T>, half> || std::is_same_v<std::remove_const_t<T>, bfloat16>;

/// Arithmetic type kernels use for an element type: double for double, float otherwise.
template <class T>
using compute_type_of = std::conditional_t<std::is_same_v<std::remove_const_t<T>, double>, double, float>;

}  // namespace trident
