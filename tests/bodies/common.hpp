#pragma once
// Helpers shared by the templated test bodies: host reference data, device tensors built
// from it, and a tolerance per element type. Compiled by g++ (cpu) and nvcc (cuda).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <trident/trident.hpp>

namespace trident_test {

using trident::index_t;

/// Relative tolerance of one rounding to T after float arithmetic.
template <class T>
double tolerance() {
  if constexpr (std::is_same_v<T, double>) return 1e-12;
  if constexpr (std::is_same_v<T, float>) return 2e-6;
  if constexpr (std::is_same_v<T, trident::half>) return 1.5e-3;
  return 1.2e-2;  // bfloat16
}

/// Deterministic host values in [lo, hi), rounded to T so that the reference sees exactly
/// what the device sees.
template <class T>
std::vector<double> sample(index_t n, std::uint64_t seed, double lo = -2.0, double hi = 2.0) {
  std::vector<double> v(static_cast<std::size_t>(n));
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& x : v) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    const double u = static_cast<double>(s >> 11) * (1.0 / 9007199254740992.0);
    const double raw = lo + (hi - lo) * u;
    if constexpr (std::is_same_v<T, double>) {
      x = raw;
    } else {
      x = static_cast<double>(static_cast<float>(T(static_cast<float>(raw))));
    }
  }
  return v;
}

/// A tensor of element type T on device D with the given values.
template <class T, class D>
trident::tensor<T, D> make(const trident::shape& s, const std::vector<double>& values) {
  std::vector<T> converted(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) converted[i] = static_cast<T>(values[i]);
  return trident::from_vector<T, D>(s, converted);
}

/// The elements of a tensor on any device, as doubles, row-major.
template <class X>
std::vector<double> values(const X& x) {
  const auto v = trident::to_vector(x);
  std::vector<double> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<double>(static_cast<float>(v[i]));
  if constexpr (std::is_same_v<typename X::value_type, double>) {
    for (std::size_t i = 0; i < v.size(); ++i) out[i] = v[i];
  }
  return out;
}

/// Checks |got - want| <= rtol*|want| + atol element-wise; reports the first failure.
inline void check_close(const std::vector<double>& got, const std::vector<double>& want, double rtol, double atol,
                        const std::string& what) {
  REQUIRE_MESSAGE(got.size() == want.size(), what << ": " << got.size() << " values, expected " << want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    const bool both_nan = std::isnan(got[i]) && std::isnan(want[i]);
    const bool same_inf = std::isinf(got[i]) && got[i] == want[i];
    if (both_nan || same_inf) continue;
    const double err = std::fabs(got[i] - want[i]);
    if (!(err <= rtol * std::fabs(want[i]) + atol)) {
      FAIL_CHECK(what << ": element " << i << " is " << got[i] << ", expected " << want[i] << " (error " << err << ", rtol "
                      << rtol << ", atol " << atol << ")");
      return;
    }
  }
}

/// Row-major linear index -> multi-index for a shape.
inline std::vector<index_t> unravel(index_t linear, const trident::shape& s) {
  std::vector<index_t> idx(static_cast<std::size_t>(s.rank()));
  for (int d = s.rank() - 1; d >= 0; --d) {
    idx[static_cast<std::size_t>(d)] = linear % s[d];
    linear /= s[d];
  }
  return idx;
}

/// Row-major linear index of a multi-index, with broadcasting of extent-1 dims (aligned right).
inline index_t ravel_broadcast(const std::vector<index_t>& idx, const trident::shape& s) {
  index_t linear = 0;
  const int off = static_cast<int>(idx.size()) - s.rank();
  for (int d = 0; d < s.rank(); ++d) {
    const index_t i = s[d] == 1 ? 0 : idx[static_cast<std::size_t>(d + off)];
    linear = linear * s[d] + i;
  }
  return linear;
}

}  // namespace trident_test
