#pragma once
/// @file sched/lr_range_test.hpp
/// DeepSpeed's LRRangeTest: the lr grows from lr_range_test_min_lr by lr_range_test_step_rate
/// every lr_range_test_step_size iterations, continuously or in stairs, to find the largest lr
/// a model trains with.
///
/// At iteration t (b = t + 1, the constructor's t = -1 gives b = 0 and so min_lr):
///
///     interval = b / step_size            (continuous)
///              = ⌊b / step_size⌋          (lr_range_test_staircase)
///     lr = min_lr · (1 + step_rate · interval)

#include <cmath>
#include <cstdint>

#include "scheduler.hpp"

namespace trident::sched {

/// LRRangeTest's parameters (DeepSpeed's names and defaults).
struct lr_range_test_options {
  double lr_range_test_min_lr = 1e-3;
  std::int64_t lr_range_test_step_size = 2000;
  double lr_range_test_step_rate = 1.0;
  bool lr_range_test_staircase = false;
  std::int64_t last_batch_iteration = -1;
};

/// DeepSpeed's LRRangeTest.
class lr_range_test : public scheduler_base<lr_range_test> {
 public:
  /// Pure use (lr_at).
  explicit lr_range_test(const lr_range_test_options& o) : scheduler_base(o.last_batch_iteration), o_(o) {
    constexpr const char* who = "lr_range_test";
    detail::require_lr(who, "lr_range_test_min_lr", o.lr_range_test_min_lr);
    detail::require(o.lr_range_test_step_size > 0, who,
                    "lr_range_test_step_size must be > 0, got " + std::to_string(o.lr_range_test_step_size));
    detail::require(std::isfinite(o.lr_range_test_step_rate) && o.lr_range_test_step_rate >= 0, who,
                    "lr_range_test_step_rate must be finite and >= 0, got " + detail::fmt(o.lr_range_test_step_rate));
  }
  /// DeepSpeed's use: sets lr = lr_range_test_min_lr now when last_batch_iteration is -1.
  template <lr_controlled O>
  lr_range_test(O& optimizer, const lr_range_test_options& o) : lr_range_test(o) {
    apply_initial(optimizer);
  }

  /// The lr at iteration t.
  double lr_at(std::int64_t t) const noexcept {
    double interval = static_cast<double>(t + 1) / static_cast<double>(o_.lr_range_test_step_size);
    if (o_.lr_range_test_staircase) interval = std::floor(interval);
    return o_.lr_range_test_min_lr * (1.0 + o_.lr_range_test_step_rate * interval);
  }

  const lr_range_test_options& options() const noexcept { return o_; }

 private:
  lr_range_test_options o_;
};

}  // namespace trident::sched
