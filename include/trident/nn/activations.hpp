#pragma once
/// @file nn/activations.hpp
/// Parameter-free modules: ReLU, GELU (exact and tanh), flatten and dropout.

#include <cstdint>
#include <string>

#include "../core/activation.hpp"
#include "../ops/elementwise.hpp"
#include "../ops/transfer.hpp"
#include "kernels.hpp"
#include "module.hpp"

namespace trident::nn {

/// An element-wise activation as a module. Keeps its input for backward.
/// @tparam Policy the policy bundle
/// @tparam Forward the activation functor
/// @tparam Backward its derivative, (dy, x) -> dx
template <policy_bundle Policy, class Forward, class Backward>
class pointwise {
 public:
  using S = typename Policy::storage_type;
  using D = typename Policy::device;

  tensor_view<S, D> forward(context<Policy>& ctx, tensor_view<const S, D> x) {
    x_ = x;
    auto y = ctx.template allocate<S>(x.shape());
    map(Forward{}, x, y);
    return y;
  }
  tensor_view<S, D> backward(context<Policy>& ctx, tensor_view<const S, D> dy) {
    if (!(dy.shape() == x_.shape())) {
      throw shape_error("nn::pointwise::backward: gradient has shape " + dy.shape().str() + " but the input had shape " +
                        x_.shape().str());
    }
    auto dx = ctx.template allocate<S>(dy.shape());
    zip(Backward{}, dy, x_, dx);
    return dx;
  }

 private:
  tensor_view<const S, D> x_{};
};

template <policy_bundle Policy>
using relu = pointwise<Policy, ops::relu, ops::relu_backward>;
/// GELU with the exact (erf) formula.
template <policy_bundle Policy>
using gelu = pointwise<Policy, ops::gelu, ops::gelu_backward>;
/// GELU with the tanh approximation (GPT-2's).
template <policy_bundle Policy>
using gelu_tanh = pointwise<Policy, ops::gelu_tanh, ops::gelu_tanh_backward>;

/// Flattens every dimension after the first: (N, d1, d2, ...) -> (N, d1*d2*...). No copy.
template <policy_bundle Policy>
class flatten {
 public:
  using S = typename Policy::storage_type;
  using D = typename Policy::device;

  tensor_view<S, D> forward(context<Policy>& ctx, tensor_view<const S, D> x) {
    in_shape_ = x.shape();
    if (x.rank() < 1) throw shape_error("nn::flatten: input has shape " + x.shape().str());
    auto c = owned(ctx, x);
    return c.reshape({x.size(0), x.numel() / (x.size(0) ? x.size(0) : 1)});
  }
  /// An empty gradient (the layer after it computes no input gradient) passes on as empty.
  tensor_view<S, D> backward(context<Policy>& ctx, tensor_view<const S, D> dy) {
    if (dy.empty() && in_shape_.numel() != 0) return {};
    if (dy.numel() != in_shape_.numel()) {
      throw shape_error("nn::flatten::backward: gradient has shape " + dy.shape().str() + " but the input had shape " +
                        in_shape_.str());
    }
    return owned(ctx, dy).reshape(in_shape_);
  }

 private:
  // Views of this step's memory are passed on as mutable views (the arena owns them); a
  // strided input is first made contiguous.
  static tensor_view<S, D> owned(context<Policy>& ctx, tensor_view<const S, D> x) {
    auto c = ctx.template allocate<S>(x.shape());
    copy(x, c);
    return c;
  }
  shape in_shape_{};
};

/// Dropout with a seeded counter-based mask: each forward draws fresh blocks from the
/// context's generator; backward regenerates the same mask from the same counters instead
/// of storing it. In eval mode (or with p = 0) the input passes through.
template <policy_bundle Policy>
class dropout {
 public:
  using S = typename Policy::storage_type;
  using D = typename Policy::device;

  explicit dropout(double p) : p_(p) {
    if (!(p >= 0.0 && p < 1.0)) throw error("nn::dropout: p must be in [0, 1), got " + std::to_string(p));
  }
  double p() const noexcept { return p_; }

  tensor_view<S, D> forward(context<Policy>& ctx, tensor_view<const S, D> x) {
    active_ = ctx.training && p_ > 0.0;
    auto y = ctx.template allocate<S>(x.shape());
    if (!active_) {
      copy(x, y);
      return y;
    }
    if (ctx.rng == nullptr) throw error("nn::dropout: training with p > 0 needs a generator in the context (ctx.rng)");
    spec_ = ctx.rng->next(static_cast<std::uint64_t>(x.numel()), distribution::uniform, 0.0, 1.0);
    nn_kernels<D>::dropout(y, x, spec_, p_);
    return y;
  }
  tensor_view<S, D> backward(context<Policy>& ctx, tensor_view<const S, D> dy) {
    auto dx = ctx.template allocate<S>(dy.shape());
    if (!active_) {
      copy(dy, dx);
    } else {
      nn_kernels<D>::dropout(dx, dy, spec_, p_);
    }
    return dx;
  }

 private:
  double p_;
  bool active_ = false;
  random_spec spec_{};
};

}  // namespace trident::nn
