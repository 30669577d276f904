// expect: trident/cuda.hpp must be compiled by nvcc
#if defined(TRIDENT_EXPECT_FAILURE)
#include <trident/cuda.hpp>
#else
#include <trident/trident.hpp>
#endif
int main() { return 0; }
