#pragma once
/// @file ops/transfer.hpp
/// Copies: between layouts (contiguous), between element types, and between devices
/// (host <-> device), plus conversion from and to std::vector for host code and tests.

#include <initializer_list>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/tensor.hpp"
#include "detail.hpp"
#include "functors.hpp"

namespace trident {

/// out = x, element by element (same shape, any strides; converts the element type).
/// Both on the same device; use to<Device>() between devices.
template <tensor_like X, class Out>
void copy(const X& x, Out&& out) {
  static_assert(detail::same_device_v<X, Out>, "trident::copy: operands live on different devices; use trident::to<Device>(x)");
  auto o = detail::out_view(out);
  const auto in = cview(x);
  detail::expect_shape(in.shape(), o.shape(), "trident::copy", "the destination");
  using D = typename X::device_type;
  using To = typename decltype(o)::value_type;
  if constexpr (std::is_same_v<To, typename X::value_type>) {
    if (o.is_contiguous() && in.is_contiguous()) {  // same bytes: the device's memcpy
      kernels<D>::copy_within(o.data(), in.data(), static_cast<std::size_t>(o.numel()) * sizeof(To));
      return;
    }
  }
  kernels<D>::map(ops::identity{}, o, in);
}

/// A contiguous copy of x on its device.
template <tensor_like X>
auto contiguous(const X& x) {
  auto out = tensor<typename X::value_type, typename X::device_type>::uninitialized(x.shape());
  copy(x, out);
  return out;
}

/// A contiguous copy of x with element type T.
template <class T, tensor_like X>
auto cast(const X& x) {
  auto out = tensor<T, typename X::device_type>::uninitialized(x.shape());
  copy(x, out);
  return out;
}

/// A contiguous copy of x in the memory of device `To`.
template <class To, tensor_like X>
auto to(const X& x) {
  using T = typename X::value_type;
  using From = typename X::device_type;
  if constexpr (std::is_same_v<To, From>) {
    return contiguous(x);
  } else {
    const auto v = cview(x);
    tensor<T, From> staged;
    const T* src = v.data();
    if (!v.is_contiguous()) {
      staged = contiguous(v);
      src = staged.data();
    }
    auto out = tensor<T, To>::uninitialized(v.shape());
    const std::size_t bytes = static_cast<std::size_t>(v.numel()) * sizeof(T);
    if constexpr (From::host_accessible) {
      kernels<To>::copy_from_host(out.data(), src, bytes);
    } else if constexpr (To::host_accessible) {
      kernels<From>::copy_to_host(out.data(), src, bytes);
    } else {
      std::vector<T> host(static_cast<std::size_t>(v.numel()));
      kernels<From>::copy_to_host(host.data(), src, bytes);
      kernels<To>::copy_from_host(out.data(), host.data(), bytes);
    }
    return out;
  }
}

/// The elements of x in row-major order, on the host.
template <tensor_like X>
std::vector<typename X::value_type> to_vector(const X& x) {
  using T = typename X::value_type;
  using D = typename X::device_type;
  const auto v = cview(x);
  std::vector<T> out(static_cast<std::size_t>(v.numel()));
  if (out.empty()) return out;
  tensor<T, D> staged;
  const T* src = v.data();
  if (!v.is_contiguous()) {
    staged = contiguous(v);
    src = staged.data();
  }
  kernels<D>::copy_to_host(out.data(), src, out.size() * sizeof(T));
  return out;
}

/// A tensor of shape s on device D holding `values` (row-major); the count must match.
template <class T, class D = cpu>
tensor<T, D> from_vector(const shape& s, const std::vector<T>& values) {
  if (static_cast<index_t>(values.size()) != s.numel()) {
    throw shape_error("trident::from_vector: " + std::to_string(values.size()) + " values for shape " + s.str() + " (" +
                      std::to_string(s.numel()) + " elements)");
  }
  auto out = tensor<T, D>::uninitialized(s);
  kernels<D>::copy_from_host(out.data(), values.data(), values.size() * sizeof(T));
  return out;
}

}  // namespace trident
