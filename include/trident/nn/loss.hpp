#pragma once
/// @file nn/loss.hpp
/// Softmax cross-entropy over class logits, fused and max-shifted, with label smoothing and
/// an ignored label (PyTorch's nn.CrossEntropyLoss(reduction="mean", label_smoothing=ε,
/// ignore_index=i) semantics).

#include <cstdint>
#include <span>
#include <string>

#include "kernels.hpp"
#include "module.hpp"

namespace trident::nn {

/// Options of the cross-entropy loss.
struct cross_entropy_options {
  double label_smoothing = 0.0;      ///< ε: targets are (1-ε) one-hot + ε/C
  std::int32_t ignore_index = -100;  ///< rows with this label count neither in the loss nor the mean
};

/// Mean softmax cross-entropy of logits (N, C) against integer labels.
/// @tparam Policy the policy bundle
template <policy_bundle Policy>
class softmax_cross_entropy {
 public:
  using S = typename Policy::storage_type;
  using D = typename Policy::device;

  explicit softmax_cross_entropy(cross_entropy_options opt = {}) : opt_(opt) {
    if (!(opt.label_smoothing >= 0.0 && opt.label_smoothing <= 1.0)) {
      throw error("nn::softmax_cross_entropy: label_smoothing must be in [0, 1], got " + std::to_string(opt.label_smoothing));
    }
  }

  /// The mean loss over the rows whose label is not ignored (0 when all are). Labels are
  /// host memory; each must be in [0, C) or the ignore index.
  double forward(context<Policy>&, tensor_view<const S, D> logits, std::span<const std::int32_t> labels) {
    check(logits, labels);
    logits_ = logits;
    labels_ = labels;
    const double sum = nn_kernels<D>::softmax_xent(tensor_view<S, D>{}, logits, labels.data(), opt_.ignore_index,
                                                   opt_.label_smoothing, 0.0);
    return count_ ? sum / static_cast<double>(count_) : 0.0;
  }

  /// d(loss_scale * mean loss)/d(logits), (N, C).
  tensor_view<S, D> backward(context<Policy>& ctx, double loss_scale = 1.0) {
    auto g = ctx.template allocate<S>(logits_.shape());
    const double scale = count_ ? loss_scale / static_cast<double>(count_) : 0.0;
    nn_kernels<D>::softmax_xent(g, logits_, labels_.data(), opt_.ignore_index, opt_.label_smoothing, scale);
    return g;
  }

  /// Rows counted in the last forward.
  index_t count() const noexcept { return count_; }

 private:
  void check(tensor_view<const S, D> logits, std::span<const std::int32_t> labels) {
    if (logits.rank() != 2) {
      throw shape_error("nn::softmax_cross_entropy: logits must be (N, C), got " + logits.shape().str());
    }
    if (static_cast<index_t>(labels.size()) != logits.size(0)) {
      throw shape_error("nn::softmax_cross_entropy: " + std::to_string(labels.size()) + " labels for logits " +
                        logits.shape().str());
    }
    count_ = 0;
    const index_t classes = logits.size(1);
    for (std::size_t i = 0; i < labels.size(); ++i) {
      const std::int32_t y = labels[i];
      if (y == opt_.ignore_index) continue;
      if (y < 0 || y >= classes) {
        throw error("nn::softmax_cross_entropy: label " + std::to_string(y) + " of row " + std::to_string(i) +
                    " is outside [0, " + std::to_string(classes) + ") and is not the ignore index " +
                    std::to_string(opt_.ignore_index));
      }
      ++count_;
    }
  }

  cross_entropy_options opt_;
  tensor_view<const S, D> logits_{};
  std::span<const std::int32_t> labels_{};
  index_t count_ = 0;
};

}  // namespace trident::nn
