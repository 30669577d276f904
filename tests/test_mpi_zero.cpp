// Data parallel and ZeRO-1, 2 and 3 over mpi_comm (2 and 4 processes; main and MPI_Init are in
// test_mpi.cpp): an MLP trained for several steps, each rank on its own disjoint shard of the
// same global batch, must match single-process training on the whole batch, which every rank
// computes alone (fp32 with AdamW and SGD, with clipping that clips and with accumulated
// micro-batches, in or out of no_sync(), tightly; bf16_mixed loosely), with params and step
// outcomes bitwise identical on every rank after every step; an fp16 overflow on one rank
// skips the step on all; measured bytes per rank equal the estimator and the formulas.
//
// Every check is on a value the ranks agreed on by a collective (the worst error over ranks,
// whether a condition holds on all), and every collective runs unconditionally before the
// checks: a failure on one rank fails the same check on every rank, so rank 0 reports it and
// no rank is left waiting in a collective another skipped.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include <trident/mpi.hpp>
#include <trident/parallel/zero.hpp>

#include "zero_fixture.hpp"

using namespace trident;

namespace {

using namespace zero_fixture;

/// Params and step outcomes after each step.
struct trace {
  std::vector<std::vector<float>> params;
  std::vector<train::step_outcome> outcomes;
  bool overlapping = false;  // data parallel: reducing during backward at the last step
};

/// Single-process training on the whole global batch, one backward per step.
template <class Precision, class MakeOpt>
trace train_single(MakeOpt make, double clipping) {
  using P = policy<Precision, cpu>;
  mlp<P> m;
  auto opt = make();
  train::step_control<P> control({.gradient_clipping = clipping});
  trace t;
  for (int s = 0; s < steps; ++s) {
    m.store.zero_grad();
    m.backward(s, 0, global_batch, control.loss_scale());
    t.outcomes.push_back(control.step(m.store, opt));
    t.params.push_back(m.params());
  }
  return t;
}

/// This rank's training on its shard of each global batch, in `micro` accumulated micro-batches
/// (data parallel: those before the last inside no_sync() when `no_sync`).
template <class P, class MakeOpt>
trace train_mpi(mpi_comm& comm, MakeOpt make, int micro, bool no_sync, const parallel::distributed_options& o) {
  mlp<P> m;
  auto opt = make();
  parallel::distributed_step<P, mpi_comm> dist(m.store, comm, o);
  const index_t b = global_batch * comm.rank() / comm.size(), e = global_batch * (comm.rank() + 1) / comm.size();
  trace t;
  for (int s = 0; s < steps; ++s) {
    m.store.zero_grad();
    // equal micro-batches, each loss scaled by 1/micro: the accumulated gradient is the shard's mean
    for (int k = 0; k < micro; ++k) {
      auto rows = [&](int j) { return b + (e - b) * j / micro; };
      if constexpr (P::strategy::zero_stage == 0) {
        if (no_sync && k + 1 < micro) {
          auto guard = dist.no_sync();
          m.backward(s, rows(k), rows(k + 1), dist.loss_scale() / micro);
          continue;
        }
      }
      m.backward(s, rows(k), rows(k + 1), dist.loss_scale() / micro);
    }
    if constexpr (P::strategy::zero_stage == 0) t.overlapping = dist.overlapping();
    t.outcomes.push_back(dist.step(opt));
    t.params.push_back(m.params(dist));
  }
  return t;
}

/// Whether `ok` holds on every rank (one all-reduce).
bool on_all_ranks(mpi_comm& comm, bool ok) {
  std::int32_t v = ok ? 1 : 0;
  comm.all_reduce(&v, 1, reduce_op::min);
  return v == 1;
}

/// The largest `x` over the ranks; NaN counts as +inf.
double max_over_ranks(mpi_comm& comm, double x) {
  if (std::isnan(x)) x = std::numeric_limits<double>::infinity();
  comm.all_reduce(&x, 1, reduce_op::max);
  return x;
}

/// FNV-1a over bytes, continuing from h.
std::uint64_t fnv(std::uint64_t h, const void* p, std::size_t n) {
  const auto* b = static_cast<const unsigned char*>(p);
  for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

/// The first step after which some rank's params or step outcome differ from another's in any
/// bit, or -1: the max and the min over ranks of each step's hash (two all-reduces).
int first_step_differing(mpi_comm& comm, const trace& t) {
  const auto n = t.params.size();
  std::vector<std::int32_t> hi(2 * n), lo;
  for (std::size_t s = 0; s < n; ++s) {
    std::uint64_t h = fnv(1469598103934665603ull, t.params[s].data(), t.params[s].size() * sizeof(float));
    const auto& r = t.outcomes[s];
    const double o[] = {r.applied ? 1.0 : 0.0, r.grad_norm, r.clip, r.loss_scale, r.grad_scale};
    h = fnv(h, o, sizeof(o));
    hi[2 * s] = static_cast<std::int32_t>(static_cast<std::uint32_t>(h));
    hi[2 * s + 1] = static_cast<std::int32_t>(static_cast<std::uint32_t>(h >> 32));
  }
  lo = hi;
  comm.all_reduce(hi.data(), static_cast<index_t>(hi.size()), reduce_op::max);
  comm.all_reduce(lo.data(), static_cast<index_t>(lo.size()), reduce_op::min);
  for (std::size_t s = 0; s < n; ++s) {
    if (hi[2 * s] != lo[2 * s] || hi[2 * s + 1] != lo[2 * s + 1]) return static_cast<int>(s);
  }
  return -1;
}

/// Elementwise slack rel·|x| + abs, relative L2 bound, and the clip factor's relative bound.
struct tolerance {
  double rel, abs, l2_rel, clip_rel;
};

/// Every rank's params are bitwise those of every other and, after every step, within `tol`
/// of the reference; the steps were applied and clipped by the reference's factor.
void compare(mpi_comm& comm, const trace& dist, const trace& ref, const tolerance& tol, const std::string& what) {
  INFO(what << ", " << comm.size() << " ranks");
  const int differing = first_step_differing(comm, dist);
  double worst = 0, l2 = 0, clip = 0;
  bool applied = dist.params.size() == static_cast<std::size_t>(steps);
  for (std::size_t s = 0; s < dist.params.size() && s < ref.params.size(); ++s) {
    const auto& a = dist.params[s];
    const auto& b = ref.params[s];
    if (a.size() != b.size()) {
      worst = std::numeric_limits<double>::infinity();
      continue;
    }
    double d2 = 0, b2 = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
      worst = std::max(worst, std::fabs(double(a[i]) - b[i]) / (tol.abs + tol.rel * std::fabs(double(b[i]))));
      d2 += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
      b2 += double(b[i]) * b[i];
    }
    l2 = std::max(l2, std::sqrt(d2 / b2));
    clip = std::max(clip, std::fabs(dist.outcomes[s].clip - ref.outcomes[s].clip) / ref.outcomes[s].clip);
    applied = applied && dist.outcomes[s].applied;
  }
  worst = max_over_ranks(comm, worst);
  l2 = max_over_ranks(comm, l2);
  clip = max_over_ranks(comm, clip);
  applied = on_all_ranks(comm, applied);

  CHECK_MESSAGE(differing == -1, "the ranks' params or step outcomes differ after step " << differing);
  CHECK(applied);
  CHECK(worst <= 1.0);
  CHECK(l2 <= tol.l2_rel);
  CHECK(clip <= tol.clip_rel);
  // the params moved: the comparison is not of the initial weights
  double moved = 0;
  for (std::size_t i = 0; i < ref.params.back().size(); ++i) {
    moved = std::max(moved, std::fabs(double(ref.params.back()[i]) - ref.params.front()[i]));
  }
  CHECK(moved > 1e-3);
}

/// One distributed configuration: clipping, micro-batches per rank and step, bucketing.
struct run_case {
  double clipping;
  int micro;
  bool no_sync;
  parallel::distributed_options options;
};

template <class Precision, class Strategy, class MakeOpt>
void check_matches_single(mpi_comm& comm, MakeOpt make, const tolerance& tol, const char* what) {
  // the global gradient norm stays near 0.25 over these steps: 0.1 clips every one
  constexpr double clipping = 0.1;
  const trace plain = train_single<Precision>(make, 0.0), clipped = train_single<Precision>(make, clipping);
  double least_clip = 1.0;
  for (const auto& r : clipped.outcomes) least_clip = std::min(least_clip, r.clip);
  CHECK(least_clip < 0.9);  // clipping is active (the reference is the same on every rank)

  // default buckets (one collective for the model), and small ones: many non-blocking
  // collectives in flight, buckets ending inside tensors
  // (ZeRO-3: units above 100 elements are gathered and released, fc3's stays; the defaults keep every unit gathered)
  const parallel::distributed_options small{.reduce_bucket_size = 100, .max_in_flight = 3, .param_persistence_threshold = 100};
  // (data parallel reduces during backward from the second step on: the accumulated
  // micro-batches each reduce the running sum, or with no_sync() only the last does)
  const run_case cases[] = {{0.0, 1, false, {}},
                            {clipping, 1, false, small},
                            {0.0, 2, false, small},
                            {clipping, 2, true, {.reduce_bucket_size = 300}},
                            {0.0, 3, true, {.reduce_bucket_size = 64, .max_in_flight = 1, .param_persistence_threshold = 0, .prefetch = false}}};
  for (const auto& c : cases) {
    auto o = c.options;
    o.step.gradient_clipping = c.clipping;
    const std::string name = std::string(what) + " " + Strategy::name + ", clipping " + std::to_string(c.clipping) + ", " +
                             std::to_string(c.micro) + " micro-batches" + (c.no_sync ? " (no_sync)" : "") + ", buckets of " +
                             std::to_string(o.reduce_bucket_size);
    // Unequal micro-batches, each scaled by 1/micro, do not accumulate to the shard's mean,
    // so the single-process reference does not apply (3 ranks' 8 rows in 3 micro-batches).
    if ((global_batch / comm.size()) % c.micro != 0) {
      if (comm.rank() == 0) MESSAGE(name << ": skipped, " << global_batch / comm.size() << " rows per rank do not split into equal micro-batches");
      continue;
    }
    const trace dist = train_mpi<policy<Precision, cpu, Strategy>>(comm, make, c.micro, c.no_sync, o);
    compare(comm, dist, c.clipping > 0 ? clipped : plain, tol, name);
    if constexpr (Strategy::zero_stage == 0) {
      const bool overlapping = on_all_ranks(comm, dist.overlapping);
      INFO(name);
      CHECK(overlapping);  // the MPI all-reduces ran during backward after the first step
    }
  }
}

auto adamw = [] { return optim::adamw({.lr = 1e-2, .weight_decay = 0.1}); };
auto sgd = [] { return optim::sgd({.lr = 0.1, .momentum = 0.9, .weight_decay = 1e-3}); };

}  // namespace

TEST_CASE_TEMPLATE("mpi zero: fp32 training on sharded batches matches single-process training (AdamW, SGD)", S, data_parallel, zero<1>,
                   zero<2>, zero<3>) {
  mpi_comm comm;
  // Only the summation order of the gradients differs from the reference (MPI's reduction
  // order, the shards' means, the micro-batches): a few fp32 ulps per step, which Adam's
  // normalisation can enlarge for near-zero gradients; 1e-6 relative bounds that over 5 steps.
  const tolerance tol{.rel = 1e-6, .abs = 1e-7, .l2_rel = 1e-6, .clip_rel = 1e-5};
  check_matches_single<fp32, S>(comm, adamw, tol, "fp32 adamw");
  check_matches_single<fp32, S>(comm, sgd, tol, "fp32 sgd");
}

TEST_CASE_TEMPLATE("mpi zero: bf16_mixed training on sharded batches matches single-process training", S, data_parallel, zero<1>, zero<2>, zero<3>) {
  mpi_comm comm;
  // Params are bf16 (8 bits of mantissa): a master that differs in its last float bits may round
  // to the neighbouring bf16 value, and the next forward differs by that much. Adam turns the
  // small differences of a near-zero gradient into steps of up to lr (1e-2), so elements get
  // 2·lr of slack, and the relative L2 difference of the whole model and of the clip factor
  // stay near 1e-3. (Over these 5 steps the bf16 params usually come out identical.)
  const tolerance tol{.rel = 1e-2, .abs = 2e-2, .l2_rel = 5e-3, .clip_rel = 1e-2};
  check_matches_single<bf16_mixed, S>(comm, adamw, tol, "bf16 adamw");
}

TEST_CASE_TEMPLATE("mpi zero: an fp16 overflow on rank 1 only skips the step on every rank", S, data_parallel, zero<1>, zero<2>, zero<3>) {
  using P = policy<fp16_mixed, cpu, S>;
  mpi_comm comm;
  mlp<P> m;
  optim::adamw opt({.lr = 1e-2});
  // hysteresis 1: the first overflow halves the scale
  parallel::distributed_step<P, mpi_comm> dist(m.store, comm, {.step = {.dynamic_scaler = {.initial_scale_power = 12, .hysteresis = 1}}});
  const index_t b = global_batch * comm.rank() / comm.size(), e = global_batch * (comm.rank() + 1) / comm.size();
  trace t;
  std::vector<bool> applied;
  std::vector<double> scales;
  for (int s = 0; s < 4; ++s) {
    m.store.zero_grad();
    // rank 1's backward overflows at step 2 (a loss scale far past fp16's range); the data
    // parallel reduction may run inside backward, so the overflow must arise there
    m.backward(s, b, e, s == 2 && comm.rank() == 1 ? 1e30 : dist.loss_scale());
    scales.push_back(dist.loss_scale());
    t.outcomes.push_back(dist.step(opt));
    applied.push_back(t.outcomes.back().applied);
    t.params.push_back(m.params(dist));
  }
  const int differing = first_step_differing(comm, t);
  const bool skipped_one = on_all_ranks(comm, applied == std::vector<bool>{true, true, false, true});
  const bool counted = on_all_ranks(comm, dist.control().skipped_steps() == 1);
  const bool halved = on_all_ranks(comm, scales == std::vector<double>{4096, 4096, 4096, 2048} && dist.loss_scale() == 2048);
  const bool unchanged = on_all_ranks(comm, t.params[2] == t.params[1]);
  const bool moved = on_all_ranks(comm, t.params[3] != t.params[2] && t.params[1] != t.params[0]);

  INFO(comm.size() << " ranks, " << std::string(S::name));
  CHECK(skipped_one);
  CHECK(counted);
  CHECK(halved);
  CHECK(unchanged);  // the skipped step left the params alone
  CHECK(moved);
  CHECK_MESSAGE(differing == -1, "the ranks' params or step outcomes differ after step " << differing);
}

TEST_CASE_TEMPLATE("mpi zero: measured bytes per rank equal the estimate and DeepSpeed's formulas", S, data_parallel, zero<1>, zero<2>, zero<3>) {
  constexpr int stage = S::zero_stage;
  mpi_comm comm;
  const int ranks = comm.size();
  auto check = [&]<class P>(P, auto make, int state_buffers, auto formula) {
    const index_t elements = mlp<policy<typename P::precision, cpu>>().store.size();
    // (ZeRO-3: fc3's unit, at most 300 elements, stays gathered; the others are released)
    const parallel::distributed_options o{.reduce_bucket_size = 300, .param_persistence_threshold = 300};
    mlp<P> m;
    auto opt = make();
    parallel::distributed_step<P, mpi_comm> dist(m.store, comm, o);
    m.store.zero_grad();
    m.backward(0, 0, 6, dist.loss_scale());
    dist.step(opt);
    const auto measured = dist.memory(opt);
    const auto want = parallel::estimate_memory<P>(elements, ranks, state_buffers, o, dist.persistent_elements());
    const index_t psi = parallel::padded_size<P>(elements, ranks);
    // the store keeps params (not under ZeRO-3), gradients (stages 0 and 1) and the master (data parallel)
    const std::size_t store_bytes =
        (stage < 3 ? measured.params : 0) + (stage < 2 ? measured.grads : 0) + (stage == 0 ? measured.master : 0);
    const bool equal = on_all_ranks(comm, measured == want);
    const bool store_equal = on_all_ranks(comm, m.store.bytes() == store_bytes);
    const bool padded = on_all_ranks(comm, m.store.size() == psi);

    INFO(std::string(P::traits::name) << " " << std::string(S::name) << ", " << ranks << " ranks, Ψ " << psi << "; rank " << comm.rank()
                                      << " measured " << measured.model_states() << " + " << measured.local_grads << " + "
                                      << measured.comm_buffers << " bytes, estimated " << want.model_states() << " + " << want.local_grads
                                      << " + " << want.comm_buffers);
    CHECK(equal);
    CHECK(store_equal);
    CHECK(padded);
    if (const std::size_t f = formula(psi); f > 0) CHECK(want.model_states() == f);
    if (stage == 1) CHECK(want.comm_buffers > 0);
    if (stage >= 1) CHECK(psi % (ranks * nn::parameter_store<P>::align_elements) == 0);
  };
  const auto psi_bytes = [&](index_t psi, std::size_t whole, std::size_t partitioned) {
    const auto p = static_cast<std::size_t>(psi);
    return whole * p + partitioned * p / static_cast<std::size_t>(ranks);
  };
  const auto none = [](index_t) { return std::size_t{0}; };
  // mixed-precision (fp16 params and grads) Adam: DeepSpeed's 16Ψ, 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N exactly (Ψ padded)
  check(policy<fp16_mixed, cpu, S>{}, adamw, 2, [&](index_t psi) { return parallel::zero_formula_bytes(stage, psi, ranks); });
  // bf16 params with fp32 grads, Adam: 2 + 4 + 12 = 18Ψ, 6Ψ + 12Ψ/N, 2Ψ + 16Ψ/N, 18Ψ/N
  check(policy<bf16_mixed, cpu, S>{}, adamw, 2, [&](index_t psi) {
    return stage == 0 ? psi_bytes(psi, 18, 0) : stage == 1 ? psi_bytes(psi, 6, 12) : stage == 2 ? psi_bytes(psi, 2, 16) : psi_bytes(psi, 0, 18);
  });
  // fp32 Adam: params are the master: 4 + 4 + 8 = 16Ψ, 8Ψ + 8Ψ/N, 4Ψ + 12Ψ/N, 16Ψ/N
  check(policy<fp32, cpu, S>{}, adamw, 2, [&](index_t psi) {
    return stage == 0 ? parallel::zero_formula_bytes(0, psi, ranks) : stage == 1 ? psi_bytes(psi, 8, 8) : stage == 2 ? psi_bytes(psi, 4, 12) : psi_bytes(psi, 0, 16);
  });
  // bf16 with fp32 gradients, SGD with momentum (the estimate alone)
  check(policy<bf16_mixed, cpu, S>{}, sgd, 1, none);
}
