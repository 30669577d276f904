// expect: Strategy is not a parallel strategy
#include <trident/trident.hpp>
struct not_a_strategy {};
#if defined(TRIDENT_EXPECT_FAILURE)
using P = trident::policy<trident::fp32, trident::cpu, not_a_strategy>;
#else
using P = trident::policy<trident::fp32, trident::cpu, trident::single>;
#endif
P::master_type x = 0;
int main() { return static_cast<int>(x); }
