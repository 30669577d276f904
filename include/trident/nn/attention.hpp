#pragma once
/// @file nn/attention.hpp
/// Causal multi-head self-attention as GPT-2 has it: one fused projection to q, k and v
/// (c_attn, width -> 3 width), a fused attention kernel per head (flash-attention style:
/// online softmax over key tiles, so the T x T scores never exist beyond a tile per thread,
/// in forward and backward), and an output projection (c_proj). Attention-weight dropout
/// draws its mask from a counter-based stream, so backward regenerates it instead of
/// storing it.

#include <cmath>
#include <cstdint>
#include <string>

#include "kernels.hpp"
#include "linear.hpp"
#include "module.hpp"

namespace trident::nn {

/// y = c_proj(attention(c_attn(x))) over (B, T, width) with `heads` heads of width / heads
/// each, or of `head_width` each when given: then the heads span heads * head_width features
/// (c_attn: width -> 3 heads head_width, c_proj: heads head_width -> width), which is what a
/// block keeps after attention heads were pruned (prune/structured.hpp).
/// @tparam Policy the policy bundle
template <policy_bundle Policy>
class causal_self_attention {
 public:
  using S = typename Policy::storage_type;
  using D = typename Policy::device;
  /// Per-row log-sum-exp kept for backward: float, or double under fp64.
  using stat_type = std::conditional_t<std::is_same_v<S, double>, double, float>;

  /// Declares `name.c_attn.{weight,bias}` and `name.c_proj.{weight,bias}` (biases when `bias`).
  /// `dropout` is the probability of dropping an attention weight while training;
  /// `head_width` 0 means width / heads.
  causal_self_attention(parameter_store<Policy>& store, const std::string& name, index_t width, index_t heads,
                        bool bias = true, double dropout = 0.0, index_t head_width = 0)
      : c_attn_(store, name + ".c_attn", width, 3 * check(name, width, heads, dropout, head_width), bias),
        c_proj_(store, name + ".c_proj", heads * (head_width > 0 ? head_width : width / heads), width, bias),
        width_(width),
        heads_(heads),
        head_width_(head_width > 0 ? head_width : width / heads),
        dropout_(dropout) {}

  /// Both projections ~ U(±1/sqrt(width)) (PyTorch's default).
  void init(generator& gen) {
    c_attn_.init(gen);
    c_proj_.init(gen);
  }

  linear<Policy>& c_attn() noexcept { return c_attn_; }
  linear<Policy>& c_proj() noexcept { return c_proj_; }
  index_t heads() const noexcept { return heads_; }
  index_t width() const noexcept { return width_; }
  /// Features per head, and of all heads together (heads * head_width; width unless pruned).
  index_t head_width() const noexcept { return head_width_; }
  index_t inner_width() const noexcept { return heads_ * head_width_; }

  /// x (B, T, width) -> (B, T, width).
  tensor_view<S, D> forward(context<Policy>& ctx, tensor_view<const S, D> x) {
    if (x.rank() != 3 || x.size(2) != width_) {
      throw shape_error("nn::causal_self_attention::forward: input has shape " + x.shape().str() +
                        " but the layer takes (batch, time, " + std::to_string(width_) + ")");
    }
    b_ = x.size(0);
    t_ = x.size(1);
    qkv_ = c_attn_.forward(ctx, x);
    active_dropout_ = ctx.training && dropout_ > 0.0;
    if (active_dropout_) {
      if (ctx.rng == nullptr) {
        throw error("nn::causal_self_attention: training with dropout > 0 needs a generator in the context (ctx.rng)");
      }
      spec_ = ctx.rng->next(static_cast<std::uint64_t>(b_ * heads_ * t_ * t_), distribution::uniform, 0.0, 1.0);
    }
    y_ = ctx.template allocate<S>({b_, t_, inner_width()});
    lse_ = ctx.template allocate<stat_type>({b_, heads_, t_});
    nn_kernels<D>::attention_forward(y_, lse_, tensor_view<const S, D>(qkv_), heads_, scale(),
                                     active_dropout_ ? dropout_ : 0.0, spec_);
    return c_proj_.forward(ctx, y_);
  }

  /// dy (B, T, width) -> dx; accumulates the projections' gradients.
  tensor_view<S, D> backward(context<Policy>& ctx, tensor_view<const S, D> dy) {
    auto dyatt = c_proj_.backward(ctx, dy);
    auto dqkv = ctx.template allocate<S>({b_, t_, 3 * inner_width()});
    nn_kernels<D>::attention_backward(dqkv, tensor_view<const S, D>(qkv_), tensor_view<const S, D>(y_),
                                      tensor_view<const S, D>(dyatt), tensor_view<const stat_type, D>(lse_), heads_,
                                      scale(), active_dropout_ ? dropout_ : 0.0, spec_);
    return c_attn_.backward(ctx, dqkv);
  }

  /// Forward FLOPs of the last forward: the projections, and q.k and p.v over the causal
  /// half (query i meets i + 1 keys).
  std::int64_t flops() const noexcept { return c_attn_.flops() + c_proj_.flops() + 4 * attention_macs(); }
  /// Backward FLOPs: the projections' (input and weight gradients), and the attention's: the
  /// recomputed scores, dV, dP, dQ and dK (five products of the forward's size).
  std::int64_t backward_flops() const noexcept {
    return c_attn_.backward_flops() + c_proj_.backward_flops() + 10 * attention_macs();
  }

 private:
  /// Checks the sizes; returns the heads' total width.
  static index_t check(const std::string& name, index_t width, index_t heads, double dropout, index_t head_width) {
    if (head_width < 0 || (head_width > 0 && (heads <= 0 || width <= 0))) {
      throw shape_error("nn::causal_self_attention '" + name + "': " + std::to_string(heads) + " heads of width " +
                        std::to_string(head_width) + " on a stream of width " + std::to_string(width) +
                        " (heads, widths must be positive)");
    }
    if (head_width == 0 && (heads <= 0 || width <= 0 || width % heads != 0)) {
      throw shape_error("nn::causal_self_attention '" + name + "': width " + std::to_string(width) +
                        " must be a positive multiple of the number of heads " + std::to_string(heads));
    }
    if (!(dropout >= 0.0 && dropout < 1.0)) {
      throw error("nn::causal_self_attention '" + name + "': dropout must be in [0, 1), got " + std::to_string(dropout));
    }
    return head_width > 0 ? heads * head_width : width;
  }
  double scale() const noexcept { return 1.0 / std::sqrt(static_cast<double>(head_width_)); }
  /// Multiply-adds of one causal product (q.k or p.v): B * H * T(T+1)/2 * head width.
  std::int64_t attention_macs() const noexcept {
    return static_cast<std::int64_t>(b_) * heads_ * (t_ * (t_ + 1) / 2) * head_width_;
  }

  linear<Policy> c_attn_, c_proj_;
  index_t width_, heads_, head_width_;
  double dropout_;
  bool active_dropout_ = false;
  random_spec spec_{};
  index_t b_ = 0, t_ = 0;
  tensor_view<S, D> qkv_{}, y_{};
  tensor_view<stat_type, D> lse_{};
};

}  // namespace trident::nn
