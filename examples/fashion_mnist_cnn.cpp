// Fashion-MNIST with a small convolutional network: two 3x3 convolutions (32 and 64 channels)
// with batch norm, ReLU and 2x2 max pooling, then a 256-unit hidden layer with dropout.
// AdamW with warm-up and cosine decay. One binary per precision:
//
//   build/examples/fashion_mnist_cnn_bf16 --epochs 15 --csv cnn.csv
//   scripts/compare-precisions.sh fashion_mnist_cnn     # the three precisions side by side
#include "fashion_mnist.hpp"

template <class P>
struct cnn {
  trident::nn::parameter_store<P> store;
  trident::nn::sequential<P,                                                                                 //
                          trident::nn::conv2d<P>, trident::nn::batch_norm<P>, trident::nn::relu<P>,         // 32x28x28
                          trident::nn::max_pool2d<P>,                                                      // 32x14x14
                          trident::nn::conv2d<P>, trident::nn::batch_norm<P>, trident::nn::relu<P>,         // 64x14x14
                          trident::nn::max_pool2d<P>,                                                      // 64x7x7
                          trident::nn::flatten<P>, trident::nn::linear<P>, trident::nn::dropout<P>,        // 256
                          trident::nn::linear<P>>                                                          // 10
      net{trident::nn::conv2d<P>(store, "conv1", 1, 32, 3, 1, 1, false),
          trident::nn::batch_norm<P>(store, "bn1", 32),
          trident::nn::relu<P>{},
          trident::nn::max_pool2d<P>(2),
          trident::nn::conv2d<P>(store, "conv2", 32, 64, 3, 1, 1, false),
          trident::nn::batch_norm<P>(store, "bn2", 64),
          trident::nn::relu<P>{},
          trident::nn::max_pool2d<P>(2),
          trident::nn::flatten<P>{},
          trident::nn::linear<P>(store, "fc1", 64 * 7 * 7, 256, true, trident::activation::relu),
          trident::nn::dropout<P>(0.3),
          trident::nn::linear<P>(store, "fc2", 256, 10)};
  // The first layer's input is data: no input gradient to compute.
  cnn() { net.template get<0>().set_input_gradient(false); }
};

int main(int argc, char** argv) {
  return example::run<cnn>("fashion_mnist_cnn", argc, argv, {.epochs = 15, .batch = 128, .lr = 2e-3, .weight_decay = 0.05});
}
