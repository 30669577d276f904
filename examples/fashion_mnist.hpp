#pragma once
// What fashion_mnist_mlp and fashion_mnist_cnn share: command-line options, the data, the
// optimizer and schedule, the trainer, and the closing RESULT line that
// scripts/compare-precisions.sh reads. Each example defines its model and calls run().
//
// The precision comes from the build: TRIDENT_EXAMPLE_PRECISION is fp32, bf16_mixed or
// fp16_mixed, one binary each (build/examples/fashion_mnist_mlp_{fp32,bf16,fp16}).

#include <omp.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <string_view>

#include <trident/io.hpp>
#include <trident/trident.hpp>

#include "cli.hpp"

#ifndef TRIDENT_EXAMPLE_PRECISION
#define TRIDENT_EXAMPLE_PRECISION fp32
#endif

namespace example {

using P = trident::policy<trident::TRIDENT_EXAMPLE_PRECISION, trident::cpu>;
using S = P::storage_type;

/// The example's defaults, overridable on the command line.
struct settings {
  int epochs = 10;
  trident::index_t batch = 128;
  double lr = 1e-3;
  double weight_decay = 0.05;
  double warmup_fraction = 0.02;  ///< of all steps, linear warm-up before the cosine decay
  double clip = 0.0;
  int accumulation = 1;
  std::uint64_t seed = 42;
  int threads = 0;  ///< 0: OpenMP's default
  trident::index_t train_limit = 0;  ///< 0: all 60000 training images (smaller for smoke tests)
  std::string data_dir{};
  std::string csv{};
  bool progress = true;
};

inline void usage(const char* prog, const settings& d, std::FILE* to) {
  std::fprintf(to,
               "usage: %s [options]\n"
               "  --epochs N       epochs (default %d)\n"
               "  --batch N        batch size (default %lld)\n"
               "  --lr X           peak learning rate of AdamW (default %g)\n"
               "  --wd X           AdamW weight decay, not on biases and norms (default %g)\n"
               "  --clip X         clip gradients at global L2 norm X (default off)\n"
               "  --accum N        gradient accumulation micro-batches per step (default 1)\n"
               "  --seed N         initialisation, shuffling and dropout seed (default %llu)\n"
               "  --threads N      OpenMP threads (default: OMP_NUM_THREADS or all cores)\n"
               "  --data DIR       Fashion-MNIST directory (default $TRIDENT_FASHION_MNIST_DIR or\n"
               "                   /usr/share/datasets/fashion-mnist)\n"
               "  --train-limit N  train on the first N images only (smoke tests)\n"
               "  --csv FILE       CSV log of the run (render it with scripts/plot-log.py)\n"
               "  --no-progress    no progress bar\n",
               prog, d.epochs, static_cast<long long>(d.batch), d.lr, d.weight_decay,
               static_cast<unsigned long long>(d.seed));
}

/// Parses argv over `s`; exits with a message on anything it does not understand.
inline settings parse(int argc, char** argv, settings s) {
  const settings defaults = s;
  const cli args(argc, argv, [&](std::FILE* to) { usage(argv[0], defaults, to); });
  auto value = [&](int& i) { return args.value(i); };
  auto integer = [&](int& i, long long lo) { return args.integer(i, lo); };
  auto real = [&](int& i, double lo) { return args.real(i, lo); };
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--epochs") s.epochs = static_cast<int>(integer(i, 1));
    else if (a == "--batch") s.batch = integer(i, 1);
    else if (a == "--lr") s.lr = real(i, 0.0);
    else if (a == "--wd") s.weight_decay = real(i, 0.0);
    else if (a == "--clip") s.clip = real(i, 0.0);
    else if (a == "--accum") s.accumulation = static_cast<int>(integer(i, 1));
    else if (a == "--seed") s.seed = static_cast<std::uint64_t>(integer(i, 0));
    else if (a == "--threads") s.threads = static_cast<int>(integer(i, 1));
    else if (a == "--data") s.data_dir = value(i);
    else if (a == "--train-limit") s.train_limit = integer(i, 1);
    else if (a == "--csv") s.csv = value(i);
    else if (a == "--no-progress") s.progress = false;
    else args.help_or_unknown(a);
  }
  return s;
}

/// Builds the model (Model<P>(store) declares its layers; the store is then allocated and the
/// weights initialised), trains it with AdamW and warm-up + cosine decay, evaluates on the test
/// set after every epoch, and prints the RESULT line.
template <template <class> class Model>
int run(const char* name, int argc, char** argv, settings defaults) {
  using namespace trident;
  try {
    const settings s = parse(argc, argv, defaults);
    if (s.threads > 0) omp_set_num_threads(s.threads);
    const std::size_t rss_start = train::resident_bytes();

    auto data = io::load_fashion_mnist(true, s.data_dir);
    tensor_view<const float> train_images = data.train.images().view();
    std::span<const std::int32_t> train_labels = data.train.labels();
    if (s.train_limit > 0 && s.train_limit < data.train.size()) {
      train_images = train_images.slice(0, 0, s.train_limit);
      train_labels = train_labels.first(static_cast<std::size_t>(s.train_limit));
    }
    io::batch_loader<S> train_loader(train_images, train_labels, {.batch_size = s.batch, .shuffle = true, .seed = s.seed});
    io::batch_loader<S> test_loader(data.test.images().view(), data.test.labels(), {.batch_size = 500, .shuffle = false});
    const std::size_t data_bytes = static_cast<std::size_t>(data.train.images().numel() + data.test.images().numel()) * sizeof(float) +
                                   static_cast<std::size_t>(data.train.size() + data.test.size()) * sizeof(std::int32_t);

    Model<P> model;
    model.store.allocate();
    generator init_gen(s.seed);
    model.net.init(init_gen);
    model.store.master_from_params();

    const std::int64_t total_steps = static_cast<std::int64_t>(s.epochs) * train_loader.batches_per_epoch();
    optim::adamw opt({.lr = s.lr, .weight_decay = s.weight_decay});
    sched::warmup_cosine_lr schedule(opt, {.total_num_steps = total_steps,
                                           .warmup_num_steps = std::max<std::int64_t>(2, static_cast<std::int64_t>(s.warmup_fraction * total_steps)),
                                           .cos_min_ratio = 0.0,
                                           .warmup_type = sched::warmup_kind::linear});
    std::printf("%s (%s): %lld parameters, %d epochs of %lld batches of %lld, AdamW lr %g wd %g, warm-up + cosine, %d threads\n",
                name, P::traits::name, static_cast<long long>(model.store.count()), s.epochs,
                static_cast<long long>(train_loader.batches_per_epoch()), static_cast<long long>(s.batch), s.lr,
                s.weight_decay, omp_get_max_threads());
    train::trainer<P, decltype(model.net), optim::adamw, sched::warmup_cosine_lr> trainer(
        model.net, model.store, opt,
        {.epochs = s.epochs,
         .gradient_accumulation_steps = s.accumulation,
         .step = {.gradient_clipping = s.clip},
         .seed = s.seed,
         .csv_path = s.csv,
         .progress = s.progress},
        schedule);
    const auto r = trainer.fit(train_loader, &test_loader);

    const auto mib = [](std::size_t b) { return static_cast<double>(b) / (1024.0 * 1024.0); };
    std::printf("memory: dataset %.1f MiB, process before loading %.1f MiB; accounted in all %.1f MiB against peak resident %.1f MiB\n",
                mib(data_bytes), mib(rss_start), mib(r.memory.accounted() + data_bytes + rss_start),
                mib(r.memory.peak_resident));
    if (!s.csv.empty()) std::printf("log: %s (scripts/plot-log.py %s -o curves.png)\n", s.csv.c_str(), s.csv.c_str());
    std::printf("RESULT example=%s precision=%s test_accuracy=%.4f test_loss=%.4f epochs=%d seconds_per_epoch=%.2f "
                "samples_per_s=%.0f gflops=%.1f peak_rss_mib=%.1f skipped_steps=%lld\n",
                name, P::traits::name, r.last_eval.accuracy, r.last_eval.loss, s.epochs, r.train_seconds / s.epochs,
                r.samples_per_second(), r.gflops_per_second(), mib(r.memory.peak_resident),
                static_cast<long long>(r.skipped_steps));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", name, e.what());
    return 1;
  }
}

}  // namespace example
