#pragma once
/// @file train/trainer_base.hpp
/// What every classification trainer does the same way, whatever its loss: the epoch loop
/// (progress bar, running loss and accuracy, CSV rows every log_every steps), fit() (epochs,
/// an evaluation after each, a line per epoch, the summary), the optimizer step over
/// gradient-accumulation micro-batches (train/step.hpp's loss scaling and clipping, then the
/// scheduler), the evaluation loop and the memory breakdown; and the types they report in.
///
/// train::trainer (cross-entropy) and distill::trainer (Hinton's loss against a teacher) derive
/// from trainer_base (CRTP) and keep only what differs: how a micro-batch is trained, what is
/// evaluated, and the words and CSV columns of their logs. A trainer `T` gives the base
///
///   batch_result train_batch(x, labels)   through train_step(x, labels, micro-batch function);
///                                         batch_result has loss, counted, correct and step
///   metrics evaluate(loader)              through evaluate_model(...)
///   static std::array<double, N> train_terms_of(const batch_result&)
///                                         the loss's parts logged beside the loss, one a column
///                                         named by the constructor's `train_terms` (none: the
///                                         base's default)
///   std::string run_details() const       words for fit()'s opening line (none: the default)
///
/// and may hide memory() to count more (distill::trainer adds its teacher's arena).

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
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

/// How a run goes, for a trainer whose loss takes LossOptions (train::trainer_options,
/// distill::trainer_options).
template <class LossOptions>
struct basic_trainer_options {
  int epochs = 1;
  int gradient_accumulation_steps = 1;  ///< micro-batches per optimizer step (each batch is split)
  step_options step{};                  ///< clipping and (fp16) loss scaling
  LossOptions loss{};                   ///< the loss's options
  std::uint64_t seed = 0;               ///< dropout's generator (the trained model's)
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

/// The words a trainer's messages and logs use.
struct trainer_wording {
  const char* name = "train::trainer";                          ///< leads every error message
  const char* store = "the parameter store";                    ///< in the error for an unallocated store
  const char* verb = "training";                                ///< fit()'s opening line: "<verb> N parameters"
  const char* parameters = "parameters+gradients+master";       ///< the summary's memory line
  const char* activations = "activations";                      ///< the summary's memory line
  const char* flops_note = "";                                  ///< after the summary's "GFLOP/s achieved"
};

/// Running sums over some batches: the loss weighted by the rows it counts, rows counted and
/// rows right.
struct tally {
  double loss_sum = 0;
  index_t counted = 0, correct = 0;
  void add(double mean_loss, index_t rows, index_t right) noexcept {
    loss_sum += mean_loss * static_cast<double>(rows);
    counted += rows;
    correct += right;
  }
  double loss() const noexcept {
    return counted ? loss_sum / static_cast<double>(counted) : std::numeric_limits<double>::quiet_NaN();
  }
  double accuracy() const noexcept {
    return counted ? static_cast<double>(correct) / static_cast<double>(counted) : std::numeric_limits<double>::quiet_NaN();
  }
};

/// The shared part of a trainer (see the file comment for what Derived gives it).
/// @tparam Derived   the trainer (CRTP)
/// @tparam Policy    the trained model's policy bundle
/// @tparam Optimizer an optimizer with step(store, grad_scale), lr() and set_lr()
/// @tparam Scheduler anything with step(optimizer) (sched::warmup_lr, ..., constant_lr)
/// @tparam Options   a basic_trainer_options
template <class Derived, policy_bundle Policy, class Optimizer, class Scheduler, class Options>
class trainer_base {
 public:
  using S = typename Policy::storage_type;
  using D = typename Policy::device;

  /// One epoch over `loader` (its epoch-e order), with the progress bar and CSV rows.
  template <class Loader>
  metrics train_epoch(Loader& loader, int epoch) {
    const auto t0 = clock::now();
    const double flops0 = flops_;
    progress_bar bar(static_cast<long long>(loader.batches_per_epoch()), "samples", stderr);
    tally total, window;
    std::vector<double> window_terms(terms_, 0.0);  // the loss's parts, weighted as the loss
    long long done = 0;
    for (const auto& b : loader.epoch(static_cast<std::uint64_t>(epoch))) {
      const auto r = derived().train_batch(b.inputs, b.labels);
      total.add(r.loss, r.counted, r.correct);
      window.add(r.loss, r.counted, r.correct);
      const auto terms = Derived::train_terms_of(r);
      for (std::size_t i = 0; i < terms.size(); ++i) window_terms[i] += terms[i] * static_cast<double>(r.counted);
      ++done;
      if (steps_ % o_.log_every == 0 && window.counted > 0) {
        for (auto& t : window_terms) t /= static_cast<double>(window.counted);
        log_row(epoch, window.loss(), window_terms, window.accuracy(), nan(), nan(),
                static_cast<double>(total.counted) / seconds_since(t0));
        window = {};
        std::fill(window_terms.begin(), window_terms.end(), 0.0);
      }
      if (o_.progress) bar.update(done, static_cast<double>(total.counted), progress_text(total));
    }
    if (o_.progress) bar.finish(done, static_cast<double>(total.counted), progress_text(total));
    return metrics_of(total, seconds_since(t0), flops_ - flops0);
  }

  /// options().epochs epochs of training, each followed by an evaluation (the trainer's
  /// evaluate()) on `eval` when given, with a line per epoch and a summary at the end.
  template <class Loader, class EvalLoader = Loader>
  run_summary fit(Loader& train, EvalLoader* eval = nullptr) {
    run_summary s;
    if (o_.out) {
      std::fprintf(o_.out, "%s %lld parameters (%s) for %d epochs of %lld steps, %s%s\n", words_.verb,
                   static_cast<long long>(store_.count()), Policy::traits::name, o_.epochs,
                   static_cast<long long>(train.batches_per_epoch()), derived().run_details().c_str(),
                   control_.describe().c_str());
    }
    for (int e = 0; e < o_.epochs; ++e) {
      s.last_train = train_epoch(train, e);
      s.train_seconds += s.last_train.seconds;
      s.train_samples += static_cast<double>(s.last_train.samples);
      s.train_flops += s.last_train.flops;
      if (eval) {
        s.last_eval = derived().evaluate(*eval);
        log_row(e, nan(), std::vector<double>(terms_, nan()), nan(), s.last_eval.loss, s.last_eval.accuracy,
                s.last_train.samples_per_second());
      }
      if (o_.out) print_epoch(e, s, eval != nullptr);
    }
    s.steps = steps_;
    s.skipped_steps = control_.skipped_steps();
    s.memory = derived().memory();
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
    std::fprintf(o_.out, "summary: %lld steps (%lld skipped), %.1f s training, %.0f samples/s, %.1f GFLOP/s achieved%s\n",
                 static_cast<long long>(s.steps), static_cast<long long>(s.skipped_steps), s.train_seconds,
                 s.samples_per_second(), s.gflops_per_second(), words_.flops_note);
    std::fprintf(o_.out,
                 "memory: %s %.2f MiB, optimizer state %.2f MiB, %s %.2f MiB (accounted %.2f MiB); peak resident %.2f MiB\n",
                 words_.parameters, mib(s.memory.parameters), mib(s.memory.optimizer_state), words_.activations,
                 mib(s.memory.activations), mib(s.memory.accounted()), mib(s.memory.peak_resident));
    std::fflush(o_.out);
  }

  /// The current learning rate, steps so far, and the pieces.
  double lr() const { return opt_.lr(); }
  std::int64_t steps() const noexcept { return steps_; }
  step_control<Policy>& control() noexcept { return control_; }
  Scheduler& scheduler() noexcept { return sched_; }
  nn::arena<D>& activations() noexcept { return memory_; }
  const Options& options() const noexcept { return o_; }

 protected:
  /// Checks the options and the store. `train_terms` names the loss's parts that
  /// Derived::train_terms_of gives, each logged in a column "train_<name>" after train_loss.
  trainer_base(trainer_wording words, nn::parameter_store<Policy>& store, Optimizer& opt, Options o, Scheduler sched,
               std::vector<std::string> train_terms = {})
      : words_(words), store_(store), opt_(opt), sched_(std::move(sched)), o_(std::move(o)), control_(o_.step),
        gen_(o_.seed), terms_(train_terms.size()), csv_(o_.csv_path, csv_columns(train_terms)) {
    const std::string who = words_.name;
    if (o_.epochs < 0) throw error(who + ": epochs must be >= 0, got " + std::to_string(o_.epochs));
    if (o_.gradient_accumulation_steps < 1) {
      throw error(who + ": gradient_accumulation_steps must be >= 1, got " + std::to_string(o_.gradient_accumulation_steps));
    }
    if (o_.log_every < 1) throw error(who + ": log_every must be >= 1, got " + std::to_string(o_.log_every));
    if (!store_.allocated()) throw error(who + ": " + words_.store + " is not allocated (call allocate() and init first)");
  }
  trainer_base(const trainer_base&) = delete;
  trainer_base& operator=(const trainer_base&) = delete;
  ~trainer_base() = default;

  /// The defaults of the hooks (see the file comment).
  template <class R>
  static std::array<double, 0> train_terms_of(const R&) noexcept {
    return {};
  }
  std::string run_details() const { return {}; }

  /// One optimizer step on a global batch x (N, ...) with labels: split into
  /// gradient_accumulation_steps micro-batches (at most N), each handed to
  /// `micro(ctx, m, x_m, labels_m, loss_scale)` in a training context over the freshly reset
  /// arena, which runs forward and backward (gradients of the whole batch's mean loss, scaled
  /// by loss_scale); then the step (skipped on fp16 overflow; the scheduler steps only when it
  /// is applied).
  template <class MicroBatch>
  step_outcome train_step(tensor_view<const S, D> x, std::span<const std::int32_t> labels, MicroBatch&& micro) {
    const index_t n = x.rank() > 0 ? x.size(0) : 0;
    if (n == 0 || static_cast<index_t>(labels.size()) != n) {
      throw shape_error(std::string(words_.name) + "::train_batch: inputs " + x.shape().str() + " with " +
                        std::to_string(labels.size()) + " labels (need N >= 1 of each)");
    }
    const index_t k = std::min<index_t>(o_.gradient_accumulation_steps, n);
    store_.zero_grad();
    const double scale = control_.loss_scale();
    for (index_t m = 0; m < k; ++m) {
      const index_t b = n * m / k, e = n * (m + 1) / k;
      memory_.reset();
      nn::context<Policy> ctx{memory_, true, &gen_};
      micro(ctx, m, x.slice(0, b, e), labels.subspan(static_cast<std::size_t>(b), static_cast<std::size_t>(e - b)), scale);
    }
    const step_outcome out = control_.step(store_, opt_);
    if (out.applied) sched_.step(opt_);
    ++steps_;
    return out;
  }

  /// Throws when the loss `l` of micro-batch m is not finite and no loss scaler will skip the
  /// step for it.
  void check_loss(double l, index_t m) const {
    if (!std::isfinite(l) && !step_control<Policy>::scaled) {
      throw error(std::string(words_.name) + ": the loss is " + std::to_string(l) + " at step " + std::to_string(steps_) +
                  " (micro-batch " + std::to_string(m) + "): the run diverged; lower the learning rate or clip gradients");
    }
  }

  /// Loss (`ce`) and accuracy of `model`, of policy TP, in eval mode (no dropout, running
  /// statistics) over one pass of `loader` (its epoch 0 order), its forwards in `mem`; inputs
  /// are converted to TP's storage type when that differs.
  template <class TP, class M, class Loader>
  metrics evaluate_model(M& model, nn::arena<D>& mem, nn::softmax_cross_entropy<TP>& ce, Loader& loader, generator* gen) {
    using X = typename TP::storage_type;
    const auto t0 = clock::now();
    tally t;
    double flops = 0;
    for (const auto& b : loader.epoch(0)) {
      mem.reset();
      nn::context<TP> ctx{mem, false, gen};
      const tensor_view<const X, D> logits = model.forward(ctx, input_for<TP>(ctx, b.inputs));
      const double l = ce.forward(ctx, logits, b.labels);
      t.add(l, ce.count(), train::count_correct(logits, b.labels, logits_f32_));
      flops += forward_flops(model);
    }
    return metrics_of(t, seconds_since(t0), flops);
  }

  /// `x` in TP's storage type: itself, or a copy in `ctx`'s arena.
  template <class TP>
  static tensor_view<const typename TP::storage_type, D> input_for(nn::context<TP>& ctx, tensor_view<const S, D> x) {
    using X = typename TP::storage_type;
    if constexpr (std::is_same_v<X, S>) {
      return x;
    } else {
      auto c = ctx.template allocate<X>(x.shape());
      copy(x, c);
      return c;
    }
  }

  /// Rows of training `logits` whose arg-max is the label.
  index_t count_correct(tensor_view<const S, D> logits, std::span<const std::int32_t> labels) {
    return train::count_correct(logits, labels, logits_f32_);
  }

  /// Forward FLOPs of a model's last forward (0 when it does not count them), and those of its
  /// backward (its backward_flops(), else twice the forward).
  template <class M>
  static double forward_flops(const M& m) {
    return static_cast<double>(nn::flops_of(m));
  }
  template <class M>
  static double backward_flops(const M& m) {
    if constexpr (requires { m.flops(); }) {
      return static_cast<double>(nn::backward_flops_of(m));
    } else {
      return 0.0;
    }
  }

  trainer_wording words_;
  nn::parameter_store<Policy>& store_;
  Optimizer& opt_;
  Scheduler sched_;
  Options o_;
  step_control<Policy> control_;
  generator gen_;                  // the trained model's dropout
  nn::arena<D> memory_;            // the trained model's activations and gradients of a micro-batch
  std::vector<float> logits_f32_;  // count_correct's float copy of the logits
  std::int64_t steps_ = 0;
  double flops_ = 0;               // FLOPs of the training steps so far

 private:
  using clock = std::chrono::steady_clock;
  static double nan() noexcept { return std::numeric_limits<double>::quiet_NaN(); }
  static double seconds_since(clock::time_point t0) { return std::chrono::duration<double>(clock::now() - t0).count(); }

  Derived& derived() noexcept { return static_cast<Derived&>(*this); }
  const Derived& derived() const noexcept { return static_cast<const Derived&>(*this); }

  static metrics metrics_of(const tally& t, double seconds, double flops) {
    metrics m;
    m.seconds = seconds;
    m.samples = t.counted;
    m.flops = flops;
    m.loss = t.loss();
    m.accuracy = t.accuracy();
    return m;
  }

  static std::vector<std::string> csv_columns(const std::vector<std::string>& train_terms) {
    std::vector<std::string> c{"step", "epoch", "lr", "train_loss"};
    for (const auto& t : train_terms) c.push_back("train_" + t);
    for (const char* n : {"train_acc", "eval_loss", "eval_acc", "samples_per_s", "loss_scale", "skipped_steps"}) c.emplace_back(n);
    return c;
  }

  std::string progress_text(const tally& t) const {
    char buf[160];
    std::snprintf(buf, sizeof buf, "loss %.4f acc %.4f lr %.3g", t.loss(), t.accuracy(), opt_.lr());
    return buf;
  }

  void print_epoch(int e, const run_summary& s, bool evaluated) const {
    std::fprintf(o_.out, "epoch %d/%d: train loss %.4f acc %.4f", e + 1, o_.epochs, s.last_train.loss, s.last_train.accuracy);
    if (evaluated) std::fprintf(o_.out, " | eval loss %.4f acc %.4f", s.last_eval.loss, s.last_eval.accuracy);
    std::fprintf(o_.out, " | %.1f s, %.0f samples/s, %.1f GFLOP/s", s.last_train.seconds, s.last_train.samples_per_second(),
                 s.last_train.gflops_per_second());
    if (control_.skipped_steps() > 0 || step_control<Policy>::scaled) {
      std::fprintf(o_.out, ", loss scale %g, %lld skipped", control_.loss_scale(), static_cast<long long>(control_.skipped_steps()));
    }
    std::fprintf(o_.out, "\n");
    std::fflush(o_.out);
  }

  void log_row(int epoch, double train_loss, std::span<const double> train_terms, double train_acc, double eval_loss,
               double eval_acc, double samples_per_s) {
    row_.assign({static_cast<double>(steps_), static_cast<double>(epoch + 1), opt_.lr(), train_loss});
    row_.insert(row_.end(), train_terms.begin(), train_terms.end());
    row_.insert(row_.end(), {train_acc, eval_loss, eval_acc, samples_per_s, control_.loss_scale(),
                             static_cast<double>(control_.skipped_steps())});
    csv_.row(row_);
  }

  std::size_t terms_;         // the loss's parts in the log
  csv_log csv_;
  std::vector<double> row_;   // log_row's values
};

}  // namespace trident::train
