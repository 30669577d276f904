#pragma once
/// @file bits.hpp
/// Bit-level access to float, usable in constant expressions and in CUDA device code.

#include <bit>
#include <cstdint>

#include "../config.hpp"

namespace trident::detail {

TRIDENT_HD constexpr std::uint32_t float_to_bits(float f) noexcept {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return std::bit_cast<std::uint32_t>(f);
#endif
}

TRIDENT_HD constexpr float bits_to_float(std::uint32_t u) noexcept {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return std::bit_cast<float>(u);
#endif
}

}  // namespace trident::detail
