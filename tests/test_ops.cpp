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

TEST_CASE("large element-wise ops (streaming stores, split rows) match the scalar formula exactly") {
  using namespace trident;
  // 24 MiB outputs: beyond the streaming threshold, one flat row split across threads, and an
  // odd length so that the last chunk and the unaligned head of the stores are exercised.
  const index_t n = (index_t{6} << 20) + 13;
  auto x = tensor<float>({n});
  auto y = tensor<float>({n});
  generator g(5);
  uniform(x, g, -1, 1);
  uniform(y, g, -1, 1);
  auto out = tensor<float>({n});
  axpby(1.0, x, 3.0, y, out.slice(0, 0, n));
  // (the compiler may contract x + 3y into one FMA in either place: allow one rounding)
  for (index_t i = 0; i < n; ++i) {
    const double want = static_cast<double>(x(i)) + 3.0 * static_cast<double>(y(i));
    REQUIRE(std::fabs(out(i) - want) <= 0x1p-23 * std::fabs(want) + 1e-30);
  }
  auto xb = cast<bfloat16>(x);
  auto yb = cast<bfloat16>(y);
  auto ob = tensor<bfloat16>({n});
  mul(xb, yb, ob);
  for (index_t i = 0; i < n; ++i) REQUIRE(ob(i).bits == bfloat16(float(xb(i)) * float(yb(i))).bits);
  auto oh = tensor<half>({n});
  add_scalar(x, 0.5, oh);
  for (index_t i = 0; i < n; ++i) REQUIRE(oh(i).bits == half(x(i) + 0.5f).bits);
  // sums of the large arrays against a double loop
  double want = 0;
  for (index_t i = 0; i < n; ++i) want += static_cast<double>(x(i));
  CHECK(std::fabs(sum(x) - want) <= 1e-9 * static_cast<double>(n));
}
