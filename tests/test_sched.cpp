// LR schedulers and the dynamic loss scaler against DeepSpeed, transcribed here.
//
// The references in namespace `ds` are line-by-line transcriptions of DeepSpeed's
// deepspeed/runtime/lr_schedules.py (WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle,
// LRRangeTest) and of DynamicLossScaler.update_scale in deepspeed/runtime/fp16/loss_scaler.py.
// They share no code with trident's schedulers. Every table drives a scheduler the way
// DeepSpeed's engine does (construct with the optimizer, then step() after each batch) and
// compares the optimizer's lr (and momentum) with the reference at every iteration. A few
// values are also worked out by hand in the comments beside them.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <trident/trident.hpp>
#include <trident/optim/optim.hpp>
#include <trident/precision/loss_scaler.hpp>
#include <trident/sched/sched.hpp>

using namespace trident;
using std::int64_t;

namespace {

constexpr double nan_v = std::numeric_limits<double>::quiet_NaN();

/// Relative agreement: the references evaluate the same formulas in a different order.
bool close(double got, double want, double rel = 1e-13) { return std::fabs(got - want) <= rel * std::fabs(want) + 1e-18; }

// ---------------------------------------------------------------------------------------------
// DeepSpeed's schedulers (deepspeed/runtime/lr_schedules.py), one parameter group.
// ---------------------------------------------------------------------------------------------
namespace ds {

/// WarmupLR, and WarmupDecayLR when `total_num_steps` is set.
struct warmup_lr {
  double min_lr, delta_lr;
  int64_t warmup_num_steps;
  bool linear;
  double inverse_log_warm_up;
  std::optional<int64_t> total_num_steps;

  warmup_lr(double min, double max, int64_t warmup, bool lin, std::optional<int64_t> total = {})
      : min_lr(min),
        delta_lr(max - min),
        warmup_num_steps(std::max<int64_t>(2, warmup)),
        linear(lin),
        inverse_log_warm_up(1.0 / std::log(static_cast<double>(std::max<int64_t>(2, warmup)))),
        total_num_steps(total) {}

  double get_gamma(int64_t last) const {
    if (last < warmup_num_steps) {
      if (!linear) return inverse_log_warm_up * std::log(static_cast<double>(last + 1));
      return static_cast<double>(last) / static_cast<double>(warmup_num_steps);
    }
    if (!total_num_steps) return 1.0;
    return std::max(0.0, static_cast<double>(*total_num_steps - last) / std::max(1.0, static_cast<double>(*total_num_steps - warmup_num_steps)));
  }
  double get_lr(int64_t last) const {
    if (last < 0) return min_lr;
    return min_lr + delta_lr * get_gamma(last);
  }
};

/// WarmupCosineLR (with the clamp of the cosine progress to 1 and the max(1, ·) denominator).
struct warmup_cosine_lr {
  double org_lr;
  int64_t total_num_steps;
  double warmup_min_ratio;
  int64_t warmup_num_steps;
  double cos_min_ratio;
  bool linear;
  double inverse_log_warm_up;

  warmup_cosine_lr(double lr, int64_t total, double wmin, int64_t warmup, double cmin, bool lin)
      : org_lr(lr),
        total_num_steps(total),
        warmup_min_ratio(wmin),
        warmup_num_steps(std::max<int64_t>(2, warmup)),
        cos_min_ratio(cmin),
        linear(lin),
        inverse_log_warm_up(1.0 / std::log(static_cast<double>(std::max<int64_t>(2, warmup)))) {}

  double get_lr_ratio(int64_t last) const {
    if (last < 0) return 0.0;
    if (last < warmup_num_steps) {
      double ratio = linear ? static_cast<double>(last) / static_cast<double>(warmup_num_steps)
                            : inverse_log_warm_up * std::log(static_cast<double>(last + 1));
      const double ratio_delta = 1. - warmup_min_ratio;
      ratio = warmup_min_ratio + ratio * ratio_delta;
      return ratio;
    }
    const int64_t real_last_step = last - warmup_num_steps + 1;
    const int64_t real_total_steps = std::max<int64_t>(1, total_num_steps - warmup_num_steps);
    const double cosine_progress = std::min(1.0, static_cast<double>(real_last_step) / static_cast<double>(real_total_steps));
    const double ratio_delta = 1. - cos_min_ratio;
    double ratio = (1 + std::cos(std::numbers::pi * cosine_progress)) / 2;
    ratio = std::max(0.0, cos_min_ratio + ratio_delta * ratio);
    return ratio;
  }
  double get_lr(int64_t last) const {
    if (last < 0) return 0.0;
    return org_lr * get_lr_ratio(last);
  }
};

/// OneCycle, with the stair counts.
struct one_cycle {
  double total_size, step_ratio, first_step_size, second_step_size;
  int64_t first_stair_count, second_stair_count, decay_step_size;
  bool skip_lr_decay, skip_mom_decay;
  double min_lr, max_lr, decay_lr_rate;
  double min_mom, max_mom, decay_mom_rate;

  one_cycle(double cycle_min_lr, double cycle_max_lr, double lr_rate, int64_t first, std::optional<int64_t> second, int64_t first_stairs,
            std::optional<int64_t> second_stairs, int64_t decay_step, double cycle_min_mom = 0.8, double cycle_max_mom = 0.9,
            double mom_rate = 0.0) {
    // _initialize_cycle
    first_step_size = static_cast<double>(first);
    second_step_size = second ? static_cast<double>(*second) : first_step_size;
    total_size = first_step_size + second_step_size;
    step_ratio = first_step_size / total_size;
    first_stair_count = first_stairs;
    second_stair_count = second_stairs ? *second_stairs : first_stairs;
    decay_step_size = decay_step;
    skip_lr_decay = skip_mom_decay = decay_step_size == 0;
    // _initialize_lr
    min_lr = cycle_min_lr;
    max_lr = cycle_max_lr;
    decay_lr_rate = lr_rate;
    if (decay_lr_rate == 0) skip_lr_decay = true;
    // _initialize_momentum
    min_mom = cycle_min_mom;
    max_mom = cycle_max_mom;
    decay_mom_rate = mom_rate;
    if (decay_mom_rate == 0) skip_mom_decay = true;
  }

  double get_scale_factor(int64_t last) const {
    const double batch_iteration = static_cast<double>(last + 1);
    const double cycle = std::floor(1 + batch_iteration / total_size);
    const double x = 1. + batch_iteration / total_size - cycle;
    double scale_factor;
    int64_t stair_count;
    if (x <= step_ratio) {
      scale_factor = x / step_ratio;
      stair_count = first_stair_count;
    } else {
      scale_factor = (x - 1) / (step_ratio - 1);
      stair_count = second_stair_count;
    }
    if (stair_count > 0) {
      const double cycle_iteration = std::fmod(batch_iteration, total_size);
      double stair_position;
      if (cycle_iteration <= first_step_size) {
        stair_position = cycle_iteration * static_cast<double>(stair_count) / first_step_size;
      } else {
        stair_position = (total_size - cycle_iteration) * static_cast<double>(stair_count) / second_step_size;
      }
      scale_factor = std::floor(stair_position) / static_cast<double>(stair_count);
    }
    return scale_factor;
  }
  double get_lr(int64_t last) const {
    if (static_cast<double>(last) < total_size) return min_lr + (max_lr - min_lr) * get_scale_factor(last);
    if (skip_lr_decay) return min_lr;
    const double decay_interval = (static_cast<double>(last) - total_size + 1) / static_cast<double>(decay_step_size);
    return min_lr / (1 + decay_lr_rate * decay_interval);
  }
  double get_mom(int64_t last) const {
    if (static_cast<double>(last) < total_size) return max_mom - (max_mom - min_mom) * get_scale_factor(last);
    if (skip_mom_decay) return max_mom;
    const double decay_interval = (static_cast<double>(last) - total_size + 1) / static_cast<double>(decay_step_size);
    return max_mom * (1 + decay_mom_rate * decay_interval);
  }
};

/// LRRangeTest.
inline double lr_range_test(double min_lr, int64_t step_size, double step_rate, bool staircase, int64_t last) {
  const double b = static_cast<double>(last + 1);
  const double interval = staircase ? std::floor(b / static_cast<double>(step_size)) : b / static_cast<double>(step_size);
  return min_lr * (1 + step_rate * interval);
}

/// DynamicLossScaler.update_scale, plus the engine's skipped_steps count.
struct dynamic_loss_scaler {
  double cur_scale;
  int64_t cur_iter = 0;
  int64_t last_overflow_iter = -1;
  double scale_factor = 2.0;
  int64_t scale_window;
  double min_scale;
  int delayed_shift;
  int cur_hysteresis;
  bool consecutive_hysteresis;
  bool raise_error_at_min_scale;
  int64_t skipped_steps = 0;

  explicit dynamic_loss_scaler(const dynamic_loss_scaler_options& o)
      : cur_scale(std::pow(2.0, o.initial_scale_power)),
        scale_window(o.loss_scale_window),
        min_scale(o.min_loss_scale),
        delayed_shift(o.hysteresis),
        cur_hysteresis(o.hysteresis),
        consecutive_hysteresis(o.consecutive_hysteresis),
        raise_error_at_min_scale(o.raise_error_at_min_scale) {}

  /// false where DeepSpeed raises ("Current loss scale already at minimum"), leaving its state.
  bool update_scale(bool overflow) {
    if (overflow) {
      if (delayed_shift == 1 || cur_hysteresis == 1) {
        if (cur_scale == min_scale && raise_error_at_min_scale) return false;
        cur_scale = std::max(cur_scale / scale_factor, min_scale);
      } else {
        cur_hysteresis -= 1;
      }
      last_overflow_iter = cur_iter;
    } else {
      if (consecutive_hysteresis) cur_hysteresis = delayed_shift;
      const int64_t stable_interval = (cur_iter - last_overflow_iter) - 1;
      if (stable_interval > 0 && stable_interval % scale_window == 0) {
        if (!consecutive_hysteresis) cur_hysteresis = delayed_shift;
        cur_scale *= scale_factor;
      }
    }
    cur_iter += 1;
    if (overflow) ++skipped_steps;
    return true;
  }
};

}  // namespace ds

// ---------------------------------------------------------------------------------------------
// Table drivers
// ---------------------------------------------------------------------------------------------

/// Compares got(t) with want(t) for t in [first, last]; reports at most a few mismatches.
template <class Got, class Want>
void check_table(const std::string& what, int64_t first, int64_t last, Got&& got, Want&& want, double rel = 1e-13) {
  int failures = 0;
  for (int64_t t = first; t <= last && failures < 4; ++t) {
    const double g = got(t), w = want(t);
    if (!close(g, w, rel)) {
      FAIL_CHECK(what << ": t = " << t << ": got " << g << ", DeepSpeed gives " << w);
      ++failures;
    }
  }
  CHECK_MESSAGE(failures == 0, what);
}

/// Drives a scheduler constructed on `opt` (last_batch_iteration = -1) through `steps` step()
/// calls and checks, at every iteration, the optimizer's lr, last_lr(), lr_at() and
/// last_batch_iteration against `want(t)`.
template <class Sched, class Opt, class Want>
void run_table(const std::string& what, Sched& s, Opt& opt, int64_t steps, Want&& want) {
  // the constructor applied iteration -1
  CHECK_MESSAGE(s.last_batch_iteration() == -1, what);
  CHECK_MESSAGE(close(opt.lr(), want(-1)), what << ": the constructor's lr " << opt.lr() << ", DeepSpeed gives " << want(-1));
  std::vector<double> lrs;
  std::vector<int64_t> iters;
  for (int64_t t = 0; t < steps; ++t) {
    s.step(opt);
    lrs.push_back(opt.lr());
    iters.push_back(s.last_batch_iteration());
    REQUIRE(s.last_lr() == opt.lr());
  }
  for (int64_t t = 0; t < steps; ++t) REQUIRE_MESSAGE(iters[static_cast<std::size_t>(t)] == t, what);
  check_table(what + " (optimizer lr after step())", 0, steps - 1, [&](int64_t t) { return lrs[static_cast<std::size_t>(t)]; }, want);
  check_table(what + " (lr_at)", -1, steps - 1, [&](int64_t t) { return s.lr_at(t); }, want);
}

std::string describe_warmup(double min, double max, int64_t w, bool linear, std::optional<int64_t> total = {}) {
  std::ostringstream os;
  os << (linear ? "linear" : "log") << " warm-up " << min << " -> " << max << " over " << w;
  if (total) os << ", total " << *total;
  return os.str();
}

// ---------------------------------------------------------------------------------------------
// Loss-scale scripts
// ---------------------------------------------------------------------------------------------

/// A sequence of iterations: true = the gradients overflowed.
struct script {
  std::vector<bool> steps;
  script& overflow(int n = 1) {
    steps.insert(steps.end(), static_cast<std::size_t>(n), true);
    return *this;
  }
  script& clean(int n = 1) {
    steps.insert(steps.end(), static_cast<std::size_t>(n), false);
    return *this;
  }
};

/// A deterministic overflow pattern: each iteration overflows with probability p.
script random_script(std::uint64_t seed, int n, double p) {
  script s;
  std::uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (int i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    const double u = static_cast<double>(x >> 11) * 0x1p-53;
    s.steps.push_back(u < p);
  }
  return s;
}

std::string describe(const dynamic_loss_scaler_options& o) {
  std::ostringstream os;
  os << "power " << o.initial_scale_power << ", window " << o.loss_scale_window << ", hysteresis " << o.hysteresis << ", consecutive "
     << o.consecutive_hysteresis << ", min " << o.min_loss_scale << ", raise " << o.raise_error_at_min_scale;
  return os.str();
}

/// Replays `sc` on trident's scaler and on the transcription of DeepSpeed's update_scale, and
/// compares scale, iteration, skipped steps, hysteresis and the last overflow after every step.
/// Where DeepSpeed raises at the minimum scale, trident must throw and leave its state alone;
/// the replay stops there. Returns the number of steps replayed.
std::size_t replay(const dynamic_loss_scaler_options& o, const script& sc) {
  const std::string what = describe(o);
  dynamic_loss_scaler s(o);
  ds::dynamic_loss_scaler ref(o);
  REQUIRE_MESSAGE(s.scale() == ref.cur_scale, what);
  for (std::size_t i = 0; i < sc.steps.size(); ++i) {
    const bool overflow = sc.steps[i];
    const loss_scaler_state before = s.state();
    if (!ref.update_scale(overflow)) {
      CHECK_THROWS_AS_MESSAGE(s.update(overflow, "some.tensor"), trident::error, what << ": step " << i);
      const loss_scaler_state after = s.state();
      CHECK_MESSAGE(after.scale == before.scale, what);
      CHECK_MESSAGE(after.iteration == before.iteration, what);
      CHECK_MESSAGE(after.skipped_steps == before.skipped_steps, what);
      return i;
    }
    bool applied = !overflow;
    try {
      applied = s.update(overflow, "some.tensor");
    } catch (const trident::error& e) {
      FAIL_CHECK(what << ": step " << i << ": unexpected error: " << e.what());
      return i;
    }
    const loss_scaler_state st = s.state();
    const bool ok = applied == !overflow && s.scale() == ref.cur_scale && st.scale == ref.cur_scale && s.iteration() == ref.cur_iter &&
                    s.skipped_steps() == ref.skipped_steps && s.hysteresis_left() == ref.cur_hysteresis &&
                    st.last_overflow_iteration == ref.last_overflow_iter;
    if (!ok) {
      FAIL_CHECK(what << ": step " << i << std::string(overflow ? " (overflow)" : " (clean)") << ": scale " << s.scale() << " vs " << ref.cur_scale
                      << ", iteration " << s.iteration() << " vs " << ref.cur_iter << ", skipped " << s.skipped_steps() << " vs "
                      << ref.skipped_steps << ", hysteresis " << s.hysteresis_left() << " vs " << ref.cur_hysteresis
                      << ", last overflow " << st.last_overflow_iteration << " vs " << ref.last_overflow_iter);
      return i;
    }
  }
  return sc.steps.size();
}

/// One row of a hand-worked loss-scale trajectory: the state after the step.
struct row {
  bool overflow;
  double scale;
  int hysteresis;
  int64_t skipped;
};

void check_rows(const char* what, const dynamic_loss_scaler_options& o, const std::vector<row>& rows) {
  dynamic_loss_scaler s(o);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const row& r = rows[i];
    CHECK_MESSAGE(s.update(r.overflow) == !r.overflow, what << " step " << i);
    CHECK_MESSAGE(s.scale() == r.scale, what << " step " << i << ": scale " << s.scale() << ", want " << r.scale);
    CHECK_MESSAGE(s.hysteresis_left() == r.hysteresis, what << " step " << i << ": hysteresis " << s.hysteresis_left() << ", want " << r.hysteresis);
    CHECK_MESSAGE(s.skipped_steps() == r.skipped, what << " step " << i << ": skipped " << s.skipped_steps() << ", want " << r.skipped);
    CHECK(s.iteration() == static_cast<int64_t>(i) + 1);
  }
}

}  // namespace

// The optimizers the schedulers drive: Adam-family (betas), SGD (momentum), Adagrad (neither).
static_assert(sched::lr_controlled<optim::sgd> && sched::lr_controlled<optim::adamw> && sched::lr_controlled<optim::adagrad>);
static_assert(sched::has_betas<optim::adamw> && sched::has_betas<optim::adam> && sched::has_betas<optim::lamb>);
static_assert(!sched::has_betas<optim::sgd> && sched::has_momentum<optim::sgd>);
static_assert(!sched::has_betas<optim::adagrad> && !sched::has_momentum<optim::adagrad>);

// =============================================================================================
// WarmupLR
// =============================================================================================

TEST_CASE("sched: warmup_lr follows DeepSpeed's WarmupLR (log and linear) at every iteration") {
  struct cfg {
    double min, max;
    int64_t warmup;
    bool linear;
  };
  const cfg cfgs[] = {
      {0.0, 0.1, 10, false},     {0.01, 0.11, 4, true},     {1e-5, 3e-4, 1000, false}, {0.0, 1e-3, 1000, true},
      {0.2, 0.05, 1, true},      {0.0, 0.5, 1, false},      {1e-4, 1e-3, 2, false},    {3e-4, 3e-4, 50, true},
  };
  for (const cfg& c : cfgs) {
    const std::string what = "warmup_lr " + describe_warmup(c.min, c.max, c.warmup, c.linear);
    const ds::warmup_lr ref(c.min, c.max, c.warmup, c.linear);
    optim::sgd opt({.lr = 0.75});
    sched::warmup_lr s(opt, {.warmup_min_lr = c.min,
                             .warmup_max_lr = c.max,
                             .warmup_num_steps = c.warmup,
                             .warmup_type = c.linear ? sched::warmup_kind::linear : sched::warmup_kind::log});
    CHECK(s.warmup_num_steps() == std::max<int64_t>(2, c.warmup));
    run_table(what, s, opt, std::max<int64_t>(2, c.warmup) + 25, [&](int64_t t) { return ref.get_lr(t); });
  }
}

TEST_CASE("sched: warmup_lr hand-worked values") {
  // log, 0 -> 0.1 over 10: lr(t) = 0.1·ln(t+1)/ln(10) = 0.1·log10(t+1)
  sched::warmup_lr log_s({.warmup_min_lr = 0.0, .warmup_max_lr = 0.1, .warmup_num_steps = 10});
  CHECK(log_s.lr_at(-1) == 0.0);                                          // before the start: warmup_min_lr
  CHECK(log_s.lr_at(0) == 0.0);                                           // ln(1) = 0
  CHECK(log_s.lr_at(3) == doctest::Approx(0.0602059991327962).epsilon(1e-12));  // 0.1·log10(4)
  CHECK(log_s.lr_at(9) == doctest::Approx(0.1).epsilon(1e-15));                 // ln(10)/ln(10): the log warm-up reaches max at W-1
  CHECK(log_s.lr_at(10) == 0.1);                                          // held
  CHECK(log_s.lr_at(100000) == 0.1);

  // linear, 0.01 -> 0.11 over 4: lr(t) = 0.01 + 0.1·t/4, never max during the warm-up
  sched::warmup_lr lin_s({.warmup_min_lr = 0.01, .warmup_max_lr = 0.11, .warmup_num_steps = 4, .warmup_type = sched::warmup_kind::linear});
  CHECK(lin_s.lr_at(0) == doctest::Approx(0.01).epsilon(1e-15));
  CHECK(lin_s.lr_at(1) == doctest::Approx(0.035).epsilon(1e-14));
  CHECK(lin_s.lr_at(3) == doctest::Approx(0.085).epsilon(1e-14));
  CHECK(lin_s.lr_at(4) == 0.11);

  // warmup_num_steps 1 is clamped to 2: log gives min at t = 0 and max from t = 1
  sched::warmup_lr one({.warmup_min_lr = 0.0, .warmup_max_lr = 0.5, .warmup_num_steps = 1});
  CHECK(one.warmup_num_steps() == 2);
  CHECK(one.lr_at(0) == 0.0);
  CHECK(one.lr_at(1) == doctest::Approx(0.5).epsilon(1e-15));
}

TEST_CASE("sched: warmup_lr takes an unset warmup_max_lr from the optimizer, as DeepSpeed does") {
  optim::adamw opt({.lr = 0.004});
  sched::warmup_lr s(opt, {.warmup_min_lr = 0.001, .warmup_num_steps = 10, .warmup_type = sched::warmup_kind::linear});
  CHECK(s.warmup_max_lr() == 0.004);
  CHECK(opt.lr() == 0.001);  // the constructor set warmup_min_lr
  s.step(opt, 10);
  CHECK(opt.lr() == 0.004);
  // without an optimizer there is nothing to take it from
  CHECK_THROWS_WITH_AS(sched::warmup_lr({.warmup_num_steps = 10}), doctest::Contains("warmup_max_lr is not set"), trident::error);
}

// =============================================================================================
// WarmupDecayLR
// =============================================================================================

TEST_CASE("sched: warmup_decay_lr follows DeepSpeed's WarmupDecayLR at every iteration") {
  struct cfg {
    double min, max;
    int64_t warmup, total;
    bool linear;
  };
  const cfg cfgs[] = {
      {0.0, 1e-3, 100, 1000, false}, {0.01, 0.1, 10, 20, true}, {0.0, 0.1, 10, 10, true},   {1e-4, 1e-3, 1, 50, false},
      {0.0, 0.3, 2, 3, false},       {5e-5, 5e-4, 30, 31, true}, {0.0, 2e-4, 7, 1000, true},
  };
  for (const cfg& c : cfgs) {
    const std::string what = "warmup_decay_lr " + describe_warmup(c.min, c.max, c.warmup, c.linear, c.total);
    const ds::warmup_lr ref(c.min, c.max, c.warmup, c.linear, c.total);
    optim::adamw opt({.lr = 0.5});
    sched::warmup_decay_lr s(opt, {.total_num_steps = c.total,
                                   .warmup_min_lr = c.min,
                                   .warmup_max_lr = c.max,
                                   .warmup_num_steps = c.warmup,
                                   .warmup_type = c.linear ? sched::warmup_kind::linear : sched::warmup_kind::log});
    run_table(what, s, opt, c.total + 20, [&](int64_t t) { return ref.get_lr(t); });
  }
}

TEST_CASE("sched: warmup_decay_lr hand-worked values, and DeepSpeed's default warmup_max_lr 0.001") {
  // linear 0.1 -> 1 over 10, total 20: after the warm-up lr = 0.1 + 0.9·(20 − t)/10
  sched::warmup_decay_lr s(
      {.total_num_steps = 20, .warmup_min_lr = 0.1, .warmup_max_lr = 1.0, .warmup_num_steps = 10, .warmup_type = sched::warmup_kind::linear});
  CHECK(s.lr_at(5) == doctest::Approx(0.55).epsilon(1e-14));   // warm-up: 0.1 + 0.9·5/10
  CHECK(s.lr_at(10) == doctest::Approx(1.0).epsilon(1e-15));   // (20 − 10)/10 = 1: the peak
  CHECK(s.lr_at(15) == doctest::Approx(0.55).epsilon(1e-14));  // halfway down
  CHECK(s.lr_at(19) == doctest::Approx(0.19).epsilon(1e-14));
  CHECK(s.lr_at(20) == doctest::Approx(0.1).epsilon(1e-15));   // back at warmup_min_lr at total_num_steps
  CHECK(s.lr_at(500) == doctest::Approx(0.1).epsilon(1e-15));  // and held there (max(0, ·))

  // WarmupDecayLR's warmup_max_lr defaults to 0.001 in DeepSpeed, whatever the optimizer's lr
  optim::sgd opt({.lr = 0.5});
  sched::warmup_decay_lr d(opt, {.total_num_steps = 100, .warmup_num_steps = 10});
  CHECK(d.warmup_max_lr() == 0.001);
  CHECK(opt.lr() == 0.0);
  d.step(opt, 10);
  CHECK(opt.lr() == doctest::Approx(0.001).epsilon(1e-15));  // (100 − 10)/90 = 1
  // reset to take the optimizer's lr
  optim::sgd opt2({.lr = 0.5});
  sched::warmup_decay_lr d2(opt2, {.total_num_steps = 100, .warmup_max_lr = std::nullopt, .warmup_num_steps = 10});
  CHECK(d2.warmup_max_lr() == 0.5);
}

// =============================================================================================
// WarmupCosineLR
// =============================================================================================

TEST_CASE("sched: warmup_cosine_lr follows DeepSpeed's WarmupCosineLR at every iteration") {
  struct cfg {
    double base;
    int64_t total;
    double wmin;
    int64_t warmup;
    double cmin;
    bool linear;
  };
  const cfg cfgs[] = {
      {0.2, 30, 0.1, 10, 0.05, true},   {1e-3, 1000, 0.0, 100, 1e-4, false}, {0.01, 10, 0.0, 10, 0.1, true},
      {0.5, 7, 0.5, 1, 0.0, false},     {3e-4, 200, 0.01, 20, 0.01, true},   {0.1, 3, 0.0, 2, 0.2, false},
  };
  for (const cfg& c : cfgs) {
    std::ostringstream os;
    os << "warmup_cosine_lr base " << c.base << ", total " << c.total << ", warmup_min_ratio " << c.wmin << ", warmup " << c.warmup
       << ", cos_min_ratio " << c.cmin << (c.linear ? ", linear" : ", log");
    const ds::warmup_cosine_lr ref(c.base, c.total, c.wmin, c.warmup, c.cmin, c.linear);
    optim::sgd opt({.lr = c.base});
    sched::warmup_cosine_lr s(opt, {.total_num_steps = c.total,
                                    .warmup_min_ratio = c.wmin,
                                    .warmup_num_steps = c.warmup,
                                    .cos_min_ratio = c.cmin,
                                    .warmup_type = c.linear ? sched::warmup_kind::linear : sched::warmup_kind::log});
    CHECK(s.base_lr() == c.base);
    // past total_num_steps too: DeepSpeed holds cos_min_ratio there
    run_table(os.str(), s, opt, c.total + 30, [&](int64_t t) { return ref.get_lr(t); });
  }
}

TEST_CASE("sched: warmup_cosine_lr hand-worked values") {
  // base 0.2, linear warm-up over 10 from ratio 0.1, cosine to ratio 0.05 at total 30
  sched::warmup_cosine_lr s({.total_num_steps = 30, .warmup_min_ratio = 0.1, .warmup_num_steps = 10, .cos_min_ratio = 0.05,
                             .warmup_type = sched::warmup_kind::linear},
                            0.2);
  CHECK(s.lr_at(-1) == 0.0);                                        // the constructor sets 0
  CHECK(s.lr_at(0) == doctest::Approx(0.02).epsilon(1e-14));        // ratio 0.1
  CHECK(s.lr_at(5) == doctest::Approx(0.11).epsilon(1e-14));        // ratio 0.1 + 0.9·0.5 = 0.55
  CHECK(s.lr_at(9) == doctest::Approx(0.182).epsilon(1e-14));       // ratio 0.1 + 0.9·0.9 = 0.91
  CHECK(s.lr_at(19) == doctest::Approx(0.105).epsilon(1e-14));      // p = 10/20: cos(π/2) = 0, ratio 0.05 + 0.95·0.5 = 0.525
  CHECK(s.lr_at(29) == doctest::Approx(0.01).epsilon(1e-14));       // p = 20/20: cos(π) = −1, ratio 0.05
  CHECK(s.lr_at(45) == doctest::Approx(0.01).epsilon(1e-14));       // p clamped to 1: stays at cos_min_ratio
  CHECK(s.lr_at(1000) == doctest::Approx(0.01).epsilon(1e-14));

  // the optimizer's lr at construction is the base; the constructor sets the lr to 0
  optim::adamw opt({.lr = 0.2});
  sched::warmup_cosine_lr c(opt, {.total_num_steps = 30, .warmup_num_steps = 10});
  CHECK(c.base_lr() == 0.2);
  CHECK(opt.lr() == 0.0);
  c.step(opt);
  CHECK(opt.lr() == 0.0);  // log warm-up from ratio 0 at t = 0
}

// =============================================================================================
// OneCycle
// =============================================================================================

namespace {

struct one_cycle_cfg {
  double min_lr, max_lr, decay_lr_rate;
  int64_t first;
  std::optional<int64_t> second;
  int64_t first_stairs;
  std::optional<int64_t> second_stairs;
  int64_t decay_step;
  double min_mom, max_mom, decay_mom_rate;

  sched::one_cycle_options options(bool cycle_momentum = true) const {
    sched::one_cycle_options o;
    o.cycle_min_lr = min_lr;
    o.cycle_max_lr = max_lr;
    o.decay_lr_rate = decay_lr_rate;
    o.cycle_first_step_size = first;
    o.cycle_second_step_size = second;
    o.cycle_first_stair_count = first_stairs;
    o.cycle_second_stair_count = second_stairs;
    o.decay_step_size = decay_step;
    o.cycle_momentum = cycle_momentum;
    o.cycle_min_mom = min_mom;
    o.cycle_max_mom = max_mom;
    o.decay_mom_rate = decay_mom_rate;
    return o;
  }
  ds::one_cycle reference() const {
    return ds::one_cycle(min_lr, max_lr, decay_lr_rate, first, second, first_stairs, second_stairs, decay_step, min_mom, max_mom, decay_mom_rate);
  }
  std::string describe() const {
    std::ostringstream os;
    os << "one_cycle lr " << min_lr << ".." << max_lr << ", steps " << first << "/" << (second ? std::to_string(*second) : "unset")
       << ", stairs " << first_stairs << "/" << (second_stairs ? std::to_string(*second_stairs) : "unset") << ", decay " << decay_lr_rate
       << " every " << decay_step << ", mom " << min_mom << ".." << max_mom << " decay " << decay_mom_rate;
    return os.str();
  }
};

const one_cycle_cfg one_cycle_cfgs[] = {
    {0.01, 0.1, 0.5, 4, 6, 0, {}, 2, 0.8, 0.9, 0.002},
    {1e-4, 1e-2, 0.0, 100, {}, 0, {}, 0, 0.85, 0.95, 0.0},
    {0.01, 0.1, 0.0, 4, 6, 2, 3, 0, 0.8, 0.9, 0.0},
    {1e-3, 5e-3, 1.0, 10, {}, 3, {}, 5, 0.7, 0.9, 0.001},
    {0.02, 0.2, 0.25, 7, 3, 7, 1, 3, 0.5, 0.6, 0.0},
    {0.0, 1.0, 0.1, 3, 9, 0, 4, 1, 0.8, 0.95, 0.0},
    {5e-4, 5e-3, 0.0, 2000, {}, 0, {}, 1000, 0.8, 0.9, 0.0},
};

}  // namespace

TEST_CASE("sched: one_cycle follows DeepSpeed's OneCycle (lr, β1 of Adam) at every iteration") {
  for (const one_cycle_cfg& c : one_cycle_cfgs) {
    const ds::one_cycle ref = c.reference();
    const int64_t steps = static_cast<int64_t>(ref.total_size) + 40;
    optim::adamw opt({.lr = 0.3, .beta1 = 0.5, .beta2 = 0.5});
    sched::one_cycle s(opt, c.options());
    // DeepSpeed's constructor: lr = cycle_min_lr, betas = (cycle_min_mom, 0.99)
    CHECK(opt.betas().first == c.min_mom);
    CHECK(opt.betas().second == 0.99);
    std::vector<std::pair<double, double>> betas;
    for (int64_t t = 0; t < steps; ++t) {
      s.step(opt);
      betas.push_back(opt.betas());
    }
    const std::string what = c.describe();
    check_table(what + " (β1 after step())", 0, steps - 1, [&](int64_t t) { return betas[static_cast<std::size_t>(t)].first; },
                [&](int64_t t) { return ref.get_mom(t); });
    check_table(what + " (β2 after step())", 0, steps - 1, [&](int64_t t) { return betas[static_cast<std::size_t>(t)].second; },
                [](int64_t) { return 0.99; });
    check_table(what + " (momentum_at)", 0, steps - 1, [&](int64_t t) { return s.momentum_at(t); }, [&](int64_t t) { return ref.get_mom(t); });
    // the lr table, on a fresh optimizer
    optim::adamw opt2({.lr = 0.3});
    sched::one_cycle s3(opt2, c.options());
    run_table(what, s3, opt2, steps, [&](int64_t t) { return ref.get_lr(t); });
  }
}

TEST_CASE("sched: one_cycle cycles SGD's momentum; Adagrad and cycle_momentum = false keep theirs") {
  const one_cycle_cfg& c = one_cycle_cfgs[0];
  const ds::one_cycle ref = c.reference();
  {
    optim::sgd opt({.lr = 0.3, .momentum = 0.5});
    sched::one_cycle s(opt, c.options());
    CHECK(opt.momentum() == c.min_mom);
    for (int64_t t = 0; t < 30; ++t) {
      s.step(opt);
      CHECK_MESSAGE(close(opt.momentum(), ref.get_mom(t)), "t = " << t);
      CHECK_MESSAGE(close(opt.lr(), ref.get_lr(t)), "t = " << t);
    }
  }
  {
    optim::adagrad opt({.lr = 0.3});
    sched::one_cycle s(opt, c.options());
    for (int64_t t = 0; t < 30; ++t) {
      s.step(opt);
      CHECK_MESSAGE(close(opt.lr(), ref.get_lr(t)), "t = " << t);
    }
  }
  {
    optim::adamw opt({.lr = 0.3, .beta1 = 0.9, .beta2 = 0.999});
    sched::one_cycle s(opt, c.options(/*cycle_momentum=*/false));
    for (int64_t t = 0; t < 30; ++t) s.step(opt);
    CHECK(opt.betas().first == 0.9);
    CHECK(opt.betas().second == 0.999);
    CHECK(close(opt.lr(), ref.get_lr(29)));
  }
}

TEST_CASE("sched: one_cycle hand-worked values") {
  // lr 0.01..0.1, momentum 0.8..0.9, S1 = 4, S2 = 6 (C = 10, ρ = 0.4), then lr /= 1 + 0.5·d/2
  sched::one_cycle s({.cycle_min_lr = 0.01, .cycle_max_lr = 0.1, .decay_lr_rate = 0.5, .cycle_first_step_size = 4, .cycle_second_step_size = 6,
                      .decay_step_size = 2, .decay_mom_rate = 0.1});
  CHECK(s.lr_at(-1) == doctest::Approx(0.01).epsilon(1e-15));
  CHECK(s.momentum_at(-1) == 0.8);                                   // the constructor's cycle_min_mom
  CHECK(s.lr_at(0) == doctest::Approx(0.0325).epsilon(1e-13));       // b = 1: x = 0.1, s = 0.25
  CHECK(s.momentum_at(0) == doctest::Approx(0.875).epsilon(1e-13));  // 0.9 − 0.1·0.25
  CHECK(s.lr_at(3) == doctest::Approx(0.1).epsilon(1e-13));          // b = 4: x = ρ, the peak
  CHECK(s.momentum_at(3) == doctest::Approx(0.8).epsilon(1e-13));
  CHECK(s.lr_at(6) == doctest::Approx(0.055).epsilon(1e-13));        // b = 7: s = (0.7 − 1)/(0.4 − 1) = 0.5
  CHECK(s.momentum_at(6) == doctest::Approx(0.85).epsilon(1e-13));
  CHECK(s.lr_at(9) == doctest::Approx(0.01).epsilon(1e-13));         // b = 10: x = 0, the cycle's end
  CHECK(s.momentum_at(9) == doctest::Approx(0.9).epsilon(1e-13));
  CHECK(s.lr_at(10) == doctest::Approx(0.008).epsilon(1e-13));       // decay d = 1: 0.01/(1 + 0.5·0.5)
  CHECK(s.momentum_at(10) == doctest::Approx(0.945).epsilon(1e-13)); // 0.9·(1 + 0.1·0.5)
  CHECK(s.lr_at(13) == doctest::Approx(0.005).epsilon(1e-13));       // d = 4: 0.01/(1 + 0.5·2)

  // the same cycle in stairs: 2 up (each 2 batches), 3 down (each 2 batches)
  sched::one_cycle st({.cycle_min_lr = 0.01, .cycle_max_lr = 0.1, .cycle_first_step_size = 4, .cycle_second_step_size = 6,
                       .cycle_first_stair_count = 2, .cycle_second_stair_count = 3});
  const double want[] = {
      0.01,   // t 0: c = 1, ⌊1·2/4⌋ = 0
      0.055,  // t 1: c = 2, ⌊2·2/4⌋ = 1: s = 1/2
      0.055,  // t 2: c = 3, ⌊1.5⌋ = 1
      0.1,    // t 3: c = 4, ⌊2⌋ = 2: s = 1, the peak exactly
      0.07,   // t 4: c = 5, ⌊(10 − 5)·3/6⌋ = ⌊2.5⌋ = 2: s = 2/3
      0.07,   // t 5: c = 6, ⌊2⌋ = 2
      0.04,   // t 6: c = 7, ⌊1.5⌋ = 1: s = 1/3
      0.04,   // t 7: c = 8, ⌊1⌋ = 1
      0.01,   // t 8: c = 9, ⌊0.5⌋ = 0
      0.01,   // t 9: c = 10 mod 10 = 0
      0.01,   // t 10: past the cycle, no decay
  };
  for (int64_t t = 0; t < 11; ++t) CHECK_MESSAGE(st.lr_at(t) == doctest::Approx(want[t]).epsilon(1e-13), "t = " << t);
  CHECK(st.lr_at(3) == 0.1);  // the peak is reached exactly, not a stair below it
  CHECK(st.momentum_at(4) == doctest::Approx(0.9 - 0.1 * 2.0 / 3.0).epsilon(1e-13));
}

// =============================================================================================
// LRRangeTest
// =============================================================================================

TEST_CASE("sched: lr_range_test follows DeepSpeed's LRRangeTest (continuous and staircase)") {
  struct cfg {
    double min_lr;
    int64_t step_size;
    double step_rate;
    bool staircase;
  };
  const cfg cfgs[] = {{1e-3, 10, 2.0, false}, {1e-3, 10, 2.0, true}, {1e-4, 1, 0.5, true}, {1e-2, 2000, 1.0, false}, {5e-5, 7, 0.0, false}, {1e-5, 3, 10.0, true}};
  for (const cfg& c : cfgs) {
    std::ostringstream os;
    os << "lr_range_test " << c.min_lr << ", step " << c.step_size << ", rate " << c.step_rate << (c.staircase ? ", staircase" : "");
    optim::sgd opt({.lr = 0.9});
    sched::lr_range_test s(opt, {.lr_range_test_min_lr = c.min_lr,
                                 .lr_range_test_step_size = c.step_size,
                                 .lr_range_test_step_rate = c.step_rate,
                                 .lr_range_test_staircase = c.staircase});
    run_table(os.str(), s, opt, 120, [&](int64_t t) { return ds::lr_range_test(c.min_lr, c.step_size, c.step_rate, c.staircase, t); });
  }
}

TEST_CASE("sched: lr_range_test hand-worked values") {
  // lr = 0.001·(1 + 2·(t + 1)/10)
  sched::lr_range_test s({.lr_range_test_min_lr = 0.001, .lr_range_test_step_size = 10, .lr_range_test_step_rate = 2.0});
  CHECK(s.lr_at(-1) == 0.001);
  CHECK(s.lr_at(4) == doctest::Approx(0.002).epsilon(1e-14));   // interval 0.5
  CHECK(s.lr_at(19) == doctest::Approx(0.005).epsilon(1e-14));  // interval 2
  // staircase: interval = ⌊(t + 1)/10⌋
  sched::lr_range_test st({.lr_range_test_min_lr = 0.001, .lr_range_test_step_size = 10, .lr_range_test_step_rate = 2.0, .lr_range_test_staircase = true});
  CHECK(st.lr_at(8) == 0.001);
  CHECK(st.lr_at(9) == doctest::Approx(0.003).epsilon(1e-14));
  CHECK(st.lr_at(18) == doctest::Approx(0.003).epsilon(1e-14));
  CHECK(st.lr_at(19) == doctest::Approx(0.005).epsilon(1e-14));
}

// =============================================================================================
// Step convention, resuming, state
// =============================================================================================

TEST_CASE("sched: the constructor applies iteration -1, step() the next, step(n) jumps; resuming leaves the lr alone") {
  const ds::warmup_lr ref(0.0, 0.1, 10, true);
  optim::sgd opt({.lr = 0.5});
  sched::warmup_lr s(opt, {.warmup_min_lr = 0.0, .warmup_max_lr = 0.1, .warmup_num_steps = 10, .warmup_type = sched::warmup_kind::linear});
  CHECK(s.last_batch_iteration() == -1);
  CHECK(opt.lr() == 0.0);
  CHECK(s.last_lr() == 0.0);
  s.step(opt);  // the first step() computes iteration 0, the lr of the second batch
  CHECK(s.last_batch_iteration() == 0);
  CHECK(opt.lr() == ref.get_lr(0));
  s.step(opt);
  CHECK(s.last_batch_iteration() == 1);
  CHECK(close(opt.lr(), ref.get_lr(1)));  // 0.01
  s.step(opt, 7);  // DeepSpeed's step(batch_iteration)
  CHECK(s.last_batch_iteration() == 7);
  CHECK(close(opt.lr(), ref.get_lr(7)));
  s.step(opt);
  CHECK(s.last_batch_iteration() == 8);
  CHECK(close(opt.lr(), ref.get_lr(8)));

  // resuming (last_batch_iteration != -1): the constructor does not touch the optimizer
  optim::sgd opt2({.lr = 0.5});
  sched::warmup_lr r(opt2, {.warmup_min_lr = 0.0, .warmup_max_lr = 0.1, .warmup_num_steps = 10, .warmup_type = sched::warmup_kind::linear,
                            .last_batch_iteration = 4});
  CHECK(opt2.lr() == 0.5);
  CHECK(std::isnan(r.last_lr()));
  r.step(opt2);
  CHECK(r.last_batch_iteration() == 5);
  CHECK(close(opt2.lr(), ref.get_lr(5)));

  // the same for the others
  optim::adamw a({.lr = 0.5, .beta1 = 0.9});
  sched::one_cycle oc(a, {.cycle_min_lr = 0.01, .cycle_max_lr = 0.1, .last_batch_iteration = 3});
  CHECK(a.lr() == 0.5);
  CHECK(a.betas().first == 0.9);
  optim::sgd b({.lr = 0.5});
  sched::warmup_cosine_lr wc(b, {.total_num_steps = 100, .warmup_num_steps = 10, .last_batch_iteration = 3});
  CHECK(b.lr() == 0.5);
  sched::lr_range_test lr(b, {.last_batch_iteration = 3});
  CHECK(b.lr() == 0.5);
  sched::warmup_decay_lr wd(b, {.total_num_steps = 100, .warmup_num_steps = 10, .last_batch_iteration = 3});
  CHECK(b.lr() == 0.5);
}

TEST_CASE("sched: saving last_batch_iteration and resuming reproduces the schedule exactly") {
  // DeepSpeed's state_dict() is {last_batch_iteration}; a resumed scheduler must continue the
  // same lrs bit for bit, whether resumed through the options or set_last_batch_iteration.
  auto check = [](const char* what, auto make, auto make_resumed) {
    optim::adamw oa({.lr = 0.1});
    auto a = make(oa);
    for (int i = 0; i < 17; ++i) a.step(oa);
    const int64_t saved = a.last_batch_iteration();
    CHECK(saved == 16);

    optim::adamw ob({.lr = 0.1});
    auto b = make_resumed(ob, saved);  // through last_batch_iteration in the options
    optim::adamw oc({.lr = 0.1});
    auto c = make(oc);  // through set_last_batch_iteration (DeepSpeed's load_state_dict)
    c.set_last_batch_iteration(saved);
    CHECK(c.last_batch_iteration() == saved);
    for (int i = 0; i < 40; ++i) {
      a.step(oa);
      b.step(ob);
      c.step(oc);
      CHECK_MESSAGE(oa.lr() == ob.lr(), what << " step " << i);
      CHECK_MESSAGE(oa.lr() == oc.lr(), what << " step " << i);
      CHECK_MESSAGE(oa.betas() == ob.betas(), what << " step " << i);
    }
  };
  check(
      "warmup_lr",
      [](optim::adamw& o) { return sched::warmup_lr(o, {.warmup_max_lr = 0.1, .warmup_num_steps = 20}); },
      [](optim::adamw& o, int64_t t) { return sched::warmup_lr(o, {.warmup_max_lr = 0.1, .warmup_num_steps = 20, .last_batch_iteration = t}); });
  check(
      "warmup_decay_lr",
      [](optim::adamw& o) { return sched::warmup_decay_lr(o, {.total_num_steps = 40, .warmup_num_steps = 20, .warmup_type = sched::warmup_kind::linear}); },
      [](optim::adamw& o, int64_t t) {
        return sched::warmup_decay_lr(o, {.total_num_steps = 40, .warmup_num_steps = 20, .warmup_type = sched::warmup_kind::linear, .last_batch_iteration = t});
      });
  check(
      "warmup_cosine_lr",
      [](optim::adamw& o) { return sched::warmup_cosine_lr(o, {.total_num_steps = 50, .warmup_num_steps = 10}); },
      [](optim::adamw& o, int64_t t) {
        (void)o;
        return sched::warmup_cosine_lr({.total_num_steps = 50, .warmup_num_steps = 10, .last_batch_iteration = t}, 0.1);
      });
  check(
      "one_cycle",
      [](optim::adamw& o) { return sched::one_cycle(o, {.cycle_min_lr = 0.01, .cycle_max_lr = 0.1, .decay_lr_rate = 0.1, .cycle_first_step_size = 10, .decay_step_size = 3}); },
      [](optim::adamw& o, int64_t t) {
        return sched::one_cycle(o, {.cycle_min_lr = 0.01, .cycle_max_lr = 0.1, .decay_lr_rate = 0.1, .cycle_first_step_size = 10, .decay_step_size = 3,
                                    .last_batch_iteration = t});
      });
  check(
      "lr_range_test",
      [](optim::adamw& o) { return sched::lr_range_test(o, {.lr_range_test_step_size = 5, .lr_range_test_staircase = true}); },
      [](optim::adamw& o, int64_t t) { return sched::lr_range_test(o, {.lr_range_test_step_size = 5, .lr_range_test_staircase = true, .last_batch_iteration = t}); });
}

// =============================================================================================
// Bad parameters
// =============================================================================================

TEST_CASE("sched: bad parameters get a clear error") {
  using E = trident::error;
  using doctest::Contains;
  optim::sgd opt({.lr = 0.1});

  // warmup_type strings (DeepSpeed falls back to "log" with a warning; we refuse)
  CHECK(sched::parse_warmup_type("log") == sched::warmup_kind::log);
  CHECK(sched::parse_warmup_type("linear") == sched::warmup_kind::linear);
  CHECK_THROWS_WITH_AS(sched::parse_warmup_type("cosine"), Contains("unknown warmup_type 'cosine'"), E);

  // WarmupLR: warmup_num_steps must be a positive integer (DeepSpeed's ValueError)
  CHECK_THROWS_WITH_AS(sched::warmup_lr(opt, {.warmup_num_steps = 0}), Contains("warmup_num_steps must be a positive integer, got 0"), E);
  CHECK_THROWS_WITH_AS(sched::warmup_lr(opt, {.warmup_num_steps = -5}), Contains("warmup_num_steps must be a positive integer, got -5"), E);
  CHECK_THROWS_WITH_AS(sched::warmup_lr(opt, {.warmup_min_lr = -1e-3}), Contains("warmup_min_lr"), E);
  CHECK_THROWS_WITH_AS(sched::warmup_lr(opt, {.warmup_max_lr = nan_v}), Contains("warmup_max_lr"), E);
  CHECK_THROWS_WITH_AS(sched::warmup_lr({.warmup_max_lr = std::numeric_limits<double>::infinity()}), Contains("warmup_max_lr must be finite"), E);

  // WarmupDecayLR: total_num_steps required and not below the warm-up
  CHECK_THROWS_WITH_AS(sched::warmup_decay_lr(opt, {}), Contains("total_num_steps must be > 0, got 0"), E);
  CHECK_THROWS_WITH_AS(sched::warmup_decay_lr(opt, {.total_num_steps = 5, .warmup_num_steps = 10}),
                       Contains("warmup_num_steps (10) exceeds total_num_steps (5)"), E);
  CHECK_THROWS_WITH_AS(sched::warmup_decay_lr(opt, {.total_num_steps = 1, .warmup_num_steps = 1}), Contains("DeepSpeed's minimum"), E);
  CHECK_THROWS_WITH_AS(sched::warmup_decay_lr(opt, {.total_num_steps = 100, .warmup_num_steps = 0}), Contains("warmup_num_steps must be a positive integer"), E);
  CHECK_THROWS_WITH_AS(sched::warmup_decay_lr(opt, {.total_num_steps = 100, .warmup_max_lr = -1.0}), Contains("warmup_max_lr"), E);
  CHECK_THROWS_WITH_AS(sched::warmup_decay_lr({.total_num_steps = 100, .warmup_max_lr = std::nullopt}), Contains("warmup_max_lr is not set"), E);
  optim::sgd other({.lr = 0.1});  // the accepted ones below set its lr
  CHECK_NOTHROW(sched::warmup_decay_lr(other, {.total_num_steps = 10, .warmup_num_steps = 10}));

  // WarmupCosineLR
  CHECK_THROWS_WITH_AS(sched::warmup_cosine_lr(opt, {}), Contains("total_num_steps must be > 0, got 0"), E);
  CHECK_THROWS_WITH_AS(sched::warmup_cosine_lr(opt, {.total_num_steps = 500, .warmup_num_steps = 1000}),
                       Contains("warmup_num_steps (1000) exceeds total_num_steps (500)"), E);
  CHECK_THROWS_WITH_AS(sched::warmup_cosine_lr(opt, {.total_num_steps = 100, .warmup_num_steps = 0}), Contains("warmup_num_steps must be a positive integer"), E);
  CHECK_THROWS_WITH_AS(sched::warmup_cosine_lr(opt, {.total_num_steps = 100, .warmup_min_ratio = -0.1, .warmup_num_steps = 10}), Contains("warmup_min_ratio"), E);
  CHECK_THROWS_WITH_AS(sched::warmup_cosine_lr(opt, {.total_num_steps = 100, .warmup_num_steps = 10, .cos_min_ratio = nan_v}), Contains("cos_min_ratio"), E);
  CHECK_THROWS_WITH_AS(sched::warmup_cosine_lr({.total_num_steps = 100, .warmup_num_steps = 10}, -1.0), Contains("base lr"), E);
  CHECK_NOTHROW(sched::warmup_cosine_lr(other, {.total_num_steps = 10, .warmup_num_steps = 10}));

  // OneCycle
  CHECK_THROWS_WITH_AS(sched::one_cycle(opt, {.cycle_max_lr = 0.1}), Contains("cycle_min_lr is required"), E);
  CHECK_THROWS_WITH_AS(sched::one_cycle(opt, {.cycle_min_lr = 0.01}), Contains("cycle_max_lr is required"), E);
  CHECK_THROWS_WITH_AS(sched::one_cycle(opt, {.cycle_min_lr = -0.01, .cycle_max_lr = 0.1}), Contains("cycle_min_lr must be finite and >= 0"), E);
  CHECK_THROWS_WITH_AS(sched::one_cycle(opt, {.cycle_min_lr = 0.01, .cycle_max_lr = 0.1, .decay_lr_rate = -1}), Contains("decay_lr_rate"), E);
  CHECK_THROWS_WITH_AS(sched::one_cycle(opt, {.cycle_min_lr = 0.01, .cycle_max_lr = 0.1, .cycle_first_step_size = 0}), Contains("cycle_first_step_size must be > 0"), E);
  CHECK_THROWS_WITH_AS(sched::one_cycle(opt, {.cycle_min_lr = 0.01, .cycle_max_lr = 0.1, .cycle_second_step_size = -3}), Contains("cycle_second_step_size must be > 0"), E);
  CHECK_THROWS_WITH_AS(sched::one_cycle(opt, {.cycle_min_lr = 0.01, .cycle_max_lr = 0.1, .cycle_first_stair_count = -1}), Contains("stair counts"), E);
  CHECK_THROWS_WITH_AS(sched::one_cycle(opt, {.cycle_min_lr = 0.01, .cycle_max_lr = 0.1, .cycle_second_stair_count = -2}), Contains("stair counts"), E);
  CHECK_THROWS_WITH_AS(sched::one_cycle(opt, {.cycle_min_lr = 0.01, .cycle_max_lr = 0.1, .decay_step_size = -1}), Contains("decay_step_size"), E);
  CHECK_THROWS_WITH_AS(sched::one_cycle(opt, {.cycle_min_lr = 0.01, .cycle_max_lr = 0.1, .cycle_min_mom = 1.0}), Contains("cycle_min_mom"), E);
  CHECK_THROWS_WITH_AS(sched::one_cycle(opt, {.cycle_min_lr = 0.01, .cycle_max_lr = 0.1, .cycle_max_mom = -0.1}), Contains("cycle_max_mom"), E);
  CHECK_THROWS_WITH_AS(sched::one_cycle(opt, {.cycle_min_lr = 0.01, .cycle_max_lr = 0.1, .decay_mom_rate = nan_v}), Contains("decay_mom_rate"), E);
  // without momentum cycling the momentum bounds are not used, so not checked
  CHECK_NOTHROW(sched::one_cycle(other, {.cycle_min_lr = 0.01, .cycle_max_lr = 0.1, .cycle_momentum = false, .cycle_min_mom = 2.0}));

  // LRRangeTest
  CHECK_THROWS_WITH_AS(sched::lr_range_test(opt, {.lr_range_test_min_lr = -1}), Contains("lr_range_test_min_lr"), E);
  CHECK_THROWS_WITH_AS(sched::lr_range_test(opt, {.lr_range_test_step_size = 0}), Contains("lr_range_test_step_size must be > 0, got 0"), E);
  CHECK_THROWS_WITH_AS(sched::lr_range_test(opt, {.lr_range_test_step_rate = -0.5}), Contains("lr_range_test_step_rate"), E);

  // a refused constructor leaves the optimizer's lr alone
  CHECK(opt.lr() == 0.1);
}

// =============================================================================================
// Dynamic loss scaler
// =============================================================================================

TEST_CASE("loss scaler: DeepSpeed's defaults, printed") {
  dynamic_loss_scaler s;
  CHECK(s.scale() == 65536.0);  // 2^16
  CHECK(s.hysteresis_left() == 2);
  CHECK(s.iteration() == 0);
  CHECK(s.skipped_steps() == 0);
  CHECK(s.options().loss_scale_window == 1000);
  CHECK(s.options().min_loss_scale == 1.0);
  CHECK_FALSE(s.options().consecutive_hysteresis);
  CHECK(s.describe() == "dynamic loss scale: initial 2^16, window 1000, hysteresis 2, consecutive hysteresis off, min 1, factor 2");
  dynamic_loss_scaler t({.initial_scale_power = 8, .loss_scale_window = 3, .hysteresis = 1, .consecutive_hysteresis = true, .min_loss_scale = 0.25});
  CHECK(t.describe() == "dynamic loss scale: initial 2^8, window 3, hysteresis 1, consecutive hysteresis on, min 0.25, factor 2");
}

TEST_CASE("loss scaler: hand-worked trajectories with a window of 3") {
  // initial 2^4 = 16, window 3, hysteresis 2. DeepSpeed grows the scale on a clean step when
  // stable_interval = cur_iter − last_overflow_iter − 1 is a positive multiple of the window:
  // from the start (last overflow −1) that is cur_iter 3, the 4th clean step in a row.
  const std::vector<bool> events = {false, false, false, false, true, false, true, true, false, false, false, false, false, false, false, true};
  SUBCASE("hysteresis 2, not consecutive") {
    check_rows("h2", {.initial_scale_power = 4, .loss_scale_window = 3, .hysteresis = 2},
               {
                   {false, 16, 2, 0},  // it 0: stable 0
                   {false, 16, 2, 0},  // it 1: stable 1
                   {false, 16, 2, 0},  // it 2: stable 2
                   {false, 32, 2, 0},  // it 3: stable 3: ×2
                   {true, 32, 1, 1},   // it 4: overflow, hysteresis 2 -> 1, the scale stays
                   {false, 32, 1, 1},  // it 5: stable 0; hysteresis not restored (not consecutive)
                   {true, 16, 1, 2},   // it 6: hysteresis used up: /2
                   {true, 8, 1, 3},    // it 7: /2 again (hysteresis is restored only at a growth)
                   {false, 8, 1, 3},   // it 8: stable 0
                   {false, 8, 1, 3},   // it 9: 1
                   {false, 8, 1, 3},   // it 10: 2
                   {false, 16, 2, 3},  // it 11: 3: ×2, hysteresis restored
                   {false, 16, 2, 3},  // it 12: 4
                   {false, 16, 2, 3},  // it 13: 5
                   {false, 32, 2, 3},  // it 14: 6: ×2
                   {true, 32, 1, 4},   // it 15: overflow, hysteresis 2 -> 1
               });
  }
  SUBCASE("hysteresis 2, consecutive") {
    check_rows("h2 consecutive", {.initial_scale_power = 4, .loss_scale_window = 3, .hysteresis = 2, .consecutive_hysteresis = true},
               {
                   {false, 16, 2, 0},
                   {false, 16, 2, 0},
                   {false, 16, 2, 0},
                   {false, 32, 2, 0},  // it 3: ×2
                   {true, 32, 1, 1},   // it 4: hysteresis 2 -> 1
                   {false, 32, 2, 1},  // it 5: a clean step restores it at once
                   {true, 32, 1, 2},   // it 6: so this overflow only uses it again
                   {true, 16, 1, 3},   // it 7: two in a row: /2
                   {false, 16, 2, 3},  // it 8
                   {false, 16, 2, 3},  // it 9
                   {false, 16, 2, 3},  // it 10
                   {false, 32, 2, 3},  // it 11: stable 3: ×2
                   {false, 32, 2, 3},
                   {false, 32, 2, 3},
                   {false, 64, 2, 3},  // it 14: stable 6: ×2
                   {true, 64, 1, 4},
               });
  }
  SUBCASE("hysteresis 1") {
    check_rows("h1", {.initial_scale_power = 4, .loss_scale_window = 3, .hysteresis = 1},
               {
                   {false, 16, 1, 0},
                   {false, 16, 1, 0},
                   {false, 16, 1, 0},
                   {false, 32, 1, 0},  // it 3: ×2
                   {true, 16, 1, 1},   // it 4: every overflow halves
                   {false, 16, 1, 1},
                   {true, 8, 1, 2},
                   {true, 4, 1, 3},
                   {false, 4, 1, 3},
                   {false, 4, 1, 3},
                   {false, 4, 1, 3},
                   {false, 8, 1, 3},  // it 11
                   {false, 8, 1, 3},
                   {false, 8, 1, 3},
                   {false, 16, 1, 3},  // it 14
                   {true, 8, 1, 4},
               });
  }
  // the events above, replayed against the transcription too
  script sc;
  for (bool e : events) e ? sc.overflow() : sc.clean();
  CHECK(replay({.initial_scale_power = 4, .loss_scale_window = 3, .hysteresis = 2}, sc) == events.size());
}

TEST_CASE("loss scaler: DeepSpeed's defaults over a scripted run") {
  // Hand-worked: three overflows at the start use the hysteresis, then halve twice:
  // 65536 (hysteresis 2 -> 1), 32768, 16384. The last overflow is iteration 2; the scale doubles
  // on the clean step where cur_iter − 2 − 1 = 1000, i.e. iteration 1003 (the 1001st clean one).
  dynamic_loss_scaler s;
  CHECK_FALSE(s.update(true));
  CHECK(s.scale() == 65536);
  CHECK(s.hysteresis_left() == 1);
  CHECK_FALSE(s.update(true));
  CHECK(s.scale() == 32768);
  CHECK_FALSE(s.update(true));
  CHECK(s.scale() == 16384);
  CHECK(s.skipped_steps() == 3);
  for (int i = 0; i < 1000; ++i) CHECK(s.update(false));
  CHECK(s.iteration() == 1003);
  CHECK(s.scale() == 16384);  // 1000 clean steps are not yet enough
  CHECK(s.hysteresis_left() == 1);
  CHECK(s.update(false));
  CHECK(s.scale() == 32768);  // the 1001st
  CHECK(s.hysteresis_left() == 2);
  CHECK(s.skipped_steps() == 3);

  const script sc = script().overflow(3).clean(1001).overflow().clean(2001).overflow(2).clean(10).overflow().clean(999).overflow(4).clean(3000);
  CHECK(replay({}, sc) == sc.steps.size());
}

TEST_CASE("loss scaler: scripted runs against DeepSpeed's update_scale") {
  SUBCASE("hysteresis 1") {
    const script sc = script().overflow(5).clean(1001).overflow().clean(1).overflow().clean(2500).overflow(3).clean(40);
    CHECK(replay({.hysteresis = 1}, sc) == sc.steps.size());
  }
  SUBCASE("consecutive hysteresis") {
    script sc;
    for (int i = 0; i < 50; ++i) sc.overflow().clean();  // never drops: each clean step restores
    sc.overflow(2).clean(1001).overflow(3).clean(5);
    CHECK(replay({.hysteresis = 2, .consecutive_hysteresis = true}, sc) == sc.steps.size());
    CHECK(replay({.hysteresis = 3, .consecutive_hysteresis = true}, sc) == sc.steps.size());
    dynamic_loss_scaler s({.hysteresis = 2, .consecutive_hysteresis = true});
    for (int i = 0; i < 50; ++i) {
      s.update(true);
      s.update(false);
    }
    CHECK(s.scale() == 65536);
    CHECK(s.skipped_steps() == 50);
  }
  SUBCASE("small windows") {
    const script sc = script().clean(10).overflow().clean(7).overflow(2).clean(3).overflow().clean(4).overflow().clean(30).overflow(3).clean(9);
    for (int64_t w : {1, 2, 3, 4}) {
      for (int h : {1, 2, 3}) {
        for (bool c : {false, true}) {
          CHECK(replay({.initial_scale_power = 10, .loss_scale_window = w, .hysteresis = h, .consecutive_hysteresis = c}, sc) == sc.steps.size());
        }
      }
    }
  }
  SUBCASE("pseudo-random overflow patterns, with and without the floor") {
    int n = 0;
    for (int64_t w : {1, 2, 3, 7, 50}) {
      for (int h : {1, 2, 3}) {
        for (bool c : {false, true}) {
          for (double p : {0.05, 0.3, 0.7}) {
            const script sc = random_script(static_cast<std::uint64_t>(1000 * w + 10 * h + (c ? 1 : 0)) + static_cast<std::uint64_t>(p * 100), 1500, p);
            // no error at the floor: the scale is clamped to min_loss_scale and stays there
            CHECK(replay({.initial_scale_power = 6, .loss_scale_window = w, .hysteresis = h, .consecutive_hysteresis = c, .min_loss_scale = 4,
                          .raise_error_at_min_scale = false},
                         sc) == sc.steps.size());
            // with the error: stops where DeepSpeed raises
            replay({.initial_scale_power = 3, .loss_scale_window = w, .hysteresis = h, .consecutive_hysteresis = c, .min_loss_scale = 1}, sc);
            ++n;
          }
        }
      }
    }
    CHECK(n == 90);
  }
}

TEST_CASE("loss scaler: the scale never drops below min_loss_scale") {
  // 2^3 = 8, min 3, hysteresis 1: 8 -> 4 -> max(2, 3) = 3 -> stays 3 (no error requested)
  dynamic_loss_scaler s({.initial_scale_power = 3, .hysteresis = 1, .min_loss_scale = 3, .raise_error_at_min_scale = false});
  s.update(true);
  CHECK(s.scale() == 4);
  s.update(true);
  CHECK(s.scale() == 3);
  s.update(true);
  CHECK(s.scale() == 3);
  CHECK(s.skipped_steps() == 3);
  // with the error (the default): the overflow that would go below it throws
  dynamic_loss_scaler e({.initial_scale_power = 3, .hysteresis = 1, .min_loss_scale = 3});
  e.update(true);
  e.update(true);
  CHECK(e.scale() == 3);
  CHECK_THROWS_AS(e.update(true, "w"), trident::error);
}

TEST_CASE("loss scaler: an overflow at the minimum scale names the first tensor whose gradient was not finite") {
  // a real store: the second tensor's gradient overflows
  using P = policy<fp16_mixed, cpu>;
  nn::parameter_store<P> store;
  store.declare("embed.weight", {6});
  store.declare("blocks.0.attn.qkv.weight", {9});
  store.declare("blocks.0.attn.qkv.bias", {3});
  store.allocate();
  using G = typename P::gradient_type;
  for (index_t i = 0; i < store.size(); ++i) store.grads().data()[i] = G(0.25f);
  store.grads().data()[store.infos()[1].offset + 2] = G(std::numeric_limits<float>::infinity());
  store.grads().data()[store.infos()[2].offset] = G(std::numeric_limits<float>::quiet_NaN());
  const auto gn = optim::grad_norm(store);
  REQUIRE_FALSE(gn.finite);
  const std::string bad = optim::first_nonfinite(store);
  REQUIRE(bad == "blocks.0.attn.qkv.weight");

  // 2^1 = 2, min 1, hysteresis 2: overflow (hysteresis), overflow (2 -> 1), overflow (hysteresis
  // used, 1 is the minimum): error
  dynamic_loss_scaler s({.initial_scale_power = 1, .hysteresis = 2});
  CHECK_FALSE(s.update(!gn.finite, bad));
  CHECK(s.scale() == 2);
  CHECK_FALSE(s.update(!gn.finite, bad));
  CHECK(s.scale() == 1);
  const loss_scaler_state before = s.state();
  std::string message;
  try {
    s.update(!gn.finite, bad);
  } catch (const trident::error& e) {
    message = e.what();
  }
  INFO(message);
  CHECK(message.find("'blocks.0.attn.qkv.weight'") != std::string::npos);
  CHECK(message.find("min_loss_scale") != std::string::npos);
  CHECK(message.find("embed.weight") == std::string::npos);
  // as in DeepSpeed, the failed update changes nothing
  CHECK(s.scale() == before.scale);
  CHECK(s.iteration() == before.iteration);
  CHECK(s.skipped_steps() == before.skipped_steps);
  CHECK(s.hysteresis_left() == before.hysteresis_left);

  // at the minimum from the start (2^0 = 1 = min), hysteresis 1: the first overflow throws
  dynamic_loss_scaler z({.initial_scale_power = 0, .hysteresis = 1});
  CHECK_THROWS_WITH_AS(z.update(true, "lm_head.weight"), doctest::Contains("'lm_head.weight'"), trident::error);
  // no name given: the message says so
  CHECK_THROWS_WITH_AS(z.update(true), doctest::Contains("not known"), trident::error);
  // a clean step at the minimum is fine, and so is an overflow once the scale has grown
  dynamic_loss_scaler g({.initial_scale_power = 0, .loss_scale_window = 1, .hysteresis = 1});
  CHECK(g.update(false));
  CHECK(g.update(false));  // stable_interval 1: ×2
  CHECK(g.scale() == 2);
  CHECK_FALSE(g.update(true, "x"));
  CHECK(g.scale() == 1);
}

TEST_CASE("loss scaler: state() and restore() resume a run exactly") {
  const script sc = random_script(77, 600, 0.2);
  const dynamic_loss_scaler_options o{.initial_scale_power = 12, .loss_scale_window = 5, .hysteresis = 3, .min_loss_scale = 2, .raise_error_at_min_scale = false};
  dynamic_loss_scaler a(o);
  for (std::size_t i = 0; i < 250; ++i) a.update(sc.steps[i]);
  dynamic_loss_scaler b(o);
  b.restore(a.state());
  CHECK(b.scale() == a.scale());
  CHECK(b.iteration() == 250);
  for (std::size_t i = 250; i < sc.steps.size(); ++i) {
    a.update(sc.steps[i]);
    b.update(sc.steps[i]);
    const loss_scaler_state x = a.state(), y = b.state();
    REQUIRE_MESSAGE((x.scale == y.scale && x.iteration == y.iteration && x.last_overflow_iteration == y.last_overflow_iteration &&
                     x.hysteresis_left == y.hysteresis_left && x.skipped_steps == y.skipped_steps),
                    "step " << i);
  }

  using doctest::Contains;
  loss_scaler_state bad = a.state();
  bad.scale = 1.0;  // below min_loss_scale 2
  CHECK_THROWS_WITH_AS(b.restore(bad), Contains("invalid scale"), trident::error);
  bad.scale = nan_v;
  CHECK_THROWS_WITH_AS(b.restore(bad), Contains("invalid scale"), trident::error);
  bad = a.state();
  bad.hysteresis_left = 0;
  CHECK_THROWS_WITH_AS(b.restore(bad), Contains("invalid hysteresis count 0"), trident::error);
  bad.hysteresis_left = 4;  // more than hysteresis 3
  CHECK_THROWS_WITH_AS(b.restore(bad), Contains("invalid hysteresis count 4"), trident::error);
}

TEST_CASE("loss scaler: bad options get a clear error; the static scaler") {
  using E = trident::error;
  using doctest::Contains;
  CHECK_THROWS_WITH_AS(dynamic_loss_scaler({.initial_scale_power = -1}), Contains("initial_scale_power must be in [0, 127], got -1"), E);
  CHECK_THROWS_WITH_AS(dynamic_loss_scaler({.initial_scale_power = 128}), Contains("initial_scale_power"), E);
  CHECK_THROWS_WITH_AS(dynamic_loss_scaler({.loss_scale_window = 0}), Contains("loss_scale_window must be >= 1, got 0"), E);
  CHECK_THROWS_WITH_AS(dynamic_loss_scaler({.hysteresis = 0}), Contains("hysteresis must be >= 1, got 0"), E);
  CHECK_THROWS_WITH_AS(dynamic_loss_scaler({.min_loss_scale = 0}), Contains("min_loss_scale must be finite and > 0"), E);
  CHECK_THROWS_WITH_AS(dynamic_loss_scaler({.min_loss_scale = nan_v}), Contains("min_loss_scale"), E);
  CHECK_THROWS_WITH_AS(dynamic_loss_scaler({.scale_factor = 1.0}), Contains("scale_factor must be finite and > 1"), E);
  CHECK_THROWS_WITH_AS(dynamic_loss_scaler({.initial_scale_power = 0, .min_loss_scale = 2}), Contains("is below min_loss_scale"), E);

  static_loss_scaler st(128.0);
  CHECK(st.scale() == 128.0);
  CHECK(st.update(false));
  CHECK_FALSE(st.update(true, "w"));
  CHECK_FALSE(st.update(true));
  CHECK(st.scale() == 128.0);
  CHECK(st.skipped_steps() == 2);
  CHECK(st.describe() == "static loss scale 128");
  CHECK_THROWS_WITH_AS(static_loss_scaler(0.0), Contains("finite and > 0"), E);
  CHECK_THROWS_WITH_AS(static_loss_scaler(std::numeric_limits<double>::infinity()), Contains("finite and > 0"), E);
}
