// A consumer of trident::trident + trident::openmp: a 2x2 product and a reduction.
#include <trident/trident.hpp>

#include <cstdio>

int main() {
  using namespace trident;
  const auto a = from_vector<float>({2, 2}, {1, 2, 3, 4});
  const auto c = matmul(a, a);  // [[7, 10], [15, 22]]
  const double s = sum(c);
  std::printf("trident %s: sum(a @ a) = %g (OpenMP %s)\n", version_string, s, isa::openmp ? "on" : "off");
  return s == 54.0 && isa::openmp ? 0 : 1;
}
