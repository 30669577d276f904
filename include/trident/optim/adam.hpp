#pragma once
/// @file optim/adam.hpp
/// Adam and AdamW with PyTorch's formulas (torch.optim.Adam / torch.optim.AdamW, amsgrad off),
/// fused into one vectorised, multi-threaded pass over a parameter store's flat buffers.
///
/// Per element, with g the gradient times grad_scale, t the step count after this step, and
/// lr the group's lr (optimizer lr() times the group's lr_scale):
///
///     adam:   g ← g + λ·θ                       (L2 penalty, as torch.optim.Adam; skipped when λ = 0)
///     adamw:  θ ← θ·(1 − lr·λ)                  (decoupled decay first, as torch.optim.AdamW)
///     m ← β1·m + (1 − β1)·g
///     v ← β2·v + (1 − β2)·g²
///     θ ← θ − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)   (ε added after bias-correcting √v)
///
/// The scalars are computed in double and rounded to float once, and the element arithmetic is
/// float, as PyTorch's CPU kernels do, so results agree with PyTorch to float rounding (FMA
/// contraction may move the last bit). DeepSpeed's FusedAdam/DeepSpeedCPUAdam with
/// adam_w_mode=True compute the same AdamW update.

#include <cmath>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "optimizer.hpp"
#include "vec.hpp"

namespace trident::optim {

/// Hyperparameters of adam (PyTorch's defaults).
struct adam_options {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;  ///< L2 penalty added to the gradient
};

/// Hyperparameters of adamw (PyTorch's defaults).
struct adamw_options {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;  ///< decoupled: θ ← θ·(1 − lr·λ) before the Adam update
};

namespace detail {

struct adam_constants {
  float b1, omb1, b2, omb2;
  float step_size;  // lr / (1 - β1^t)
  float bc2_sqrt;   // √(1 - β2^t)
  float eps;
  float wd;         // adam: λ
  float decay;      // adamw: 1 - lr·λ
};

template <bool Decoupled, bool L2>
inline void adam_kernel(const float* TRIDENT_RESTRICT g, float* TRIDENT_RESTRICT p, float* TRIDENT_RESTRICT m,
                        float* TRIDENT_RESTRICT v, index_t n, float scale, const adam_constants& c) {
  for_each_vector(n, [&]<class V>(V, index_t i) {
    V gi = V::load(g + i) * V::set1(scale);
    V pi = V::load(p + i);
    if constexpr (Decoupled) {
      pi = pi * V::set1(c.decay);
    } else if constexpr (L2) {
      gi = gi + V::set1(c.wd) * pi;
    }
    const V mi = V::set1(c.b1) * V::load(m + i) + V::set1(c.omb1) * gi;
    const V vi = V::set1(c.b2) * V::load(v + i) + V::set1(c.omb2) * gi * gi;
    mi.store(m + i);
    vi.store(v + i);
    const V denom = sqrt(vi) / V::set1(c.bc2_sqrt) + V::set1(c.eps);
    (pi - V::set1(c.step_size) * mi / denom).store(p + i);
  });
}

}  // namespace detail

/// Adam (Decoupled = false: L2 weight decay) or AdamW (Decoupled = true), PyTorch semantics.
/// State: "exp_avg" (m) and "exp_avg_sq" (v), fp32, over the store's flat layout.
/// @tparam Decoupled whether weight decay is decoupled (AdamW) or an L2 term in the gradient (Adam)
template <bool Decoupled>
class basic_adam : public optimizer_base {
 public:
  using options = std::conditional_t<Decoupled, adamw_options, adam_options>;

  /// @param o hyperparameters; @param groups custom parameter groups (see optimizer.hpp)
  explicit basic_adam(options o = {}, std::vector<group_spec> groups = {})
      : optimizer_base(Decoupled ? "adamw" : "adam", o.lr, std::move(groups)), opts_(o) {
    set_betas(o.beta1, o.beta2);
    check_eps(name_, o.eps);
    set_weight_decay(o.weight_decay);
  }

  /// Creates the state for `store` now (it is otherwise created by the first step).
  template <policy_bundle P>
  void init(nn::parameter_store<P>& store) {
    bind(store);
  }

  /// One optimizer step on `store`: grads × grad_scale → master, state, params. Zeroes the grads only with zero_grad_in_step().
  template <policy_bundle P>
  void step(nn::parameter_store<P>& store, double grad_scale = 1.0) {
    check_grad_scale(grad_scale);
    bind(store);
    run(store, detail::whole_store(store), grad_scale, grads_to_clear(store.grads().data()));
  }

  /// One optimizer step on the flat range of `shard` only (a ZeRO partition; see optimizer.hpp).
  template <policy_bundle P>
  void step(nn::parameter_store<P>& store, const flat_shard<P>& shard, double grad_scale = 1.0) {
    check_grad_scale(grad_scale);
    bind_shard(store, shard);
    run(store, shard, grad_scale, static_cast<typename P::gradient_type*>(nullptr));
  }

  /// The options as they are now (lr and weight decay may have changed since construction).
  options hyperparameters() const { return current(opts_); }
  std::pair<double, double> betas() const noexcept { return {opts_.beta1, opts_.beta2}; }
  /// Sets (β1, β2), each in [0, 1) (sched::one_cycle cycles β1 through this).
  void set_betas(double beta1, double beta2) {
    check_beta(name_, "beta1", beta1);
    check_beta(name_, "beta2", beta2);
    opts_.beta1 = beta1;
    opts_.beta2 = beta2;
  }
  double eps() const noexcept { return opts_.eps; }

 private:
  template <policy_bundle P>
  void run(nn::parameter_store<P>&, const flat_shard<P>& shard, double grad_scale, typename P::gradient_type* clear) {
    ++step_;
    const double t = static_cast<double>(step_);
    const double bc1 = 1.0 - std::pow(opts_.beta1, t);
    const double bc2 = 1.0 - std::pow(opts_.beta2, t);
    std::vector<detail::adam_constants> k(groups_.size());
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      const double lr = lr_ * groups_[g].lr_scale;
      const double wd = group_weight_decay(g);
      k[g] = {static_cast<float>(opts_.beta1), static_cast<float>(1.0 - opts_.beta1), static_cast<float>(opts_.beta2),
              static_cast<float>(1.0 - opts_.beta2), static_cast<float>(lr / bc1), static_cast<float>(std::sqrt(bc2)),
              static_cast<float>(opts_.eps), static_cast<float>(wd), static_cast<float>(1.0 - lr * wd)};
    }
    float* m = state_data(0);
    float* v = state_data(1);
    float* master = shard.master;
    const float scale = static_cast<float>(grad_scale);
    detail::fused_pass<true, true>(segs_, shard.begin, shard.end, shard.grads, master, shard.params,
                                   [&](const detail::segment& s, index_t i, index_t n, const float* g, int) {
                                     const auto& c = k[static_cast<std::size_t>(s.group)];
                                     if (Decoupled || c.wd == 0.0f) {
                                       detail::adam_kernel<Decoupled, false>(g, master + i, m + i, v + i, n, scale, c);
                                     } else {
                                       detail::adam_kernel<Decoupled, true>(g, master + i, m + i, v + i, n, scale, c);
                                     }
                                   },
                                   clear);
  }
  void allocate_state() override {
    add_state("exp_avg");
    add_state("exp_avg_sq");
  }

  options opts_;
};

/// torch.optim.Adam: L2 weight decay added to the gradient.
using adam = basic_adam<false>;
/// torch.optim.AdamW: decoupled weight decay, θ ← θ·(1 − lr·λ) before the update.
using adamw = basic_adam<true>;

}  // namespace trident::optim
