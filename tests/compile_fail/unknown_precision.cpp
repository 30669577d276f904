// expect: Precision is not a precision policy
#include <trident/trident.hpp>
#if defined(TRIDENT_EXPECT_FAILURE)
using P = trident::policy<int, trident::cpu>;
#else
using P = trident::policy<trident::fp32, trident::cpu>;
#endif
P::storage_type x = 0;
int main() { return static_cast<int>(x); }
