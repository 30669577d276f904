#pragma once
/// @file sched/one_cycle.hpp
/// DeepSpeed's OneCycle (1Cycle policy, Smith 2018): the lr rises from cycle_min_lr to
/// cycle_max_lr over cycle_first_step_size iterations, falls back over cycle_second_step_size,
/// then decays; momentum moves the opposite way between cycle_max_mom and cycle_min_mom.
///
/// With S1, S2 the step sizes, C = S1 + S2, ρ = S1/C, at iteration t (b = t + 1):
///
///     t < C:   x = b/C − ⌊b/C⌋ (so x = b/C inside the cycle)
///              s = x/ρ when x ≤ ρ, else (x − 1)/(ρ − 1)
///              with a stair count n > 0 for that half (cycle_first_stair_count when x ≤ ρ,
///              else cycle_second_stair_count, which defaults to the first), s is held in n
///              stairs instead: with c = b mod C,
///                s = ⌊c·n/S1⌋/n when c ≤ S1, else ⌊(C − c)·n/S2⌋/n
///              lr = min_lr + (max_lr − min_lr)·s,   mom = max_mom − (max_mom − min_mom)·s
///     t ≥ C:   d = t − C + 1
///              lr = min_lr / (1 + decay_lr_rate·d/decay_step_size)     (min_lr if either is 0)
///              mom = max_mom · (1 + decay_mom_rate·d/decay_step_size)   (max_mom if either is 0)
///
/// The constructor (last_batch_iteration -1) sets lr = cycle_min_lr and momentum =
/// cycle_min_mom, as DeepSpeed does (the formula would give cycle_max_mom there: DeepSpeed's
/// momentum jumps at the first step, and so does ours).
///
/// Where we follow DeepSpeed, and where we cannot:
/// - cycle_first_stair_count / cycle_second_stair_count: 0 (the default) keeps the cycle
///   continuous; DeepSpeed also treats a negative count as 0, we refuse it.
/// - Momentum on Adam-family optimizers (anything with set_betas) is β1, and DeepSpeed sets the
///   pair (mom, 0.99): β2 becomes 0.99 whatever it was. We do the same, so the numbers match.
/// - DeepSpeed disables momentum cycling (with a warning) for optimizers without betas, which
///   includes torch.optim.SGD. We cycle SGD's momentum (set_momentum) instead; optimizers with
///   neither (Adagrad) ignore cycle_momentum.
/// - decay_mom_rate > 0 makes momentum grow past cycle_max_mom during the decay, as in
///   DeepSpeed; once it reaches 1 the optimizer refuses it with an error.

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "scheduler.hpp"

namespace trident::sched {

/// OneCycle's parameters (DeepSpeed's names and defaults; the two lrs are required).
struct one_cycle_options {
  double cycle_min_lr = std::numeric_limits<double>::quiet_NaN();  ///< required
  double cycle_max_lr = std::numeric_limits<double>::quiet_NaN();  ///< required
  double decay_lr_rate = 0.0;
  std::int64_t cycle_first_step_size = 2000;
  std::optional<std::int64_t> cycle_second_step_size{};  ///< unset: cycle_first_step_size
  std::int64_t cycle_first_stair_count = 0;               ///< stairs in the rising half; 0: continuous
  std::optional<std::int64_t> cycle_second_stair_count{}; ///< stairs in the falling half; unset: cycle_first_stair_count
  std::int64_t decay_step_size = 0;
  bool cycle_momentum = true;
  double cycle_min_mom = 0.8;
  double cycle_max_mom = 0.9;
  double decay_mom_rate = 0.0;
  std::int64_t last_batch_iteration = -1;
};

/// DeepSpeed's OneCycle.
class one_cycle : public scheduler_base<one_cycle> {
 public:
  /// The β2 DeepSpeed's OneCycle sets with every β1 it cycles.
  static constexpr double deepspeed_beta2 = 0.99;

  /// Pure use (lr_at, momentum_at).
  explicit one_cycle(const one_cycle_options& o) : scheduler_base(o.last_batch_iteration), o_(o) {
    constexpr const char* who = "one_cycle";
    detail::require(!std::isnan(o.cycle_min_lr), who, "cycle_min_lr is required");
    detail::require(!std::isnan(o.cycle_max_lr), who, "cycle_max_lr is required");
    detail::require_lr(who, "cycle_min_lr", o.cycle_min_lr);
    detail::require_lr(who, "cycle_max_lr", o.cycle_max_lr);
    detail::require(std::isfinite(o.decay_lr_rate) && o.decay_lr_rate >= 0, who,
                    "decay_lr_rate must be finite and >= 0, got " + detail::fmt(o.decay_lr_rate));
    detail::require(o.cycle_first_step_size > 0, who, "cycle_first_step_size must be > 0, got " + std::to_string(o.cycle_first_step_size));
    const std::int64_t second = o.cycle_second_step_size.value_or(o.cycle_first_step_size);
    detail::require(second > 0, who, "cycle_second_step_size must be > 0, got " + std::to_string(second));
    detail::require(o.cycle_first_stair_count >= 0 && o.cycle_second_stair_count.value_or(0) >= 0, who, "stair counts must be >= 0");
    detail::require(o.decay_step_size >= 0, who, "decay_step_size must be >= 0, got " + std::to_string(o.decay_step_size));
    if (o.cycle_momentum) {
      detail::require(o.cycle_min_mom >= 0 && o.cycle_min_mom < 1, who, "cycle_min_mom must be in [0, 1), got " + detail::fmt(o.cycle_min_mom));
      detail::require(o.cycle_max_mom >= 0 && o.cycle_max_mom < 1, who, "cycle_max_mom must be in [0, 1), got " + detail::fmt(o.cycle_max_mom));
      detail::require(std::isfinite(o.decay_mom_rate), who, "decay_mom_rate must be finite");
    }
    first_ = static_cast<double>(o.cycle_first_step_size);
    second_ = static_cast<double>(second);
    total_ = first_ + second_;
    ratio_ = first_ / total_;
    first_stairs_ = o.cycle_first_stair_count;
    second_stairs_ = o.cycle_second_stair_count.value_or(o.cycle_first_stair_count);
    skip_lr_decay_ = o.decay_step_size == 0 || o.decay_lr_rate == 0.0;
    skip_mom_decay_ = o.decay_step_size == 0 || o.decay_mom_rate == 0.0;
  }
  /// DeepSpeed's use: sets lr = cycle_min_lr (and momentum = cycle_min_mom) now when
  /// last_batch_iteration is -1.
  template <lr_controlled O>
  one_cycle(O& optimizer, const one_cycle_options& o) : one_cycle(o) {
    apply_initial(optimizer);
  }

  /// The lr at iteration t.
  double lr_at(std::int64_t t) const noexcept {
    if (static_cast<double>(t) < total_) return o_.cycle_min_lr + (o_.cycle_max_lr - o_.cycle_min_lr) * scale_factor(t);
    if (skip_lr_decay_) return o_.cycle_min_lr;
    const double interval = static_cast<double>(t - static_cast<std::int64_t>(total_) + 1) / static_cast<double>(o_.decay_step_size);
    return o_.cycle_min_lr / (1.0 + o_.decay_lr_rate * interval);
  }

  /// The momentum (SGD μ or Adam β1) at iteration t; cycle_min_mom before the first step.
  double momentum_at(std::int64_t t) const noexcept {
    if (t < 0) return o_.cycle_min_mom;
    if (static_cast<double>(t) < total_) return o_.cycle_max_mom - (o_.cycle_max_mom - o_.cycle_min_mom) * scale_factor(t);
    if (skip_mom_decay_) return o_.cycle_max_mom;
    const double interval = static_cast<double>(t - static_cast<std::int64_t>(total_) + 1) / static_cast<double>(o_.decay_step_size);
    return o_.cycle_max_mom * (1.0 + o_.decay_mom_rate * interval);
  }

  const one_cycle_options& options() const noexcept { return o_; }

 private:
  friend class scheduler_base<one_cycle>;

  double scale_factor(std::int64_t t) const noexcept {
    const double b = static_cast<double>(t + 1);
    const double cycle = std::floor(1.0 + b / total_);
    const double x = 1.0 + b / total_ - cycle;
    const bool rising = x <= ratio_;
    const std::int64_t stairs = rising ? first_stairs_ : second_stairs_;
    if (stairs <= 0) return rising ? x / ratio_ : (x - 1.0) / (ratio_ - 1.0);
    // As DeepSpeed: the stair comes from the integer batch offset, not from the float x, which
    // can land just under a whole stair at a half-cycle boundary.
    const double n = static_cast<double>(stairs);
    const double c = std::fmod(b, total_);
    const double position = c <= first_ ? c * n / first_ : (total_ - c) * n / second_;
    return std::floor(position) / n;
  }

  template <class O>
  void apply_extra(O& optimizer, std::int64_t t) {
    if (!o_.cycle_momentum) return;
    const double mom = momentum_at(t);
    if constexpr (has_betas<O>) {
      optimizer.set_betas(mom, deepspeed_beta2);
    } else if constexpr (has_momentum<O>) {
      optimizer.set_momentum(mom);
    }
  }

  one_cycle_options o_;
  double first_ = 0, second_ = 0;
  double total_ = 0;
  double ratio_ = 0.5;
  std::int64_t first_stairs_ = 0, second_stairs_ = 0;
  bool skip_lr_decay_ = true;
  bool skip_mom_decay_ = true;
};

}  // namespace trident::sched
