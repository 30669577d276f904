// A consumer of trident::cuda: a tensor round trip through the GPU when there is one.
#include <trident/cuda.hpp>

#include <cstdio>

int main() {
  using namespace trident;
  if (cuda_device_count() == 0) {
    std::printf("no CUDA device: the CUDA consumer compiled and linked; nothing to run\n");
    return 0;
  }
  const auto h = from_vector<float>({3}, {1, 2, 3});
  const auto d = to<cuda>(h);
  const auto back = to_vector(scale(d, 2.0));
  std::printf("GPU round trip: %g %g %g\n", back[0], back[1], back[2]);
  return back[2] == 6.0f ? 0 : 1;
}
