#pragma once
/// @file train/step.hpp
/// What happens between backward and the next forward, as the precision policy dictates:
///
/// - fp32, bf16_mixed, fp64: no loss scaling. With clipping, one pass computes the global
///   gradient norm; the optimizer's fused pass applies the clip factor. A non-finite gradient
///   norm is an error naming the first tensor whose gradient is not finite (training in these
///   precisions never overflows by design, so it is a divergence, not something to skip).
/// - fp16_mixed: the loss is multiplied by the loss scale before backward. One pass computes the
///   norm of the scaled gradients and detects overflow; the scaler decides (DeepSpeed's rules)
///   whether the step is applied; the optimizer's fused pass unscales and clips with a single
///   factor, clip / scale, so the gradients are read twice in all (norm, step).
///
///   train::step_control<P> control({.gradient_clipping = 1.0});
///   loss.backward(ctx, control.loss_scale() / accumulation_steps);   // per micro-batch
///   const auto r = control.step(store, opt);                         // after the last one
///   if (r.applied) sched.step(opt);                                  // DeepSpeed skips it too
///   store.zero_grad();

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "../core/error.hpp"
#include "../core/policy.hpp"
#include "../nn/parameters.hpp"
#include "../optim/clip.hpp"
#include "../precision/loss_scaler.hpp"

namespace trident::train {

/// The gradient handling of a training run (DeepSpeed's config names).
struct step_options {
  double gradient_clipping = 0.0;                ///< max global L2 norm; 0 = no clipping
  double loss_scale = 0.0;                       ///< fp16: 0 = dynamic (below), > 0 = this static scale
  dynamic_loss_scaler_options dynamic_scaler{};  ///< fp16 with dynamic scaling
};

/// What one optimizer step did.
struct step_outcome {
  bool applied = true;  ///< false: skipped for an fp16 overflow
  double grad_norm = std::numeric_limits<double>::quiet_NaN();  ///< unscaled global L2 norm (NaN: not computed)
  double clip = 1.0;        ///< the factor the gradients were multiplied by (≤ 1)
  double loss_scale = 1.0;  ///< the scale backward used
  double grad_scale = 1.0;  ///< what the optimizer multiplied the gradients by: clip / loss_scale
};

/// Loss scaling, overflow handling, clipping and the optimizer step for one policy.
/// @tparam Policy the policy bundle of the model
template <policy_bundle Policy>
class step_control {
 public:
  /// Whether the policy scales the loss (fp16_mixed).
  static constexpr bool scaled = Policy::traits::loss_scaling;

  explicit step_control(const step_options& o = {}) : o_(o), dynamic_(o.dynamic_scaler), static_(static_scale(o)) {
    if (!(o.gradient_clipping >= 0) || !std::isfinite(o.gradient_clipping)) {
      throw error("train::step_control: gradient_clipping must be finite and >= 0 (0 = off), got " +
                  std::to_string(o.gradient_clipping));
    }
    if (!(o.loss_scale >= 0) || !std::isfinite(o.loss_scale)) {
      throw error("train::step_control: loss_scale must be finite and >= 0 (0 = dynamic), got " + std::to_string(o.loss_scale));
    }
  }

  /// The factor the loss is multiplied by before backward (1 without loss scaling).
  double loss_scale() const noexcept {
    if constexpr (scaled) {
      return use_static() ? static_.scale() : dynamic_.scale();
    } else {
      return 1.0;
    }
  }

  /// Steps skipped for overflow so far.
  std::int64_t skipped_steps() const noexcept {
    if constexpr (scaled) {
      return use_static() ? static_.skipped_steps() : dynamic_.skipped_steps();
    } else {
      return 0;
    }
  }

  /// The dynamic scaler (state for checkpoints, its trajectory for logs).
  dynamic_loss_scaler& scaler() noexcept { return dynamic_; }
  const step_options& options() const noexcept { return o_; }

  /// One line for run summaries: the loss scaling and clipping in use.
  std::string describe() const {
    std::string s;
    if constexpr (scaled) {
      s = use_static() ? static_.describe() : dynamic_.describe();
    } else {
      s = "no loss scaling";
    }
    s += o_.gradient_clipping > 0 ? ", gradient clipping at L2 norm " + std::to_string(o_.gradient_clipping) : ", no clipping";
    return s;
  }

  /// After the last micro-batch's backward: decides the step, then runs `opt` over `store`
  /// with the unscale and clip factors fused into its pass. Does not zero the gradients.
  template <class Optimizer>
  step_outcome step(nn::parameter_store<Policy>& store, Optimizer& opt) {
    const step_outcome r = decide([&] { return optim::grad_norm(store); }, [&] { return optim::first_nonfinite(store); });
    if (r.applied) opt.step(store, r.grad_scale);
    return r;
  }

  /// The decision step() takes, with the gradients' norm and the name of a non-finite tensor
  /// supplied by the caller: a distributed step computes both over every rank, so that all
  /// ranks decide alike. `norm()` returns the grad_norm_result of the gradients as stored (of
  /// the scaled gradients under loss scaling) and is called only when clipping or loss scaling
  /// needs it; `first_bad()` names the first tensor with a non-finite gradient and is called
  /// only when the norm is not finite. Counts the step; the caller applies the optimizer with
  /// the outcome's grad_scale when it is `applied`.
  template <class NormFn, class BadFn>
  step_outcome decide(NormFn&& norm, BadFn&& first_bad) {
    step_outcome r;
    r.loss_scale = loss_scale();
    const bool clipping = o_.gradient_clipping > 0;
    if (!scaled && !clipping) {
      ++steps_;
      return r;
    }
    const optim::grad_norm_result gn = norm();
    if constexpr (scaled) {
      const std::string bad = gn.finite ? std::string() : std::string(first_bad());
      const bool applied = use_static() ? static_.update(!gn.finite, bad) : dynamic_.update(!gn.finite, bad);
      if (!applied) {
        r.applied = false;
        r.grad_scale = 0.0;
        ++steps_;
        return r;
      }
    } else if (!gn.finite) {
      throw error("train::step_control: the gradient of '" + std::string(first_bad()) + "' is not finite at step " +
                  std::to_string(steps_) + " (" + Policy::traits::name +
                  " has no loss scaling to skip it): the run diverged; lower the learning rate or clip gradients");
    }
    r.grad_norm = gn.norm / r.loss_scale;
    r.clip = clipping ? optim::clip_factor(r.grad_norm, o_.gradient_clipping) : 1.0;
    r.grad_scale = r.clip / r.loss_scale;
    ++steps_;
    return r;
  }

 private:
  bool use_static() const noexcept { return o_.loss_scale > 0; }
  static double static_scale(const step_options& o) { return o.loss_scale > 0 && std::isfinite(o.loss_scale) ? o.loss_scale : 1.0; }

  step_options o_;
  dynamic_loss_scaler dynamic_;
  static_loss_scaler static_;
  std::int64_t steps_ = 0;
};

}  // namespace trident::train
