#pragma once
/// @file train/trainer.hpp
/// A classification trainer: train and eval loops over batch loaders, gradient accumulation,
/// loss scaling and clipping (train/step.hpp), a scheduler stepped after every applied
/// optimizer step, metrics, a progress bar, a CSV log and a summary with throughput, achieved
/// GFLOP/s and a memory breakdown.
///
///   train::trainer<P, decltype(model), optim::sgd> t(model, store, opt, {.epochs = 10});
///   t.fit(train_loader, &test_loader);
///
/// The model is any module (forward/backward on (N, ...) inputs giving (N, classes) logits);
/// when it has flops() (forward FLOPs of its last forward, as nn::sequential and the layers
/// report them), the trainer counts forward plus backward FLOPs per training step (the
/// model's backward_flops(), else twice the forward: input and weight gradients) and the
/// forward per evaluated batch.
///
/// A loader is anything with epoch(e) (a range of batches with .inputs and .labels),
/// batches_per_epoch() and samples_per_epoch(), as io::batch_loader is.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../core/policy.hpp"
#include "../core/rng.hpp"
#include "../core/tensor.hpp"
#include "../nn/arena.hpp"
#include "../nn/loss.hpp"
#include "../nn/module.hpp"
#include "../nn/parameters.hpp"
#include "../ops/transfer.hpp"
#include "csv_log.hpp"
#include "memory.hpp"
#include "progress.hpp"
#include "step.hpp"

namespace trident::train {

/// Rows of (rows, classes) `logits` whose first maximal logit is the row's label (a negative,
/// ignored label never counts). The logits are converted to float once, into `buffer`, which
/// grows to the largest batch and can be reused.
template <class S, class D>
index_t count_correct(tensor_view<const S, D> logits, std::span<const std::int32_t> labels, std::vector<float>& buffer) {
  const index_t rows = logits.size(0), classes = logits.size(1);
  buffer.resize(static_cast<std::size_t>(rows * classes));
  copy(logits, tensor_view<float, D>(buffer.data(), {rows, classes}));
  index_t correct = 0;
  for (index_t i = 0; i < rows; ++i) {
    const float* row = buffer.data() + i * classes;
    const auto best = std::max_element(row, row + classes) - row;
    correct += labels[static_cast<std::size_t>(i)] == static_cast<std::int32_t>(best);
  }
  return correct;
}

/// A scheduler that leaves the learning rate alone.
struct constant_lr {
  template <class O>
  void step(O&) noexcept {}
};

/// How a run goes.
struct trainer_options {
  int epochs = 1;
  int gradient_accumulation_steps = 1;  ///< micro-batches per optimizer step (each batch is split)
  step_options step{};                  ///< clipping and (fp16) loss scaling
  nn::cross_entropy_options loss{};     ///< label smoothing, ignore index
  std::uint64_t seed = 0;               ///< dropout's generator
  std::string csv_path{};               ///< "" = no CSV log
  std::int64_t log_every = 50;          ///< optimizer steps between CSV rows
  bool progress = true;                 ///< the progress bar (stderr)
  std::FILE* out = stdout;              ///< epoch lines and the summary; nullptr = silent
};

/// Loss and accuracy over some samples.
struct metrics {
  double loss = std::numeric_limits<double>::quiet_NaN();
  double accuracy = std::numeric_limits<double>::quiet_NaN();
  index_t samples = 0;
  double seconds = 0;
  double flops = 0;
  double samples_per_second() const noexcept { return seconds > 0 ? static_cast<double>(samples) / seconds : 0; }
  double gflops_per_second() const noexcept { return seconds > 0 ? flops / seconds * 1e-9 : 0; }
};

/// One optimizer step on one global batch.
struct batch_result {
  double loss = 0;      ///< mean loss of the batch (unscaled)
  index_t correct = 0;  ///< rows whose arg-max logit is the label
  index_t counted = 0;  ///< rows not ignored
  step_outcome step{};
};

/// Bytes a run holds, by role.
struct memory_breakdown {
  std::size_t parameters = 0;       ///< parameters, gradients and master weights (the store)
  std::size_t optimizer_state = 0;  ///< momentum / Adam moments
  std::size_t activations = 0;      ///< the activation arena's capacity (peak of one step)
  std::size_t peak_resident = 0;    ///< the process's peak resident memory (VmHWM)
  std::size_t accounted() const noexcept { return parameters + optimizer_state + activations; }
};

/// What fit() returns: the last epoch's metrics and the totals.
struct run_summary {
  metrics last_train{}, last_eval{};
  double train_seconds = 0;     ///< time in training loops (evaluation excluded)
  double train_samples = 0;
  double train_flops = 0;
  std::int64_t steps = 0, skipped_steps = 0;
  memory_breakdown memory{};
  double samples_per_second() const noexcept { return train_seconds > 0 ? train_samples / train_seconds : 0; }
  double gflops_per_second() const noexcept { return train_seconds > 0 ? train_flops / train_seconds * 1e-9 : 0; }
};

/// The trainer.
/// @tparam Policy    the model's policy bundle
/// @tparam Model     a module of Policy producing (N, classes) logits
/// @tparam Optimizer an optimizer with step(store, grad_scale), lr() and set_lr()
/// @tparam Scheduler anything with step(optimizer) (sched::warmup_lr, ..., constant_lr)
template <policy_bundle Policy, class Model, class Optimizer, class Scheduler = constant_lr>
class trainer {
 public:
  using S = typename Policy::storage_type;
  using D = typename Policy::device;

  trainer(Model& model, nn::parameter_store<Policy>& store, Optimizer& opt, trainer_options o = {}, Scheduler sched = {})
      : model_(model), store_(store), opt_(opt), sched_(std::move(sched)), o_(std::move(o)), control_(o_.step),
        loss_(o_.loss), gen_(o_.seed) {
    if (o_.epochs < 0) throw error("train::trainer: epochs must be >= 0, got " + std::to_string(o_.epochs));
    if (o_.gradient_accumulation_steps < 1) {
      throw error("train::trainer: gradient_accumulation_steps must be >= 1, got " +
                  std::to_string(o_.gradient_accumulation_steps));
    }
    if (o_.log_every < 1) throw error("train::trainer: log_every must be >= 1, got " + std::to_string(o_.log_every));
    if (!store_.allocated()) throw error("train::trainer: the parameter store is not allocated (call allocate() and init first)");
  }

  /// One optimizer step on a global batch x (N, ...) with labels: split into
  /// gradient_accumulation_steps micro-batches, forward and backward each (gradients of the
  /// mean loss over the whole batch), then the step (skipped on fp16 overflow; the scheduler
  /// steps only when it is applied).
  batch_result train_batch(tensor_view<const S, D> x, std::span<const std::int32_t> labels) {
    const index_t n = x.rank() > 0 ? x.size(0) : 0;
    if (n == 0 || static_cast<index_t>(labels.size()) != n) {
      throw shape_error("train::trainer::train_batch: inputs " + x.shape().str() + " with " + std::to_string(labels.size()) +
                        " labels (need N >= 1 of each)");
    }
    const index_t k = std::min<index_t>(o_.gradient_accumulation_steps, n);
    index_t counted = 0;
    for (const std::int32_t y : labels) counted += y != o_.loss.ignore_index;
    batch_result r;
    r.counted = counted;
    store_.zero_grad();
    const double scale = control_.loss_scale();
    double loss_sum = 0;
    for (index_t m = 0; m < k; ++m) {
      const index_t b = n * m / k, e = n * (m + 1) / k;
      memory_.reset();
      nn::context<Policy> ctx{memory_, true, &gen_};
      auto logits = model_.forward(ctx, x.slice(0, b, e));
      const double l = loss_.forward(ctx, logits, labels.subspan(static_cast<std::size_t>(b), static_cast<std::size_t>(e - b)));
      const index_t c = loss_.count();
      if (!std::isfinite(l) && !step_control<Policy>::scaled) {
        throw error("train::trainer: the loss is " + std::to_string(l) + " at step " + std::to_string(steps_) +
                    " (micro-batch " + std::to_string(m) + "): the run diverged; lower the learning rate or clip gradients");
      }
      loss_sum += l * static_cast<double>(c);
      r.correct += count_correct(logits, labels.subspan(static_cast<std::size_t>(b), static_cast<std::size_t>(e - b)));
      flops_ += model_flops() + model_backward_flops();
      if (counted > 0) {
        auto dlogits = loss_.backward(ctx, scale * static_cast<double>(c) / static_cast<double>(counted));
        model_.backward(ctx, dlogits);
      }
    }
    r.loss = counted ? loss_sum / static_cast<double>(counted) : 0.0;
    r.step = control_.step(store_, opt_);
    if (r.step.applied) sched_.step(opt_);
    ++steps_;
    return r;
  }

  /// Loss and accuracy of the model in eval mode (no dropout, running statistics) over one
  /// pass of `loader` (its epoch 0 order).
  template <class Loader>
  metrics evaluate(Loader& loader) {
    metrics m;
    const auto t0 = clock::now();
    double loss_sum = 0;
    index_t counted = 0, correct = 0;
    double flops = 0;
    for (const auto& b : loader.epoch(0)) {
      memory_.reset();
      nn::context<Policy> ctx{memory_, false, &gen_};
      auto logits = model_.forward(ctx, b.inputs);
      const double l = loss_.forward(ctx, logits, b.labels);
      loss_sum += l * static_cast<double>(loss_.count());
      counted += loss_.count();
      correct += count_correct(logits, b.labels);
      flops += model_flops();
    }
    m.seconds = seconds_since(t0);
    m.samples = counted;
    m.flops = flops;
    m.loss = counted ? loss_sum / static_cast<double>(counted) : std::numeric_limits<double>::quiet_NaN();
    m.accuracy = counted ? static_cast<double>(correct) / static_cast<double>(counted) : std::numeric_limits<double>::quiet_NaN();
    return m;
  }

  /// One epoch over `loader` (its epoch-e order), with the progress bar and CSV rows.
  template <class Loader>
  metrics train_epoch(Loader& loader, int epoch) {
    metrics m;
    const auto t0 = clock::now();
    const double flops0 = flops_;
    const index_t batches = loader.batches_per_epoch();
    progress_bar bar(static_cast<long long>(batches), "samples", stderr);
    double loss_sum = 0, window_loss = 0;
    index_t counted = 0, correct = 0, window_counted = 0, window_correct = 0, done = 0;
    for (const auto& b : loader.epoch(static_cast<std::uint64_t>(epoch))) {
      const auto r = train_batch(b.inputs, b.labels);
      loss_sum += r.loss * static_cast<double>(r.counted);
      window_loss += r.loss * static_cast<double>(r.counted);
      counted += r.counted;
      window_counted += r.counted;
      correct += r.correct;
      window_correct += r.correct;
      ++done;
      if (steps_ % o_.log_every == 0 && window_counted > 0) {
        log_row(epoch, window_loss / static_cast<double>(window_counted),
                static_cast<double>(window_correct) / static_cast<double>(window_counted), nan(), nan(),
                static_cast<double>(counted) / seconds_since(t0));
        window_loss = 0;
        window_counted = window_correct = 0;
      }
      if (o_.progress) {
        bar.update(static_cast<long long>(done), static_cast<double>(counted), progress_text(loss_sum, counted, correct));
      }
    }
    if (o_.progress) bar.finish(static_cast<long long>(done), static_cast<double>(counted), progress_text(loss_sum, counted, correct));
    m.seconds = seconds_since(t0);
    m.samples = counted;
    m.flops = flops_ - flops0;
    m.loss = counted ? loss_sum / static_cast<double>(counted) : nan();
    m.accuracy = counted ? static_cast<double>(correct) / static_cast<double>(counted) : nan();
    return m;
  }

  /// options().epochs epochs of training, each followed by an evaluation on `eval` (when
  /// given), with a line per epoch and a summary at the end.
  template <class Loader, class EvalLoader = Loader>
  run_summary fit(Loader& train, EvalLoader* eval = nullptr) {
    run_summary s;
    if (o_.out) {
      std::fprintf(o_.out, "training %lld parameters (%s) for %d epochs of %lld steps, %s\n",
                   static_cast<long long>(store_.count()), Policy::traits::name, o_.epochs,
                   static_cast<long long>(train.batches_per_epoch()), control_.describe().c_str());
    }
    for (int e = 0; e < o_.epochs; ++e) {
      s.last_train = train_epoch(train, e);
      s.train_seconds += s.last_train.seconds;
      s.train_samples += static_cast<double>(s.last_train.samples);
      s.train_flops += s.last_train.flops;
      if (eval) {
        s.last_eval = evaluate(*eval);
        log_row(e, nan(), nan(), s.last_eval.loss, s.last_eval.accuracy, s.last_train.samples_per_second());
      }
      if (o_.out) {
        std::fprintf(o_.out, "epoch %d/%d: train loss %.4f acc %.4f", e + 1, o_.epochs, s.last_train.loss, s.last_train.accuracy);
        if (eval) std::fprintf(o_.out, " | eval loss %.4f acc %.4f", s.last_eval.loss, s.last_eval.accuracy);
        std::fprintf(o_.out, " | %.1f s, %.0f samples/s, %.1f GFLOP/s", s.last_train.seconds,
                     s.last_train.samples_per_second(), s.last_train.gflops_per_second());
        if (control_.skipped_steps() > 0 || step_control<Policy>::scaled) {
          std::fprintf(o_.out, ", loss scale %g, %lld skipped", control_.loss_scale(),
                       static_cast<long long>(control_.skipped_steps()));
        }
        std::fprintf(o_.out, "\n");
        std::fflush(o_.out);
      }
    }
    s.steps = steps_;
    s.skipped_steps = control_.skipped_steps();
    s.memory = memory();
    if (o_.out) print_summary(s);
    return s;
  }

  /// Bytes held now, by role.
  memory_breakdown memory() {
    memory_breakdown b;
    b.parameters = store_.bytes();
    if constexpr (requires { opt_.state_tensors(); }) {
      for (const auto& st : opt_.state_tensors()) b.optimizer_state += static_cast<std::size_t>(st.values.numel()) * sizeof(float);
    }
    b.activations = memory_.capacity_bytes();
    b.peak_resident = peak_resident_bytes();
    return b;
  }

  /// Prints the run's totals and the memory breakdown.
  void print_summary(const run_summary& s) const {
    const auto mib = [](std::size_t b) { return static_cast<double>(b) / (1024.0 * 1024.0); };
    std::fprintf(o_.out, "summary: %lld steps (%lld skipped), %.1f s training, %.0f samples/s, %.1f GFLOP/s achieved\n",
                 static_cast<long long>(s.steps), static_cast<long long>(s.skipped_steps), s.train_seconds,
                 s.samples_per_second(), s.gflops_per_second());
    std::fprintf(o_.out,
                 "memory: parameters+gradients+master %.2f MiB, optimizer state %.2f MiB, activations %.2f MiB "
                 "(accounted %.2f MiB); peak resident %.2f MiB\n",
                 mib(s.memory.parameters), mib(s.memory.optimizer_state), mib(s.memory.activations), mib(s.memory.accounted()),
                 mib(s.memory.peak_resident));
    std::fflush(o_.out);
  }

  /// The current learning rate, steps so far, and the pieces.
  double lr() const { return opt_.lr(); }
  std::int64_t steps() const noexcept { return steps_; }
  step_control<Policy>& control() noexcept { return control_; }
  Scheduler& scheduler() noexcept { return sched_; }
  nn::arena<D>& activations() noexcept { return memory_; }
  const trainer_options& options() const noexcept { return o_; }

 private:
  using clock = std::chrono::steady_clock;
  static double nan() noexcept { return std::numeric_limits<double>::quiet_NaN(); }
  static double seconds_since(clock::time_point t0) { return std::chrono::duration<double>(clock::now() - t0).count(); }

  double model_flops() const {
    if constexpr (requires { model_.flops(); }) {
      return static_cast<double>(model_.flops());
    } else {
      return 0.0;
    }
  }

  double model_backward_flops() const {
    if constexpr (requires { model_.flops(); }) {
      return static_cast<double>(nn::backward_flops_of(model_));
    } else {
      return 0.0;
    }
  }

  index_t count_correct(tensor_view<const S, D> logits, std::span<const std::int32_t> labels) {
    return train::count_correct(logits, labels, logits_f32_);
  }

  std::string progress_text(double loss_sum, index_t counted, index_t correct) const {
    char buf[160];
    std::snprintf(buf, sizeof buf, "loss %.4f acc %.4f lr %.3g", counted ? loss_sum / static_cast<double>(counted) : nan(),
                  counted ? static_cast<double>(correct) / static_cast<double>(counted) : nan(), opt_.lr());
    return buf;
  }

  void log_row(int epoch, double train_loss, double train_acc, double eval_loss, double eval_acc, double samples_per_s) {
    csv_.row({static_cast<double>(steps_), static_cast<double>(epoch + 1), opt_.lr(), train_loss, train_acc, eval_loss, eval_acc,
              samples_per_s, control_.loss_scale(), static_cast<double>(control_.skipped_steps())});
  }

  Model& model_;
  nn::parameter_store<Policy>& store_;
  Optimizer& opt_;
  Scheduler sched_;
  trainer_options o_;
  step_control<Policy> control_;
  nn::softmax_cross_entropy<Policy> loss_;
  generator gen_;
  nn::arena<D> memory_;
  csv_log csv_{o_.csv_path,
               {"step", "epoch", "lr", "train_loss", "train_acc", "eval_loss", "eval_acc", "samples_per_s", "loss_scale",
                "skipped_steps"}};
  std::vector<float> logits_f32_;  // count_correct's float copy of the logits
  std::int64_t steps_ = 0;
  double flops_ = 0;
};

}  // namespace trident::train
