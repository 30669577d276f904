// Data-parallel efficiency on the large GPT shape of P4 (block 256, batch 8, 6 layers, 6 heads,
// width 384; nn::gpt on random tokens of a 65-character vocabulary, as bench_gpt trains it):
// N MPI ranks, each with one OpenMP thread, train on one fixed global batch of 8 sequences with
// parallel::distributed_step<Policy, mpi_comm>; rank r computes forward and backward on its
// sequences [r·8/N, (r+1)·8/N) and the step reduces the gradients as the strategy says (data
// parallel: all-reduce during backward; ZeRO-1: reduce-scatter at the step; ZeRO-2: each
// module's gradients reduce-scattered during backward; ZeRO-3: params gathered per module as
// well), clips at global norm 1.0 and takes AdamW's step (lr 1e-3, betas 0.9/0.99, weight
// decay 0.1 on 2-D weights). Run with 1 rank for the baseline (run-dp.sh does both).
//
// Each round times --steps steps after a barrier and records the slowest rank's time per step;
// the table gives the median over the rounds of tokens/s (global batch tokens / step time) and of
// the step time. Before timing, the loss must fall over 10 steps and every rank must hold the
// same params (bit for bit, gathered through the step), so that a fast wrong run cannot pass.
// A last line gives each rank's mean time per timed step in forward, in backward (which, under
// data parallel and ZeRO-2/3, also starts and progresses the gradient collectives) and in the
// distributed step (the reductions backward left, clipping, AdamW, ZeRO's param gather).
//
//   mpiexec -n N bench_dp_gpt [--strategy dp|zero1|zero2|zero3] [--precision fp32|bf16]
//                             [--rounds 3] [--steps 3] [--bucket ELEMENTS] [--in-flight N]
//                             [--intra-node shm|mpi] [--json]
//
// --bucket sets reduce_bucket_size (default: the step's, 2^21 elements: this 10.7M-parameter
// model's gradients in 6 collectives, the first started while backward still runs).
// --in-flight sets max_in_flight (default: the step's, 2 collectives started before the oldest
// is waited for).
// --intra-node picks how mpi_comm all-reduces when the ranks share a node: through its
// shared-memory window (shm, the default) or with MPI_Allreduce / MPI_Iallreduce (mpi).
//
// Environment: OMP_NUM_THREADS=1 OMP_PROC_BIND=true per rank, mpiexec --bind-to core.
#include <trident/mpi.hpp>
#include <trident/parallel/zero.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "common.hpp"

namespace {

using namespace trident;

constexpr index_t vocab = 65, block = 256, batch = 8, layers = 6, heads = 6, width = 384;

double max_over_ranks(double v) {
  MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return v;
}

struct result {
  std::vector<double> tokens_per_s, step_ms;
  std::vector<double> phase_ms;  // rank 0: forward, backward, step of every rank (ms per timed step)
  double loss_first = 0, loss_last = 0;
  bool ranks_equal = false;
  double state_mib = 0;
  index_t parameters = 0;
};

/// @tparam P the policy bundle (its strategy distributed)
template <class P>
result run(mpi_comm& comm, int rounds, int steps, index_t bucket, int in_flight) {
  using S = typename P::storage_type;
  const int rank = comm.rank(), size = comm.size();
  if (batch % size != 0) throw error("bench_dp_gpt: the batch of 8 sequences does not split among " + std::to_string(size) + " ranks");
  const index_t rows = batch / size, first = rows * rank;
  nn::parameter_store<P> store;
  nn::gpt<P> model(store, {vocab, block, layers, heads, width, 0.0, true});
  store.allocate();
  generator gen(1234);
  model.init(gen);
  store.master_from_params();
  std::vector<std::int32_t> x(static_cast<std::size_t>(batch * block)), y(x.size());
  bench::random_tokens(x, y, vocab);
  const std::span<const std::int32_t> mine_x(x.data() + first * block, static_cast<std::size_t>(rows * block));
  const std::span<const std::int32_t> mine_y(y.data() + first * block, static_cast<std::size_t>(rows * block));
  optim::adamw opt({.lr = 1e-3, .beta1 = 0.9, .beta2 = 0.99, .weight_decay = 0.1});
  parallel::distributed_options o{.step = {.gradient_clipping = 1.0}};
  if (bucket > 0) o.reduce_bucket_size = bucket;
  if (in_flight > 0) o.max_in_flight = in_flight;
  parallel::distributed_step<P, mpi_comm> dist(store, comm, o);
  nn::arena<cpu> memory;
  double loss = 0;
  double phase[3] = {0, 0, 0};  // forward, backward, distributed step: seconds summed over the timed steps
  bool timing = false;
  auto step = [&] {
    store.zero_grad();
    memory.reset();
    nn::context<P> ctx{memory, true, nullptr};
    const auto t0 = std::chrono::steady_clock::now();
    loss = model.forward(ctx, mine_x, rows, mine_y);
    const auto t1 = std::chrono::steady_clock::now();
    model.backward(ctx, dist.loss_scale());
    const auto t2 = std::chrono::steady_clock::now();
    dist.step(opt);
    if (timing) {
      const auto t3 = std::chrono::steady_clock::now();
      phase[0] += std::chrono::duration<double>(t1 - t0).count();
      phase[1] += std::chrono::duration<double>(t2 - t1).count();
      phase[2] += std::chrono::duration<double>(t3 - t2).count();
    }
  };

  result res;
  res.parameters = model.parameter_count();
  step();
  double l = loss;
  MPI_Allreduce(MPI_IN_PLACE, &l, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  res.loss_first = l / size;
  for (int s = 0; s < 9; ++s) step();
  l = loss;
  MPI_Allreduce(MPI_IN_PLACE, &l, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  res.loss_last = l / size;
  {  // every rank's params equal rank 0's, bit for bit
    tensor<S> all({store.size()});
    dist.gather_params(all.view());
    std::vector<S> root(all.data(), all.data() + all.numel());
    MPI_Bcast(root.data(), static_cast<int>(root.size() * sizeof(S)), MPI_BYTE, 0, MPI_COMM_WORLD);
    int same = std::memcmp(root.data(), all.data(), root.size() * sizeof(S)) == 0 ? 1 : 0;
    MPI_Allreduce(MPI_IN_PLACE, &same, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    res.ranks_equal = same == 1;
  }
  res.state_mib = static_cast<double>(dist.memory(opt).model_states()) / (1024.0 * 1024.0);
  timing = true;
  for (int k = 0; k < rounds; ++k) {
    MPI_Barrier(MPI_COMM_WORLD);
    const double t = bench::seconds_of([&] {
      for (int s = 0; s < steps; ++s) step();
    });
    const double per = max_over_ranks(t / steps);
    res.step_ms.push_back(per * 1e3);
    res.tokens_per_s.push_back(static_cast<double>(batch * block) / per);
  }
  for (double& t : phase) t *= 1e3 / (rounds * steps);
  res.phase_ms.resize(static_cast<std::size_t>(3 * size));
  MPI_Gather(phase, 3, MPI_DOUBLE, res.phase_ms.data(), 3, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  return res;
}

}  // namespace

int main(int argc, char** argv) {
  mpi_environment env(&argc, &argv);
  std::string strategy = "dp", precision = "fp32";
  int rounds = 3, steps = 3;
  index_t bucket = 0;
  int in_flight = 0;
  bool json = false;
  intra_node how = intra_node::shared_memory;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--strategy") && i + 1 < argc) {
      strategy = argv[++i];
    } else if (!std::strcmp(argv[i], "--precision") && i + 1 < argc) {
      precision = argv[++i];
    } else if (!std::strcmp(argv[i], "--rounds") && i + 1 < argc) {
      rounds = std::max(1, std::atoi(argv[++i]));
    } else if (!std::strcmp(argv[i], "--steps") && i + 1 < argc) {
      steps = std::max(1, std::atoi(argv[++i]));
    } else if (!std::strcmp(argv[i], "--bucket") && i + 1 < argc) {
      bucket = std::atoll(argv[++i]);
    } else if (!std::strcmp(argv[i], "--in-flight") && i + 1 < argc) {
      in_flight = std::max(1, std::atoi(argv[++i]));
    } else if (!std::strcmp(argv[i], "--intra-node") && i + 1 < argc) {
      const std::string h = argv[++i];
      if (h != "shm" && h != "mpi") {
        std::fprintf(stderr, "bench_dp_gpt: --intra-node takes shm or mpi, got '%s'\n", h.c_str());
        return 2;
      }
      how = h == "shm" ? intra_node::shared_memory : intra_node::mpi;
    } else if (!std::strcmp(argv[i], "--json")) {
      json = true;
    } else {
      std::fprintf(stderr, "usage: mpiexec -n N %s [--strategy dp|zero1|zero2|zero3] [--precision fp32|bf16] [--rounds R] [--steps S] [--bucket ELEMENTS] [--in-flight N] [--intra-node shm|mpi] [--json]\n",
                   argv[0]);
      return 2;
    }
  }
  mpi_comm comm(MPI_COMM_WORLD, how);
  try {
    auto go = [&]<class Precision>() -> result {
      if (strategy == "dp") return run<policy<Precision, cpu, data_parallel>>(comm, rounds, steps, bucket, in_flight);
      if (strategy == "zero1") return run<policy<Precision, cpu, zero<1>>>(comm, rounds, steps, bucket, in_flight);
      if (strategy == "zero2") return run<policy<Precision, cpu, zero<2>>>(comm, rounds, steps, bucket, in_flight);
      if (strategy == "zero3") return run<policy<Precision, cpu, zero<3>>>(comm, rounds, steps, bucket, in_flight);
      throw error("bench_dp_gpt: --strategy takes dp, zero1, zero2 or zero3, got '" + strategy + "'");
    };
    result res;
    if (precision == "fp32") {
      res = go.template operator()<fp32>();
    } else if (precision == "bf16") {
      res = go.template operator()<bf16_mixed>();
    } else {
      throw error("bench_dp_gpt: --precision takes fp32 or bf16, got '" + precision + "'");
    }
    const bool ok = res.ranks_equal && res.loss_last < res.loss_first - 0.1;
    if (comm.rank() == 0) {
      std::printf("# bench_dp_gpt: large GPT shape (N = %lld), %s, %s, %d ranks x %d threads, %d rounds of %d steps; loss %.3f -> %.3f, "
                  "ranks equal %s -> %s; model states %.1f MiB per rank; all-reduces through %s\n",
                  static_cast<long long>(res.parameters), precision.c_str(), strategy.c_str(), comm.size(),
                  cpu_kernels::available_threads(), rounds, steps, res.loss_first, res.loss_last, res.ranks_equal ? "yes" : "NO",
                  ok ? "ok" : "FAILED", res.state_mib,
                  comm.shared_memory() ? "shared memory" : "MPI");
      std::printf("| strategy | ranks | tokens/s | step ms |\n|---|---|---|---|\n");
      std::printf("| %s | %d | %s | %s |\n", strategy.c_str(), comm.size(), bench::spread(res.tokens_per_s, "%.0f").c_str(),
                  bench::spread(res.step_ms, "%.1f").c_str());
      std::printf("# ms per timed step, forward / backward / distributed step:");
      for (int r = 0; r < comm.size(); ++r) {
        const double* f = res.phase_ms.data() + 3 * r;
        std::printf(" rank %d %.1f / %.1f / %.1f%s", r, f[0], f[1], f[2], r + 1 < comm.size() ? ";" : "\n");
      }
      if (json) {
        std::printf("{\"bench\":\"dp_gpt\",\"strategy\":\"%s\",\"precision\":\"%s\",\"ranks\":%d,\"intra_node\":\"%s\","
                    "\"tokens_per_s\":%.1f,\"step_ms\":%.2f,\"ok\":%s}\n",
                    strategy.c_str(), precision.c_str(), comm.size(), comm.shared_memory() ? "shm" : "mpi",
                    bench::median(res.tokens_per_s), bench::median(res.step_ms),
                    ok ? "true" : "false");
      }
    }
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_dp_gpt (rank %d): %s\n", comm.rank(), e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
  }
}
