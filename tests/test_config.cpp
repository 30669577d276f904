// DeepSpeed JSON configs: real configs parse into trident's option structs, the batch-size rule
// (train = micro × accumulation × world size) for 1, 2 and 4 ranks, one message per bad config,
// the run-time choice of a compiled policy, the builders, and the effective config round-trip.
#include <doctest/doctest.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <variant>

#include <trident/config/deepspeed.hpp>
#include <trident/trident.hpp>

using namespace trident;
using config::config_error;
using config::parse_deepspeed_config;

namespace {

// DeepSpeed's documented ZeRO-2 example (docs/_tutorials/zero.md, config-json.md) with bf16,
// AdamW and WarmupDecayLR; the bucket sizes written as floats, as DeepSpeed's docs do.
constexpr const char* zero2_bf16 = R"({
  "train_batch_size": 64,
  "train_micro_batch_size_per_gpu": 8,
  "gradient_accumulation_steps": 4,
  "steps_per_print": 100,
  "wall_clock_breakdown": false,
  "optimizer": {
    "type": "AdamW",
    "params": { "lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1 }
  },
  "scheduler": {
    "type": "WarmupDecayLR",
    "params": { "warmup_min_lr": 0, "warmup_max_lr": 3e-4, "warmup_num_steps": 500,
                "total_num_steps": 10000, "warmup_type": "linear" }
  },
  "gradient_clipping": 1.0,
  "bf16": { "enabled": true },
  "zero_optimization": {
    "stage": 2,
    "allgather_partitions": true,
    "allgather_bucket_size": 5e8,
    "overlap_comm": true,
    "reduce_scatter": true,
    "reduce_bucket_size": 5e8,
    "contiguous_gradients": true
  }
})";

// fp16 with DeepSpeed's dynamic loss scaler, every key of the section, and OneCycle.
constexpr const char* fp16_one_cycle = R"({
  "train_micro_batch_size_per_gpu": 16,
  "gradient_accumulation_steps": 2,
  "optimizer": { "type": "adam", "params": { "lr": 0.001, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 3e-7 } },
  "scheduler": {
    "type": "OneCycle",
    "params": { "cycle_first_step_size": 1000, "cycle_first_stair_count": 500, "cycle_second_step_size": 1000,
                "cycle_second_stair_count": 500, "decay_step_size": 1000, "cycle_min_lr": 0.0001, "cycle_max_lr": 0.001,
                "decay_lr_rate": 0.001, "cycle_min_mom": 0.85, "cycle_max_mom": 0.99, "decay_mom_rate": 0.0 }
  },
  "fp16": { "enabled": true, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 500, "hysteresis": 3,
            "consecutive_hysteresis": true, "min_loss_scale": 0.5 },
  "zero_optimization": { "stage": 1, "reduce_bucket_size": 1048576 }
})";

// The smallest config DeepSpeed accepts.
constexpr const char* minimal = R"({ "train_batch_size": 32 })";

// LAMB (DeepSpeed's BERT pre-training config) with WarmupLR and the keys trident records but
// does not act on.
constexpr const char* lamb_recorded = R"({
  "train_batch_size": 4096,
  "train_micro_batch_size_per_gpu": 64,
  "steps_per_print": 1000,
  "prescale_gradients": false,
  "optimizer": { "type": "Lamb", "params": { "lr": 11e-3, "weight_decay": 0.01, "bias_correction": false, "max_coeff": 0.3, "min_coeff": 0.01 } },
  "scheduler": { "type": "WarmupLR", "params": { "warmup_min_lr": 0, "warmup_num_steps": 1000 } },
  "gradient_clipping": 1.0,
  "wall_clock_breakdown": true,
  "flops_profiler": { "enabled": true, "profile_step": 1, "module_depth": -1, "top_modules": 1, "detailed": true },
  "activation_checkpointing": { "partition_activations": false, "contiguous_memory_optimization": false, "cpu_checkpointing": false },
  "checkpoint": { "tag_validation": "Warn" },
  "tensorboard": { "enabled": true, "output_path": "logs/", "job_name": "bert" }
})";

config::deepspeed_config parse(const char* text, int world = 1) { return parse_deepspeed_config(text, {.world_size = world}); }

}  // namespace

TEST_CASE("DeepSpeed's ZeRO-2 bf16 AdamW WarmupDecayLR config") {
  const auto c = parse(zero2_bf16, 2);
  CHECK(c.train_batch_size == 64);
  CHECK(c.train_micro_batch_size_per_gpu == 8);
  CHECK(c.gradient_accumulation_steps == 4);
  CHECK(c.steps_per_print == 100);
  CHECK(c.precision() == config::precision_kind::bf16_mixed);
  CHECK(c.strategy_name() == "zero_2");
  REQUIRE(c.optimizer);
  CHECK(c.optimizer->kind == config::optimizer_kind::adamw);
  const auto& o = std::get<optim::adamw_options>(c.optimizer->options);
  CHECK(o.lr == 3e-4);
  CHECK(o.beta1 == 0.9);
  CHECK(o.beta2 == 0.95);
  CHECK(o.weight_decay == 0.1);
  REQUIRE(c.scheduler);
  const auto& s = std::get<sched::warmup_decay_lr_options>(c.scheduler->options);
  CHECK(s.total_num_steps == 10000);
  CHECK(s.warmup_num_steps == 500);
  CHECK(s.warmup_max_lr == 3e-4);
  CHECK(s.warmup_type == sched::warmup_kind::linear);
  CHECK(c.zero_optimization.stage == 2);
  CHECK(c.zero_optimization.reduce_bucket_size == 500000000);
  CHECK(c.zero_optimization.overlap_comm);
  CHECK(c.zero_optimization.recorded.at("reduce_scatter") == true);
  const auto d = c.distributed_options();
  CHECK(d.reduce_bucket_size == 500000000);
  CHECK(d.step.gradient_clipping == 1.0);
}

TEST_CASE("an fp16 config with dynamic loss scaling and OneCycle") {
  const auto c = parse(fp16_one_cycle, 4);
  CHECK(c.train_batch_size == 16 * 2 * 4);
  CHECK(c.precision() == config::precision_kind::fp16_mixed);
  CHECK(c.strategy_name() == "zero_1");
  // DeepSpeed's "Adam" is AdamW (adam_w_mode defaults to true).
  CHECK(c.optimizer->type == "Adam");
  CHECK(c.optimizer->kind == config::optimizer_kind::adamw);
  CHECK(std::get<optim::adamw_options>(c.optimizer->options).beta1 == 0.8);
  const auto& s = std::get<sched::one_cycle_options>(c.scheduler->options);
  CHECK(s.cycle_min_lr == 0.0001);
  CHECK(s.cycle_max_lr == 0.001);
  CHECK(s.cycle_second_stair_count == 500);
  CHECK(s.cycle_max_mom == 0.99);
  const auto st = c.step_options();
  CHECK(st.loss_scale == 0.0);
  CHECK(st.dynamic_scaler.initial_scale_power == 12);
  CHECK(st.dynamic_scaler.loss_scale_window == 500);
  CHECK(st.dynamic_scaler.hysteresis == 3);
  CHECK(st.dynamic_scaler.consecutive_hysteresis);
  CHECK(st.dynamic_scaler.min_loss_scale == 0.5);
  CHECK(c.distributed_options().reduce_bucket_size == 1048576);

  const auto plain = parse(R"({"train_batch_size": 8, "optimizer": {"type": "Adam", "params": {"adam_w_mode": false}}})");
  CHECK(plain.optimizer->kind == config::optimizer_kind::adam);
  CHECK(std::holds_alternative<optim::adam_options>(plain.optimizer->options));
}

TEST_CASE("a minimal config gets DeepSpeed's defaults") {
  const auto c = parse(minimal);
  CHECK(c.train_batch_size == 32);
  CHECK(c.train_micro_batch_size_per_gpu == 32);
  CHECK(c.gradient_accumulation_steps == 1);
  CHECK(!c.optimizer);
  CHECK(!c.scheduler);
  CHECK(c.precision() == config::precision_kind::fp32);
  CHECK(c.strategy_name() == "single");
  CHECK(c.steps_per_print == 10);
  CHECK(!c.wall_clock_breakdown);
  CHECK(c.gradient_clipping == 0.0);
  CHECK(c.fp16.dynamic.initial_scale_power == 16);
  CHECK(c.fp16.dynamic.loss_scale_window == 1000);
  CHECK(c.fp16.dynamic.hysteresis == 2);
  CHECK(c.zero_optimization.stage == 0);
  CHECK(c.zero_optimization.contiguous_gradients);
  CHECK(c.zero_optimization.reduce_bucket_size == parallel::distributed_options{}.reduce_bucket_size);
  CHECK(parse(minimal, 2).strategy_name() == "data_parallel");
}

TEST_CASE("LAMB, WarmupLR and the recorded top-level keys") {
  const auto c = parse(lamb_recorded, 2);
  CHECK(c.gradient_accumulation_steps == 4096 / 64 / 2);
  const auto& o = std::get<optim::lamb_options>(c.optimizer->options);
  CHECK(o.lr == 11e-3);
  CHECK(!o.bias_correction);
  CHECK(o.max_coeff == 0.3);
  const auto& s = std::get<sched::warmup_lr_options>(c.scheduler->options);
  CHECK(!s.warmup_max_lr.has_value());  // the optimizer's lr, as DeepSpeed's WarmupLR
  CHECK(c.wall_clock_breakdown);
  CHECK(c.recorded.at("flops_profiler").at("profile_step") == 1);
  CHECK(c.recorded.at("activation_checkpointing").at("partition_activations") == false);
  CHECK(c.recorded.at("checkpoint").at("tag_validation") == "Warn");
  CHECK(c.recorded.at("prescale_gradients") == false);
}

TEST_CASE("the batch-size triple for 1, 2 and 4 ranks") {
  using config::resolve_batch_sizes;
  for (int w : {1, 2, 4}) {
    CAPTURE(w);
    // train + micro → accumulation
    auto b = resolve_batch_sizes(64, 4, std::nullopt, w);
    CHECK(b.gradient_accumulation_steps == 16 / w);
    // train + accumulation → micro
    b = resolve_batch_sizes(64, std::nullopt, 2, w);
    CHECK(b.train_micro_batch_size_per_gpu == 32 / w);
    // micro + accumulation → train
    b = resolve_batch_sizes(std::nullopt, 4, 2, w);
    CHECK(b.train_batch_size == 8 * w);
    // train only → accumulation 1
    b = resolve_batch_sizes(64, std::nullopt, std::nullopt, w);
    CHECK(b.train_micro_batch_size_per_gpu == 64 / w);
    CHECK(b.gradient_accumulation_steps == 1);
    // micro only → accumulation 1
    b = resolve_batch_sizes(std::nullopt, 4, std::nullopt, w);
    CHECK(b.train_batch_size == 4 * w);
    CHECK(b.gradient_accumulation_steps == 1);
    // all three, consistent
    b = resolve_batch_sizes(8 * w, 4, 2, w);
    CHECK(b.train_batch_size == 8 * w);
    // through the parser
    const auto c = parse(R"({"train_batch_size": 64, "gradient_accumulation_steps": 4})", w);
    CHECK(c.train_micro_batch_size_per_gpu * c.gradient_accumulation_steps * w == 64);
  }
  // 64 / (3 × 4 ranks) does not divide: DeepSpeed's floor division, then its check, fails.
  CHECK_THROWS_WITH_AS(resolve_batch_sizes(64, 3, std::nullopt, 4),
                       doctest::Contains("train_batch_size 64 != train_micro_batch_size_per_gpu 3 × gradient_accumulation_steps 5 (inferred) × world size 4 = 60"),
                       config_error);
}

TEST_CASE("bad configs: one message each, naming the key") {
  SUBCASE("inconsistent batch sizes name the three numbers and the world size") {
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2})", 2),
                         doctest::Contains("train_batch_size 32 != train_micro_batch_size_per_gpu 4 × gradient_accumulation_steps 2 × world size 2 = 16"),
                         config_error);
  }
  SUBCASE("no batch size, or only the accumulation") {
    CHECK_THROWS_WITH_AS(parse("{}"), doctest::Contains("give train_batch_size or train_micro_batch_size_per_gpu"), config_error);
    CHECK_THROWS_WITH_AS(parse(R"({"gradient_accumulation_steps": 4})"), doctest::Contains("give train_batch_size or train_micro_batch_size_per_gpu"),
                         config_error);
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 0})"), doctest::Contains("train_batch_size: 0 must be > 0"), config_error);
  }
  SUBCASE("unknown keys, with a suggestion for a near miss") {
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8, "gradient_clip": 1.0})"),
                         doctest::Contains("deepspeed config: gradient_clip: unknown key; did you mean 'gradient_clipping'?"), config_error);
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8, "zero_optimization": {"stage": 1, "reduce_bucket_sz": 10}})"),
                         doctest::Contains("zero_optimization.reduce_bucket_sz: unknown key; did you mean 'reduce_bucket_size'?"), config_error);
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8, "fp16": {"enabled": true, "scale_window": 10}})"),
                         doctest::Contains("fp16.scale_window: unknown key"), config_error);
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8, "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentun": 0.9}}})"),
                         doctest::Contains("optimizer.params.momentun: unknown key; did you mean 'momentum'?"), config_error);
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8, "completely_unrelated": 1})"),
                         doctest::Contains("completely_unrelated: unknown key (known here: train_batch_size"), config_error);
  }
  SUBCASE("wrong JSON types") {
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8, "fp16": {"enabled": "yes"}})"),
                         doctest::Contains("fp16.enabled: expected a boolean (true or false), got string \"yes\""), config_error);
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": "8"})"), doctest::Contains("train_batch_size: expected an integer, got string \"8\""),
                         config_error);
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8.5})"), doctest::Contains("train_batch_size: expected an integer, got 8.5"), config_error);
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8, "zero_optimization": 2})"),
                         doctest::Contains("zero_optimization: expected an object, got number 2"), config_error);
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}})"),
                         doctest::Contains("optimizer.params.lr: expected a number, got string \"auto\" (\"auto\" is filled in by Hugging Face's Trainer"),
                         config_error);
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"betas": 0.9}}})"),
                         doctest::Contains("optimizer.params.betas: expected an array of two numbers [beta1, beta2], got number 0.9"), config_error);
  }
  SUBCASE("out-of-range values") {
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8, "zero_optimization": {"stage": 4}})"),
                         doctest::Contains("deepspeed config: zero_optimization.stage: 4 is not a ZeRO stage (0-3)"), config_error);
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8, "gradient_clipping": -1})"),
                         doctest::Contains("gradient_clipping: -1 must be >= 0"), config_error);
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8, "fp16": {"enabled": true, "hysteresis": 0}})"),
                         doctest::Contains("fp16.hysteresis: 0 is out of range (1 to"), config_error);
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 1.5]}}})"),
                         doctest::Contains("optimizer.params: "), config_error);
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8, "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 10}}})"),
                         doctest::Contains("scheduler.params.total_num_steps: missing (WarmupCosineLR needs it)"), config_error);
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8, "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 10, "warmup_num_steps": 100}}})"),
                         doctest::Contains("scheduler.params: warmup_decay_lr: "), config_error);
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8, "scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cosine"}}})"),
                         doctest::Contains("scheduler.params.warmup_type: 'cosine' is not a warmup type"), config_error);
  }
  SUBCASE("unknown optimizer and scheduler types") {
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8, "optimizer": {"type": "AdamX"}})"),
                         doctest::Contains("optimizer.type: 'AdamX' is not an optimizer trident has (Adam, AdamW, SGD, Lamb, Adagrad); did you mean"),
                         config_error);
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8, "scheduler": {"type": "warmuplr"}})"),
                         doctest::Contains("did you mean 'WarmupLR'?"), config_error);
  }
  SUBCASE("fp16 and bf16 both enabled") {
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8, "fp16": {"enabled": true}, "bf16": {"enabled": true}})"),
                         doctest::Contains("fp16.enabled and bf16.enabled are both true"), config_error);
  }
  SUBCASE("malformed JSON, with nlohmann's position") {
    CHECK_THROWS_WITH_AS(parse("{\n  \"train_batch_size\": 8,\n  \"fp16\": {\"enabled\": true,}\n}"),
                         doctest::Contains("deepspeed config: malformed JSON: parse error at line 3"), config_error);
    CHECK_THROWS_WITH_AS(parse(R"({"train_batch_size": 8, "train_batch_size": 16})"),
                         doctest::Contains("train_batch_size: duplicate key"), config_error);
    CHECK_THROWS_WITH_AS(parse(R"([1, 2])"), doctest::Contains("expected a JSON object at the top level"), config_error);
  }
  SUBCASE("a missing file") {
    CHECK_THROWS_WITH_AS(config::load_deepspeed_config("/nonexistent/ds_config.json"),
                         doctest::Contains("deepspeed config '/nonexistent/ds_config.json': cannot open the file"), config_error);
  }
  SUBCASE("every config error is a trident::error") {
    CHECK_THROWS_AS(parse(R"({"train_batch_size": 8, "zero_optimization": {"stage": 4}})"), error);
  }
}

TEST_CASE("a config file: parsed, and its messages name the file") {
  const std::string path = "trident_test_ds_config.json";
  {
    std::ofstream(path) << zero2_bf16;
  }
  const auto c = config::load_deepspeed_config(path, {.world_size = 2});
  CHECK(c.gradient_accumulation_steps == 4);
  CHECK_THROWS_WITH_AS(config::load_deepspeed_config(path, {.world_size = 4}),
                       doctest::Contains("deepspeed config 'trident_test_ds_config.json': batch size: train_batch_size 64 != "
                                         "train_micro_batch_size_per_gpu 8 × gradient_accumulation_steps 4 × world size 4 = 128"),
                       config_error);
  std::remove(path.c_str());
}

namespace {
using p_fp32 = policy<fp32, cpu, single>;
using p_bf16_dp = policy<bf16_mixed, cpu, data_parallel>;
using p_bf16_z2 = policy<bf16_mixed, cpu, zero<2>>;
using p_fp16_z1 = policy<fp16_mixed, cpu, zero<1>>;
using p_fp32_z1 = policy<fp32, cpu, zero<1>>;

template <class... Ps>
std::string pick(const config::deepspeed_config& c) {
  return config::dispatch<Ps...>(c, []<class P>(config::type_tag<P>) { return config::detail::policy_name<P>(); });
}
}  // namespace

TEST_CASE("dispatch: the config picks a compiled policy") {
  CHECK(pick<p_fp32, p_bf16_dp, p_bf16_z2, p_fp16_z1>(parse(minimal)) == "policy<fp32, cpu, single>");
  CHECK(pick<p_fp32, p_bf16_dp, p_bf16_z2, p_fp16_z1>(parse(zero2_bf16, 2)) == "policy<bf16_mixed, cpu, zero_2>");
  CHECK(pick<p_fp32, p_bf16_dp, p_bf16_z2, p_fp16_z1>(parse(fp16_one_cycle, 4)) == "policy<fp16_mixed, cpu, zero_1>");
  CHECK(pick<p_fp32, p_bf16_dp>(parse(R"({"train_batch_size": 8, "bf16": {"enabled": true}})", 2)) ==
        "policy<bf16_mixed, cpu, data_parallel>");
  // bfloat16 is DeepSpeed's alias of bf16.
  CHECK(pick<p_fp32, p_bf16_z2>(parse(R"({"train_batch_size": 8, "bfloat16": {"enabled": true}, "zero_optimization": {"stage": 2}})", 2)) ==
        "policy<bf16_mixed, cpu, zero_2>");
  // ZeRO with one rank is still ZeRO.
  CHECK(pick<p_fp32, p_fp32_z1>(parse(R"({"train_batch_size": 8, "zero_optimization": {"stage": 1}})")) == "policy<fp32, cpu, zero_1>");
  // The first match wins; void callables work too.
  int calls = 0;
  config::dispatch<p_fp32, p_fp32>(parse(minimal), [&]<class P>(config::type_tag<P>) { ++calls; });
  CHECK(calls == 1);

  CHECK(config::matches<p_bf16_z2>(parse(zero2_bf16, 2)));
  CHECK(!config::matches<p_bf16_z2>(parse(minimal, 2)));
}

TEST_CASE("dispatch: a config the binary cannot run gets one clear message") {
  CHECK_THROWS_WITH_AS((pick<p_fp32, p_bf16_dp>(parse(zero2_bf16, 2))),
                       doctest::Contains("the config asks for bf16_mixed with zero_2 (fp16.enabled false, bf16.enabled true, "
                                         "zero_optimization.stage 2, world size 2), but this binary has only policy<fp32, cpu, single>, "
                                         "policy<bf16_mixed, cpu, data_parallel>"),
                       config_error);
  CHECK_THROWS_WITH_AS((pick<p_fp32, p_bf16_dp>(parse(minimal, 2))), doctest::Contains("asks for fp32 with data_parallel"), config_error);
  CHECK_THROWS_WITH_AS((pick<p_fp32, p_bf16_z2>(parse(R"({"train_batch_size": 8, "bf16": {"enabled": true}, "zero_optimization": {"stage": 3}})", 2))),
                       doctest::Contains("asks for bf16_mixed with zero_3"), config_error);
}

TEST_CASE("dispatch: ZeRO-3 and its options") {
  using p_bf16_z3 = policy<bf16_mixed, cpu, zero<3>>;
  const auto c = parse(R"({"train_batch_size": 8, "bf16": {"enabled": true},
                           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1000, "stage3_prefetch_bucket_size": 0}})", 2);
  CHECK((pick<p_fp32, p_bf16_z2, p_bf16_z3>(c)) == "policy<bf16_mixed, cpu, zero_3>");
  const auto o = c.distributed_options();
  CHECK(o.param_persistence_threshold == 1000);
  CHECK_FALSE(o.prefetch);
  CHECK(parse(R"({"train_batch_size": 8, "zero_optimization": {"stage": 3}})", 2).distributed_options().prefetch);
}

TEST_CASE("the effective config: defaults included, and it parses back to itself") {
  for (const char* text : {zero2_bf16, fp16_one_cycle, minimal, lamb_recorded}) {
    for (int w : {1, 2, 4}) {
      config::deepspeed_config c;
      try {
        c = parse(text, w);
      } catch (const config_error&) {
        continue;  // batch sizes that do not fit this world size
      }
      CAPTURE(w);
      const auto j = c.effective();
      CHECK(j.at("fp16").at("initial_scale_power").is_number_integer());
      CHECK(j.at("zero_optimization").contains("contiguous_gradients"));
      CHECK(j.at("steps_per_print") == c.steps_per_print);
      const auto back = parse_deepspeed_config(j, {.world_size = w});
      CHECK(back.effective() == j);
      CHECK(parse_deepspeed_config(c.str(), {.world_size = w}).effective() == j);
    }
  }
  const auto s = parse(minimal).str();
  CHECK(s.find("\"train_micro_batch_size_per_gpu\": 32") != std::string::npos);
  CHECK(s.find("\"loss_scale_window\": 1000") != std::string::npos);
}

TEST_CASE("builders: the optimizer and the scheduler from the config") {
  const auto c = parse(zero2_bf16, 2);
  auto opt = config::make_optimizer(c);
  REQUIRE(std::holds_alternative<optim::adamw>(opt));
  auto& adamw = std::get<optim::adamw>(opt);
  CHECK(adamw.lr() == 3e-4);
  CHECK(adamw.betas().second == 0.95);
  auto s = config::make_scheduler(c, adamw);
  REQUIRE(std::holds_alternative<sched::warmup_decay_lr>(s));
  CHECK(adamw.lr() == 0.0);  // WarmupDecayLR starts at warmup_min_lr
  std::get<sched::warmup_decay_lr>(s).step(adamw);
  CHECK(adamw.lr() == doctest::Approx(3e-4 / 500));  // linear warm-up, iteration 1

  // OneCycle cycles the β1 of the Adam DeepSpeed's "Adam" builds.
  const auto f = parse(fp16_one_cycle, 4);
  auto opt2 = config::make_optimizer(f);
  std::visit([&](auto& o) {
    auto s2 = config::make_scheduler(f, o);
    CHECK(std::holds_alternative<sched::one_cycle>(s2));
    CHECK(o.lr() == doctest::Approx(0.0001));
  }, opt2);

  // Each optimizer type builds.
  for (const char* t : {"SGD", "Adagrad", "lamb"}) {
    const auto cc = parse_deepspeed_config(R"({"train_batch_size": 8, "optimizer": {"type": ")" + std::string(t) + R"(", "params": {"lr": 0.05}}})");
    auto o = config::make_optimizer(cc);
    std::visit([](auto& x) { CHECK(x.lr() == 0.05); }, o);
  }
  CHECK(std::holds_alternative<std::monostate>(config::make_scheduler(parse(minimal), adamw)));
  CHECK_THROWS_WITH_AS(config::make_optimizer(parse(minimal)), doctest::Contains("the config has no optimizer section"), config_error);
}
