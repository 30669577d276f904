#pragma once
/// @file ops/reduce.hpp
/// Reductions (sum, mean, max, L2 norm) over a whole tensor or along one axis, and softmax /
/// log-softmax along an axis. CPU sums accumulate in double; NaN propagates through max.

#include "../core/tensor.hpp"
#include "detail.hpp"
#include "functors.hpp"

namespace trident {

namespace detail {

/// x with `axis` moved to the end (a view; no copy).
template <class V>
V axis_last(const V& x, int axis) {
  const int r = x.rank();
  index_array ext{}, st{};
  for (int d = 0, k = 0; d < r; ++d) {
    if (d == axis) continue;
    ext[k] = x.size(d);
    st[k++] = x.stride(d);
  }
  ext[r - 1] = x.size(axis);
  st[r - 1] = x.stride(axis);
  return V(x.data(), layout(shape(r, ext), st));
}

/// x's shape without dimension `axis`.
inline shape drop_axis(const shape& s, int axis) {
  index_array ext{};
  for (int d = 0, k = 0; d < s.rank(); ++d)
    if (d != axis) ext[k++] = s[d];
  return shape(s.rank() - 1, ext);
}

template <class Reducer, tensor_like X, class Out>
void reduce_axis(const Reducer& red, const X& x, int axis, Out&& out, const char* what) {
  static_assert(same_device_v<X, Out>, "trident: reduction operands live on different devices");
  using D = typename X::device_type;
  const auto in = cview(x);
  const int a = normalize_axis(axis, in.shape(), what);
  auto o = out_view(out);
  const shape expected = drop_axis(in.shape(), a);
  if (o.shape() == expected) {
    kernels<D>::reduce_last(red, o, axis_last(in, a));
  } else if (o.rank() == in.rank() && o.size(a) == 1 && drop_axis(o.shape(), a) == expected) {  // keepdim
    kernels<D>::reduce_last(red, o.select(a, 0), axis_last(in, a));
  } else {
    throw shape_error(std::string(what) + ": reducing axis " + std::to_string(a) + " of " + in.shape().str() + " gives " +
                      expected.str() + " but the output has shape " + o.shape().str());
  }
}

template <class Reducer, tensor_like X>
auto reduce_axis(const Reducer& red, const X& x, int axis, const char* what) {
  const int a = normalize_axis(axis, x.shape(), what);
  auto out = tensor<typename X::value_type, typename X::device_type>::uninitialized(drop_axis(x.shape(), a));
  reduce_axis(red, x, a, out, what);
  return out;
}

}  // namespace detail

/// Sum of all elements (accumulated in double on the CPU).
template <tensor_like X>
double sum(const X& x) {
  return kernels<typename X::device_type>::reduce_all(ops::sum_reducer{}, cview(x));
}
/// Mean of all elements (NaN for an empty tensor).
template <tensor_like X>
double mean(const X& x) {
  return kernels<typename X::device_type>::reduce_all(ops::mean_reducer{}, cview(x));
}
/// Largest element; NaN if any element is NaN; -inf for an empty tensor.
template <tensor_like X>
double max(const X& x) {
  return kernels<typename X::device_type>::reduce_all(ops::max_reducer{}, cview(x));
}
/// Euclidean norm of all elements.
template <tensor_like X>
double l2_norm(const X& x) {
  return kernels<typename X::device_type>::reduce_all(ops::l2_reducer{}, cview(x));
}

// Along one axis: the out-parameter form accepts the reduced shape, or the same rank with
// extent 1 on the axis (keepdim); the returning form drops the axis.
// clang-format off
template <tensor_like X, class Out> void sum(const X& x, int axis, Out&& out) { detail::reduce_axis(ops::sum_reducer{}, x, axis, out, "trident::sum"); }
template <tensor_like X> auto sum(const X& x, int axis) { return detail::reduce_axis(ops::sum_reducer{}, x, axis, "trident::sum"); }
template <tensor_like X, class Out> void mean(const X& x, int axis, Out&& out) { detail::reduce_axis(ops::mean_reducer{}, x, axis, out, "trident::mean"); }
template <tensor_like X> auto mean(const X& x, int axis) { return detail::reduce_axis(ops::mean_reducer{}, x, axis, "trident::mean"); }
template <tensor_like X, class Out> void max(const X& x, int axis, Out&& out) { detail::reduce_axis(ops::max_reducer{}, x, axis, out, "trident::max"); }
template <tensor_like X> auto max(const X& x, int axis) { return detail::reduce_axis(ops::max_reducer{}, x, axis, "trident::max"); }
template <tensor_like X, class Out> void l2_norm(const X& x, int axis, Out&& out) { detail::reduce_axis(ops::l2_reducer{}, x, axis, out, "trident::l2_norm"); }
template <tensor_like X> auto l2_norm(const X& x, int axis) { return detail::reduce_axis(ops::l2_reducer{}, x, axis, "trident::l2_norm"); }
// clang-format on

namespace detail {
template <tensor_like X, class Out>
void softmax_impl(const X& x, int axis, Out&& out, bool log, const char* what) {
  static_assert(same_device_v<X, Out>, "trident: softmax operands live on different devices");
  const auto in = cview(x);
  const int a = normalize_axis(axis, in.shape(), what);
  auto o = out_view(out);
  expect_shape(in.shape(), o.shape(), what, "the output");
  kernels<typename X::device_type>::softmax_last(axis_last(o, a), axis_last(in, a), log);
}
}  // namespace detail

/// out = exp(x - max) / sum(exp(x - max)) along `axis`.
template <tensor_like X, class Out>
void softmax(const X& x, int axis, Out&& out) {
  detail::softmax_impl(x, axis, out, false, "trident::softmax");
}
template <tensor_like X>
auto softmax(const X& x, int axis) {
  auto out = tensor<typename X::value_type, typename X::device_type>::uninitialized(x.shape());
  softmax(x, axis, out);
  return out;
}
/// out = x - max - log(sum(exp(x - max))) along `axis`.
template <tensor_like X, class Out>
void log_softmax(const X& x, int axis, Out&& out) {
  detail::softmax_impl(x, axis, out, true, "trident::log_softmax");
}
template <tensor_like X>
auto log_softmax(const X& x, int axis) {
  auto out = tensor<typename X::value_type, typename X::device_type>::uninitialized(x.shape());
  log_softmax(x, axis, out);
  return out;
}

}  // namespace trident
