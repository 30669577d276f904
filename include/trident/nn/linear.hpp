#pragma once
/// @file nn/linear.hpp
/// Fully connected layer y = act(x W^T + b), W (out, in), with the bias and a ReLU fused into
/// the GEMM's epilogue (GELU is applied after it, so that backward has the pre-activation).
/// Mixed precision: x and W in the storage type, products accumulated in fp32 (AMX for
/// bf16), weight gradients accumulated in the gradient type.

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../core/activation.hpp"
#include "../ops/elementwise.hpp"
#include "../ops/fill.hpp"
#include "../ops/gemm.hpp"
#include "../ops/reduce.hpp"
#include "../ops/transfer.hpp"
#include "module.hpp"

namespace trident::nn {

/// The activation of a layer whose GEMM epilogue already applied ReLU (or nothing): GELU and
/// tanh-GELU are applied here to z (rows, out), into a new tensor of ctx, and z is kept in
/// `pre` for backward; otherwise z is the output. Returns the output.
template <policy_bundle Policy, class S, class D>
tensor_view<S, D> activate_after_gemm(context<Policy>& ctx, activation act, tensor_view<S, D> z, tensor_view<S, D>& pre) {
  if (act != activation::gelu && act != activation::gelu_tanh) return z;
  pre = z;
  auto y = ctx.template allocate<S>(z.shape());
  if (act == activation::gelu) {
    trident::gelu(z, y);
  } else {
    trident::gelu_tanh(z, y);
  }
  return y;
}

/// The gradient before a layer's activation from the gradient dy after it: through the output
/// y for ReLU, through the kept input `pre` for the GELUs (activate_after_gemm); dy itself
/// without an activation.
template <policy_bundle Policy, class S, class D>
tensor_view<const S, D> activation_backward(context<Policy>& ctx, activation act, tensor_view<const S, D> dy,
                                            tensor_view<const S, D> y, tensor_view<const S, D> pre) {
  if (act == activation::none) return dy;
  auto t = ctx.template allocate<S>(dy.shape());
  switch (act) {
    case activation::relu: zip(ops::relu_backward{}, dy, y, t); break;
    case activation::gelu: zip(ops::gelu_backward{}, dy, pre, t); break;
    case activation::gelu_tanh: zip(ops::gelu_tanh_backward{}, dy, pre, t); break;
    case activation::none: break;
  }
  return t;
}

/// Adds the column sums of dz (rows, out), summed in A, to the gradient of `bias` and reports
/// it ready.
template <class A, policy_bundle Policy, class S, class D>
void accumulate_bias_gradient(context<Policy>& ctx, parameter_store<Policy>& store, parameter_handle bias,
                              tensor_view<const S, D> dz) {
  auto db = ctx.template allocate<A>({dz.size(1)});
  sum(dz, 0, db);
  auto g = store.grad(bias);
  add(g, db, g);
  store.grad_ready(bias);
}

/// A linear (fully connected) layer with an optional bias and fused activation.
/// @tparam Policy the policy bundle
template <policy_bundle Policy>
class linear {
 public:
  using S = typename Policy::storage_type;
  using G = typename Policy::gradient_type;
  using D = typename Policy::device;
  /// The type GEMMs accumulate and return: float, or double under fp64.
  using A = gemm_accumulate_t<S>;

  /// Declares `name.weight` (out, in) and, with bias, `name.bias` (out; not weight-decayed).
  linear(parameter_store<Policy>& store, const std::string& name, index_t in, index_t out, bool bias = true,
         activation act = activation::none)
      : store_(&store), in_(in), out_(out), act_(act) {
    if (in <= 0 || out <= 0) {
      throw shape_error("nn::linear '" + name + "': features must be positive, got in " + std::to_string(in) + ", out " +
                        std::to_string(out));
    }
    weight_ = store.declare(name + ".weight", {out, in}, true);
    if (bias) bias_ = store.declare(name + ".bias", {out}, false);
  }

  /// A layer that shares `tied_weight` (out, in), declared by another module: weight tying, as
  /// a language model's output head shares the token embedding (vocab, width). The owner
  /// initialises the weight; this layer's weight gradient accumulates into the shared one.
  linear(parameter_store<Policy>& store, const std::string& name, parameter_handle tied_weight, bool bias = false,
         activation act = activation::none)
      : store_(&store), act_(act), tied_(true) {
    const auto& w = store.info(tied_weight);
    if (w.extents.rank() != 2) {
      throw shape_error("nn::linear '" + name + "': the tied weight '" + w.name + "' must be 2-D (out, in), got " +
                        w.extents.str());
    }
    out_ = w.extents[0];
    in_ = w.extents[1];
    weight_ = tied_weight;
    if (bias) bias_ = store.declare(name + ".bias", {out_}, false);
  }

  /// PyTorch's default initialisation: weight and bias ~ U(-1/sqrt(in), 1/sqrt(in)) (a tied
  /// weight is left to its owner).
  void init(generator& gen) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(in_));
    if (!tied_) init_tensor(weight_, gen, bound);
    if (bias_.valid()) init_tensor(bias_, gen, bound);
  }

  /// GPT-style initialisation: weight ~ N(0, stddev^2) (a tied weight is left to its owner),
  /// bias = 0.
  void init_normal(generator& gen, double stddev) {
    if (!tied_) {
      normal(store_->master(weight_), gen, 0.0, stddev);
      copy(store_->master(weight_), store_->param(weight_));
    }
    if (bias_.valid()) {
      fill(store_->master(bias_), 0.0);
      copy(store_->master(bias_), store_->param(bias_));
    }
  }

  index_t in_features() const noexcept { return in_; }
  index_t out_features() const noexcept { return out_; }
  parameter_handle weight() const noexcept { return weight_; }
  parameter_handle bias() const noexcept { return bias_; }
  /// The activation fused after the affine map.
  activation act() const noexcept { return act_; }
  /// Whether backward computes the input gradient dx (default true). A model's first layer,
  /// whose input is data, turns it off: backward then only accumulates dW and db and returns
  /// an empty view, saving the dx GEMM (a third of the layer's backward), as PyTorch does for
  /// an input that does not require grad.
  bool input_grad() const noexcept { return input_grad_; }
  void set_input_grad(bool on) noexcept { input_grad_ = on; }

  /// Forward FLOPs of the last forward: 2 · rows · in · out.
  std::int64_t flops() const noexcept { return 2 * static_cast<std::int64_t>(x_.rank() ? x_.size(0) : 0) * in_ * out_; }
  /// Backward FLOPs: the weight gradient, and the input gradient when input_grad().
  std::int64_t backward_flops() const noexcept { return (input_grad_ ? 2 : 1) * flops(); }

  /// x (..., in) -> y (..., out).
  tensor_view<S, D> forward(context<Policy>& ctx, tensor_view<const S, D> x) {
    if (x.rank() < 1 || x.size(x.rank() - 1) != in_) {
      throw shape_error("nn::linear::forward: input has shape " + x.shape().str() + " but the layer takes (..., " +
                        std::to_string(in_) + ")");
    }
    const index_t rows = x.numel() / in_;
    x_ = ctx.contiguous(x).reshape({rows, in_});
    out_shape_ = x.shape();
    out_shape_[out_shape_.rank() - 1] = out_;

    auto z = ctx.template allocate<S>({rows, out_});
    affine(ctx, x_, z, act_ == activation::relu);
    y_ = activate_after_gemm(ctx, act_, z, pre_);
    return y_.reshape(out_shape_);
  }

  /// dy (..., out) -> dx (..., in); accumulates dW and db. Without input_grad(), returns an
  /// empty view.
  tensor_view<S, D> backward(context<Policy>& ctx, tensor_view<const S, D> dy_in) {
    if (!(dy_in.shape() == out_shape_)) {
      throw shape_error("nn::linear::backward: gradient has shape " + dy_in.shape().str() + " but the output had shape " +
                        out_shape_.str());
    }
    const index_t rows = x_.size(0);
    tensor_view<const S, D> dy = ctx.contiguous(dy_in).reshape({rows, out_});
    // dz: the gradient before the activation.
    const tensor_view<const S, D> dz =
        activation_backward(ctx, act_, dy, tensor_view<const S, D>(y_), tensor_view<const S, D>(pre_));
    // dW += dz^T x
    accumulate_product(ctx, dz.t(), x_, store_->grad(weight_));
    // db += sum over rows of dz
    if (bias_.valid()) accumulate_bias_gradient<A>(ctx, *store_, bias_, dz);
    if (!tied_) store_->grad_ready(weight_);  // a tied weight is reported by its owner
    if (!input_grad_) return {};
    // dx = dz W
    auto dx = ctx.template allocate<S>({rows, in_});
    product(ctx, dz, store_->param(weight_), dx);
    index_array ext{};
    for (int d = 0; d < out_shape_.rank(); ++d) ext[d] = out_shape_[d];
    ext[out_shape_.rank() - 1] = in_;
    return dx.reshape(shape(out_shape_.rank(), ext));
  }

 private:
  void init_tensor(parameter_handle h, generator& gen, double bound) {
    auto m = store_->master(h);
    uniform(m, gen, -bound, bound);
    copy(m, store_->param(h));
  }

  /// The bias as the GEMM epilogue wants it (float), or an empty view.
  tensor_view<const float, D> bias_float(context<Policy>& ctx) {
    if (!bias_.valid()) return {};
    auto b = store_->param(bias_);
    if constexpr (std::is_same_v<S, float>) {
      return b;
    } else {
      auto f = ctx.template allocate<float>({out_});
      copy(b, f);
      return f;
    }
  }

  /// z = x W^T + b with the ReLU (if any) fused: in the GEMM's epilogue for float
  /// accumulation; in double (fp64), whose epilogue bias would be float, added after.
  void affine(context<Policy>& ctx, tensor_view<const S, D> x, tensor_view<S, D> z, bool fuse_relu) {
    gemm_options opt;
    if constexpr (std::is_same_v<A, float>) {
      opt.act = fuse_relu ? activation::relu : activation::none;
      const auto bias = bias_float(ctx);
      if constexpr (std::is_same_v<S, float>) {
        if (bias.empty()) {
          gemm(x, store_->param(weight_).t(), z, opt);
        } else {
          gemm(x, store_->param(weight_).t(), z, opt, bias);
        }
      } else {
        auto acc = ctx.template allocate<float>(z.shape());
        if (bias.empty()) {
          gemm(x, store_->param(weight_).t(), acc, opt);
        } else {
          gemm(x, store_->param(weight_).t(), acc, opt, bias);
        }
        copy(acc, z);
      }
    } else {
      gemm(x, store_->param(weight_).t(), z, opt);
      if (bias_.valid()) add(z, store_->param(bias_), z);
      if (fuse_relu) trident::relu(z, z);
    }
  }

  /// c = a b with c in the storage type (2-byte c rounded from a float scratch).
  static void product(context<Policy>& ctx, tensor_view<const S, D> a, tensor_view<const S, D> b, tensor_view<S, D> c) {
    if constexpr (std::is_same_v<S, A>) {
      gemm(a, b, c);
    } else {
      auto acc = ctx.template allocate<A>(c.shape());
      gemm(a, b, acc);
      copy(acc, c);
    }
  }

  /// g += a b, g in the gradient type.
  static void accumulate_product(context<Policy>& ctx, tensor_view<const S, D> a, tensor_view<const S, D> b,
                                 tensor_view<G, D> g) {
    if constexpr (std::is_same_v<G, A>) {
      gemm_options opt;
      opt.beta = 1.0;
      gemm(a, b, g, opt);
    } else {
      auto acc = ctx.template allocate<A>(g.shape());
      gemm(a, b, acc);
      add(g, acc, g);
    }
  }

  parameter_store<Policy>* store_;
  index_t in_, out_;
  activation act_;
  bool tied_ = false;
  bool input_grad_ = true;
  parameter_handle weight_{}, bias_{};
  // kept from forward for backward (this step's memory)
  tensor_view<const S, D> x_{};
  tensor_view<S, D> y_{}, pre_{};
  shape out_shape_{};
};

}  // namespace trident::nn
