// expect: trident::tensor<T, cuda>: the cuda device is not available in this translation unit
#include <trident/trident.hpp>
int main() {
#if defined(TRIDENT_EXPECT_FAILURE)
  trident::tensor<float, trident::cuda> t({4});
#else
  trident::tensor<float, trident::cpu> t({4});
#endif
  return static_cast<int>(t.numel()) - 4;
}
