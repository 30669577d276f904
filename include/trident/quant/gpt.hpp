#pragma once
/// @file quant/gpt.hpp
/// A trained GPT (nn::gpt) for inference with its attention and MLP projections quantized:
/// the four linear layers of every block (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
/// become qlinear under a dynamic or weight-only scheme, while the embeddings, the
/// LayerNorms, the fused attention kernel, the tied language-model head and the loss are the
/// model's own, in fp32.
///
///   nn::gpt<P> model(store, cfg);   // ... trained
///   quant::quantized_gpt<quant::dynamic_int8<quant::per_row>> q(model, store);
///   auto logits = q.logits(ctx, tokens, batch);          // (batch * T, vocab), fp32
///   double loss = q.forward(ctx, tokens, batch, targets);
///
/// The model is built from the trained store by name (nanoGPT's names, as nn::gpt declares
/// them): it keeps its own fp32 copy of the embeddings and LayerNorm parameters (from the
/// fp32 master weights, whatever the training policy) and its own quantized projections, so
/// the trained model and its store may go away. Per-row (per-token) dynamic quantization is
/// the natural scheme for a transformer: each token's activations get their own range, so
/// one token's outliers do not coarsen the others'. The head stays in fp32 unless
/// `quantize_head` is set (it is tied to the token embedding, which stays fp32 for the
/// lookup). Inference only (eval mode: no dropout).

#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "../backend/cpu/nn_kernels.hpp"
#include "../core/policy.hpp"
#include "../nn/embedding.hpp"
#include "../nn/gpt.hpp"
#include "../nn/kernels.hpp"
#include "../nn/layer_norm.hpp"
#include "../nn/linear.hpp"
#include "../nn/loss.hpp"
#include "../ops/elementwise.hpp"
#include "convert.hpp"
#include "qlinear.hpp"
#include "scheme.hpp"

namespace trident::quant {

/// Options of quantized_gpt.
struct quantized_gpt_options {
  bool quantize_head = false;  ///< quantize the language-model head too (fp32 by default)
};

/// An inference GPT whose block projections are qlinear<policy<fp32, cpu>, Scheme>.
/// @tparam Scheme a scheme that needs no calibration: dynamic_int8<per_tensor | per_row> or
///         weight_only<Q, Group> (Group must divide the width)
template <scheme Scheme = dynamic_int8<per_row>>
class quantized_gpt {
  static_assert(!Scheme::calibrated,
                "quant::quantized_gpt<Scheme>: static_int8 needs calibrated input ranges per layer; use "
                "dynamic_int8<per_row> (recommended for transformers), dynamic_int8<per_tensor> or weight_only");

 public:
  /// What it computes in: fp32 on the CPU.
  using policy_type = policy<fp32, cpu>;
  using P = policy_type;
  using layer = qlinear<P, Scheme>;

  /// From a trained model and its store (any policy: the fp32 master weights are read).
  template <policy_bundle TP>
  quantized_gpt(const nn::gpt<TP>& model, nn::parameter_store<TP>& store, quantized_gpt_options options = {})
      : cfg_(model.config()), options_(options) {
    const auto& c = cfg_;
    store_ = std::make_unique<nn::parameter_store<P>>();
    auto& s = *store_;
    wte_ = std::make_unique<nn::embedding<P>>(s, "wte", c.vocab_size, c.n_embd);
    wpe_ = std::make_unique<nn::embedding<P>>(s, "wpe", c.block_size, c.n_embd);
    for (index_t i = 0; i < c.n_layer; ++i) {
      const std::string b = "h." + std::to_string(i);
      ln_.push_back(std::make_unique<nn::layer_norm<P>>(s, b + ".ln_1", c.n_embd, 1e-5, true, c.bias));
      ln_.push_back(std::make_unique<nn::layer_norm<P>>(s, b + ".ln_2", c.n_embd, 1e-5, true, c.bias));
    }
    ln_f_ = std::make_unique<nn::layer_norm<P>>(s, "ln_f", c.n_embd, 1e-5, true, c.bias);
    head_ = std::make_unique<nn::linear<P>>(s, "lm_head", wte_->weight(), false);
    s.allocate();
    copy_parameters(store, s);

    for (index_t i = 0; i < c.n_layer; ++i) {
      const std::string b = "h." + std::to_string(i);
      blocks_.push_back(block{make_layer(store, b + ".attn.c_attn", activation::none),
                              make_layer(store, b + ".attn.c_proj", activation::none),
                              make_layer(store, b + ".mlp.c_fc", activation::gelu),
                              make_layer(store, b + ".mlp.c_proj", activation::none)});
    }
    if (options.quantize_head) {
      auto w = detail::float_values(s, wte_->weight());
      qhead_ = std::make_unique<layer>("lm_head", w, c.vocab_size, c.n_embd, std::span<const float>{});
    }
  }

  quantized_gpt(quantized_gpt&&) noexcept = default;
  quantized_gpt& operator=(quantized_gpt&&) noexcept = default;

  const nn::gpt_config& config() const noexcept { return cfg_; }
  /// The quantized projections of block i: c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj.
  const layer& c_attn(index_t i) const { return blocks_.at(static_cast<std::size_t>(i)).c_attn; }
  const layer& attn_proj(index_t i) const { return blocks_.at(static_cast<std::size_t>(i)).attn_proj; }
  const layer& c_fc(index_t i) const { return blocks_.at(static_cast<std::size_t>(i)).c_fc; }
  const layer& mlp_proj(index_t i) const { return blocks_.at(static_cast<std::size_t>(i)).mlp_proj; }

  /// Model bytes: the quantized projections (and head) at their format's size, the fp32
  /// embeddings and LayerNorms.
  std::size_t bytes() const noexcept {
    std::size_t n = static_cast<std::size_t>(store_->count()) * sizeof(float);
    for (const auto& b : blocks_) n += b.c_attn.bytes() + b.attn_proj.bytes() + b.c_fc.bytes() + b.mlp_proj.bytes();
    if (qhead_) n += qhead_->bytes();  // its own quantized copy of the tied table
    return n;
  }

  /// Forward FLOPs of the last forward (the projections, the head and the causal attention).
  std::int64_t flops() const noexcept { return flops_; }

  /// Logits (batch * T, vocab) of token ids (batch x T, T <= block_size), in `ctx`'s memory.
  tensor_view<float, cpu> logits(nn::context<P>& ctx, std::span<const std::int32_t> tokens, index_t batch) {
    if (batch <= 0 || tokens.empty() || static_cast<index_t>(tokens.size()) % batch != 0) {
      throw shape_error("quant::quantized_gpt: " + std::to_string(tokens.size()) + " tokens do not form " +
                        std::to_string(batch) + " sequences of equal length");
    }
    const index_t t = static_cast<index_t>(tokens.size()) / batch;
    if (t > cfg_.block_size) {
      throw shape_error("quant::quantized_gpt: sequences of " + std::to_string(t) + " tokens exceed the block size " +
                        std::to_string(cfg_.block_size));
    }
    const index_t c = cfg_.n_embd, h = cfg_.n_head;
    const double scale = 1.0 / std::sqrt(static_cast<double>(c / h));
    nn::context<P> eval{ctx.memory, false, nullptr};
    flops_ = 0;
    tensor_view<float, cpu> x = wte_->forward(eval, tokens, {batch, t, c}, wpe_.get());
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      auto& q = blocks_[i];
      auto qkv = q.c_attn.forward(eval, ln_[2 * i]->forward(eval, x));  // (B, T, 3C)
      auto y = eval.template allocate<float>({batch, t, c});
      auto lse = eval.template allocate<float>({batch, h, t});
      nn::nn_kernels<cpu>::attention_forward(y, lse, tensor_view<const float, cpu>(qkv), h, scale, 0.0, random_spec{});
      auto a = q.attn_proj.forward(eval, y);
      auto hres = eval.template allocate<float>(x.shape());
      add(x, a, hres);
      auto m = q.mlp_proj.forward(eval, q.c_fc.forward(eval, ln_[2 * i + 1]->forward(eval, hres)));
      auto out = eval.template allocate<float>(x.shape());
      add(hres, m, out);
      x = out;
      flops_ += q.c_attn.flops() + q.attn_proj.flops() + q.c_fc.flops() + q.mlp_proj.flops() +
                4 * static_cast<std::int64_t>(batch) * h * (t * (t + 1) / 2) * (c / h);
    }
    auto hf = ln_f_->forward(eval, x).reshape({batch * t, c});
    tensor_view<float, cpu> z;
    if (qhead_) {
      z = qhead_->forward(eval, hf);
      flops_ += qhead_->flops();
    } else {
      z = head_->forward(eval, hf);
      flops_ += head_->flops();
    }
    return z;
  }

  /// Mean cross-entropy of predicting `targets` (batch x T ids, or the ignore index -1).
  double forward(nn::context<P>& ctx, std::span<const std::int32_t> tokens, index_t batch,
                 std::span<const std::int32_t> targets) {
    if (targets.size() != tokens.size()) {
      throw shape_error("quant::quantized_gpt::forward: " + std::to_string(targets.size()) + " targets for " +
                        std::to_string(tokens.size()) + " tokens");
    }
    auto z = logits(ctx, tokens, batch);
    return loss_.forward(ctx, z, targets);
  }

 private:
  struct block {
    layer c_attn, attn_proj, c_fc, mlp_proj;
  };

  /// The qlinear of the trained layer `name` (its `name.weight` and, if any, `name.bias`).
  template <policy_bundle TP>
  static layer make_layer(nn::parameter_store<TP>& store, const std::string& name, activation act) {
    const auto w = find(store, name + ".weight", true);
    const auto b = find(store, name + ".bias", false);
    const auto& e = store.info(w).extents;
    return layer(name, detail::float_values(store, w), e[0], e[1],
                 b.valid() ? detail::float_values(store, b) : std::vector<float>{}, act);
  }

  template <policy_bundle TP>
  static nn::parameter_handle find(nn::parameter_store<TP>& store, const std::string& name, bool required) {
    for (std::size_t i = 0; i < store.infos().size(); ++i) {
      if (store.infos()[i].name == name) return nn::parameter_handle{static_cast<int>(i)};
    }
    if (required) throw error("quant::quantized_gpt: the store has no '" + name + "'; is it an nn::gpt's store?");
    return {};
  }

  nn::gpt_config cfg_;
  quantized_gpt_options options_;
  std::unique_ptr<nn::parameter_store<P>> store_;
  std::unique_ptr<nn::embedding<P>> wte_, wpe_;
  std::vector<std::unique_ptr<nn::layer_norm<P>>> ln_;  // ln_1, ln_2 of each block
  std::unique_ptr<nn::layer_norm<P>> ln_f_;
  std::unique_ptr<nn::linear<P>> head_;
  std::unique_ptr<layer> qhead_;
  std::vector<block> blocks_;
  nn::softmax_cross_entropy<P> loss_{};
  std::int64_t flops_ = 0;
};

}  // namespace trident::quant
