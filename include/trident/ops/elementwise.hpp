#pragma once
/// @file ops/elementwise.hpp
/// Element-wise operations with NumPy broadcasting, on any device with a kernel table.
///   map(op, x, out)       out = op(x)        x broadcast to out's shape
///   zip(op, a, b, out)    out = op(a, b)     a, b broadcast to out's shape
/// and named forms (add, mul, relu, ...). Each has an out-parameter form and a form that
/// returns a new tensor. An output may be one of the inputs (in place) when their layouts
/// are identical; partially overlapping operands are not supported.

#include "../core/activation.hpp"
#include "../core/tensor.hpp"
#include "detail.hpp"
#include "functors.hpp"

namespace trident {

/// out = op(x), x broadcast to out's shape.
template <class Op, tensor_like X, class Out>
void map(const Op& op, const X& x, Out&& out) {
  static_assert(detail::same_device_v<X, Out>, "trident::map: operands live on different devices");
  using D = typename X::device_type;
  auto o = detail::out_view(out);
  const auto in = cview(x);
  kernels<D>::map(op, o, tensor_view<const typename X::value_type, D>(in.data(), broadcast_layout(in.layout(), o.shape(), "trident::map")));
}

/// op(x) as a new tensor of x's shape and element type.
template <class Op, tensor_like X>
auto map(const Op& op, const X& x) {
  tensor<typename X::value_type, typename X::device_type> out = tensor<typename X::value_type, typename X::device_type>::uninitialized(x.shape());
  map(op, x, out);
  return out;
}

/// out = op(a, b), a and b broadcast to out's shape.
template <class Op, tensor_like A, tensor_like B, class Out>
void zip(const Op& op, const A& a, const B& b, Out&& out) {
  static_assert(detail::same_device_v<A, B, Out>, "trident::zip: operands live on different devices");
  using D = typename A::device_type;
  auto o = detail::out_view(out);
  const auto va = cview(a);
  const auto vb = cview(b);
  const shape s = broadcast_shapes(va.shape(), vb.shape(), "trident::zip");
  if (!(s == o.shape())) {
    throw shape_error("trident::zip: inputs " + va.shape().str() + " and " + vb.shape().str() + " broadcast to " + s.str() +
                      " but the output has shape " + o.shape().str());
  }
  kernels<D>::zip(op, o, tensor_view<const typename A::value_type, D>(va.data(), broadcast_layout(va.layout(), s)),
                  tensor_view<const typename B::value_type, D>(vb.data(), broadcast_layout(vb.layout(), s)));
}

/// op(a, b) as a new tensor of the broadcast shape, with a's element type.
template <class Op, tensor_like A, tensor_like B>
auto zip(const Op& op, const A& a, const B& b) {
  using T = typename A::value_type;
  using D = typename A::device_type;
  auto out = tensor<T, D>::uninitialized(broadcast_shapes(a.shape(), b.shape(), "trident::zip"));
  zip(op, a, b, out);
  return out;
}

// --- named binary operations --------------------------------------------------------------
// clang-format off
template <tensor_like A, tensor_like B, class Out> void add(const A& a, const B& b, Out&& out) { zip(ops::add{}, a, b, out); }
template <tensor_like A, tensor_like B> auto add(const A& a, const B& b) { return zip(ops::add{}, a, b); }
template <tensor_like A, tensor_like B, class Out> void sub(const A& a, const B& b, Out&& out) { zip(ops::sub{}, a, b, out); }
template <tensor_like A, tensor_like B> auto sub(const A& a, const B& b) { return zip(ops::sub{}, a, b); }
template <tensor_like A, tensor_like B, class Out> void mul(const A& a, const B& b, Out&& out) { zip(ops::mul{}, a, b, out); }
template <tensor_like A, tensor_like B> auto mul(const A& a, const B& b) { return zip(ops::mul{}, a, b); }
template <tensor_like A, tensor_like B, class Out> void div(const A& a, const B& b, Out&& out) { zip(ops::div{}, a, b, out); }
template <tensor_like A, tensor_like B> auto div(const A& a, const B& b) { return zip(ops::div{}, a, b); }
template <tensor_like A, tensor_like B, class Out> void maximum(const A& a, const B& b, Out&& out) { zip(ops::maximum{}, a, b, out); }
template <tensor_like A, tensor_like B> auto maximum(const A& a, const B& b) { return zip(ops::maximum{}, a, b); }
template <tensor_like A, tensor_like B, class Out> void minimum(const A& a, const B& b, Out&& out) { zip(ops::minimum{}, a, b, out); }
template <tensor_like A, tensor_like B> auto minimum(const A& a, const B& b) { return zip(ops::minimum{}, a, b); }
/// out = alpha*x + beta*y (STREAM's triad is axpby(1, b, s, c, a)).
template <tensor_like X, tensor_like Y, class Out> void axpby(double alpha, const X& x, double beta, const Y& y, Out&& out) { zip(ops::axpby{alpha, beta}, x, y, out); }

// --- named unary operations -------------------------------------------------------------
template <tensor_like X, class Out> void neg(const X& x, Out&& out) { map(ops::neg{}, x, out); }
template <tensor_like X> auto neg(const X& x) { return map(ops::neg{}, x); }
template <tensor_like X, class Out> void abs(const X& x, Out&& out) { map(ops::abs{}, x, out); }
template <tensor_like X> auto abs(const X& x) { return map(ops::abs{}, x); }
template <tensor_like X, class Out> void exp(const X& x, Out&& out) { map(ops::exp{}, x, out); }
template <tensor_like X> auto exp(const X& x) { return map(ops::exp{}, x); }
template <tensor_like X, class Out> void log(const X& x, Out&& out) { map(ops::log{}, x, out); }
template <tensor_like X> auto log(const X& x) { return map(ops::log{}, x); }
template <tensor_like X, class Out> void sqrt(const X& x, Out&& out) { map(ops::sqrt{}, x, out); }
template <tensor_like X> auto sqrt(const X& x) { return map(ops::sqrt{}, x); }
template <tensor_like X, class Out> void tanh(const X& x, Out&& out) { map(ops::tanh{}, x, out); }
template <tensor_like X> auto tanh(const X& x) { return map(ops::tanh{}, x); }
template <tensor_like X, class Out> void sigmoid(const X& x, Out&& out) { map(ops::sigmoid{}, x, out); }
template <tensor_like X> auto sigmoid(const X& x) { return map(ops::sigmoid{}, x); }
template <tensor_like X, class Out> void relu(const X& x, Out&& out) { map(ops::relu{}, x, out); }
template <tensor_like X> auto relu(const X& x) { return map(ops::relu{}, x); }
template <tensor_like X, class Out> void gelu(const X& x, Out&& out) { map(ops::gelu{}, x, out); }
template <tensor_like X> auto gelu(const X& x) { return map(ops::gelu{}, x); }
template <tensor_like X, class Out> void gelu_tanh(const X& x, Out&& out) { map(ops::gelu_tanh{}, x, out); }
template <tensor_like X> auto gelu_tanh(const X& x) { return map(ops::gelu_tanh{}, x); }
/// out = s*x
template <tensor_like X, class Out> void scale(const X& x, double s, Out&& out) { map(ops::scale{s}, x, out); }
template <tensor_like X> auto scale(const X& x, double s) { return map(ops::scale{s}, x); }
/// out = x + s
template <tensor_like X, class Out> void add_scalar(const X& x, double s, Out&& out) { map(ops::add_scalar{s}, x, out); }
template <tensor_like X> auto add_scalar(const X& x, double s) { return map(ops::add_scalar{s}, x); }
// clang-format on

}  // namespace trident
