#pragma once
/// @file precision/convert.hpp
/// Bulk conversions between float and the 2-byte types, one implementation per instruction
/// set ("path"), chosen at compile time from the target ISA:
///
/// | path              | float -> half  | float -> bfloat16             | 16-bit -> float  |
/// |-------------------|----------------|-------------------------------|------------------|
/// | `scalar_path`     | reference      | reference                     | reference        |
/// | `avx2_path`       | F16C, 8 wide   | integer rounding, 8 wide      | F16C / shift     |
/// | `avx512_path`     | AVX-512, 16    | integer rounding, 16 wide     | AVX-512 / shift  |
/// | `avx512bf16_path` | as avx512      | VCVTNEPS2BF16 (hardware)      | as avx512        |
///
/// Every path agrees with the scalar reference on all 2^32 floats, with one documented
/// exception: VCVTNEPS2BF16 treats subnormal inputs as zero (DAZ), so avx512bf16_path maps
/// a subnormal float to a zero of the same sign. The default (`convert`) therefore uses the
/// exact integer path for bfloat16; the hardware path is there for callers that prefer it.

#include <cstddef>
#include <cstring>

#include "../config.hpp"
#include "bfloat16.hpp"
#include "half.hpp"

#if defined(TRIDENT_HAS_AVX2) || defined(TRIDENT_HAS_AVX512)
#include "../backend/cpu/intrinsics.hpp"
#endif

namespace trident::simd {

/// Portable reference loops.
struct scalar_path {
  static constexpr const char* name = "scalar";
  static constexpr bool available = true;
  static constexpr bool exact_bf16 = true;
};
/// AVX2 + F16C, 8 lanes.
struct avx2_path {
  static constexpr const char* name = "avx2";
  static constexpr bool available = isa::avx2;
  static constexpr bool exact_bf16 = true;
};
/// AVX-512 (F, BW, VL, DQ), 16 lanes.
struct avx512_path {
  static constexpr const char* name = "avx512";
  static constexpr bool available = isa::avx512;
  static constexpr bool exact_bf16 = true;
};
/// AVX-512 with the AVX512-BF16 conversion instruction (flushes subnormal inputs).
struct avx512bf16_path {
  static constexpr const char* name = "avx512bf16";
  static constexpr bool available = isa::avx512_bf16;
  static constexpr bool exact_bf16 = false;
};

/// The fastest exact path the target supports.
#if defined(TRIDENT_HAS_AVX512)
using default_path = avx512_path;
#elif defined(TRIDENT_HAS_AVX2)
using default_path = avx2_path;
#else
using default_path = scalar_path;
#endif

namespace detail {

inline void to_half_scalar(const float* in, half* out, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) out[i].bits = trident::detail::float_to_half_bits(in[i]);
}
inline void to_bf16_scalar(const float* in, bfloat16* out, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) out[i].bits = trident::detail::float_to_bfloat16_bits(in[i]);
}
inline void from_half_scalar(const half* in, float* out, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) out[i] = trident::detail::half_bits_to_float(in[i].bits);
}
inline void from_bf16_scalar(const bfloat16* in, float* out, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) out[i] = trident::detail::bfloat16_bits_to_float(in[i].bits);
}

#if defined(TRIDENT_HAS_AVX2)
/// Round-to-nearest-even float -> bf16 on 8 lanes with integer arithmetic; NaNs quieted.
TRIDENT_ALWAYS_INLINE __m128i bf16_round_avx2(__m256 x) noexcept {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  const __m256i r = _mm256_blendv_epi8(rounded, quiet, is_nan);
  // pack 8 x u32 (each < 2^16) to 8 x u16
  const __m128i lo = _mm256_castsi256_si128(r), hi = _mm256_extracti128_si256(r, 1);
  return _mm_packus_epi32(lo, hi);
}
#endif

#if defined(TRIDENT_HAS_AVX512)
/// Round-to-nearest-even float -> bf16 on 16 lanes with integer arithmetic; NaNs quieted.
TRIDENT_ALWAYS_INLINE __m256i bf16_round_avx512(__m512 x) noexcept {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet));
}
#endif

}  // namespace detail

// --- float -> half --------------------------------------------------------------------

/// Converts n floats to half with round-to-nearest-even, using `Path`'s instructions.
template <class Path>
inline void to_half(const float* in, half* out, std::size_t n) noexcept {
  static_assert(Path::available, "this conversion path is not available for the target ISA");
  std::size_t i = 0;
#if defined(TRIDENT_HAS_AVX512)
  if constexpr (std::is_same_v<Path, avx512_path> || std::is_same_v<Path, avx512bf16_path>) {
    for (; i + 16 <= n; i += 16) {
      const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), h);
    }
  }
#endif
#if defined(TRIDENT_HAS_AVX2)
  if constexpr (std::is_same_v<Path, avx2_path>) {
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
    }
  }
#endif
  detail::to_half_scalar(in + i, out + i, n - i);
}

/// Converts n floats to bfloat16 with round-to-nearest-even, using `Path`'s instructions.
template <class Path>
inline void to_bfloat16(const float* in, bfloat16* out, std::size_t n) noexcept {
  static_assert(Path::available, "this conversion path is not available for the target ISA");
  std::size_t i = 0;
#if defined(TRIDENT_HAS_AVX512BF16)
  if constexpr (std::is_same_v<Path, avx512bf16_path>) {
    for (; i + 16 <= n; i += 16) {
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(in + i));
      std::memcpy(out + i, &h, sizeof h);
    }
  }
#endif
#if defined(TRIDENT_HAS_AVX512)
  if constexpr (std::is_same_v<Path, avx512_path>) {
    for (; i + 16 <= n; i += 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), detail::bf16_round_avx512(_mm512_loadu_ps(in + i)));
    }
  }
#endif
#if defined(TRIDENT_HAS_AVX2)
  if constexpr (std::is_same_v<Path, avx2_path>) {
    for (; i + 8 <= n; i += 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), detail::bf16_round_avx2(_mm256_loadu_ps(in + i)));
    }
  }
#endif
  detail::to_bf16_scalar(in + i, out + i, n - i);
}

/// Widens n halves to float (exact).
template <class Path>
inline void from_half(const half* in, float* out, std::size_t n) noexcept {
  static_assert(Path::available, "this conversion path is not available for the target ISA");
  std::size_t i = 0;
#if defined(TRIDENT_HAS_AVX512)
  if constexpr (std::is_same_v<Path, avx512_path> || std::is_same_v<Path, avx512bf16_path>) {
    for (; i + 16 <= n; i += 16) {
      _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i))));
    }
  }
#endif
#if defined(TRIDENT_HAS_AVX2)
  if constexpr (std::is_same_v<Path, avx2_path>) {
    for (; i + 8 <= n; i += 8) {
      _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
    }
  }
#endif
  detail::from_half_scalar(in + i, out + i, n - i);
}

/// Widens n bfloat16s to float (exact: a 16-bit shift).
template <class Path>
inline void from_bfloat16(const bfloat16* in, float* out, std::size_t n) noexcept {
  static_assert(Path::available, "this conversion path is not available for the target ISA");
  std::size_t i = 0;
#if defined(TRIDENT_HAS_AVX512)
  if constexpr (std::is_same_v<Path, avx512_path> || std::is_same_v<Path, avx512bf16_path>) {
    for (; i + 16 <= n; i += 16) {
      const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i)));
      _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
  }
#endif
#if defined(TRIDENT_HAS_AVX2)
  if constexpr (std::is_same_v<Path, avx2_path>) {
    for (; i + 8 <= n; i += 8) {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i)));
      _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
  }
#endif
  detail::from_bf16_scalar(in + i, out + i, n - i);
}

// --- the default, exact path, by overload -----------------------------------------------

inline void convert(const float* in, half* out, std::size_t n) noexcept { to_half<default_path>(in, out, n); }
inline void convert(const float* in, bfloat16* out, std::size_t n) noexcept { to_bfloat16<default_path>(in, out, n); }
inline void convert(const half* in, float* out, std::size_t n) noexcept { from_half<default_path>(in, out, n); }
inline void convert(const bfloat16* in, float* out, std::size_t n) noexcept { from_bfloat16<default_path>(in, out, n); }
inline void convert(const float* in, float* out, std::size_t n) noexcept {
  if (n) std::memcpy(out, in, n * sizeof(float));
}

}  // namespace trident::simd
