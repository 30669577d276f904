#pragma once
/// @file nn/arena.hpp
/// Activation memory for training steps: a bump allocator over device memory, reset at the
/// start of every step. The first step discovers how much a step needs (growing by extra
/// blocks); reset() then replaces the blocks by one block of the peak size, so every later
/// step allocates nothing from the system.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../core/concepts.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"

namespace trident::nn {

/// A bump allocator over blocks of `Device` memory, 64-byte aligned allocations.
/// @tparam Device where the memory lives
template <class Device>
class arena {
 public:
  static constexpr std::size_t alignment = 64;

  arena() = default;
  explicit arena(std::size_t initial_bytes) { add_block(initial_bytes); }
  arena(const arena&) = delete;
  arena& operator=(const arena&) = delete;
  arena(arena&& o) noexcept : blocks_(std::move(o.blocks_)), used_(o.used_), peak_(o.peak_) { o.blocks_.clear(); }
  ~arena() { release(); }

  /// `bytes` of uninitialised memory, valid until the next reset().
  void* allocate_bytes(std::size_t bytes) {
    bytes = (bytes + alignment - 1) / alignment * alignment;
    if (blocks_.empty() || blocks_.back().used + bytes > blocks_.back().size) {
      add_block(std::max<std::size_t>(bytes, blocks_.empty() ? std::size_t{1} << 20 : blocks_.back().size * 2));
    }
    block& b = blocks_.back();
    void* p = static_cast<unsigned char*>(b.data) + b.used;
    b.used += bytes;
    used_ += bytes;
    peak_ = std::max(peak_, used_);
    return p;
  }

  /// An uninitialised tensor view of shape `s`, valid until the next reset().
  template <class T>
  tensor_view<T, Device> allocate(const shape& s) {
    return tensor_view<T, Device>(static_cast<T*>(allocate_bytes(static_cast<std::size_t>(s.numel()) * sizeof(T))), s);
  }

  /// Frees everything allocated since the last reset (the memory stays with the arena). When
  /// the step needed more than one block, the blocks are merged into one of the peak size.
  void reset() {
    if (blocks_.size() > 1) {
      release();
      add_block(peak_);
    }
    for (auto& b : blocks_) b.used = 0;
    used_ = 0;
  }

  /// Bytes in use now, the most ever in use, and the bytes held from the device.
  std::size_t used_bytes() const noexcept { return used_; }
  std::size_t peak_bytes() const noexcept { return peak_; }
  std::size_t capacity_bytes() const noexcept {
    std::size_t c = 0;
    for (const auto& b : blocks_) c += b.size;
    return c;
  }

 private:
  struct block {
    void* data = nullptr;
    std::size_t size = 0;
    std::size_t used = 0;
  };
  void add_block(std::size_t bytes) {
    bytes = (bytes + alignment - 1) / alignment * alignment;
    blocks_.push_back(block{Device::allocate(bytes), bytes, 0});
  }
  void release() noexcept {
    for (auto& b : blocks_) Device::deallocate(b.data, b.size);
    blocks_.clear();
  }

  std::vector<block> blocks_;
  std::size_t used_ = 0;
  std::size_t peak_ = 0;
};

}  // namespace trident::nn
