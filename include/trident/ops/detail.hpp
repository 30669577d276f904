#pragma once
/// @file ops/detail.hpp
/// Argument plumbing shared by the op front-ends: views of tensor-like arguments, device
/// agreement, and writable-output checks.

#include <string>
#include <tuple>
#include <type_traits>

#include "../core/tensor.hpp"

namespace trident::detail {

/// The (mutable) view of an output argument; fails to compile for read-only outputs.
template <class X>
auto out_view(X&& x) {
  auto v = x.view();
  static_assert(!std::is_const_v<typename decltype(v)::element_type>,
                "trident: an output argument must be writable (a non-const tensor or a tensor_view<T> with non-const T)");
  return v;
}

template <class... X>
inline constexpr bool same_device_v = (std::is_same_v<typename std::remove_cvref_t<X>::device_type,
                                                      typename std::remove_cvref_t<std::tuple_element_t<0, std::tuple<X...>>>::device_type> &&
                                       ...);

/// Throws shape_error "<what>: expected <shape> but got <shape>".
inline void expect_shape(const shape& expected, const shape& got, const char* what, const char* role) {
  if (!(expected == got)) {
    throw shape_error(std::string(what) + ": " + role + " has shape " + got.str() + " but " + expected.str() +
                      " is required");
  }
}

}  // namespace trident::detail
