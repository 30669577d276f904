// The training step and the trainer: clipping and loss scaling against hand computation,
// overflow skipping (scheduler not stepped), gradient accumulation equal to one big batch,
// metrics, the CSV log, and a short run on a separable synthetic problem whose loss must fall.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include <trident/io/batches.hpp>
#include <trident/trident.hpp>

#include "blobs_fixture.hpp"

using namespace trident;

namespace {

using fp32p = policy<fp32, cpu>;
using bf16p = policy<bf16_mixed, cpu>;
using fp16p = policy<fp16_mixed, cpu>;

/// Sets the gradients of `store`, tensor after tensor in declaration order, from a double vector.
template <class P>
void set_grads(nn::parameter_store<P>& store, const std::vector<double>& g) {
  std::size_t k = 0;
  for (const auto& info : store.infos()) {
    auto* grads = store.grads().data() + info.offset;
    for (index_t i = 0; i < info.numel(); ++i) grads[i] = static_cast<typename P::gradient_type>(static_cast<float>(g.at(k++)));
  }
  REQUIRE(k == g.size());
}

template <class P>
std::vector<double> master_values(nn::parameter_store<P>& store) {
  std::vector<double> out;
  for (const auto& info : store.infos()) {
    auto m = store.master().data() + info.offset;
    for (index_t i = 0; i < info.numel(); ++i) out.push_back(static_cast<double>(m[i]));
  }
  return out;
}

/// A model that passes its input through as logits (for metric tests), counting 7 FLOPs per row.
template <class P>
struct pass_through {
  using S = typename P::storage_type;
  index_t rows = 0;
  tensor_view<S, cpu> forward(nn::context<P>& ctx, tensor_view<const S, cpu> x) {
    auto y = ctx.template allocate<S>(x.shape());
    copy(x, y);
    rows = x.size(0);
    return y;
  }
  tensor_view<S, cpu> backward(nn::context<P>& ctx, tensor_view<const S, cpu> dy) {
    auto dx = ctx.template allocate<S>(dy.shape());
    copy(dy, dx);
    return dx;
  }
  std::int64_t flops() const { return 7 * rows; }
};

using blobs_fixture::blobs;

template <class P>
struct mlp {
  nn::parameter_store<P> store;
  nn::sequential<P, nn::linear<P>, nn::linear<P>> net;
  explicit mlp(int classes, std::uint64_t seed = 5)
      : net(nn::linear<P>(store, "fc1", 8, 32, true, activation::relu), nn::linear<P>(store, "fc2", 32, classes)) {
    store.allocate();
    generator g(seed);
    net.init(g);
    store.master_from_params();
  }
};

}  // namespace

TEST_CASE("step_control: clipping by global L2 norm, fused into the optimizer step (fp32, bf16)") {
  auto run = []<class P>(P) {
    nn::parameter_store<P> store;
    const auto a = store.declare("a", {3});
    store.declare("b", {2}, false);
    store.allocate();
    (void)a;
    const std::vector<double> g = {3.0, -4.0, 12.0, 0.0, 84.0};  // norm 85
    set_grads(store, g);
    const auto before = master_values(store);
    optim::sgd opt({.lr = 1.0});
    train::step_control<P> control({.gradient_clipping = 17.0});
    const auto r = control.step(store, opt);
    CHECK(r.applied);
    CHECK(r.grad_norm == doctest::Approx(85.0).epsilon(1e-6));
    const double clip = 17.0 / (85.0 + 1e-6);  // PyTorch's clip_grad_norm_ factor
    CHECK(r.clip == doctest::Approx(clip).epsilon(1e-9));
    const auto after = master_values(store);
    for (std::size_t i = 0; i < g.size(); ++i) CHECK(after[i] == doctest::Approx(before[i] - clip * g[i]).epsilon(1e-6));
    // Below the threshold nothing is scaled.
    set_grads(store, {0.1, 0.2, 0.3, 0.4, 0.5});
    CHECK(control.step(store, opt).clip == 1.0);
  };
  run(fp32p{});
  run(bf16p{});
}

TEST_CASE("step_control: a non-finite gradient without loss scaling is an error naming the tensor") {
  nn::parameter_store<fp32p> store;
  store.declare("first", {4});
  store.declare("second.weight", {4});
  store.allocate();
  set_grads(store, {0, 0, 0, 0, 1, std::numeric_limits<double>::quiet_NaN(), 0, 0});
  optim::sgd opt({.lr = 0.1});
  train::step_control<fp32p> control({.gradient_clipping = 1.0});
  std::string msg;
  try {
    control.step(store, opt);
  } catch (const error& e) {
    msg = e.what();
  }
  CHECK(msg.find("'second.weight'") != std::string::npos);
  CHECK(msg.find("not finite") != std::string::npos);
}

TEST_CASE("step_control: fp16 unscales and clips in one factor, skips overflowing steps and follows the scaler") {
  nn::parameter_store<fp16p> store;
  store.declare("w", {4});
  store.allocate();
  optim::sgd opt({.lr = 1.0});
  train::step_control<fp16p> control({.gradient_clipping = 2.0, .dynamic_scaler = {.initial_scale_power = 4, .hysteresis = 1}});
  CHECK(control.loss_scale() == 16.0);
  // Gradients as backward leaves them: scaled by 16. True gradient (1, 2, 2, 4): norm 5.
  set_grads(store, {16.0, 32.0, 32.0, 64.0});
  const auto before = master_values(store);
  auto r = control.step(store, opt);
  CHECK(r.applied);
  CHECK(r.loss_scale == 16.0);
  CHECK(r.grad_norm == doctest::Approx(5.0).epsilon(1e-6));
  const double clip = 2.0 / (5.0 + 1e-6);
  auto after = master_values(store);
  const double truth[] = {1, 2, 2, 4};
  for (int i = 0; i < 4; ++i) CHECK(after[static_cast<std::size_t>(i)] == doctest::Approx(before[static_cast<std::size_t>(i)] - clip * truth[i]).epsilon(1e-5));
  // An overflow: skipped, weights untouched, the scale halves (hysteresis 1).
  set_grads(store, {1.0, std::numeric_limits<double>::infinity(), 0, 0});
  r = control.step(store, opt);
  CHECK_FALSE(r.applied);
  CHECK(master_values(store) == after);
  CHECK(control.loss_scale() == 8.0);
  CHECK(control.skipped_steps() == 1);
  // A static scale never moves but still skips.
  train::step_control<fp16p> fixed({.loss_scale = 128.0});
  CHECK(fixed.loss_scale() == 128.0);
  CHECK_FALSE(fixed.step(store, opt).applied);
  CHECK(fixed.loss_scale() == 128.0);
  CHECK(fixed.skipped_steps() == 1);
}

TEST_CASE("step_control: bad options are refused") {
  CHECK_THROWS_AS(train::step_control<fp32p>({.gradient_clipping = -1.0}), error);
  CHECK_THROWS_AS(train::step_control<fp16p>({.loss_scale = std::numeric_limits<double>::infinity()}), error);
}

TEST_CASE("trainer: gradient accumulation over micro-batches gives the step of one big batch") {
  blobs data(64, 3, 1);
  auto step_with = [&](int k) {
    mlp<fp32p> m(3);
    optim::sgd opt({.lr = 0.5, .momentum = 0.9});
    train::trainer<fp32p, decltype(m.net), optim::sgd> t(m.net, m.store, opt, {.gradient_accumulation_steps = k, .progress = false, .out = nullptr});
    for (int s = 0; s < 3; ++s) t.train_batch(data.x.view(), data.y);
    return master_values(m.store);
  };
  const auto one = step_with(1);
  for (int k : {2, 4, 5}) {
    const auto acc = step_with(k);
    INFO("accumulation steps " << k);
    REQUIRE(acc.size() == one.size());
    double worst = 0;
    for (std::size_t i = 0; i < one.size(); ++i) worst = std::max(worst, std::abs(acc[i] - one[i]));
    CHECK(worst < 2e-6);
  }
}

TEST_CASE("trainer: metrics of a pass-through model are the hand-counted ones; FLOPs add up") {
  // Logits = inputs: rows 0 and 2 have their max at the label, row 1 does not, row 3 is ignored.
  tensor<float> x({4, 3});
  const float v[] = {5, 1, 0, /**/ 0, 1, 3, /**/ 0, 0, 2, /**/ 9, 0, 0};
  for (int i = 0; i < 12; ++i) x.data()[i] = v[i];
  const std::vector<std::int32_t> y = {0, 1, 2, -100};
  nn::parameter_store<fp32p> store;
  store.declare("unused", {1});
  store.allocate();
  pass_through<fp32p> model;
  optim::sgd opt({.lr = 0.1});
  train::trainer<fp32p, pass_through<fp32p>, optim::sgd> t(model, store, opt, {.progress = false, .out = nullptr});
  io::batch_loader<float> loader(x.view(), y, {.batch_size = 3, .shuffle = false});
  const auto m = t.evaluate(loader);
  CHECK(m.samples == 3);
  CHECK(m.accuracy == doctest::Approx(2.0 / 3.0));
  // Mean cross-entropy of the three counted rows, in double.
  auto ce = [](std::vector<double> z, int label) {
    double mx = z[0];
    for (double e : z) mx = std::max(mx, e);
    double s = 0;
    for (double e : z) s += std::exp(e - mx);
    return std::log(s) + mx - z[static_cast<std::size_t>(label)];
  };
  const double want = (ce({5, 1, 0}, 0) + ce({0, 1, 3}, 1) + ce({0, 0, 2}, 2)) / 3.0;
  CHECK(m.loss == doctest::Approx(want).epsilon(1e-6));
  CHECK(m.flops == 7.0 * 4);  // every row passes the model, ignored or not
}

TEST_CASE("trainer: fp16 overflow skips the step and the scheduler stays put; the loss still falls") {
  blobs data(256, 4, 2);
  mlp<fp16p> m(4);
  optim::adamw opt({.lr = 1e-2, .weight_decay = 0.0});
  sched::warmup_lr sched(opt, {.warmup_min_lr = 1e-3, .warmup_num_steps = 10, .warmup_type = sched::warmup_kind::linear});
  // 2^40 overflows fp16 at once: the scaler halves (hysteresis 1) until gradients fit.
  train::trainer<fp16p, decltype(m.net), optim::adamw, sched::warmup_lr> t(
      m.net, m.store, opt,
      {.step = {.dynamic_scaler = {.initial_scale_power = 40, .hysteresis = 1}}, .progress = false, .out = nullptr}, sched);
  io::batch_loader<half> loader(data.x.view(), data.y, {.batch_size = 32, .seed = 3});
  double first = 0, last = 0;
  int skipped_seen = 0;
  for (int e = 0; e < 6; ++e) {
    double sum = 0;
    int batches = 0;
    for (const auto& b : loader.epoch(static_cast<std::uint64_t>(e))) {
      const auto before = master_values(m.store);
      const auto r = t.train_batch(b.inputs, b.labels);
      if (!r.step.applied) {
        ++skipped_seen;
        CHECK(master_values(m.store) == before);
      }
      sum += r.loss;
      ++batches;
    }
    if (e == 0) first = sum / batches;
    last = sum / batches;
  }
  CHECK(skipped_seen >= 16);  // gradients of order 1 overflow fp16 until the scale is below 2^24
  CHECK(t.control().skipped_steps() == skipped_seen);
  // The scheduler stepped once per applied step only.
  CHECK(t.scheduler().last_batch_iteration() == t.steps() - skipped_seen - 1);
  // No window of 1000 clean steps has passed: the scale only halved, once per overflow.
  CHECK(t.control().loss_scale() == std::ldexp(1.0, 40 - skipped_seen));
  CHECK(last < 0.6 * first);
}

TEST_CASE("trainer: fit learns a separable problem in every precision and writes the CSV log") {
  blobs train_set(512, 4, 3), test_set(256, 4, 4);
  const auto dir = std::filesystem::temp_directory_path() / "trident_test_train";
  std::filesystem::create_directories(dir);
  auto fit = [&]<class P>(P, const char* name) {
    using S = typename P::storage_type;
    mlp<P> m(4);
    optim::sgd opt({.lr = 0.1, .momentum = 0.9});
    const auto csv = (dir / (std::string(name) + ".csv")).string();
    std::FILE* sink = std::tmpfile();
    train::trainer<P, decltype(m.net), optim::sgd> t(m.net, m.store, opt,
                                                     {.epochs = 4, .csv_path = csv, .log_every = 8, .progress = false, .out = sink});
    io::batch_loader<S> tl(train_set.x.view(), train_set.y, {.batch_size = 32, .seed = 1});
    io::batch_loader<S> el(test_set.x.view(), test_set.y, {.batch_size = 100, .shuffle = false});
    const auto s = t.fit(tl, &el);
    std::fclose(sink);
    INFO(name);
    CHECK(s.steps == 4 * 16);
    CHECK(s.last_eval.samples == 256);
    CHECK(s.last_eval.accuracy > 0.95);
    CHECK(s.last_train.loss < 0.2);
    // FLOPs: two linear layers, 2·(8·32 + 32·4) per sample forward, 3x for training.
    CHECK(s.train_flops == doctest::Approx(3.0 * 2.0 * (8 * 32 + 32 * 4) * 512 * 4));
    // Without the first layer's input gradient, its backward costs one forward, not two.
    if constexpr (std::is_same_v<P, fp32p>) {
      mlp<P> m2(4);
      m2.net.template get<0>().set_input_grad(false);
      optim::sgd opt2({.lr = 0.1});
      train::trainer<P, decltype(m2.net), optim::sgd> t2(m2.net, m2.store, opt2, {.progress = false, .out = nullptr});
      io::batch_loader<S> l2(train_set.x.view(), train_set.y, {.batch_size = 32, .seed = 1});
      const auto s2 = t2.fit(l2);
      CHECK(s2.train_flops == doctest::Approx((3.0 * 2.0 * (8 * 32 + 32 * 4) - 2.0 * 8 * 32) * 512));
    }
    CHECK(s.memory.parameters == m.store.bytes());
    CHECK(s.memory.optimizer_state == static_cast<std::size_t>(m.store.size()) * sizeof(float));  // momentum
    // The log: a header, a row every 8 steps, and one per epoch with the eval metrics.
    std::ifstream in(csv);
    std::string line;
    std::getline(in, line);
    CHECK(line == "step,epoch,lr,train_loss,train_acc,eval_loss,eval_acc,samples_per_s,loss_scale,skipped_steps");
    int rows = 0, eval_rows = 0;
    double last_eval_acc = 0;
    while (std::getline(in, line)) {
      ++rows;
      std::vector<std::string> cols;
      std::stringstream ss(line);
      for (std::string c; std::getline(ss, c, ',');) cols.push_back(c);
      REQUIRE(cols.size() == 10);
      if (cols[6] != "nan") {
        ++eval_rows;
        last_eval_acc = std::stod(cols[6]);
      }
    }
    CHECK(rows == 4 * 2 + 4);
    CHECK(eval_rows == 4);
    CHECK(last_eval_acc == doctest::Approx(s.last_eval.accuracy).epsilon(1e-6));
  };
  fit(fp32p{}, "fp32");
  fit(bf16p{}, "bf16");
  fit(fp16p{}, "fp16");
  std::filesystem::remove_all(dir);
}

TEST_CASE("trainer: bad options and mismatched batches are refused") {
  mlp<fp32p> m(3);
  optim::sgd opt({.lr = 0.1});
  using T = train::trainer<fp32p, decltype(m.net), optim::sgd>;
  CHECK_THROWS_AS(T(m.net, m.store, opt, {.gradient_accumulation_steps = 0}), error);
  CHECK_THROWS_AS(T(m.net, m.store, opt, {.epochs = -1}), error);
  T t(m.net, m.store, opt, {.progress = false, .out = nullptr});
  tensor<float> x({4, 8});
  fill(x, 0.0);
  const std::vector<std::int32_t> y = {0, 1, 2};
  CHECK_THROWS_AS(t.train_batch(x.view(), y), shape_error);
  const std::vector<std::int32_t> bad = {0, 1, 2, 7};
  CHECK_THROWS_AS(t.train_batch(x.view(), bad), error);
}
