// expect: T must be float, double, half or bfloat16
#include <trident/trident.hpp>
int main() {
#if defined(TRIDENT_EXPECT_FAILURE)
  trident::tensor<int> t({4});
#else
  trident::tensor<double> t({4});
#endif
  return static_cast<int>(t.numel()) - 4;
}
