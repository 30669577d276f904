#pragma once
/// @file prune/masked.hpp
/// An optimizer that keeps pruned weights at exactly zero: `prune::masked<Optimizer>` is the
/// optimizer itself (it derives from it: lr, set_lr, set_momentum, state_tensors, groups work
/// as before, so schedulers and train::trainer take it unchanged) with both steps wrapped:
///
///   whole store (single process, data parallel):   g ← g ⊙ mask;  Optimizer::step;  θ ← θ ⊙ mask
///   flat shard [begin, end) (ZeRO stages 1 to 3):  the same, restricted to the shard's range
///
/// θ is the fp32 master and the params. Zeroing the gradients first keeps momentum and Adam
/// moments of pruned elements at zero, so a weight that is pruned and later revived (a
/// recomputed mask) starts from clean state; zeroing θ after the step undoes what weight
/// decay and old moments would move. Unpruned elements get exactly the update of the wrapped
/// optimizer, which is element-wise (LAMB's trust ratio sees the masked gradients).
///
/// Under ZeRO the shard's gradients are a reduced copy the optimizer must not change, so the
/// masked gradients of the shard are written to a scratch buffer of the shard's size and the
/// step runs on that; the master partition and the rank's params partition are masked after,
/// before the step all-gathers them. Gradient clipping (step_control / distributed_step)
/// measures the norm of the unmasked gradients, the same in every strategy.
///
///   auto masks = prune::magnitude_layerwise(store, 0.5);
///   prune::apply(store, masks);                      // before a ZeRO step is constructed
///   prune::masked<optim::adamw> opt(masks, {.lr = 1e-3, .weight_decay = 0.1});
///   dist.step(opt);  /  control.step(store, opt);  /  train::trainer<P, M, decltype(opt)> t(model, store, opt);
///
/// The mask_set is referenced, not copied: a gradual_pruner (schedule.hpp) that recomputes it
/// in place is followed by the optimizer.

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../optim/optimizer.hpp"
#include "mask.hpp"

namespace trident::prune {

/// Optimizer with its gradients and weights masked around every step.
/// @tparam Optimizer a trident optimizer (optim::sgd, adam, adamw, lamb, adagrad)
template <class Optimizer>
class masked : public Optimizer {
 public:
  /// Masks `masks` (referenced; it must outlive the optimizer) around an Optimizer built from
  /// its options and parameter groups.
  explicit masked(const mask_set& masks, typename Optimizer::options o = {}, std::vector<optim::group_spec> groups = {})
      : Optimizer(o, std::move(groups)), masks_(&masks) {}
  /// A temporary mask set would be gone before the first step: keep the masks in a variable.
  explicit masked(const mask_set&& masks, typename Optimizer::options o = {}, std::vector<optim::group_spec> groups = {}) = delete;

  /// The masks followed.
  const mask_set& masks() const noexcept { return *masks_; }
  /// Follows other masks from now on (referenced).
  void set_masks(const mask_set& masks) noexcept { masks_ = &masks; }
  void set_masks(const mask_set&& masks) = delete;

  /// Whole-store step with masked gradients, then masked master and params.
  template <policy_bundle P>
  void step(nn::parameter_store<P>& store, double grad_scale = 1.0) {
    masks_->check_fits(store, "prune::masked::step");
    auto* g = store.grads().data();
    using G = typename P::gradient_type;
    masks_->for_each_pruned(0, store.size(), [&](index_t i) { g[i] = static_cast<G>(0.0f); });
    Optimizer::step(store, grad_scale);
    zero_weights(store, 0, store.size(), store.params().data(), master_of(store));
  }

  /// Step on a ZeRO shard: its masked gradients (a scratch copy), then its master and params
  /// partitions masked.
  template <policy_bundle P>
  void step(nn::parameter_store<P>& store, const optim::flat_shard<P>& shard, double grad_scale = 1.0) {
    masks_->check_fits(store, "prune::masked::step");
    using G = typename P::gradient_type;
    const index_t n = shard.size();
    optim::flat_shard<P> s = shard;
    if (n > 0 && shard.grads != nullptr) {
      if (static_cast<index_t>(scratch_.size()) * static_cast<index_t>(sizeof(float)) < n * static_cast<index_t>(sizeof(G))) {
        scratch_.resize(static_cast<std::size_t>((n * static_cast<index_t>(sizeof(G)) + 3) / 4));
      }
      G* g = reinterpret_cast<G*>(scratch_.data());
      std::memcpy(static_cast<void*>(g), shard.grads, static_cast<std::size_t>(n) * sizeof(G));
      masks_->for_each_pruned(shard.begin, shard.end, [&](index_t i) { g[i - shard.begin] = static_cast<G>(0.0f); });
      s.grads = g;
    }
    Optimizer::step(store, s, grad_scale);
    if (n > 0) {
      masks_->for_each_pruned(shard.begin, shard.end, [&](index_t i) {
        shard.master[i - shard.begin] = 0.0f;
        shard.params[i - shard.begin] = static_cast<typename P::storage_type>(0.0f);
      });
    }
  }

 private:
  template <class P>
  static typename P::master_type* master_of(nn::parameter_store<P>& store) {
    if constexpr (nn::parameter_store<P>::separate_master) {
      return store.master().data();
    } else {
      return nullptr;
    }
  }
  template <class P>
  void zero_weights(nn::parameter_store<P>&, index_t begin, index_t end, typename P::storage_type* params,
                    typename P::master_type* master) const {
    using S = typename P::storage_type;
    masks_->for_each_pruned(begin, end, [&](index_t i) {
      params[i] = static_cast<S>(0.0f);
      if (master) master[i] = 0;
    });
  }

  const mask_set* masks_;
  std::vector<float> scratch_;  ///< a shard's masked gradients (in the gradient type)
};

}  // namespace trident::prune
