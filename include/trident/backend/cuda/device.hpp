#pragma once
/// @file backend/cuda/device.hpp
/// The cuda device: memory from the stream-ordered allocator (cudaMallocAsync on the current
/// stream, from the device's default pool, which api.hpp configures to cache freed memory),
/// falling back to cudaMalloc on devices without memory pools. Host code compiled by g++ may
/// include this header; the kernels (kernels<cuda>) need nvcc and trident/cuda.hpp.

#include <cstddef>
#include <string>

#include "../../config.hpp"
#include "../../core/concepts.hpp"
#include "../../core/error.hpp"
#include "api.hpp"

namespace trident {

/// One CUDA GPU: the calling thread's current device, work enqueued on its current stream
/// (see api.hpp). Pointers are device pointers: not host accessible.
struct cuda {
  static constexpr const char* name = "cuda";
  static constexpr bool host_accessible = false;

  /// `bytes` of uninitialised device memory (at least 256-byte aligned), usable in stream
  /// order on the current stream. Throws device_error naming the size when it cannot.
  static void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    const int device = cuda_current_device();
    const auto& info = cuda_detail::info_of(device);
    void* p = nullptr;
    const cudaError_t e = info.memory_pools ? cudaMallocAsync(&p, bytes, cuda_current_stream()) : cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      throw device_error("trident::cuda::allocate: cannot allocate " + std::to_string(bytes) + " bytes on CUDA device " +
                         std::to_string(device) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
    }
    return p;
  }

  /// Returns memory from allocate(), in stream order on the current stream (the memory is
  /// reused only after the work queued so far on that stream). Never throws; errors (such as
  /// a runtime already shut down at process exit) are swallowed.
  static void deallocate(void* p, std::size_t /*bytes*/) noexcept {
    if (!p) return;
    int device = 0;
    bool pools = false;
    if (cudaGetDevice(&device) == cudaSuccess) {
      try {
        pools = cuda_detail::info_of(device).memory_pools;
      } catch (...) {
        pools = false;
      }
    }
    const cudaError_t e = pools ? cudaFreeAsync(p, cuda_current_stream()) : cudaFree(p);
    if (e != cudaSuccess) (void)cudaGetLastError();
  }

  /// Waits for the work queued on the current stream; throws device_error if any of it failed.
  static void synchronize() { TRIDENT_CUDA_CHECK(cudaStreamSynchronize(cuda_current_stream())); }
};

static_assert(device_policy<cuda>);

/// Page-locked host memory for staging host<->device copies (copies from it can overlap
/// with computation). Move-only; freed with cudaFreeHost.
/// @tparam T a trivially copyable element type
template <class T>
class cuda_pinned_buffer {
 public:
  cuda_pinned_buffer() = default;
  explicit cuda_pinned_buffer(std::size_t count) : count_(count) {
    if (count == 0) return;
    void* p = nullptr;
    TRIDENT_CUDA_CHECK(cudaMallocHost(&p, count * sizeof(T)));
    data_ = static_cast<T*>(p);
  }
  cuda_pinned_buffer(cuda_pinned_buffer&& o) noexcept : data_(o.data_), count_(o.count_) {
    o.data_ = nullptr;
    o.count_ = 0;
  }
  cuda_pinned_buffer& operator=(cuda_pinned_buffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = o.data_;
      count_ = o.count_;
      o.data_ = nullptr;
      o.count_ = 0;
    }
    return *this;
  }
  cuda_pinned_buffer(const cuda_pinned_buffer&) = delete;
  cuda_pinned_buffer& operator=(const cuda_pinned_buffer&) = delete;
  ~cuda_pinned_buffer() { release(); }

  T* data() noexcept { return data_; }
  const T* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return count_; }
  T& operator[](std::size_t i) noexcept { return data_[i]; }
  const T& operator[](std::size_t i) const noexcept { return data_[i]; }

 private:
  void release() noexcept {
    if (data_ && cudaFreeHost(data_) != cudaSuccess) (void)cudaGetLastError();
    data_ = nullptr;
  }
  T* data_ = nullptr;
  std::size_t count_ = 0;
};

}  // namespace trident
