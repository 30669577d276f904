#pragma once
/// @file backend/cuda/api.hpp
/// The host-side plumbing of the CUDA backend, compilable by g++ alone (with the CUDA include
/// directory on the path): error checks that throw trident::device_error, device discovery
/// that never throws, the current stream, cached per-device facts, and the per-device
/// cuBLASLt handle with its per-stream workspaces. Kernels live in the .cuh files next to it.
///
/// Design notes
/// - Streams: every trident operation on the cuda device is enqueued on the calling thread's
///   *current stream* (cuda_current_stream(); the legacy default stream unless set with
///   cuda_set_stream() or a cuda_stream_guard). Memory comes from the stream-ordered
///   allocator on that stream, so a tensor must be destroyed while the stream it was used on
///   is current (or after synchronising), and with its device current.
/// - Errors: every runtime and cuBLASLt call is checked; a failure throws device_error naming
///   the call, file:line, the error's name and its description. Deallocation never throws.
/// - Lifetime: handles and workspaces are created on first use and deliberately kept until
///   the process exits (destroying them from static destructors races the CUDA runtime's own
///   teardown).

#include <cuda_runtime_api.h>
#include <cublasLt.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "../../config.hpp"
#include "../../core/error.hpp"

namespace trident {

/// Process-wide math settings of the CUDA backend.
namespace cuda_settings {
/// Let fp32 GEMMs use TF32 tensor cores (inputs rounded to 10 mantissa bits, fp32
/// accumulation): much faster, about 1e-3 relative error. Off by default, as in PyTorch.
inline std::atomic<bool> allow_tf32{false};
/// Let GEMMs with activation::gelu_tanh use cuBLASLt's fused GELU epilogue (one pass over C
/// instead of two). Its tanh is cuBLASLt's own, so results may differ from trident's
/// gelu_tanh by a few ulps; false applies trident's gelu_tanh after the product.
inline std::atomic<bool> fused_gelu{true};
}  // namespace cuda_settings

namespace cuda_detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t e, const char* call, const char* file, int line) {
  (void)cudaGetLastError();  // clear a non-sticky error so that it is not reported twice
  throw device_error(std::string("trident: CUDA call `") + call + "` failed at " + file + ":" + std::to_string(line) + ": " +
                     cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

inline void check_cuda(cudaError_t e, const char* call, const char* file, int line) {
  if (e != cudaSuccess) throw_cuda_error(e, call, file, line);
}

[[noreturn]] inline void throw_cublas_error(cublasStatus_t s, const char* call, const char* file, int line) {
  throw device_error(std::string("trident: cuBLASLt call `") + call + "` failed at " + file + ":" + std::to_string(line) +
                     ": " + cublasLtGetStatusName(s) + " (" + cublasLtGetStatusString(s) + ")");
}

inline void check_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS) throw_cublas_error(s, call, file, line);
}

/// Checks for an error from the kernel launch just made (bad configuration, no kernel image
/// for this GPU, or a sticky error from earlier work), naming the kernel.
inline void check_launch(const char* kernel, const char* file, int line) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    throw device_error(std::string("trident: launch of CUDA kernel ") + kernel + " failed at " + file + ":" +
                       std::to_string(line) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
  }
}

}  // namespace cuda_detail

}  // namespace trident

// The preprocessor is the only way to capture the failing call's text and its file:line.
/// Throws trident::device_error if the CUDA runtime call fails.
#define TRIDENT_CUDA_CHECK(...) ::trident::cuda_detail::check_cuda((__VA_ARGS__), #__VA_ARGS__, __FILE__, __LINE__)
/// Throws trident::device_error if the cuBLASLt call fails.
#define TRIDENT_CUBLAS_CHECK(...) ::trident::cuda_detail::check_cublas((__VA_ARGS__), #__VA_ARGS__, __FILE__, __LINE__)
/// Throws trident::device_error if the kernel launch just made failed.
#define TRIDENT_CUDA_CHECK_LAUNCH(kernel_name) ::trident::cuda_detail::check_launch((kernel_name), __FILE__, __LINE__)

namespace trident {

/// What cudaGetDeviceCount said: the count, and why it is 0 when it is.
struct cuda_probe_result {
  int count = 0;
  cudaError_t status = cudaSuccess;
  /// The runtime's description of `status` ("no error" when there are devices).
  const char* message() const noexcept { return cudaGetErrorString(status); }
};

/// Asks the runtime how many devices there are. Never throws: no driver, no device or a
/// driver too old for this runtime all give count 0 with the reason in `status`.
inline cuda_probe_result cuda_probe() noexcept {
  cuda_probe_result r;
  int n = 0;
  r.status = cudaGetDeviceCount(&n);
  if (r.status != cudaSuccess) {
    (void)cudaGetLastError();  // leave no error behind for the next check
    return r;
  }
  r.count = n;
  return r;
}

/// Number of CUDA devices usable by this process; 0 (not an exception) without driver or device.
inline int cuda_device_count() noexcept { return cuda_probe().count; }

/// The calling thread's current device (cudaGetDevice).
inline int cuda_current_device() {
  int d = 0;
  TRIDENT_CUDA_CHECK(cudaGetDevice(&d));
  return d;
}

namespace cuda_detail {
inline cudaStream_t& current_stream_slot() noexcept {
  thread_local cudaStream_t stream = nullptr;
  return stream;
}
}  // namespace cuda_detail

/// The stream this thread's trident operations are enqueued on (nullptr: the default stream).
inline cudaStream_t cuda_current_stream() noexcept { return cuda_detail::current_stream_slot(); }

/// Makes `s` this thread's current stream. It must belong to the current device.
inline void cuda_set_stream(cudaStream_t s) noexcept { cuda_detail::current_stream_slot() = s; }

/// Makes a stream current for a scope, restoring the previous one on exit.
class cuda_stream_guard {
 public:
  explicit cuda_stream_guard(cudaStream_t s) noexcept : previous_(cuda_current_stream()) { cuda_set_stream(s); }
  ~cuda_stream_guard() { cuda_set_stream(previous_); }
  cuda_stream_guard(const cuda_stream_guard&) = delete;
  cuda_stream_guard& operator=(const cuda_stream_guard&) = delete;

 private:
  cudaStream_t previous_;
};

namespace cuda_detail {

/// Facts about one device, read once.
struct device_info {
  int sm_count = 1;
  int cc_major = 0;
  int cc_minor = 0;
  bool memory_pools = false;  ///< stream-ordered allocation (cudaMallocAsync) available
};

inline constexpr int max_devices = 64;

/// The facts of device `device` (0 <= device < max_devices), read on first use. Also
/// configures the device's default memory pool to keep freed memory cached (release
/// threshold = unlimited), so that stream-ordered allocation is as cheap as a caching allocator.
inline const device_info& info_of(int device) {
  if (device < 0 || device >= max_devices) {
    throw device_error("trident: CUDA device " + std::to_string(device) + " is out of the supported range [0, " +
                       std::to_string(max_devices) + ")");
  }
  struct slot {
    std::once_flag once;
    device_info info;
  };
  static slot slots[max_devices];
  slot& s = slots[device];
  std::call_once(s.once, [&] {
    device_info i;
    TRIDENT_CUDA_CHECK(cudaDeviceGetAttribute(&i.sm_count, cudaDevAttrMultiProcessorCount, device));
    TRIDENT_CUDA_CHECK(cudaDeviceGetAttribute(&i.cc_major, cudaDevAttrComputeCapabilityMajor, device));
    TRIDENT_CUDA_CHECK(cudaDeviceGetAttribute(&i.cc_minor, cudaDevAttrComputeCapabilityMinor, device));
    int pools = 0;
    TRIDENT_CUDA_CHECK(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device));
    i.memory_pools = pools != 0;
    if (i.memory_pools) {
      cudaMemPool_t pool = nullptr;
      TRIDENT_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
      std::uint64_t threshold = UINT64_MAX;
      TRIDENT_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
    }
    if (i.sm_count < 1) i.sm_count = 1;
    s.info = i;
  });  // an exception leaves the flag unset: the next call retries
  return s.info;
}

/// The facts of the current device.
inline const device_info& current_info() { return info_of(cuda_current_device()); }

/// One GEMM algorithm chosen by cuBLASLt's heuristic for a problem key.
struct lt_algo {
  cublasLtMatmulAlgo_t algo{};
  std::size_t workspace = 0;
  bool available = true;  ///< false: the heuristic found none (remembered so as not to ask again)
};

/// cuBLASLt state of one device: the handle, a workspace per stream that ran a GEMM (two
/// streams never share one, so concurrent GEMMs cannot race on it), and the heuristic's
/// choices per problem.
struct lt_device_state {
  std::mutex mutex;
  cublasLtHandle_t handle = nullptr;
  std::size_t workspace_bytes = 0;
  std::unordered_map<unsigned long long, void*> workspaces;  ///< by cudaStreamGetId
  std::unordered_map<std::string, lt_algo> algos;            ///< by the bytes of a problem key
};

/// What a GEMM needs from the device state.
struct lt_context {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
  lt_device_state* state = nullptr;
};

/// The registry of per-device cuBLASLt states (kept until exit, see the file notes).
struct lt_registry {
  std::mutex mutex;
  lt_device_state* states[max_devices] = {};
};
inline lt_registry& registry() {
  static lt_registry r;
  return r;
}

/// The cuBLASLt state of `device`, created on first use.
inline lt_device_state& lt_state_of(int device) {
  const device_info& info = info_of(device);  // also validates the index
  lt_registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  if (!r.states[device]) {
    auto fresh = std::make_unique<lt_device_state>();
    TRIDENT_CUBLAS_CHECK(cublasLtCreate(&fresh->handle));
    // cuBLAS recommends 32 MiB of workspace on Hopper and newer, 4 MiB before.
    fresh->workspace_bytes = info.cc_major >= 9 ? (std::size_t{32} << 20) : (std::size_t{4} << 20);
    r.states[device] = fresh.release();
  }
  return *r.states[device];
}

/// The cuBLASLt handle of the current device and the workspace of `stream`, created on first
/// use. Streams are told apart by cudaStreamGetId (unique for the life of the process, and
/// distinct for each thread's per-thread default stream), so a workspace is never shared by
/// two streams. Not usable while `stream` is being captured into a CUDA graph.
inline lt_context cublaslt_context(cudaStream_t stream) {
  lt_device_state& st = lt_state_of(cuda_current_device());
  unsigned long long id = 0;
  TRIDENT_CUDA_CHECK(cudaStreamGetId(stream, &id));
  std::lock_guard<std::mutex> lock(st.mutex);
  void*& ws = st.workspaces[id];
  if (!ws) {
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, st.workspace_bytes);
    if (e != cudaSuccess) {
      st.workspaces.erase(id);
      cuda_detail::throw_cuda_error(e, "cudaMalloc(cuBLASLt workspace)", __FILE__, __LINE__);
    }
    ws = p;
  }
  return {st.handle, ws, st.workspace_bytes, &st};
}

/// Looks up a cached heuristic choice; `key` holds the bytes of a trivially copyable key.
inline bool find_algo(lt_device_state& st, const std::string& key, lt_algo& out) {
  std::lock_guard<std::mutex> lock(st.mutex);
  const auto it = st.algos.find(key);
  if (it == st.algos.end()) return false;
  out = it->second;
  return true;
}

/// Remembers a heuristic choice (the cache is bounded: it is cleared when it grows past 4096
/// problems, which only programs with unboundedly many shapes reach).
inline void remember_algo(lt_device_state& st, const std::string& key, const lt_algo& a) {
  std::lock_guard<std::mutex> lock(st.mutex);
  if (st.algos.size() >= 4096) st.algos.clear();
  st.algos[key] = a;
}

}  // namespace cuda_detail

/// Frees what trident keeps for `stream` on the current device (its cuBLASLt workspace, 4-32
/// MiB), after waiting for the stream. Programs that create and destroy many streams call it
/// before cudaStreamDestroy; the memory is otherwise kept until the process exits.
inline void cuda_release_stream(cudaStream_t stream) {
  const int device = cuda_current_device();
  if (device < 0 || device >= cuda_detail::max_devices) return;
  cuda_detail::lt_registry& r = cuda_detail::registry();
  cuda_detail::lt_device_state* st = nullptr;
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    st = r.states[device];
  }
  if (!st) return;
  unsigned long long id = 0;
  TRIDENT_CUDA_CHECK(cudaStreamGetId(stream, &id));
  TRIDENT_CUDA_CHECK(cudaStreamSynchronize(stream));
  void* ws = nullptr;
  {
    std::lock_guard<std::mutex> lock(st->mutex);
    const auto it = st->workspaces.find(id);
    if (it == st->workspaces.end()) return;
    ws = it->second;
    st->workspaces.erase(it);
  }
  TRIDENT_CUDA_CHECK(cudaFree(ws));
}

}  // namespace trident
