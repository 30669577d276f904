#pragma once
/// @file nn/batch_norm.hpp
/// Batch normalisation (Ioffe & Szegedy 2015) over the channel dimension of (N, C) or
/// (N, C, H, W) inputs, as PyTorch's nn.BatchNorm1d / nn.BatchNorm2d with affine=True and
/// track_running_stats=True. Statistics are accumulated in double and kept in fp32 (double
/// under fp64) whatever the storage type.

#include <cstdint>
#include <string>
#include <type_traits>

#include "../ops/fill.hpp"
#include "../ops/transfer.hpp"
#include "conv2d.hpp"
#include "module.hpp"

namespace trident::nn {

/// y = (x - mean) / sqrt(var + eps) * gamma + beta per channel. Training uses the batch's
/// mean and (biased) variance and updates the running statistics with `momentum` (the
/// running variance takes the unbiased batch variance); evaluation (ctx.training false)
/// normalises with the running statistics.
/// @tparam Policy the policy bundle
template <policy_bundle Policy>
class batch_norm {
 public:
  using S = typename Policy::storage_type;
  using G = typename Policy::gradient_type;
  using D = typename Policy::device;
  /// Statistics: float, or double under fp64.
  using stat_type = std::conditional_t<std::is_same_v<S, double>, double, float>;

  /// Declares `name.weight` and `name.bias` (features; neither weight-decayed); the running
  /// statistics start at mean 0, variance 1.
  batch_norm(parameter_store<Policy>& store, const std::string& name, index_t features, double eps = 1e-5,
             double momentum = 0.1)
      : store_(&store), name_(name), c_(features), eps_(eps), momentum_(momentum) {
    if (features <= 0) {
      throw shape_error("nn::batch_norm '" + name + "': features must be positive, got " + std::to_string(features));
    }
    if (!(eps > 0.0)) throw error("nn::batch_norm '" + name + "': eps must be positive, got " + std::to_string(eps));
    if (!(momentum >= 0.0 && momentum <= 1.0)) {
      throw error("nn::batch_norm '" + name + "': momentum must be in [0, 1], got " + std::to_string(momentum));
    }
    gamma_ = store.declare(name + ".weight", {features}, false);
    beta_ = store.declare(name + ".bias", {features}, false);
    running_mean_ = tensor<stat_type, D>({features});
    running_var_ = tensor<stat_type, D>({features});
    reset_running_stats();
  }

  /// gamma = 1, beta = 0, running statistics reset.
  void init(generator&) {
    fill(store_->master(gamma_), 1.0);
    fill(store_->master(beta_), 0.0);
    copy(store_->master(gamma_), store_->param(gamma_));
    copy(store_->master(beta_), store_->param(beta_));
    reset_running_stats();
  }

  /// Running mean 0, running variance 1, no batches tracked.
  void reset_running_stats() {
    fill(running_mean_, 0.0);
    fill(running_var_, 1.0);
    batches_ = 0;
  }

  const std::string& name() const noexcept { return name_; }
  index_t num_features() const noexcept { return c_; }
  double eps() const noexcept { return eps_; }
  double momentum() const noexcept { return momentum_; }
  parameter_handle weight() const noexcept { return gamma_; }
  parameter_handle bias() const noexcept { return beta_; }
  /// The running statistics (C), updated by every training forward; writable (e.g. to load
  /// a checkpoint).
  tensor_view<stat_type, D> running_mean() noexcept { return running_mean_.view(); }
  tensor_view<stat_type, D> running_var() noexcept { return running_var_.view(); }
  tensor_view<const stat_type, D> running_mean() const noexcept { return running_mean_.view(); }
  tensor_view<const stat_type, D> running_var() const noexcept { return running_var_.view(); }
  /// Training forwards so far (PyTorch's num_batches_tracked).
  std::int64_t num_batches_tracked() const noexcept { return batches_; }

  /// x (N, C) or (N, C, H, W) -> y of the same shape.
  tensor_view<S, D> forward(context<Policy>& ctx, tensor_view<const S, D> x) {
    if ((x.rank() != 2 && x.rank() != 4) || x.size(1) != c_) {
      throw shape_error("nn::batch_norm '" + name_ + "': input has shape " + x.shape().str() + " but the layer takes (N, " +
                        std::to_string(c_) + ") or (N, " + std::to_string(c_) + ", H, W)");
    }
    x = ctx.contiguous(x);
    x_ = x;
    mean_ = ctx.template allocate<stat_type>({c_});
    invstd_ = ctx.template allocate<stat_type>({c_});
    batch_stats_ = ctx.training;
    if (batch_stats_) {
      const index_t per_channel = x.numel() / c_;
      if (per_channel <= 1) {
        throw shape_error("nn::batch_norm '" + name_ + "': training needs more than one value per channel, got input shape " +
                          x.shape().str());
      }
      conv_kernels<D>::batch_norm_train_statistics(ctx.memory, mean_, invstd_, running_mean_.view(), running_var_.view(), x,
                                                   c_, eps_, momentum_);
      ++batches_;
    } else {
      conv_kernels<D>::batch_norm_eval_statistics(mean_, invstd_, running_mean_.view(), running_var_.view(), eps_);
    }
    auto y = ctx.template allocate<S>(x.shape());
    conv_kernels<D>::batch_norm_normalize(y, x, tensor_view<const stat_type, D>(mean_), tensor_view<const stat_type, D>(invstd_),
                                          param(gamma_), param(beta_), c_);
    return y;
  }

  /// dy -> dx (the shape of the input); accumulates dgamma and dbeta.
  tensor_view<S, D> backward(context<Policy>& ctx, tensor_view<const S, D> dy) {
    if (!(dy.shape() == x_.shape())) {
      throw shape_error("nn::batch_norm::backward '" + name_ + "': gradient has shape " + dy.shape().str() +
                        " but the input had shape " + x_.shape().str());
    }
    dy = ctx.contiguous(dy);
    auto dx = ctx.template allocate<S>(dy.shape());
    conv_kernels<D>::batch_norm_backward(ctx.memory, dx, store_->grad(gamma_), store_->grad(beta_), dy, x_,
                                         tensor_view<const stat_type, D>(mean_), tensor_view<const stat_type, D>(invstd_),
                                         param(gamma_), c_, batch_stats_);
    store_->grad_ready(gamma_);
    store_->grad_ready(beta_);
    return dx;
  }

 private:
  tensor_view<const S, D> param(parameter_handle h) { return store_->param(h); }

  parameter_store<Policy>* store_;
  std::string name_;
  index_t c_;
  double eps_, momentum_;
  parameter_handle gamma_{}, beta_{};
  tensor<stat_type, D> running_mean_, running_var_;
  std::int64_t batches_ = 0;
  // kept from forward for backward (this step's memory)
  tensor_view<const S, D> x_{};
  tensor_view<stat_type, D> mean_{}, invstd_{};
  bool batch_stats_ = true;
};

}  // namespace trident::nn
