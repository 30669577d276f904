#pragma once
/// @file sched/scheduler.hpp
/// What trident's learning-rate schedulers share. They are DeepSpeed's (deepspeed/runtime/
/// lr_schedules.py), with its parameter names and its step convention:
///
/// - `last_batch_iteration` is the index of the last batch trained; it starts at -1.
/// - Constructed with last_batch_iteration = -1, a scheduler sets the optimizer's lr at once
///   (to lr_at(-1): WarmupLR/WarmupDecayLR warmup_min_lr, WarmupCosineLR 0, OneCycle
///   cycle_min_lr, LRRangeTest lr_range_test_min_lr), so the first batch trains with it.
///   Constructed with another value (resuming), it leaves the optimizer alone until step().
/// - step() is called after each optimizer step: it increments last_batch_iteration and sets
///   lr_at(last_batch_iteration). The first step() therefore computes iteration 0, and the
///   second batch trains with lr_at(0). DeepSpeed's engine does not step the scheduler on a
///   step skipped for fp16 overflow; neither should the caller.
///
/// lr_at(t) is pure: the lr DeepSpeed's get_lr() returns when last_batch_iteration is t.
/// Schedulers set the optimizer's base lr (optimizer.set_lr); parameter groups keep their
/// lr_scale on top of it (DeepSpeed gives every group the same lr).

#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <string_view>

#include "../core/error.hpp"

namespace trident::sched {

/// An optimizer whose learning rate a scheduler can read and set.
template <class O>
concept lr_controlled = requires(O& o, const O& co, double x) {
  { co.lr() } -> std::convertible_to<double>;
  o.set_lr(x);
};

/// Adam-family optimizers: momentum is β1 (sched::one_cycle sets (β1, β2) like DeepSpeed).
template <class O>
concept has_betas = requires(O& o, double x) {
  o.betas();
  o.set_betas(x, x);
};

/// SGD-like optimizers: a momentum coefficient.
template <class O>
concept has_momentum = requires(O& o, const O& co, double x) {
  { co.momentum() } -> std::convertible_to<double>;
  o.set_momentum(x);
};

/// DeepSpeed's warmup_type: how the lr rises during warm-up.
enum class warmup_kind {
  log,    ///< "log": min + (max − min)·ln(t + 1)/ln(warmup_num_steps)
  linear  ///< "linear": min + (max − min)·t/warmup_num_steps
};

/// Parses DeepSpeed's warmup_type strings. DeepSpeed logs a warning and falls back to "log" for
/// an unknown string; we refuse it.
inline warmup_kind parse_warmup_type(std::string_view s) {
  if (s == "log") return warmup_kind::log;
  if (s == "linear") return warmup_kind::linear;
  throw error("sched: unknown warmup_type '" + std::string(s) + "' (DeepSpeed knows \"log\" and \"linear\")");
}

namespace detail {

inline std::string fmt(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

inline void require(bool ok, const char* who, const std::string& what) {
  if (!ok) throw error(std::string(who) + ": " + what);
}

inline void require_lr(const char* who, const char* name, double v) {
  require(std::isfinite(v) && v >= 0, who, std::string(name) + " must be finite and >= 0, got " + fmt(v));
}

/// DeepSpeed refuses warmup_num_steps <= 0 (ValueError) and clamps the rest to at least 2
/// (ln(1) would divide by zero).
inline std::int64_t effective_warmup(const char* who, std::int64_t warmup_num_steps) {
  require(warmup_num_steps > 0, who, "warmup_num_steps must be a positive integer, got " + std::to_string(warmup_num_steps));
  return warmup_num_steps < 2 ? 2 : warmup_num_steps;
}

/// The warm-up fraction (0 at t = 0, 1 at the end) of WarmupLR / WarmupDecayLR / WarmupCosineLR.
inline double warmup_gamma(warmup_kind kind, std::int64_t t, std::int64_t warmup) {
  if (kind == warmup_kind::log) return std::log(static_cast<double>(t + 1)) / std::log(static_cast<double>(warmup));
  return static_cast<double>(t) / static_cast<double>(warmup);
}

}  // namespace detail

/// The step bookkeeping every scheduler shares (CRTP: Derived provides lr_at and may provide
/// apply_extra(optimizer, t) for what it sets besides the lr).
/// @tparam Derived the scheduler
template <class Derived>
class scheduler_base {
 public:
  /// Advances one batch: last_batch_iteration + 1, and sets the optimizer's lr for it.
  template <lr_controlled O>
  void step(O& optimizer) {
    step(optimizer, last_ + 1);
  }
  /// Sets last_batch_iteration to `batch_iteration` and applies its lr (DeepSpeed's step(n)).
  template <lr_controlled O>
  void step(O& optimizer, std::int64_t batch_iteration) {
    last_ = batch_iteration;
    apply(optimizer);
  }
  /// The index of the last batch (DeepSpeed's state_dict()).
  std::int64_t last_batch_iteration() const noexcept { return last_; }
  /// Restores last_batch_iteration (DeepSpeed's load_state_dict()); the lr follows at the next step().
  void set_last_batch_iteration(std::int64_t t) noexcept { last_ = t; }
  /// The lr this scheduler last set (NaN before it set any).
  double last_lr() const noexcept { return last_lr_; }

 protected:
  explicit scheduler_base(std::int64_t last_batch_iteration) : last_(last_batch_iteration) {}

  /// DeepSpeed's constructors set the lr only when starting from the beginning.
  template <class O>
  void apply_initial(O& optimizer) {
    if (last_ == -1) apply(optimizer);
  }

  template <class O>
  void apply(O& optimizer) {
    auto& self = static_cast<Derived&>(*this);
    last_lr_ = self.lr_at(last_);
    optimizer.set_lr(last_lr_);
    self.apply_extra(optimizer, last_);
  }
  template <class O>
  void apply_extra(O&, std::int64_t) {}

  std::int64_t last_ = -1;
  double last_lr_ = std::numeric_limits<double>::quiet_NaN();
};

}  // namespace trident::sched
