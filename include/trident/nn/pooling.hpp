#pragma once
/// @file nn/pooling.hpp
/// 2-D max and average pooling over NCHW tensors (PyTorch's nn.MaxPool2d and nn.AvgPool2d
/// in floor mode, without dilation). Padding is implicit: -inf for max pooling, zeros for
/// average pooling, and at most half the window, as PyTorch requires.

#include <cstdint>
#include <string>

#include "conv2d.hpp"
#include "module.hpp"

namespace trident::nn {

namespace pool_detail {

/// Checks a pooling layer's sizes at construction.
inline void check_pool_sizes(const char* what, extent2 kernel, extent2 stride, extent2 padding) {
  if (kernel.h <= 0 || kernel.w <= 0 || stride.h <= 0 || stride.w <= 0 || padding.h < 0 || padding.w < 0) {
    throw shape_error(std::string(what) + ": sizes must be positive (padding non-negative), got kernel " + kernel.str() +
                      ", stride " + stride.str() + ", padding " + padding.str());
  }
  if (2 * padding.h > kernel.h || 2 * padding.w > kernel.w) {
    throw shape_error(std::string(what) + ": padding " + padding.str() + " must be at most half the kernel " + kernel.str());
  }
}

/// The geometry of a pooling layer for an input of shape s; throws shape_error naming the
/// layer and the shape when the input does not fit.
inline conv_geometry pool_geometry(const char* what, const shape& s, extent2 kernel, extent2 stride, extent2 padding) {
  if (s.rank() != 4) throw shape_error(std::string(what) + ": input has shape " + s.str() + " but the layer takes (N, C, H, W)");
  conv_geometry g;
  g.batch = s[0];
  g.channels = s[1];
  g.height = s[2];
  g.width = s[3];
  g.out_channels = s[1];
  g.kernel = kernel;
  g.stride = stride;
  g.padding = padding;
  if (g.height + 2 * padding.h < kernel.h || g.width + 2 * padding.w < kernel.w) {
    throw shape_error(std::string(what) + ": kernel " + kernel.str() + " is larger than the padded input " +
                      extent2(g.height + 2 * padding.h, g.width + 2 * padding.w).str() + " of input shape " + s.str());
  }
  g.derive();
  return g;
}


/// The output gradient of a pooling layer, checked against the output shape of the last
/// forward and made contiguous (in this step's memory) when it is not.
template <class Policy, class S, class D>
tensor_view<const S, D> output_gradient(context<Policy>& ctx, const char* what, tensor_view<const S, D> dy,
                                        const conv_geometry& g) {
  const shape out{g.batch, g.channels, g.out_height, g.out_width};
  if (!(dy.shape() == out)) {
    throw shape_error(std::string(what) + ": gradient has shape " + dy.shape().str() + " but the output had shape " + out.str());
  }
  return ctx.contiguous(dy);
}

}  // namespace pool_detail

/// Max pooling: each output is the largest input in its window; backward sends the
/// gradient to the first largest position of the window (row-major; NaN wins, as in
/// PyTorch).
/// @tparam Policy the policy bundle
template <policy_bundle Policy>
class max_pool2d {
 public:
  using S = typename Policy::storage_type;
  using D = typename Policy::device;

  /// Non-overlapping windows: stride = kernel, no padding.
  explicit max_pool2d(extent2 kernel) : max_pool2d(kernel, kernel, 0) {}
  max_pool2d(extent2 kernel, extent2 stride, extent2 padding = 0) : kernel_(kernel), stride_(stride), padding_(padding) {
    pool_detail::check_pool_sizes("nn::max_pool2d", kernel, stride, padding);
  }

  extent2 kernel_size() const noexcept { return kernel_; }
  extent2 stride() const noexcept { return stride_; }
  extent2 padding() const noexcept { return padding_; }

  /// x (N, C, H, W) -> y (N, C, OH, OW).
  tensor_view<S, D> forward(context<Policy>& ctx, tensor_view<const S, D> x) {
    geom_ = pool_detail::pool_geometry("nn::max_pool2d", x.shape(), kernel_, stride_, padding_);
    x = ctx.contiguous(x);
    const shape out{geom_.batch, geom_.channels, geom_.out_height, geom_.out_width};
    auto y = ctx.template allocate<S>(out);
    auto* argmax = static_cast<std::int32_t*>(ctx.memory.allocate_bytes(static_cast<std::size_t>(out.numel()) * sizeof(std::int32_t)));
    conv_kernels<D>::max_pool2d_forward(y, argmax, x, geom_);
    argmax_ = argmax;
    return y;
  }

  /// dy (N, C, OH, OW) -> dx (N, C, H, W).
  tensor_view<S, D> backward(context<Policy>& ctx, tensor_view<const S, D> dy_in) {
    const auto dy = pool_detail::output_gradient(ctx, "nn::max_pool2d::backward", dy_in, geom_);
    auto dx = ctx.template allocate<S>({geom_.batch, geom_.channels, geom_.height, geom_.width});
    conv_kernels<D>::max_pool2d_backward(ctx.memory, dx, dy, argmax_, geom_);
    return dx;
  }

 private:
  extent2 kernel_, stride_, padding_;
  conv_geometry geom_{};
  const std::int32_t* argmax_ = nullptr;  // this step's memory
};

/// Average pooling: each output is the mean of its window. With count_include_pad (the
/// default, as in PyTorch) padding zeros count in the divisor; without, only inputs do.
/// @tparam Policy the policy bundle
template <policy_bundle Policy>
class avg_pool2d {
 public:
  using S = typename Policy::storage_type;
  using D = typename Policy::device;

  /// Non-overlapping windows: stride = kernel, no padding.
  explicit avg_pool2d(extent2 kernel) : avg_pool2d(kernel, kernel, 0) {}
  avg_pool2d(extent2 kernel, extent2 stride, extent2 padding = 0, bool count_include_pad = true)
      : kernel_(kernel), stride_(stride), padding_(padding), include_pad_(count_include_pad) {
    pool_detail::check_pool_sizes("nn::avg_pool2d", kernel, stride, padding);
  }

  extent2 kernel_size() const noexcept { return kernel_; }
  extent2 stride() const noexcept { return stride_; }
  extent2 padding() const noexcept { return padding_; }
  bool count_include_pad() const noexcept { return include_pad_; }

  /// x (N, C, H, W) -> y (N, C, OH, OW).
  tensor_view<S, D> forward(context<Policy>& ctx, tensor_view<const S, D> x) {
    geom_ = pool_detail::pool_geometry("nn::avg_pool2d", x.shape(), kernel_, stride_, padding_);
    x = ctx.contiguous(x);
    auto y = ctx.template allocate<S>({geom_.batch, geom_.channels, geom_.out_height, geom_.out_width});
    conv_kernels<D>::avg_pool2d_forward(y, x, geom_, include_pad_);
    return y;
  }

  /// dy (N, C, OH, OW) -> dx (N, C, H, W).
  tensor_view<S, D> backward(context<Policy>& ctx, tensor_view<const S, D> dy_in) {
    const auto dy = pool_detail::output_gradient(ctx, "nn::avg_pool2d::backward", dy_in, geom_);
    auto dx = ctx.template allocate<S>({geom_.batch, geom_.channels, geom_.height, geom_.width});
    conv_kernels<D>::avg_pool2d_backward(ctx.memory, dx, dy, geom_, include_pad_);
    return dx;
  }

 private:
  extent2 kernel_, stride_, padding_;
  bool include_pad_;
  conv_geometry geom_{};
};

}  // namespace trident::nn
