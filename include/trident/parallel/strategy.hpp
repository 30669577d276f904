#pragma once
/// @file parallel/strategy.hpp
/// Parallel strategies: how training is spread over ranks, as empty tag types that a policy
/// carries (`policy<bf16_mixed, cpu, zero<2>>`). They say what is sharded; the step that runs
/// them over a communicator is parallel::distributed_step (parallel/zero.hpp).
///
/// | strategy        | each rank keeps                                              | after backward                                   |
/// |-----------------|--------------------------------------------------------------|--------------------------------------------------|
/// | `single`        | everything; there is one rank                                | the optimizer step                               |
/// | `data_parallel` | everything (a full replica)                                  | all-reduce (average) of the gradients, full step |
/// | `zero<1>`       | full params and grads; 1/N of master weights and optimizer state | reduce-scatter, step of its 1/N, all-gather params |
/// | `zero<2>`       | full params; 1/N of gradients, master weights, optimizer state  | as zero<1>; gradients reduce-scattered during backward |
/// | `zero<3>`       | 1/N of everything; a module's params gathered around its use    | as zero<2>; params gathered in forward and backward |

#include "../core/concepts.hpp"

namespace trident {

/// Everything on one process: no communication, nothing sharded.
struct single {
  static constexpr const char* name = "single";
  static constexpr bool distributed = false;
  static constexpr int zero_stage = 0;
};

/// Data parallel (DeepSpeed's ZeRO stage 0): every rank holds a full replica of the model and
/// the optimizer; gradients are averaged across ranks (bucketed all-reduce) before a step that
/// every rank takes identically.
struct data_parallel {
  static constexpr const char* name = "data_parallel";
  static constexpr bool distributed = true;
  static constexpr int zero_stage = 0;
};

/// ZeRO (Rajbhandari et al., 2020) stage `Stage`: stage 1 partitions the fp32 master weights
/// and optimizer state across ranks, stage 2 the gradients as well, stage 3 the parameters too.
/// @tparam Stage the ZeRO stage, 1, 2 or 3
template <int Stage>
struct zero {
  static_assert(Stage >= 1 && Stage <= 3,
                "trident::zero<Stage>: Stage must be 1 (optimizer state partitioned), 2 (+ gradients) or 3 (+ parameters); "
                "stage 0 is trident::data_parallel");
  static constexpr const char* name = Stage == 1 ? "zero_1" : Stage == 2 ? "zero_2" : "zero_3";
  static constexpr bool distributed = true;
  static constexpr int zero_stage = Stage;
};

static_assert(parallel_strategy<single>);
static_assert(parallel_strategy<data_parallel>);
static_assert(parallel_strategy<zero<1>>);
static_assert(parallel_strategy<zero<2>>);
static_assert(parallel_strategy<zero<3>>);

}  // namespace trident
