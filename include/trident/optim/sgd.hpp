#pragma once
/// @file optim/sgd.hpp
/// SGD with momentum, dampening, Nesterov and weight decay, with torch.optim.SGD's semantics,
/// fused into one vectorised, multi-threaded pass over a parameter store's flat buffers.
///
/// Per element, with g the gradient times grad_scale and lr the group's lr:
///
///     g ← g + λ·θ                                  (when λ ≠ 0)
///     if μ ≠ 0:  b ← g on the first step with momentum, else b ← μ·b + (1 − τ)·g
///                g ← g + μ·b  (Nesterov)  or  g ← b
///     θ ← θ − lr·g
///
/// As in PyTorch, the momentum buffer is created by the first step that runs with μ ≠ 0 and
/// starts as a copy of g (no dampening on that step); if μ is 0 no buffer exists and the
/// "momentum_buffer" state tensor is absent. DeepSpeed has no SGD of its own (it wraps
/// torch.optim.SGD), so there is nothing to reconcile.

#include <string>
#include <utility>
#include <vector>

#include "optimizer.hpp"
#include "vec.hpp"

namespace trident::optim {

/// Hyperparameters of sgd. PyTorch requires lr; 1e-3 is our default.
struct sgd_options {
  double lr = 1e-3;
  double momentum = 0.0;   ///< μ
  double dampening = 0.0;  ///< τ
  double weight_decay = 0.0;
  bool nesterov = false;   ///< needs μ > 0 and τ = 0 (as PyTorch requires)
};

namespace detail {

struct sgd_constants {
  float lr, wd, momentum, one_minus_dampening;
};

template <bool L2, bool Momentum, bool First, bool Nesterov>
inline void sgd_kernel(const float* TRIDENT_RESTRICT g, float* TRIDENT_RESTRICT p, float* TRIDENT_RESTRICT buf,
                       index_t n, float scale, const sgd_constants& c) {
  for_each_vector(n, [&]<class V>(V, index_t i) {
    const V pi = V::load(p + i);
    V d = V::load(g + i) * V::set1(scale);
    if constexpr (L2) d = d + V::set1(c.wd) * pi;
    if constexpr (Momentum) {
      V b = d;
      if constexpr (!First) b = V::set1(c.momentum) * V::load(buf + i) + V::set1(c.one_minus_dampening) * d;
      b.store(buf + i);
      if constexpr (Nesterov) {
        d = d + V::set1(c.momentum) * b;
      } else {
        d = b;
      }
    }
    (pi - V::set1(c.lr) * d).store(p + i);
  });
}

}  // namespace detail

/// torch.optim.SGD. State: "momentum_buffer" (fp32, once a step has run with momentum ≠ 0).
class sgd : public optimizer_base {
 public:
  using options = sgd_options;

  /// @param o hyperparameters; @param groups custom parameter groups (see optimizer.hpp)
  explicit sgd(options o = {}, std::vector<group_spec> groups = {}) : optimizer_base("sgd", o.lr, std::move(groups)), opts_(o) {
    check_non_negative(name_, "momentum", o.momentum);
    check_non_negative(name_, "dampening", o.dampening);
    set_weight_decay(o.weight_decay);
    if (o.nesterov && (o.momentum <= 0 || o.dampening != 0)) {
      throw error("sgd: Nesterov momentum requires a momentum > 0 and zero dampening (momentum " +
                  detail::format_value(o.momentum) + ", dampening " + detail::format_value(o.dampening) + ")");
    }
  }

  /// Creates the state for `store` now (it is otherwise created by the first step).
  template <policy_bundle P>
  void init(nn::parameter_store<P>& store) {
    bind(store);
    if (opts_.momentum != 0.0 && state_.empty()) add_state("momentum_buffer");
  }

  /// One optimizer step on `store`: grads × grad_scale → master (and momentum), params. Zeroes the grads only with zero_grad_in_step().
  template <policy_bundle P>
  void step(nn::parameter_store<P>& store, double grad_scale = 1.0) {
    check_grad_scale(grad_scale);
    init(store);
    run(detail::whole_store(store), grad_scale, grads_to_clear(store.grads().data()));
  }

  /// One optimizer step on the flat range of `shard` only (a ZeRO partition; see optimizer.hpp).
  template <policy_bundle P>
  void step(nn::parameter_store<P>& store, const flat_shard<P>& shard, double grad_scale = 1.0) {
    check_grad_scale(grad_scale);
    bind_shard(store, shard);
    if (opts_.momentum != 0.0 && state_.empty()) add_state("momentum_buffer");
    run(shard, grad_scale, static_cast<typename P::gradient_type*>(nullptr));
  }

  /// The options as they are now (lr and weight decay may have changed since construction).
  options hyperparameters() const { return current(opts_); }
  double momentum() const noexcept { return opts_.momentum; }
  /// Sets μ (sched::one_cycle cycles it through this). Nesterov keeps needing μ > 0.
  void set_momentum(double mu) {
    check_non_negative(name_, "momentum", mu);
    if (opts_.nesterov && mu <= 0) throw error("sgd: set_momentum(" + detail::format_value(mu) + "): Nesterov momentum requires a momentum > 0");
    opts_.momentum = mu;
  }

 private:
  template <class P>
  void run(const flat_shard<P>& shard, double grad_scale, typename P::gradient_type* clear) {
    ++step_;
    const bool momentum = opts_.momentum != 0.0;
    const bool first = momentum && !buffer_started_;
    std::vector<detail::sgd_constants> k(groups_.size());
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      k[g] = {static_cast<float>(lr_ * groups_[g].lr_scale), static_cast<float>(group_weight_decay(g)),
              static_cast<float>(opts_.momentum), static_cast<float>(1.0 - opts_.dampening)};
    }
    float* buf = momentum ? state_data(0) : nullptr;
    float* master = shard.master;
    const float scale = static_cast<float>(grad_scale);
    const bool nesterov = opts_.nesterov;
    detail::fused_pass<true, true>(segs_, shard.begin, shard.end, shard.grads, master, shard.params,
                                   [&](const detail::segment& s, index_t i, index_t n, const float* g, int) {
                                     const auto& c = k[static_cast<std::size_t>(s.group)];
                                     float* b = buf ? buf + i : nullptr;
                                     if (c.wd != 0.0f) {
                                       dispatch<true>(momentum, first, nesterov, g, master + i, b, n, scale, c);
                                     } else {
                                       dispatch<false>(momentum, first, nesterov, g, master + i, b, n, scale, c);
                                     }
                                   },
                                   clear);
    if (momentum) buffer_started_ = true;
  }
  template <bool L2>
  static void dispatch(bool momentum, bool first, bool nesterov, const float* g, float* p, float* b, index_t n, float scale,
                       const detail::sgd_constants& c) {
    if (!momentum) return detail::sgd_kernel<L2, false, false, false>(g, p, b, n, scale, c);
    if (first) {
      return nesterov ? detail::sgd_kernel<L2, true, true, true>(g, p, b, n, scale, c)
                      : detail::sgd_kernel<L2, true, true, false>(g, p, b, n, scale, c);
    }
    return nesterov ? detail::sgd_kernel<L2, true, false, true>(g, p, b, n, scale, c)
                    : detail::sgd_kernel<L2, true, false, false>(g, p, b, n, scale, c);
  }
  void allocate_state() override {
    if (opts_.momentum != 0.0) add_state("momentum_buffer");
  }
  // A restored checkpoint with a momentum buffer continues it (PyTorch's buffer "is not None").
  void on_step_count_restored() override { buffer_started_ = step_ > 0 && !state_.empty(); }

  options opts_;
  bool buffer_started_ = false;
};

}  // namespace trident::optim
