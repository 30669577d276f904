// Data parallel, ZeRO-1 and ZeRO-2 over thread_comm with 1 to 4 ranks: an MLP trained for
// several steps, each rank on its own disjoint shard of the same global batch, must match
// single-process training on the whole batch (fp32 with AdamW and SGD, with and without
// clipping, tightly; bf16_mixed loosely), with params bitwise identical on every rank after
// every step; an fp16 overflow on one rank skips the step on all; measured bytes per rank
// equal the estimator and DeepSpeed's formulas; bad configurations get clear errors.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <trident/parallel/thread_comm.hpp>
#include <trident/parallel/zero.hpp>
#include <trident/trident.hpp>

#include "zero_fixture.hpp"

using namespace trident;

static_assert(policy_bundle<policy<bf16_mixed, cpu, zero<2>>>);
static_assert(policy<fp16_mixed, cpu, zero<1>>::strategy::zero_stage == 1);
static_assert(policy<fp32, cpu, data_parallel>::strategy::distributed && !single::distributed);

namespace {

using namespace zero_fixture;

template <class Precision>
using single_policy = policy<Precision, cpu>;

/// Params after each step of single-process training on the whole global batch.
template <class Precision, class MakeOpt>
std::vector<std::vector<float>> train_single(MakeOpt make, double clipping, std::vector<double>* clips = nullptr,
                                             const std::vector<index_t>& widths = shallow) {
  using P = single_policy<Precision>;
  mlp<P> m(widths);
  auto opt = make();
  train::step_control<P> control({.gradient_clipping = clipping});
  std::vector<std::vector<float>> out;
  for (int s = 0; s < steps; ++s) {
    m.store.zero_grad();
    m.backward(s, 0, global_batch, control.loss_scale());
    const auto r = control.step(m.store, opt);
    if (clips) clips->push_back(r.clip);
    out.push_back(m.params());
  }
  return out;
}

/// Params after each step, per rank, of `ranks` ranks each training on its shard.
template <class P, class MakeOpt>
std::vector<std::vector<std::vector<float>>> train_distributed(int ranks, MakeOpt make, const parallel::distributed_options& o,
                                                               const std::vector<index_t>& widths = shallow,
                                                               std::vector<std::size_t>* peaks = nullptr) {
  std::vector<std::vector<std::vector<float>>> out(static_cast<std::size_t>(ranks));
  if (peaks) peaks->assign(static_cast<std::size_t>(ranks), 0);
  run_ranks(ranks, [&](thread_comm& comm) {
    mlp<P> m(widths);
    auto opt = make();
    parallel::distributed_step<P, thread_comm> dist(m.store, comm, o);
    const index_t b = global_batch * comm.rank() / ranks, e = global_batch * (comm.rank() + 1) / ranks;
    for (int s = 0; s < steps; ++s) {
      m.store.zero_grad();
      m.backward(s, b, e, dist.loss_scale());
      dist.step(opt);
      out[static_cast<std::size_t>(comm.rank())].push_back(m.params(dist));
    }
    if (peaks) (*peaks)[static_cast<std::size_t>(comm.rank())] = dist.peak_working_bytes();
  });
  return out;
}

/// Every rank's params equal rank 0's bit for bit, and rank 0's are within rel·|x| + abs of the
/// reference element by element, and within l2_rel of it in relative L2 norm, after every step.
void compare(const std::vector<std::vector<std::vector<float>>>& dist, const std::vector<std::vector<float>>& ref, double rel, double abs,
             double l2_rel, const std::string& what) {
  INFO(what);
  for (std::size_t r = 1; r < dist.size(); ++r) {
    for (int s = 0; s < steps; ++s) {
      REQUIRE_MESSAGE(dist[r][static_cast<std::size_t>(s)] == dist[0][static_cast<std::size_t>(s)],
                      "rank " << r << " differs from rank 0 after step " << s);
    }
  }
  double worst = 0, l2 = 0;
  for (int s = 0; s < steps; ++s) {
    const auto& a = dist[0][static_cast<std::size_t>(s)];
    const auto& b = ref[static_cast<std::size_t>(s)];
    REQUIRE(a.size() == b.size());
    double d2 = 0, b2 = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
      worst = std::max(worst, std::fabs(double(a[i]) - b[i]) / (abs + rel * std::fabs(double(b[i]))));
      d2 += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
      b2 += double(b[i]) * b[i];
    }
    l2 = std::max(l2, std::sqrt(d2 / b2));
  }
  CHECK(l2 <= l2_rel);
  // the params moved: the comparison is not of the initial weights
  double moved = 0;
  for (std::size_t i = 0; i < ref.back().size(); ++i) moved = std::max(moved, std::fabs(double(ref.back()[i]) - ref.front()[i]));
  CHECK(moved > 1e-3);
  CHECK(worst <= 1.0);
}

template <class Precision, class Strategy, class MakeOpt>
void check_matches_single(MakeOpt make, double rel, double abs, double l2_rel, const char* what) {
  for (double clipping : {0.0, 0.05}) {
    std::vector<double> clips;
    const auto ref = train_single<Precision>(make, clipping, &clips);
    if (clipping > 0) CHECK(clips.front() < 1.0);  // clipping is active
    for (int ranks = 1; ranks <= 4; ++ranks) {
      // small buckets: many collectives in flight, buckets ending inside tensors
      // (ZeRO-3: units above 100 elements are gathered and released, fc3's stays)
      const parallel::distributed_options o{
          .reduce_bucket_size = 100, .max_in_flight = 3, .param_persistence_threshold = 100, .step = {.gradient_clipping = clipping}};
      const auto dist = train_distributed<policy<Precision, cpu, Strategy>>(ranks, make, o);
      compare(dist, ref, rel, abs, l2_rel,
              std::string(what) + " " + Strategy::name + " ranks " + std::to_string(ranks) + " clipping " + std::to_string(clipping));
    }
  }
}

auto adamw = [] { return optim::adamw({.lr = 1e-2, .weight_decay = 0.1}); };
auto sgd = [] { return optim::sgd({.lr = 0.1, .momentum = 0.9, .weight_decay = 1e-3}); };

}  // namespace

TEST_CASE_TEMPLATE("zero: fp32 training on sharded batches matches single-process training (AdamW, SGD)", S, data_parallel, zero<1>, zero<2>, zero<3>) {
  check_matches_single<fp32, S>(adamw, 1e-6, 1e-7, 1e-6, "fp32 adamw");
  check_matches_single<fp32, S>(sgd, 1e-6, 1e-7, 1e-6, "fp32 sgd");
}

TEST_CASE_TEMPLATE("zero: bf16_mixed training on sharded batches matches single-process training", S, data_parallel, zero<1>, zero<2>, zero<3>) {
  // Params are bf16 (8 bits of mantissa): a master that differs in its last float bits may round
  // to the neighbouring bf16 value, and the next forward differs by that much. Adam turns the
  // small differences of a near-zero gradient into steps of up to lr (1e-2), so elements get
  // 2·lr of slack; the relative L2 difference of the whole model stays near 1e-3.
  check_matches_single<bf16_mixed, S>(adamw, 1e-2, 2e-2, 5e-3, "bf16 adamw");
}

TEST_CASE_TEMPLATE("zero: fp16_mixed training (dynamic loss scaling) on sharded batches matches single-process training", S, data_parallel,
                   zero<1>, zero<2>, zero<3>) {
  // fp16 params and gradients (11 significant bits) under a loss scale of 2^16: the gradient
  // averaged over ranks rounds to half once per reduction, where one process rounds the whole
  // batch's once; a param may then round to its neighbouring half value (a relative 2^-11), and
  // Adam magnifies that on near-zero gradients as for bf16 (elements get 2·lr of slack).
  check_matches_single<fp16_mixed, S>(adamw, 2e-3, 2e-2, 2e-3, "fp16 adamw");
}

TEST_CASE_TEMPLATE("zero: an fp16 overflow on one rank skips the step on every rank", S, data_parallel, zero<1>, zero<2>, zero<3>) {
  using P = policy<fp16_mixed, cpu, S>;
  const int ranks = 3;
  struct record {
    std::vector<bool> applied;
    std::vector<double> scales;
    std::int64_t skipped = 0;
    std::vector<std::vector<float>> params;
  };
  std::vector<record> rec(ranks);
  run_ranks(ranks, [&](thread_comm& comm) {
    mlp<P> m;
    optim::adamw opt({.lr = 1e-2});
    // hysteresis 1: the first overflow halves the scale
    parallel::distributed_step<P, thread_comm> dist(m.store, comm, {.step = {.dynamic_scaler = {.initial_scale_power = 12, .hysteresis = 1}}});
    auto& me = rec[static_cast<std::size_t>(comm.rank())];
    const index_t b = global_batch * comm.rank() / ranks, e = global_batch * (comm.rank() + 1) / ranks;
    for (int s = 0; s < 4; ++s) {
      m.store.zero_grad();
      // rank 1's backward overflows at step 2 (a loss scale far past fp16's range); the data
      // parallel reduction runs inside backward, so the overflow must arise there
      m.backward(s, b, e, s == 2 && comm.rank() == 1 ? 1e30 : dist.loss_scale());
      me.scales.push_back(dist.loss_scale());
      me.applied.push_back(dist.step(opt).applied);
      me.params.push_back(m.params(dist));
    }
    me.skipped = dist.control().skipped_steps();
  });
  for (int r = 0; r < ranks; ++r) {
    INFO("rank " << r);
    const auto& me = rec[static_cast<std::size_t>(r)];
    CHECK(me.applied == std::vector<bool>{true, true, false, true});
    CHECK(me.skipped == 1);
    CHECK(me.scales == std::vector<double>{4096, 4096, 4096, 2048});
    CHECK(me.params[2] == me.params[1]);  // the skipped step left the params alone
    CHECK(me.params[3] != me.params[2]);
    for (int s = 0; s < 4; ++s) CHECK(me.params[static_cast<std::size_t>(s)] == rec[0].params[static_cast<std::size_t>(s)]);
  }
}

TEST_CASE("zero: an fp32 gradient that is not finite is an error on every rank, naming the tensor") {
  using P = policy<fp32, cpu, zero<2>>;
  std::vector<std::string> errors(2);
  CHECK_THROWS_AS(run_ranks(2, [&](thread_comm& comm) {
                    mlp<P> m;
                    optim::sgd opt({.lr = 0.1});
                    parallel::distributed_step<P, thread_comm> dist(m.store, comm, {.step = {.gradient_clipping = 1.0}});
                    m.store.zero_grad();
                    m.backward(0, 0, 12, 1.0);
                    // every rank adds to fc2.bias's gradient after backward (a collective under ZeRO-2: the
                    // unit is reduced again at the step); rank 0 adds a NaN
                    auto g = m.store.grad(m.layers[1].bias());
                    if (comm.rank() == 0) g.data()[0] = std::numeric_limits<float>::quiet_NaN();
                    try {
                      dist.step(opt);
                    } catch (const trident::error& e) {
                      errors[static_cast<std::size_t>(comm.rank())] = e.what();
                      throw;
                    }
                  }),
                  trident::error);
  for (const auto& e : errors) CHECK(e.find("the gradient of 'fc2.bias' is not finite") != std::string::npos);
}

TEST_CASE_TEMPLATE("zero: measured bytes per rank equal the estimate and DeepSpeed's formulas", S, data_parallel, zero<1>, zero<2>, zero<3>) {
  constexpr int stage = S::zero_stage;
  auto check = [&]<class P>(P, int ranks, auto make, int state_buffers, bool formula) {
    const index_t elements = mlp<single_policy<typename P::precision>>().store.size();
    std::vector<parallel::memory_report> measured(static_cast<std::size_t>(ranks));
    const parallel::distributed_options o{.reduce_bucket_size = 300, .param_persistence_threshold = 300};
    std::vector<std::size_t> store_bytes(static_cast<std::size_t>(ranks)), peaks(static_cast<std::size_t>(ranks));
    index_t persistent = 0;
    run_ranks(ranks, [&](thread_comm& comm) {
      mlp<P> m;
      auto opt = make();
      parallel::distributed_step<P, thread_comm> dist(m.store, comm, o);
      m.store.zero_grad();
      m.backward(0, 0, 6, dist.loss_scale());
      dist.step(opt);
      measured[static_cast<std::size_t>(comm.rank())] = dist.memory(opt);
      store_bytes[static_cast<std::size_t>(comm.rank())] = m.store.bytes();
      peaks[static_cast<std::size_t>(comm.rank())] = dist.peak_working_bytes();
      if (comm.rank() == 0) persistent = dist.persistent_elements();
    });
    const auto want = parallel::estimate_memory<P>(elements, ranks, state_buffers, o, persistent);
    const index_t psi = parallel::padded_size<P>(elements, ranks);
    INFO(std::string(P::traits::name) << " " << std::string(S::name) << " ranks " << ranks << " Ψ " << psi);
    for (int r = 0; r < ranks; ++r) {
      const auto& m = measured[static_cast<std::size_t>(r)];
      CHECK(m == want);
      // the store keeps params (not under ZeRO-3), gradients (stages 0 and 1) and the master (data parallel)
      CHECK(store_bytes[static_cast<std::size_t>(r)] == (stage < 3 ? m.params : 0) + (stage < 2 ? m.grads : 0) + (stage == 0 ? m.master : 0));
      // backward held unit buffers and reductions in flight (ZeRO-2, 3), less than the full gradients
      if (stage >= 2) CHECK(peaks[static_cast<std::size_t>(r)] > 0);
    }
    if (formula) CHECK(want.model_states() == parallel::zero_formula_bytes(stage, psi, ranks));
    if (stage >= 2) CHECK(want.local_grads + want.comm_buffers == 0);  // between steps
    if (stage == 3) CHECK((persistent > 0 && persistent < psi));       // fc3's unit stays gathered, the others not
    if (stage == 1) CHECK(want.comm_buffers > 0);
    if (stage >= 1) CHECK(psi % (ranks * nn::parameter_store<P>::align_elements) == 0);
  };
  for (int ranks = 1; ranks <= 4; ++ranks) {
    // mixed-precision Adam: 16Ψ, 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N exactly (Ψ padded)
    check(policy<fp16_mixed, cpu, S>{}, ranks, adamw, 2, true);
    // fp32 Adam: params are the master (4 + 4 + 8 = 16Ψ for data parallel, 4Ψ + 4Ψ + 8Ψ/N for stage 1, 4Ψ + 12Ψ/N for stage 2)
    check(policy<fp32, cpu, S>{}, ranks, adamw, 2, stage == 0);
    // bf16 with fp32 gradients, SGD with momentum
    check(policy<bf16_mixed, cpu, S>{}, ranks, sgd, 1, false);
  }
  // the formulas themselves
  CHECK(parallel::zero_formula_bytes(0, 1000, 4) == 16000);
  CHECK(parallel::zero_formula_bytes(1, 1000, 4) == 4000 + 3000);
  CHECK(parallel::zero_formula_bytes(2, 1000, 4) == 2000 + 3500);
  CHECK(parallel::zero_formula_bytes(3, 1000, 4) == 4000);
}

TEST_CASE("zero: bad configurations get a clear error") {
  using E = trident::error;
  using P = policy<fp32, cpu, zero<1>>;
  {
    mlp<P> m;
    local_comm comm;
    CHECK_THROWS_WITH_AS((parallel::distributed_step<P, local_comm>(m.store, comm, {.reduce_bucket_size = 0})),
                         doctest::Contains("reduce_bucket_size must be >= 1 element, got 0"), E);
    CHECK_THROWS_WITH_AS((parallel::distributed_step<P, local_comm>(m.store, comm, {.max_in_flight = 0})),
                         doctest::Contains("max_in_flight must be >= 1"), E);
    nn::parameter_store<P> unallocated;
    unallocated.declare("w", {3});
    CHECK_THROWS_WITH_AS((parallel::distributed_step<P, local_comm>(unallocated, comm)), doctest::Contains("not allocated"), E);
    CHECK_THROWS_WITH_AS(parallel::estimate_memory<P>(100, 2, 2, {.reduce_bucket_size = -5}), doctest::Contains("reduce_bucket_size"), E);
    CHECK_THROWS_WITH_AS(parallel::zero_formula_bytes(1, 1001, 4), doctest::Contains("does not divide"), E);
  }
  // ranks that built different models
  std::vector<std::string> errors(2);
  CHECK_THROWS_AS(run_ranks(2, [&](thread_comm& comm) {
                    mlp<P> m(comm.rank() == 0 ? 40 : 16);
                    try {
                      parallel::distributed_step<P, thread_comm> dist(m.store, comm);
                    } catch (const trident::error& e) {
                      errors[static_cast<std::size_t>(comm.rank())] = e.what();
                      throw;
                    }
                  }),
                  E);
  for (const auto& e : errors) CHECK(e.find("the ranks' parameter stores differ") != std::string::npos);
  CHECK(errors[0].find("every rank must build the same model") != std::string::npos);

  // a zero<1> store's full master is released: the store-wide step names the reason
  {
    using B = policy<bf16_mixed, cpu, zero<1>>;
    mlp<B> m;
    local_comm comm;
    parallel::distributed_step<B, local_comm> dist(m.store, comm);
    optim::adamw opt;
    CHECK_THROWS_WITH_AS(opt.step(m.store), doctest::Contains("master weights were released"), E);
  }
}

TEST_CASE("zero: gradient accumulation over micro-batches and master_from_params") {
  // two micro-batches per rank accumulated, then one step: the same as one micro-batch per rank
  using P = policy<bf16_mixed, cpu, zero<2>>;
  std::vector<std::vector<float>> one(2), two(2);
  for (int micro : {1, 2}) {
    run_ranks(2, [&](thread_comm& comm) {
      mlp<P> m;
      optim::sgd opt({.lr = 0.1});
      parallel::distributed_step<P, thread_comm> dist(m.store, comm);
      const index_t b = 12 * comm.rank(), e = b + 12;
      m.store.zero_grad();
      for (int k = 0; k < micro; ++k) m.backward(0, b + (e - b) * k / micro, b + (e - b) * (k + 1) / micro, 1.0 / micro);
      dist.step(opt);
      (micro == 1 ? one : two)[static_cast<std::size_t>(comm.rank())] = m.params();
      // the master partition follows params loaded afterwards
      fill(m.store.params(), 0.25);
      dist.master_from_params();
      for (index_t i = 0; i < dist.master().numel(); ++i) REQUIRE(dist.master().data()[i] == 0.25f);
    });
  }
  double worst = 0;
  for (std::size_t i = 0; i < one[0].size(); ++i) worst = std::max(worst, std::fabs(double(one[0][i]) - two[0][i]) / (1e-3 + 1e-2 * std::fabs(one[0][i])));
  CHECK(worst <= 1.0);
  CHECK(one[0] == one[1]);
}

TEST_CASE("zero: data parallel reduces the gradients during backward once every tensor reports") {
  // Two ranks on different rows: after backward (before step) the gradients are already the
  // average over the ranks when the overlap is on, and still each rank's own inside no_sync().
  using P = policy<fp32, cpu, data_parallel>;
  std::vector<std::vector<float>> after(2), local(2), reference(1);
  {
    // the average of the two ranks' gradients, computed by one process
    mlp<single_policy<fp32>> m;
    m.store.zero_grad();
    m.backward(1, 0, 12, 0.5);
    m.backward(1, 12, 24, 0.5);
    reference[0].assign(m.store.grads().data(), m.store.grads().data() + m.store.size());
  }
  run_ranks(2, [&](thread_comm& comm) {
    mlp<P> m;
    optim::sgd opt({.lr = 0.1});
    // buckets of 100 elements end inside tensors; 3 in flight at most
    parallel::distributed_step<P, thread_comm> dist(m.store, comm, {.reduce_bucket_size = 100, .max_in_flight = 3});
    const index_t b = 12 * comm.rank(), e = b + 12;
    const auto r = static_cast<std::size_t>(comm.rank());
    CHECK_FALSE(dist.overlapping());  // not before a backward has reported every tensor
    m.store.zero_grad();
    m.backward(0, b, e, 1.0);
    dist.step(opt);
    CHECK(dist.overlapping());
    // step 1, with the params of step 0 restored so that the single-process reference applies
    {
      mlp<P> fresh;
      copy(fresh.store.params(), m.store.params());
    }
    m.store.zero_grad();
    {
      auto guard = dist.no_sync();
      CHECK_FALSE(dist.overlapping());
      m.backward(1, b, e, 1.0);
    }
    local[r].assign(m.store.grads().data(), m.store.grads().data() + m.store.size());
    m.store.zero_grad();
    m.backward(1, b, e, 1.0);
    after[r].assign(m.store.grads().data(), m.store.grads().data() + m.store.size());
  });
  CHECK(local[0] != local[1]);   // no_sync: each rank's own gradient
  CHECK(after[0] == after[1]);   // reduced during backward, identically on both ranks
  double worst = 0;
  for (std::size_t i = 0; i < after[0].size(); ++i) {
    worst = std::max(worst, std::fabs(double(after[0][i]) - reference[0][i]) / (1e-7 + 1e-6 * std::fabs(reference[0][i])));
  }
  CHECK(worst <= 1.0);
}

TEST_CASE("zero: data parallel with accumulation in no_sync() matches one micro-batch per rank") {
  using P = policy<fp32, cpu, data_parallel>;
  std::vector<std::vector<float>> one(2), two(2), every(2);
  for (int variant = 0; variant < 3; ++variant) {
    run_ranks(2, [&](thread_comm& comm) {
      mlp<P> m;
      optim::adamw opt({.lr = 1e-2});
      parallel::distributed_step<P, thread_comm> dist(m.store, comm, {.reduce_bucket_size = 64});
      const index_t b = 12 * comm.rank(), e = b + 12;
      for (int s = 0; s < 3; ++s) {
        m.store.zero_grad();
        if (variant == 0) {
          m.backward(s, b, e, 1.0);
        } else {
          if (variant == 1) {
            auto guard = dist.no_sync();
            m.backward(s, b, b + 6, 0.5);
          } else {
            m.backward(s, b, b + 6, 0.5);
          }
          m.backward(s, b + 6, e, 0.5);  // variant 2: every micro-batch reduces the running sum
        }
        dist.step(opt);
      }
      (variant == 0 ? one : variant == 1 ? two : every)[static_cast<std::size_t>(comm.rank())] = m.params();
    });
  }
  for (const auto* v : {&two, &every}) {
    CHECK((*v)[0] == (*v)[1]);
    double worst = 0;
    for (std::size_t i = 0; i < one[0].size(); ++i) {
      worst = std::max(worst, std::fabs(double(one[0][i]) - (*v)[0][i]) / (1e-6 + 1e-5 * std::fabs(one[0][i])));
    }
    CHECK(worst <= 1.0);
  }
}

TEST_CASE("zero: ZeRO-2 and ZeRO-3 on a deeper model hold a few units at a time and match single-process training") {
  // 13 layers, one unit each (buckets of 300 elements; no unit persists): ZeRO-3 keeps the two
  // most recently used units and a prefetched one gathered, ZeRO-2 the units backward is
  // between; both must still train as one process does (SGD: Adam would magnify the last-bit
  // differences of the summation order on the many near-zero gradients of a deep narrow net).
  const auto ref = train_single<fp32>(sgd, 0.05, nullptr, deep);
  std::size_t full_params = 0;
  {
    mlp<single_policy<fp32>> m(deep);
    full_params = static_cast<std::size_t>(m.store.size()) * sizeof(float);
  }
  for (int ranks : {2, 3}) {
    const parallel::distributed_options o{.reduce_bucket_size = 300, .param_persistence_threshold = 0, .step = {.gradient_clipping = 0.05}};
    std::vector<std::size_t> peaks;
    const auto z3 = train_distributed<policy<fp32, cpu, zero<3>>>(ranks, sgd, o, deep, &peaks);
    compare(z3, ref, 1e-6, 1e-7, 1e-6, "zero_3 deep, ranks " + std::to_string(ranks));
    // gathered params, unit gradients and reductions in flight together stay below one full copy
    for (auto p : peaks) CHECK_MESSAGE(p < full_params, p << " bytes at the peak, full params " << full_params);
    const auto z3_no_prefetch = train_distributed<policy<fp32, cpu, zero<3>>>(ranks, sgd, parallel::distributed_options{
        .reduce_bucket_size = 300, .param_persistence_threshold = 0, .prefetch = false, .step = {.gradient_clipping = 0.05}}, deep);
    CHECK(z3_no_prefetch[0] == z3[0]);  // prefetching changes when, not what
    const auto z2 = train_distributed<policy<fp32, cpu, zero<2>>>(ranks, sgd, o, deep, &peaks);
    compare(z2, ref, 1e-6, 1e-7, 1e-6, "zero_2 deep, ranks " + std::to_string(ranks));
    for (auto p : peaks) CHECK_MESSAGE(p < full_params, p << " bytes at the peak, full params " << full_params);
  }
}

TEST_CASE("zero: ZeRO-3 releases the store's params and gathers units on demand") {
  using P = policy<bf16_mixed, cpu, zero<3>>;
  run_ranks(2, [&](thread_comm& comm) {
    mlp<P> m(deep);
    optim::adamw opt({.lr = 1e-2});
    parallel::distributed_step<P, thread_comm> dist(m.store, comm, {.reduce_bucket_size = 300, .param_persistence_threshold = 0});
    CHECK(m.store.params_released());
    CHECK(m.store.grads_released());
    CHECK_THROWS_WITH_AS(m.store.params(), doctest::Contains("the flat params were released"), trident::error);
    CHECK_THROWS_WITH_AS(m.store.grads(), doctest::Contains("the flat gradient buffer was released"), trident::error);
    CHECK(dist.units().size() == 13);  // one per layer
    CHECK(dist.memory(opt).gathered == 0);
    // a tensor's params come from its unit, gathered on demand: fc4's weight equals the gathered copy
    tensor<bfloat16> all({m.store.size()});
    dist.gather_params(all.view());
    const auto h = m.layers[3].weight();
    auto w = m.store.param(h);
    CHECK(std::memcmp(w.data(), all.data() + m.store.info(h).offset, static_cast<std::size_t>(w.numel()) * sizeof(bfloat16)) == 0);
    CHECK(dist.memory(opt).gathered > 0);
    m.store.zero_grad();
    m.backward(0, 12 * comm.rank(), 12 * comm.rank() + 12, 1.0);
    // after backward: every unit was reduced (all reported), so no gradient buffer remains
    CHECK(dist.memory(opt).local_grads == 0);
    // the units still gathered are at most live_units (2) plus the prefetched one
    const auto u = dist.units();
    std::size_t biggest = 0;
    for (const auto& x : u) biggest = std::max(biggest, static_cast<std::size_t>(x.end - x.begin));
    CHECK(dist.memory(opt).gathered <= 3 * biggest * sizeof(bfloat16));
    dist.step(opt);
    CHECK(dist.memory(opt).gathered == 0);  // stale after the step: released
  });
}

namespace {

/// A small GPT (tied head, embeddings, layer norms, attention, checkpointing) trained for 3
/// steps with SGD, per rank on its share of 4 sequences; the params after each step (rank 0's
/// gathered ones, and whether every rank holds the same).
template <class P, class Comm>
std::vector<std::vector<float>> train_gpt(Comm& comm, const parallel::distributed_options& o, bool checkpoint, bool* same_on_ranks) {
  nn::gpt_config cfg;
  cfg.vocab_size = 13;
  cfg.block_size = 8;
  cfg.n_layer = 2;
  cfg.n_head = 2;
  cfg.n_embd = 16;
  nn::parameter_store<P> store;
  nn::gpt<P> model(store, cfg);
  model.set_checkpointing(checkpoint);
  store.allocate();
  generator g(7);
  model.init(g);
  store.master_from_params();
  const index_t batch = 4, t = 8, rows = batch / comm.size(), first = rows * comm.rank();
  std::vector<std::int32_t> x(static_cast<std::size_t>(batch * t)), y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    x[i] = static_cast<std::int32_t>((i * 7 + i / 5) % 13);
    y[i] = static_cast<std::int32_t>((i * 3 + 1) % 13);
  }
  optim::sgd opt({.lr = 0.5, .momentum = 0.9});
  nn::arena<cpu> mem;
  std::vector<std::vector<float>> out;
  auto run = [&](auto& dist) {
    for (int s = 0; s < 3; ++s) {
      store.zero_grad();
      mem.reset();
      nn::context<P> ctx{mem, true, nullptr};
      model.forward(ctx, std::span<const std::int32_t>(x.data() + first * t, static_cast<std::size_t>(rows * t)), rows,
                    std::span<const std::int32_t>(y.data() + first * t, static_cast<std::size_t>(rows * t)));
      model.backward(ctx);
      dist.step(opt);
      tensor<float> all({store.size()});
      dist.gather_params(all.view());
      out.emplace_back(all.data(), all.data() + all.numel());
    }
  };
  parallel::distributed_step<P, Comm> dist(store, comm, o);
  run(dist);
  // every rank's params equal rank 0's
  double h = 0;
  for (float v : out.back()) h = h * 1.000001 + v;
  double lo = -h, hi = h;
  comm.all_reduce(&lo, 1, reduce_op::max);
  comm.all_reduce(&hi, 1, reduce_op::max);
  *same_on_ranks = (-lo == hi);
  return out;
}

}  // namespace

TEST_CASE_TEMPLATE("zero: a GPT (tied head, embeddings, checkpointing) trains alike under every strategy", S, data_parallel, zero<1>, zero<2>,
                   zero<3>) {
  // The reference is data parallel on one rank (the whole batch); the strategy runs on 2 ranks
  // with small units (buckets of 300 elements, nothing persistent): the tied head's gradient
  // reaches the token embedding's unit first, the embedding's own backward last, and ZeRO-3
  // gathers the embedding's unit again for the head.
  using P = policy<fp32, cpu, S>;
  std::vector<std::vector<float>> ref, got;
  bool same = false;
  local_comm one;
  ref = train_gpt<policy<fp32, cpu, data_parallel>>(one, {}, false, &same);
  for (bool checkpoint : {false, true}) {
    std::vector<std::vector<std::vector<float>>> per_rank(2);
    std::vector<char> same_rank(2);
    run_ranks(2, [&](thread_comm& comm) {
      bool s = false;
      per_rank[static_cast<std::size_t>(comm.rank())] =
          train_gpt<P>(comm, {.reduce_bucket_size = 300, .param_persistence_threshold = 0}, checkpoint, &s);
      same_rank[static_cast<std::size_t>(comm.rank())] = s;
    });
    INFO(std::string(S::name) << (checkpoint ? ", checkpointing" : ""));
    CHECK(same_rank[0]);
    REQUIRE(per_rank[0].size() == ref.size());
    double worst = 0, moved = 0;
    for (std::size_t s = 0; s < ref.size(); ++s) {
      // ZeRO pads the flat buffers to a multiple of the ranks; compare the common part
      for (std::size_t i = 0; i < ref[s].size(); ++i) {
        worst = std::max(worst, std::fabs(double(per_rank[0][s][i]) - ref[s][i]) / (1e-6 + 1e-5 * std::fabs(ref[s][i])));
        moved = std::max(moved, std::fabs(double(ref[s][i]) - ref[0][i]));
      }
    }
    CHECK(moved > 1e-3);
    CHECK(worst <= 1.0);
  }
}
