#pragma once
/// @file parallel/zero.hpp
/// Data parallel and ZeRO stages 1, 2 and 3 over any communicator: `distributed_step`, what a
/// rank calls after backward in place of train::step_control::step, and the per-rank memory
/// it holds against DeepSpeed's ZeRO formulas (`memory_report`, `estimate_memory`).
///
/// Every rank builds the same model over its own parameter_store, takes its own disjoint
/// shard of each global batch, runs forward and backward on it (its gradient is then the mean
/// over its shard), and calls step(). The strategy of the policy decides what step() does:
///
/// - `data_parallel`: the flat gradient buffer is all-reduced (average) in buckets of
///   `reduce_bucket_size` elements, up to `max_in_flight` non-blocking collectives at a time;
///   then every rank takes the ordinary whole-store optimizer step on identical gradients.
///   Each rank keeps everything: params, grads, master, optimizer state (DeepSpeed's 16Ψ for
///   mixed-precision Adam). The all-reduces start while backward is still running: the step
///   listens to the store (nn::gradient_listener), the modules report each tensor whose
///   gradient is final (parameter_store::grad_ready), and as soon as every tensor from a
///   bucket's start to the end of the buffer is final (backward runs in reverse order of
///   declaration) that bucket's all-reduce is launched; the last one is waited for when the
///   last tensor is reported, so the reduction is done when backward returns. This overlap is
///   switched on after a first backward in which every tensor was reported (a model with a
///   module that does not report keeps the reduction in step(), which is always correct).
///   With gradient accumulation, wrap the micro-batches before the last in `no_sync()`, as
///   with PyTorch's DistributedDataParallel: their backward then reduces nothing, and the
///   last one reduces the sum (without it every micro-batch's backward reduces the running
///   sum, which is correct, since an average of equal values is that value, but costs a
///   reduction per micro-batch).
/// - `zero<1>`: the flat buffers are padded to N equal, 64-byte-aligned partitions (N ranks);
///   rank r owns flat elements [r·P, (r+1)·P). Gradients are reduce-scattered (average) in
///   buckets: each bucket packs the ranks' k-th chunk of every partition into a staging
///   buffer and the reduced chunk lands in rank r's own partition of its full gradient
///   buffer. The optimizer steps only that partition, over the rank's fp32 master partition
///   and its optimizer state for the partition (the store's full master copy is released);
///   the params of the partition are written rounded to the storage type, then all-gathered
///   into every rank's full params buffer. Kept: full params and grads, 1/N of master and
///   state (4Ψ + 12Ψ/N), plus the staging buckets.
/// - `zero<2>`: the rank keeps only its reduced gradient shard of P elements (2Ψ + 14Ψ/N):
///   the store's flat gradient buffer is freed, and the step hands backward a gradient buffer
///   per *unit* on first use (parameter_store::residency). A unit is a run of consecutive
///   tensors: those of one module (names up to the last '.'), with neighbouring modules merged
///   while the unit stays within `reduce_bucket_size` elements. As soon as backward has
///   reported every tensor of a unit (parameter_store::grad_ready), its buffer is
///   reduce-scattered (average, non-blocking, reduce_scatter_v: a unit straddles the ranks'
///   partitions unevenly) into a piece that is added to the shard, and the buffer is freed; so
///   reduction overlaps backward, gradients accumulate across micro-batches in the shard only,
///   and what backward holds at a time is a few units (memory_report::local_grads, with the
///   reductions in flight in comm_buffers). A unit whose tensors were not all reported (a
///   module that does not report) is reduced in step(). store.zero_grad() zeroes the shard.
/// - `zero<3>`: as zero<2>, and the params are partitioned too (16Ψ/N): the rank keeps the
///   params of its partition only, and param(h) gathers h's unit (all_gather_v) into a buffer
///   on first use. The `live_units` most recently used units stay gathered, older ones are
///   released; every gather starts the gather of the next unit in the direction of use
///   (forward: up, backward: down) so that it arrives while the current one computes. Units of
///   at most `param_persistence_threshold` elements (layer norms, biases) are gathered once and
///   stay (memory_report::gathered counts them, and the units gathered at the moment). After
///   the optimizer step every unit is released and the persistent ones are gathered again.
///   The store's flat params are freed; `gather_params` gives them all (checkpoints, tests).
///
/// The step's decision is the same on every rank: the squared L2 norm of the reduced
/// gradients is summed over the partitions by one all-reduce (in double), so every rank clips
/// by the same factor; that sum is infinite or NaN exactly when some reduced gradient is, so
/// it is also the agreed fp16 overflow flag, and every rank skips the same steps and moves
/// its loss scale alike. On overflow a second all-reduce (min) agrees on the first tensor with
/// a non-finite gradient, for the scaler's message. Without clipping and loss scaling no norm
/// is computed. The loss scaling, clipping and overflow rules are train::step_control's
/// (DeepSpeed's), used through step_control::decide.
///
/// At construction the ranks check they hold stores of the same layout (one all-reduce), pad
/// the stores for ZeRO, and broadcast rank 0's params (and master weights) so that all
/// replicas start equal, as DeepSpeed does. Arguments are checked before any communication.
/// Every rank must run the same model code: the gathers and reductions backward and forward
/// trigger are collectives, matched by the order in which the ranks issue them.
///
/// Gradients are final when backward returns. Data parallel (from its second step) and
/// ZeRO-2/3 reduce them inside backward, so a gradient a rank changes afterwards, other than
/// by another backward, is not what the other ranks see: under data parallel it is silently
/// left out; under ZeRO-2/3 store.grad(h) after backward opens a fresh buffer for h's unit
/// that step() reduces too, which is a collective (every rank must do the same). Loss
/// scaling, clipping and overflow checks belong to the step, not to code between the two.
///
/// Determinism: with thread_comm (rank-order reductions) all ranks get bitwise identical
/// gradients and params after every step; versus single-process training on the whole
/// global batch only the order of the gradient summation differs (and, for zero<2>/zero<3>
/// and fp16, the rounding of the averaged gradient to half, once per reduction).
///
/// ```cpp
/// using P = policy<bf16_mixed, cpu, zero<2>>;
/// trident::run_ranks(4, [&](trident::thread_comm& comm) {          // or an mpi_comm per process
///   nn::parameter_store<P> store;
///   nn::sequential<P, nn::linear<P>, nn::linear<P>> net{nn::linear<P>(store, "fc1", 784, 512, true, activation::relu),
///                                                    nn::linear<P>(store, "fc2", 512, 10)};
///   store.allocate();
///   generator gen(42);
///   net.init(gen);
///   store.master_from_params();
///   parallel::distributed_step<P, thread_comm> dist(store, comm, {.step = {.gradient_clipping = 1.0}});
///   optim::adamw opt({.lr = 1e-3});
///   for (auto& global_batch : batches) {
///     auto [x, y] = shard_of(global_batch, comm.rank(), comm.size());  // this rank's rows
///     store.zero_grad();
///     // forward and backward on (x, y) with loss scale dist.loss_scale()
///     const auto r = dist.step(opt);                                 // reduce, step 1/N, gather
///     if (r.applied) sched.step(opt);
///   }
///   const auto m = dist.memory(opt);   // bytes this rank holds, = estimate_memory<P>(...)
/// });
/// ```

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/policy.hpp"
#include "../nn/parameters.hpp"
#include "../optim/clip.hpp"
#include "../ops/elementwise.hpp"
#include "../optim/optimizer.hpp"
#include "../train/step.hpp"
#include "communicator.hpp"
#include "strategy.hpp"

namespace trident::parallel {

/// How a distributed step communicates, and the step options it shares with step_control.
struct distributed_options {
  /// Elements per gradient collective (DeepSpeed's reduce_bucket_size): a data-parallel
  /// all-reduce bucket, or the elements a zero<1> reduce-scatter bucket takes from all ranks
  /// together. Smaller buckets start communication sooner and need less staging; larger ones
  /// cost fewer collectives. DeepSpeed's default (5e8) is sized for GPUs and NCCL; ours, 2^21
  /// (8 MiB of fp32), keeps each collective in the sizes shared-memory MPI reduces at full
  /// speed: Open MPI's all-reduce of one 64 MiB buffer took 150-410 ms on the development
  /// machine against 3-4 ms per 16 MiB, and data parallel over 2 ranks on the large GPT ran at
  /// 1.4-1.5x one rank with the whole model in one bucket against 1.8-2.2x with
  /// 2^18-2^22-element buckets (benchmarks/RESULTS.md).
  index_t reduce_bucket_size = index_t{1} << 21;
  /// Bucket collectives started before the oldest is waited for (each zero<1> one has its own
  /// staging buffer).
  int max_in_flight = 2;
  /// zero<3>: units of at most this many elements stay gathered (DeepSpeed's
  /// stage3_param_persistence_threshold, whose default this is).
  index_t param_persistence_threshold = 100000;
  /// zero<3>: gather the next unit while the current one computes (DeepSpeed prefetches when
  /// stage3_prefetch_bucket_size > 0).
  bool prefetch = true;
  /// zero<3>: units kept gathered besides the persistent ones, the most recently used (at
  /// least 2: a module may use two units, as a tied output head does; the prefetched one comes
  /// on top).
  int live_units = 2;
  /// Clipping and loss scaling, as train::step_control takes them.
  train::step_options step{};
};

/// Bytes one rank holds for training state, by role. A communicator's own scratch (mpi_comm's
/// staging of 2-byte reductions) is not counted.
struct memory_report {
  std::size_t params = 0;           ///< params in the storage type: the full buffer, or (zero<3>) the rank's partition
  std::size_t grads = 0;            ///< gradients kept for the step: the full buffer, or (zero<2>, zero<3>) the reduced shard
  std::size_t master = 0;           ///< fp32 master weights: all (data parallel) or the rank's partition; 0 under fp32
  std::size_t optimizer_state = 0;  ///< optimizer state (fp32): all, or the rank's partition
  std::size_t local_grads = 0;      ///< zero<2>, zero<3>: the unit gradient buffers backward holds now
  std::size_t comm_buffers = 0;     ///< staging of collectives: zero<1> buckets, reductions in flight
  std::size_t gathered = 0;         ///< zero<3>: gathered param units (the persistent ones, and those in use now)

  /// The model states ZeRO's formulas count: params + grads + master + optimizer state.
  std::size_t model_states() const noexcept { return params + grads + master + optimizer_state; }
  /// Everything above.
  std::size_t total() const noexcept { return model_states() + local_grads + comm_buffers + gathered; }
  friend bool operator==(const memory_report&, const memory_report&) = default;
};

/// DeepSpeed's per-rank bytes of model states for mixed-precision (fp16 params and grads) Adam
/// over Ψ parameters and N ranks, K = 12 (fp32 master, momentum, variance): stage 0 16Ψ,
/// stage 1 4Ψ + 12Ψ/N, stage 2 2Ψ + 14Ψ/N, stage 3 16Ψ/N. Ψ must divide by N for stages >= 1
/// (pass the padded size).
inline std::size_t zero_formula_bytes(int stage, index_t psi, int ranks) {
  if (stage < 0 || stage > 3) throw error("parallel::zero_formula_bytes: stage " + std::to_string(stage) + " is not 0, 1, 2 or 3");
  if (ranks < 1) throw error("parallel::zero_formula_bytes: " + std::to_string(ranks) + " ranks; need at least 1");
  if (psi < 0 || (stage > 0 && psi % ranks != 0)) {
    throw error("parallel::zero_formula_bytes: Ψ = " + std::to_string(psi) + " does not divide into " + std::to_string(ranks) +
                " partitions (pass the padded size)");
  }
  const auto p = static_cast<std::size_t>(psi), n = static_cast<std::size_t>(ranks);
  switch (stage) {
    case 0: return 16 * p;
    case 1: return 4 * p + 12 * p / n;
    case 2: return 2 * p + 14 * p / n;
    default: return 16 * p / n;
  }
}

namespace detail {

/// zero<1>'s reduce-scatter buckets: chunk elements per rank, and staging slots.
struct bucket_plan {
  index_t chunk = 0;  ///< elements of each partition a bucket reduces
  index_t count = 0;  ///< buckets per step
  int slots = 0;      ///< staging buffers of ranks × chunk elements
};

inline bucket_plan plan_buckets(index_t partition, int ranks, const distributed_options& o) {
  bucket_plan b;
  if (partition == 0) return b;
  b.chunk = std::min(partition, std::max<index_t>(1, o.reduce_bucket_size / ranks));
  b.count = (partition + b.chunk - 1) / b.chunk;
  b.slots = static_cast<int>(std::min<index_t>(o.max_in_flight, b.count));
  return b;
}

inline void check_options(const distributed_options& o) {
  if (o.reduce_bucket_size < 1) {
    throw error("parallel::distributed_step: reduce_bucket_size must be >= 1 element, got " + std::to_string(o.reduce_bucket_size));
  }
  if (o.max_in_flight < 1) {
    throw error("parallel::distributed_step: max_in_flight must be >= 1, got " + std::to_string(o.max_in_flight));
  }
  if (o.param_persistence_threshold < 0) {
    throw error("parallel::distributed_step: param_persistence_threshold must be >= 0 elements, got " +
                std::to_string(o.param_persistence_threshold));
  }
  if (o.live_units < 2) {
    throw error("parallel::distributed_step: live_units must be >= 2 (a module may use two units), got " + std::to_string(o.live_units));
  }
}

}  // namespace detail

/// The flat size of a store of `elements` elements once a distributed step of Policy's
/// strategy over `ranks` ranks has padded it: ZeRO pads to a multiple of ranks × the store's
/// 64-byte alignment unit; data parallel does not pad.
/// @tparam Policy the policy bundle (its strategy and precision)
template <policy_bundle Policy>
index_t padded_size(index_t elements, int ranks) {
  if (ranks < 1) throw error("parallel::padded_size: " + std::to_string(ranks) + " ranks; need at least 1");
  if constexpr (Policy::strategy::zero_stage == 0) {
    return elements;
  } else {
    const index_t m = static_cast<index_t>(ranks) * nn::parameter_store<Policy>::align_elements;
    return (elements + m - 1) / m * m;
  }
}

/// The bytes each rank of a distributed step holds, from the strategy's formulas: what
/// distributed_step::memory() measures, for a store of `elements` flat elements (padding
/// before ZeRO's is included; this pads as the step does) and an optimizer with
/// `state_buffers` fp32 state buffers (Adam, AdamW, LAMB 2; SGD with momentum, Adagrad 1).
/// Under fp32 the params are the master weights, so there is no master term: mixed-precision
/// Adam's 16Ψ becomes 4 + 4 + 8 = 16Ψ, with params 4Ψ and K = 8 (the two moments). Between
/// steps zero<2> and zero<3> hold no unit gradient buffers and nothing in flight; zero<3>
/// holds its persistent units gathered: `persistent_elements` of them
/// (distributed_step::persistent_elements()).
/// @tparam Policy the policy bundle (its strategy and precision)
template <policy_bundle Policy>
memory_report estimate_memory(index_t elements, int ranks, int state_buffers, const distributed_options& o = {},
                              index_t persistent_elements = 0) {
  detail::check_options(o);
  if (state_buffers < 0) throw error("parallel::estimate_memory: state_buffers must be >= 0, got " + std::to_string(state_buffers));
  using S = typename Policy::storage_type;
  using G = typename Policy::gradient_type;
  constexpr int stage = Policy::strategy::zero_stage;
  constexpr bool separate_master = nn::parameter_store<Policy>::separate_master;
  const auto psi = static_cast<std::size_t>(padded_size<Policy>(elements, ranks));
  const std::size_t part = stage >= 1 ? psi / static_cast<std::size_t>(ranks) : psi;
  memory_report m;
  m.params = (stage >= 3 ? part : psi) * sizeof(S);
  m.grads = (stage >= 2 ? part : psi) * sizeof(G);
  m.master = separate_master ? part * sizeof(float) : 0;
  m.optimizer_state = static_cast<std::size_t>(state_buffers) * part * sizeof(float);
  m.gathered = stage >= 3 ? static_cast<std::size_t>(persistent_elements) * sizeof(S) : 0;
  if (stage == 1) {
    const auto b = detail::plan_buckets(static_cast<index_t>(part), ranks, o);
    m.comm_buffers = static_cast<std::size_t>(b.slots) * static_cast<std::size_t>(ranks) * static_cast<std::size_t>(b.chunk) * sizeof(G);
  }
  return m;
}


/// The step after backward for a data-parallel or ZeRO policy: gradient reduction across the
/// ranks of `Comm` (during backward where the strategy allows), the agreed clipping and
/// overflow decision, the optimizer step (whole, or on this rank's partition) and the
/// gathering of updated params. See the file header for what each strategy does and keeps.
/// @tparam Policy the policy bundle; its strategy is data_parallel or zero<1, 2, 3>, its device cpu
/// @tparam Comm a communicator (thread_comm, mpi_comm, local_comm)
template <policy_bundle Policy, communicator Comm>
class distributed_step : private nn::gradient_listener, private nn::parameter_store<Policy>::residency {
 public:
  using strategy = typename Policy::strategy;
  using storage_type = typename Policy::storage_type;
  using gradient_type = typename Policy::gradient_type;
  /// The ZeRO stage: 0 (data parallel), 1, 2 or 3.
  static constexpr int stage = strategy::zero_stage;
  static_assert(strategy::distributed,
                "parallel::distributed_step: the policy's strategy is trident::single; use train::step_control, or "
                "a distributed strategy (data_parallel, zero<1>, zero<2>, zero<3>)");
  static_assert(std::is_same_v<typename Policy::device, cpu>,
                "parallel::distributed_step: the optimizer step runs on the cpu device (a cuda store needs ZeRO-Offload)");
  static_assert(std::is_same_v<typename Policy::master_type, float>,
                "parallel::distributed_step: the optimizers keep fp32 master weights (fp64 is for gradient checks)");

  /// Binds to this rank's store and communicator: checks the options, agrees with the other
  /// ranks that the stores have the same layout, pads the store for ZeRO, broadcasts rank 0's
  /// params (and master weights), and for ZeRO takes this rank's partitions and releases the
  /// store's full copies (master; stage 2: gradients; stage 3: params). A collective: every
  /// rank constructs its own at the same time. The store and the communicator must outlive it;
  /// from stage 2 on the store's gradients (stage 3: params) live in this step, so the store
  /// cannot run backward (forward) once it is gone.
  distributed_step(nn::parameter_store<Policy>& store, Comm& comm, const distributed_options& o = {})
      : store_(store), comm_(comm), o_(o), control_(o.step) {
    detail::check_options(o);
    if (!store.allocated()) {
      throw error("parallel::distributed_step: the parameter store is not allocated (declare the model's tensors, then "
                  "call store.allocate() and initialise it before constructing the step)");
    }
    if (store.grads_released()) throw error("parallel::distributed_step: the store already belongs to another ZeRO step");
    ranks_ = comm.size();
    rank_ = comm.rank();
    agree_on_layout();
    if constexpr (stage >= 1) store.pad_to_multiple(static_cast<index_t>(ranks_) * nn::parameter_store<Policy>::align_elements);
    comm_.broadcast(store.params().data(), store.size(), 0);
    if constexpr (separate_master) comm_.broadcast(store.master().data(), store.size(), 0);
    const index_t n = store.size();
    if constexpr (stage >= 1) {
      part_ = n / ranks_;
      begin_ = part_ * rank_;
      end_ = begin_ + part_;
      if constexpr (separate_master) {
        master_ = tensor<float>::uninitialized(shape({part_}));
        if (part_) std::memcpy(master_.data(), store.master().data() + begin_, static_cast<std::size_t>(part_) * sizeof(float));
        store.release_master();
      }
      if constexpr (stage == 1) {
        plan_ = detail::plan_buckets(part_, ranks_, o_);
        staging_ = tensor<gradient_type>({static_cast<index_t>(plan_.slots) * ranks_ * plan_.chunk});
      } else {
        shard_ = tensor<gradient_type>({part_});
        build_units();
        counts_.resize(static_cast<std::size_t>(ranks_));
        if constexpr (stage == 3) {
          pshard_ = tensor<storage_type>::uninitialized(shape({part_}));
          if (part_) std::memcpy(pshard_.data(), store.params().data() + begin_, static_cast<std::size_t>(part_) * sizeof(storage_type));
        }
        store.release_to(static_cast<typename nn::parameter_store<Policy>::residency&>(*this), stage == 3);
        store.set_gradient_listener(this);
        if constexpr (stage == 3) gather_persistent();
      }
    } else {
      // data parallel: each rank computes the norm of its 1/N of the (identical) reduced gradients
      begin_ = n * rank_ / ranks_;
      end_ = n * (rank_ + 1) / ranks_;
      part_ = end_ - begin_;
      ready_.assign(store.infos().size(), 0);
      start_round();
      store.set_gradient_listener(this);
    }
  }

  distributed_step(const distributed_step&) = delete;
  distributed_step& operator=(const distributed_step&) = delete;

  /// Stops listening to the store; waits for the collectives still in flight.
  ~distributed_step() {
    if (store_.listener() == this) store_.set_gradient_listener(nullptr);
    if constexpr (stage >= 2) store_.detach(*this);
    auto quietly = [](auto& r) {
      try {
        r.wait();
      } catch (...) {  // a destructor cannot report it; the next collective on the communicator will
      }
    };
    for (auto& r : inflight_) quietly(r);
    for (auto& f : flights_) quietly(f.request);
    for (auto& u : ustate_)
      if (u.fetch) quietly(*u.fetch);
  }

  /// While the returned guard lives, backward passes (data parallel) start no reduction: for
  /// the micro-batches of an accumulation window before the last, as PyTorch's no_sync().
  /// step() reduces whatever was not reduced, so forgetting to leave it costs only the overlap.
  /// (ZeRO-2 and ZeRO-3 reduce every micro-batch into the shard, as DeepSpeed does; the guard
  /// does not change that.)
  [[nodiscard]] auto no_sync() {
    struct guard {
      distributed_step* s;
      bool was;
      explicit guard(distributed_step* x) : s(x), was(x->sync_) { s->sync_ = false; }
      guard(const guard&) = delete;
      guard& operator=(const guard&) = delete;
      ~guard() { s->sync_ = was; }
    };
    return guard(this);
  }
  /// Whether backward passes reduce their gradients as they go: data parallel (not inside
  /// no_sync(), and once a backward has reported every tensor), ZeRO-2 and ZeRO-3 (always).
  bool overlapping() const noexcept { return stage >= 2 || (stage == 0 && overlap_ && sync_); }

  /// After the last micro-batch's backward on every rank: reduces the gradients (what backward
  /// has not), decides the step as all ranks agree (clip factor, fp16 overflow skip and loss
  /// scale), steps `opt` (whole store, or this rank's partition) and gathers the params. A
  /// collective. Does not zero the gradients (call store.zero_grad() at the accumulation
  /// boundary). Under ZeRO, `opt` is bound to this rank's partition at its first step and must
  /// not step any other range afterwards.
  template <class Optimizer>
  train::step_outcome step(Optimizer& opt) {
    if constexpr (stage == 0) {
      finish_round();
    } else if constexpr (stage == 1) {
      reduce_gradients();
    } else {
      for (int u = static_cast<int>(units_.size()) - 1; u >= 0; --u) {
        if (ustate_[static_cast<std::size_t>(u)].grad.numel() > 0) launch_reduce(u);  // units backward did not finish
      }
      retire_all();
    }
    const gradient_type* g = stage >= 2 ? shard_.data() : store_.grads().data() + begin_;
    const train::step_outcome r = control_.decide(
        [&] {
          double s = optim::sum_of_squares(g, part_);
          comm_.all_reduce(&s, 1, reduce_op::sum);
          return optim::grad_norm_result{std::sqrt(s), std::isfinite(s)};
        },
        [&] {
          const int t = optim::first_nonfinite_tensor(store_, g, begin_, end_);
          std::int32_t first = t < 0 ? std::numeric_limits<std::int32_t>::max() : t;
          comm_.all_reduce(&first, 1, reduce_op::min);
          return first < static_cast<std::int32_t>(store_.infos().size()) ? store_.infos()[static_cast<std::size_t>(first)].name
                                                                          : std::string("(not found)");
        });
    if (!r.applied) return r;
    if constexpr (stage == 0) {
      opt.step(store_, r.grad_scale);
    } else {
      optim::flat_shard<Policy> s{begin_, end_, g, master_data(), params_partition(),
                                  [this](double* x, index_t n) { comm_.all_reduce(x, n, reduce_op::sum); }};
      opt.step(store_, s, r.grad_scale);
      if constexpr (stage <= 2) {
        storage_type* p = store_.params().data();
        comm_.all_gather(p + begin_, p, part_);
      } else {
        release_params();  // stale now; the next use gathers the updated ones
        gather_persistent();
      }
    }
    return r;
  }

  /// After params were loaded into the store on every rank (a checkpoint): rebuilds the master
  /// weights from them, the whole copy (data parallel) or this rank's partition (ZeRO).
  /// (zero<3> holds no full params to load into; it rebuilds its master from its partition.)
  void master_from_params() {
    if constexpr (!separate_master) {
      return;
    } else if constexpr (stage == 0) {
      store_.master_from_params();
    } else {
      if (part_) simd::convert(params_partition(), master_.data(), static_cast<std::size_t>(part_));
    }
  }

  /// All the params (store.size() elements, padding included) into `out`, on every rank: a
  /// collective under zero<3> (an all-gather of the partitions), a copy otherwise.
  void gather_params(tensor_view<storage_type, cpu> out) {
    if (out.numel() != store_.size() || !out.is_contiguous()) {
      throw shape_error("parallel::distributed_step::gather_params: the output has shape " + out.shape().str() +
                        "; it needs " + std::to_string(store_.size()) + " contiguous elements (store.size())");
    }
    if constexpr (stage == 3) {
      comm_.all_gather(pshard_.data(), out.data(), part_);
    } else {
      copy(store_.params(), out);
    }
  }

  /// The factor backward multiplies the loss by (fp16's loss scale; 1 otherwise).
  double loss_scale() const noexcept { return control_.loss_scale(); }
  /// Loss scaling and clipping (its scaler, skipped steps, describe()).
  train::step_control<Policy>& control() noexcept { return control_; }
  const distributed_options& options() const noexcept { return o_; }
  int rank() const noexcept { return rank_; }
  int ranks() const noexcept { return ranks_; }
  /// The flat range this rank owns: its optimizer partition (ZeRO), or its share of the norm
  /// computation (data parallel).
  std::pair<index_t, index_t> partition() const noexcept { return {begin_, end_}; }
  /// This rank's fp32 master weights over partition() (ZeRO; under fp32, the params there).
  tensor_view<float, cpu> master() {
    static_assert(stage >= 1, "parallel::distributed_step::master: data parallel keeps the whole master in the store");
    return tensor_view<float, cpu>(master_data(), shape({part_}));
  }
  /// zero<2>, zero<3>: the units backward's gradients (zero<3>: the params) are handled in,
  /// as flat ranges [begin, end) of the store, and whether each stays gathered (zero<3>).
  struct unit_range {
    index_t begin = 0, end = 0;
    bool persistent = false;
  };
  std::vector<unit_range> units() const {
    std::vector<unit_range> out;
    for (const auto& u : units_) out.push_back({u.begin, u.end, u.persistent});
    return out;
  }
  /// zero<3>: the elements of the units that stay gathered (for estimate_memory).
  index_t persistent_elements() const noexcept {
    index_t n = 0;
    for (const auto& u : units_)
      if (u.persistent) n += u.end - u.begin;
    return n;
  }
  /// The most bytes of unit buffers, reductions in flight and gathered params held at once
  /// since construction (what memory_report's local_grads + comm_buffers + gathered peaked at).
  std::size_t peak_working_bytes() const noexcept { return peak_working_; }

  /// The bytes this rank holds now, by role (optimizer state once `opt` has stepped or been
  /// bound). Between steps it equals estimate_memory<Policy>(elements, ranks, state buffers,
  /// options(), persistent_elements()).
  template <class Optimizer>
  memory_report memory(const Optimizer& opt) const {
    memory_report m;
    const auto n = static_cast<std::size_t>(store_.size());
    m.params = stage == 3 ? static_cast<std::size_t>(part_) * sizeof(storage_type) : n * sizeof(storage_type);
    m.grads = stage >= 2 ? static_cast<std::size_t>(shard_.numel()) * sizeof(gradient_type) : n * sizeof(gradient_type);
    if constexpr (separate_master) m.master = stage >= 1 ? static_cast<std::size_t>(master_.numel()) * sizeof(float) : n * sizeof(float);
    m.optimizer_state = opt.state_bytes();
    m.local_grads = local_grads_;
    m.comm_buffers = static_cast<std::size_t>(staging_.numel()) * sizeof(gradient_type) + in_flight_;
    m.gathered = gathered_;
    return m;
  }

 private:
  static constexpr bool separate_master = nn::parameter_store<Policy>::separate_master;

  float* master_data() {
    if constexpr (separate_master) {
      return master_.data();
    } else if constexpr (stage == 3) {
      return pshard_.data();
    } else {
      return store_.params().data() + begin_;
    }
  }
  storage_type* params_partition() {
    if constexpr (stage == 3) {
      return pshard_.data();
    } else {
      return store_.params().data() + begin_;
    }
  }

  /// One all-reduce (max) of the layout and the options, negated for the minimum: every rank
  /// learns whether all agree, and all throw alike when they do not.
  void agree_on_layout() {
    const double mine[] = {static_cast<double>(store_.size()), static_cast<double>(store_.infos().size()),
                           static_cast<double>(o_.reduce_bucket_size), static_cast<double>(o_.max_in_flight),
                           static_cast<double>(o_.param_persistence_threshold), static_cast<double>(o_.live_units),
                           static_cast<double>(o_.prefetch)};
    constexpr int k = 7;
    double v[2 * k];
    for (int i = 0; i < k; ++i) {
      v[i] = mine[i];
      v[k + i] = -mine[i];
    }
    comm_.all_reduce(v, 2 * k, reduce_op::max);
    auto range = [&](int i) { return std::to_string(static_cast<long long>(-v[k + i])) + " to " + std::to_string(static_cast<long long>(v[i])); };
    if (v[0] != -v[k] || v[1] != -v[k + 1]) {
      throw error("parallel::distributed_step: the ranks' parameter stores differ (flat elements from " + range(0) + ", tensors from " +
                  range(1) + "; this rank " + std::to_string(rank_) + " has " + std::to_string(store_.size()) + " in " +
                  std::to_string(store_.infos().size()) + "): every rank must build the same model");
    }
    for (int i = 2; i < k; ++i) {
      if (v[i] != -v[k + i]) {
        throw error("parallel::distributed_step: the ranks' options differ (reduce_bucket_size from " + range(2) + ", max_in_flight from " +
                    range(3) + ", param_persistence_threshold from " + range(4) + ", live_units from " + range(5) +
                    ", prefetch from " + range(6) + "): every rank must use the same");
      }
    }
  }

  // --- data parallel: the all-reduce buckets, launched during backward -------------------
  //
  // A round is one backward's reduction: the tensors reported ready so far (ready_, top_ is
  // the highest tensor not yet ready) and the buckets launched (next_bucket_ is the highest
  // bucket not yet launched; bucket b covers flat [b·B, min((b+1)·B, n))).

  index_t bucket_count() const noexcept {
    const index_t n = store_.size(), b = o_.reduce_bucket_size;
    return (n + b - 1) / b;
  }

  void start_round() {
    std::fill(ready_.begin(), ready_.end(), char{0});
    top_ = static_cast<int>(ready_.size()) - 1;
    next_bucket_ = bucket_count() - 1;
  }

  void launch_bucket(index_t b) {
    if (static_cast<int>(inflight_.size()) == o_.max_in_flight) {
      inflight_.front().wait();
      inflight_.pop_front();
    }
    const index_t n = store_.size(), first = b * o_.reduce_bucket_size;
    inflight_.push_back(comm_.iall_reduce(store_.grads().data() + first, std::min(o_.reduce_bucket_size, n - first), reduce_op::average));
  }

  void wait_inflight() {
    while (!inflight_.empty()) {
      inflight_.front().wait();
      inflight_.pop_front();
    }
  }

  /// The store's report: tensor `index` is final for this backward.
  void gradient_ready(int index) override {
    if constexpr (stage >= 2) {
      const int u = unit_of_[static_cast<std::size_t>(index)];
      const auto& info = units_[static_cast<std::size_t>(u)];
      if (++ustate_[static_cast<std::size_t>(u)].reported == info.last - info.first) launch_reduce(u);
      return;
    } else if constexpr (stage == 0) {
      reduced_ = false;  // new gradients since the last reduction
      if (!sync_) return;
      const auto i = static_cast<std::size_t>(index);
      if (ready_[i] && !overlap_) start_round();  // a backward that did not report every tensor; nothing in flight
      if (ready_[i]) {
        // a second report in one round: a new backward began before the last one reported
        // every tensor, while some of its buckets were in flight
        wait_inflight();
        throw error("parallel::distributed_step: '" + store_.infos()[i].name +
                    "' was reported ready twice before the reduction finished: a backward pass did not report every "
                    "tensor (a module that does not call parameter_store::grad_ready, or a tensor backward did not "
                    "reach); call step() after each backward, or wrap the earlier micro-batches in no_sync()");
      }
      ready_[i] = 1;
      while (top_ >= 0 && ready_[static_cast<std::size_t>(top_)]) --top_;
      if (overlap_) {
        const auto& infos = store_.infos();
        const index_t ready_from = top_ < 0                                           ? 0
                                   : top_ + 1 < static_cast<int>(infos.size()) ? infos[static_cast<std::size_t>(top_) + 1].offset
                                                                                      : store_.size();
        while (next_bucket_ >= 0 && next_bucket_ * o_.reduce_bucket_size >= ready_from) launch_bucket(next_bucket_--);
        for (auto& r : inflight_) (void)r.test();  // advances the ones in flight (MPI progress, shared-memory steps)
      }
      if (top_ < 0) {  // every tensor reported: the backward is over
        if (overlap_) {
          wait_inflight();
          reduced_ = true;
        }
        complete_round_seen_ = true;
        start_round();
      }
    }
  }

  /// Data parallel in step(): reduces what backward did not, then turns the overlap on once a
  /// backward has reported every tensor.
  void finish_round() {
    if (!reduced_) {
      while (next_bucket_ >= 0) launch_bucket(next_bucket_--);
      wait_inflight();
    }
    reduced_ = false;
    if (complete_round_seen_) overlap_ = true;
    start_round();
  }

  /// zero<1>: bucketed reduce-scatter into this rank's partition of its gradient buffer.
  void reduce_gradients() {
    gradient_type* g = store_.grads().data();
    std::deque<typename Comm::request_type> inflight;
    const index_t c = plan_.chunk;
    for (index_t k = 0; k < plan_.count; ++k) {
      if (static_cast<int>(inflight.size()) == plan_.slots) {
        inflight.front().wait();
        inflight.pop_front();
      }
      const index_t off = k * c, len = std::min(c, part_ - off);
      gradient_type* st = staging_.data() + (k % plan_.slots) * ranks_ * c;
      for (int s = 0; s < ranks_; ++s) {
        std::memcpy(static_cast<void*>(st + s * len), g + s * part_ + off, static_cast<std::size_t>(len) * sizeof(gradient_type));
      }
      inflight.push_back(comm_.ireduce_scatter(st, g + begin_ + off, len, reduce_op::average));
    }
    for (auto& r : inflight) r.wait();
  }

  // --- zero<2>, zero<3>: units ------------------------------------------------------------

  struct unit_info {
    index_t begin = 0, end = 0;  // flat range (padding up to the next unit included)
    int first = 0, last = 0;     // tensors [first, last)
    bool persistent = false;     // zero<3>: stays gathered
  };
  struct unit_state {
    tensor<gradient_type> grad;                            // backward's buffer for the unit (empty: none)
    int reported = 0;                                      // tensors reported ready since the buffer was made
    tensor<storage_type> param;                            // zero<3>: the gathered params (empty: not gathered)
    std::optional<typename Comm::request_type> fetch;      // zero<3>: the gather in flight into `param`
    std::uint64_t used = 0;                                // zero<3>: when last used (or prefetched)
  };
  /// A unit's reduce-scatter in flight: the unit's buffer it reads, the piece it writes, and
  /// where in the shard the piece is added.
  struct flight {
    typename Comm::request_type request;
    tensor<gradient_type> grad, piece;
    index_t at = 0;
  };

  /// Leaves are the tensors of one module (names equal up to the last '.'); zero<3> marks a
  /// leaf persistent when it has at most param_persistence_threshold elements; consecutive
  /// leaves of the same kind merge while the unit stays within reduce_bucket_size elements.
  void build_units() {
    const auto& infos = store_.infos();
    const auto prefix = [](const std::string& name) {
      const auto dot = name.rfind('.');
      return dot == std::string::npos ? name : name.substr(0, dot);
    };
    const auto start_of = [&](int t) { return t < static_cast<int>(infos.size()) ? infos[static_cast<std::size_t>(t)].offset : store_.size(); };
    std::vector<unit_info> leaves;
    for (int t = 0; t < static_cast<int>(infos.size()); ++t) {
      if (t == 0 || prefix(infos[static_cast<std::size_t>(t)].name) != prefix(infos[static_cast<std::size_t>(t) - 1].name)) {
        leaves.push_back({start_of(t), 0, t, t, false});
      }
      leaves.back().last = t + 1;
    }
    for (auto& l : leaves) {
      l.end = start_of(l.last);
      l.persistent = stage == 3 && l.end - l.begin <= o_.param_persistence_threshold;
    }
    if (!leaves.empty()) leaves.back().end = store_.size();  // the ZeRO padding goes with the last unit
    for (const auto& l : leaves) {
      if (!units_.empty() && units_.back().persistent == l.persistent && l.end - units_.back().begin <= o_.reduce_bucket_size) {
        units_.back().end = l.end;
        units_.back().last = l.last;
      } else {
        units_.push_back(l);
      }
    }
    unit_of_.assign(infos.size(), 0);
    for (int u = 0; u < static_cast<int>(units_.size()); ++u)
      for (int t = units_[static_cast<std::size_t>(u)].first; t < units_[static_cast<std::size_t>(u)].last; ++t) unit_of_[static_cast<std::size_t>(t)] = u;
    ustate_.resize(units_.size());
  }

  /// Each rank's elements of unit u (counts_), and this rank's [lo, hi) of it.
  std::pair<index_t, index_t> unit_counts(int u) {
    const auto& info = units_[static_cast<std::size_t>(u)];
    for (int r = 0; r < ranks_; ++r) {
      const index_t lo = std::max(info.begin, part_ * r), hi = std::min(info.end, part_ * (r + 1));
      counts_[static_cast<std::size_t>(r)] = std::max<index_t>(0, hi - lo);
    }
    const index_t lo = std::max(info.begin, begin_), hi = std::max(lo, std::min(info.end, end_));
    return {lo, hi};
  }

  void note(std::size_t& counter, std::ptrdiff_t bytes) noexcept {
    counter = static_cast<std::size_t>(static_cast<std::ptrdiff_t>(counter) + bytes);
    peak_working_ = std::max(peak_working_, local_grads_ + in_flight_ + gathered_);
  }

  template <class T>
  static std::ptrdiff_t bytes_of(const tensor<T>& t) noexcept {
    return static_cast<std::ptrdiff_t>(static_cast<std::size_t>(t.numel()) * sizeof(T));
  }

  /// Unit u's gradient buffer, made (zero) on first use.
  gradient_type* unit_grad(int u) {
    auto& st = ustate_[static_cast<std::size_t>(u)];
    if (st.grad.numel() == 0) {
      const auto& info = units_[static_cast<std::size_t>(u)];
      st.grad = tensor<gradient_type>({info.end - info.begin});
      note(local_grads_, bytes_of(st.grad));
    }
    return st.grad.data();
  }

  /// zero<2>, zero<3>: backward's gradient of tensor `index`, in its unit's buffer.
  gradient_type* grad_data(int index) override {
    const int u = unit_of_[static_cast<std::size_t>(index)];
    return unit_grad(u) + (store_.infos()[static_cast<std::size_t>(index)].offset - units_[static_cast<std::size_t>(u)].begin);
  }

  /// Starts the reduce-scatter of unit u's buffer (made zero if backward never asked for it).
  void launch_reduce(int u) {
    unit_grad(u);
    auto& st = ustate_[static_cast<std::size_t>(u)];
    const auto [lo, hi] = unit_counts(u);
    flight f;
    f.grad = std::move(st.grad);
    f.piece = tensor<gradient_type>::uninitialized(shape({hi - lo}));
    f.at = lo - begin_;
    note(local_grads_, -bytes_of(f.grad));
    note(in_flight_, bytes_of(f.grad) + bytes_of(f.piece));
    f.request = comm_.ireduce_scatter_v(f.grad.data(), f.piece.data(), counts_.data(), reduce_op::average);
    st.grad = tensor<gradient_type>();
    st.reported = 0;
    flights_.push_back(std::move(f));
    if (static_cast<int>(flights_.size()) > o_.max_in_flight) retire_front();
    while (!flights_.empty() && flights_.front().request.test()) retire_front();  // also lets MPI progress
  }

  /// Waits for the oldest reduction and adds its piece into the shard.
  void retire_front() {
    flight& f = flights_.front();
    f.request.wait();
    if (f.piece.numel() > 0) {
      auto dst = shard_.view().slice(0, f.at, f.at + f.piece.numel());
      add(dst, f.piece.view(), dst);
    }
    note(in_flight_, -(bytes_of(f.grad) + bytes_of(f.piece)));
    flights_.pop_front();
  }
  void retire_all() {
    while (!flights_.empty()) retire_front();
  }

  /// store.zero_grad() under zero<2>, zero<3>: the shard and backward's buffers to zero.
  void zero_grad() override {
    retire_all();
    fill(shard_, 0.0);
    for (auto& st : ustate_) {
      note(local_grads_, -bytes_of(st.grad));
      st.grad = tensor<gradient_type>();
      st.reported = 0;
    }
  }

  // --- zero<3>: params gathered on demand -------------------------------------------------

  /// Starts gathering unit u into a fresh buffer.
  void start_fetch(int u) {
    auto& st = ustate_[static_cast<std::size_t>(u)];
    const auto& info = units_[static_cast<std::size_t>(u)];
    const auto [lo, hi] = unit_counts(u);
    st.param = tensor<storage_type>::uninitialized(shape({info.end - info.begin}));
    note(gathered_, bytes_of(st.param));
    const storage_type* mine = hi > lo ? pshard_.data() + (lo - begin_) : pshard_.data();
    st.fetch.emplace(comm_.iall_gather_v(mine, st.param.data(), counts_.data()));
    st.used = ++clock_;
  }
  void release_unit(unit_state& st) {
    if (st.fetch) {
      st.fetch->wait();
      st.fetch.reset();
    }
    note(gathered_, -bytes_of(st.param));
    st.param = tensor<storage_type>();
  }

  /// zero<3>: the params of tensor `index`, its unit gathered (and the next one prefetched).
  storage_type* param_data(int index) override {
    if constexpr (stage != 3) {
      throw error("parallel::distributed_step: params are only partitioned under zero<3>");
    } else {
      const int u = unit_of_[static_cast<std::size_t>(index)];
      auto& st = ustate_[static_cast<std::size_t>(u)];
      const auto& info = units_[static_cast<std::size_t>(u)];
      if (st.param.numel() == 0) start_fetch(u);
      if (st.fetch) {
        st.fetch->wait();
        st.fetch.reset();
      }
      st.used = ++clock_;
      if (!info.persistent && u != last_unit_) {
        const int dir = last_unit_ < 0 || u > last_unit_ ? 1 : -1;
        last_unit_ = u;
        if (o_.prefetch) {
          int next = u + dir;
          while (next >= 0 && next < static_cast<int>(units_.size()) && units_[static_cast<std::size_t>(next)].persistent) next += dir;
          if (next >= 0 && next < static_cast<int>(units_.size()) && ustate_[static_cast<std::size_t>(next)].param.numel() == 0) {
            start_fetch(next);
          }
        }
        evict();
      }
      return st.param.data() + (store_.infos()[static_cast<std::size_t>(index)].offset - info.begin);
    }
  }

  /// Releases the non-persistent gathered units beyond the live_units most recently used (a
  /// prefetch in flight counts as used, and is never released before it is).
  void evict() {
    std::vector<std::pair<std::uint64_t, int>> held;
    for (int u = 0; u < static_cast<int>(units_.size()); ++u) {
      const auto& st = ustate_[static_cast<std::size_t>(u)];
      if (!units_[static_cast<std::size_t>(u)].persistent && st.param.numel() && !st.fetch) held.push_back({st.used, u});
    }
    if (static_cast<int>(held.size()) <= o_.live_units) return;
    std::sort(held.begin(), held.end());
    for (std::size_t k = 0; k + static_cast<std::size_t>(o_.live_units) < held.size(); ++k) release_unit(ustate_[static_cast<std::size_t>(held[k].second)]);
  }

  /// After the optimizer step: every gathered unit is stale.
  void release_params() {
    for (auto& st : ustate_) release_unit(st);
    last_unit_ = -1;
  }
  /// Gathers the persistent units (at construction and after every step).
  void gather_persistent() {
    for (int u = 0; u < static_cast<int>(units_.size()); ++u) {
      if (!units_[static_cast<std::size_t>(u)].persistent) continue;
      start_fetch(u);
      auto& st = ustate_[static_cast<std::size_t>(u)];
      st.fetch->wait();
      st.fetch.reset();
    }
  }

  nn::parameter_store<Policy>& store_;
  Comm& comm_;
  distributed_options o_;
  train::step_control<Policy> control_;
  int rank_ = 0;
  int ranks_ = 1;
  index_t begin_ = 0, end_ = 0, part_ = 0;
  tensor<float> master_;                 // ZeRO, mixed precision: this rank's master partition
  tensor<gradient_type> shard_;          // zero<2>, zero<3>: this rank's reduced gradient shard
  tensor<storage_type> pshard_;          // zero<3>: this rank's partition of the params
  tensor<gradient_type> staging_;        // zero<1>: reduce-scatter buckets
  detail::bucket_plan plan_{};
  // data parallel: the reduction during backward
  std::vector<char> ready_;              // per tensor: final in this round
  int top_ = -1;                         // highest tensor not yet ready
  index_t next_bucket_ = -1;             // highest bucket not yet launched
  bool reduced_ = false;                 // a backward reduced every bucket, no report since
  bool sync_ = true;                     // false inside no_sync()
  bool overlap_ = false;                 // launch during backward (after a complete round)
  bool complete_round_seen_ = false;     // some backward reported every tensor
  std::deque<typename Comm::request_type> inflight_;
  // zero<2>, zero<3>: units
  std::vector<unit_info> units_;
  std::vector<int> unit_of_;             // per tensor
  std::vector<unit_state> ustate_;
  std::vector<index_t> counts_;          // per rank, of the unit in hand
  std::deque<flight> flights_;
  int last_unit_ = -1;                   // zero<3>: the last non-persistent unit used
  std::uint64_t clock_ = 0;
  std::size_t local_grads_ = 0, in_flight_ = 0, gathered_ = 0, peak_working_ = 0;
};

}  // namespace trident::parallel
