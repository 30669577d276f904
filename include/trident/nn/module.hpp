#pragma once
/// @file nn/module.hpp
/// What a module is, the context a forward or backward pass runs in, and composition.
///
/// A module maps an input tensor to an output tensor (forward) and an output gradient to an
/// input gradient (backward), accumulating the gradients of its parameters into the model's
/// parameter_store on the way. Outputs and input gradients are allocated from the context's
/// arena and stay valid until the arena is reset at the start of the next step; a module
/// keeps what its backward needs (usually views of its input or output) between the two.

#include <concepts>
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>

#include "../core/policy.hpp"
#include "../core/rng.hpp"
#include "../core/tensor.hpp"
#include "../ops/transfer.hpp"
#include "arena.hpp"
#include "parameters.hpp"

namespace trident::nn {

/// Everything a forward or backward pass needs besides its tensors.
/// @tparam Policy the policy bundle the model is compiled for
template <policy_bundle Policy>
struct context {
  using device = typename Policy::device;
  arena<device>& memory;     ///< activations and gradients of this step
  bool training = true;      ///< train (dropout active, batch statistics) or eval
  generator* rng = nullptr;  ///< for dropout; required when training with dropout

  /// An uninitialised tensor of this step.
  template <class T>
  tensor_view<T, device> allocate(const shape& s) {
    return memory.template allocate<T>(s);
  }

  /// x itself when contiguous, else a contiguous copy in this step's memory.
  template <class T>
  tensor_view<const T, device> contiguous(tensor_view<const T, device> x) {
    if (x.is_contiguous()) return x;
    auto c = allocate<T>(x.shape());
    copy(x, c);
    return c;
  }
};

/// A module of a model compiled for Policy: forward and backward on tensors of the
/// storage type.
template <class M, class Policy>
concept module = requires(M& m, context<Policy>& ctx, tensor_view<const typename Policy::storage_type, typename Policy::device> x) {
  { m.forward(ctx, x) } -> std::convertible_to<tensor_view<typename Policy::storage_type, typename Policy::device>>;
  { m.backward(ctx, x) } -> std::convertible_to<tensor_view<typename Policy::storage_type, typename Policy::device>>;
};

/// Modules with parameters initialise them with init(generator&) (after the store is
/// allocated); the others need not define it.
template <class M>
void init_module(M& m, generator& gen) {
  if constexpr (requires { m.init(gen); }) m.init(gen);
}

/// Forward FLOPs of a module's last forward (multiply-adds count 2), or 0 for a module that
/// does not count them (element-wise layers, whose cost is memory traffic, not arithmetic).
template <class M>
std::int64_t flops_of(const M& m) noexcept {
  if constexpr (requires { m.flops(); }) {
    return static_cast<std::int64_t>(m.flops());
  } else {
    return 0;
  }
}

/// FLOPs of a module's backward after its last forward: its backward_flops() when it counts
/// them, else twice its forward (a GEMM layer's input and weight gradients).
template <class M>
std::int64_t backward_flops_of(const M& m) noexcept {
  if constexpr (requires { m.backward_flops(); }) {
    return static_cast<std::int64_t>(m.backward_flops());
  } else {
    return 2 * flops_of(m);
  }
}

/// Modules applied one after another; backward runs them in reverse.
/// @tparam Policy the policy bundle
/// @tparam Modules the modules, in order
template <policy_bundle Policy, class... Modules>
class sequential {
 public:
  using storage_type = typename Policy::storage_type;
  using device = typename Policy::device;
  using view = tensor_view<storage_type, device>;
  using cview = tensor_view<const storage_type, device>;

  explicit sequential(Modules... modules) : modules_(std::move(modules)...) {}

  view forward(context<Policy>& ctx, cview x) {
    return forward_from<0>(ctx, x);
  }
  view backward(context<Policy>& ctx, cview dy) {
    return backward_from<sizeof...(Modules) - 1>(ctx, dy);
  }
  void init(generator& gen) {
    std::apply([&](auto&... m) { (init_module(m, gen), ...); }, modules_);
  }

  /// Forward FLOPs of the last forward: the sum over the modules that count theirs.
  std::int64_t flops() const noexcept {
    return std::apply([](const auto&... m) { return (std::int64_t{0} + ... + flops_of(m)); }, modules_);
  }

  /// Backward FLOPs after the last forward: the sum over the modules.
  std::int64_t backward_flops() const noexcept {
    return std::apply([](const auto&... m) { return (std::int64_t{0} + ... + backward_flops_of(m)); }, modules_);
  }

  /// The i-th module.
  template <std::size_t I>
  auto& get() noexcept {
    return std::get<I>(modules_);
  }
  static constexpr std::size_t size() noexcept { return sizeof...(Modules); }

 private:
  template <std::size_t I>
  view forward_from(context<Policy>& ctx, cview x) {
    auto y = std::get<I>(modules_).forward(ctx, x);
    if constexpr (I + 1 < sizeof...(Modules)) {
      return forward_from<I + 1>(ctx, y);
    } else {
      return y;
    }
  }
  template <std::size_t I>
  view backward_from(context<Policy>& ctx, cview dy) {
    auto dx = std::get<I>(modules_).backward(ctx, dy);
    if constexpr (I > 0) {
      return backward_from<I - 1>(ctx, dx);
    } else {
      return dx;
    }
  }

  std::tuple<Modules...> modules_;
};

}  // namespace trident::nn
