#pragma once
/// @file optim/adagrad.hpp
/// Adagrad with torch.optim.Adagrad's semantics (lr_decay, weight_decay,
/// initial_accumulator_value, eps), fused into one pass over a parameter store's flat buffers.
///
/// Per element, with g the gradient times grad_scale, t the step count after this step and lr
/// the group's lr:
///
///     g ← g + λ·θ                               (when λ ≠ 0)
///     clr = lr / (1 + (t − 1)·lr_decay)
///     s ← s + g²                                (s starts at initial_accumulator_value)
///     θ ← θ − clr · g / (√s + ε)
///
/// DeepSpeed has no Adagrad of its own on this path (its CPU Adagrad follows the same formula
/// without lr_decay), so PyTorch's is the reference.

#include <string>
#include <utility>
#include <vector>

#include "optimizer.hpp"
#include "vec.hpp"

namespace trident::optim {

/// Hyperparameters of adagrad (PyTorch's defaults).
struct adagrad_options {
  double lr = 1e-2;
  double lr_decay = 0.0;
  double weight_decay = 0.0;
  double initial_accumulator_value = 0.0;
  double eps = 1e-10;
};

namespace detail {

struct adagrad_constants {
  float clr, wd, eps;
};

template <bool L2>
inline void adagrad_kernel(const float* TRIDENT_RESTRICT g, float* TRIDENT_RESTRICT p, float* TRIDENT_RESTRICT sum,
                           index_t n, float scale, const adagrad_constants& c) {
  for_each_vector(n, [&]<class V>(V, index_t i) {
    const V pi = V::load(p + i);
    V gi = V::load(g + i) * V::set1(scale);
    if constexpr (L2) gi = gi + V::set1(c.wd) * pi;
    const V si = V::load(sum + i) + gi * gi;
    si.store(sum + i);
    const V den = sqrt(si) + V::set1(c.eps);
    (pi - V::set1(c.clr) * gi / den).store(p + i);
  });
}

}  // namespace detail

/// torch.optim.Adagrad (dense gradients). State: "sum" (fp32).
class adagrad : public optimizer_base {
 public:
  using options = adagrad_options;

  /// @param o hyperparameters; @param groups custom parameter groups (see optimizer.hpp)
  explicit adagrad(options o = {}, std::vector<group_spec> groups = {})
      : optimizer_base("adagrad", o.lr, std::move(groups)), opts_(o) {
    check_non_negative(name_, "lr_decay", o.lr_decay);
    check_non_negative(name_, "initial_accumulator_value", o.initial_accumulator_value);
    check_eps(name_, o.eps);
    set_weight_decay(o.weight_decay);
  }

  /// Creates the state for `store` now (it is otherwise created by the first step).
  template <policy_bundle P>
  void init(nn::parameter_store<P>& store) {
    bind(store);
  }

  /// One optimizer step on `store`. Zeroes the grads only with zero_grad_in_step().
  template <policy_bundle P>
  void step(nn::parameter_store<P>& store, double grad_scale = 1.0) {
    check_grad_scale(grad_scale);
    bind(store);
    run(detail::whole_store(store), grad_scale, grads_to_clear(store.grads().data()));
  }

  /// One optimizer step on the flat range of `shard` only (a ZeRO partition; see optimizer.hpp).
  template <policy_bundle P>
  void step(nn::parameter_store<P>& store, const flat_shard<P>& shard, double grad_scale = 1.0) {
    check_grad_scale(grad_scale);
    bind_shard(store, shard);
    run(shard, grad_scale, static_cast<typename P::gradient_type*>(nullptr));
  }

  /// The options as they are now (lr and weight decay may have changed since construction).
  options hyperparameters() const { return current(opts_); }

 private:
  template <class P>
  void run(const flat_shard<P>& shard, double grad_scale, typename P::gradient_type* clear) {
    ++step_;
    std::vector<detail::adagrad_constants> k(groups_.size());
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      const double lr = lr_ * groups_[g].lr_scale;
      k[g] = {static_cast<float>(lr / (1.0 + static_cast<double>(step_ - 1) * opts_.lr_decay)),
              static_cast<float>(group_weight_decay(g)), static_cast<float>(opts_.eps)};
    }
    float* sum = state_data(0);
    float* master = shard.master;
    const float scale = static_cast<float>(grad_scale);
    detail::fused_pass<true, true>(segs_, shard.begin, shard.end, shard.grads, master, shard.params,
                                   [&](const detail::segment& s, index_t i, index_t n, const float* g, int) {
                                     const auto& c = k[static_cast<std::size_t>(s.group)];
                                     if (c.wd != 0.0f) {
                                       detail::adagrad_kernel<true>(g, master + i, sum + i, n, scale, c);
                                     } else {
                                       detail::adagrad_kernel<false>(g, master + i, sum + i, n, scale, c);
                                     }
                                   },
                                   clear);
  }
  void allocate_state() override { add_state("sum", opts_.initial_accumulator_value); }

  options opts_;
};

}  // namespace trident::optim
