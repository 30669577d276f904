#pragma once
// The P5 MLP (784-1024-1024-10, linear + ReLU, softmax cross-entropy, SGD(0.01, momentum 0.9))
// on one fixed synthetic batch: what bench_mlp trains on one process and bench_dp on each rank's
// share of the same global batch.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include <trident/nn/linear.hpp>
#include <trident/nn/loss.hpp>
#include <trident/optim/sgd.hpp>

namespace trident::bench {

inline constexpr index_t in_features = 784, hidden = 1024, classes = 10;
inline constexpr double lr = 0.01, momentum = 0.9;

/// The P5 model on rows [first, first + rows) of the global batch of `global` rows: the global batch's
/// inputs and labels (fixed seeds) cut to this shard; rows [0, global) is bench_mlp's batch.
/// @tparam P the policy bundle (any strategy)
template <policy_bundle P>
struct p5_mlp {
  using S = typename P::storage_type;

  nn::parameter_store<P> store;
  nn::linear<P> fc1{store, "fc1", in_features, hidden, true, activation::relu};
  nn::linear<P> fc2{store, "fc2", hidden, hidden, true, activation::relu};
  nn::linear<P> fc3{store, "fc3", hidden, classes};
  nn::softmax_cross_entropy<P> loss_fn{};
  optim::sgd opt{{lr, momentum, 0.0, 0.0, false}};
  nn::arena<cpu> memory;
  tensor<S> x;
  std::vector<std::int32_t> labels;
  double loss = 0;

  p5_mlp(index_t global, index_t first, index_t rows) : x({rows, in_features}), labels(static_cast<std::size_t>(rows)) {
    fc1.set_input_grad(false);  // its input is data: no dx, as in PyTorch
    store.allocate();
    generator gen(1234);
    fc1.init(gen);
    fc2.init(gen);
    fc3.init(gen);
    store.master_from_params();
    auto xf = tensor<float>({global, in_features});
    uniform(xf, gen, -1.0, 1.0);
    auto mine = tensor<float>::uninitialized({rows, in_features});
    std::memcpy(mine.data(), xf.data() + first * in_features, static_cast<std::size_t>(rows * in_features) * sizeof(float));
    copy(mine, x);
    std::mt19937 pick(99);
    std::vector<std::int32_t> all(static_cast<std::size_t>(global));
    for (auto& y : all) y = static_cast<std::int32_t>(pick() % classes);
    std::copy(all.begin() + first, all.begin() + first + rows, labels.begin());
  }

  /// Forward, loss and backward on this shard: its mean-loss gradients accumulate into the store.
  void forward_backward() {
    memory.reset();
    nn::context<P> ctx{memory, true, nullptr};
    auto h1 = fc1.forward(ctx, x.view());
    auto h2 = fc2.forward(ctx, h1);
    auto logits = fc3.forward(ctx, h2);
    loss = loss_fn.forward(ctx, logits, labels);
    auto d3 = loss_fn.backward(ctx);
    auto d2 = fc3.backward(ctx, d3);
    auto d1 = fc2.backward(ctx, d2);
    fc1.backward(ctx, d1);
  }
};

}  // namespace trident::bench
