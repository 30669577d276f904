// zero_demo: the Fashion-MNIST MLP of fashion_mnist_mlp (784-512-256-10, ReLU, dropout) trained
// under mpiexec with the precision and the parallel strategy that a DeepSpeed JSON config asks
// for, then the bytes every rank holds by role against parallel::estimate_memory and DeepSpeed's
// ZeRO formula. One binary holds fp32, bf16_mixed and fp16_mixed, each with single (stage 0 on one
// rank), data_parallel (stage 0), zero<1>, zero<2> and zero<3>; config::dispatch picks one at run
// time.
//
//   mpiexec -n 4 build/examples/zero_demo --config examples/configs/zero2_fp16.json --eval
//   mpiexec -n 2 build/examples/zero_demo --config examples/configs/zero1_bf16.json --steps 1000
//   mpiexec -n 2 build/examples/zero_demo --config examples/configs/zero3_bf16.json --eval
//
// What a rank does per optimizer step: it loads its own disjoint share of the global batch
// (train_batch_size samples, the same global batch for any number of ranks: rank r takes the
// r-th of N contiguous slices), zeroes its gradients at the accumulation boundary, runs forward
// and backward on each of gradient_accumulation_steps micro-batches of
// train_micro_batch_size_per_gpu samples with the loss scaled by loss_scale / accumulation steps
// (its gradient is then the mean over its share), and calls distributed_step::step, which
// averages the gradients over the ranks, clips and (fp16) skips overflowing steps alike on every
// rank, and steps the optimizer (whole, or the rank's ZeRO partition). The scheduler steps only
// when the step was applied, as DeepSpeed's engine does.
//
// Build: the fifteen policies are compiled in parallel, one precision per translation unit.
// examples/CMakeLists.txt compiles this file four times: with ZERO_DEMO_PRECISION=fp32,
// bf16_mixed or fp16_mixed it instantiates train_policy<P> for that precision's five strategies;
// with ZERO_DEMO_MAIN it holds main() and the dispatch, which calls those instantiations. With
// neither (g++ ... zero_demo.cpp) it is the whole program in one unit.
//
// Failures: everything that can go wrong with the input (options, the config, the data) is
// checked before training, and the ranks agree after each check (one all-reduce) so that every
// rank exits non-zero together; the config and the data are read by every rank from the same
// files, so their errors are the same everywhere and rank 0 alone prints them. An error during
// training (the distributed step's own errors are raised on every rank alike) makes the ranks
// meet at a barrier of their own; a rank the others do not join within a while aborts the job
// instead of leaving it hanging.

#include <mpi.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <variant>
#include <vector>

#include <trident/config/deepspeed.hpp>
#include <trident/io.hpp>
#include <trident/mpi.hpp>
#include <trident/trident.hpp>

#include "cli.hpp"

namespace zero_demo {

using namespace trident;

/// The program's options.
struct settings {
  std::string config{};
  std::int64_t steps = 400;
  std::string data_dir{};
  index_t train_limit = 0;  ///< 0: all 60000 training images
  bool eval = false;
  std::uint64_t seed = 42;
  int threads = 0;  ///< 0: OMP_NUM_THREADS, else default_threads()
};

/// The data every rank holds: both splits, normalised, and the part of the training split used.
struct dataset {
  io::fashion_mnist_splits splits;
  tensor_view<const float> train_images;
  std::span<const std::int32_t> train_labels;
};

/// Training and the report under policy P; returns the exit status. A class so that one line
/// instantiates it for a policy (below, per precision).
/// @tparam P the policy the config asked for
template <class P>
struct train_policy {
  static int run(const settings& s, const config::deepspeed_config& cfg, mpi_comm& comm, const dataset& data, const char* prog);
};

}  // namespace zero_demo

#if !defined(ZERO_DEMO_MAIN)
namespace zero_demo {

/// The same model as fashion_mnist_mlp's.
template <class P>
struct mlp {
  nn::parameter_store<P> store;
  nn::sequential<P, nn::flatten<P>, nn::linear<P>, nn::dropout<P>, nn::linear<P>, nn::dropout<P>, nn::linear<P>> net{
      nn::flatten<P>{},
      nn::linear<P>(store, "fc1", 784, 512, true, activation::relu),
      nn::dropout<P>(0.2),
      nn::linear<P>(store, "fc2", 512, 256, true, activation::relu),
      nn::dropout<P>(0.2),
      nn::linear<P>(store, "fc3", 256, 10)};
  // The first layer's input is data: no input gradient to compute.
  mlp() { net.template get<1>().set_input_grad(false); }
};

/// The step after backward: distributed_step for the distributed strategies, step_control (and
/// the same memory accounting by hand) for `single`.
template <class P, bool Distributed = P::strategy::distributed>
class stepper {
 public:
  stepper(nn::parameter_store<P>& store, mpi_comm& comm, const parallel::distributed_options& o) : dist_(store, comm, o) {}
  double loss_scale() const noexcept { return dist_.loss_scale(); }
  /// While the result lives, backward reduces nothing (data parallel's accumulation).
  [[nodiscard]] auto no_sync() { return dist_.no_sync(); }
  template <class O>
  train::step_outcome step(O& opt) {
    return dist_.step(opt);
  }
  template <class O>
  parallel::memory_report memory(const O& opt) const {
    return dist_.memory(opt);
  }
  /// ZeRO-3's units that stay gathered (the estimator counts them).
  index_t persistent_elements() const noexcept { return dist_.persistent_elements(); }
  /// The most bytes of gradient units, reductions in flight and gathered params at once.
  std::size_t peak_working_bytes() const noexcept { return dist_.peak_working_bytes(); }
  train::step_control<P>& control() noexcept { return dist_.control(); }

 private:
  parallel::distributed_step<P, mpi_comm> dist_;
};

template <class P>
class stepper<P, false> {
 public:
  stepper(nn::parameter_store<P>& store, mpi_comm&, const parallel::distributed_options& o) : store_(store), control_(o.step) {}
  double loss_scale() const noexcept { return control_.loss_scale(); }
  struct nothing {};
  nothing no_sync() const noexcept { return {}; }
  template <class O>
  train::step_outcome step(O& opt) {
    return control_.step(store_, opt);
  }
  template <class O>
  parallel::memory_report memory(const O& opt) const {
    parallel::memory_report m;
    const auto n = static_cast<std::size_t>(store_.size());
    m.params = n * sizeof(typename P::storage_type);
    m.grads = n * sizeof(typename P::gradient_type);
    if constexpr (nn::parameter_store<P>::separate_master) m.master = n * sizeof(float);
    m.optimizer_state = opt.state_bytes();
    return m;
  }
  index_t persistent_elements() const noexcept { return 0; }
  std::size_t peak_working_bytes() const noexcept { return 0; }
  train::step_control<P>& control() noexcept { return control_; }

 private:
  nn::parameter_store<P>& store_;
  train::step_control<P> control_;
};

/// fp32 state buffers an optimizer of the config keeps per parameter (estimate_memory's K / 4).
inline int state_buffers(const config::optimizer_variant& opt) {
  return std::visit(
      []<class O>(const O& o) -> int {
        if constexpr (std::is_same_v<O, optim::sgd>) {
          return o.momentum() != 0.0 ? 1 : 0;  // the buffer exists once a step ran with momentum
        } else if constexpr (std::is_same_v<O, optim::adagrad>) {
          return 1;
        } else {
          return 2;  // Adam, AdamW, LAMB: the two moments
        }
      },
      opt);
}

inline std::string with_commas(std::size_t v) {
  const std::string digits = std::to_string(v);
  std::string s;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) s += ',';
    s += digits[i];
  }
  return s;
}

/// Whether memory_report counts zero<3>'s gathered params (versions with ZeRO-3).
template <class M>
inline constexpr bool counts_gathered = requires(const M& m) { m.gathered; };

/// The roles of a memory_report, in the order the table prints them, then its model states
/// and total.
inline constexpr int roles = counts_gathered<parallel::memory_report> ? 7 : 6;
inline constexpr const char* role_names[] = {"params", "grads", "master", "optim_state", "local_grads", "comm_buffers", "gathered"};
template <class M>
std::array<double, roles + 2> fields(const M& m) {
  std::array<double, roles + 2> f{static_cast<double>(m.params),          static_cast<double>(m.grads),
                                  static_cast<double>(m.master),          static_cast<double>(m.optimizer_state),
                                  static_cast<double>(m.local_grads),     static_cast<double>(m.comm_buffers)};
  if constexpr (counts_gathered<M>) f[6] = static_cast<double>(m.gathered);
  f[roles] = static_cast<double>(m.model_states());
  f[roles + 1] = static_cast<double>(m.total());
  return f;
}

template <class P>
int train_policy<P>::run(const settings& s, const config::deepspeed_config& cfg, mpi_comm& comm, const dataset& data,
                         const char* prog) {
  using S = typename P::storage_type;
  using G = typename P::gradient_type;
  using clock = std::chrono::steady_clock;
  const int rank = comm.rank(), ranks = comm.size();
  const bool lead = rank == 0;
  const std::string policy_name = std::string("policy<") + P::traits::name + ", cpu, " + P::strategy::name + ">";

  mlp<P> model;
  model.store.allocate();
  generator init(s.seed);
  model.net.init(init);
  model.store.master_from_params();
  const index_t elements = model.store.size();  // before ZeRO pads it
  const parallel::distributed_options dopts = cfg.distributed_options();
  stepper<P> step(model.store, comm, dopts);  // a collective: rank 0's weights go to every rank

  config::optimizer_variant opt = cfg.optimizer ? config::make_optimizer(cfg)
                                                : config::optimizer_variant(std::in_place_type<optim::adamw>,
                                                                            optim::adamw_options{.lr = 1e-3, .weight_decay = 0.05});
  config::scheduler_variant sched = std::visit([&](auto& o) { return config::make_scheduler(cfg, o); }, opt);
  const auto lr = [&] { return std::visit([](const auto& o) { return o.lr(); }, opt); };

  const index_t micro = cfg.train_micro_batch_size_per_gpu;
  const auto accumulation = static_cast<index_t>(cfg.gradient_accumulation_steps);
  io::batch_loader<S> loader(data.train_images, data.train_labels,
                             {.batch_size = cfg.train_batch_size, .shuffle = true, .seed = s.seed, .drop_last = true, .rank = rank,
                              .world_size = ranks});
  const index_t per_epoch = loader.batches_per_epoch();

  if (lead) {
    std::printf("%s: %s on %d rank%s, %d OpenMP thread%s each\n", prog, policy_name.c_str(), ranks, ranks == 1 ? "" : "s",
                omp_get_max_threads(), omp_get_max_threads() == 1 ? "" : "s");
    std::printf("model: MLP 784-512-256-10 (dropout 0.2), %s parameters in %s flat elements (Ψ = %s after the strategy's padding)\n",
                with_commas(static_cast<std::size_t>(model.store.count())).c_str(), with_commas(static_cast<std::size_t>(elements)).c_str(),
                with_commas(static_cast<std::size_t>(model.store.size())).c_str());
    std::printf("batch: %lld samples per step = %lld per micro-batch x %lld accumulation steps x %d ranks; "
                "%lld steps over %lld training images (%lld global batches per epoch)\n",
                static_cast<long long>(cfg.train_batch_size), static_cast<long long>(micro), static_cast<long long>(accumulation), ranks,
                static_cast<long long>(s.steps), static_cast<long long>(data.train_labels.size()), static_cast<long long>(per_epoch));
    const double base_lr = cfg.optimizer ? std::visit([](const auto& o) { return o.lr; }, cfg.optimizer->options) : 1e-3;
    std::printf("optimizer: %s, lr %g; scheduler: %s (lr now %g); %s\n",
                cfg.optimizer ? cfg.optimizer->type.c_str() : "AdamW (the config has none: weight decay 0.05)", base_lr,
                cfg.scheduler ? cfg.scheduler->type.c_str() : "none, constant lr", lr(), step.control().describe().c_str());
    std::fflush(stdout);
  }

  nn::softmax_cross_entropy<P> loss;
  nn::arena<cpu> arena;
  generator dropout(s.seed + 0x9e3779b97f4a7c15ull * static_cast<std::uint64_t>(rank + 1));  // each rank its own masks
  std::vector<float> logits_f32;
  std::vector<double> step_ms;
  step_ms.reserve(static_cast<std::size_t>(s.steps));
  const std::int64_t print_every = std::max<std::int64_t>(1, cfg.steps_per_print);
  double window[3] = {0, 0, 0};  // loss × samples, correct, samples: this rank's since the last print
  double last_loss = std::numeric_limits<double>::quiet_NaN();

  for (std::int64_t t = 0; t < s.steps; ++t) {
    const auto t0 = clock::now();
    const auto epoch = static_cast<std::uint64_t>(t / per_epoch);
    if (loader.current_epoch() != epoch) loader.set_epoch(epoch);
    const auto& b = loader.load(t % per_epoch);  // this rank's micro × accumulation samples
    model.store.zero_grad();
    const double scale = step.loss_scale() / static_cast<double>(accumulation);
    const auto micro_batch = [&](index_t m) {
      const index_t lo = m * micro;
      const auto labels = b.labels.subspan(static_cast<std::size_t>(lo), static_cast<std::size_t>(micro));
      arena.reset();
      nn::context<P> ctx{arena, true, &dropout};
      auto logits = model.net.forward(ctx, b.inputs.slice(0, lo, lo + micro));  // (micro, 10)
      window[0] += loss.forward(ctx, logits, labels) * static_cast<double>(micro);
      window[1] += static_cast<double>(train::count_correct<S, cpu>(logits, labels, logits_f32));
      window[2] += static_cast<double>(micro);
      model.net.backward(ctx, loss.backward(ctx, scale));
    };
    for (index_t m = 0; m + 1 < accumulation; ++m) {
      [[maybe_unused]] const auto quiet = step.no_sync();  // data parallel: reduce once, after the last
      micro_batch(m);
    }
    micro_batch(accumulation - 1);
    const train::step_outcome r = std::visit([&](auto& o) { return step.step(o); }, opt);
    if (r.applied) {
      std::visit(
          [&](auto& o) {
            std::visit(
                [&]<class Sched>(Sched& sc) {
                  if constexpr (!std::is_same_v<Sched, std::monostate>) sc.step(o);
                },
                sched);
          },
          opt);
    }
    step_ms.push_back(std::chrono::duration<double, std::milli>(clock::now() - t0).count());

    if ((t + 1) % print_every == 0 || t + 1 == s.steps) {
      comm.all_reduce(window, 3, reduce_op::sum);
      last_loss = window[0] / window[2];
      if (lead) {
        std::printf("step %lld/%lld: loss %.4f acc %.4f lr %.3g", static_cast<long long>(t + 1), static_cast<long long>(s.steps), last_loss,
                    window[1] / window[2], lr());
        if (P::traits::loss_scaling) {
          std::printf(" loss scale %g (%lld skipped)", step.loss_scale(), static_cast<long long>(step.control().skipped_steps()));
        }
        const std::vector<double> recent(step_ms.end() - std::min<std::ptrdiff_t>(print_every, std::ssize(step_ms)), step_ms.end());
        std::printf(" | %.2f ms/step (median, rank 0)\n", example::median(recent));
        std::fflush(stdout);
      }
      window[0] = window[1] = window[2] = 0;
    }
  }

  // What the rank holds between steps (the evaluation below gathers ZeRO-3's units again).
  const parallel::memory_report measured = std::visit([&](const auto& o) { return step.memory(o); }, opt);

  // Test accuracy: each rank takes a contiguous 1/N of the test set, the sums are all-reduced.
  double test[3] = {0, 0, 0};  // loss × samples, correct, samples
  if (s.eval) {
    const auto& images = data.splits.test.images();
    const auto labels = data.splits.test.labels();
    const index_t n = data.splits.test.size(), lo = n * rank / ranks, hi = n * (rank + 1) / ranks;
    if (hi > lo) {
      io::batch_loader<S> eval(images.view().slice(0, lo, hi), labels.subspan(static_cast<std::size_t>(lo), static_cast<std::size_t>(hi - lo)),
                               {.batch_size = 500, .shuffle = false});
      for (const auto& b : eval.epoch(0)) {
        arena.reset();
        nn::context<P> ctx{arena, false, &dropout};
        auto logits = model.net.forward(ctx, b.inputs);
        test[0] += loss.forward(ctx, logits, b.labels) * static_cast<double>(b.size());
        test[1] += static_cast<double>(train::count_correct<S, cpu>(logits, b.labels, logits_f32));
        test[2] += static_cast<double>(b.size());
      }
    }
    comm.all_reduce(test, 3, reduce_op::sum);
  }
  const double test_accuracy = s.eval ? test[1] / test[2] : std::numeric_limits<double>::quiet_NaN();
  const double test_loss = s.eval ? test[0] / test[2] : std::numeric_limits<double>::quiet_NaN();

  // Memory by role, per rank, against the estimator (the same for every rank: equal partitions).
  const int k = state_buffers(opt);
  const parallel::memory_report estimate = parallel::estimate_memory<P>(elements, ranks, k, dopts, step.persistent_elements());
  constexpr int row = roles + 4;  // the fields, whether they equal the estimate, the median step time
  std::array<double, row> mine{};
  const auto f = fields(measured);
  std::copy(f.begin(), f.end(), mine.begin());
  mine[roles + 2] = measured == estimate ? 1.0 : 0.0;
  mine[roles + 3] = example::median(step_ms);
  std::vector<double> all(static_cast<std::size_t>(row * ranks));
  comm.all_gather(mine.data(), all.data(), row);

  if (lead) {
    constexpr int stage = P::strategy::zero_stage;
    const index_t psi = parallel::padded_size<P>(elements, ranks);
    const auto bytes = [](double v) { return with_commas(static_cast<std::size_t>(v)); };
    std::printf("\nmemory per rank, bytes held by role (parallel::memory_report) against parallel::estimate_memory:\n");
    std::printf("%-9s", "rank");
    for (int i = 0; i < roles; ++i) std::printf(" %13s", role_names[i]);
    std::printf(" %13s %13s %9s %8s\n", "model_states", "total", "estimate", "step_ms");
    bool every_rank_matches = true;
    for (int r = 0; r < ranks; ++r) {
      const double* v = all.data() + static_cast<std::ptrdiff_t>(r) * row;
      std::printf("%-9d", r);
      for (int i = 0; i < roles + 2; ++i) std::printf(" %13s", bytes(v[i]).c_str());
      std::printf(" %9s %8.2f\n", v[roles + 2] == 1.0 ? "equal" : "DIFFERS", v[roles + 3]);
      every_rank_matches = every_rank_matches && v[roles + 2] == 1.0;
    }
    std::printf("%-9s", "estimate");
    for (double v : fields(estimate)) std::printf(" %13s", bytes(v).c_str());
    std::printf("\n");
    if (!every_rank_matches) {
      std::printf("memory: a rank's bytes differ from estimate_memory<%s>(%lld elements, %d ranks, %d state buffers)\n",
                  policy_name.c_str(), static_cast<long long>(elements), ranks, k);
    }

    // DeepSpeed's formula counts 2-byte params and grads, an fp32 master and Adam's two fp32
    // moments (K = 12): exact for fp16_mixed with Adam/AdamW (Ψ padded as the step pads).
    const std::size_t formula = parallel::zero_formula_bytes(stage, psi, ranks);
    const char* shape = stage == 0 ? "16Ψ" : stage == 1 ? "4Ψ + 12Ψ/N" : stage == 2 ? "2Ψ + 14Ψ/N" : "16Ψ/N";
    const bool formula_exact = sizeof(S) == 2 && sizeof(G) == 2 && nn::parameter_store<P>::separate_master && k == 2;
    std::printf("ZeRO formula (DeepSpeed, stage %d, Ψ = %s, N = %d): %s = %s bytes of model states; this run holds %s: %s\n", stage,
                with_commas(static_cast<std::size_t>(psi)).c_str(), ranks, shape, with_commas(formula).c_str(),
                with_commas(measured.model_states()).c_str(), measured.model_states() == formula ? "equal" : "different");
    if (!formula_exact) {
      std::printf("  (the formula is exact only for mixed-precision Adam: 2-byte params and grads, fp32 master, two fp32 moments; "
                  "this run has %zu-byte params, %zu-byte grads, %s and %d fp32 optimizer state buffer%s)\n",
                  sizeof(S), sizeof(G), nn::parameter_store<P>::separate_master ? "an fp32 master" : "no separate master (fp32 params)",
                  k, k == 1 ? "" : "s");
    }
    if (stage >= 2) {
      std::printf("  (outside the formula: at most %s bytes of gradient units and reductions in flight%s at once during a step, "
                  "rank 0)\n",
                  with_commas(step.peak_working_bytes()).c_str(), stage == 3 ? " and gathered params" : "");
    }

    double slowest = 0;
    for (int r = 0; r < ranks; ++r) slowest = std::max(slowest, all[static_cast<std::size_t>(r * row + roles + 3)]);
    if (s.eval) std::printf("\ntest: accuracy %.4f, loss %.4f on %.0f images\n", test_accuracy, test_loss, test[2]);
    std::printf("RESULT example=zero_demo strategy=%s precision=%s ranks=%d steps=%lld memory_matches_estimate=%s test_accuracy=%.4f "
                "test_loss=%.4f train_loss=%.4f step_ms=%.2f skipped_steps=%lld model_states_bytes=%zu formula_bytes=%zu\n",
                P::strategy::name, P::traits::name, ranks, static_cast<long long>(s.steps), every_rank_matches ? "yes" : "no",
                test_accuracy, test_loss, last_loss, slowest, static_cast<long long>(step.control().skipped_steps()),
                measured.model_states(), formula);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace zero_demo
#endif

#if defined(ZERO_DEMO_PRECISION)
template struct zero_demo::train_policy<trident::policy<trident::ZERO_DEMO_PRECISION, trident::cpu, trident::single>>;
template struct zero_demo::train_policy<trident::policy<trident::ZERO_DEMO_PRECISION, trident::cpu, trident::data_parallel>>;
template struct zero_demo::train_policy<trident::policy<trident::ZERO_DEMO_PRECISION, trident::cpu, trident::zero<1>>>;
template struct zero_demo::train_policy<trident::policy<trident::ZERO_DEMO_PRECISION, trident::cpu, trident::zero<2>>>;
template struct zero_demo::train_policy<trident::policy<trident::ZERO_DEMO_PRECISION, trident::cpu, trident::zero<3>>>;
#else
namespace zero_demo {
namespace {

void usage(const char* prog, const settings& d, std::FILE* to) {
  std::fprintf(to,
               "usage: mpiexec -n N %s --config FILE [options]\n"
               "  --config FILE    DeepSpeed JSON config (required): batch sizes, optimizer, scheduler, fp16/bf16,\n"
               "                   zero_optimization.stage 0, 1 or 2, gradient_clipping, steps_per_print\n"
               "  --steps N        optimizer steps (default %lld; the example configs' schedules span 400)\n"
               "  --data DIR       Fashion-MNIST directory (default $TRIDENT_FASHION_MNIST_DIR or\n"
               "                   /usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist)\n"
               "  --train-limit N  train on the first N images only (at least train_batch_size)\n"
               "  --eval           test accuracy on the full test set at the end (sharded over the ranks)\n"
               "  --seed N         initialisation, shuffling and dropout seed (default %llu)\n"
               "  --threads N      OpenMP threads per rank (default: OMP_NUM_THREADS, else the cores mpiexec\n"
               "                   bound the rank to, else the node's cores divided among its ranks)\n",
               prog, static_cast<long long>(d.steps), static_cast<unsigned long long>(d.seed));
}

/// Thrown by the usage printer after a command-line error: every rank exits with this status.
struct exit_now {
  int status;
};

/// Parses argv; on an error, prints it and (rank 0) the usage, and throws exit_now.
settings parse(int argc, char** argv, int rank) {
  const settings defaults;
  settings s;
  const example::cli args(argc, argv, [&](std::FILE* to) {
    if (rank == 0) usage(argv[0], defaults, to);
    throw exit_now{2};
  });
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--config") s.config = args.value(i);
    else if (a == "--steps") s.steps = args.integer(i, 1);
    else if (a == "--data") s.data_dir = args.value(i);
    else if (a == "--train-limit") s.train_limit = args.integer(i, 1);
    else if (a == "--eval") s.eval = true;
    else if (a == "--seed") s.seed = static_cast<std::uint64_t>(args.integer(i, 0));
    else if (a == "--threads") s.threads = static_cast<int>(args.integer(i, 1));
    else if (a == "--help" || a == "-h") {
      if (rank == 0) usage(argv[0], defaults, stdout);
      throw exit_now{0};
    } else {
      args.fail("unknown option '" + std::string(a) + "'");
    }
  }
  if (s.config.empty()) args.fail("--config FILE is required (a DeepSpeed JSON config, e.g. examples/configs/zero1_bf16.json)");
  return s;
}

/// Runs `f` on every rank, then the ranks agree (one all-reduce) whether it succeeded on all of
/// them; false on every rank when it failed on any. When it failed on all (the same config or
/// data read by every rank), rank 0 alone prints the message; otherwise each failing rank
/// prints its own and the others say why they stop.
template <class F>
bool on_every_rank(mpi_comm& comm, const char* prog, F&& f) {
  std::string what;
  bool ok = true;
  try {
    f();
  } catch (const std::exception& e) {
    ok = false;
    what = e.what();
  } catch (...) {
    ok = false;
    what = "unknown exception";
  }
  std::int32_t failed = ok ? 0 : 1;
  comm.all_reduce(&failed, 1, reduce_op::sum);
  if (failed == 0) return true;
  if (failed == comm.size()) {
    if (comm.rank() == 0) std::fprintf(stderr, "%s: %s\n", prog, what.c_str());
  } else if (!ok) {
    std::fprintf(stderr, "%s: rank %d of %d: %s\n", prog, comm.rank(), comm.size(), what.c_str());
  } else if (comm.rank() == 0) {
    std::fprintf(stderr, "%s: stopping: %d of %d ranks failed (their messages above)\n", prog, static_cast<int>(failed), comm.size());
  }
  std::fflush(stderr);
  return false;
}

/// After an error during training: the ranks meet at a barrier on `failures` (a communicator
/// used for nothing else, so it cannot match a collective of the training). When every rank
/// comes (the error was collective), rank 0 prints it and all return 1; a rank that waits in vain
/// prints its own error and aborts the job rather than hang.
int fail_together(MPI_Comm failures, int rank, const char* prog, const std::string& what) {
  MPI_Request req = MPI_REQUEST_NULL;
  int done = 0;
  if (MPI_Ibarrier(failures, &req) == MPI_SUCCESS) {
    const auto t0 = std::chrono::steady_clock::now();
    while (!done && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(30)) {
      if (MPI_Test(&req, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) break;
      if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  if (done) {
    if (rank == 0) std::fprintf(stderr, "%s: %s\n", prog, what.c_str());
    std::fflush(stderr);
    return 1;
  }
  std::fprintf(stderr, "%s: rank %d: %s (the other ranks did not stop with it: aborting the job)\n", prog, rank, what.c_str());
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, 1);
  return 1;
}

/// A list of policies: config::dispatch among them.
template <class... Policies>
struct policy_list {
  template <class F>
  static int dispatch(const config::deepspeed_config& c, F&& f) {
    return config::dispatch<Policies...>(c, std::forward<F>(f));
  }
};

/// The policies this binary is compiled for: what the config chooses among.
using compiled = policy_list<policy<fp32, cpu, single>, policy<fp32, cpu, data_parallel>, policy<fp32, cpu, zero<1>>,
                             policy<fp32, cpu, zero<2>>, policy<fp32, cpu, zero<3>>, policy<bf16_mixed, cpu, single>,
                             policy<bf16_mixed, cpu, data_parallel>, policy<bf16_mixed, cpu, zero<1>>, policy<bf16_mixed, cpu, zero<2>>,
                             policy<bf16_mixed, cpu, zero<3>>, policy<fp16_mixed, cpu, single>, policy<fp16_mixed, cpu, data_parallel>,
                             policy<fp16_mixed, cpu, zero<1>>, policy<fp16_mixed, cpu, zero<2>>, policy<fp16_mixed, cpu, zero<3>>>;

/// Throws dispatch's config_error, naming what the config asks for and the policies this binary
/// has, when it has none for the config.
void check_policy(const config::deepspeed_config& c) {
  compiled::dispatch(c, [](auto) { return 0; });
}

/// OpenMP threads per rank when neither --threads nor OMP_NUM_THREADS says: the cores mpiexec
/// bound this process to, or, when it is not bound, the node's cores shared among its ranks.
int default_threads() {
  const int usable = omp_get_num_procs();  // the cores of this process's affinity mask
  if (usable < static_cast<int>(std::thread::hardware_concurrency())) return std::max(1, usable);
  MPI_Comm node = MPI_COMM_NULL;
  int local = 1;
  if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
    MPI_Comm_size(node, &local);
    MPI_Comm_free(&node);
  }
  return std::max(1, usable / std::max(1, local));
}

int run(int argc, char** argv) {
  const char* prog = "zero_demo";
  mpi_comm comm;
  mpi_comm failures;  // for fail_together only
  const int rank = comm.rank();

  // Rank 0 parses first and alone prints what is wrong; the others follow its verdict (they see
  // the same arguments), and all agree on the exit status.
  settings s;
  const auto try_parse = [&]() -> std::int32_t {
    try {
      s = parse(argc, argv, rank);
      return -1;
    } catch (const exit_now& e) {
      return e.status;
    }
  };
  std::int32_t status = rank == 0 ? try_parse() : -1;
  comm.broadcast(&status, 1, 0);
  if (status < 0 && rank != 0) status = try_parse();
  comm.all_reduce(&status, 1, reduce_op::max);
  if (status >= 0) return status;
  if (s.threads > 0) {
    omp_set_num_threads(s.threads);
  } else if (const char* env = std::getenv("OMP_NUM_THREADS"); !env || !*env) {
    omp_set_num_threads(default_threads());
  }

  // The config, read by every rank (the world size enters the batch rule); then whether this
  // binary has the policy it asks for.
  config::deepspeed_config cfg;
  if (!on_every_rank(comm, prog, [&] { cfg = config::load_deepspeed_config(s.config, {.world_size = comm.size()}); })) return 1;
  if (rank == 0) {
    std::printf("DeepSpeed config %s, effective (defaults filled in, world size %d):\n%s\n", s.config.c_str(), comm.size(), cfg.str().c_str());
    std::fflush(stdout);
  }
  if (!on_every_rank(comm, prog, [&] { check_policy(cfg); })) return 1;

  // The data, read by every rank; the part used must hold at least one global batch.
  std::optional<dataset> data;
  if (!on_every_rank(comm, prog, [&] {
        auto splits = io::load_fashion_mnist(true, s.data_dir);
        data.emplace(dataset{std::move(splits), {}, {}});
        data->train_images = data->splits.train.images().view();
        data->train_labels = data->splits.train.labels();
        if (s.train_limit > 0 && s.train_limit < data->splits.train.size()) {
          data->train_images = data->train_images.slice(0, 0, s.train_limit);
          data->train_labels = data->train_labels.first(static_cast<std::size_t>(s.train_limit));
        }
        const auto n = static_cast<std::int64_t>(data->train_labels.size());
        if (n < cfg.train_batch_size) {
          throw error("the " + std::to_string(n) + " training images used (--train-limit) are fewer than one global batch " +
                      "(train_batch_size " + std::to_string(cfg.train_batch_size) + ")");
        }
      })) {
    return 1;
  }

  try {
    return compiled::dispatch(cfg, [&]<class P>(config::type_tag<P>) { return train_policy<P>::run(s, cfg, comm, *data, prog); });
  } catch (const std::exception& e) {
    return fail_together(failures.native(), rank, prog, e.what());
  } catch (...) {
    return fail_together(failures.native(), rank, prog, "unknown exception");
  }
}

}  // namespace
}  // namespace zero_demo

int main(int argc, char** argv) {
  try {
    trident::mpi_environment env(&argc, &argv);
    return zero_demo::run(argc, argv);  // the environment finalises MPI after the communicators are freed
  } catch (const std::exception& e) {
    std::fprintf(stderr, "zero_demo: %s\n", e.what());
    return 1;
  }
}

#endif
