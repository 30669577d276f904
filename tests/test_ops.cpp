// The shared operation test bodies (tests/bodies/ops_bodies.hpp), instantiated for the cpu
// device with every precision policy, and with double (the gradient-check type).
#include "bodies/ops_bodies.hpp"

namespace {
/// double on the cpu: not a training precision, but the type gradient checks run in.
struct double_cpu {
  using storage_type = double;
  using device = trident::cpu;
};
}  // namespace

#define TRIDENT_CPU_POLICIES \
  trident::policy<trident::fp32, trident::cpu>, trident::policy<trident::bf16_mixed, trident::cpu>, \
      trident::policy<trident::fp16_mixed, trident::cpu>, double_cpu

TEST_CASE_TEMPLATE_INVOKE(binary_ops_id, TRIDENT_CPU_POLICIES);
TEST_CASE_TEMPLATE_INVOKE(unary_ops_id, TRIDENT_CPU_POLICIES);
TEST_CASE_TEMPLATE_INVOKE(reduce_id, TRIDENT_CPU_POLICIES);
TEST_CASE_TEMPLATE_INVOKE(softmax_id, TRIDENT_CPU_POLICIES);
TEST_CASE_TEMPLATE_INVOKE(gemm_id, TRIDENT_CPU_POLICIES);
TEST_CASE_TEMPLATE_INVOKE(random_id, TRIDENT_CPU_POLICIES);
TEST_CASE_TEMPLATE_INVOKE(copy_id, TRIDENT_CPU_POLICIES);

TEST_CASE("cpu reductions are deterministic and independent of the thread count") {
  using namespace trident;
  auto x = tensor<float>({1 << 20});
  generator g(3);
  normal(x, g);
  const double s1 = sum(x), s2 = sum(x);
  CHECK(s1 == s2);
#if defined(_OPENMP)
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const double s_one = sum(x);
  omp_set_num_threads(saved);
  // double accumulation: the thread split changes the result by far less than float's epsilon
  CHECK(std::fabs(s_one - s1) <= 1e-9 * std::fabs(s1) + 1e-9);
#endif
}
