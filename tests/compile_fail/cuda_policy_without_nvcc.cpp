// expect: the cuda device is not available in this translation unit; it needs a CUDA compiler \(nvcc\)
#include <trident/trident.hpp>
#if defined(TRIDENT_EXPECT_FAILURE)
using P = trident::policy<trident::bf16_mixed, trident::cuda>;
#else
using P = trident::policy<trident::bf16_mixed, trident::cpu>;
#endif
P::storage_type x{};
int main() { return x.bits; }
