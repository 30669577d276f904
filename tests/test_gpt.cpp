// The GPT's modules and the model: finite-difference gradient checks in double (embeddings
// with positions, causal self-attention with and without dropout, a transformer block, the
// whole model with its tied head and loss), activation checkpointing against the stored
// activations, the mixed-precision model against fp64 with the same weights, sampling, the
// configuration errors, and a short training run on text whose loss must fall.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <numeric>
#include <string>
#include <vector>

#include <unistd.h>

#include <trident/io/char_text.hpp>
#include <trident/trident.hpp>

#include "gradcheck.hpp"

using namespace trident;
using trident_test::f64;
using trident_test::gradcheck;
using trident_test::random_input;

namespace {

using f32 = policy<fp32, cpu>;
using bf16 = policy<bf16_mixed, cpu>;

nn::gpt_config tiny_config() {
  nn::gpt_config c;
  c.vocab_size = 11;
  c.block_size = 8;
  c.n_layer = 2;
  c.n_head = 2;
  c.n_embd = 8;
  return c;
}

std::vector<std::int32_t> random_tokens(std::size_t n, std::int32_t vocab, std::uint64_t seed) {
  std::vector<std::int32_t> v(n);
  std::uint64_t s = seed;
  for (auto& t : v) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    t = static_cast<std::int32_t>((s >> 33) % static_cast<std::uint64_t>(vocab));
  }
  return v;
}

}  // namespace

TEST_CASE("gradient check: token + position embedding (repeated ids accumulate)") {
  nn::parameter_store<f64> store;
  nn::embedding<f64> wte(store, "wte", 6, 4), wpe(store, "wpe", 5, 4);
  store.allocate();
  generator g(1);
  wte.init(g);
  wpe.init(g);
  const std::vector<std::int32_t> ids{3, 1, 3, 0, 5, 3};  // (2, 3): 3 occurs three times
  auto x = random_input({2, 3, 4}, 2);                      // added, so that the input gradient is checked too
  const auto r = gradcheck(
      store, x,
      [&](nn::context<f64>& ctx, tensor_view<const double> in) {
        auto e = wte.forward(ctx, ids, {2, 3, 4}, &wpe);
        add(e, in, e);
        return e;
      },
      [&](nn::context<f64>& ctx, tensor_view<const double> dy) {
        wte.backward(ctx, dy, &wpe);
        auto dx = ctx.allocate<double>(dy.shape());
        copy(dy, dx);
        return dx;
      });
  INFO("worst " << r.worst);
  CHECK(r.checked > 0);
  CHECK(r.max_rel_error < 1e-6);
  // The lookup itself: row (b, t) is wte[id] + wpe[t].
  nn::arena<cpu> mem;
  nn::context<f64> ctx{mem};
  auto e = to_vector(wte.forward(ctx, ids, {2, 3, 4}, &wpe));
  const auto w = to_vector(store.param(wte.weight())), p = to_vector(store.param(wpe.weight()));
  for (int r0 = 0; r0 < 6; ++r0) {
    for (int i = 0; i < 4; ++i) CHECK(e[r0 * 4 + i] == w[ids[r0] * 4 + i] + p[(r0 % 3) * 4 + i]);
  }
  CHECK_THROWS_AS(wte.forward(ctx, std::vector<std::int32_t>{0, 6}, {2, 4}), error);   // id out of range
  CHECK_THROWS_AS(wte.forward(ctx, ids, {2, 4}), shape_error);                          // 6 ids, 2 rows
  CHECK_THROWS_AS(wte.forward(ctx, std::vector<std::int32_t>(12, 0), {2, 6, 4}, &wpe), shape_error);  // 6 > 5 positions
}

TEST_CASE("gradient check: causal self-attention, with and without attention dropout") {
  for (double p : {0.0, 0.25}) {
    nn::parameter_store<f64> store;
    nn::causal_self_attention<f64> attn(store, "attn", 8, 2, true, p);
    store.allocate();
    generator init(3);
    attn.init(init);
    auto x = random_input({2, 5, 8}, 4);
    generator gen(9);
    const auto r = gradcheck(
        store, x,
        [&](nn::context<f64>& ctx, tensor_view<const double> in) {
          ctx.rng = &gen;
          return attn.forward(ctx, in);
        },
        [&](nn::context<f64>& ctx, tensor_view<const double> dy) { return attn.backward(ctx, dy); },
        [&] { gen.set_offset(0); }, 1e-6, 40, 1e-4);
    INFO("dropout " << p << ": worst " << r.worst);
    CHECK(r.checked > 0);
    CHECK(r.max_rel_error < 1e-5);  // the difference quotient rounds to ~1e-10 absolute
  }
  nn::parameter_store<f64> store;
  CHECK_THROWS_AS(nn::causal_self_attention<f64>(store, "bad", 10, 3), shape_error);
  CHECK_THROWS_AS(nn::causal_self_attention<f64>(store, "bad2", 8, 2, true, 1.0), error);
}

TEST_CASE("causal self-attention: later tokens do not change earlier outputs") {
  nn::parameter_store<f64> store;
  nn::causal_self_attention<f64> attn(store, "attn", 12, 3);
  store.allocate();
  generator g(5);
  attn.init(g);
  auto x = random_input({1, 6, 12}, 6);
  nn::arena<cpu> mem;
  nn::context<f64> ctx{mem};
  const auto y0 = to_vector(attn.forward(ctx, x.view()));
  for (int i = 0; i < 12; ++i) x.data()[5 * 12 + i] += 1.0;  // change the last token only
  const auto y1 = to_vector(attn.forward(ctx, x.view()));
  for (int i = 0; i < 5 * 12; ++i) CHECK(y1[i] == y0[i]);
  bool last_changed = false;
  for (int i = 5 * 12; i < 6 * 12; ++i) last_changed |= y1[i] != y0[i];
  CHECK(last_changed);
}

TEST_CASE("gradient check: transformer block (pre-LayerNorm, GELU MLP, residuals)") {
  nn::parameter_store<f64> store;
  nn::transformer_block<f64> block(store, "h.0", 8, 2, true, 0.0);
  store.allocate();
  generator g(7);
  block.init(g);
  auto x = random_input({2, 4, 8}, 8);
  const auto r = gradcheck(
      store, x, [&](nn::context<f64>& ctx, tensor_view<const double> in) { return block.forward(ctx, in); },
      [&](nn::context<f64>& ctx, tensor_view<const double> dy) { return block.backward(ctx, dy); }, [] {}, 1e-6, 40,
      1e-4);
  INFO("worst " << r.worst);
  CHECK(r.checked > 0);
  CHECK(r.max_rel_error < 1e-4);  // rounding noise ~3e-9 absolute on gradients down to ~1e-5
}

TEST_CASE("gradient check: the whole GPT (tied head, loss), with and without checkpointing") {
  for (bool ckpt : {false, true}) {
    nn::parameter_store<f64> store;
    auto cfg = tiny_config();
    cfg.dropout = 0.1;
    nn::gpt<f64> model(store, cfg);
    model.set_checkpointing(ckpt);
    store.allocate();
    generator g(11);
    model.init(g);
    const index_t batch = 2, t = 6;
    const auto x = random_tokens(batch * t, 11, 1), y = random_tokens(batch * t, 11, 2);
    nn::arena<cpu> mem;
    generator drop(13);
    auto loss = [&] {
      mem.reset();
      drop.set_offset(0);
      nn::context<f64> ctx{mem, true, &drop};
      return model.forward(ctx, x, batch, y);
    };
    store.zero_grad();
    loss();
    {
      nn::context<f64> ctx{mem, true, &drop};
      model.backward(ctx);
    }
    const auto analytic = to_vector(store.grads());
    double worst = 0;
    int checked = 0;
    for (const auto& info : store.infos()) {
      const index_t n = info.numel(), step = std::max<index_t>(1, n / 12);
      for (index_t i = 0; i < n; i += step) {
        double* p = store.params().data() + info.offset + i;
        const double saved = *p, h = 1e-6;
        *p = saved + h;
        const double lp = loss();
        *p = saved - h;
        const double lm = loss();
        *p = saved;
        const double num = (lp - lm) / (2 * h), ana = analytic[static_cast<std::size_t>(info.offset + i)];
        const double err = std::fabs(num - ana) / std::max(1e-4, std::fabs(num) + std::fabs(ana));
        INFO(info.name << "[" << i << "] analytic " << ana << " numeric " << num);
        CHECK(err < 1e-5);
        worst = std::max(worst, err);
        ++checked;
      }
    }
    INFO("checkpointing " << ckpt << ": worst " << worst);
    CHECK(checked > 100);
  }
}

TEST_CASE("activation checkpointing: the same gradients (bit for bit) in less activation memory") {
  auto cfg = tiny_config();
  cfg.n_layer = 4;
  cfg.n_embd = 32;
  cfg.n_head = 4;
  cfg.block_size = 16;
  cfg.dropout = 0.2;
  const index_t batch = 4, t = 16;
  const auto x = random_tokens(batch * t, 11, 3), y = random_tokens(batch * t, 11, 4);
  std::vector<std::vector<float>> grads;
  std::vector<double> losses;
  std::vector<std::size_t> peaks;
  for (bool ckpt : {false, true}) {
    nn::parameter_store<f32> store;
    nn::gpt<f32> model(store, cfg);
    model.set_checkpointing(ckpt);
    store.allocate();
    generator g(17);
    model.init(g);
    nn::arena<cpu> mem;
    generator drop(19);
    nn::context<f32> ctx{mem, true, &drop};
    losses.push_back(model.forward(ctx, x, batch, y));
    model.backward(ctx);
    grads.push_back(to_vector(store.grads()));
    peaks.push_back(mem.peak_bytes() + model.checkpoint_scratch_bytes());
  }
  CHECK(losses[0] == losses[1]);
  CHECK(grads[0] == grads[1]);
  MESSAGE("activation bytes: stored " << peaks[0] << ", checkpointed " << peaks[1]);
  CHECK(peaks[1] < peaks[0] * 3 / 4);
}

TEST_CASE("GPT: nanoGPT's parameter counts and initialisation") {
  nn::gpt_config small;  // the CPU shape: 65, 64, 4, 4, 128
  nn::parameter_store<f32> s1;
  nn::gpt<f32> m1(s1, small);
  CHECK(m1.parameter_count() == 801664);
  CHECK(m1.parameter_count(false) == 801664 + 64 * 128);
  nn::gpt_config large{65, 256, 6, 6, 384};
  nn::parameter_store<f32> s2;
  nn::gpt<f32> m2(s2, large);
  CHECK(m2.parameter_count() == 10672512);
  // Initialisation: std 0.02 for weights, 0.02/sqrt(2 n_layer) for the residual projections.
  s2.allocate();
  generator g(1);
  m2.init(g);
  auto stddev = [&](const std::string& name) {
    for (const auto& info : s2.infos()) {
      if (info.name != name) continue;
      const auto v = to_vector(s2.params().slice(0, info.offset, info.offset + info.numel()));
      double ss = 0, mean = 0;
      for (float f : v) mean += f;
      mean /= static_cast<double>(v.size());
      for (float f : v) ss += (f - mean) * (f - mean);
      return std::sqrt(ss / static_cast<double>(v.size()));
    }
    FAIL("no parameter " << name);
    return 0.0;
  };
  CHECK(stddev("wte.weight") == doctest::Approx(0.02).epsilon(0.02));
  CHECK(stddev("h.0.attn.c_attn.weight") == doctest::Approx(0.02).epsilon(0.02));
  CHECK(stddev("h.3.mlp.c_fc.weight") == doctest::Approx(0.02).epsilon(0.02));
  CHECK(stddev("h.1.attn.c_proj.weight") == doctest::Approx(0.02 / std::sqrt(12.0)).epsilon(0.02));
  CHECK(stddev("h.5.mlp.c_proj.weight") == doctest::Approx(0.02 / std::sqrt(12.0)).epsilon(0.02));
  CHECK(stddev("h.0.attn.c_attn.bias") == 0.0);
  // Weight decay on 2-D tensors only (nanoGPT's configure_optimizers).
  for (const auto& info : s2.infos()) {
    INFO(info.name);
    CHECK(info.weight_decay == (info.extents.rank() == 2));
  }
}

TEST_CASE("GPT: bf16 mixed and fp32 against fp64 with the same weights") {
  auto cfg = tiny_config();
  cfg.n_embd = 32;
  cfg.n_head = 2;
  cfg.vocab_size = 40;
  cfg.block_size = 32;
  const index_t batch = 3, t = 32;
  const auto x = random_tokens(batch * t, 40, 5), y = random_tokens(batch * t, 40, 6);
  nn::parameter_store<f64> sd;
  nn::gpt<f64> md(sd, cfg);
  sd.allocate();
  generator g(23);
  md.init(g);
  nn::arena<cpu> mem;
  nn::context<f64> cd{mem};
  const double ref = md.forward(cd, x, batch, y);
  md.backward(cd);
  const auto gref = to_vector(sd.grads());
  auto run = [&](auto tag, double loss_tol, double grad_tol) {
    using P = decltype(tag);
    nn::parameter_store<P> s;
    nn::gpt<P> m(s, cfg);
    s.allocate();
    copy(sd.params(), s.master());
    s.params_from_master();
    nn::arena<cpu> mem2;
    nn::context<P> c{mem2};
    const double l = m.forward(c, x, batch, y);
    m.backward(c);
    const auto gr = to_vector(s.grads());
    double num = 0, den = 0;
    for (std::size_t i = 0; i < gr.size(); ++i) {
      num += (static_cast<double>(gr[i]) - gref[i]) * (static_cast<double>(gr[i]) - gref[i]);
      den += gref[i] * gref[i];
    }
    INFO(P::traits::name << ": loss " << l << " vs fp64 " << ref << ", gradient relative error " << std::sqrt(num / den));
    CHECK(std::fabs(l - ref) < loss_tol);
    CHECK(std::sqrt(num / den) < grad_tol);
  };
  run(f32{}, 1e-5, 1e-4);
  run(bf16{}, 2e-2, 5e-2);
}

TEST_CASE("GPT: sampling (greedy is the argmax; reproducible from the seed) and bad input") {
  nn::parameter_store<f32> store;
  nn::gpt<f32> model(store, tiny_config());
  store.allocate();
  generator g(29);
  model.init(g);
  nn::arena<cpu> mem;
  generator s1(1), s2(1);
  const auto a = model.generate(mem, {1, 2, 3}, 12, 1.0, 0, s1);
  const auto b = model.generate(mem, {1, 2, 3}, 12, 1.0, 0, s2);
  CHECK(a == b);
  CHECK(a.size() == 15);  // longer than the block: the context window slides
  for (auto t : a) CHECK((t >= 0 && t < 11));
  // top_k = 1: each new token is the argmax of the logits at the last position.
  generator s3(2);
  const auto greedy = model.generate(mem, {4}, 3, 0.7, 1, s3);
  std::vector<std::int32_t> ctx_tokens{4};
  for (int step = 0; step < 3; ++step) {
    mem.reset();
    nn::context<f32> ctx{mem, false};
    const auto z = to_vector(model.logits(ctx, ctx_tokens, 1));
    const std::size_t v = 11, last = (ctx_tokens.size() - 1) * v;
    const auto best = std::max_element(z.begin() + static_cast<std::ptrdiff_t>(last), z.begin() + static_cast<std::ptrdiff_t>(last + v));
    ctx_tokens.push_back(static_cast<std::int32_t>(best - (z.begin() + static_cast<std::ptrdiff_t>(last))));
  }
  CHECK(greedy == ctx_tokens);
  CHECK_THROWS_AS(model.generate(mem, {}, 3, 1.0, 0, s3), error);
  CHECK_THROWS_AS(model.generate(mem, {1}, 3, 0.0, 0, s3), error);
  nn::context<f32> ctx{mem};
  const std::vector<std::int32_t> nine(9, 1);
  CHECK_THROWS_AS(model.forward(ctx, nine, 1, nine), shape_error);  // 9 > block 8
  const std::vector<std::int32_t> bad{1, 2, 11, 3};
  CHECK_THROWS_AS(model.forward(ctx, bad, 1, bad), error);  // token 11 of a vocabulary of 11
  nn::gpt_config c = tiny_config();
  c.n_head = 3;
  nn::parameter_store<f32> s4;
  CHECK_THROWS_AS(nn::gpt<f32>(s4, c), error);
}

TEST_CASE("GPT training smoke test: the loss on a short text falls (fp32 and bf16 mixed)") {
  std::string text;
  for (int i = 0; i < 40; ++i) text += "the quick brown fox jumps over the lazy dog. ";
  const auto data = io::char_text::from_string(text, "fox text");
  auto train = [&](auto tag) {
    using P = decltype(tag);
    nn::gpt_config cfg{data.vocab_size(), 16, 2, 2, 32};
    nn::parameter_store<P> store;
    nn::gpt<P> model(store, cfg);
    store.allocate();
    generator g(31);
    model.init(g);
    optim::adamw opt({.lr = 3e-3, .beta2 = 0.99, .weight_decay = 0.1});
    train::step_control<P> control({.gradient_clipping = 1.0});
    io::batch_rng rng(7);
    const index_t batch = 8, t = 16;
    std::vector<std::int32_t> x(batch * t), y(batch * t);
    nn::arena<cpu> mem;
    double first = 0, last = 0;
    for (int step = 0; step < 60; ++step) {
      data.batch(io::char_text::split::train, batch, t, rng, x.data(), y.data());
      mem.reset();
      nn::context<P> ctx{mem};
      const double l = model.forward(ctx, x, batch, y);
      model.backward(ctx);
      control.step(store, opt);
      store.zero_grad();
      if (step == 0) first = l;
      last = l;
    }
    INFO(P::traits::name << ": loss " << first << " -> " << last);
    CHECK(first == doctest::Approx(std::log(static_cast<double>(data.vocab_size()))).epsilon(0.1));
    CHECK(last < 0.5 * first);
  };
  train(f32{});
  train(bf16{});
}

TEST_CASE("gradient check: layer norm that scales without a shift (GPT without biases)") {
  nn::parameter_store<f64> store;
  nn::layer_norm<f64> ln(store, "ln", 7, 1e-5, true, false);
  CHECK(store.infos().size() == 1);
  store.allocate();
  generator g(3);
  ln.init(g);
  normal(store.params(), g, 1.0, 0.3);  // a gamma away from 1
  auto x = random_input({4, 7}, 5);
  const auto r = gradcheck(
      store, x, [&](nn::context<f64>& ctx, tensor_view<const double> in) { return ln.forward(ctx, in); },
      [&](nn::context<f64>& ctx, tensor_view<const double> dy) { return ln.backward(ctx, dy); });
  INFO("worst " << r.worst);
  CHECK(r.max_rel_error < 1e-6);
}

TEST_CASE("weights files: a round trip restores every tensor; a bad file is refused and changes nothing") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("trident_weights_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const fs::path file = dir / "model.bin";
  auto cfg = tiny_config();
  nn::parameter_store<bf16> a;
  nn::gpt<bf16> ma(a, cfg);
  a.allocate();
  generator g(41);
  ma.init(g);
  a.master_from_params();
  nn::save_weights(a, file);
  CHECK(!fs::exists(dir / "model.bin.tmp"));
  nn::parameter_store<bf16> b;
  nn::gpt<bf16> mb(b, cfg);
  b.allocate();
  nn::load_weights(b, file);
  CHECK(to_vector(b.master()) == to_vector(a.master()));
  CHECK(to_vector(b.params()) == to_vector(a.params()));
  // Corrupt one byte in the middle: refused by the checksum, the model keeps its weights.
  std::string bytes;
  {
    std::ifstream in(file, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  auto write = [&](const std::string& content) {
    std::ofstream out(file, std::ios::binary | std::ios::trunc);
    out.write(content.data(), static_cast<std::streamsize>(content.size()));
  };
  nn::parameter_store<bf16> c;
  nn::gpt<bf16> mc(c, cfg);
  c.allocate();
  const auto before = to_vector(c.master());
  std::string bad = bytes;
  bad[bad.size() / 2] = static_cast<char>(bad[bad.size() / 2] ^ 0x5a);
  write(bad);
  CHECK_THROWS_WITH_AS(nn::load_weights(c, file), doctest::Contains("checksum"), error);
  write(bytes.substr(0, bytes.size() / 3));
  CHECK_THROWS_AS(nn::load_weights(c, file), error);
  write("not a weights file at all");
  CHECK_THROWS_WITH_AS(nn::load_weights(c, file), doctest::Contains("not a trident weights file"), error);
  CHECK(to_vector(c.master()) == before);
  // Another architecture: the shape mismatch is named.
  write(bytes);
  auto other = cfg;
  other.n_embd = 16;
  nn::parameter_store<bf16> d;
  nn::gpt<bf16> md(d, other);
  d.allocate();
  CHECK_THROWS_WITH_AS(nn::load_weights(d, file), doctest::Contains("wte.weight"), error);
  CHECK_THROWS_AS(nn::load_weights(b, dir / "missing.bin"), error);
  fs::remove_all(dir);
}
