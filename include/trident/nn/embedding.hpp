#pragma once
/// @file nn/embedding.hpp
/// A lookup table of learned vectors (PyTorch's nn.Embedding): row ids -> (..., width), with
/// an optional second table added by position (a GPT's token + position embedding in one
/// pass). Its backward is a deterministic scatter-add into the table's gradient.
///
///   nn::embedding<P> wte(store, "wte", vocab, width), wpe(store, "wpe", block, width);
///   auto x = wte.forward(ctx, tokens, {batch, T, width}, &wpe);   // x[b, t] = wte[tok] + wpe[t]
///   wte.backward(ctx, dx, &wpe);

#include <cstdint>
#include <span>
#include <string>

#include "../ops/fill.hpp"
#include "../ops/transfer.hpp"
#include "kernels.hpp"
#include "module.hpp"

namespace trident::nn {

/// A table of `count` learned vectors of `width` elements.
/// @tparam Policy the policy bundle
template <policy_bundle Policy>
class embedding {
 public:
  using S = typename Policy::storage_type;
  using D = typename Policy::device;

  /// Declares `name.weight` (count, width), weight-decayed like every 2-D weight.
  embedding(parameter_store<Policy>& store, const std::string& name, index_t count, index_t width)
      : store_(&store), name_(name), count_(count), width_(width) {
    if (count <= 0 || width <= 0) {
      throw shape_error("nn::embedding '" + name + "': count and width must be positive, got " + std::to_string(count) +
                        " x " + std::to_string(width));
    }
    weight_ = store.declare(name + ".weight", {count, width}, true);
  }

  /// PyTorch's default: weight ~ N(0, 1).
  void init(generator& gen) { init_normal(gen, 1.0); }
  /// weight ~ N(0, stddev^2) (GPT-2: 0.02).
  void init_normal(generator& gen, double stddev) {
    normal(store_->master(weight_), gen, 0.0, stddev);
    copy(store_->master(weight_), store_->param(weight_));
  }

  index_t count() const noexcept { return count_; }
  index_t width() const noexcept { return width_; }
  parameter_handle weight() const noexcept { return weight_; }

  /// ids (one per output row) -> y of shape `out` (..., width). With `positions`, row r also
  /// gets positions' row r % T, T = out[rank - 2] (the sequence axis), which must not exceed
  /// the positions table. Every id must be in [0, count).
  tensor_view<S, D> forward(context<Policy>& ctx, std::span<const std::int32_t> ids, const shape& out,
                            const embedding* positions = nullptr) {
    if (out.rank() < 1 || out[out.rank() - 1] != width_ || out.numel() / width_ != static_cast<index_t>(ids.size())) {
      throw shape_error("nn::embedding '" + name_ + "': " + std::to_string(ids.size()) + " ids cannot fill an output of shape " +
                        out.str() + " (width " + std::to_string(width_) + ")");
    }
    for (std::size_t i = 0; i < ids.size(); ++i) {
      if (ids[i] < 0 || ids[i] >= count_) {
        throw error("nn::embedding '" + name_ + "': id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                    " is outside [0, " + std::to_string(count_) + ")");
      }
    }
    period_ = 0;
    if (positions != nullptr) {
      if (out.rank() < 2 || positions->width_ != width_) {
        throw shape_error("nn::embedding '" + name_ + "': positions need an output (..., T, width) and a table of width " +
                          std::to_string(width_));
      }
      period_ = out[out.rank() - 2];
      if (period_ > positions->count_) {
        throw shape_error("nn::embedding '" + name_ + "': sequence length " + std::to_string(period_) +
                          " exceeds the " + std::to_string(positions->count_) + " positions of '" + positions->name_ + "'");
      }
    }
    ids_ = ids;
    auto y = ctx.template allocate<S>(out);
    tensor_view<const S, D> pos{};
    if (positions != nullptr) pos = positions->store_->param(positions->weight_);
    nn_kernels<D>::embedding_forward(y, tensor_view<const S, D>(store_->param(weight_)), ids.data(), pos, period_);
    return y;
  }

  /// Adds dy's rows into the gradient of the rows the last forward looked up (and into the
  /// positions' gradient when forward used them). The ids must still be alive.
  void backward(context<Policy>&, tensor_view<const S, D> dy, embedding* positions = nullptr) {
    if (dy.numel() != static_cast<index_t>(ids_.size()) * width_ || !dy.is_contiguous()) {
      throw shape_error("nn::embedding '" + name_ + "'::backward: gradient of shape " + dy.shape().str() + " for " +
                        std::to_string(ids_.size()) + " rows of width " + std::to_string(width_));
    }
    if ((positions != nullptr) != (period_ > 0)) {
      throw error("nn::embedding '" + name_ + "'::backward: pass the positions table exactly when forward used one");
    }
    tensor_view<typename Policy::gradient_type, D> dpos{};
    if (positions != nullptr) dpos = positions->store_->grad(positions->weight_);
    nn_kernels<D>::embedding_backward(store_->grad(weight_), ids_.data(), dy, dpos, period_);
    store_->grad_ready(weight_);
    if (positions != nullptr) positions->store_->grad_ready(positions->weight_);
  }

 private:
  parameter_store<Policy>* store_;
  std::string name_;
  index_t count_, width_;
  parameter_handle weight_{};
  std::span<const std::int32_t> ids_{};
  index_t period_ = 0;
};

}  // namespace trident::nn
