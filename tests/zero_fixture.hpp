#pragma once
// What the data parallel and ZeRO tests share (test_zero.cpp over thread ranks, test_mpi_zero.cpp
// over MPI): a small classification problem and MLPs that train on any rows of it.

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include <trident/trident.hpp>

namespace zero_fixture {

using namespace trident;

constexpr index_t global_batch = 24;  // divides among 1, 2, 3 and 4 ranks, and 2 or 4 ranks' shards in 2 or 3 micro-batches
constexpr int steps = 5;

/// Two Gaussian blobs per class in 8 dimensions, `steps` global batches of them.
struct blobs {
  std::vector<float> x;
  std::vector<std::int32_t> y;
  blobs() {
    const index_t n = global_batch * steps;
    generator g(11);
    tensor<float> noise({n, 8});
    normal(noise, g, 0.0, 0.5);
    for (index_t i = 0; i < n; ++i) {
      const int c = static_cast<int>((i * 7) % 3);
      y.push_back(c);
      for (index_t j = 0; j < 8; ++j) x.push_back(static_cast<float>(((j % 3) == c ? 1.0 : 0.0) + noise.data()[i * 8 + j]));
    }
  }
};

inline const blobs& data() {
  static const blobs d;
  return d;
}

/// The layer widths of the MLPs: 8 → 40 (ReLU) → 24 (ReLU) → 3, and a deeper one whose
/// ZeRO-3 units outnumber the units kept gathered.
inline const std::vector<index_t> shallow{8, 40, 24, 3};
inline const std::vector<index_t> deep{8, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 3};

/// An MLP with softmax cross-entropy; biases are out of the decay group.
template <class P>
struct mlp {
  using S = typename P::storage_type;
  nn::parameter_store<P> store;
  std::vector<nn::linear<P>> layers;
  nn::softmax_cross_entropy<P> loss;
  nn::arena<cpu> memory;
  generator gen{3};

  explicit mlp(index_t hidden = 40) : mlp(std::vector<index_t>{8, hidden, 24, 3}) {}
  explicit mlp(const std::vector<index_t>& widths) {
    layers.reserve(widths.size() - 1);
    for (std::size_t l = 0; l + 1 < widths.size(); ++l) {
      layers.emplace_back(store, "fc" + std::to_string(l + 1), widths[l], widths[l + 1], true,
                          l + 2 < widths.size() ? activation::relu : activation::none);
    }
    store.allocate();
    generator g(5);
    for (auto& l : layers) l.init(g);
    store.master_from_params();
  }

  /// Forward and backward on rows [b, e) of global batch `step`: the gradient of
  /// loss_scale × (mean loss over those rows) accumulates into the store.
  void backward(int step, index_t b, index_t e, double loss_scale) {
    const auto& d = data();
    const index_t first = step * global_batch + b, rows = e - b;
    tensor<float> xf({rows, 8});
    std::memcpy(xf.data(), d.x.data() + first * 8, static_cast<std::size_t>(rows * 8) * sizeof(float));
    tensor<S> x({rows, 8});
    copy(xf, x);
    memory.reset();
    nn::context<P> ctx{memory, true, &gen};
    tensor_view<S, cpu> h = x.view();
    for (auto& l : layers) h = l.forward(ctx, h);
    loss.forward(ctx, h, std::span<const std::int32_t>(d.y.data() + first, static_cast<std::size_t>(rows)));
    tensor_view<S, cpu> g = loss.backward(ctx, loss_scale);
    for (std::size_t l = layers.size(); l-- > 0;) g = layers[l].backward(ctx, g);
  }

  /// The params (padding left out) as floats.
  std::vector<float> params() { return params_in(store.params().data()); }
  /// The same through a distributed step (ZeRO-3 holds no full params).
  template <class Dist>
  std::vector<float> params(Dist& dist) {
    tensor<S> all({store.size()});
    dist.gather_params(all.view());
    return params_in(all.data());
  }
  std::vector<float> params_in(const S* flat) {
    std::vector<float> out;
    for (const auto& p : store.infos()) {
      for (index_t i = 0; i < p.numel(); ++i) out.push_back(static_cast<float>(flat[p.offset + i]));
    }
    return out;
  }
};

}  // namespace zero_fixture
