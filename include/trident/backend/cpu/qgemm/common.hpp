#pragma once
/// @file backend/cpu/qgemm/common.hpp
/// What every int8 GEMM path shares: the packed layout of the int8 weights, the choice of
/// kernel (what the CPU can do, and a scoped override for tests and benchmarks), the fused
/// epilogue that turns an int32 tile into its final form, and an aligned byte buffer.
///
/// Packed layout of W (n x k int8, row j = output channel j). W is the B operand of
/// C = A · Wᵀ, stored as the AVX512-VNNI / AMX-INT8 instructions want it: four consecutive k
/// of one column in one 32-bit word.
///
///   columns in panels of 16 (qpanel_cols); k padded with zeros to kp = a multiple of 64;
///   panel p holds kp / 4 rows of 64 bytes; row q holds, for its 16 columns in order, the
///   four values k = 4q .. 4q+3.  Element (j, k) lies at
///       (j / 16) * 16 * kp  +  (k / 4) * 64  +  (j % 16) * 4  +  k % 4.
///
/// One row is one zmm operand of VPDPBUSD (16 columns x 4 k); sixteen consecutive rows, 1 KiB
/// contiguous, are one B tile of TDPBUSD (64 k x 16 columns). Padding (columns beyond n, k
/// beyond the true k) is zero, so the kernels may run over it without changing the sums.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include "../../../config.hpp"
#include "../../../core/activation.hpp"
#include "../../../core/error.hpp"

#if defined(TRIDENT_HAS_AVX512) && (defined(__x86_64__) || defined(__i386__))
#include <cpuid.h>
#endif

namespace trident::cpu_kernels::qgemm {

/// Columns per packed panel (one zmm of int32 lanes, one AMX tile's columns).
inline constexpr index_t qpanel_cols = 16;
/// k is padded to a multiple of this (the depth of one AMX-INT8 tile).
inline constexpr index_t qk_block = 64;

constexpr index_t ceil_div(index_t a, index_t b) noexcept { return (a + b - 1) / b; }
constexpr index_t round_up(index_t a, index_t b) noexcept { return ceil_div(a, b) * b; }

/// Byte offset of element (j, k) in the packed layout of a matrix with padded depth kp.
constexpr index_t packed_offset(index_t j, index_t k, index_t kp) noexcept {
  return (j / qpanel_cols) * qpanel_cols * kp + (k / 4) * 64 + (j % qpanel_cols) * 4 + (k % 4);
}

/// Largest k for which every int32 sum of u8 x s8 products is exact: 255 * 128 * k < 2^31.
inline constexpr index_t max_exact_k = (index_t(1) << 31) / (255 * 128);

/// The int8 GEMM implementations.
enum class kernel {
  automatic,    ///< the fastest this CPU has for the shape
  scalar,       ///< portable C++, always available (the reference)
  avx512_vnni,  ///< VPDPBUSD, 16 columns per zmm
  amx_int8,     ///< TDPBUSD tiles (Sapphire Rapids and later)
};

constexpr const char* to_string(kernel k) noexcept {
  switch (k) {
    case kernel::automatic: return "automatic";
    case kernel::scalar: return "scalar";
    case kernel::avx512_vnni: return "avx512_vnni";
    case kernel::amx_int8: return "amx_int8";
  }
  return "?";
}

namespace detail {

/// Whether the CPU executes AVX512-VNNI (cpuid leaf 7: ecx bit 11), asked once.
inline bool cpu_has_vnni() noexcept {
#if defined(TRIDENT_HAS_AVX512) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return false;
    return ((ecx >> 11) & 1u) != 0;
  }();
  return ok;
#else
  return false;
#endif
}

/// The calling thread's kernel override (kernel::automatic: none).
inline kernel& kernel_override() noexcept {
  thread_local kernel k = kernel::automatic;
  return k;
}

}  // namespace detail

/// What happens to each finished int32 sum s = Σ_k a[i,k]·w[j,k] of C (i, j absolute):
///   out_i32 != nullptr:  out_i32[i * ld + j] = s
///   otherwise:           out_f32[i * ld + j] = act(a_scale_i · w_scale_j · (s − a_zero_i · row_sum_j) + bias_j)
/// a_scale / a_zero hold one value per row when per_row, else one value.
struct store_params {
  std::int32_t* out_i32 = nullptr;
  float* out_f32 = nullptr;
  index_t ld = 0;
  const float* a_scale = nullptr;
  const std::int32_t* a_zero = nullptr;  ///< nullptr: 0
  bool per_row = false;
  const float* w_scale = nullptr;
  const std::int32_t* row_sum = nullptr;
  const float* bias = nullptr;
  activation act = activation::none;
};

/// Applies the epilogue to one value (the scalar path, and the edges of the SIMD ones).
inline void store_value(const store_params& sp, index_t i, index_t j, std::int32_t s) noexcept {
  if (sp.out_i32 != nullptr) {
    sp.out_i32[i * sp.ld + j] = s;
    return;
  }
  const index_t r = sp.per_row ? i : 0;
  const std::int64_t z = sp.a_zero != nullptr ? sp.a_zero[r] : 0;
  // Exact in int64; the true value fits int32 whenever k <= max_exact_k.
  const auto d = static_cast<std::int32_t>(static_cast<std::int64_t>(s) - z * sp.row_sum[j]);
  float y = static_cast<float>(d) * (sp.a_scale[r] * sp.w_scale[j]);
  if (sp.bias != nullptr) y += sp.bias[j];
  if (sp.act == activation::relu) y = y > 0.0f ? y : 0.0f;
  sp.out_f32[i * sp.ld + j] = y;
}

/// A 64-byte-aligned, zero-initialised, copyable byte buffer (the packed weights).
class aligned_bytes {
 public:
  aligned_bytes() = default;
  explicit aligned_bytes(std::size_t n) : size_(n) {
    if (n == 0) return;
    data_ = static_cast<std::uint8_t*>(std::aligned_alloc(64, round_up(static_cast<index_t>(n), 64)));
    if (data_ == nullptr) throw std::bad_alloc();
    std::memset(data_, 0, n);
  }
  aligned_bytes(const aligned_bytes& o) : aligned_bytes(o.size_) {
    if (size_ != 0) std::memcpy(data_, o.data_, size_);
  }
  aligned_bytes(aligned_bytes&& o) noexcept : data_(o.data_), size_(o.size_) {
    o.data_ = nullptr;
    o.size_ = 0;
  }
  aligned_bytes& operator=(aligned_bytes o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    return *this;
  }
  ~aligned_bytes() { std::free(data_); }

  std::uint8_t* data() noexcept { return data_; }
  const std::uint8_t* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }

 private:
  std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace trident::cpu_kernels::qgemm
