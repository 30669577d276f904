#pragma once
/// @file ops/fill.hpp
/// Filling tensors: constants, and the counter-based random streams of core/rng.hpp.

#include "../core/rng.hpp"
#include "../core/tensor.hpp"
#include "detail.hpp"

namespace trident {

/// Every element of out = value.
template <class Out>
void fill(Out&& out, double value) {
  auto o = detail::out_view(out);
  kernels<typename decltype(o)::device_type>::fill(o, value);
}

/// Uniform samples in [low, high) from the generator's next blocks.
template <class Out>
void uniform(Out&& out, generator& gen, double low = 0.0, double high = 1.0) {
  auto o = detail::out_view(out);
  kernels<typename decltype(o)::device_type>::random(o, gen.next(static_cast<std::uint64_t>(o.numel()), distribution::uniform, low, high));
}

/// Normal samples N(mean, stddev^2) from the generator's next blocks.
template <class Out>
void normal(Out&& out, generator& gen, double mean = 0.0, double stddev = 1.0) {
  auto o = detail::out_view(out);
  kernels<typename decltype(o)::device_type>::random(o, gen.next(static_cast<std::uint64_t>(o.numel()), distribution::normal, mean, stddev));
}

}  // namespace trident
