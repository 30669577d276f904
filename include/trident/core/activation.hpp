#pragma once
/// @file activation.hpp
/// Point-wise activations shared by GEMM epilogues, element-wise ops and (later) modules.
/// Each is a small function object usable on host and device, computing in float or double.

#include <cmath>

#include "../config.hpp"

namespace trident {

/// Activation applied by a fused epilogue.
enum class activation {
  none,       ///< identity
  relu,       ///< max(x, 0)
  gelu,       ///< exact: x/2 * (1 + erf(x/sqrt(2)))
  gelu_tanh,  ///< tanh approximation: x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
};

/// Name of an activation, for messages.
constexpr const char* to_string(activation a) noexcept {
  switch (a) {
    case activation::none: return "none";
    case activation::relu: return "relu";
    case activation::gelu: return "gelu";
    case activation::gelu_tanh: return "gelu_tanh";
  }
  return "?";
}

namespace ops {

struct relu {
  template <class C>
  TRIDENT_HD constexpr C operator()(C x) const noexcept { return x > C(0) ? x : C(0); }
};

struct gelu {
  template <class C>
  TRIDENT_HD C operator()(C x) const noexcept {
    using std::erf;
    return C(0.5) * x * (C(1) + erf(x * C(0.70710678118654752440)));
  }
};

struct gelu_tanh {
  template <class C>
  TRIDENT_HD C operator()(C x) const noexcept {
    using std::tanh;
    const C inner = C(0.79788456080286535588) * (x + C(0.044715) * x * x * x);
    return C(0.5) * x * (C(1) + tanh(inner));
  }
};

// Derivatives, as binary functors (upstream gradient, forward input) -> input gradient. ReLU
// takes the forward *output* or input alike (both are positive exactly where it passes).
struct relu_backward {
  template <class C>
  TRIDENT_HD constexpr C operator()(C dy, C x) const noexcept { return x > C(0) ? dy : C(0); }
};

struct gelu_backward {
  template <class C>
  TRIDENT_HD C operator()(C dy, C x) const noexcept {
    using std::erf;
    using std::exp;
    const C cdf = C(0.5) * (C(1) + erf(x * C(0.70710678118654752440)));
    const C pdf = C(0.39894228040143267794) * exp(C(-0.5) * x * x);
    return dy * (cdf + x * pdf);
  }
};

struct gelu_tanh_backward {
  template <class C>
  TRIDENT_HD C operator()(C dy, C x) const noexcept {
    using std::tanh;
    const C k = C(0.79788456080286535588);
    const C t = tanh(k * (x + C(0.044715) * x * x * x));
    const C dinner = k * (C(1) + C(3) * C(0.044715) * x * x);
    return dy * (C(0.5) * (C(1) + t) + C(0.5) * x * (C(1) - t * t) * dinner);
  }
};

}  // namespace ops

/// Applies `a` to one value (scalar reference path; kernels vectorise their own).
template <class C>
TRIDENT_HD C apply_activation(activation a, C x) noexcept {
  switch (a) {
    case activation::relu: return ops::relu{}(x);
    case activation::gelu: return ops::gelu{}(x);
    case activation::gelu_tanh: return ops::gelu_tanh{}(x);
    case activation::none: break;
  }
  return x;
}

}  // namespace trident
