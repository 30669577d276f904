// Philox4x32-10 against the published known-answer vectors, and the counter-based contract:
// element i of a fill depends on (seed, offset, i) only.
#include <doctest/doctest.h>

#include <trident/trident.hpp>

using namespace trident;

TEST_CASE("Philox4x32-10 reproduces the Random123 known-answer vectors") {
  // Salmon et al. (SC'11), Random123 kat_vectors: philox4x32 with 10 rounds.
  const auto zero = philox4x32_10({{0, 0, 0, 0}}, 0, 0);
  CHECK(zero.v[0] == 0x6627e8d5u);
  CHECK(zero.v[1] == 0xe169c58du);
  CHECK(zero.v[2] == 0xbc57ac4cu);
  CHECK(zero.v[3] == 0x9b00dbd8u);
  const auto ones = philox4x32_10({{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}}, 0xffffffffu, 0xffffffffu);
  CHECK(ones.v[0] == 0x408f276du);
  CHECK(ones.v[1] == 0x41c83b0eu);
  CHECK(ones.v[2] == 0xa20bc7c6u);
  CHECK(ones.v[3] == 0x6d5451fdu);
  const auto pi = philox4x32_10({{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, 0xa4093822u, 0x299f31d0u);
  CHECK(pi.v[0] == 0xd16cfe09u);
  CHECK(pi.v[1] == 0x94fdccebu);
  CHECK(pi.v[2] == 0x5001e420u);
  CHECK(pi.v[3] == 0x24126ea1u);
  static_assert(philox4x32_10({{0, 0, 0, 0}}, 0, 0).v[0] == 0x6627e8d5u, "usable in constant expressions");
}

TEST_CASE("a generator advances past each fill; offsets restore a position") {
  generator g(9);
  const auto a = g.next(10, distribution::uniform, 0, 1);
  const auto b = g.next(1, distribution::uniform, 0, 1);
  CHECK(a.offset == 0);
  CHECK(b.offset == 3);  // ceil(10 / 4) blocks
  CHECK(g.offset() == 4);
  generator h(9);
  h.set_offset(3);
  auto x = tensor<float>({5});
  auto y = tensor<float>({5});
  uniform(x, g);
  uniform(y, h);
  CHECK(to_vector(x) != to_vector(y));
  generator k(9);
  k.set_offset(4);
  uniform(y, k);
  CHECK(to_vector(x) == to_vector(y));
}

TEST_CASE("uniform values are the Philox words scaled, element by element") {
  generator g(0x1234);
  auto x = tensor<float>({9});
  uniform(x, g, 0.0, 1.0);
  for (int i = 0; i < 9; ++i) {
    const auto block = philox4x32_10({{static_cast<std::uint32_t>(i / 4), 0, 0, 0}}, 0x1234, 0);
    const float want = static_cast<float>(static_cast<double>(block.v[i % 4] >> 8) / 16777216.0);
    REQUIRE(x(i) == want);
  }
}
