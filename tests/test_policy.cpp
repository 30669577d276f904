// The policy concepts accept what works and reject what does not; the bundle exposes the
// precision traits. (The compile-failure messages are tested in tests/compile_fail.)
#include <doctest/doctest.h>

#include <string>
#include <type_traits>

#include <trident/trident.hpp>

using namespace trident;

namespace {
struct custom_strategy {
  static constexpr const char* name = "custom";
  static constexpr bool distributed = true;
  static constexpr int zero_stage = 2;
};
struct bad_stage {
  static constexpr const char* name = "bad";
  static constexpr bool distributed = true;
  static constexpr int zero_stage = 4;
};
struct no_alloc {
  static constexpr const char* name = "nothing";
  static constexpr bool host_accessible = true;
};
}  // namespace

TEST_CASE("concepts") {
  static_assert(device_policy<cpu>);
  static_assert(!device_policy<cuda>, "cuda is only complete in nvcc translation units with trident/cuda.hpp");
  static_assert(!device_policy<no_alloc>);
  static_assert(!device_policy<int>);
  static_assert(parallel_strategy<single>);
  static_assert(parallel_strategy<custom_strategy>, "room for data parallel and ZeRO strategies");
  static_assert(!parallel_strategy<bad_stage>);
  static_assert(!parallel_strategy<fp32>);
  static_assert(precision_policy<bf16_mixed>);
  static_assert(!precision_policy<cpu>);
  CHECK(true);
}

TEST_CASE("the policy bundle") {
  using P = policy<fp16_mixed, cpu, single>;
  static_assert(policy_bundle<P>);
  static_assert(!policy_bundle<fp16_mixed>);
  static_assert(std::is_same_v<P::storage_type, half>);
  static_assert(std::is_same_v<P::gradient_type, half>);
  static_assert(std::is_same_v<P::master_type, float>);
  static_assert(std::is_same_v<P::precision, fp16_mixed>);
  static_assert(std::is_same_v<policy<fp32, cpu>::strategy, single>, "single is the default strategy");
  using Q = policy<bf16_mixed, cpu, custom_strategy>;
  CHECK(std::string(Q::strategy::name) == "custom");
  CHECK(std::string(Q::traits::name) == "bf16_mixed");
  CHECK(std::string(version_string) == TRIDENT_VERSION_STRING);
  CHECK(version == TRIDENT_VERSION_MAJOR * 10000 + TRIDENT_VERSION_MINOR * 100 + TRIDENT_VERSION_PATCH);
}
