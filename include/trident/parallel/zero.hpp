#pragma once
/// @file parallel/zero.hpp
/// Data parallel and ZeRO stages 1 and 2 over any communicator: `distributed_step`, what a
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
/// - `zero<2>`: as zero<1>, but the reduce-scatter writes a separate gradient shard of P
///   elements, and that shard is the gradient the rank keeps for its step (2Ψ + 14Ψ/N). In
///   this version backward still accumulates into the full local gradient buffer of the store
///   (one reduce-scatter reads it at the accumulation boundary), so that buffer stays
///   allocated: memory_report counts it apart, as `local_grads`, from the model states the
///   formula counts. Reduce-scattering buckets while backward runs, and freeing the full
///   buffer, are left for later.
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
///
/// Determinism: with thread_comm (rank-order reductions) all ranks get bitwise identical
/// gradients and params after every step; versus single-process training on the whole
/// global batch only the order of the gradient summation differs (and, for zero<2> and fp16,
/// the one rounding of the averaged gradient to half).
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
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/policy.hpp"
#include "../nn/parameters.hpp"
#include "../optim/clip.hpp"
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
  /// cost fewer collectives. DeepSpeed's default (5e8) is sized for GPUs; ours, 2^24 (64 MiB
  /// of fp32), bounds the zero<1> staging on CPUs.
  index_t reduce_bucket_size = index_t{1} << 24;
  /// Bucket collectives started before the oldest is waited for (each zero<1> one has its own
  /// staging buffer).
  int max_in_flight = 2;
  /// Clipping and loss scaling, as train::step_control takes them.
  train::step_options step{};
};

/// Bytes one rank holds for training state, by role.
struct memory_report {
  std::size_t params = 0;           ///< the full params buffer, in the storage type (every strategy here)
  std::size_t grads = 0;            ///< gradients kept for the step: the full buffer, or (zero<2>) the reduced shard
  std::size_t master = 0;           ///< fp32 master weights: all (data parallel) or the rank's partition; 0 under fp32
  std::size_t optimizer_state = 0;  ///< optimizer state (fp32): all, or the rank's partition
  std::size_t local_grads = 0;      ///< zero<2> in this version: the full local buffer backward accumulates into
  std::size_t comm_buffers = 0;     ///< staging of bucketed collectives (zero<1>)

  /// The model states ZeRO's formulas count: params + grads + master + optimizer state.
  std::size_t model_states() const noexcept { return params + grads + master + optimizer_state; }
  /// Everything above.
  std::size_t total() const noexcept { return model_states() + local_grads + comm_buffers; }
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
/// Adam's 16Ψ becomes 4 + 4 + 8 = 16Ψ, with params 4Ψ and K = 8 (the two moments).
/// @tparam Policy the policy bundle (its strategy and precision)
template <policy_bundle Policy>
memory_report estimate_memory(index_t elements, int ranks, int state_buffers, const distributed_options& o = {}) {
  detail::check_options(o);
  if (state_buffers < 0) throw error("parallel::estimate_memory: state_buffers must be >= 0, got " + std::to_string(state_buffers));
  using S = typename Policy::storage_type;
  using G = typename Policy::gradient_type;
  constexpr int stage = Policy::strategy::zero_stage;
  constexpr bool separate_master = nn::parameter_store<Policy>::separate_master;
  const auto psi = static_cast<std::size_t>(padded_size<Policy>(elements, ranks));
  const std::size_t part = stage >= 1 ? psi / static_cast<std::size_t>(ranks) : psi;
  memory_report m;
  m.params = psi * sizeof(S);
  m.grads = (stage >= 2 ? part : psi) * sizeof(G);
  m.master = separate_master ? part * sizeof(float) : 0;
  m.optimizer_state = static_cast<std::size_t>(state_buffers) * part * sizeof(float);
  m.local_grads = stage >= 2 ? psi * sizeof(G) : 0;
  if (stage == 1) {
    const auto b = detail::plan_buckets(static_cast<index_t>(part), ranks, o);
    m.comm_buffers = static_cast<std::size_t>(b.slots) * static_cast<std::size_t>(ranks) * static_cast<std::size_t>(b.chunk) * sizeof(G);
  }
  return m;
}

/// The step after backward for a data-parallel or ZeRO (stage 1, 2) policy: gradient
/// reduction across the ranks of `Comm`, the agreed clipping and overflow decision, the
/// optimizer step (whole, or on this rank's partition) and the gathering of updated params.
/// See the file header for what each strategy does and keeps.
/// @tparam Policy the policy bundle; its strategy is data_parallel, zero<1> or zero<2>, its device cpu
/// @tparam Comm a communicator (thread_comm, mpi_comm, local_comm)
template <policy_bundle Policy, communicator Comm>
class distributed_step : private nn::gradient_listener {
 public:
  using strategy = typename Policy::strategy;
  using storage_type = typename Policy::storage_type;
  using gradient_type = typename Policy::gradient_type;
  /// The ZeRO stage: 0 (data parallel), 1 or 2.
  static constexpr int stage = strategy::zero_stage;
  static_assert(strategy::distributed,
                "parallel::distributed_step: the policy's strategy is trident::single; use train::step_control, or "
                "a distributed strategy (data_parallel, zero<1>, zero<2>)");
  static_assert(stage <= 2, "parallel::distributed_step: ZeRO stage 3 is not available yet");
  static_assert(std::is_same_v<typename Policy::device, cpu>,
                "parallel::distributed_step: the optimizer step runs on the cpu device (a cuda store needs ZeRO-Offload)");
  static_assert(std::is_same_v<typename Policy::master_type, float>,
                "parallel::distributed_step: the optimizers keep fp32 master weights (fp64 is for gradient checks)");

  /// Binds to this rank's store and communicator: checks the options, agrees with the other
  /// ranks that the stores have the same layout, pads the store for ZeRO, broadcasts rank 0's
  /// params (and master weights), and for ZeRO takes this rank's master partition and
  /// releases the store's full master copy. A collective: every rank constructs its own
  /// at the same time. The store and the communicator must outlive it.
  distributed_step(nn::parameter_store<Policy>& store, Comm& comm, const distributed_options& o = {})
      : store_(store), comm_(comm), o_(o), control_(o.step) {
    detail::check_options(o);
    if (!store.allocated()) {
      throw error("parallel::distributed_step: the parameter store is not allocated (declare the model's tensors, then "
                  "call store.allocate() and initialise it before constructing the step)");
    }
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
      if constexpr (stage == 2) {
        shard_ = tensor<gradient_type>({part_});
      } else {
        plan_ = detail::plan_buckets(part_, ranks_, o_);
        staging_ = tensor<gradient_type>({static_cast<index_t>(plan_.slots) * ranks_ * plan_.chunk});
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
    if constexpr (stage == 0) {
      if (store_.listener() == this) store_.set_gradient_listener(nullptr);
      for (auto& r : inflight_) {
        try {
          r.wait();
        } catch (...) {  // a destructor cannot report it; the next collective on the communicator will
        }
      }
    }
  }

  /// While the returned guard lives, backward passes (data parallel) start no reduction: for
  /// the micro-batches of an accumulation window before the last, as PyTorch's no_sync().
  /// step() reduces whatever was not reduced, so forgetting to leave it costs only the overlap.
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
  /// Whether backward passes reduce their gradients as they go (data parallel; false inside
  /// no_sync() and before a first backward has reported every tensor).
  bool overlapping() const noexcept { return stage == 0 && overlap_ && sync_; }

  /// After the last micro-batch's backward on every rank: reduces the gradients, decides the
  /// step as all ranks agree (clip factor, fp16 overflow skip and loss scale), steps `opt`
  /// (whole store, or this rank's partition) and gathers the params. A collective. Does not
  /// zero the store's gradients (call store.zero_grad() at the accumulation boundary).
  /// Under ZeRO, `opt` is bound to this rank's partition at its first step and must not step
  /// any other range afterwards.
  template <class Optimizer>
  train::step_outcome step(Optimizer& opt) {
    if constexpr (stage == 0) {
      finish_round();
    } else {
      reduce_gradients();
    }
    const gradient_type* g = stage == 2 ? shard_.data() : store_.grads().data() + begin_;
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
      optim::flat_shard<Policy> s{begin_, end_, g, master_data(), store_.params().data() + begin_,
                                  [this](double* x, index_t n) { comm_.all_reduce(x, n, reduce_op::sum); }};
      opt.step(store_, s, r.grad_scale);
      storage_type* p = store_.params().data();
      comm_.all_gather(p + begin_, p, part_);
    }
    return r;
  }

  /// After params were loaded into the store on every rank (a checkpoint): rebuilds the master
  /// weights from them, the whole copy (data parallel) or this rank's partition (ZeRO).
  void master_from_params() {
    if constexpr (!separate_master) {
      return;
    } else if constexpr (stage == 0) {
      store_.master_from_params();
    } else {
      if (part_) simd::convert(store_.params().data() + begin_, master_.data(), static_cast<std::size_t>(part_));
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

  /// The bytes this rank holds now, by role (optimizer state once `opt` has stepped or been
  /// bound). Equals estimate_memory<Policy>(elements, ranks, state buffers, options()).
  template <class Optimizer>
  memory_report memory(const Optimizer& opt) const {
    memory_report m;
    const auto n = static_cast<std::size_t>(store_.size());
    m.params = n * sizeof(storage_type);
    m.grads = stage == 2 ? static_cast<std::size_t>(shard_.numel()) * sizeof(gradient_type) : n * sizeof(gradient_type);
    if constexpr (separate_master) m.master = stage >= 1 ? static_cast<std::size_t>(master_.numel()) * sizeof(float) : n * sizeof(float);
    m.optimizer_state = opt.state_bytes();
    m.local_grads = stage == 2 ? n * sizeof(gradient_type) : 0;
    m.comm_buffers = static_cast<std::size_t>(staging_.numel()) * sizeof(gradient_type);
    return m;
  }

 private:
  static constexpr bool separate_master = nn::parameter_store<Policy>::separate_master;

  float* master_data() {
    if constexpr (separate_master) {
      return master_.data();
    } else {
      return store_.params().data() + begin_;
    }
  }

  /// One all-reduce (max) of the layout and the options, negated for the minimum: every rank
  /// learns whether all agree, and all throw alike when they do not.
  void agree_on_layout() {
    const double mine[] = {static_cast<double>(store_.size()), static_cast<double>(store_.infos().size()),
                           static_cast<double>(o_.reduce_bucket_size), static_cast<double>(o_.max_in_flight)};
    constexpr int k = 4;
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
    if (v[2] != -v[k + 2] || v[3] != -v[k + 3]) {
      throw error("parallel::distributed_step: the ranks' options differ (reduce_bucket_size from " + range(2) + ", max_in_flight from " +
                  range(3) + "): every rank must use the same");
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
      const index_t ready_from = top_ < 0 ? 0 : top_ + 1 < static_cast<int>(infos.size()) ? infos[static_cast<std::size_t>(top_) + 1].offset : store_.size();
      while (next_bucket_ >= 0 && next_bucket_ * o_.reduce_bucket_size >= ready_from) launch_bucket(next_bucket_--);
      for (auto& r : inflight_) (void)r.test();  // lets MPI progress the ones in flight
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
  /// zero<2>: one reduce-scatter into the shard.
  void reduce_gradients() {
    gradient_type* g = store_.grads().data();
    if constexpr (stage == 1) {
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
    } else {
      comm_.reduce_scatter(g, shard_.data(), part_, reduce_op::average);
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
  tensor<gradient_type> shard_;          // zero<2>: this rank's reduced gradient shard
  tensor<gradient_type> staging_;        // zero<1>: reduce-scatter buckets
  detail::bucket_plan plan_{};
  // data parallel: the reduction during backward
  std::vector<char> ready_;                            // per tensor: final in this round
  int top_ = -1;                                       // highest tensor not yet ready
  index_t next_bucket_ = -1;                           // highest bucket not yet launched
  bool reduced_ = false;                               // a backward reduced every bucket, no report since
  bool sync_ = true;                                   // false inside no_sync()
  bool overlap_ = false;                               // launch during backward (after a complete round)
  bool complete_round_seen_ = false;                   // some backward reported every tensor
  std::deque<typename Comm::request_type> inflight_;
};

}  // namespace trident::parallel
