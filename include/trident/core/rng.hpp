#pragma once
/// @file core/rng.hpp
/// Counter-based random numbers (Philox4x32-10, Salmon et al., SC'11). Element i of a fill
/// depends only on (seed, offset, i), never on threads, tiling or device, so a seed gives the
/// same tensor on the CPU and on CUDA.

#include <cmath>
#include <cstdint>

#include "../config.hpp"

namespace trident {

/// Four 32-bit words: a Philox counter or output block.
struct philox_block {
  std::uint32_t v[4];
};

/// Philox4x32 with 10 rounds: a bijection of the 128-bit counter keyed by a 64-bit key.
TRIDENT_HD constexpr philox_block philox4x32_10(philox_block ctr, std::uint32_t k0, std::uint32_t k1) noexcept {
  constexpr std::uint32_t m0 = 0xD2511F53u, m1 = 0xCD9E8D57u;
  constexpr std::uint32_t w0 = 0x9E3779B9u, w1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    if (round) {
      k0 += w0;
      k1 += w1;
    }
    const std::uint64_t p0 = static_cast<std::uint64_t>(m0) * ctr.v[0];
    const std::uint64_t p1 = static_cast<std::uint64_t>(m1) * ctr.v[2];
    const auto hi0 = static_cast<std::uint32_t>(p0 >> 32), lo0 = static_cast<std::uint32_t>(p0);
    const auto hi1 = static_cast<std::uint32_t>(p1 >> 32), lo1 = static_cast<std::uint32_t>(p1);
    ctr = philox_block{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
  }
  return ctr;
}

/// The distribution a random fill draws from.
enum class distribution { uniform, normal };

/// Everything a kernel needs to fill a tensor: element i (row-major position) uses Philox block
/// `offset + i/4` under key `seed`, lane i%4.
struct random_spec {
  std::uint64_t seed = 0;
  std::uint64_t offset = 0;  ///< first Philox block
  distribution dist = distribution::uniform;
  double a = 0;  ///< uniform: low; normal: mean
  double b = 1;  ///< uniform: high; normal: standard deviation

  /// The Philox block holding element i.
  TRIDENT_HD constexpr philox_block block(std::uint64_t i) const noexcept {
    const std::uint64_t c = offset + i / 4;
    return philox4x32_10(philox_block{{static_cast<std::uint32_t>(c), static_cast<std::uint32_t>(c >> 32), 0u, 0u}},
                         static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32));
  }

  /// Value of element i given its Philox block `r` (the same block serves i = 4q..4q+3).
  /// Uniform: a + w*u with u = 24 random bits / 2^24 and w = b - a rounded to float, so that
  /// w*u is exact in double and no compiler's contraction into an FMA can change the result:
  /// CPU and CUDA agree bit for bit. Normal: Box-Muller on the lane pair (0,1) or (2,3) in
  /// double; the libraries' log/sin/cos may differ in the last double bit, so CPU and CUDA
  /// agree to within one unit of the stored type's last place.
  TRIDENT_HD double value(const philox_block& r, std::uint64_t i) const noexcept {
    const unsigned lane = static_cast<unsigned>(i % 4);
    if (dist == distribution::uniform) {
      const double u = static_cast<double>(r.v[lane] >> 8) * (1.0 / 16777216.0);
      const double w = static_cast<float>(b - a);
      return a + w * u;
    }
    const unsigned pair = lane & 2u;
    const double u1 = (static_cast<double>(r.v[pair] >> 8) + 1.0) * (1.0 / 16777216.0);  // (0, 1]
    const double u2 = static_cast<double>(r.v[pair + 1] >> 8) * (1.0 / 16777216.0);      // [0, 1)
    const double radius = ::sqrt(-2.0 * ::log(u1));
    const double angle = 6.283185307179586476925 * u2;
    return a + b * radius * ((lane & 1u) ? ::sin(angle) : ::cos(angle));
  }
};

/// A seeded stream of random fills: each fill takes the next blocks of the stream, so
/// successive fills differ and a run is reproducible from the seed alone.
class generator {
 public:
  constexpr explicit generator(std::uint64_t seed = 0x5eed) noexcept : seed_(seed) {}

  /// The spec for the next fill of `n` elements, advancing the stream past it.
  constexpr random_spec next(std::uint64_t n, distribution d, double a, double b) noexcept {
    random_spec s{seed_, offset_, d, a, b};
    offset_ += (n + 3) / 4;
    return s;
  }

  constexpr std::uint64_t seed() const noexcept { return seed_; }
  constexpr std::uint64_t offset() const noexcept { return offset_; }
  /// Restores a position (e.g. from a checkpoint).
  constexpr void set_offset(std::uint64_t offset) noexcept { offset_ = offset; }

 private:
  std::uint64_t seed_;
  std::uint64_t offset_ = 0;
};

}  // namespace trident
