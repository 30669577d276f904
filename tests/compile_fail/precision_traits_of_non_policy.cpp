// expect: P is not a precision policy
#include <trident/trident.hpp>
#if defined(TRIDENT_EXPECT_FAILURE)
using S = trident::precision_traits<double>::storage_type;
#else
using S = trident::precision_traits<trident::fp16_mixed>::storage_type;
#endif
S x{};
int main() { return 0 * sizeof(x); }
