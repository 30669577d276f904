// Every one of the 2^32 float bit patterns through every float -> half and float -> bfloat16
// path this build has, against the scalar references; and the references themselves against
// independent oracles (the F16C hardware for half, round-to-nearest computed in double for
// bfloat16). The one allowed exception: the AVX512-BF16 instruction (VCVTNEPS2BF16) treats
// subnormal inputs as zero, so for them it must give a zero of the input's sign.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <trident/backend/cpu/parallel.hpp>
#include <trident/precision/convert.hpp>

using namespace trident;

namespace {

constexpr std::uint64_t chunk = 1u << 16;
constexpr std::uint64_t all = 1ull << 32;

/// Runs body(first_bits, floats, count) over all 2^32 patterns in chunks, on all threads.
/// Returns the number of mismatches body reported (its return value), summed.
template <class Body>
std::uint64_t over_all_floats(Body body) {
  const index_t chunks = static_cast<index_t>(all / chunk);
  std::vector<std::uint64_t> bad(static_cast<std::size_t>(cpu_kernels::chunk_count(chunks, 1)), 0);
  cpu_kernels::parallel_chunks(chunks, 1, 1, [&](index_t c0, index_t c1, int t) {
    std::vector<float> in(chunk);
    for (index_t c = c0; c < c1; ++c) {
      const std::uint32_t first = static_cast<std::uint32_t>(static_cast<std::uint64_t>(c) * chunk);
      for (std::uint32_t i = 0; i < chunk; ++i) in[i] = std::bit_cast<float>(first + i);
      bad[static_cast<std::size_t>(t)] += body(first, in.data());
    }
  });
  std::uint64_t total = 0;
  for (auto b : bad) total += b;
  return total;
}

bool is_subnormal_bits(std::uint32_t u) { return (u & 0x7f800000u) == 0 && (u & 0x007fffffu) != 0; }

template <class Path>
void check_bf16_path() {
  std::uint64_t flushed = 0;
  const std::uint64_t bad = over_all_floats([&](std::uint32_t first, const float* in) -> std::uint64_t {
    std::vector<bfloat16> got(chunk);
    simd::to_bfloat16<Path>(in, got.data(), chunk);
    std::uint64_t mismatches = 0;
    for (std::uint32_t i = 0; i < chunk; ++i) {
      const std::uint32_t u = first + i;
      const std::uint16_t ref = trident::detail::float_to_bfloat16_bits(in[i]);
      if (got[i].bits == ref) continue;
      if (!Path::exact_bf16 && is_subnormal_bits(u) && got[i].bits == ((u >> 16) & 0x8000u)) continue;  // documented DAZ
      ++mismatches;
    }
    return mismatches;
  });
  (void)flushed;
  INFO("path " << std::string(Path::name));
  CHECK(bad == 0);
}

template <class Path>
void check_half_path() {
  const std::uint64_t bad = over_all_floats([&](std::uint32_t, const float* in) -> std::uint64_t {
    std::vector<half> got(chunk);
    simd::to_half<Path>(in, got.data(), chunk);
    std::uint64_t mismatches = 0;
    for (std::uint32_t i = 0; i < chunk; ++i) mismatches += got[i].bits != trident::detail::float_to_half_bits(in[i]);
    return mismatches;
  });
  INFO("path " << std::string(Path::name));
  CHECK(bad == 0);
}

}  // namespace

TEST_CASE("the scalar bfloat16 reference is round-to-nearest-even on all 2^32 floats (oracle in double)") {
  const std::uint64_t bad = over_all_floats([](std::uint32_t first, const float* in) -> std::uint64_t {
    std::uint64_t mismatches = 0;
    for (std::uint32_t i = 0; i < chunk; ++i) {
      const std::uint32_t u = first + i;
      const std::uint16_t got = trident::detail::float_to_bfloat16_bits(in[i]);
      std::uint16_t want;
      if (std::isnan(in[i])) {
        want = static_cast<std::uint16_t>((u >> 16) | 0x40);
      } else {
        // Candidates: truncation toward zero and the next magnitude up; pick the nearer in
        // exact double arithmetic, ties to the even encoding. Past the largest finite
        // bfloat16 the next magnitude is 2^128, which encodes as infinity.
        const std::uint32_t sign = u & 0x80000000u, mag = u & 0x7fffffffu;
        const std::uint32_t lo = mag >> 16, hi = lo + 1;
        const double d = std::fabs(static_cast<double>(in[i]));
        const double vlo = static_cast<double>(std::bit_cast<float>(lo << 16));
        const double vhi = lo == 0x7f7fu ? std::ldexp(1.0, 128) : static_cast<double>(std::bit_cast<float>(hi << 16));
        std::uint32_t pick;
        if (lo == 0x7f80u) {
          pick = lo;  // infinity stays
        } else if (d - vlo < vhi - d) {
          pick = lo;
        } else if (d - vlo > vhi - d) {
          pick = hi;
        } else {
          pick = (lo & 1u) ? hi : lo;
        }
        want = static_cast<std::uint16_t>((sign >> 16) | pick);
      }
      mismatches += got != want;
    }
    return mismatches;
  });
  CHECK(bad == 0);
}

TEST_CASE("every float -> bfloat16 path agrees with the reference on all 2^32 floats") {
  if constexpr (simd::avx2_path::available) check_bf16_path<simd::avx2_path>();
  if constexpr (simd::avx512_path::available) check_bf16_path<simd::avx512_path>();
  if constexpr (simd::avx512bf16_path::available) check_bf16_path<simd::avx512bf16_path>();
  if constexpr (!simd::avx2_path::available) MESSAGE("no SIMD bfloat16 path in this build (compile with -march=native)");
}

TEST_CASE("the AVX512-BF16 exception is exactly the subnormal inputs") {
  if constexpr (simd::avx512bf16_path::available) {
    // The hardware flushes subnormals (DAZ) and agrees everywhere else; make sure the
    // exception is real (so the allowance above is not hiding a different bug) and narrow.
    const float sub[4] = {std::bit_cast<float>(0x00000001u), std::bit_cast<float>(0x807fffffu), std::bit_cast<float>(0x00400000u),
                          std::bit_cast<float>(0x00800000u)};
    bfloat16 out[16];
    float in[16] = {};
    std::memcpy(in, sub, sizeof sub);
    simd::to_bfloat16<simd::avx512bf16_path>(in, out, 16);
    CHECK(out[0].bits == 0x0000);
    CHECK(out[1].bits == 0x8000);  // the exact path would give 0x8080
    CHECK(out[2].bits == 0x0000);  // exact: 0x0040
    CHECK(out[3].bits == 0x0080);  // smallest normal: unaffected
  } else {
    MESSAGE("AVX512-BF16 not in this build: its exception is not exercised");
  }
}

TEST_CASE("every float -> half path agrees with the reference on all 2^32 floats") {
  if constexpr (simd::avx2_path::available) check_half_path<simd::avx2_path>();
  if constexpr (simd::avx512_path::available) check_half_path<simd::avx512_path>();
  if constexpr (!simd::avx2_path::available) MESSAGE("no SIMD half path in this build (compile with -march=native)");
}

TEST_CASE("the scalar half reference is round-to-nearest-even near every rounding boundary (oracle in double)") {
  // Oracle: the sorted values of all non-negative finite halves; a float rounds to the nearer
  // neighbour (ties to the even encoding), with 65520 and above going to infinity.
  std::vector<double> value(0x7c00);
  for (std::uint32_t b = 0; b < 0x7c00; ++b) {
    const std::uint32_t e = b >> 10, m = b & 0x3ff;
    value[b] = e == 0 ? std::ldexp(static_cast<double>(m), -24) : std::ldexp(static_cast<double>(1024 + m), static_cast<int>(e) - 25);
  }
  auto oracle = [&](float f) -> std::uint16_t {
    const std::uint16_t sign = std::signbit(f) ? 0x8000 : 0;
    const double d = std::fabs(static_cast<double>(f));
    if (d >= 65520.0) return sign | 0x7c00;
    std::uint32_t lo = 0, hi = 0x7bff;
    while (hi - lo > 1) {  // value[lo] <= d < value[hi]
      const std::uint32_t mid = (lo + hi) / 2;
      (value[mid] <= d ? lo : hi) = mid;
    }
    if (d >= value[0x7bff]) return sign | 0x7bff;
    const double dl = d - value[lo], dh = value[hi] - d;
    const std::uint32_t pick = dl < dh ? lo : dl > dh ? hi : ((lo & 1) ? hi : lo);
    return static_cast<std::uint16_t>(sign | pick);
  };
  // Every float whose low 13 mantissa bits are near the rounding boundary (0, 1, halfway - 1,
  // halfway, halfway + 1, max), across all exponents and high mantissas, and every float in
  // the range that rounds to subnormal halves.
  std::uint64_t checked = 0, bad = 0;
  const std::uint32_t lows[] = {0x0000, 0x0001, 0x0fff, 0x1000, 0x1001, 0x1fff};
  for (std::uint32_t high = 0; high < (1u << 19); ++high) {
    for (std::uint32_t low : lows) {
      const std::uint32_t u = (high << 13) | low;
      const float f = std::bit_cast<float>(u);
      if (std::isnan(f)) continue;
      ++checked;
      bad += trident::detail::float_to_half_bits(f) != oracle(f);
    }
  }
  for (std::uint32_t u = 0x33000000u; u < 0x38800000u; u += 7) {  // subnormal results, stepping finely
    const float f = std::bit_cast<float>(u);
    ++checked;
    bad += trident::detail::float_to_half_bits(f) != oracle(f);
  }
  MESSAGE(checked << " floats checked against the oracle");
  CHECK(bad == 0);
}

TEST_CASE("widening paths agree with the references on all 2^16 encodings") {
  std::vector<half> h(0x10000);
  std::vector<bfloat16> b(0x10000);
  for (std::uint32_t i = 0; i < 0x10000; ++i) {
    h[i] = half::from_bits(static_cast<std::uint16_t>(i));
    b[i] = bfloat16::from_bits(static_cast<std::uint16_t>(i));
  }
  auto check = [&](auto path) {
    using P = decltype(path);
    std::vector<float> fh(0x10000), fb(0x10000);
    simd::from_half<P>(h.data(), fh.data(), fh.size());
    simd::from_bfloat16<P>(b.data(), fb.data(), fb.size());
    std::uint64_t bad = 0;
    for (std::uint32_t i = 0; i < 0x10000; ++i) {
      const float rh = trident::detail::half_bits_to_float(static_cast<std::uint16_t>(i));
      const float rb = trident::detail::bfloat16_bits_to_float(static_cast<std::uint16_t>(i));
      // compare bits: NaN payloads must survive too
      bad += std::bit_cast<std::uint32_t>(fh[i]) != std::bit_cast<std::uint32_t>(rh);
      bad += std::bit_cast<std::uint32_t>(fb[i]) != std::bit_cast<std::uint32_t>(rb);
    }
    INFO("path " << std::string(P::name));
    CHECK(bad == 0);
  };
  check(simd::scalar_path{});
  if constexpr (simd::avx2_path::available) check(simd::avx2_path{});
  if constexpr (simd::avx512_path::available) check(simd::avx512_path{});
}
