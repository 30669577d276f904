// Fashion-MNIST with a multi-layer perceptron: 784-512-256-10, ReLU fused into the GEMMs'
// epilogues, dropout, AdamW with warm-up and cosine decay. One binary per precision:
//
//   build/examples/fashion_mnist_mlp_fp32 --epochs 20 --csv mlp.csv
//   scripts/compare-precisions.sh fashion_mnist_mlp     # the three precisions side by side
#include "fashion_mnist.hpp"

template <class P>
struct mlp {
  trident::nn::parameter_store<P> store;
  trident::nn::sequential<P, trident::nn::flatten<P>, trident::nn::linear<P>, trident::nn::dropout<P>, trident::nn::linear<P>,
                          trident::nn::dropout<P>, trident::nn::linear<P>>
      net{trident::nn::flatten<P>{},
          trident::nn::linear<P>(store, "fc1", 784, 512, true, trident::activation::relu),
          trident::nn::dropout<P>(0.2),
          trident::nn::linear<P>(store, "fc2", 512, 256, true, trident::activation::relu),
          trident::nn::dropout<P>(0.2),
          trident::nn::linear<P>(store, "fc3", 256, 10)};
  // The first layer's input is data: no input gradient to compute (a third of its backward).
  mlp() { net.template get<1>().set_input_grad(false); }
};

int main(int argc, char** argv) {
  return example::run<mlp>("fashion_mnist_mlp", argc, argv, {.epochs = 20, .batch = 128, .lr = 1e-3, .weight_decay = 0.05});
}
