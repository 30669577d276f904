#pragma once
/// @file core/concepts.hpp
/// The device and parallel-strategy concepts (the precision one is in precision/policy.hpp).

#include <concepts>
#include <cstddef>

#include "../fwd.hpp"

namespace trident {

/// A device: where memory lives and kernels run. A plain type with static members, as a
/// Kokkos execution space is; the operations on its memory come from kernels<Device>.
///   - `name`: for messages;
///   - `host_accessible`: whether host code may dereference its pointers;
///   - `allocate(bytes)` / `deallocate(p, bytes)`: raw memory (host: 64-byte aligned);
///   - `synchronize()`: waits for the device's queued work.
template <class D>
concept device_policy = requires(std::size_t bytes, void* p) {
  { D::name } -> std::convertible_to<const char*>;
  { D::host_accessible } -> std::convertible_to<bool>;
  { D::allocate(bytes) } -> std::same_as<void*>;
  D::deallocate(p, bytes);
  D::synchronize();
};

/// How training is spread over processes. The single-process strategy is `single`; data
/// parallel and ZeRO stages 1-3 satisfy the same concept with `distributed == true` and
/// their stage (0 for plain data parallel).
///   - `name`: for messages;
///   - `distributed`: whether it needs a communicator of several ranks;
///   - `zero_stage`: 0 (nothing sharded), 1 (optimizer state), 2 (+ gradients), 3 (+ parameters).
template <class S>
concept parallel_strategy = requires {
  { S::name } -> std::convertible_to<const char*>;
  { S::distributed } -> std::convertible_to<bool>;
  { S::zero_stage } -> std::convertible_to<int>;
} && (S::zero_stage >= 0 && S::zero_stage <= 3);

}  // namespace trident
