#pragma once
/// @file nn/gpt.hpp
/// A GPT (GPT-2's architecture, as nanoGPT writes it): token and position embeddings,
/// pre-LayerNorm transformer blocks (causal self-attention and a 4x GELU MLP, each on a
/// residual), a final LayerNorm and a language-model head tied to the token embedding, with
/// the fused softmax cross-entropy on top. Sizes are chosen at run time (gpt_config); the
/// precision, device and strategy come from the policy.
///
///   nn::parameter_store<P> store;
///   nn::gpt<P> model(store, {.vocab_size = 65, .block_size = 64, .n_layer = 4, .n_head = 4, .n_embd = 128});
///   store.allocate();
///   model.init(gen);                                   // nanoGPT's initialisation
///   double loss = model.forward(ctx, x, batch, y);     // x, y: batch * T token ids
///   model.backward(ctx);                               // gradients into the store
///
/// Activation checkpointing (set_checkpointing(true)) keeps only each block's input from
/// forward and recomputes the block in backward: the step's activation memory falls from
/// n_layer blocks' worth to one, for about one more forward pass of compute.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "../ops/elementwise.hpp"
#include "activations.hpp"
#include "attention.hpp"
#include "embedding.hpp"
#include "layer_norm.hpp"
#include "linear.hpp"
#include "loss.hpp"
#include "module.hpp"

namespace trident::nn {

/// The sizes of a GPT (nanoGPT's GPTConfig).
struct gpt_config {
  index_t vocab_size = 65;   ///< tokens
  index_t block_size = 64;   ///< longest sequence (positions)
  index_t n_layer = 4;       ///< transformer blocks
  index_t n_head = 4;        ///< attention heads per block
  index_t n_embd = 128;      ///< width of the residual stream
  double dropout = 0.0;      ///< on embeddings, attention weights and residual branches (training)
  bool bias = true;          ///< biases in the linear layers and LayerNorms (nanoGPT's train.py: false)

  /// Throws naming the first invalid field.
  void validate() const {
    auto fail = [](const std::string& what) { throw error("nn::gpt_config: " + what); };
    if (vocab_size <= 0) fail("vocab_size must be positive, got " + std::to_string(vocab_size));
    if (block_size <= 0) fail("block_size must be positive, got " + std::to_string(block_size));
    if (n_layer <= 0) fail("n_layer must be positive, got " + std::to_string(n_layer));
    if (n_head <= 0 || n_embd <= 0 || n_embd % n_head != 0) {
      fail("n_embd (" + std::to_string(n_embd) + ") must be a positive multiple of n_head (" + std::to_string(n_head) + ")");
    }
    if (!(dropout >= 0.0 && dropout < 1.0)) fail("dropout must be in [0, 1), got " + std::to_string(dropout));
  }

  /// "vocab 65, block 64, 4 layers, 4 heads, width 128, dropout 0, bias".
  std::string str() const {
    return "vocab " + std::to_string(vocab_size) + ", block " + std::to_string(block_size) + ", " +
           std::to_string(n_layer) + " layers, " + std::to_string(n_head) + " heads, width " + std::to_string(n_embd) +
           ", dropout " + std::to_string(dropout).substr(0, 4) + (bias ? ", bias" : ", no bias");
  }
};

/// One pre-LayerNorm transformer block: x + attn(ln_1(x)), then h + mlp(ln_2(h)) with
/// mlp = c_proj(gelu(c_fc(.))), dropout on both branches.
/// @tparam Policy the policy bundle
template <policy_bundle Policy>
class transformer_block {
 public:
  using S = typename Policy::storage_type;
  using D = typename Policy::device;

  /// Declares `name.ln_1`, `name.attn`, `name.ln_2`, `name.mlp.c_fc`, `name.mlp.c_proj`.
  /// `head_width` 0: width / heads (a block whose heads were pruned keeps the original head
  /// width with fewer heads).
  transformer_block(parameter_store<Policy>& store, const std::string& name, index_t width, index_t heads, bool bias,
                    double dropout, index_t head_width = 0)
      : ln_1_(store, name + ".ln_1", width, 1e-5, true, bias),
        attn_(store, name + ".attn", width, heads, bias, dropout, head_width),
        ln_2_(store, name + ".ln_2", width, 1e-5, true, bias),
        c_fc_(store, name + ".mlp.c_fc", width, 4 * width, bias, activation::gelu),
        c_proj_(store, name + ".mlp.c_proj", 4 * width, width, bias),
        drop_attn_(dropout),
        drop_mlp_(dropout) {}

  /// nanoGPT's initialisation: linear weights ~ N(0, 0.02^2), the two residual projections
  /// ~ N(0, (0.02 / sqrt(2 n_layer))^2), biases 0, LayerNorms 1 and 0.
  void init_gpt(generator& gen, index_t n_layer) {
    const double proj_std = 0.02 / std::sqrt(2.0 * static_cast<double>(n_layer));
    ln_1_.init(gen);
    attn_.c_attn().init_normal(gen, 0.02);
    attn_.c_proj().init_normal(gen, proj_std);
    ln_2_.init(gen);
    c_fc_.init_normal(gen, 0.02);
    c_proj_.init_normal(gen, proj_std);
  }
  /// The same initialisation for a stand-alone block (one layer).
  void init(generator& gen) { init_gpt(gen, 1); }

  causal_self_attention<Policy>& attn() noexcept { return attn_; }

  /// x (B, T, width) -> (B, T, width).
  tensor_view<S, D> forward(context<Policy>& ctx, tensor_view<const S, D> x) {
    dropping_ = ctx.training && drop_attn_.p() > 0.0;
    auto a = attn_.forward(ctx, ln_1_.forward(ctx, x));
    if (dropping_) a = drop_attn_.forward(ctx, a);
    auto h = ctx.template allocate<S>(x.shape());
    add(x, a, h);
    auto m = c_proj_.forward(ctx, c_fc_.forward(ctx, ln_2_.forward(ctx, h)));
    if (dropping_) m = drop_mlp_.forward(ctx, m);
    auto y = ctx.template allocate<S>(x.shape());
    add(h, m, y);
    return y;
  }

  /// dy -> dx; accumulates every parameter gradient of the block.
  tensor_view<S, D> backward(context<Policy>& ctx, tensor_view<const S, D> dy) {
    tensor_view<const S, D> dm = dy;
    if (dropping_) dm = drop_mlp_.backward(ctx, dy);
    auto dh = ctx.template allocate<S>(dy.shape());
    add(ln_2_.backward(ctx, c_fc_.backward(ctx, c_proj_.backward(ctx, dm))), dy, dh);
    tensor_view<const S, D> da = dh;
    if (dropping_) da = drop_attn_.backward(ctx, dh);
    auto dx = ctx.template allocate<S>(dy.shape());
    add(ln_1_.backward(ctx, attn_.backward(ctx, da)), dh, dx);
    return dx;
  }

  std::int64_t flops() const noexcept { return attn_.flops() + c_fc_.flops() + c_proj_.flops(); }
  std::int64_t backward_flops() const noexcept {
    return attn_.backward_flops() + c_fc_.backward_flops() + c_proj_.backward_flops();
  }

 private:
  layer_norm<Policy> ln_1_;
  causal_self_attention<Policy> attn_;
  layer_norm<Policy> ln_2_;
  linear<Policy> c_fc_, c_proj_;
  dropout<Policy> drop_attn_, drop_mlp_;
  bool dropping_ = false;
};

/// A GPT language model with its loss.
/// @tparam Policy the policy bundle
template <policy_bundle Policy>
class gpt {
 public:
  using S = typename Policy::storage_type;
  using D = typename Policy::device;

  /// Declares every parameter in the store (nanoGPT's names: wte, wpe, h.<i>..., ln_f; the
  /// head shares wte.weight). `layer_heads` (empty: n_head in every block) gives each block its
  /// own number of heads, each n_embd / n_head wide: a model whose heads were pruned
  /// (prune/structured.hpp).
  gpt(parameter_store<Policy>& store, const gpt_config& cfg, std::vector<index_t> layer_heads = {})
      : cfg_(validated(cfg)),
        layer_heads_(checked_heads(cfg, std::move(layer_heads))),
        store_(&store),
        wte_(store, "wte", cfg.vocab_size, cfg.n_embd),
        wpe_(store, "wpe", cfg.block_size, cfg.n_embd),
        drop_(cfg.dropout),
        ln_f_(nullptr),
        head_(nullptr) {
    blocks_.reserve(static_cast<std::size_t>(cfg.n_layer));
    for (index_t i = 0; i < cfg.n_layer; ++i) {
      blocks_.emplace_back(store, "h." + std::to_string(i), cfg.n_embd, layer_heads_[static_cast<std::size_t>(i)], cfg.bias,
                           cfg.dropout, cfg.n_embd / cfg.n_head);
    }
    ln_f_ = std::make_unique<layer_norm<Policy>>(store, "ln_f", cfg.n_embd, 1e-5, true, cfg.bias);
    head_ = std::make_unique<linear<Policy>>(store, "lm_head", wte_.weight(), false);
  }

  const gpt_config& config() const noexcept { return cfg_; }
  /// Heads of each block (n_head each unless the model was built with fewer).
  const std::vector<index_t>& layer_heads() const noexcept { return layer_heads_; }
  /// Block i (0 <= i < n_layer).
  transformer_block<Policy>& block(index_t i) { return blocks_.at(static_cast<std::size_t>(i)); }

  /// nanoGPT's initialisation (after store.allocate()): embeddings and linear weights
  /// ~ N(0, 0.02^2), residual projections ~ N(0, (0.02 / sqrt(2 n_layer))^2), biases 0.
  void init(generator& gen) {
    wte_.init_normal(gen, 0.02);
    wpe_.init_normal(gen, 0.02);
    for (auto& b : blocks_) b.init_gpt(gen, cfg_.n_layer);
    ln_f_->init(gen);
  }

  /// Parameters (shared ones once), without the position table when `non_embedding`
  /// (nanoGPT's get_num_params(): the figure its FLOPs estimate uses).
  index_t parameter_count(bool non_embedding = true) const {
    index_t n = store_->count();
    if (non_embedding) n -= cfg_.block_size * cfg_.n_embd;
    return n;
  }

  /// Recompute each block's activations in backward instead of keeping them.
  void set_checkpointing(bool on) noexcept { checkpoint_ = on; }
  bool checkpointing() const noexcept { return checkpoint_; }
  /// Most bytes the recomputation scratch held (0 without checkpointing).
  std::size_t checkpoint_scratch_bytes() const noexcept { return scratch_.peak_bytes(); }

  /// Logits (batch * T, vocab) of token ids (batch x T, T = tokens / batch <= block_size).
  tensor_view<S, D> logits(context<Policy>& ctx, std::span<const std::int32_t> tokens, index_t batch) {
    if (batch <= 0 || tokens.empty() || static_cast<index_t>(tokens.size()) % batch != 0) {
      throw shape_error("nn::gpt: " + std::to_string(tokens.size()) + " tokens do not form " + std::to_string(batch) +
                        " sequences of equal length");
    }
    const index_t t = static_cast<index_t>(tokens.size()) / batch;
    if (t > cfg_.block_size) {
      throw shape_error("nn::gpt: sequences of " + std::to_string(t) + " tokens exceed the block size " +
                        std::to_string(cfg_.block_size));
    }
    batch_ = batch;
    t_ = t;
    tensor_view<S, D> x = wte_.forward(ctx, tokens, {batch, t, cfg_.n_embd}, &wpe_);
    embed_dropping_ = ctx.training && cfg_.dropout > 0.0;
    if (embed_dropping_) x = drop_.forward(ctx, x);
    if (checkpoint_) {
      inputs_.assign(blocks_.size(), {});
      rng_at_.assign(blocks_.size(), generator{});
    }
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      if (!checkpoint_) {
        x = blocks_[i].forward(ctx, x);
        continue;
      }
      // Keep the input and the dropout stream's position; run the block in the scratch and
      // keep only its output.
      inputs_[i] = x;
      if (ctx.rng != nullptr) rng_at_[i] = *ctx.rng;
      scratch_.reset();
      context<Policy> sub{scratch_, ctx.training, ctx.rng};
      auto y = blocks_[i].forward(sub, x);
      x = ctx.template allocate<S>(y.shape());
      copy(y, x);
    }
    scratch_.reset();
    auto h = ln_f_->forward(ctx, x);
    return head_->forward(ctx, h.reshape({batch * t, cfg_.n_embd}));
  }

  /// Mean cross-entropy of predicting `targets` (batch x T ids, or the ignore index -1)
  /// from `tokens`; keeps what backward needs.
  double forward(context<Policy>& ctx, std::span<const std::int32_t> tokens, index_t batch,
                 std::span<const std::int32_t> targets) {
    if (targets.size() != tokens.size()) {
      throw shape_error("nn::gpt::forward: " + std::to_string(targets.size()) + " targets for " +
                        std::to_string(tokens.size()) + " tokens");
    }
    auto z = logits(ctx, tokens, batch);
    return loss_.forward(ctx, z, targets);
  }

  /// Gradients of loss_scale * the last forward's loss, accumulated into the store.
  void backward(context<Policy>& ctx, double loss_scale = 1.0) {
    auto dz = loss_.backward(ctx, loss_scale);
    auto dh = head_->backward(ctx, dz);
    tensor_view<S, D> dx = ln_f_->backward(ctx, dh.reshape({batch_, t_, cfg_.n_embd}));
    for (std::size_t i = blocks_.size(); i-- > 0;) {
      if (!checkpoint_) {
        dx = blocks_[i].backward(ctx, dx);
        continue;
      }
      // Recompute the block from its input with the same dropout draws, then backward.
      scratch_.reset();
      generator replay = rng_at_[i];
      context<Policy> sub{scratch_, ctx.training, ctx.rng != nullptr ? &replay : nullptr};
      blocks_[i].forward(sub, inputs_[i]);
      auto g = blocks_[i].backward(sub, dx);
      dx = ctx.template allocate<S>(g.shape());
      copy(g, dx);
    }
    scratch_.reset();
    if (embed_dropping_) dx = drop_.backward(ctx, dx);
    wte_.backward(ctx, dx, &wpe_);
  }

  /// Forward FLOPs of the last forward (multiply-adds count 2; the causal half of attention).
  std::int64_t flops() const noexcept {
    std::int64_t f = head_->flops();
    for (const auto& b : blocks_) f += b.flops();
    return f;
  }
  /// Backward FLOPs of the last forward's backward (without checkpointing's recomputation).
  std::int64_t backward_flops() const noexcept {
    std::int64_t f = head_->backward_flops();
    for (const auto& b : blocks_) f += b.backward_flops();
    return f;
  }

  /// Samples `count` tokens after `prompt` (nanoGPT's generate): each step runs the model on
  /// the last block_size tokens, divides the last position's logits by `temperature`, keeps
  /// the `top_k` largest (0: all) and draws from their softmax. Runs in eval mode in `memory`.
  std::vector<std::int32_t> generate(arena<D>& memory, std::vector<std::int32_t> prompt, index_t count, double temperature,
                                     index_t top_k, generator& gen) {
    if (prompt.empty()) throw error("nn::gpt::generate: the prompt must hold at least one token");
    if (!(temperature > 0.0) || !std::isfinite(temperature)) {
      throw error("nn::gpt::generate: temperature must be positive, got " + std::to_string(temperature));
    }
    const index_t v = cfg_.vocab_size;
    const index_t k = top_k <= 0 ? v : std::min(top_k, v);
    std::vector<double> p(static_cast<std::size_t>(v));
    for (index_t step = 0; step < count; ++step) {
      memory.reset();
      context<Policy> ctx{memory, false, nullptr};
      const std::size_t n = std::min<std::size_t>(prompt.size(), static_cast<std::size_t>(cfg_.block_size));
      std::span<const std::int32_t> window(prompt.data() + prompt.size() - n, n);
      auto z = logits(ctx, window, 1);
      const auto last = to_vector(z.slice(0, static_cast<index_t>(n) - 1, static_cast<index_t>(n)));
      for (index_t j = 0; j < v; ++j) p[static_cast<std::size_t>(j)] = static_cast<double>(last[static_cast<std::size_t>(j)]) / temperature;
      // Keep the k largest: everything below the k-th largest gets probability 0.
      std::vector<double> sorted(p);
      std::nth_element(sorted.begin(), sorted.begin() + (k - 1), sorted.end(), std::greater<>());
      const double kth = sorted[static_cast<std::size_t>(k - 1)];
      const double mx = *std::max_element(p.begin(), p.end());
      double sum = 0;
      for (auto& q : p) {
        q = q < kth ? 0.0 : std::exp(q - mx);
        sum += q;
      }
      const random_spec r = gen.next(1, distribution::uniform, 0.0, 1.0);
      double u = r.value(r.block(0), 0) * sum;
      std::int32_t pick = 0;
      for (index_t j = 0; j < v; ++j) {
        if (p[static_cast<std::size_t>(j)] <= 0.0) continue;
        pick = static_cast<std::int32_t>(j);
        u -= p[static_cast<std::size_t>(j)];
        if (u < 0) break;
      }
      prompt.push_back(pick);
    }
    memory.reset();
    return prompt;
  }

 private:
  static const gpt_config& validated(const gpt_config& c) {
    c.validate();
    return c;
  }
  static std::vector<index_t> checked_heads(const gpt_config& c, std::vector<index_t> heads) {
    if (heads.empty()) return std::vector<index_t>(static_cast<std::size_t>(c.n_layer), c.n_head);
    if (static_cast<index_t>(heads.size()) != c.n_layer) {
      throw error("nn::gpt: " + std::to_string(heads.size()) + " head counts for " + std::to_string(c.n_layer) + " layers");
    }
    for (std::size_t i = 0; i < heads.size(); ++i) {
      if (heads[i] <= 0) throw error("nn::gpt: block " + std::to_string(i) + " needs at least one head, got " + std::to_string(heads[i]));
    }
    return heads;
  }

  gpt_config cfg_;
  std::vector<index_t> layer_heads_;
  parameter_store<Policy>* store_;
  embedding<Policy> wte_, wpe_;
  dropout<Policy> drop_;
  std::vector<transformer_block<Policy>> blocks_;
  std::unique_ptr<layer_norm<Policy>> ln_f_;
  std::unique_ptr<linear<Policy>> head_;
  softmax_cross_entropy<Policy> loss_{};
  bool checkpoint_ = false, embed_dropping_ = false;
  arena<D> scratch_;
  std::vector<tensor_view<S, D>> inputs_;
  std::vector<generator> rng_at_;
  index_t batch_ = 0, t_ = 0;
};

}  // namespace trident::nn
