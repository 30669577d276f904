#pragma once
// A classification problem an MLP learns in a few epochs, shared by the trainer tests
// (test_train.cpp) and the distillation tests (test_distill.cpp).

#include <cstdint>
#include <vector>

#include <trident/trident.hpp>

namespace blobs_fixture {

using namespace trident;

/// Two Gaussian blobs per class in 8 dimensions: row i has class i % classes.
struct blobs {
  tensor<float> x;
  std::vector<std::int32_t> y;
  blobs(index_t n, int classes, std::uint64_t seed) : x({n, 8}), y(static_cast<std::size_t>(n)) {
    generator g(seed);
    auto noise = tensor<float>({n, 8});
    normal(noise, g, 0.0, 0.35);
    for (index_t i = 0; i < n; ++i) {
      const int c = static_cast<int>(i % classes);
      y[static_cast<std::size_t>(i)] = c;
      for (index_t j = 0; j < 8; ++j) {
        const double centre = ((j % classes) == c ? 1.0 : 0.0) + (j == 7 ? 0.1 * c : 0.0);
        x.data()[i * 8 + j] = static_cast<float>(centre + noise.data()[i * 8 + j]);
      }
    }
  }
};

}  // namespace blobs_fixture
