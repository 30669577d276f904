#pragma once
/// @file core/policy.hpp
/// The bundle of the three compile-time choices. A policy that cannot work fails to compile
/// with a message that says why.

#include <type_traits>

#include "../fwd.hpp"
#include "../precision/policy.hpp"
#include "../parallel/strategy.hpp"
#include "concepts.hpp"

namespace trident {

/// One training configuration: how numbers are stored, where they live, how work is spread.
/// @tparam Precision a precision_policy: fp32, bf16_mixed or fp16_mixed
/// @tparam Device a device_policy: cpu, or cuda (in translation units compiled by nvcc that include trident/cuda.hpp)
/// @tparam Strategy a parallel_strategy: single (default), data parallel or a ZeRO stage
template <class Precision, class Device, class Strategy = single>
struct policy {
  static_assert(precision_policy<Precision>,
                "trident::policy<Precision, Device, Strategy>: Precision is not a precision policy; "
                "use trident::fp32, trident::bf16_mixed, trident::fp16_mixed or trident::fp64");
  static_assert(!std::is_same_v<Device, cuda> || device_policy<Device>,
                "trident::policy<Precision, cuda, Strategy>: the cuda device is not available in this "
                "translation unit; it needs a CUDA compiler (nvcc) and #include <trident/cuda.hpp> "
                "(link trident::cuda, and compile this file as CUDA)");
  static_assert(device_policy<Device>,
                "trident::policy<Precision, Device, Strategy>: Device is not a device policy; use trident::cpu "
                "or trident::cuda");
  static_assert(parallel_strategy<Strategy>,
                "trident::policy<Precision, Device, Strategy>: Strategy is not a parallel strategy; use "
                "trident::single (data parallel and ZeRO strategies come with trident/parallel)");

  using precision = Precision;
  using device = Device;
  using strategy = Strategy;
  // Falls back to fp32 after a failed assertion, so the one clear message is not buried.
  using traits = precision_traits<std::conditional_t<precision_policy<Precision>, Precision, fp32>>;
  using storage_type = typename traits::storage_type;
  using compute_type = typename traits::compute_type;
  using gradient_type = typename traits::gradient_type;
  using master_type = typename traits::master_type;
  using accumulate_type = typename traits::accumulate_type;
};

namespace detail {
template <class T>
inline constexpr bool is_policy = false;
template <class P, class D, class S>
inline constexpr bool is_policy<policy<P, D, S>> = true;
}  // namespace detail

/// A complete policy bundle.
template <class T>
concept policy_bundle = detail::is_policy<T>;

}  // namespace trident
