// A consumer of trident::json: a DeepSpeed config parsed and mapped onto a compiled policy.
#include <trident/config/deepspeed.hpp>

#include <cstdio>

int main() {
  using namespace trident;
  const auto cfg = config::parse_deepspeed_config(R"({"train_batch_size": 16, "gradient_accumulation_steps": 2,
                                                      "bf16": {"enabled": true}, "zero_optimization": {"stage": 1}})",
                                                  {.world_size = 2});
  const char* picked = config::dispatch<policy<fp32, cpu, single>, policy<bf16_mixed, cpu, zero<1>>>(
      cfg, []<class P>(config::type_tag<P>) { return P::strategy::name; });
  std::printf("deepspeed config: micro-batch %lld per rank, strategy %s\n",
              static_cast<long long>(cfg.train_micro_batch_size_per_gpu), picked);
  return cfg.train_micro_batch_size_per_gpu == 4 && std::string_view(picked) == "zero_1" ? 0 : 1;
}
