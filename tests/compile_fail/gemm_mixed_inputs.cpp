// expect: A and B must have the same element type
#include <trident/trident.hpp>
int main() {
  trident::tensor<trident::bfloat16> a({2, 3});
  trident::tensor<float> c({2, 4});
#if defined(TRIDENT_EXPECT_FAILURE)
  trident::tensor<float> b({3, 4});
#else
  trident::tensor<trident::bfloat16> b({3, 4});
#endif
  trident::gemm(a, b, c);
  return 0;
}
