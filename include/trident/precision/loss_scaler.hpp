#pragma once
/// @file precision/loss_scaler.hpp
/// Loss scaling for fp16 mixed precision, with DeepSpeed's DynamicLossScaler semantics and its
/// config names (the "fp16" section: initial_scale_power, loss_scale_window, hysteresis,
/// consecutive_hysteresis, min_loss_scale).
///
/// The loss is multiplied by scale() before backward, so small fp16 gradients do not flush to
/// zero. After backward, update(overflow) says whether the step may be applied:
///
/// - overflow (some gradient inf/NaN): the step is skipped and counted. If hysteresis is used
///   up (hysteresis == 1, or the remaining count is 1), the scale is divided by scale_factor
///   (not below min_loss_scale); otherwise the remaining hysteresis count drops by one and the
///   scale stays. An overflow while already at min_loss_scale with hysteresis used up throws
///   trident::error naming the first tensor whose gradient was not finite.
/// - clean step: with consecutive_hysteresis, the hysteresis count is restored at once. When
///   the clean iterations before this one since the last overflow (since the start when there
///   was none) are a positive multiple of loss_scale_window, the scale is multiplied by
///   scale_factor and, without consecutive_hysteresis, the hysteresis count is restored. So
///   the scale first grows at the update after the (window + 1)-th clean iteration in a row
///   (DeepSpeed's stable_interval = cur_iter − last_overflow_iter − 1).
///
/// The default, printed by describe(): "dynamic loss scale: initial 2^16, window 1000,
/// hysteresis 2, consecutive hysteresis off, min 1, factor 2" (DeepSpeed's fp16 defaults).
///
/// Use the scale that backward used to unscale: read scale() before update(), which may
/// change it (see optim/clip.hpp for the whole step).

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

#include "../core/error.hpp"

namespace trident {

/// DynamicLossScaler's parameters, by DeepSpeed's config names, with its defaults.
struct dynamic_loss_scaler_options {
  int initial_scale_power = 16;             ///< the first scale is 2^initial_scale_power
  std::int64_t loss_scale_window = 1000;    ///< clean iterations between scale increases
  int hysteresis = 2;                       ///< overflows tolerated before the scale drops (DeepSpeed's delayed_shift)
  bool consecutive_hysteresis = false;      ///< restore hysteresis after every clean step, not only at a window
  double min_loss_scale = 1.0;              ///< the scale never drops below this
  double scale_factor = 2.0;                ///< the factor the scale moves by
  bool raise_error_at_min_scale = true;     ///< throw on an overflow at min_loss_scale (DeepSpeed's default)
};

/// The state a checkpoint needs to resume a dynamic_loss_scaler bit-identically.
struct loss_scaler_state {
  double scale = 0;
  std::int64_t iteration = 0;           ///< DeepSpeed's cur_iter
  std::int64_t last_overflow_iteration = -1;
  int hysteresis_left = 0;              ///< DeepSpeed's cur_hysteresis
  std::int64_t skipped_steps = 0;
};

namespace detail {
inline std::string format_scale(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}
}  // namespace detail

/// DeepSpeed's DynamicLossScaler.
class dynamic_loss_scaler {
 public:
  explicit dynamic_loss_scaler(const dynamic_loss_scaler_options& o = {}) : o_(o) {
    if (o.initial_scale_power < 0 || o.initial_scale_power > 127) {
      fail("initial_scale_power must be in [0, 127], got " + std::to_string(o.initial_scale_power));
    }
    if (o.loss_scale_window < 1) fail("loss_scale_window must be >= 1, got " + std::to_string(o.loss_scale_window));
    if (o.hysteresis < 1) fail("hysteresis must be >= 1, got " + std::to_string(o.hysteresis));
    if (!(std::isfinite(o.min_loss_scale) && o.min_loss_scale > 0)) fail("min_loss_scale must be finite and > 0, got " + detail::format_scale(o.min_loss_scale));
    if (!(std::isfinite(o.scale_factor) && o.scale_factor > 1)) fail("scale_factor must be finite and > 1, got " + detail::format_scale(o.scale_factor));
    s_.scale = std::ldexp(1.0, o.initial_scale_power);
    if (s_.scale < o.min_loss_scale) {
      fail("the initial scale 2^" + std::to_string(o.initial_scale_power) + " is below min_loss_scale " + detail::format_scale(o.min_loss_scale));
    }
    s_.hysteresis_left = o.hysteresis;
  }

  /// The scale to multiply the loss by now.
  double scale() const noexcept { return s_.scale; }

  /// Records one iteration's outcome; returns whether its step is applied (false on overflow).
  /// `nonfinite_tensor` names the first tensor whose gradient was not finite
  /// (optim::first_nonfinite), for the error thrown when the scale cannot drop any further.
  bool update(bool overflow, std::string_view nonfinite_tensor = {}) {
    if (overflow) {
      if (o_.hysteresis == 1 || s_.hysteresis_left == 1) {
        if (s_.scale == o_.min_loss_scale && o_.raise_error_at_min_scale) {
          throw error("dynamic_loss_scaler: gradient overflow at the minimum loss scale " + detail::format_scale(o_.min_loss_scale) +
                      " (min_loss_scale), with hysteresis used up, at iteration " + std::to_string(s_.iteration) +
                      "; the first tensor with a non-finite gradient is " +
                      (nonfinite_tensor.empty() ? std::string("not known (no name was given)") : "'" + std::string(nonfinite_tensor) + "'") +
                      ". The fp16 run diverges: lower the learning rate, clip gradients, or train in bf16_mixed");
        }
        s_.scale = std::fmax(s_.scale / o_.scale_factor, o_.min_loss_scale);
      } else {
        --s_.hysteresis_left;
      }
      s_.last_overflow_iteration = s_.iteration;
      ++s_.skipped_steps;
    } else {
      if (o_.consecutive_hysteresis) s_.hysteresis_left = o_.hysteresis;
      const std::int64_t stable_interval = s_.iteration - s_.last_overflow_iteration - 1;
      if (stable_interval > 0 && stable_interval % o_.loss_scale_window == 0) {
        if (!o_.consecutive_hysteresis) s_.hysteresis_left = o_.hysteresis;
        s_.scale *= o_.scale_factor;
      }
    }
    ++s_.iteration;
    return !overflow;
  }

  /// Steps skipped for overflow so far.
  std::int64_t skipped_steps() const noexcept { return s_.skipped_steps; }
  /// Iterations recorded so far (DeepSpeed's cur_iter).
  std::int64_t iteration() const noexcept { return s_.iteration; }
  /// Overflows still tolerated before the scale drops (DeepSpeed's cur_hysteresis).
  int hysteresis_left() const noexcept { return s_.hysteresis_left; }
  const dynamic_loss_scaler_options& options() const noexcept { return o_; }

  /// For checkpoints.
  loss_scaler_state state() const noexcept { return s_; }
  void restore(const loss_scaler_state& s) {
    if (!(std::isfinite(s.scale) && s.scale >= o_.min_loss_scale)) fail("restore: invalid scale " + detail::format_scale(s.scale));
    if (s.hysteresis_left < 1 || s.hysteresis_left > o_.hysteresis) fail("restore: invalid hysteresis count " + std::to_string(s.hysteresis_left));
    s_ = s;
  }

  /// One line describing the configuration, e.g. "dynamic loss scale: initial 2^16, window 1000,
  /// hysteresis 2, consecutive hysteresis off, min 1, factor 2".
  std::string describe() const {
    return "dynamic loss scale: initial 2^" + std::to_string(o_.initial_scale_power) + ", window " + std::to_string(o_.loss_scale_window) +
           ", hysteresis " + std::to_string(o_.hysteresis) + ", consecutive hysteresis " + (o_.consecutive_hysteresis ? "on" : "off") +
           ", min " + detail::format_scale(o_.min_loss_scale) + ", factor " + detail::format_scale(o_.scale_factor);
  }

 private:
  [[noreturn]] static void fail(const std::string& what) { throw error("dynamic_loss_scaler: " + what); }

  dynamic_loss_scaler_options o_;
  loss_scaler_state s_;
};

/// A constant loss scale (DeepSpeed's LossScaler: "loss_scale" > 0 in the fp16 config). Steps
/// with overflowing gradients are still skipped, as DeepSpeed's fp16 optimizer skips them.
class static_loss_scaler {
 public:
  explicit static_loss_scaler(double scale = 1.0) : scale_(scale) {
    if (!(std::isfinite(scale) && scale > 0)) throw error("static_loss_scaler: the scale must be finite and > 0, got " + detail::format_scale(scale));
  }
  double scale() const noexcept { return scale_; }
  /// Returns whether the step is applied (false on overflow, which is counted).
  bool update(bool overflow, std::string_view = {}) noexcept {
    if (overflow) ++skipped_;
    return !overflow;
  }
  std::int64_t skipped_steps() const noexcept { return skipped_; }
  std::string describe() const { return "static loss scale " + detail::format_scale(scale_); }

 private:
  double scale_;
  std::int64_t skipped_ = 0;
};

}  // namespace trident
