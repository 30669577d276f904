#pragma once
/// @file backend/cpu/device.hpp
/// The host device: 64-byte aligned memory, kernels threaded with OpenMP.

#include <cstddef>
#include <new>

#include "../../config.hpp"
#include "../../core/concepts.hpp"

namespace trident {

/// The CPU device.
struct cpu {
  static constexpr const char* name = "cpu";
  static constexpr bool host_accessible = true;

  /// `bytes` of uninitialised memory aligned to host_alignment (64). Throws std::bad_alloc.
  static void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    return ::operator new(bytes, std::align_val_t{host_alignment});
  }
  static void deallocate(void* p, std::size_t /*bytes*/) noexcept {
    if (p) ::operator delete(p, std::align_val_t{host_alignment});
  }
  /// Host kernels are synchronous.
  static void synchronize() noexcept {}
};

static_assert(device_policy<cpu>);

}  // namespace trident
