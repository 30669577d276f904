// char_gpt: a character-level GPT trained on a text file (nanoGPT's shakespeare_char), then
// sampled. One binary per precision: build/examples/char_gpt_{fp32,bf16}.
//
// The defaults are nanoGPT's CPU configuration of shakespeare_char: block 64, batch 12, 4
// layers, 4 heads, width 128, no biases (train.py's default), dropout 0, 2000 iterations, AdamW (lr 1e-3, betas 0.9/0.99,
// weight decay 0.1 on 2-D weights), 100 warm-up iterations then cosine decay to 1e-4,
// gradient clipping at 1.0. Every --eval-interval iterations the loss is averaged over a
// fixed set of training and validation batches; at the end the model writes a sample and
// saves its weights.
//
//   build/examples/char_gpt_fp32                       # ../shared/data/tinyshakespeare.txt
//   build/examples/char_gpt_bf16 --data my.txt --iters 5000 --csv log.csv --save model.bin
//   build/examples/char_gpt_fp32 --checkpoint          # activation checkpointing: its memory and time
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <string_view>
#include <vector>

#include <trident/io/char_text.hpp>
#include <trident/trident.hpp>

#include "cli.hpp"

#ifndef TRIDENT_EXAMPLE_PRECISION
#define TRIDENT_EXAMPLE_PRECISION fp32
#endif
#ifndef TRIDENT_DEFAULT_TEXT
#define TRIDENT_DEFAULT_TEXT "../shared/data/tinyshakespeare.txt"
#endif

namespace {

using namespace trident;
using P = policy<TRIDENT_EXAMPLE_PRECISION, cpu>;
using text = io::char_text;

struct settings {
  std::string data{};
  index_t iters = 2000, batch = 12, block = 64, layers = 4, heads = 4, width = 128;
  double dropout = 0.0, lr = 1e-3, min_lr = 1e-4, beta2 = 0.99, weight_decay = 0.1, clip = 1.0;
  index_t warmup = 100, eval_interval = 250, eval_batches = 50;
  index_t sample = 500, top_k = 200;
  double temperature = 0.8;
  std::string prompt = "\n";
  std::uint64_t seed = 1337;
  int threads = 0;
  bool bias = false, checkpoint = false, progress = true;
  std::string csv{}, save{}, load{};
};

void usage(const char* prog, const settings& d, std::FILE* to) {
  std::fprintf(to,
               "usage: %s [options]\n"
               "  --data FILE          UTF-8 text (default $TRIDENT_TINYSHAKESPEARE or %s)\n"
               "  --iters N            training iterations (default %lld)\n"
               "  --batch N --block N  sequences per batch and their length (default %lld, %lld)\n"
               "  --layers N --heads N --width N   model size (default %lld, %lld, %lld)\n"
               "  --dropout X          dropout (default %g)\n"
               "  --bias               biases in the linear layers and LayerNorms (default none, as nanoGPT's train.py)\n"
               "  --lr X --min-lr X    peak and final learning rate (default %g, %g)\n"
               "  --warmup N           linear warm-up iterations before the cosine decay (default %lld)\n"
               "  --beta2 X --wd X     AdamW beta2 and weight decay (default %g, %g)\n"
               "  --clip X             gradient clipping at global L2 norm X, 0 = off (default %g)\n"
               "  --eval-interval N    iterations between loss estimates (default %lld)\n"
               "  --eval-batches N     fixed batches per estimate, per split (default %lld)\n"
               "  --sample N           characters to sample at the end (default %lld)\n"
               "  --temperature X --top-k N   sampling (default %g, %lld)\n"
               "  --prompt TEXT        the sample's start (default a newline)\n"
               "  --checkpoint         activation checkpointing (prints its memory saving and time cost)\n"
               "  --load FILE          start from saved weights (with --iters 0: only evaluate and sample)\n"
               "  --seed N --threads N --csv FILE --save FILE --no-progress\n",
               prog, TRIDENT_DEFAULT_TEXT, static_cast<long long>(d.iters), static_cast<long long>(d.batch),
               static_cast<long long>(d.block), static_cast<long long>(d.layers), static_cast<long long>(d.heads),
               static_cast<long long>(d.width), d.dropout, d.lr, d.min_lr, static_cast<long long>(d.warmup), d.beta2,
               d.weight_decay, d.clip, static_cast<long long>(d.eval_interval), static_cast<long long>(d.eval_batches),
               static_cast<long long>(d.sample), d.temperature, static_cast<long long>(d.top_k));
}

settings parse(int argc, char** argv) {
  settings s;
  const settings defaults;
  const example::cli args(argc, argv, [&](std::FILE* to) { usage(argv[0], defaults, to); });
  auto value = [&](int& i) { return args.value(i); };
  auto integer = [&](int& i, long long lo) { return static_cast<index_t>(args.integer(i, lo)); };
  auto real = [&](int& i, double lo) { return args.real(i, lo); };
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--data") s.data = value(i);
    else if (a == "--iters") s.iters = integer(i, 0);
    else if (a == "--batch") s.batch = integer(i, 1);
    else if (a == "--block") s.block = integer(i, 1);
    else if (a == "--layers") s.layers = integer(i, 1);
    else if (a == "--heads") s.heads = integer(i, 1);
    else if (a == "--width") s.width = integer(i, 1);
    else if (a == "--dropout") s.dropout = real(i, 0.0);
    else if (a == "--lr") s.lr = real(i, 0.0);
    else if (a == "--min-lr") s.min_lr = real(i, 0.0);
    else if (a == "--warmup") s.warmup = integer(i, 0);
    else if (a == "--beta2") s.beta2 = real(i, 0.0);
    else if (a == "--wd") s.weight_decay = real(i, 0.0);
    else if (a == "--clip") s.clip = real(i, 0.0);
    else if (a == "--eval-interval") s.eval_interval = integer(i, 1);
    else if (a == "--eval-batches") s.eval_batches = integer(i, 1);
    else if (a == "--sample") s.sample = integer(i, 0);
    else if (a == "--temperature") s.temperature = real(i, 1e-6);
    else if (a == "--top-k") s.top_k = integer(i, 0);
    else if (a == "--prompt") s.prompt = value(i);
    else if (a == "--checkpoint") s.checkpoint = true;
    else if (a == "--bias") s.bias = true;
    else if (a == "--seed") s.seed = static_cast<std::uint64_t>(integer(i, 0));
    else if (a == "--threads") s.threads = static_cast<int>(integer(i, 1));
    else if (a == "--csv") s.csv = value(i);
    else if (a == "--save") s.save = value(i);
    else if (a == "--load") s.load = value(i);
    else if (a == "--no-progress") s.progress = false;
    else args.help_or_unknown(a);
  }
  if (s.data.empty()) {
    const char* env = std::getenv("TRIDENT_TINYSHAKESPEARE");
    s.data = env != nullptr && *env != '\0' ? env : TRIDENT_DEFAULT_TEXT;
  }
  if (s.min_lr > s.lr) args.fail("--min-lr must not exceed --lr");
  return s;
}

/// A fixed set of batches of one split, drawn once so every estimate uses the same tokens.
struct fixed_batches {
  std::vector<std::int32_t> x, y;
  index_t count = 0, size = 0;
  fixed_batches(const text& data, text::split s, index_t count_, index_t batch, index_t block, std::uint64_t seed)
      : x(static_cast<std::size_t>(count_ * batch * block)), y(x.size()), count(count_), size(batch * block) {
    io::batch_rng rng(seed);
    for (index_t i = 0; i < count; ++i) data.batch(s, batch, block, rng, x.data() + i * size, y.data() + i * size);
  }
};

/// Mean loss of the model over a fixed set of batches (eval mode: no dropout).
double estimate(nn::gpt<P>& model, nn::arena<cpu>& mem, const fixed_batches& b, index_t batch) {
  double sum = 0;
  for (index_t i = 0; i < b.count; ++i) {
    mem.reset();
    nn::context<P> ctx{mem, false};
    const std::span<const std::int32_t> x(b.x.data() + i * b.size, static_cast<std::size_t>(b.size));
    const std::span<const std::int32_t> y(b.y.data() + i * b.size, static_cast<std::size_t>(b.size));
    sum += model.forward(ctx, x, batch, y);
  }
  return sum / static_cast<double>(b.count);
}

/// Mean loss over the whole validation split, cut into consecutive windows of `block` tokens
/// (every token predicted once; deterministic, unlike an estimate from sampled batches).
double full_validation(nn::gpt<P>& model, nn::arena<cpu>& mem, const text& data, index_t block) {
  const auto val = data.val_tokens();
  const index_t windows = (static_cast<index_t>(val.size()) - 1) / block, per_batch = 64;
  double sum = 0;
  for (index_t w0 = 0; w0 < windows; w0 += per_batch) {
    const index_t nb = std::min(per_batch, windows - w0);
    const std::span<const std::int32_t> x(val.data() + w0 * block, static_cast<std::size_t>(nb * block));
    const std::span<const std::int32_t> y(val.data() + w0 * block + 1, static_cast<std::size_t>(nb * block));
    mem.reset();
    nn::context<P> ctx{mem, false};
    sum += model.forward(ctx, x, nb, y) * static_cast<double>(nb);
  }
  return sum / static_cast<double>(windows);
}

/// Activation checkpointing's cost and saving: a few forward + backward passes of one batch
/// each way (gradients are zeroed afterwards; the weights do not change).
void measure_checkpointing(nn::gpt<P>& model, nn::parameter_store<P>& store, const std::vector<std::int32_t>& x,
                           const std::vector<std::int32_t>& y, index_t batch, std::uint64_t seed) {
  double ms[2] = {0, 0};
  std::size_t bytes[2] = {0, 0};
  for (int on = 0; on < 2; ++on) {
    model.set_checkpointing(on == 1);
    nn::arena<cpu> mem;
    generator drop(seed);
    std::vector<double> times;
    for (int rep = 0; rep < 6; ++rep) {
      mem.reset();
      nn::context<P> ctx{mem, true, &drop};
      const auto t0 = std::chrono::steady_clock::now();
      model.forward(ctx, x, batch, y);
      model.backward(ctx);
      times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(times.begin(), times.end());
    ms[on] = times[times.size() / 2];
    bytes[on] = mem.peak_bytes() + model.checkpoint_scratch_bytes();
  }
  store.zero_grad();
  const double mib = 1024.0 * 1024.0;
  std::printf("activation checkpointing: activations %.2f MiB -> %.2f MiB (%.0f%% saved), forward+backward %.1f ms -> %.1f ms "
              "(%+.0f%% time)\n",
              static_cast<double>(bytes[0]) / mib, static_cast<double>(bytes[1]) / mib,
              100.0 * (1.0 - static_cast<double>(bytes[1]) / static_cast<double>(bytes[0])), ms[0], ms[1],
              100.0 * (ms[1] / ms[0] - 1.0));
}

int run(int argc, char** argv) {
  const settings s = parse(argc, argv);
  if (s.threads > 0) omp_set_num_threads(s.threads);
  const text data(s.data);
  nn::gpt_config cfg{data.vocab_size(), s.block, s.layers, s.heads, s.width, s.dropout, s.bias};

  nn::parameter_store<P> store;
  nn::gpt<P> model(store, cfg);
  store.allocate();
  generator init_gen(s.seed);
  model.init(init_gen);
  store.master_from_params();
  if (!s.load.empty()) nn::load_weights(store, s.load);

  optim::adamw opt({.lr = s.lr, .beta1 = 0.9, .beta2 = s.beta2, .weight_decay = s.weight_decay});
  sched::warmup_cosine_lr schedule(opt, {.total_num_steps = std::max<std::int64_t>(2, s.iters),
                                         .warmup_num_steps = s.iters > 0 ? std::max<std::int64_t>(1, s.warmup) : 1,
                                         .cos_min_ratio = s.lr > 0 ? s.min_lr / s.lr : 0.0,
                                         .warmup_type = sched::warmup_kind::linear});
  train::step_control<P> control({.gradient_clipping = s.clip});

  const index_t tokens_per_iter = s.batch * s.block;
  const double flop_per_token = 6.0 * static_cast<double>(model.parameter_count()) +
                                12.0 * static_cast<double>(s.layers * s.block * s.width);
  std::printf("char_gpt (%s): %s; %lld characters (%lld train, %lld val) of %s; vocabulary of %lld; %lld parameters (%.2fM without "
              "positions), %.2f MFLOP/token; AdamW lr %g -> %g, beta2 %g, wd %g, %s; %lld iterations of %lld x %lld "
              "tokens; %d threads\n",
              P::traits::name, cfg.str().c_str(), static_cast<long long>(data.size()),
              static_cast<long long>(data.train_size()), static_cast<long long>(data.val_size()), s.data.c_str(),
              static_cast<long long>(data.vocab_size()), static_cast<long long>(model.parameter_count(false)),
              static_cast<double>(model.parameter_count()) * 1e-6, flop_per_token * 1e-6, s.lr, s.min_lr, s.beta2,
              s.weight_decay, control.describe().c_str(), static_cast<long long>(s.iters), static_cast<long long>(s.batch),
              static_cast<long long>(s.block), omp_get_max_threads());

  // The estimates' batches: fixed, from their own seeds, so every estimate is comparable.
  const fixed_batches train_eval(data, text::split::train, s.eval_batches, s.batch, s.block, s.seed + 1);
  const fixed_batches val_eval(data, text::split::val, s.eval_batches, s.batch, s.block, s.seed + 2);

  std::vector<std::int32_t> x(static_cast<std::size_t>(tokens_per_iter)), y(x.size());
  io::batch_rng rng(s.seed);
  if (s.checkpoint) {
    io::batch_rng probe(s.seed + 3);
    data.batch(text::split::train, s.batch, s.block, probe, x.data(), y.data());
    measure_checkpointing(model, store, x, y, s.batch, s.seed);
  }
  model.set_checkpointing(s.checkpoint);

  std::unique_ptr<train::csv_log> log;
  if (!s.csv.empty()) {
    log = std::make_unique<train::csv_log>(s.csv, std::vector<std::string>{"iter", "lr", "train_loss", "grad_norm",
                                                                           "eval_train_loss", "val_loss", "tokens_per_s"});
  }
  nn::arena<cpu> mem, eval_mem;
  generator drop(s.seed + 4);
  train::progress_bar bar(s.iters, "tokens", stderr);
  double train_seconds = 0, last_val = NAN, last_train = NAN, loss = NAN;
  const auto nan = std::numeric_limits<double>::quiet_NaN();
  auto evaluate = [&](index_t it) {
    last_train = estimate(model, eval_mem, train_eval, s.batch);
    last_val = estimate(model, eval_mem, val_eval, s.batch);
    if (!s.progress) {
      std::printf("iter %lld: train loss %.4f, val loss %.4f\n", static_cast<long long>(it), last_train, last_val);
      std::fflush(stdout);
    }
    if (log) log->row({static_cast<double>(it), opt.lr(), nan, nan, last_train, last_val, nan});
  };
  evaluate(0);
  for (index_t it = 1; it <= s.iters; ++it) {
    const auto t0 = std::chrono::steady_clock::now();
    data.batch(text::split::train, s.batch, s.block, rng, x.data(), y.data());
    mem.reset();
    nn::context<P> ctx{mem, true, &drop};
    loss = model.forward(ctx, x, s.batch, y);
    model.backward(ctx, control.loss_scale());
    const double lr = opt.lr();  // this step's (the log's lr column; the schedule moves it below)
    const auto r = control.step(store, opt);
    if (r.applied) schedule.step(opt);
    store.zero_grad();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    train_seconds += dt;
    if (log) log->row({static_cast<double>(it), lr, loss, r.grad_norm, nan, nan, static_cast<double>(tokens_per_iter) / dt});
    if (s.progress) {
      char m[96];
      std::snprintf(m, sizeof m, "loss %.4f val %.4f", loss, last_val);
      bar.update(it, static_cast<double>(it * tokens_per_iter), m);
    }
    if (it % s.eval_interval == 0 || it == s.iters) evaluate(it);
  }
  if (s.progress) {
    char m[96];
    std::snprintf(m, sizeof m, "loss %.4f val %.4f", loss, last_val);
    bar.finish(s.iters, static_cast<double>(s.iters * tokens_per_iter), m);
  }
  const double tokens_per_s = train_seconds > 0 ? static_cast<double>(s.iters * tokens_per_iter) / train_seconds : 0.0;
  const double val_full = full_validation(model, eval_mem, data, s.block);
  std::printf("validation loss over the whole validation split (%lld windows of %lld): %.4f\n",
              static_cast<long long>((data.val_size() - 1) / s.block), static_cast<long long>(s.block), val_full);

  if (s.sample > 0) {
    generator sample_gen(s.seed + 5);
    const auto out = model.generate(eval_mem, data.encode(s.prompt), s.sample, s.temperature, s.top_k, sample_gen);
    std::printf("---- sample (temperature %g, top-k %lld) ----\n%s\n----\n", s.temperature, static_cast<long long>(s.top_k),
                data.decode(out).c_str());
  }
  if (!s.save.empty()) {
    nn::save_weights(store, s.save);
    std::printf("weights: %s\n", s.save.c_str());
  }
  if (!s.csv.empty()) std::printf("log: %s (scripts/plot-log.py %s -o curves.png)\n", s.csv.c_str(), s.csv.c_str());
  std::printf("RESULT example=char_gpt precision=%s val_loss=%.4f val_loss_full=%.4f train_loss=%.4f iters=%lld seconds=%.1f "
              "tokens_per_s=%.0f gflops=%.1f checkpointing=%d\n",
              P::traits::name, last_val, val_full, last_train, static_cast<long long>(s.iters), train_seconds, tokens_per_s,
              tokens_per_s * flop_per_token * 1e-9, s.checkpoint ? 1 : 0);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "char_gpt: %s\n", e.what());
    return 1;
  }
}
