// Data-parallel efficiency: the P5 MLP (784-1024-1024-10, linear + ReLU, softmax cross-entropy,
// SGD(0.01, momentum 0.9), one fixed synthetic global batch of 256, built as bench_mlp builds
// it) trained by N MPI ranks with parallel::distributed_step<Policy, mpi_comm>. Every rank
// holds the same global batch and computes forward and backward on its rows [r·B/N, (r+1)·B/N)
// (its gradient is the mean over them); the step reduces the gradients across the ranks as the
// strategy says (parallel/zero.hpp: data parallel all-reduces them in buckets, launched from
// backward as gradients become final; zero<1> reduce-scatters them in step(); zero<2> hands
// backward a gradient buffer per unit and reduce-scatters each unit from backward into the
// rank's shard; ZeRO then steps the rank's partition and all-gathers the params), and every
// rank then holds the params single-process training on the whole batch would. Run it with 1
// rank for the baseline.
//
// Gradients: under data parallel the SGD step clears them as it reads them (as bench_mlp does);
// under ZeRO the optimizer steps one partition only, so the step starts with store.zero_grad().
//
// A step is forward + backward on the rank's rows, then distributed_step::step. Each round times
// S steps after a barrier (S chosen once so that a round lasts --min-seconds) and records the
// slowest rank's time per step; the table gives medians over the rounds of samples/s (global
// batch / step time) and of the step's two parts (forward + backward, and distributed_step::step
// including the wait for the other ranks; each the slowest rank's mean). Collectives launched
// from backward (data parallel, zero<2>) are inside "forward + backward". After the rounds, two
// parts are timed alone, every rank at once: forward + backward on the rank's rows by a
// single-process replica (no collective; each pass started together after a barrier; the median
// of the slowest rank's time, as a synchronous step waits for it), and the collectives of the
// strategy on one buffer the size of the store (median of 7; all_reduce for data parallel,
// reduce_scatter + all_gather for ZeRO), blocking and non-blocking + wait (the step uses MPI's
// non-blocking collectives for the gradients). The minor page faults per step during the rounds
// are counted too (getrusage; the most of any rank): buffers allocated per step show there.
//
// Before timing: 5 steps of the distributed training against 5 steps of single-process training
// (policy<Precision, cpu>, the same model, the whole batch) on every rank: the fp32 master
// weights of the rank's partition must have moved as the single process's did (relative 2-norm
// of the difference of the updates; the summation order of the gradients differs), the ranks
// must hold bitwise equal params, and the loss must fall over 21 steps.
//
//   mpiexec -n N bench_dp [--strategy dp|zero1|zero2] [--precision fp32|bf16] [--batch 256]
//                         [--bucket ELEMENTS] [--rounds 5] [--min-seconds 1] [--json]
//
// Environment: OMP_NUM_THREADS=1 OMP_PROC_BIND=true per rank (run-dp.sh), mpiexec --bind-to core.
#include <trident/mpi.hpp>
#include <trident/nn/linear.hpp>
#include <trident/nn/loss.hpp>
#include <trident/optim/sgd.hpp>
#include <trident/parallel/zero.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <sys/resource.h>

#include "common.hpp"
#include "p5_mlp.hpp"

namespace {

using namespace trident;

using bench::classes;
using bench::hidden;
using bench::in_features;
constexpr int check_steps = 5;

template <policy_bundle P>
using replica = bench::p5_mlp<P>;

/// Minor page faults of this process so far.
long minor_faults() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

double max_over_ranks(double v) {
  double m = 0;
  MPI_Allreduce(&v, &m, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return m;
}

double sum_over_ranks(double v) {
  double m = 0;
  MPI_Allreduce(&v, &m, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  return m;
}

/// What one configuration measured (rank 0 prints it).
struct result {
  std::vector<double> sps, step_ms, fb_ms, dist_ms;
  double comm_ms = 0;       // the strategy's collectives alone, on a store-sized buffer, blocking
  double comm_nb_ms = 0;    // the same as the step calls them (non-blocking where it uses them)
  double compute_ms = 0;    // forward + backward alone on the rank's rows, every rank at once
  double faults = 0;        // minor page faults per step during the rounds (the most of any rank)
  double update_err = 0;    // vs single-process training
  bool ranks_equal = false;
  double loss_first = 0, loss_last = 0;
  index_t elements = 0;     // flat store size (padded)
  double state_mib = 0;     // model states held per rank (memory_report)
  int steps_per_round = 0;
};

/// 2-norm of (a - a0) - (b - b0) over 2-norm of (b - b0).
double update_error(const std::vector<double>& a, const std::vector<double>& a0, const std::vector<double>& b, const std::vector<double>& b0) {
  double err = 0, mag = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double da = a[i] - a0[i], db = b[i] - b0[i];
    err += (da - db) * (da - db);
    mag += db * db;
  }
  return mag > 0 ? std::sqrt(err / mag) : std::sqrt(err);
}

/// @tparam Precision fp32 or bf16_mixed
/// @tparam Strategy data_parallel, zero<1> or zero<2>
template <class Precision, class Strategy>
result run(mpi_comm& comm, index_t global, const parallel::distributed_options& o, const bench::run_options& args) {
  using P = policy<Precision, cpu, Strategy>;
  using Single = policy<Precision, cpu>;
  constexpr bool zero_stage = Strategy::zero_stage >= 1;
  const int rank = comm.rank(), size = comm.size();
  const index_t first = global * rank / size, rows = global / size;
  result res;

  replica<P> m(global, first, rows);
  if constexpr (!zero_stage) m.opt.set_zero_grad_in_step(true);  // the SGD pass clears what it read
  parallel::distributed_step<P, mpi_comm> dist(m.store, comm, o);
  const auto [pb, pe] = dist.partition();
  res.elements = m.store.size();

  auto step = [&] {
    if constexpr (zero_stage) m.store.zero_grad();
    m.forward_backward();
    dist.step(m.opt);
  };
  // The fp32 master weights over [pb, pe) (ZeRO: the rank's partition; data parallel: its share).
  auto master = [&]() -> std::vector<double> {
    std::vector<double> v;
    if constexpr (zero_stage) {
      const float* p = dist.master().data();
      for (index_t i = pb; i < pe; ++i) v.push_back(p[i - pb]);
    } else {
      const float* p = m.store.master().data();
      for (index_t i = pb; i < pe; ++i) v.push_back(p[i]);
    }
    return v;
  };

  // Single-process training on the whole batch, the same number of steps.
  replica<Single> ref(global, 0, global);
  ref.opt.set_zero_grad_in_step(true);
  auto ref_master = [&](index_t b, index_t e) {
    std::vector<double> v;
    const float* p = ref.store.master().data();
    for (index_t i = b; i < e; ++i) v.push_back(i < ref.store.size() ? p[i] : 0.0);
    return v;
  };
  const auto d0 = master();
  const auto r0 = ref_master(pb, pe);
  for (int s = 0; s < check_steps; ++s) {
    step();
    ref.forward_backward();
    ref.opt.step(ref.store);
  }
  res.update_err = max_over_ranks(update_error(master(), d0, ref_master(pb, pe), r0));
  {  // every rank's params equal rank 0's, bit for bit
    using S = typename P::storage_type;
    const auto n = static_cast<std::size_t>(m.store.size());
    std::vector<S> mine(m.store.params().data(), m.store.params().data() + n), root(mine);
    MPI_Bcast(root.data(), static_cast<int>(n * sizeof(S)), MPI_BYTE, 0, MPI_COMM_WORLD);
    int same = std::memcmp(mine.data(), root.data(), n * sizeof(S)) == 0 ? 1 : 0, all = 0;
    MPI_Allreduce(&same, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    res.ranks_equal = all == 1;
  }
  res.loss_first = sum_over_ranks(m.loss) / size;
  for (int s = 0; s < 21; ++s) step();
  res.loss_last = sum_over_ranks(m.loss) / size;
  res.state_mib = static_cast<double>(dist.memory(m.opt).model_states()) / (1024.0 * 1024.0);

  // Steps per round, agreed: from the slowest rank's time for 3 steps.
  MPI_Barrier(MPI_COMM_WORLD);
  const double t3 = max_over_ranks(bench::seconds_of([&] {
    for (int s = 0; s < 3; ++s) step();
  }));
  res.steps_per_round = static_cast<int>(std::clamp(std::ceil(args.min_seconds / (t3 / 3)), 3.0, 100000.0));

  const long faults_before = minor_faults();
  for (int r = 0; r < args.rounds; ++r) {
    double fb = 0, ds = 0;
    MPI_Barrier(MPI_COMM_WORLD);
    const auto t0 = bench::clock_type::now();
    for (int s = 0; s < res.steps_per_round; ++s) {
      const auto a = bench::clock_type::now();
      if constexpr (zero_stage) m.store.zero_grad();
      m.forward_backward();
      const auto b = bench::clock_type::now();
      dist.step(m.opt);
      const auto c = bench::clock_type::now();
      fb += std::chrono::duration<double>(b - a).count();
      ds += std::chrono::duration<double>(c - b).count();
    }
    const double total = std::chrono::duration<double>(bench::clock_type::now() - t0).count();
    const double per = max_over_ranks(total / res.steps_per_round);
    res.sps.push_back(static_cast<double>(global) / per);
    res.step_ms.push_back(per * 1e3);
    res.fb_ms.push_back(max_over_ranks(fb / res.steps_per_round) * 1e3);
    res.dist_ms.push_back(max_over_ranks(ds / res.steps_per_round) * 1e3);
  }
  res.faults = max_over_ranks(static_cast<double>(minor_faults() - faults_before) / (args.rounds * res.steps_per_round));

  // Forward + backward alone on this rank's rows (a single-process replica: no listener, no
  // collective), every rank at once as in training: the compute the step cannot do without.
  {
    replica<Single> local(global, first, rows);
    local.forward_backward();
    std::vector<double> t;
    for (int k = 0; k < std::max(7, res.steps_per_round); ++k) {
      local.store.zero_grad();
      MPI_Barrier(MPI_COMM_WORLD);
      t.push_back(max_over_ranks(bench::seconds_of([&] { local.forward_backward(); })));
    }
    res.compute_ms = bench::median(t) * 1e3;
  }

  // The strategy's collectives alone, on a buffer the size of the store, as one bucket (the
  // default bucket, 2^21 elements, covers this store of 1.86M): blocking, and non-blocking as the step
  // calls them (data parallel: iall_reduce + wait; ZeRO: ireduce_scatter + wait, then all_gather).
  {
    using G = typename P::gradient_type;
    using S = typename P::storage_type;
    const index_t n = m.store.size() / size * size;
    auto g = tensor<G>({n});
    auto out = tensor<G>({n / size});
    auto p = tensor<S>({n});
    auto timed = [&](bool nonblocking) {
      MPI_Barrier(MPI_COMM_WORLD);
      const double s = bench::seconds_of([&] {
        if constexpr (zero_stage) {
          if (nonblocking) {
            comm.ireduce_scatter(g.data(), out.data(), n / size, reduce_op::average).wait();
          } else {
            comm.reduce_scatter(g.data(), out.data(), n / size, reduce_op::average);
          }
          comm.all_gather(p.data() + rank * (n / size), p.data(), n / size);
        } else {
          if (nonblocking) {
            comm.iall_reduce(g.data(), n, reduce_op::average).wait();
          } else {
            comm.all_reduce(g.data(), n, reduce_op::average);
          }
        }
      });
      return max_over_ranks(s);
    };
    timed(false);
    timed(true);
    std::vector<double> tb, tn;
    for (int k = 0; k < 7; ++k) {
      tb.push_back(timed(false));
      tn.push_back(timed(true));
    }
    res.comm_ms = bench::median(tb) * 1e3;
    res.comm_nb_ms = bench::median(tn) * 1e3;
  }
  return res;
}

}  // namespace

int main(int argc, char** argv) {
  mpi_environment env(&argc, &argv);
  mpi_comm comm;
  const int rank = comm.rank(), size = comm.size();

  std::string strategy = "dp", precision = "fp32";
  index_t global = 256;
  parallel::distributed_options o;
  bench::run_options args{5, 1.0};
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--strategy") && i + 1 < argc) {
      strategy = argv[++i];
    } else if (!std::strcmp(argv[i], "--precision") && i + 1 < argc) {
      precision = argv[++i];
    } else if (!std::strcmp(argv[i], "--batch") && i + 1 < argc) {
      global = std::atoll(argv[++i]);
    } else if (!std::strcmp(argv[i], "--bucket") && i + 1 < argc) {
      o.reduce_bucket_size = std::atoll(argv[++i]);
    } else if (args.parse(i, argc, argv)) {
    } else {
      if (rank == 0) {
        std::fprintf(stderr,
                     "usage: mpiexec -n N %s [--strategy dp|zero1|zero2] [--precision fp32|bf16] [--batch 256] [--bucket ELEMENTS] "
                     "[--rounds R] [--min-seconds S] [--json]\n",
                     argv[0]);
      }
      return 2;
    }
  }
  const bool known = (strategy == "dp" || strategy == "zero1" || strategy == "zero2") && (precision == "fp32" || precision == "bf16");
  if (!known || global <= 0 || global % size != 0 || args.rounds <= 0) {
    if (rank == 0) std::fprintf(stderr, "bench_dp: unknown strategy or precision, or the batch %lld does not divide among %d ranks\n",
                                static_cast<long long>(global), size);
    return 2;
  }

  auto dispatch = [&]<class Precision>(Precision) {
    if (strategy == "dp") return run<Precision, data_parallel>(comm, global, o, args);
    if (strategy == "zero1") return run<Precision, zero<1>>(comm, global, o, args);
    return run<Precision, zero<2>>(comm, global, o, args);
  };
  const result r = precision == "fp32" ? dispatch(fp32{}) : dispatch(bf16_mixed{});

  // fp32: the gradients of N shards summed in another order than one batch's (≈1e-6). bf16:
  // activations rounded to bf16 on different row blocks do not change; the order does.
  const bool ok = r.update_err < (precision == "fp32" ? 1e-4 : 1e-2) && r.ranks_equal && r.loss_last < 0.98 * r.loss_first;
  const int threads = cpu_kernels::available_threads();
  if (rank == 0) {
    std::printf("# bench_dp: %s %s, %d ranks x %d threads, global batch %lld (%lld rows per rank), %d rounds of %d steps; flat store %lld "
                "elements, model states %.2f MiB per rank; updates vs single process: %.2e, ranks' params %s, loss over 21 steps %.4f -> "
                "%.4f -> %s\n",
                strategy.c_str(), precision.c_str(), size, threads, static_cast<long long>(global), static_cast<long long>(global / size),
                args.rounds, r.steps_per_round, static_cast<long long>(r.elements), r.state_mib, r.update_err,
                r.ranks_equal ? "equal" : "DIFFER", r.loss_first, r.loss_last, ok ? "ok" : "FAILED");
    std::printf("| strategy | ranks x threads | samples/s | step ms | forward+backward ms | distributed step ms | compute alone ms | "
                "collectives alone ms: blocking | non-blocking | page faults per step |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
    std::printf("| %s %s | %d x %d | %s | %s | %s | %s | %.2f | %.2f | %.2f | %.0f |\n", strategy.c_str(), precision.c_str(), size, threads,
                bench::spread(r.sps, "%.0f").c_str(), bench::spread(r.step_ms, "%.2f").c_str(), bench::spread(r.fb_ms, "%.2f").c_str(),
                bench::spread(r.dist_ms, "%.2f").c_str(), r.compute_ms, r.comm_ms, r.comm_nb_ms, r.faults);
    if (args.json) {
      std::printf("{\"bench\":\"dp\",\"strategy\":\"%s\",\"precision\":\"%s\",\"ranks\":%d,\"threads\":%d,\"batch\":%lld,\"samples_per_s\":%.1f,"
                  "\"step_ms\":%.4f,\"fb_ms\":%.4f,\"dist_ms\":%.4f,\"compute_ms\":%.4f,\"comm_ms\":%.4f,\"comm_nb_ms\":%.4f,\"faults\":%.1f,\"update_err\":%.3g,\"loss_first\":%.4f,"
                  "\"loss_last\":%.4f,\"state_mib\":%.3f,\"ok\":%s}\n",
                  strategy.c_str(), precision.c_str(), size, threads, static_cast<long long>(global), bench::median(r.sps),
                  bench::median(r.step_ms), bench::median(r.fb_ms), bench::median(r.dist_ms), r.compute_ms, r.comm_ms, r.comm_nb_ms, r.faults, r.update_err, r.loss_first,
                  r.loss_last, r.state_mib, ok ? "true" : "false");
    }
  }
  return ok ? 0 : 1;
}
