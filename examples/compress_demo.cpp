// compress_demo: trident's compression methods side by side on one model, in one table.
//
// The model is fashion_mnist_mlp's 784-512-256-10 trained by its recipe (fp32, 20 epochs,
// AdamW 1e-3, weight decay 0.05, dropout 0.2, warm-up + cosine; about 0.90). It is trained (or, with --load FILE and FILE present, loaded; a trained model is saved there),
// then compressed each way, and every variant is measured the same way: accuracy on the 10000
// test images, model bytes (as the format stores the weights and biases), and inference
// latency (the median of timed forward passes over one batch of 256 test images, 2 threads).
//
//   rows                      how
//   fp32 baseline             the trained model
//   PTQ int8                  post-training static quantization, min-max calibrated on training batches
//   QAT int8                  quantization-aware fine-tuning from the baseline (3 epochs), then static int8
//   weight-only int4          int4 weights in groups of 16 inputs, fp32 activations
//   50% unstructured          one-shot global magnitude pruning, 3 epochs fine-tuned with the mask held
//   90% unstructured          gradual (Zhu and Gupta): from the dense baseline, global magnitude masks
//                             recomputed every ~50 steps on the cubic schedule over the first 3 of 6
//                             epochs, then 3 epochs at 90%, under prune::masked<optim::adamw>
//   structured (shrunk)       hidden units ranked by L2 norm, half kept, a smaller dense model, fine-tuned
//   2:4                       N:M semi-structured sparsity, 3 epochs fine-tuned with the mask held
//   teacher (CNN)             fashion_mnist_cnn's network trained by its recipe (15 epochs; --teacher mlp: the baseline)
//   student (distilled)       784-256-10 trained on Hinton's loss against the teacher, on 5000 labelled images
//   student (alone)           the same student, same images, initialisation, batches, steps and schedule, labels only
//
// Pruned models are stored and run dense (trident keeps pruned weights as zeros in dense storage).
// The students learn from the first 5000 training images only (100 epochs), the teacher from all
// 60000: the regime of Hinton et al.'s section 5 ("soft targets as regularizers"), where a
// student with few labels overfits them and the teacher's soft targets carry what the missing
// labels would have. With all 60000 labels (--student 64 --student-labels 0 --student-epochs 20)
// a 784-64-10 student gained nothing from this teacher (benchmarks/RESULTS.md has both).
// The distillation settings are T = 4, alpha = 0.9 (Hinton et al.'s regime: most weight on the
// soft targets) unless given; --select-distill picks T and alpha on 5000 training images held
// out as a validation split (never on the test set) and says in the notes what it saw.
//
// The notes say what a row's number rests on: accuracy before fine-tuning, the sparsity and
// what a sparse format would store (trident keeps pruned weights in dense storage and runs the
// dense kernels), and for the students how often they agree with the teacher's predictions.
// Latencies are indicative: one process, one batch, a median over --passes runs.
//
//   build/examples/compress_demo                 # full run on all 60000 images (times in benchmarks/RESULTS.md)
//   build/examples/compress_demo --quick         # 4000 images, one epoch each (CTest)
//   build/examples/compress_demo --load mlp.bin  # train once, reuse the baseline after
//   build/examples/compress_demo --load mlp.bin --only distill --student-seeds 5  # the students from 5 seeds
//   build/examples/compress_demo --load mlp.bin --only distill --select-distill   # the grid: ~12 min more
//
// Ends with `RESULT example=compress_demo` and the test accuracy of each row
// (fp32, ptq_int8, qat_int8, int4, prune50, prune90, shrunk, sparse24, teacher,
// student_distilled, student_alone).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <trident/io.hpp>
#include <trident/prune.hpp>
#include <trident/quant.hpp>
#include <trident/trident.hpp>

#include "cli.hpp"

namespace {

using namespace trident;
using P = policy<fp32, cpu>;

/// The demo's defaults, overridable on the command line.
struct settings {
  int epochs = 20;           ///< the baseline (fashion_mnist_mlp's recipe)
  int student_epochs = 100;  ///< each student, distilled and alone alike, over its labelled images
  index_t student_labels = 5000;  ///< the students' training images: the first N (0: all of them)
  int student_seeds = 1;      ///< pairs of students (distilled, alone) from seeds seed, seed+1, ...
  int finetune_epochs = 3;   ///< QAT, the shrunk model, 50% and 2:4
  int gradual_epochs = 6;    ///< 90%: the first half ramps the sparsity up, the second holds it
  index_t batch = 128;
  double lr = 1e-3;
  double finetune_lr = 2e-4;
  double gradual_lr = 5e-4;  ///< peak lr of the gradual 90% run (the masks move while it is high)
  double weight_decay = 0.05;
  double temperature = 4.0;  ///< Hinton et al.'s range; not tuned on the test set
  double alpha = 0.9;        ///< most of the weight on the teacher's soft targets, as Hinton et al.
  index_t student_hidden = 256;
  std::string teacher = "cnn";  ///< cnn: fashion_mnist_cnn's network; mlp: the baseline itself
  int teacher_epochs = 15;      ///< the CNN teacher, by fashion_mnist_cnn's recipe
  double teacher_lr = 2e-3;
  std::uint64_t seed = 42;
  int threads = 0;            ///< training threads; 0: OpenMP's default (latency always uses 2)
  index_t train_limit = 0;    ///< 0: all 60000
  int latency_passes = 30;
  bool quick = false;
  bool select_distill = false;  ///< choose T and alpha on a validation split of the training set
  bool progress = true;
  std::string data_dir{};
  std::string load{};
  std::string only{};         ///< "": every row; else a comma-separated subset of quant, prune, distill
  bool wants(std::string_view group) const {
    if (only.empty()) return true;
    std::string_view rest = only;
    while (!rest.empty()) {
      const auto comma = rest.find(',');
      if (rest.substr(0, comma) == group) return true;
      rest = comma == std::string_view::npos ? std::string_view{} : rest.substr(comma + 1);
    }
    return false;
  }
};

void usage(const char* prog, const settings& d, std::FILE* to) {
  std::fprintf(to,
               "usage: %s [options]\n"
               "  --quick            train on 4000 images for one epoch (smoke test)\n"
               "  --epochs N         epochs of the baseline (default %d)\n"
               "  --student-epochs N epochs of each student, distilled and alone (default %d)\n"
               "  --student-labels N the students train on the first N training images; 0: all (default %lld)\n"
               "  --student-seeds N  train the pair of students from N seeds (the table shows the first; default %d)\n"
               "  --finetune N       epochs of QAT, of the shrunk model and of the 50%% and 2:4 fine-tuning (default %d)\n"
               "  --gradual N        epochs of the gradual 90%% run: ramp over the first half, hold after (default %d)\n"
               "  --batch N          batch size (default %lld)\n"
               "  --lr X             peak AdamW learning rate of training (default %g)\n"
               "  --finetune-lr X    peak AdamW learning rate of fine-tuning (default %g)\n"
               "  --gradual-lr X     peak AdamW learning rate of the gradual 90%% run (default %g)\n"
               "  --temperature X    distillation temperature (default %g)\n"
               "  --alpha X          weight of the distillation term (default %g)\n"
               "  --select-distill   choose T in {2, 4, 8} and alpha in {0.5, 0.9} on 5000 training images held out\n"
               "  --student N        the student's hidden width (default %lld)\n"
               "  --teacher cnn|mlp  the students' teacher: fashion_mnist_cnn's network trained by its recipe, or the\n"
               "                     baseline MLP (default %s)\n"
               "  --teacher-epochs N epochs of the CNN teacher (default %d)\n"
               "  --seed N           initialisation and shuffling seed (default %llu)\n"
               "  --threads N        OpenMP threads for training (default: OMP_NUM_THREADS or all cores)\n"
               "  --passes N         timed passes per latency (default %d)\n"
               "  --data DIR         Fashion-MNIST directory (default $TRIDENT_FASHION_MNIST_DIR or\n"
               "                     /usr/share/datasets/fashion-mnist)\n"
               "  --train-limit N    train on the first N images only\n"
               "  --load FILE        load the baseline from FILE if it exists, else train it and save it there\n"
               "  --only LIST        only these rows besides the baseline: quant, prune, distill, comma-separated\n"
               "  --no-progress      no progress bars\n",
               prog, d.epochs, d.student_epochs, static_cast<long long>(d.student_labels), d.student_seeds, d.finetune_epochs, d.gradual_epochs, static_cast<long long>(d.batch), d.lr,
               d.finetune_lr, d.gradual_lr, d.temperature,
               d.alpha, static_cast<long long>(d.student_hidden), d.teacher.c_str(), d.teacher_epochs,
               static_cast<unsigned long long>(d.seed), d.latency_passes);
}

settings parse(int argc, char** argv) {
  settings s;
  const settings defaults = s;
  const example::cli args(argc, argv, [&](std::FILE* to) { usage(argv[0], defaults, to); });
  bool epochs_set = false, student_set = false, teacher_set = false, finetune_set = false, gradual_set = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--quick") s.quick = true;
    else if (a == "--epochs") s.epochs = static_cast<int>(args.integer(i, 1)), epochs_set = true;
    else if (a == "--student-epochs") s.student_epochs = static_cast<int>(args.integer(i, 1)), student_set = true;
    else if (a == "--finetune") s.finetune_epochs = static_cast<int>(args.integer(i, 1)), finetune_set = true;
    else if (a == "--gradual") s.gradual_epochs = static_cast<int>(args.integer(i, 1)), gradual_set = true;
    else if (a == "--batch") s.batch = args.integer(i, 1);
    else if (a == "--lr") s.lr = args.real(i, 0.0);
    else if (a == "--finetune-lr") s.finetune_lr = args.real(i, 0.0);
    else if (a == "--gradual-lr") s.gradual_lr = args.real(i, 0.0);
    else if (a == "--temperature") s.temperature = args.real(i, 1e-6);
    else if (a == "--alpha") s.alpha = args.real(i, 0.0);
    else if (a == "--student") s.student_hidden = args.integer(i, 1);
    else if (a == "--student-labels") s.student_labels = args.integer(i, 0);
    else if (a == "--student-seeds") s.student_seeds = static_cast<int>(args.integer(i, 1));
    else if (a == "--teacher") s.teacher = args.value(i);
    else if (a == "--teacher-epochs") s.teacher_epochs = static_cast<int>(args.integer(i, 1)), teacher_set = true;
    else if (a == "--seed") s.seed = static_cast<std::uint64_t>(args.integer(i, 0));
    else if (a == "--threads") s.threads = static_cast<int>(args.integer(i, 1));
    else if (a == "--passes") s.latency_passes = static_cast<int>(args.integer(i, 1));
    else if (a == "--data") s.data_dir = args.value(i);
    else if (a == "--train-limit") s.train_limit = args.integer(i, 1);
    else if (a == "--load") s.load = args.value(i);
    else if (a == "--only") s.only = args.value(i);
    else if (a == "--no-progress") s.progress = false;
    else if (a == "--select-distill") s.select_distill = true;
    else if (a == "--help" || a == "-h") {
      usage(argv[0], defaults, stdout);
      std::exit(0);
    } else {
      args.fail("unknown option '" + std::string(a) + "'");
    }
  }
  for (std::string_view rest = s.only; !rest.empty();) {
    const auto comma = rest.find(',');
    const auto g = rest.substr(0, comma);
    if (g != "quant" && g != "prune" && g != "distill") {
      args.fail("option --only takes quant, prune and distill, comma-separated; got '" + std::string(g) + "'");
    }
    rest = comma == std::string_view::npos ? std::string_view{} : rest.substr(comma + 1);
  }
  if (s.teacher != "cnn" && s.teacher != "mlp") args.fail("option --teacher takes cnn or mlp, got '" + s.teacher + "'");
  if (s.alpha > 1.0) args.fail("option --alpha takes a number in [0, 1], got " + std::to_string(s.alpha));
  if (s.quick) {
    if (s.train_limit == 0) s.train_limit = 4000;
    if (!epochs_set) s.epochs = 1;
    if (!student_set) s.student_epochs = 1;
    if (!teacher_set) s.teacher_epochs = 1;
    if (!finetune_set) s.finetune_epochs = 1;
    if (!gradual_set) s.gradual_epochs = 1;
    s.latency_passes = std::min(s.latency_passes, 10);
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// Models

/// Initialises a model's weights from `seed` (each layer's own scheme) and its fp32 master copy.
template <class Model>
void init_model(Model& m, std::uint64_t seed) {
  generator g(seed);
  m.net.init(g);
  m.store.master_from_params();
}

/// fashion_mnist_mlp's model with hidden widths h1, h2 (512, 256; smaller when shrunk).
struct mlp {
  using net_type = nn::sequential<P, nn::flatten<P>, nn::linear<P>, nn::dropout<P>, nn::linear<P>, nn::dropout<P>, nn::linear<P>>;
  nn::parameter_store<P> store;
  net_type net;
  index_t h1, h2;
  mlp(index_t hidden1 = 512, index_t hidden2 = 256)
      : net{nn::flatten<P>{},
            nn::linear<P>(store, "fc1", 784, hidden1, true, activation::relu),
            nn::dropout<P>(0.2),
            nn::linear<P>(store, "fc2", hidden1, hidden2, true, activation::relu),
            nn::dropout<P>(0.2),
            nn::linear<P>(store, "fc3", hidden2, 10)},
        h1(hidden1), h2(hidden2) {
    net.get<1>().set_input_grad(false);  // the input is data
    store.allocate();
  }
};

/// The students' teacher: fashion_mnist_cnn's network (two 3x3 convolutions with batch norm,
/// ReLU and pooling, then 256 hidden units; about 0.93 by that example's recipe). A teacher
/// clearly better than the student is what distillation needs: the baseline MLP (--teacher mlp)
/// is only about 1.5 points above a 784-64-10 student trained on all the labels.
struct cnn_teacher {
  nn::parameter_store<P> store;
  nn::sequential<P, nn::conv2d<P>, nn::batch_norm<P>, nn::relu<P>, nn::max_pool2d<P>, nn::conv2d<P>, nn::batch_norm<P>,
                 nn::relu<P>, nn::max_pool2d<P>, nn::flatten<P>, nn::linear<P>, nn::dropout<P>, nn::linear<P>>
      net{nn::conv2d<P>(store, "conv1", 1, 32, 3, 1, 1, false),
          nn::batch_norm<P>(store, "bn1", 32),
          nn::relu<P>{},
          nn::max_pool2d<P>(2),
          nn::conv2d<P>(store, "conv2", 32, 64, 3, 1, 1, false),
          nn::batch_norm<P>(store, "bn2", 64),
          nn::relu<P>{},
          nn::max_pool2d<P>(2),
          nn::flatten<P>{},
          nn::linear<P>(store, "fc1", 64 * 7 * 7, 256, true, activation::relu),
          nn::dropout<P>(0.3),
          nn::linear<P>(store, "fc2", 256, 10)};
  cnn_teacher() {
    net.get<0>().set_input_gradient(false);  // the input is data
    store.allocate();
  }
};

/// The student: 784-h-10.
struct student_mlp {
  nn::parameter_store<P> store;
  nn::sequential<P, nn::flatten<P>, nn::linear<P>, nn::linear<P>> net;
  explicit student_mlp(index_t hidden)
      : net{nn::flatten<P>{}, nn::linear<P>(store, "fc1", 784, hidden, true, activation::relu),
            nn::linear<P>(store, "fc2", hidden, 10)} {
    net.get<1>().set_input_grad(false);
    store.allocate();
  }
};

// ---------------------------------------------------------------------------------------------
// Data, training, measurement

struct data_set {
  io::fashion_mnist_splits splits;
  tensor_view<const float> train_images, test_images;
  std::span<const std::int32_t> train_labels, test_labels;
};

data_set load_data(const settings& s) {
  data_set d{io::load_fashion_mnist(true, s.data_dir), {}, {}, {}, {}};
  d.train_images = d.splits.train.images().view();
  d.train_labels = d.splits.train.labels();
  d.test_images = d.splits.test.images().view();
  d.test_labels = d.splits.test.labels();
  if (s.train_limit > 0 && s.train_limit < d.splits.train.size()) {
    d.train_images = d.train_images.slice(0, 0, s.train_limit);
    d.train_labels = d.train_labels.first(static_cast<std::size_t>(s.train_limit));
  }
  return d;
}

/// AdamW's warm-up + cosine schedule over `epochs` epochs of `loader`.
template <class Optimizer, class Loader>
sched::warmup_cosine_lr schedule_for(Optimizer& opt, const Loader& loader, int epochs) {
  const std::int64_t total = std::max<std::int64_t>(2, static_cast<std::int64_t>(epochs) * loader.batches_per_epoch());
  return sched::warmup_cosine_lr(opt, {.total_num_steps = total,
                                       .warmup_num_steps = std::max<std::int64_t>(2, total / 50),
                                       .cos_min_ratio = 0.0,
                                       .warmup_type = sched::warmup_kind::linear});
}

/// Trains `net` (its store `store`) with `opt` for `epochs` epochs under warm-up + cosine.
template <class Net, class Optimizer>
train::run_summary fit(Net& net, nn::parameter_store<P>& store, Optimizer& opt, int epochs, io::batch_loader<float>& loader,
                       const settings& s) {
  auto schedule = schedule_for(opt, loader, epochs);
  train::trainer<P, Net, Optimizer, sched::warmup_cosine_lr> t(
      net, store, opt, {.epochs = epochs, .seed = s.seed, .progress = s.progress, .out = nullptr}, schedule);
  return t.fit(loader);
}

/// The arg-max class of every image of `images`, the model in eval mode.
template <class Model>
std::vector<std::int32_t> predictions(Model& model, tensor_view<const float> images) {
  nn::arena<cpu> mem;
  const index_t n = images.size(0);
  std::vector<std::int32_t> out(static_cast<std::size_t>(n));
  for (index_t b = 0; b < n; b += 500) {
    const index_t e = std::min(n, b + 500);
    mem.reset();
    nn::context<P> ctx{mem, false, nullptr};
    const tensor_view<const float> logits = model.forward(ctx, images.slice(0, b, e));
    const auto z = contiguous(logits);
    for (index_t i = 0; i < e - b; ++i) {
      const float* row = z.data() + i * z.size(1);
      out[static_cast<std::size_t>(b + i)] = static_cast<std::int32_t>(std::max_element(row, row + z.size(1)) - row);
    }
  }
  return out;
}
template <class Model>
std::vector<std::int32_t> predictions(Model& model, const data_set& d) {
  return predictions(model, d.test_images);
}

/// Fraction of `images` whose arg-max logit is the label, the model in eval mode.
template <class Model>
double accuracy(Model& model, tensor_view<const float> images, std::span<const std::int32_t> labels) {
  const auto p = predictions(model, images);
  index_t correct = 0;
  for (std::size_t i = 0; i < p.size(); ++i) correct += p[i] == labels[i];
  return static_cast<double>(correct) / static_cast<double>(p.size());
}
/// The same on the test images.
template <class Model>
double accuracy(Model& model, const data_set& d) {
  return accuracy(model, d.test_images, d.test_labels);
}

/// Fraction of the test images on which two prediction lists agree.
double agreement(const std::vector<std::int32_t>& a, const std::vector<std::int32_t>& b) {
  index_t same = 0;
  for (std::size_t i = 0; i < a.size(); ++i) same += a[i] == b[i];
  return static_cast<double>(same) / static_cast<double>(a.size());
}

/// Median milliseconds of one eval forward over the first 256 test images, on 2 threads.
template <class Model>
double latency_ms(Model& model, const data_set& d, int passes) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(2);
  nn::arena<cpu> mem;
  const auto x = d.test_images.slice(0, 0, 256);
  std::vector<double> ms;
  for (int p = -3; p < passes; ++p) {  // three warm-up passes: packing, arena growth, caches
    mem.reset();
    nn::context<P> ctx{mem, false, nullptr};
    const auto t0 = std::chrono::steady_clock::now();
    const auto y = model.forward(ctx, x);
    const double t = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (y.numel() != 2560) throw error("compress_demo: a model gave " + y.shape().str() + " for 256 images");
    if (p >= 0) ms.push_back(t);
  }
  omp_set_num_threads(saved);
  std::nth_element(ms.begin(), ms.begin() + static_cast<std::ptrdiff_t>(ms.size() / 2), ms.end());
  return ms[ms.size() / 2];
}

/// One line of the table.
struct row {
  std::string name;
  std::string key;        ///< its name in the RESULT line
  double accuracy = 0;
  double bytes = 0;       ///< as stored: weights and biases at their bit widths, plus scales
  double latency = 0;     ///< ms per batch of 256
  std::string note;
};

template <class Model>
row measure(std::string name, std::string key, Model& model, double bytes, const data_set& d, const settings& s,
            std::string note = {}) {
  row r{std::move(name), std::move(key), accuracy(model, d), bytes, latency_ms(model, d, s.latency_passes), std::move(note)};
  std::printf("  %-30s accuracy %.4f, %.1f KiB, %.3f ms / 256 images\n", r.name.c_str(), r.accuracy, r.bytes / 1024.0,
              r.latency);
  std::fflush(stdout);
  return r;
}

/// Bytes of an fp32 store's weights and biases.
double fp32_bytes(const nn::parameter_store<P>& store) { return static_cast<double>(store.count()) * sizeof(float); }

// ---------------------------------------------------------------------------------------------
// The rows

/// A student trained for `epochs` on `images`: on the labels alone (alpha < 0), or on Hinton's
/// loss at (temperature, alpha) against `teacher`. Every student starts from the same
/// initialisation and sees the same batches under the same optimizer and schedule.
template <class Teacher>
std::unique_ptr<student_mlp> train_student(Teacher& teacher, tensor_view<const float> images, std::span<const std::int32_t> labels,
                                           int epochs, double temperature, double alpha, const settings& s) {
  auto student = std::make_unique<student_mlp>(s.student_hidden);
  init_model(*student, s.seed + 1);
  io::batch_loader<float> loader(images, labels, {.batch_size = s.batch, .shuffle = true, .seed = s.seed});
  optim::adamw opt({.lr = s.lr, .weight_decay = s.weight_decay});
  if (alpha < 0) {
    fit(student->net, student->store, opt, epochs, loader, s);
  } else {
    auto schedule = schedule_for(opt, loader, epochs);
    distill::trainer<P, decltype(student->net), Teacher, optim::adamw, sched::warmup_cosine_lr> t(
        student->net, student->store, teacher, opt,
        {.epochs = epochs, .loss = {.temperature = temperature, .alpha = alpha}, .seed = s.seed, .progress = s.progress,
         .out = nullptr},
        schedule);
    t.fit(loader);
  }
  return student;
}

/// The students' labelled images: the first --student-labels training images (all when 0 or
/// more than there are).
struct labelled {
  tensor_view<const float> images;
  std::span<const std::int32_t> labels;
};
labelled student_images(const data_set& d, const settings& s) {
  const index_t n = d.train_images.size(0);
  const index_t m = s.student_labels > 0 ? std::min(s.student_labels, n) : n;
  return {d.train_images.slice(0, 0, m), d.train_labels.first(static_cast<std::size_t>(m))};
}

/// The distillation settings to use: --temperature and --alpha as given, or with
/// --select-distill the best of a small grid on a validation split carved from the training
/// set (its last 5000 images; the students train on their labelled images outside it, for a
/// quarter of the budget). The test set plays no part in the choice. The teacher has seen the
/// validation images' labels, which flatters every distilled student against the one alone on
/// this split (not on the test set): the split ranks settings, it does not judge distillation.
template <class Teacher>
std::pair<std::pair<double, double>, std::string> distill_settings(Teacher& teacher, const data_set& d, const settings& s) {
  if (!s.select_distill) return {{s.temperature, s.alpha}, {}};
  const index_t n = d.train_images.size(0);
  const index_t held = std::min<index_t>(5000, n / 5);
  const index_t fit_n = std::min(n - held, student_images(d, s).images.size(0));
  const auto fit_x = d.train_images.slice(0, 0, fit_n);
  const auto fit_y = d.train_labels.first(static_cast<std::size_t>(fit_n));
  const auto val_x = d.train_images.slice(0, n - held, n);
  const auto val_y = d.train_labels.subspan(static_cast<std::size_t>(n - held));
  const int epochs = std::max(1, s.student_epochs / 4);
  auto alone = train_student(teacher, fit_x, fit_y, epochs, 0, -1, s);
  const double alone_val = accuracy(alone->net, val_x, val_y);
  std::printf("distillation settings on a validation split (%lld held-out training images, %d epochs on %lld others): "
              "alone %.4f",
              static_cast<long long>(held), epochs, static_cast<long long>(fit_n), alone_val);
  std::pair<double, double> best{s.temperature, s.alpha};
  double best_val = -1;
  for (const double t : {2.0, 4.0, 8.0}) {
    for (const double a : {0.5, 0.9}) {
      auto st = train_student(teacher, fit_x, fit_y, epochs, t, a, s);
      const double v = accuracy(st->net, val_x, val_y);
      std::printf(", T=%g alpha=%g %.4f", t, a, v);
      std::fflush(stdout);
      if (v > best_val) best_val = v, best = {t, a};
    }
  }
  std::printf("\n");
  char note[120];
  std::snprintf(note, sizeof note, "; chosen on validation (%.4f vs alone %.4f)", best_val, alone_val);
  return {best, note};
}

/// Distillation: the same student, from the same initialisation, over the same batches of the
/// same labelled images with the same optimizer and schedule, trained on the labels alone and
/// on Hinton's loss against `teacher`.
template <class Teacher>
std::vector<row> distillation_rows(Teacher& teacher, const data_set& d, const settings& s) {
  const auto [chosen, how] = distill_settings(teacher, d, s);
  const auto teacher_says = predictions(teacher, d);
  const auto [x, y] = student_images(d, s);
  const std::string shape = "784-" + std::to_string(s.student_hidden) + "-10";
  const std::string on = std::to_string(x.size(0)) + " labelled images, " + std::to_string(s.student_epochs) + " epochs";
  std::vector<row> rows;
  auto distilled = train_student(teacher, x, y, s.student_epochs, chosen.first, chosen.second, s);
  char note[240];
  std::snprintf(note, sizeof note, "%s; Hinton's loss, T=%g alpha=%g%s; agrees with the teacher on %.2f%%", on.c_str(),
                chosen.first, chosen.second, how.c_str(), 100.0 * agreement(predictions(distilled->net, d), teacher_says));
  rows.push_back(measure("student distilled (" + shape + ")", "student_distilled", distilled->net, fp32_bytes(distilled->store),
                         d, s, note));
  auto alone = train_student(teacher, x, y, s.student_epochs, 0, -1, s);
  std::snprintf(note, sizeof note,
                "%s; same initialisation, batches and steps, labels only; agrees with the teacher on %.2f%%", on.c_str(),
                100.0 * agreement(predictions(alone->net, d), teacher_says));
  rows.push_back(measure("student alone (" + shape + ")", "student_alone", alone->net, fp32_bytes(alone->store), d, s, note));
  if (s.student_seeds > 1) {
    // The same pair from other seeds (initialisation and batch order), the teacher unchanged:
    // how much of the difference is the seed's.
    std::vector<double> gains{100.0 * (rows[0].accuracy - rows[1].accuracy)};
    std::printf("students from %d seeds (distilled / alone / points): seed %llu %.4f / %.4f / %+.2f", s.student_seeds,
                static_cast<unsigned long long>(s.seed), rows[0].accuracy, rows[1].accuracy, gains[0]);
    for (int k = 1; k < s.student_seeds; ++k) {
      settings o = s;
      o.seed = s.seed + static_cast<std::uint64_t>(k);
      const double with = accuracy(train_student(teacher, x, y, o.student_epochs, chosen.first, chosen.second, o)->net, d);
      const double without = accuracy(train_student(teacher, x, y, o.student_epochs, 0, -1, o)->net, d);
      gains.push_back(100.0 * (with - without));
      std::printf(", seed %llu %.4f / %.4f / %+.2f", static_cast<unsigned long long>(o.seed), with, without, gains.back());
      std::fflush(stdout);
    }
    const auto wins = std::count_if(gains.begin(), gains.end(), [](double g) { return g > 0; });
    std::printf("\n  distilled above alone in %lld of %d seeds; median gain %+.2f points\n", static_cast<long long>(wins),
                s.student_seeds, example::median(gains));
  }
  return rows;
}

/// Bytes a model stores: each module's bytes() where it has one (quantized layers: values at
/// their bit width, scales, fp32 bias), fp32 weights and bias for a linear, nothing for the rest.
template <class M>
double module_bytes(const M& m) {
  if constexpr (requires { m.bytes(); }) {
    return static_cast<double>(m.bytes());
  } else if constexpr (requires { m.in_features(); m.out_features(); m.bias(); }) {
    const double n = static_cast<double>(m.in_features() * m.out_features() + (m.bias().valid() ? m.out_features() : 0));
    return n * sizeof(float);
  } else {
    return 0.0;
  }
}
template <class... Ms>
double model_bytes(nn::sequential<P, Ms...>& net) {
  return [&]<std::size_t... I>(std::index_sequence<I...>) {
    return (0.0 + ... + module_bytes(net.template get<I>()));
  }(std::index_sequence_for<Ms...>{});
}

/// Post-training static int8: min-max ranges of every linear's input over a few training
/// batches, then int8 weights (per channel) and uint8 activations (per tensor).
row ptq_row(mlp& base, const data_set& d, const settings& s) {
  auto cal = quant::calibrate<quant::minmax_observer>(base.net, base.store);
  nn::arena<cpu> mem;
  const index_t batches = std::max<index_t>(1, std::min<index_t>(s.quick ? 4 : 16, d.train_images.size(0) / 256));
  for (index_t b = 0; b < batches; ++b) {
    mem.reset();
    nn::context<P> ctx{mem, false, nullptr};
    cal.forward(ctx, d.train_images.slice(0, b * 256, std::min(d.train_images.size(0), (b + 1) * 256)));
  }
  auto q = quant::convert<quant::static_int8>(cal, base.store);
  char note[120];
  std::snprintf(note, sizeof note, "static: min-max calibration on %lld training images", static_cast<long long>(batches * 256));
  return measure("PTQ int8", "ptq_int8", q, model_bytes(q), d, s, note);
}

/// Quantization-aware training: the baseline's weights in qat_linear layers (fake-quantized
/// int8 weights and uint8 inputs, straight-through gradients), fine-tuned, then converted to
/// static int8 with the observers' frozen ranges.
row qat_row(mlp& base, const data_set& d, const settings& s) {
  using qat = quant::qat_linear<P>;
  io::batch_loader<float> loader(d.train_images, d.train_labels, {.batch_size = s.batch, .shuffle = true, .seed = s.seed + 5});
  const quant::qat_options o{.freeze_observer_after = std::max<std::int64_t>(1, s.finetune_epochs * loader.batches_per_epoch() / 2)};
  nn::parameter_store<P> store;
  nn::sequential<P, nn::flatten<P>, qat, nn::dropout<P>, qat, nn::dropout<P>, qat> net(
      nn::flatten<P>{}, qat(store, "fc1", 784, base.h1, true, activation::relu, o), nn::dropout<P>(0.2),
      qat(store, "fc2", base.h1, base.h2, true, activation::relu, o), nn::dropout<P>(0.2), qat(store, "fc3", base.h2, 10, true,
                                                                                            activation::none, o));
  store.allocate();
  quant::copy_parameters(base.store, store);
  optim::adamw opt({.lr = s.finetune_lr, .weight_decay = s.weight_decay});
  fit(net, store, opt, s.finetune_epochs, loader, s);
  const double fake = accuracy(net, d);
  auto q = quant::convert<quant::static_int8>(net, store);
  char note[120];
  std::snprintf(note, sizeof note, "fine-tuned with fake quantization (%.4f), observers frozen at step %lld",
                fake, static_cast<long long>(o.freeze_observer_after));
  return measure("QAT int8", "qat_int8", q, model_bytes(q), d, s, note);
}

/// Weight-only int4: group-wise int4 weights (one fp32 scale per 16 inputs: 784 has no divisor
/// 32), fp32 activations; no data needed.
row int4_row(mlp& base, const data_set& d, const settings& s) {
  auto q = quant::convert<quant::weight_only<quant::int4_t, 16>>(base.net, base.store);
  return measure("weight-only int4", "int4", q, model_bytes(q), d, s, "group 16, fp32 activations, no data");
}

/// A copy of the baseline: same architecture, its weights.
std::unique_ptr<mlp> copy_of(mlp& base) {
  auto m = std::make_unique<mlp>(base.h1, base.h2);
  prune::copy_unchanged(base.store, m->store);
  return m;
}

/// Bytes of `m`'s weights in a sparse format, values (fp32) plus a one-bit-per-weight mask for
/// each pruned matrix; biases dense. What trident holds is dense: this is for the notes.
double bitmap_sparse_bytes(mlp& m) {
  const auto r = prune::report_sparsity(m.store);
  double matrices = 0;
  for (const auto& info : m.store.infos())
    if (info.extents.rank() >= 2) matrices += static_cast<double>(info.numel());
  const double others = static_cast<double>(m.store.count()) - matrices;
  const double nonzero = matrices - static_cast<double>(r.zeros);
  return nonzero * sizeof(float) + matrices / 8.0 + others * sizeof(float);
}

/// Unstructured (global magnitude) pruning to `sparsity`, then fine-tuning with the mask held.
row unstructured_row(mlp& base, double sparsity, const data_set& d, const settings& s) {
  auto m = copy_of(base);
  const auto masks = prune::magnitude_global(m->store, sparsity);
  prune::apply(m->store, masks);
  const double one_shot = accuracy(m->net, d);
  io::batch_loader<float> loader(d.train_images, d.train_labels, {.batch_size = s.batch, .shuffle = true, .seed = s.seed + 2});
  prune::masked<optim::adamw> opt(masks, {.lr = s.finetune_lr, .weight_decay = s.weight_decay});
  fit(m->net, m->store, opt, s.finetune_epochs, loader, s);
  const auto r = prune::report_sparsity(m->store);
  char note[200];
  std::snprintf(note, sizeof note, "%.1f%% of weights zero; %.4f before fine-tuning; dense storage (values + bitmap: %.0f KiB)",
                100.0 * r.global(), one_shot, bitmap_sparse_bytes(*m) / 1024.0);
  char name[40];
  std::snprintf(name, sizeof name, "%.0f%% unstructured", 100.0 * sparsity);
  return measure(name, "prune" + std::to_string(static_cast<int>(100.0 * sparsity + 0.5)), m->net, fp32_bytes(m->store), d, s,
                 note);
}

/// Gradual unstructured pruning to `sparsity` (Zhu and Gupta): from the dense baseline, global
/// magnitude masks recomputed every Δt steps on the cubic schedule over the first half of
/// s.gradual_epochs, then training on at `sparsity` for the second half, all under
/// prune::masked<optim::adamw> following the pruner's masks and one warm-up + cosine schedule.
/// The note keeps what one-shot pruning of the baseline (no fine-tuning) gives.
row gradual_row(mlp& base, double sparsity, const data_set& d, const settings& s) {
  double one_shot = 0;
  {
    auto m = copy_of(base);
    prune::apply(m->store, prune::magnitude_global(m->store, sparsity));
    one_shot = accuracy(m->net, d);
  }
  auto m = copy_of(base);
  io::batch_loader<float> loader(d.train_images, d.train_labels, {.batch_size = s.batch, .shuffle = true, .seed = s.seed + 6});
  const std::int64_t total = static_cast<std::int64_t>(s.gradual_epochs) * loader.batches_per_epoch();
  const std::int64_t ramp = std::max<std::int64_t>(1, total / 2);
  const std::int64_t updates = std::max<std::int64_t>(1, ramp / 50);  // Δt about 50 steps
  prune::gradual_pruner<P> pruner(m->store,
                                  {.initial_sparsity = 0.0, .final_sparsity = sparsity, .start_step = 0,
                                   .frequency = std::max<std::int64_t>(1, ramp / updates), .steps = updates},
                                  prune::scope::global);
  prune::masked<optim::adamw> opt(pruner.masks(), {.lr = s.gradual_lr, .weight_decay = s.weight_decay});
  auto schedule = schedule_for(opt, loader, s.gradual_epochs);
  train::trainer<P, mlp::net_type, prune::masked<optim::adamw>, sched::warmup_cosine_lr> t(
      m->net, m->store, opt, {.epochs = s.gradual_epochs, .seed = s.seed, .progress = false, .out = nullptr}, schedule);
  double at_end_of_ramp = 0;
  for (int e = 0; e < s.gradual_epochs; ++e) {
    for (const auto& b : loader.epoch(static_cast<std::uint64_t>(e))) {
      pruner.step(t.steps());  // recomputes and applies the masks when the step is due
      t.train_batch(b.inputs, b.labels);
      if (t.steps() == pruner.schedule().end_step() + 1) at_end_of_ramp = accuracy(m->net, d);
    }
    if (s.progress) std::fprintf(stderr, "gradual pruning: epoch %d/%d, sparsity %.3f\n", e + 1, s.gradual_epochs, pruner.sparsity());
  }
  const auto r = prune::report_sparsity(m->store);
  char note[240];
  std::snprintf(note, sizeof note,
                "%.1f%% of weights zero; one-shot %.4f, %.4f when the ramp ended (%d mask updates, every %lld steps); dense "
                "storage (values + bitmap: %.0f KiB)",
                100.0 * r.global(), one_shot, at_end_of_ramp, pruner.updates(),
                static_cast<long long>(pruner.schedule().frequency), bitmap_sparse_bytes(*m) / 1024.0);
  char name[40];
  std::snprintf(name, sizeof name, "%.0f%% unstructured (gradual)", 100.0 * sparsity);
  return measure(name, "prune" + std::to_string(static_cast<int>(100.0 * sparsity + 0.5)), m->net, fp32_bytes(m->store), d, s,
                 note);
}

/// 2:4 semi-structured sparsity (in every four consecutive weights of a row, two stay), fine-tuned.
row sparse_2_4_row(mlp& base, const data_set& d, const settings& s) {
  auto m = copy_of(base);
  const auto masks = prune::n_m(m->store, 2, 4);
  prune::apply(m->store, masks);
  const double one_shot = accuracy(m->net, d);
  io::batch_loader<float> loader(d.train_images, d.train_labels, {.batch_size = s.batch, .shuffle = true, .seed = s.seed + 3});
  prune::masked<optim::adamw> opt(masks, {.lr = s.finetune_lr, .weight_decay = s.weight_decay});
  fit(m->net, m->store, opt, s.finetune_epochs, loader, s);
  // the compressed 2:4 format: the two kept fp32 values of each group and their 2-bit positions
  double matrices = 0;
  for (const auto& info : m->store.infos())
    if (info.extents.rank() >= 2) matrices += static_cast<double>(info.numel());
  const double compressed = matrices / 2 * sizeof(float) + matrices / 2 * 2 / 8 + (static_cast<double>(m->store.count()) - matrices) * sizeof(float);
  char note[200];
  std::snprintf(note, sizeof note, "%.1f%% of weights zero; %.4f before fine-tuning; dense storage (2:4 compressed: %.0f KiB)",
                100.0 * prune::report_sparsity(m->store).global(), one_shot, compressed / 1024.0);
  return measure("2:4 semi-structured", "sparse24", m->net, fp32_bytes(m->store), d, s, note);
}

/// Structured pruning: the hidden units of fc1 and fc2 ranked by the L2 norm of their weight
/// rows, half of each kept, a physically smaller 784-256-128-10 model built and fine-tuned.
row shrunk_row(mlp& base, const data_set& d, const settings& s) {
  auto& fc1 = base.net.get<1>();
  auto& fc2 = base.net.get<3>();
  auto& fc3 = base.net.get<5>();
  const auto k1 = prune::rank_rows(base.store, fc1.weight(), base.h1 / 2);
  const auto k2 = prune::rank_rows(base.store, fc2.weight(), base.h2 / 2);
  mlp small(static_cast<index_t>(k1.size()), static_cast<index_t>(k2.size()));
  prune::copy_shrunk_linear_chain<P>(base.store, {&fc1, &fc2, &fc3}, small.store,
                                     {&small.net.get<1>(), &small.net.get<3>(), &small.net.get<5>()}, {k1, k2});
  const double one_shot = accuracy(small.net, d);
  io::batch_loader<float> loader(d.train_images, d.train_labels, {.batch_size = s.batch, .shuffle = true, .seed = s.seed + 4});
  optim::adamw opt({.lr = s.finetune_lr, .weight_decay = s.weight_decay});
  fit(small.net, small.store, opt, s.finetune_epochs, loader, s);
  char note[160];
  std::snprintf(note, sizeof note, "784-%lld-%lld-10 by L2 row norm; %.4f before fine-tuning", static_cast<long long>(small.h1),
                static_cast<long long>(small.h2), one_shot);
  return measure("structured (shrunk)", "shrunk", small.net, fp32_bytes(small.store), d, s, note);
}

void print_table(const std::vector<row>& rows) {
  const row& base = rows.front();
  std::printf("\n%-30s %9s %11s %7s %12s %8s  %s\n", "model", "accuracy", "KiB", "size", "ms/256 img", "speed", "notes");
  for (const row& r : rows) {
    std::printf("%-30s %9.4f %11.1f %6.2fx %12.3f %7.2fx  %s\n", r.name.c_str(), r.accuracy, r.bytes / 1024.0,
                base.bytes / r.bytes, r.latency, base.latency / r.latency, r.note.c_str());
  }
  std::printf("(size and speed relative to the fp32 baseline: higher is smaller / faster; latency is the median of "
              "timed passes on 2 threads)\n\n");
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const settings s = parse(argc, argv);
    if (s.threads > 0) omp_set_num_threads(s.threads);
    const data_set d = load_data(s);
    std::printf("compress_demo: Fashion-MNIST, %lld training images, %lld test images; baseline 784-512-256-10 fp32, "
                "%d epochs; %d threads for training, 2 for latency\n",
                static_cast<long long>(d.train_images.size(0)), static_cast<long long>(d.test_images.size(0)), s.epochs,
                omp_get_max_threads());

    // The baseline: trained, or loaded.
    mlp base;
    const bool load = !s.load.empty() && std::filesystem::exists(s.load);
    if (load) {
      nn::load_weights(base.store, s.load);
      std::printf("baseline: loaded from %s\n", s.load.c_str());
    } else {
      init_model(base, s.seed);
      io::batch_loader<float> loader(d.train_images, d.train_labels, {.batch_size = s.batch, .shuffle = true, .seed = s.seed});
      optim::adamw opt({.lr = s.lr, .weight_decay = s.weight_decay});
      const auto r = fit(base.net, base.store, opt, s.epochs, loader, s);
      std::printf("baseline: trained %d epochs in %.1f s (train loss %.4f)\n", s.epochs, r.train_seconds, r.last_train.loss);
      if (!s.load.empty()) {
        nn::save_weights(base.store, s.load);
        std::printf("baseline: saved to %s\n", s.load.c_str());
      }
    }
    std::fflush(stdout);

    std::vector<row> rows;
    rows.push_back(measure("fp32 baseline", "fp32", base.net, fp32_bytes(base.store), d, s));

    // Quantization (include/trident/quant.hpp).
    if (s.wants("quant")) {
      rows.push_back(ptq_row(base, d, s));
      rows.push_back(qat_row(base, d, s));
      rows.push_back(int4_row(base, d, s));
    }

    // Pruning (include/trident/prune.hpp), each from a copy of the baseline.
    if (s.wants("prune")) {
      rows.push_back(unstructured_row(base, 0.5, d, s));
      rows.push_back(gradual_row(base, 0.9, d, s));
      rows.push_back(shrunk_row(base, d, s));
      rows.push_back(sparse_2_4_row(base, d, s));
    }

    // Distillation.
    if (s.wants("distill")) {
      std::vector<row> students;
      if (s.teacher == "mlp") {
        students = distillation_rows(base.net, d, s);
      } else {
        cnn_teacher teacher;
        // Always trained here: its batch-norm running statistics are module state, which
        // nn::save_weights (parameters only) does not keep.
        init_model(teacher, s.seed + 5);
        io::batch_loader<float> loader(d.train_images, d.train_labels, {.batch_size = s.batch, .shuffle = true, .seed = s.seed + 5});
        optim::adamw opt({.lr = s.teacher_lr, .weight_decay = s.weight_decay});
        const auto r = fit(teacher.net, teacher.store, opt, s.teacher_epochs, loader, s);
        std::printf("teacher: CNN trained %d epochs in %.1f s (train loss %.4f)\n", s.teacher_epochs, r.train_seconds,
                    r.last_train.loss);
        std::fflush(stdout);
        rows.push_back(measure("teacher (CNN)", "teacher", teacher.net, fp32_bytes(teacher.store), d, s,
                               "fashion_mnist_cnn's network and recipe; teaches the students below"));
        students = distillation_rows(teacher.net, d, s);
      }
      for (auto& r : students) rows.push_back(std::move(r));
    }

    print_table(rows);
    std::printf("RESULT example=compress_demo");
    for (const row& r : rows) std::printf(" %s=%.4f", r.key.c_str(), r.accuracy);
    std::printf("\n");
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "compress_demo: %s\n", e.what());
    return 1;
  }
}
