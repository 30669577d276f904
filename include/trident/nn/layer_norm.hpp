#pragma once
/// @file nn/layer_norm.hpp
/// Layer normalisation over the last dimension (Ba et al. 2016), with a learned scale and
/// shift (PyTorch's nn.LayerNorm with elementwise_affine=True, or without).

#include <string>

#include "../ops/fill.hpp"
#include "../ops/transfer.hpp"
#include "kernels.hpp"
#include "module.hpp"

namespace trident::nn {

/// y = (x - mean) / sqrt(var + eps) * gamma + beta over the last dimension.
/// @tparam Policy the policy bundle
template <policy_bundle Policy>
class layer_norm {
 public:
  using S = typename Policy::storage_type;
  using D = typename Policy::device;
  /// Row statistics: float, or double under fp64.
  using stat_type = std::conditional_t<std::is_same_v<S, double>, double, float>;

  /// Declares `name.weight` and, with `bias`, `name.bias` (n; neither weight-decayed) when
  /// affine (GPT-2 without biases scales but does not shift: affine, no bias).
  layer_norm(parameter_store<Policy>& store, const std::string& name, index_t n, double eps = 1e-5, bool affine = true,
             bool bias = true)
      : store_(&store), n_(n), eps_(eps) {
    if (n <= 0) throw shape_error("nn::layer_norm '" + name + "': size must be positive, got " + std::to_string(n));
    if (affine) {
      gamma_ = store.declare(name + ".weight", {n}, false);
      if (bias) beta_ = store.declare(name + ".bias", {n}, false);
    }
  }

  /// gamma = 1, beta = 0.
  void init(generator&) {
    if (gamma_.valid()) {
      fill(store_->master(gamma_), 1.0);
      copy(store_->master(gamma_), store_->param(gamma_));
    }
    if (beta_.valid()) {
      fill(store_->master(beta_), 0.0);
      copy(store_->master(beta_), store_->param(beta_));
    }
  }

  tensor_view<S, D> forward(context<Policy>& ctx, tensor_view<const S, D> x) {
    if (x.rank() < 1 || x.size(x.rank() - 1) != n_) {
      throw shape_error("nn::layer_norm::forward: input has shape " + x.shape().str() + " but the layer normalises (..., " +
                        std::to_string(n_) + ")");
    }
    x = ctx.contiguous(x);
    x_ = x;
    const index_t rows = x.numel() / n_;
    mean_ = ctx.template allocate<stat_type>({rows});
    rstd_ = ctx.template allocate<stat_type>({rows});
    auto y = ctx.template allocate<S>(x.shape());
    nn_kernels<D>::layer_norm_forward(y, mean_, rstd_, x, gamma(), beta(), eps_);
    return y;
  }

  tensor_view<S, D> backward(context<Policy>& ctx, tensor_view<const S, D> dy) {
    if (!(dy.shape() == x_.shape())) {
      throw shape_error("nn::layer_norm::backward: gradient has shape " + dy.shape().str() + " but the input had shape " +
                        x_.shape().str());
    }
    dy = ctx.contiguous(dy);
    auto dx = ctx.template allocate<S>(dy.shape());
    using G = typename Policy::gradient_type;
    tensor_view<G, D> dg{}, db{};
    if (gamma_.valid()) dg = store_->grad(gamma_);
    if (beta_.valid()) db = store_->grad(beta_);
    nn_kernels<D>::layer_norm_backward(dx, dg, db, dy, x_, tensor_view<const stat_type, D>(mean_),
                                       tensor_view<const stat_type, D>(rstd_), gamma());
    store_->grad_ready(gamma_);
    store_->grad_ready(beta_);
    return dx;
  }

 private:
  tensor_view<const S, D> gamma() { return gamma_.valid() ? tensor_view<const S, D>(store_->param(gamma_)) : tensor_view<const S, D>{}; }
  tensor_view<const S, D> beta() { return beta_.valid() ? tensor_view<const S, D>(store_->param(beta_)) : tensor_view<const S, D>{}; }

  parameter_store<Policy>* store_;
  index_t n_;
  double eps_;
  parameter_handle gamma_{}, beta_{};
  tensor_view<const S, D> x_{};
  tensor_view<stat_type, D> mean_{}, rstd_{};
};

}  // namespace trident::nn
