#pragma once
/// @file prune/schedule.hpp
/// Gradual magnitude pruning (Zhu and Gupta 2017, "To prune, or not to prune"): the sparsity
/// rises from s_i to s_f over n pruning steps Δt apart, starting at step t0,
///
///     s_t = s_f + (s_i − s_f) (1 − (t − t0) / (n Δt))³     for t0 <= t <= t0 + n Δt,
///
/// s_i before t0 and s_f after; the masks are recomputed (by magnitude, layer-wise or
/// global) at t0, t0 + Δt, ..., t0 + n Δt, and the pruned weights are zeroed then. Between
/// those steps a masked optimizer (masked.hpp) following the same mask_set keeps them zero.
///
///   prune::gradual_pruner<P> pruner(store, {.initial_sparsity = 0, .final_sparsity = 0.9,
///                                           .start_step = 100, .frequency = 50, .steps = 20});
///   prune::masked<optim::sgd> opt(pruner.masks(), {.lr = 0.1, .momentum = 0.9});
///   for (std::int64_t t = 0; ...; ++t) {
///     pruner.step(t);                   // recomputes and applies the masks when t is due
///     ... forward, backward, opt.step(store) ...
///   }
///
/// The masks are recomputed from the store's weights (master, or params), which every rank
/// holds under data parallel and ZeRO-1/2 (the same weights, so the same masks); under ZeRO-3
/// the store's params are released and step() throws.

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>

#include "../core/error.hpp"
#include "mask.hpp"

namespace trident::prune {

/// Zhu and Gupta's sparsity schedule.
struct gradual_schedule {
  double initial_sparsity = 0.0;  ///< s_i
  double final_sparsity = 0.5;    ///< s_f
  std::int64_t start_step = 0;    ///< t0
  std::int64_t frequency = 1;     ///< Δt: steps between mask updates
  std::int64_t steps = 1;         ///< n: mask updates after the first (the last at t0 + n Δt)

  /// Throws naming the first invalid field.
  void validate() const {
    auto fail = [](const std::string& what) { throw error("prune::gradual_schedule: " + what); };
    if (!(initial_sparsity >= 0 && initial_sparsity <= 1)) fail("initial_sparsity must be in [0, 1], got " + detail::fmt(initial_sparsity));
    if (!(final_sparsity >= 0 && final_sparsity <= 1)) fail("final_sparsity must be in [0, 1], got " + detail::fmt(final_sparsity));
    if (start_step < 0) fail("start_step must be >= 0, got " + std::to_string(start_step));
    if (frequency <= 0) fail("frequency (delta t) must be positive, got " + std::to_string(frequency));
    if (steps <= 0) fail("steps (n) must be positive, got " + std::to_string(steps));
  }
  /// The last step that updates the masks: t0 + n Δt.
  std::int64_t end_step() const noexcept { return start_step + steps * frequency; }
  /// s_t.
  double sparsity_at(std::int64_t t) const {
    validate();
    if (t <= start_step) return initial_sparsity;
    if (t >= end_step()) return final_sparsity;
    const double r = 1.0 - static_cast<double>(t - start_step) / static_cast<double>(steps * frequency);
    return final_sparsity + (initial_sparsity - final_sparsity) * r * r * r;
  }
  /// Whether the masks are recomputed at step t: t0, t0 + Δt, ..., t0 + n Δt.
  bool update_due(std::int64_t t) const noexcept {
    return t >= start_step && t <= end_step() && (t - start_step) % frequency == 0;
  }
};

/// Whether a mask update ranks each tensor alone or all selected tensors together.
enum class scope { layer_wise, global };

/// Recomputes and applies magnitude masks on the gradual schedule.
/// @tparam P the policy bundle of the store
template <policy_bundle P>
class gradual_pruner {
 public:
  /// Prunes the tensors `select` picks of `store` (referenced), ranked as `how` says.
  gradual_pruner(nn::parameter_store<P>& store, gradual_schedule schedule, scope how = scope::layer_wise,
                 tensor_predicate select = matrices())
      : store_(&store), schedule_(schedule), scope_(how), select_(std::move(select)) {
    schedule_.validate();
    if (!select_) throw error("prune::gradual_pruner: no tensor predicate");
  }

  /// At a step the schedule marks: masks at s_t, applied to the store; returns whether it
  /// updated. Other steps change nothing.
  bool step(std::int64_t t) {
    if (!schedule_.update_due(t)) return false;
    const double s = schedule_.sparsity_at(t);
    masks_ = scope_ == scope::global ? magnitude_global(*store_, s, select_) : magnitude_layerwise(*store_, s, select_);
    apply(*store_, masks_);
    sparsity_ = s;
    ++updates_;
    return true;
  }

  /// The current masks (what a masked optimizer follows; empty before the first update).
  const mask_set& masks() const noexcept { return masks_; }
  const gradual_schedule& schedule() const noexcept { return schedule_; }
  /// The sparsity of the last update (s_i before the first), and how many there were.
  double sparsity() const noexcept { return updates_ ? sparsity_ : schedule_.initial_sparsity; }
  int updates() const noexcept { return updates_; }

 private:
  nn::parameter_store<P>* store_;
  gradual_schedule schedule_;
  scope scope_;
  tensor_predicate select_;
  mask_set masks_;
  double sparsity_ = 0;
  int updates_ = 0;
};

}  // namespace trident::prune
