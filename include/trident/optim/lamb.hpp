#pragma once
/// @file optim/lamb.hpp
/// LAMB (You et al., "Large Batch Optimization for Deep Learning", 2019) with DeepSpeed
/// FusedLamb's formula, so that a DeepSpeed "Lamb" run ports with the same numbers.
///
/// Per parameter tensor, with g the gradient times grad_scale, t the step count after this
/// step and lr the group's lr:
///
///     m ← β1·m + (1 − β1)·g
///     v ← β2·v + (1 − β2)·g²
///     u = m / (√v + ε) + λ·θ                    (eps_inside_sqrt: m / √(v + ε) + λ·θ)
///     r = clamp(‖θ‖ / ‖u‖, min_coeff, max_coeff), or 1 when ‖θ‖ or ‖u‖ is 0
///     θ ← θ − s·r·u,   s = lr·√(1 − β2^t) / (1 − β1^t)  (bias_correction), else s = lr
///
/// Choice (documented difference from the paper): the paper bias-corrects m and v before
/// forming u (u = m̂/(√v̂ + ε) + λθ), so its trust ratio sees the corrected Adam step. DeepSpeed's
/// FusedLamb (csrc/lamb) folds the correction into the step size instead, so ε and the weight
/// decay term are not corrected and ‖u‖ is computed from uncorrected moments; we follow
/// DeepSpeed. The clamps are DeepSpeed's defaults, [0.01, 10] (the paper leaves φ open). The norms
/// are per tensor (a tensor is one PyTorch parameter), accumulated in double.
///
/// The trust ratio needs ‖u‖ before any θ changes, so the step is two passes: the first reads
/// gradients and updates m, v while accumulating ‖θ‖² and ‖u‖² per tensor; the second recomputes
/// u from m, v, θ and writes master and params.

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "optimizer.hpp"
#include "vec.hpp"

namespace trident::optim {

/// Hyperparameters of lamb (DeepSpeed FusedLamb's defaults).
struct lamb_options {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool bias_correction = true;
  bool eps_inside_sqrt = false;
  double max_coeff = 10.0;  ///< upper clamp of the trust ratio
  double min_coeff = 0.01;  ///< lower clamp of the trust ratio
};

namespace detail {

struct lamb_constants {
  float b1, omb1, b2, omb2, eps, wd;
};

template <bool EpsInside, class V>
TRIDENT_ALWAYS_INLINE V lamb_update(V m, V v, V p, const lamb_constants& c) {
  V denom;
  if constexpr (EpsInside) {
    denom = sqrt(v + V::set1(c.eps));
  } else {
    denom = sqrt(v) + V::set1(c.eps);
  }
  return m / denom + V::set1(c.wd) * p;
}

/// Pass 1: moments, and ‖θ‖², ‖u‖² added into w2, u2.
template <bool EpsInside>
inline void lamb_moments(const float* TRIDENT_RESTRICT g, const float* TRIDENT_RESTRICT p, float* TRIDENT_RESTRICT m,
                         float* TRIDENT_RESTRICT v, index_t n, float scale, const lamb_constants& c, double& w2, double& u2) {
  vecf::dacc wv, uv;
  vec1::dacc ws, us;
  for_each_vector(n, [&]<class V>(V, index_t i) {
    const V gi = V::load(g + i) * V::set1(scale);
    const V pi = V::load(p + i);
    const V mi = V::set1(c.b1) * V::load(m + i) + V::set1(c.omb1) * gi;
    const V vi = V::set1(c.b2) * V::load(v + i) + V::set1(c.omb2) * gi * gi;
    mi.store(m + i);
    vi.store(v + i);
    const V u = lamb_update<EpsInside>(mi, vi, pi, c);
    if constexpr (V::width == 1) {
      ws.add_sq(pi);
      us.add_sq(u);
    } else {
      wv.add_sq(pi);
      uv.add_sq(u);
    }
  });
  if constexpr (vecf::width > 1) {
    w2 += wv.sum();
    u2 += uv.sum();
  }
  w2 += ws.sum();
  u2 += us.sum();
}

/// Pass 2: θ ← θ − step·u with step = s·r.
template <bool EpsInside>
inline void lamb_apply(float* TRIDENT_RESTRICT p, const float* TRIDENT_RESTRICT m, const float* TRIDENT_RESTRICT v, index_t n,
                       float step, const lamb_constants& c) {
  for_each_vector(n, [&]<class V>(V, index_t i) {
    const V pi = V::load(p + i);
    (pi - V::set1(step) * lamb_update<EpsInside>(V::load(m + i), V::load(v + i), pi, c)).store(p + i);
  });
}

}  // namespace detail

/// LAMB with DeepSpeed FusedLamb's formula. State: "exp_avg", "exp_avg_sq" (fp32).
class lamb : public optimizer_base {
 public:
  using options = lamb_options;

  /// @param o hyperparameters; @param groups custom parameter groups (see optimizer.hpp)
  explicit lamb(options o = {}, std::vector<group_spec> groups = {}) : optimizer_base("lamb", o.lr, std::move(groups)), opts_(o) {
    set_betas(o.beta1, o.beta2);
    check_eps(name_, o.eps);
    set_weight_decay(o.weight_decay);
    check_non_negative(name_, "min_coeff", o.min_coeff);
    check_non_negative(name_, "max_coeff", o.max_coeff);
    if (o.max_coeff < o.min_coeff) {
      throw error("lamb: max_coeff (" + detail::format_value(o.max_coeff) + ") is below min_coeff (" +
                  detail::format_value(o.min_coeff) + ")");
    }
  }

  /// Creates the state for `store` now (it is otherwise created by the first step).
  template <policy_bundle P>
  void init(nn::parameter_store<P>& store) {
    bind(store);
  }

  /// One optimizer step on `store` (two passes, see above). Zeroes the grads only with zero_grad_in_step().
  template <policy_bundle P>
  void step(nn::parameter_store<P>& store, double grad_scale = 1.0) {
    check_grad_scale(grad_scale);
    bind(store);
    run(detail::whole_store(store), grad_scale, grads_to_clear(store.grads().data()));
  }

  /// One optimizer step on the flat range of `shard` only (a ZeRO partition; see optimizer.hpp).
  /// Every rank holding a shard of the store must call it in the same step: the per-tensor
  /// norms of the trust ratios are summed across ranks through shard.sum_across_ranks.
  template <policy_bundle P>
  void step(nn::parameter_store<P>& store, const flat_shard<P>& shard, double grad_scale = 1.0) {
    check_grad_scale(grad_scale);
    bind_shard(store, shard);
    run(shard, grad_scale, static_cast<typename P::gradient_type*>(nullptr));
  }

  /// The trust ratio of each tensor at the last step (DeepSpeed's get_lamb_coeffs()).
  const std::vector<double>& trust_ratios() const noexcept { return ratios_; }

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

 private:
  template <class P>
  void run(const flat_shard<P>& shard, double grad_scale, typename P::gradient_type* clear) {
    ++step_;
    const double t = static_cast<double>(step_);
    // DeepSpeed computes the step size in float from float bias corrections; double here.
    const double correction =
        opts_.bias_correction ? std::sqrt(1.0 - std::pow(opts_.beta2, t)) / (1.0 - std::pow(opts_.beta1, t)) : 1.0;
    std::vector<detail::lamb_constants> k(groups_.size());
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      k[g] = {static_cast<float>(opts_.beta1), static_cast<float>(1.0 - opts_.beta1), static_cast<float>(opts_.beta2),
              static_cast<float>(1.0 - opts_.beta2), static_cast<float>(opts_.eps),
              static_cast<float>(group_weight_decay(g))};
    }
    float* m = state_data(0);
    float* v = state_data(1);
    float* master = shard.master;
    const float scale = static_cast<float>(grad_scale);
    const std::size_t tensors = segs_.size();
    const int chunks = cpu_kernels::chunk_count(shard.size(), detail::min_chunk_elements);
    // per chunk (thread), per tensor: ‖θ‖², ‖u‖²; merged in chunk order, so deterministic
    std::vector<double> partial(static_cast<std::size_t>(chunks) * tensors * 2, 0.0);
    const bool inside = opts_.eps_inside_sqrt;
    detail::fused_pass<true, false>(
        segs_, shard.begin, shard.end, shard.grads, master, shard.params,
        [&](const detail::segment& s, index_t i, index_t n, const float* g, int chunk) {
          const auto& c = k[static_cast<std::size_t>(s.group)];
          double* acc = &partial[(static_cast<std::size_t>(chunk) * tensors + static_cast<std::size_t>(s.tensor)) * 2];
          if (inside) {
            detail::lamb_moments<true>(g, master + i, m + i, v + i, n, scale, c, acc[0], acc[1]);
          } else {
            detail::lamb_moments<false>(g, master + i, m + i, v + i, n, scale, c, acc[0], acc[1]);
          }
        },
        clear);
    // per tensor: ‖θ‖², ‖u‖² over this range (chunks merged in order), then over every rank's range
    std::vector<double> norms(tensors * 2, 0.0);
    for (std::size_t tn = 0; tn < tensors; ++tn) {
      for (int ch = 0; ch < chunks; ++ch) {
        norms[tn * 2] += partial[(static_cast<std::size_t>(ch) * tensors + tn) * 2];
        norms[tn * 2 + 1] += partial[(static_cast<std::size_t>(ch) * tensors + tn) * 2 + 1];
      }
    }
    if (shard.sum_across_ranks) shard.sum_across_ranks(norms.data(), static_cast<index_t>(norms.size()));
    ratios_.assign(tensors, 1.0);
    std::vector<float> steps(tensors);
    for (std::size_t tn = 0; tn < tensors; ++tn) {
      const double w = std::sqrt(norms[tn * 2]), u = std::sqrt(norms[tn * 2 + 1]);
      if (w != 0 && u != 0) ratios_[tn] = std::clamp(w / u, opts_.min_coeff, opts_.max_coeff);
      const double lr = lr_ * groups_[static_cast<std::size_t>(segs_[tn].group)].lr_scale;
      steps[tn] = static_cast<float>(lr * correction) * static_cast<float>(ratios_[tn]);
    }
    detail::fused_pass<false, true>(segs_, shard.begin, shard.end, shard.grads, master, shard.params,
                                    [&](const detail::segment& s, index_t i, index_t n, const float*, int) {
                                      const auto& c = k[static_cast<std::size_t>(s.group)];
                                      const float st = steps[static_cast<std::size_t>(s.tensor)];
                                      if (inside) {
                                        detail::lamb_apply<true>(master + i, m + i, v + i, n, st, c);
                                      } else {
                                        detail::lamb_apply<false>(master + i, m + i, v + i, n, st, c);
                                      }
                                    });
  }
  void allocate_state() override {
    add_state("exp_avg");
    add_state("exp_avg_sq");
  }

  options opts_;
  std::vector<double> ratios_;
};

}  // namespace trident::optim
