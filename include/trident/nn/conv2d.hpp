#pragma once
/// @file nn/conv2d.hpp
/// 2-D convolution over NCHW tensors (PyTorch's nn.Conv2d with groups = dilation = 1), as
/// im2col + GEMM: per sample, the input patches are unfolded into a (C_in*kh*kw, OH*OW)
/// matrix in the storage type and multiplied by the weight viewed as (C_out, C_in*kh*kw),
/// accumulating in fp32 (double under fp64; AMX for bf16). Samples are spread over
/// threads, each with its own unfold buffer, so the working set of a sample stays in cache.
///
/// Also declares what the convolutional modules (conv2d, pooling, batch norm) share: the
/// (height, width) pair `extent2`, the window geometry `conv_geometry`, and their kernel
/// table `conv_kernels<Device>`, which backend/cpu/conv_kernels.hpp implements for the CPU.

#include <cmath>
#include <string>
#include <type_traits>

#include "../core/activation.hpp"
#include "../ops/fill.hpp"
#include "../ops/gemm.hpp"
#include "../ops/transfer.hpp"
#include "module.hpp"

namespace trident::nn {

/// A (height, width) pair: a kernel size, stride or padding. One number means both.
struct extent2 {
  index_t h = 0;
  index_t w = 0;
  constexpr extent2(index_t both) noexcept : h(both), w(both) {}
  constexpr extent2(index_t height, index_t width) noexcept : h(height), w(width) {}
  friend constexpr bool operator==(const extent2&, const extent2&) = default;
  /// "(h, w)", for messages.
  std::string str() const {
    std::string s = "(";
    s += std::to_string(h);
    s += ", ";
    s += std::to_string(w);
    s += ')';
    return s;
  }
};

/// The geometry of a sliding-window layer on an (N, C, H, W) input: input sizes, window,
/// stride, zero padding and the (N, out_channels, OH, OW) output they give.
struct conv_geometry {
  index_t batch = 0, channels = 0, height = 0, width = 0;
  index_t out_channels = 0;  ///< convolution: C_out; pooling: C
  extent2 kernel{1}, stride{1}, padding{0};
  index_t out_height = 0, out_width = 0;

  /// Fills the output sizes (floor mode).
  constexpr void derive() noexcept {
    out_height = (height + 2 * padding.h - kernel.h) / stride.h + 1;
    out_width = (width + 2 * padding.w - kernel.w) / stride.w + 1;
  }
  /// Elements of one unfolded patch: C * kh * kw.
  constexpr index_t patch() const noexcept { return channels * kernel.h * kernel.w; }
  /// Output positions per channel and sample: OH * OW.
  constexpr index_t out_plane() const noexcept { return out_height * out_width; }
  /// Input positions per channel and sample: H * W.
  constexpr index_t in_plane() const noexcept { return height * width; }
  /// A 1x1 window with unit stride and no padding: the unfolded input is the input itself.
  constexpr bool pointwise() const noexcept {
    return kernel.h == 1 && kernel.w == 1 && stride.h == 1 && stride.w == 1 && padding.h == 0 && padding.w == 0;
  }
  /// Windows do not overlap (each input position feeds at most one output).
  constexpr bool disjoint() const noexcept { return stride.h >= kernel.h && stride.w >= kernel.w; }
};

/// The kernels of conv2d, max_pool2d, avg_pool2d and batch_norm, specialised per device
/// (backend/cpu/conv_kernels.hpp). Tensors are contiguous NCHW; scratch memory comes from
/// the step's arena. For storage type S, gradient type G and statistics type St:
///   conv2d_forward(mem, y, x, w, bias, g, act)            bias may be empty; act none or relu
///   conv2d_backward(mem, dx, dw, db, dy, y, x, w, g, act) dw, db accumulate; dx may be empty
///   max_pool2d_forward(y, argmax, x, g)                   argmax: int32 per output, index in its plane
///   max_pool2d_backward(mem, dx, dy, argmax, g)
///   avg_pool2d_forward(y, x, g, count_include_pad)
///   avg_pool2d_backward(mem, dx, dy, g, count_include_pad)
///   batch_norm_train_statistics(mem, mean, invstd, running_mean, running_var, x, channels, eps, momentum)
///   batch_norm_eval_statistics(mean, invstd, running_mean, running_var, eps)
///   batch_norm_normalize(y, x, mean, invstd, gamma, beta, channels)
///   batch_norm_backward(mem, dx, dgamma, dbeta, dy, x, mean, invstd, gamma, channels, batch_statistics)
/// @tparam Device the device policy
template <class Device>
struct conv_kernels {
  static_assert(trident::detail::dependent_false<Device>,
                "trident::nn::conv_kernels<Device>: no backend implements convolution, pooling and batch norm for "
                "this device in this translation unit (for the CPU: #include <trident/nn.hpp>)");
};

/// 2-D convolution y = act(x * W + b) over (N, C_in, H, W) inputs, giving (N, C_out, OH, OW)
/// with OH = (H + 2 ph - kh) / sh + 1 (likewise OW). A ReLU can be fused (applied while the
/// output is still in cache, and undone in backward from the output).
/// @tparam Policy the policy bundle
template <policy_bundle Policy>
class conv2d {
 public:
  using S = typename Policy::storage_type;
  using G = typename Policy::gradient_type;
  using D = typename Policy::device;
  /// The type products accumulate in: float, or double under fp64.
  using A = gemm_accumulate_t<S>;

  /// Declares `name.weight` (C_out, C_in, kh, kw) and, with bias, `name.bias` (C_out; not
  /// weight-decayed). `act` is activation::none or activation::relu.
  conv2d(parameter_store<Policy>& store, const std::string& name, index_t in_channels, index_t out_channels,
         extent2 kernel, extent2 stride = 1, extent2 padding = 0, bool bias = true, activation act = activation::none)
      : store_(&store), name_(name), in_(in_channels), out_(out_channels), kernel_(kernel), stride_(stride),
        padding_(padding), act_(act) {
    if (in_channels <= 0 || out_channels <= 0 || kernel.h <= 0 || kernel.w <= 0 || stride.h <= 0 || stride.w <= 0 ||
        padding.h < 0 || padding.w < 0) {
      throw shape_error("nn::conv2d '" + name + "': sizes must be positive (padding non-negative), got in_channels " +
                        std::to_string(in_channels) + ", out_channels " + std::to_string(out_channels) + ", kernel " +
                        kernel.str() + ", stride " + stride.str() + ", padding " + padding.str());
    }
    if (act != activation::none && act != activation::relu) {
      throw error("nn::conv2d '" + name + "': the fused activation must be none or relu, got " + to_string(act) +
                  " (apply it as a separate module)");
    }
    weight_ = store.declare(name + ".weight", {out_channels, in_channels, kernel.h, kernel.w}, true);
    if (bias) bias_ = store.declare(name + ".bias", {out_channels}, false);
  }

  /// PyTorch's default initialisation (kaiming_uniform with a = sqrt(5)): weight and bias
  /// ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = C_in * kh * kw.
  void init(generator& gen) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(in_ * kernel_.h * kernel_.w));
    init_tensor(weight_, gen, bound);
    if (bias_.valid()) init_tensor(bias_, gen, bound);
  }

  const std::string& name() const noexcept { return name_; }
  index_t in_channels() const noexcept { return in_; }
  index_t out_channels() const noexcept { return out_; }
  extent2 kernel_size() const noexcept { return kernel_; }
  extent2 stride() const noexcept { return stride_; }
  extent2 padding() const noexcept { return padding_; }
  activation fused_activation() const noexcept { return act_; }
  parameter_handle weight() const noexcept { return weight_; }
  parameter_handle bias() const noexcept { return bias_; }

  /// Whether backward computes the input gradient (default true). A first layer, whose
  /// input is data, can skip it: backward then returns a zero-filled gradient.
  void set_input_gradient(bool on) noexcept { input_grad_ = on; }
  bool input_gradient() const noexcept { return input_grad_; }
  /// Forward FLOPs of the last forward: 2 · N · C_out · OH · OW · C_in · kh · kw.
  std::int64_t flops() const noexcept {
    return 2 * static_cast<std::int64_t>(geom_.batch) * geom_.out_channels * geom_.out_plane() * geom_.patch();
  }
  /// Backward FLOPs: the weight gradient, and the input gradient when input_gradient().
  std::int64_t backward_flops() const noexcept { return (input_grad_ ? 2 : 1) * flops(); }

  /// x (N, C_in, H, W) -> y (N, C_out, OH, OW).
  tensor_view<S, D> forward(context<Policy>& ctx, tensor_view<const S, D> x) {
    geom_ = geometry_of(x.shape());
    x_ = ctx.contiguous(x);
    auto y = ctx.template allocate<S>({geom_.batch, out_, geom_.out_height, geom_.out_width});
    conv_kernels<D>::conv2d_forward(ctx.memory, y, x_, tensor_view<const S, D>(store_->param(weight_)), bias_param(), geom_,
                                    act_);
    y_ = y;
    return y;
  }

  /// dy (N, C_out, OH, OW) -> dx (N, C_in, H, W); accumulates dW and db.
  tensor_view<S, D> backward(context<Policy>& ctx, tensor_view<const S, D> dy) {
    const shape out_shape{geom_.batch, out_, geom_.out_height, geom_.out_width};
    if (!(dy.shape() == out_shape)) {
      throw shape_error("nn::conv2d::backward '" + name_ + "': gradient has shape " + dy.shape().str() +
                        " but the output had shape " + out_shape.str());
    }
    dy = ctx.contiguous(dy);
    auto dx = ctx.template allocate<S>(x_.shape());
    tensor_view<G, D> db{};
    if (bias_.valid()) db = store_->grad(bias_);
    conv_kernels<D>::conv2d_backward(ctx.memory, input_grad_ ? dx : tensor_view<S, D>{}, store_->grad(weight_), db, dy, y_,
                                     x_, tensor_view<const S, D>(store_->param(weight_)), geom_, act_);
    store_->grad_ready(weight_);
    store_->grad_ready(bias_);
    if (!input_grad_) fill(dx, 0.0);
    return dx;
  }

  /// The geometry for an input of shape `s`; throws shape_error naming the layer and the
  /// shape when the input does not fit.
  conv_geometry geometry_of(const shape& s) const {
    if (s.rank() != 4 || s[1] != in_) {
      throw shape_error("nn::conv2d '" + name_ + "': input has shape " + s.str() + " but the layer takes (N, " +
                        std::to_string(in_) + ", H, W)");
    }
    conv_geometry g;
    g.batch = s[0];
    g.channels = in_;
    g.height = s[2];
    g.width = s[3];
    g.out_channels = out_;
    g.kernel = kernel_;
    g.stride = stride_;
    g.padding = padding_;
    if (g.height + 2 * padding_.h < kernel_.h || g.width + 2 * padding_.w < kernel_.w) {
      throw shape_error("nn::conv2d '" + name_ + "': kernel " + kernel_.str() + " is larger than the padded input " +
                        extent2(g.height + 2 * padding_.h, g.width + 2 * padding_.w).str() + " of input shape " + s.str());
    }
    g.derive();
    return g;
  }

 private:
  void init_tensor(parameter_handle h, generator& gen, double bound) {
    auto m = store_->master(h);
    uniform(m, gen, -bound, bound);
    copy(m, store_->param(h));
  }
  tensor_view<const S, D> bias_param() {
    return bias_.valid() ? tensor_view<const S, D>(store_->param(bias_)) : tensor_view<const S, D>{};
  }
  parameter_store<Policy>* store_;
  std::string name_;
  index_t in_, out_;
  extent2 kernel_, stride_, padding_;
  activation act_;
  bool input_grad_ = true;
  parameter_handle weight_{}, bias_{};
  // kept from forward for backward (this step's memory)
  tensor_view<const S, D> x_{}, y_{};
  conv_geometry geom_{};
};

}  // namespace trident::nn
