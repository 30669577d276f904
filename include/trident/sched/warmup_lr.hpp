#pragma once
/// @file sched/warmup_lr.hpp
/// DeepSpeed's WarmupLR and WarmupDecayLR.
///
/// With W = max(2, warmup_num_steps) and T = total_num_steps, at iteration t:
///
///     t < 0          warmup_min_lr (what the constructor sets)
///     t < W          min + (max − min)·γ,  γ = ln(t + 1)/ln(W) ("log") or t/W ("linear")
///     WarmupLR:      t ≥ W: warmup_max_lr
///     WarmupDecayLR: t ≥ W: min + (max − min)·max(0, (T − t) / max(1, T − W))
///
/// (the decay reaches warmup_min_lr at t = T and stays there).

#include <algorithm>
#include <cstdint>
#include <optional>

#include "scheduler.hpp"

namespace trident::sched {

/// WarmupLR's parameters (DeepSpeed's names and defaults).
struct warmup_lr_options {
  double warmup_min_lr = 0.0;
  /// Unset: the optimizer's lr at construction (DeepSpeed's current default; older releases used 0.001).
  std::optional<double> warmup_max_lr{};
  std::int64_t warmup_num_steps = 1000;
  warmup_kind warmup_type = warmup_kind::log;
  std::int64_t last_batch_iteration = -1;
};

/// WarmupDecayLR's parameters: WarmupLR's plus total_num_steps.
struct warmup_decay_lr_options {
  std::int64_t total_num_steps = 0;  ///< required: > 0 and >= warmup_num_steps
  double warmup_min_lr = 0.0;
  /// DeepSpeed's WarmupDecayLR defaults to 0.001, not to the optimizer's lr as WarmupLR does.
  /// Reset it (std::nullopt) to take the optimizer's lr at construction.
  std::optional<double> warmup_max_lr = 0.001;
  std::int64_t warmup_num_steps = 1000;
  warmup_kind warmup_type = warmup_kind::log;
  std::int64_t last_batch_iteration = -1;
};

/// DeepSpeed's WarmupLR: warm up from warmup_min_lr to warmup_max_lr, then hold.
class warmup_lr : public scheduler_base<warmup_lr> {
 public:
  /// Pure use (lr_at, or step() on any optimizer later): warmup_max_lr must be set.
  explicit warmup_lr(const warmup_lr_options& o) : warmup_lr(o, o.warmup_max_lr, "warmup_lr") {}
  /// DeepSpeed's use: reads the optimizer's lr for an unset warmup_max_lr, and sets the lr now
  /// when last_batch_iteration is -1.
  template <lr_controlled O>
  warmup_lr(O& optimizer, const warmup_lr_options& o) : warmup_lr(o, o.warmup_max_lr.value_or(optimizer.lr()), "warmup_lr") {
    apply_initial(optimizer);
  }

  /// The lr at iteration t.
  double lr_at(std::int64_t t) const noexcept {
    if (t < 0) return min_lr_;
    if (t < warmup_) return min_lr_ + (max_lr_ - min_lr_) * detail::warmup_gamma(kind_, t, warmup_);
    return max_lr_;
  }

  double warmup_min_lr() const noexcept { return min_lr_; }
  double warmup_max_lr() const noexcept { return max_lr_; }
  /// W = max(2, warmup_num_steps), as DeepSpeed clamps it.
  std::int64_t warmup_num_steps() const noexcept { return warmup_; }
  warmup_kind warmup_type() const noexcept { return kind_; }

 protected:
  warmup_lr(const warmup_lr_options& o, std::optional<double> max_lr, const char* who)
      : scheduler_base(o.last_batch_iteration), min_lr_(o.warmup_min_lr), kind_(o.warmup_type) {
    detail::require(max_lr.has_value(), who, "warmup_max_lr is not set (set it, or construct with the optimizer to use its lr)");
    max_lr_ = *max_lr;
    detail::require_lr(who, "warmup_min_lr", min_lr_);
    detail::require_lr(who, "warmup_max_lr", max_lr_);
    warmup_ = detail::effective_warmup(who, o.warmup_num_steps);
  }

  double min_lr_;
  double max_lr_ = 0;
  std::int64_t warmup_ = 2;
  warmup_kind kind_;
};

/// DeepSpeed's WarmupDecayLR: WarmupLR's warm-up, then a linear decay to warmup_min_lr at
/// total_num_steps.
class warmup_decay_lr : public scheduler_base<warmup_decay_lr> {
 public:
  /// Pure use: warmup_max_lr must be set (it is, to DeepSpeed's 0.001, unless reset).
  explicit warmup_decay_lr(const warmup_decay_lr_options& o) : warmup_decay_lr(o, o.warmup_max_lr) {}
  /// DeepSpeed's use: a warmup_max_lr reset to std::nullopt is the optimizer's lr; sets the lr
  /// now when last_batch_iteration is -1.
  template <lr_controlled O>
  warmup_decay_lr(O& optimizer, const warmup_decay_lr_options& o) : warmup_decay_lr(o, o.warmup_max_lr.value_or(optimizer.lr())) {
    apply_initial(optimizer);
  }

  /// The lr at iteration t.
  double lr_at(std::int64_t t) const noexcept {
    if (t < 0) return min_lr_;
    double gamma;
    if (t < warmup_) {
      gamma = detail::warmup_gamma(kind_, t, warmup_);
    } else {
      gamma = std::max(0.0, static_cast<double>(total_ - t) / std::max(1.0, static_cast<double>(total_ - warmup_)));
    }
    return min_lr_ + (max_lr_ - min_lr_) * gamma;
  }

  std::int64_t total_num_steps() const noexcept { return total_; }
  double warmup_min_lr() const noexcept { return min_lr_; }
  double warmup_max_lr() const noexcept { return max_lr_; }
  std::int64_t warmup_num_steps() const noexcept { return warmup_; }
  warmup_kind warmup_type() const noexcept { return kind_; }

 private:
  warmup_decay_lr(const warmup_decay_lr_options& o, std::optional<double> max_lr)
      : scheduler_base(o.last_batch_iteration), total_(o.total_num_steps), min_lr_(o.warmup_min_lr), kind_(o.warmup_type) {
    constexpr const char* who = "warmup_decay_lr";
    detail::require(max_lr.has_value(), who, "warmup_max_lr is not set (set it, or construct with the optimizer to use its lr)");
    max_lr_ = *max_lr;
    detail::require_lr(who, "warmup_min_lr", min_lr_);
    detail::require_lr(who, "warmup_max_lr", max_lr_);
    warmup_ = detail::effective_warmup(who, o.warmup_num_steps);
    detail::require(total_ > 0, who, "total_num_steps must be > 0, got " + std::to_string(total_));
    // DeepSpeed only logs a warning here; a decay that starts after the end is a config error.
    detail::require(total_ >= warmup_, who,
                    "warmup_num_steps (" + std::to_string(warmup_) + (o.warmup_num_steps < 2 ? ", DeepSpeed's minimum" : "") +
                        ") exceeds total_num_steps (" + std::to_string(total_) + ")");
  }

  std::int64_t total_;
  double min_lr_;
  double max_lr_ = 0;
  std::int64_t warmup_ = 2;
  warmup_kind kind_;
};

}  // namespace trident::sched
