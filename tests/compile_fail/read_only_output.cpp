// expect: an output argument must be writable
#include <trident/trident.hpp>
int main() {
  trident::tensor<float> x({4});
  const trident::tensor<float> y({4});
#if defined(TRIDENT_EXPECT_FAILURE)
  trident::relu(x, y);
#else
  trident::relu(y, x);
#endif
  return 0;
}
