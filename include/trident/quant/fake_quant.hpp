#pragma once
/// @file quant/fake_quant.hpp
/// Fake quantization and the quantization-aware training (QAT) linear layer.
///
/// Fake quantization rounds a float through the quantized type and back,
/// x -> (clamp(round(x / s) + zp, qmin, qmax) - zp) s (ONNX QuantizeLinear then
/// DequantizeLinear), so that training sees the error the quantized model will make.
/// Rounding has no useful derivative; its backward is the clipped straight-through
/// estimator (STE): the gradient passes unchanged where x was inside the representable
/// interval [(qmin - zp) s, (qmax - zp) s] and is zero outside, where the clamp cut it.
///
/// qat_linear is nn::linear with both operands fake-quantized the way the converted
/// quantized layer (qlinear<P, static_int8>, quant/qlinear.hpp) will quantize them:
///
///   weights      int8, symmetric per output channel, scale_j = max_k |w_jk| / 127 (a zero
///                row gets scale 1): packed_int8_weight's rule, recomputed from the fp32
///                master weights at every forward. |w| <= 127 s never clips, so the STE passes
///                the whole weight gradient to the master weights.
///   activations  uint8, per tensor, with the scale and zero point of an observer
///                (moving-average min-max by default, as PyTorch's QAT configs) that watches
///                the layer's input during training forwards.
///
/// The observer updates during the first `freeze_observer_after` training forwards and is
/// frozen from then on (PyTorch's disable_observer after a set number of steps), so that the
/// last part of training adapts the weights to the parameters the converted model will use.
/// Eval forwards neither update the observer nor count as steps. (percentile_observer keeps
/// every value it sees until it is frozen: with it, keep freeze_observer_after small.) The layer declares
/// `name.weight` and `name.bias` exactly as nn::linear does, so a trained fp32 model's weights
/// load into it by name (nn::load_weights, quant::copy_parameters) for QAT fine-tuning.
///
/// qat_linear trains under the fp32 policy (fake quantization is an fp32 computation; the
/// mixed-precision policies would round the fake-quantized operands a second time).

#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/activation.hpp"
#include "../nn/linear.hpp"
#include "../nn/module.hpp"
#include "../ops/elementwise.hpp"
#include "../ops/gemm.hpp"
#include "../ops/reduce.hpp"
#include "observer.hpp"
#include "onnx.hpp"

namespace trident::quant {

/// x through the quantized type Q and back (QuantizeLinear then DequantizeLinear). x finite.
template <class Q>
inline float fake_quantize(float x, const qparams& p) noexcept {
  return dequantize_value(quantize_value<Q>(x, p.scale, p.zero_point), p.scale, p.zero_point);
}

/// y[i] = fake_quantize<Q>(x[i]) and mask[i] = 1 where x[i] is inside the representable
/// interval (the clipped STE passes the gradient there), 0 outside. A NaN or infinite x[i]
/// throws quantization_error naming `what` and i. `mask` may be empty (not wanted).
template <class Q>
inline void fake_quantize(std::span<const float> x, const qparams& p, std::span<float> y, std::span<float> mask,
                          const std::string& what) {
  check_scale(p.scale, what);
  if (y.size() != x.size() || (!mask.empty() && mask.size() != x.size())) {
    throw shape_error("quant::fake_quantize '" + what + "': " + std::to_string(x.size()) + " inputs, " +
                      std::to_string(y.size()) + " outputs and " + std::to_string(mask.size()) + " mask elements");
  }
  const auto r = representable_range<Q>(p);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const float v = x[i];
    y[i] = dequantize_value(quantize_checked<Q>(v, p.scale, p.zero_point, what, static_cast<index_t>(i)), p.scale,
                            p.zero_point);
    if (!mask.empty()) mask[i] = (v >= r.lo && v <= r.hi) ? 1.0f : 0.0f;
  }
}

/// The int8 scale of one output channel of a weight: max |w| / 127, or 1 for a zero row
/// (packed_int8_weight's rule, so that QAT and the converted layer agree exactly).
inline float int8_channel_scale(const float* row, index_t in) noexcept {
  float amax = 0.0f;
  for (index_t k = 0; k < in; ++k) amax = std::max(amax, std::fabs(row[k]));
  return amax > 0.0f ? amax / 127.0f : 1.0f;
}

/// wq (out x in) = w fake-quantized to int8 per output channel, symmetric; scales receives the
/// out scales. NaN or infinite weights throw quantization_error naming `what` and the element.
inline void fake_quantize_weight(const float* w, index_t out, index_t in, float* wq, float* scales, const std::string& what) {
  for (index_t j = 0; j < out; ++j) {
    const float* row = w + j * in;
    for (index_t k = 0; k < in; ++k) {
      if (!std::isfinite(row[k])) {
        throw quantization_error("quantize '" + what + "': element " + std::to_string(j * in + k) + " (row " +
                                 std::to_string(j) + ", column " + std::to_string(k) + ") is " +
                                 (std::isnan(row[k]) ? "NaN" : "infinite") + ", which has no quantized value");
      }
    }
    const float s = int8_channel_scale(row, in);
    scales[j] = s;
    for (index_t k = 0; k < in; ++k) wq[j * in + k] = fake_quantize<std::int8_t>(row[k], qparams{s, 0});
  }
}

/// Options of quantization-aware training.
struct qat_options {
  /// Training forwards during which the activation observer updates; frozen from then on.
  std::int64_t freeze_observer_after = 1000;
};

/// A linear layer trained with fake-quantized weights (int8 per channel) and inputs (uint8
/// per tensor, observer-driven), with the clipped straight-through estimator in backward.
/// Converts to qlinear<Policy, static_int8> (quant/convert.hpp) with the frozen parameters.
/// @tparam Policy the policy bundle (fp32 storage)
/// @tparam Observer the activation observer (quant::observer)
template <policy_bundle Policy, observer Observer = moving_average_minmax_observer>
class qat_linear {
  static_assert(std::is_same_v<typename Policy::storage_type, float>,
                "quant::qat_linear<Policy>: quantization-aware training runs under the fp32 policy (fake quantization "
                "is an fp32 computation); train with trident::policy<trident::fp32, trident::cpu>");

 public:
  using S = float;
  using D = typename Policy::device;
  using observer_type = Observer;

  /// Declares `name.weight` (out, in) and, with bias, `name.bias` (out), as nn::linear does.
  qat_linear(nn::parameter_store<Policy>& store, const std::string& name, index_t in, index_t out, bool bias = true,
             activation act = activation::none, qat_options options = {}, Observer obs = Observer{})
      : store_(&store), name_(name), in_(in), out_(out), act_(act), options_(options), observer_(std::move(obs)) {
    if (in <= 0 || out <= 0) {
      throw shape_error("quant::qat_linear '" + name + "': features must be positive, got in " + std::to_string(in) +
                        ", out " + std::to_string(out));
    }
    if (options.freeze_observer_after < 0) {
      throw error("quant::qat_linear '" + name + "': freeze_observer_after must not be negative, got " +
                  std::to_string(options.freeze_observer_after));
    }
    weight_ = store.declare(name + ".weight", {out, in}, true);
    if (bias) bias_ = store.declare(name + ".bias", {out}, false);
  }

  /// PyTorch's default initialisation, as nn::linear: weight and bias ~ U(±1/sqrt(in)).
  void init(generator& gen) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(in_));
    uniform(store_->param(weight_), gen, -bound, bound);
    if (bias_.valid()) uniform(store_->param(bias_), gen, -bound, bound);
  }

  const std::string& name() const noexcept { return name_; }
  index_t in_features() const noexcept { return in_; }
  index_t out_features() const noexcept { return out_; }
  activation act() const noexcept { return act_; }
  nn::parameter_handle weight() const noexcept { return weight_; }
  nn::parameter_handle bias() const noexcept { return bias_; }
  nn::parameter_store<Policy>& store() const noexcept { return *store_; }
  const qat_options& options() const noexcept { return options_; }
  bool input_grad() const noexcept { return input_grad_; }
  void set_input_grad(bool on) noexcept { input_grad_ = on; }

  /// The activation observer.
  const Observer& observer() const noexcept { return observer_; }
  Observer& observer() noexcept { return observer_; }
  /// Training forwards run so far.
  std::int64_t steps() const noexcept { return steps_; }
  /// Whether the observer no longer updates (freeze_observer_after reached, or freeze_observer()).
  bool observer_frozen() const noexcept { return frozen_ || steps_ >= options_.freeze_observer_after; }
  /// Freezes the observer now.
  void freeze_observer() noexcept { frozen_ = true; }
  /// The input's quantization parameters (uint8, affine) as the observer has them now.
  qparams input_params() const {
    if (observer_.empty()) {
      throw error("quant::qat_linear '" + name_ + "': the activation observer has seen no input; run training forwards "
                  "(with freeze_observer_after > 0) before an eval forward or a conversion");
    }
    return observer_.template params<std::uint8_t>();
  }
  /// The weights' per-channel scales of the last forward.
  std::span<const float> weight_scales() const noexcept { return scales_; }

  std::int64_t flops() const noexcept { return 2 * static_cast<std::int64_t>(rows_) * in_ * out_; }
  std::int64_t backward_flops() const noexcept { return (input_grad_ ? 2 : 1) * flops(); }

  /// x (..., in) -> y (..., out) = act(fq(x) fq(W)^T + b). A training forward first shows x
  /// to the observer (until it is frozen).
  tensor_view<S, D> forward(nn::context<Policy>& ctx, tensor_view<const S, D> x) {
    if (x.rank() < 1 || x.size(x.rank() - 1) != in_) {
      throw shape_error("quant::qat_linear::forward '" + name_ + "': input has shape " + x.shape().str() +
                        " but the layer takes (..., " + std::to_string(in_) + ")");
    }
    rows_ = x.numel() / in_;
    auto xc = ctx.contiguous(x).reshape({rows_, in_});
    out_shape_ = x.shape();
    out_shape_[out_shape_.rank() - 1] = out_;
    if (ctx.training) {
      if (!observer_frozen()) observer_.observe(xc);
      ++steps_;
    }
    const qparams p = input_params();
    const auto n = static_cast<std::size_t>(rows_ * in_);
    auto xq = ctx.template allocate<S>({rows_, in_});
    mask_ = ctx.template allocate<S>({rows_, in_});
    fake_quantize<std::uint8_t>(std::span<const float>(xc.data(), n), p, std::span<float>(xq.data(), n),
                                std::span<float>(mask_.data(), n), name_ + " input");
    xq_ = xq;
    auto wq = ctx.template allocate<S>({out_, in_});
    scales_.resize(static_cast<std::size_t>(out_));
    auto w = ctx.contiguous(tensor_view<const S, D>(store_->param(weight_)));
    fake_quantize_weight(w.data(), out_, in_, wq.data(), scales_.data(), name_ + ".weight");
    wq_ = wq;

    auto z = ctx.template allocate<S>({rows_, out_});
    gemm_options opt;
    opt.act = act_ == activation::relu ? activation::relu : activation::none;
    if (bias_.valid()) {
      gemm(xq_, wq_.t(), z, opt, tensor_view<const S, D>(store_->param(bias_)));
    } else {
      gemm(xq_, wq_.t(), z, opt);
    }
    y_ = nn::activate_after_gemm(ctx, act_, z, pre_);
    return y_.reshape(out_shape_);
  }

  /// dy (..., out) -> dx (..., in): dW += dz^T fq(x) (the STE carries it to the fp32 master
  /// weights), db += sum dz, dx = (dz fq(W)) masked to the inputs the clamp did not cut.
  tensor_view<S, D> backward(nn::context<Policy>& ctx, tensor_view<const S, D> dy_in) {
    if (!(dy_in.shape() == out_shape_)) {
      throw shape_error("quant::qat_linear::backward '" + name_ + "': gradient has shape " + dy_in.shape().str() +
                        " but the output had shape " + out_shape_.str());
    }
    tensor_view<const S, D> dy = ctx.contiguous(dy_in).reshape({rows_, out_});
    const tensor_view<const S, D> dz =
        nn::activation_backward(ctx, act_, dy, tensor_view<const S, D>(y_), tensor_view<const S, D>(pre_));
    gemm_options acc;
    acc.beta = 1.0;
    gemm(dz.t(), tensor_view<const S, D>(xq_), store_->grad(weight_), acc);
    if (bias_.valid()) nn::accumulate_bias_gradient<S>(ctx, *store_, bias_, dz);
    store_->grad_ready(weight_);
    if (!input_grad_) return {};
    auto dx = ctx.template allocate<S>({rows_, in_});
    gemm(dz, tensor_view<const S, D>(wq_), dx);
    mul(dx, mask_, dx);
    index_array ext{};
    for (int d = 0; d < out_shape_.rank(); ++d) ext[d] = out_shape_[d];
    ext[out_shape_.rank() - 1] = in_;
    return dx.reshape(shape(out_shape_.rank(), ext));
  }

 private:
  nn::parameter_store<Policy>* store_;
  std::string name_;
  index_t in_, out_;
  activation act_;
  qat_options options_;
  Observer observer_;
  bool frozen_ = false;
  bool input_grad_ = true;
  std::int64_t steps_ = 0;
  nn::parameter_handle weight_{}, bias_{};
  std::vector<float> scales_;
  // kept from forward for backward (this step's memory)
  index_t rows_ = 0;
  tensor_view<S, D> xq_{}, mask_{}, wq_{}, y_{}, pre_{};
  shape out_shape_{};
};

}  // namespace trident::quant
