#pragma once
/// @file sched/warmup_cosine_lr.hpp
/// DeepSpeed's WarmupCosineLR: a ratio of the optimizer's lr at construction (base lr), warmed
/// up from warmup_min_ratio to 1, then decayed along a cosine to cos_min_ratio.
///
/// With W = max(2, warmup_num_steps) and T = total_num_steps, at iteration t:
///
///     t < 0    0 (DeepSpeed's get_lr() before the start; the constructor sets the lr to 0)
///     t < W    base · (wmin + (1 − wmin)·γ),  γ = ln(t + 1)/ln(W) ("log") or t/W ("linear")
///     t ≥ W    base · max(0, cmin + (1 − cmin)·(1 + cos(π·p))/2),
///              p = min(1, (t − W + 1)/max(1, T − W))
///
/// As in DeepSpeed, the cosine progress p is clamped at 1: from t = T − 1 on the ratio stays at
/// cos_min_ratio (it does not turn back up past total_num_steps).

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "scheduler.hpp"

namespace trident::sched {

/// WarmupCosineLR's parameters (DeepSpeed's names and defaults).
struct warmup_cosine_lr_options {
  std::int64_t total_num_steps = 0;  ///< required: >= max(2, warmup_num_steps)
  double warmup_min_ratio = 0.0;
  std::int64_t warmup_num_steps = 1000;
  double cos_min_ratio = 0.0001;
  warmup_kind warmup_type = warmup_kind::log;
  std::int64_t last_batch_iteration = -1;
};

/// DeepSpeed's WarmupCosineLR.
class warmup_cosine_lr : public scheduler_base<warmup_cosine_lr> {
 public:
  /// Pure use: the lr ratios apply to `base_lr`.
  warmup_cosine_lr(const warmup_cosine_lr_options& o, double base_lr)
      : scheduler_base(o.last_batch_iteration),
        base_lr_(base_lr),
        total_(o.total_num_steps),
        wmin_(o.warmup_min_ratio),
        cmin_(o.cos_min_ratio),
        kind_(o.warmup_type) {
    constexpr const char* who = "warmup_cosine_lr";
    detail::require_lr(who, "the base lr (the optimizer's lr)", base_lr_);
    detail::require(std::isfinite(wmin_) && wmin_ >= 0, who, "warmup_min_ratio must be finite and >= 0, got " + detail::fmt(wmin_));
    detail::require(std::isfinite(cmin_) && cmin_ >= 0, who, "cos_min_ratio must be finite and >= 0, got " + detail::fmt(cmin_));
    warmup_ = detail::effective_warmup(who, o.warmup_num_steps);
    detail::require(total_ > 0, who, "total_num_steps must be > 0, got " + std::to_string(total_));
    // DeepSpeed only warns when total < warmup (every step after the warm-up then sits at
    // cos_min_ratio); a decay that would start after the end is a config error.
    detail::require(total_ >= warmup_, who,
                    "warmup_num_steps (" + std::to_string(warmup_) + (o.warmup_num_steps < 2 ? ", DeepSpeed's minimum" : "") +
                        ") exceeds total_num_steps (" + std::to_string(total_) + ")");
  }
  /// DeepSpeed's use: the base lr is the optimizer's lr now; sets the lr (to 0) now when
  /// last_batch_iteration is -1.
  template <lr_controlled O>
  warmup_cosine_lr(O& optimizer, const warmup_cosine_lr_options& o) : warmup_cosine_lr(o, optimizer.lr()) {
    apply_initial(optimizer);
  }

  /// The lr ratio (of the base lr) at iteration t.
  double ratio_at(std::int64_t t) const noexcept {
    if (t < 0) return 0.0;
    if (t < warmup_) return wmin_ + (1.0 - wmin_) * detail::warmup_gamma(kind_, t, warmup_);
    const double x = std::min(1.0, static_cast<double>(t - warmup_ + 1) / static_cast<double>(std::max<std::int64_t>(1, total_ - warmup_)));
    const double pi = 3.14159265358979323846;
    return std::max(0.0, cmin_ + (1.0 - cmin_) * (1.0 + std::cos(pi * x)) / 2.0);
  }
  /// The lr at iteration t: base lr × ratio_at(t).
  double lr_at(std::int64_t t) const noexcept { return base_lr_ * ratio_at(t); }

  double base_lr() const noexcept { return base_lr_; }
  std::int64_t total_num_steps() const noexcept { return total_; }
  std::int64_t warmup_num_steps() const noexcept { return warmup_; }

 private:
  double base_lr_;
  std::int64_t total_;
  double wmin_, cmin_;
  std::int64_t warmup_ = 2;
  warmup_kind kind_;
};

}  // namespace trident::sched
