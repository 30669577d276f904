#pragma once
/// @file quant/qlinear.hpp
/// The quantized linear layer: a module like nn::linear whose weights are stored quantized
/// under a compile-time scheme (quant/scheme.hpp), for inference.
///
///   nn::linear<P> fc(store, "fc1", 784, 256, true, activation::relu);   // ... trained
///   quant::qlinear<P, quant::dynamic_int8<quant::per_row>> q(fc, store);
///   quant::qlinear<P, quant::weight_only<quant::int4_t, 128>> q4(fc, store);
///   quant::qlinear<P, quant::static_int8> qs(fc, store, observer.params<std::uint8_t>());
///   auto y = q.forward(ctx, x);                                         // x (..., 784) -> (..., 256)
///
/// The layer copies what it needs when it is built: the weights quantized (from the fp32
/// master copy), the bias in fp32, the fused activation. After that it no longer refers to
/// the store. Per scheme, forward runs
///
///   dynamic_int8<G>   dynamic_int8_linear: x quantized to uint8 per tensor / row, int8 GEMM
///   static_int8       x quantized to uint8 with the calibrated (scale, zero point), int8_linear
///   weight_only<Q,g>  weight_only_linear: fp32 x times W dequantised panel by panel
///
/// with the bias and a ReLU in the GEMM's epilogue (GELU after it, in fp32). Under the bf16
/// and fp16 policies the input is converted to fp32 first and the output rounded back to the
/// storage type. The layer is inference only: backward throws, pointing to quantization-aware
/// training (quant/fake_quant.hpp).
///
/// bytes() is the model's size as the quantized format defines it: the values at their bit
/// width, the fp32 scales, the fp32 bias (and, for static_int8, the input's scale and zero
/// point); memory_bytes() is what the layer holds in memory (packing padding and the int8
/// GEMM's row sums included).

#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "../backend/cpu/device.hpp"
#include "../core/activation.hpp"
#include "../nn/linear.hpp"
#include "../nn/module.hpp"
#include "../ops/elementwise.hpp"
#include "../ops/transfer.hpp"
#include "observer.hpp"
#include "onnx.hpp"
#include "packed_int8.hpp"
#include "scheme.hpp"
#include "weight_only.hpp"

namespace trident::quant {

namespace detail {
template <class Scheme>
struct weight_storage {
  using type = packed_int8_weight;
};
template <class Q, index_t G>
struct weight_storage<weight_only<Q, G>> {
  using type = groupwise_weight<Q>;
};

/// The fp32 values of a parameter (its master copy when the store keeps one).
template <class P>
std::vector<float> float_values(nn::parameter_store<P>& store, nn::parameter_handle h) {
  std::vector<float> out(static_cast<std::size_t>(store.info(h).numel()));
  auto fill_from = [&](const auto* d) {
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(d[i]);
  };
  if (store.master_released()) {
    fill_from(store.param(h).data());
  } else {
    fill_from(store.master(h).data());
  }
  return out;
}

/// "fc1" from "fc1.weight".
inline std::string layer_name(const std::string& weight_name) {
  const std::string suffix = ".weight";
  if (weight_name.size() > suffix.size() && weight_name.compare(weight_name.size() - suffix.size(), suffix.size(), suffix) == 0) {
    return weight_name.substr(0, weight_name.size() - suffix.size());
  }
  return weight_name;
}
}  // namespace detail

/// A linear layer y = act(x W^T + b) with W quantized under `Scheme`; inference only.
/// @tparam Policy the policy bundle of the model it runs in (cpu device)
/// @tparam Scheme dynamic_int8<per_tensor | per_row>, static_int8 or weight_only<Q, Group>
template <policy_bundle Policy, scheme Scheme>
class qlinear {
  static_assert(std::is_same_v<typename Policy::device, cpu>,
                "quant::qlinear<Policy, Scheme>: the quantized kernels run on the cpu device only");

 public:
  using S = typename Policy::storage_type;
  using D = typename Policy::device;
  using scheme_type = Scheme;
  /// packed_int8_weight (int8 GEMM schemes) or groupwise_weight<Q> (weight-only).
  using weight_type = typename detail::weight_storage<Scheme>::type;

  /// From a trained layer and its store: the weights quantized, bias and activation kept.
  qlinear(const nn::linear<Policy>& l, nn::parameter_store<Policy>& store) requires(!Scheme::calibrated)
      : qlinear(detail::layer_name(store.info(l.weight()).name), detail::float_values(store, l.weight()), l.out_features(),
                l.in_features(), l.bias().valid() ? detail::float_values(store, l.bias()) : std::vector<float>{}, l.act()) {}

  /// static_int8: from a trained layer and the input's calibrated parameters (uint8).
  qlinear(const nn::linear<Policy>& l, nn::parameter_store<Policy>& store, const qparams& input) requires(Scheme::calibrated)
      : qlinear(detail::layer_name(store.info(l.weight()).name), detail::float_values(store, l.weight()), l.out_features(),
                l.in_features(), l.bias().valid() ? detail::float_values(store, l.bias()) : std::vector<float>{}, l.act(),
                input) {}

  /// From fp32 weights w (out x in, row-major) and a bias (out values, or empty). `input` is
  /// the input's uint8 parameters, used (and required valid) by static_int8 only.
  qlinear(std::string name, std::span<const float> w, index_t out, index_t in, std::span<const float> bias,
          activation act = activation::none, const qparams& input = {})
      : name_(std::move(name)), in_(in), out_(out), act_(act), input_(input), bias_(bias.begin(), bias.end()) {
    if (in <= 0 || out <= 0) {
      throw shape_error("quant::qlinear '" + name_ + "': features must be positive, got in " + std::to_string(in) +
                        ", out " + std::to_string(out));
    }
    if (static_cast<index_t>(w.size()) != out * in) {
      throw shape_error("quant::qlinear '" + name_ + "': " + std::to_string(w.size()) + " weights for an " +
                        std::to_string(out) + " x " + std::to_string(in) + " layer");
    }
    if (!bias.empty() && static_cast<index_t>(bias.size()) != out) {
      throw shape_error("quant::qlinear '" + name_ + "': " + std::to_string(bias.size()) + " bias values for " +
                        std::to_string(out) + " outputs");
    }
    for (std::size_t j = 0; j < bias_.size(); ++j) {
      if (!std::isfinite(bias_[j])) {
        throw quantization_error("quant::qlinear '" + name_ + "': bias element " + std::to_string(j) + " is not finite");
      }
    }
    if constexpr (Scheme::calibrated) {
      check_scale(input.scale, name_ + " input");
      if (input.zero_point < qrange<std::uint8_t>::lo || input.zero_point > qrange<std::uint8_t>::hi) {
        throw quantization_error("quant::qlinear '" + name_ + "': the input's zero point " +
                                 std::to_string(input.zero_point) + " is outside the uint8 range [0, 255]");
      }
    }
    if constexpr (Scheme::int8_gemm) {
      weight_ = packed_int8_weight::quantize(w.data(), out, in, in, name_ + ".weight");
    } else {
      if (in % Scheme::group != 0) {
        throw shape_error("quant::qlinear '" + name_ + "': " + Scheme::name + " with groups of " +
                          std::to_string(Scheme::group) + " needs an input width that is a multiple of the group, got " +
                          std::to_string(in));
      }
      weight_ = weight_type::quantize(w.data(), out, in, in, Scheme::group, name_ + ".weight");
    }
  }

  const std::string& name() const noexcept { return name_; }
  index_t in_features() const noexcept { return in_; }
  index_t out_features() const noexcept { return out_; }
  activation act() const noexcept { return act_; }
  /// The quantized weights.
  const weight_type& weights() const noexcept { return weight_; }
  /// The fp32 bias (empty without one).
  std::span<const float> bias() const noexcept { return bias_; }
  /// static_int8: the input's (scale, zero point).
  const qparams& input_params() const noexcept requires(Scheme::calibrated) { return input_; }

  /// Model bytes: quantized values at their bit width + fp32 scales + fp32 bias (+ the
  /// input's fp32 scale and int32 zero point for static_int8).
  std::size_t bytes() const noexcept {
    std::size_t n = static_cast<std::size_t>(out_ * in_ * Scheme::weight_bits / 8);
    if constexpr (Scheme::int8_gemm) {
      n += static_cast<std::size_t>(out_) * sizeof(float);
    } else {
      n += static_cast<std::size_t>(out_ * (in_ / Scheme::group)) * sizeof(float);
    }
    n += bias_.size() * sizeof(float);
    if constexpr (Scheme::calibrated) n += sizeof(float) + sizeof(std::int32_t);
    return n;
  }
  /// Bytes held in memory: the weights as packed for the kernels, the bias, the parameters.
  std::size_t memory_bytes() const noexcept { return weight_.bytes() + bias_.size() * sizeof(float) + sizeof(qparams); }

  /// Forward FLOPs of the last forward: 2 · rows · in · out (as nn::linear counts them).
  std::int64_t flops() const noexcept { return 2 * static_cast<std::int64_t>(rows_) * in_ * out_; }
  std::int64_t backward_flops() const noexcept { return 0; }

  /// x (..., in) -> y (..., out).
  tensor_view<S, D> forward(nn::context<Policy>& ctx, tensor_view<const S, D> x) {
    if (x.rank() < 1 || x.size(x.rank() - 1) != in_) {
      throw shape_error("quant::qlinear::forward '" + name_ + "': input has shape " + x.shape().str() +
                        " but the layer takes (..., " + std::to_string(in_) + ")");
    }
    const index_t rows = x.numel() / in_;
    rows_ = rows;
    shape out_shape = x.shape();
    out_shape[out_shape.rank() - 1] = out_;
    if (rows == 0) return ctx.template allocate<S>(out_shape);

    // the input as contiguous fp32 rows
    tensor_view<const float, D> xf;
    if constexpr (std::is_same_v<S, float>) {
      xf = ctx.contiguous(x).reshape({rows, in_});
    } else {
      auto f = ctx.template allocate<float>({rows, in_});
      copy(ctx.contiguous(x).reshape({rows, in_}), f);
      xf = f;
    }
    auto z = ctx.template allocate<float>({rows, out_});
    const activation fused = act_ == activation::relu ? activation::relu : activation::none;
    const float* b = bias_.empty() ? nullptr : bias_.data();
    if constexpr (std::is_same_v<Scheme, static_int8>) {
      auto* q = static_cast<std::uint8_t*>(ctx.memory.allocate_bytes(static_cast<std::size_t>(rows * in_)));
      // ONNX QuantizeLinear with the calibrated parameters, bit for bit (vectorised)
      quantize_static_u8(xf.data(), rows, in_, in_, input_.scale, input_.zero_point, q, in_, name_ + " input");
      int8_epilogue e;
      e.a_scale = &input_.scale;
      e.a_zero = &input_.zero_point;
      e.g = granularity::per_tensor;
      e.bias = b;
      e.act = fused;
      int8_linear(q, rows, in_, weight_, z.data(), out_, e);
    } else if constexpr (Scheme::int8_gemm) {
      constexpr granularity g =
          std::is_same_v<typename Scheme::granularity, per_row> ? granularity::per_row : granularity::per_tensor;
      dynamic_int8_linear(xf.data(), rows, in_, weight_, z.data(), out_, b, fused, g);
    } else {
      weight_only_linear(xf.data(), rows, in_, weight_, z.data(), out_, b, fused);
    }
    tensor_view<float, D> y = z;
    if (act_ == activation::gelu || act_ == activation::gelu_tanh) {
      y = ctx.template allocate<float>({rows, out_});
      if (act_ == activation::gelu) {
        trident::gelu(z, y);
      } else {
        trident::gelu_tanh(z, y);
      }
    }
    if constexpr (std::is_same_v<S, float>) {
      return y.reshape(out_shape);
    } else {
      auto ys = ctx.template allocate<S>({rows, out_});
      copy(y, ys);
      return ys.reshape(out_shape);
    }
  }

  /// Always throws: a quantized layer has no gradient.
  [[noreturn]] tensor_view<S, D> backward(nn::context<Policy>&, tensor_view<const S, D>) {
    throw error("quant::qlinear::backward '" + name_ + "' (" + Scheme::name +
                "): a quantized layer is for inference only and has no backward; to train with quantization, use "
                "quant::qat_linear (quantization-aware training, quant/fake_quant.hpp) and convert it to "
                "qlinear<P, static_int8> afterwards");
  }

 private:
  std::string name_;
  index_t in_, out_;
  activation act_;
  qparams input_{};
  std::vector<float> bias_;
  weight_type weight_{};
  index_t rows_ = 0;
};

}  // namespace trident::quant
