#pragma once
/// @file parallel/strategy.hpp
/// Parallel strategies. One process, one model replica: `single`.

#include "../core/concepts.hpp"

namespace trident {

/// Everything on one process: no communication, nothing sharded.
struct single {
  static constexpr const char* name = "single";
  static constexpr bool distributed = false;
  static constexpr int zero_stage = 0;
};

static_assert(parallel_strategy<single>);

}  // namespace trident
