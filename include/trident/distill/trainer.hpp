#pragma once
/// @file distill/trainer.hpp
/// A teacher–student trainer: the student trains on Hinton's loss (distill/loss.hpp) against
/// the logits of a fixed teacher, with the options of train::trainer (gradient accumulation,
/// loss scaling and clipping through train::step_control, a scheduler stepped after every
/// applied step, a progress bar, a CSV log, a summary).
///
///   distill::trainer<P, decltype(student), decltype(teacher), optim::adamw> t(
///       student, student_store, teacher, opt, {.epochs = 5, .loss = {.temperature = 4, .alpha = 0.9}});
///   t.fit(train_loader, &test_loader);
///
/// A separate class rather than a mode of train::trainer: the loss takes a second input, the
/// step runs a second model, and the log has two more columns; the pieces that do not change
/// (step_control, count_correct, csv_log, progress_bar, the metrics and summary types) are
/// train::'s own.
///
/// The teacher is anything with forward(ctx, x) → (N, C) logits for a context of its policy
/// (a model of nn modules, a quantized model, a model of another precision: TeacherPolicy,
/// whose device must be the student's). It runs in inference mode: an eval context (no
/// dropout, running statistics, no generator), never a backward, so no gradient of it is
/// computed or kept; its forward runs in an arena of its own, reset before each micro-batch,
/// so what it holds is one eval forward of one micro-batch, whose logits the loss reads until
/// the student's backward. Its parameters are not touched (an optimizer only sees the
/// student's store).
///
/// Loss and accuracy of training are the Hinton loss and the student's arg-max accuracy;
/// evaluate() gives the student's plain cross-entropy and accuracy on its own, which is what
/// the student will be used for (evaluate_teacher() the teacher's).

#include <algorithm>
#include <chrono>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
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
#include "../train/csv_log.hpp"
#include "../train/memory.hpp"
#include "../train/progress.hpp"
#include "../train/step.hpp"
#include "../train/trainer.hpp"
#include "loss.hpp"

namespace trident::distill {

/// A model that can teach a student of the same device: forward(ctx, x) in a context of
/// TeacherPolicy gives the logits. Backward is never called.
template <class T, class TeacherPolicy>
concept teacher_module =
    requires(T& t, nn::context<TeacherPolicy>& ctx,
             tensor_view<const typename TeacherPolicy::storage_type, typename TeacherPolicy::device> x) {
      { t.forward(ctx, x) } -> std::convertible_to<tensor_view<const typename TeacherPolicy::storage_type, typename TeacherPolicy::device>>;
    };

/// How a distillation run goes: train::trainer_options with Hinton's loss in place of the
/// cross-entropy's options.
struct trainer_options {
  int epochs = 1;
  int gradient_accumulation_steps = 1;  ///< micro-batches per optimizer step (each batch is split)
  train::step_options step{};           ///< clipping and (fp16) loss scaling
  hinton_options loss{};                ///< temperature and α
  std::uint64_t seed = 0;               ///< the student's dropout generator
  std::string csv_path{};               ///< "" = no CSV log
  std::int64_t log_every = 50;          ///< optimizer steps between CSV rows
  bool progress = true;                 ///< the progress bar (stderr)
  std::FILE* out = stdout;              ///< epoch lines and the summary; nullptr = silent
};

/// One optimizer step of the student on one global batch.
struct batch_result {
  double loss = 0;           ///< mean Hinton loss of the batch (unscaled)
  double distillation = 0;   ///< its mean soft term T²·KL, before α
  double cross_entropy = 0;  ///< its mean cross-entropy on the labels, before 1 − α
  index_t correct = 0;       ///< rows whose arg-max student logit is the label
  index_t counted = 0;       ///< rows
  train::step_outcome step{};
};

/// The teacher–student trainer.
/// @tparam Policy        the student's policy bundle
/// @tparam Student       a module of Policy producing (N, classes) logits
/// @tparam Teacher       a teacher_module of TeacherPolicy producing (N, classes) logits
/// @tparam Optimizer     an optimizer with step(store, grad_scale), lr() and set_lr()
/// @tparam Scheduler     anything with step(optimizer) (sched::warmup_lr, ..., train::constant_lr)
/// @tparam TeacherPolicy the teacher's policy bundle (the student's by default); same device
template <policy_bundle Policy, class Student, class Teacher, class Optimizer, class Scheduler = train::constant_lr,
          policy_bundle TeacherPolicy = Policy>
class trainer {
 public:
  using S = typename Policy::storage_type;
  using D = typename Policy::device;
  using TS = typename TeacherPolicy::storage_type;
  static_assert(std::is_same_v<D, typename TeacherPolicy::device>,
                "trident::distill::trainer: the teacher's policy must have the student's device");
  static_assert(nn::module<Student, Policy>,
                "trident::distill::trainer: Student must be a module of Policy (forward and backward)");
  static_assert(teacher_module<Teacher, TeacherPolicy>,
                "trident::distill::trainer: Teacher must have forward(nn::context<TeacherPolicy>&, x) giving logits "
                "of TeacherPolicy's storage type");

  trainer(Student& student, nn::parameter_store<Policy>& store, Teacher& teacher, Optimizer& opt, trainer_options o = {},
          Scheduler sched = {})
      : student_(student), store_(store), teacher_(teacher), opt_(opt), sched_(std::move(sched)), o_(std::move(o)),
        control_(o_.step), loss_(o_.loss), gen_(o_.seed) {
    if (o_.epochs < 0) throw error("distill::trainer: epochs must be >= 0, got " + std::to_string(o_.epochs));
    if (o_.gradient_accumulation_steps < 1) {
      throw error("distill::trainer: gradient_accumulation_steps must be >= 1, got " +
                  std::to_string(o_.gradient_accumulation_steps));
    }
    if (o_.log_every < 1) throw error("distill::trainer: log_every must be >= 1, got " + std::to_string(o_.log_every));
    if (!store_.allocated()) {
      throw error("distill::trainer: the student's parameter store is not allocated (call allocate() and init first)");
    }
  }

  /// One optimizer step of the student on a global batch x (N, ...) with labels: split into
  /// gradient_accumulation_steps micro-batches; for each, the teacher's logits (inference),
  /// the student's forward, Hinton's loss and the student's backward (gradients of the mean
  /// loss over the whole batch); then the step (skipped on fp16 overflow; the scheduler steps
  /// only when it is applied).
  batch_result train_batch(tensor_view<const S, D> x, std::span<const std::int32_t> labels) {
    const index_t n = x.rank() > 0 ? x.size(0) : 0;
    if (n == 0 || static_cast<index_t>(labels.size()) != n) {
      throw shape_error("distill::trainer::train_batch: inputs " + x.shape().str() + " with " + std::to_string(labels.size()) +
                        " labels (need N >= 1 of each)");
    }
    const index_t k = std::min<index_t>(o_.gradient_accumulation_steps, n);
    batch_result r;
    r.counted = n;
    store_.zero_grad();
    const double scale = control_.loss_scale();
    double loss_sum = 0, kd_sum = 0, ce_sum = 0;
    for (index_t m = 0; m < k; ++m) {
      const index_t b = n * m / k, e = n * (m + 1) / k;
      const auto xm = x.slice(0, b, e);
      const auto ym = labels.subspan(static_cast<std::size_t>(b), static_cast<std::size_t>(e - b));
      const auto teacher_logits = teacher_logits_of(xm);
      memory_.reset();
      nn::context<Policy> ctx{memory_, true, &gen_};
      auto logits = student_.forward(ctx, xm);
      const double l = loss_.forward(ctx, logits, teacher_logits, ym);
      if (!std::isfinite(l) && !train::step_control<Policy>::scaled) {
        throw error("distill::trainer: the loss is " + std::to_string(l) + " at step " + std::to_string(steps_) +
                    " (micro-batch " + std::to_string(m) + "): the run diverged; lower the learning rate or clip gradients");
      }
      const double c = static_cast<double>(e - b);
      loss_sum += l * c;
      kd_sum += loss_.distillation_term() * c;
      ce_sum += loss_.cross_entropy_term() * c;
      r.correct += train::count_correct(tensor_view<const S, D>(logits), ym, logits_f32_);
      flops_ += model_flops(student_) + model_backward_flops(student_) + model_flops(teacher_);
      auto dlogits = loss_.backward(ctx, scale * c / static_cast<double>(n));
      student_.backward(ctx, dlogits);
    }
    const double dn = static_cast<double>(n);
    r.loss = loss_sum / dn;
    r.distillation = kd_sum / dn;
    r.cross_entropy = ce_sum / dn;
    r.step = control_.step(store_, opt_);
    if (r.step.applied) sched_.step(opt_);
    ++steps_;
    return r;
  }

  /// The student's own loss (plain cross-entropy on the labels) and accuracy in eval mode over
  /// one pass of `loader` (its epoch 0 order).
  template <class Loader>
  train::metrics evaluate(Loader& loader) {
    return evaluate_model<Policy>(student_, memory_, loader);
  }

  /// The same for the teacher (its inputs converted to its storage type when that differs).
  template <class Loader>
  train::metrics evaluate_teacher(Loader& loader) {
    return evaluate_model<TeacherPolicy>(teacher_, teacher_memory_, loader);
  }

  /// One epoch over `loader` (its epoch-e order), with the progress bar and CSV rows.
  template <class Loader>
  train::metrics train_epoch(Loader& loader, int epoch) {
    train::metrics m;
    const auto t0 = clock::now();
    const double flops0 = flops_;
    const index_t batches = loader.batches_per_epoch();
    train::progress_bar bar(static_cast<long long>(batches), "samples", stderr);
    double loss_sum = 0;
    window w;
    index_t counted = 0, correct = 0, done = 0;
    for (const auto& b : loader.epoch(static_cast<std::uint64_t>(epoch))) {
      const auto r = train_batch(b.inputs, b.labels);
      const double c = static_cast<double>(r.counted);
      loss_sum += r.loss * c;
      counted += r.counted;
      correct += r.correct;
      w.loss += r.loss * c;
      w.distillation += r.distillation * c;
      w.cross_entropy += r.cross_entropy * c;
      w.counted += r.counted;
      w.correct += r.correct;
      ++done;
      if (steps_ % o_.log_every == 0 && w.counted > 0) {
        const double wc = static_cast<double>(w.counted);
        log_row(epoch, w.loss / wc, w.distillation / wc, w.cross_entropy / wc, static_cast<double>(w.correct) / wc, nan(),
                nan(), static_cast<double>(counted) / seconds_since(t0));
        w = {};
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

  /// options().epochs epochs of distillation, each followed by an evaluation of the student on
  /// `eval` (when given), with a line per epoch and a summary at the end.
  template <class Loader, class EvalLoader = Loader>
  train::run_summary fit(Loader& train, EvalLoader* eval = nullptr) {
    train::run_summary s;
    if (o_.out) {
      std::fprintf(o_.out,
                   "distilling into %lld parameters (%s) for %d epochs of %lld steps, temperature %g, alpha %g, "
                   "teacher in %s, %s\n",
                   static_cast<long long>(store_.count()), Policy::traits::name, o_.epochs,
                   static_cast<long long>(train.batches_per_epoch()), o_.loss.temperature, o_.loss.alpha,
                   TeacherPolicy::traits::name, control_.describe().c_str());
    }
    for (int e = 0; e < o_.epochs; ++e) {
      s.last_train = train_epoch(train, e);
      s.train_seconds += s.last_train.seconds;
      s.train_samples += static_cast<double>(s.last_train.samples);
      s.train_flops += s.last_train.flops;
      if (eval) {
        s.last_eval = evaluate(*eval);
        log_row(e, nan(), nan(), nan(), nan(), s.last_eval.loss, s.last_eval.accuracy, s.last_train.samples_per_second());
      }
      if (o_.out) {
        std::fprintf(o_.out, "epoch %d/%d: train loss %.4f acc %.4f", e + 1, o_.epochs, s.last_train.loss,
                     s.last_train.accuracy);
        if (eval) std::fprintf(o_.out, " | eval loss %.4f acc %.4f", s.last_eval.loss, s.last_eval.accuracy);
        std::fprintf(o_.out, " | %.1f s, %.0f samples/s, %.1f GFLOP/s", s.last_train.seconds,
                     s.last_train.samples_per_second(), s.last_train.gflops_per_second());
        if (control_.skipped_steps() > 0 || train::step_control<Policy>::scaled) {
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

  /// Bytes held now, by role: the student's store and optimizer state; activations are the
  /// student's arena and the teacher's together (the teacher's parameters are its own affair).
  train::memory_breakdown memory() {
    train::memory_breakdown b;
    b.parameters = store_.bytes();
    if constexpr (requires { opt_.state_tensors(); }) {
      for (const auto& st : opt_.state_tensors()) b.optimizer_state += static_cast<std::size_t>(st.values.numel()) * sizeof(float);
    }
    b.activations = memory_.capacity_bytes() + teacher_memory_.capacity_bytes();
    b.peak_resident = train::peak_resident_bytes();
    return b;
  }

  /// Prints the run's totals and the memory breakdown.
  void print_summary(const train::run_summary& s) const {
    const auto mib = [](std::size_t b) { return static_cast<double>(b) / (1024.0 * 1024.0); };
    std::fprintf(o_.out,
                 "summary: %lld steps (%lld skipped), %.1f s training, %.0f samples/s, %.1f GFLOP/s achieved (teacher "
                 "forward included)\n",
                 static_cast<long long>(s.steps), static_cast<long long>(s.skipped_steps), s.train_seconds,
                 s.samples_per_second(), s.gflops_per_second());
    std::fprintf(o_.out,
                 "memory: student parameters+gradients+master %.2f MiB, optimizer state %.2f MiB, activations (student "
                 "and teacher) %.2f MiB (accounted %.2f MiB); peak resident %.2f MiB\n",
                 mib(s.memory.parameters), mib(s.memory.optimizer_state), mib(s.memory.activations), mib(s.memory.accounted()),
                 mib(s.memory.peak_resident));
    std::fflush(o_.out);
  }

  double lr() const { return opt_.lr(); }
  std::int64_t steps() const noexcept { return steps_; }
  train::step_control<Policy>& control() noexcept { return control_; }
  Scheduler& scheduler() noexcept { return sched_; }
  hinton_loss<Policy, TS>& loss() noexcept { return loss_; }
  nn::arena<D>& activations() noexcept { return memory_; }
  nn::arena<D>& teacher_activations() noexcept { return teacher_memory_; }
  const trainer_options& options() const noexcept { return o_; }

 private:
  using clock = std::chrono::steady_clock;
  struct window {
    double loss = 0, distillation = 0, cross_entropy = 0;
    index_t counted = 0, correct = 0;
  };
  static double nan() noexcept { return std::numeric_limits<double>::quiet_NaN(); }
  static double seconds_since(clock::time_point t0) { return std::chrono::duration<double>(clock::now() - t0).count(); }

  template <class M>
  static double model_flops(const M& m) {
    return static_cast<double>(nn::flops_of(m));
  }
  template <class M>
  static double model_backward_flops(const M& m) {
    if constexpr (requires { m.flops(); }) {
      return static_cast<double>(nn::backward_flops_of(m));
    } else {
      return 0.0;
    }
  }

  /// The teacher's logits for a micro-batch, in its own arena (reset here), in eval mode.
  tensor_view<const TS, D> teacher_logits_of(tensor_view<const S, D> x) {
    teacher_memory_.reset();
    nn::context<TeacherPolicy> tctx{teacher_memory_, false, nullptr};
    return teacher_.forward(tctx, teacher_input(tctx, x));
  }

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
  tensor_view<const TS, D> teacher_input(nn::context<TeacherPolicy>& ctx, tensor_view<const S, D> x) {
    return input_for<TeacherPolicy>(ctx, x);
  }

  template <class TP, class M, class Loader>
  train::metrics evaluate_model(M& model, nn::arena<D>& mem, Loader& loader) {
    using X = typename TP::storage_type;
    train::metrics m;
    const auto t0 = clock::now();
    nn::softmax_cross_entropy<TP> ce;
    double loss_sum = 0, flops = 0;
    index_t counted = 0, correct = 0;
    for (const auto& b : loader.epoch(0)) {
      mem.reset();
      nn::context<TP> ctx{mem, false, nullptr};
      const tensor_view<const X, D> logits = model.forward(ctx, input_for<TP>(ctx, b.inputs));
      const double l = ce.forward(ctx, logits, b.labels);
      loss_sum += l * static_cast<double>(ce.count());
      counted += ce.count();
      correct += train::count_correct(logits, b.labels, logits_f32_);
      flops += model_flops(model);
    }
    m.seconds = seconds_since(t0);
    m.samples = counted;
    m.flops = flops;
    m.loss = counted ? loss_sum / static_cast<double>(counted) : nan();
    m.accuracy = counted ? static_cast<double>(correct) / static_cast<double>(counted) : nan();
    return m;
  }

  std::string progress_text(double loss_sum, index_t counted, index_t correct) const {
    char buf[160];
    std::snprintf(buf, sizeof buf, "loss %.4f acc %.4f lr %.3g", counted ? loss_sum / static_cast<double>(counted) : nan(),
                  counted ? static_cast<double>(correct) / static_cast<double>(counted) : nan(), opt_.lr());
    return buf;
  }

  void log_row(int epoch, double train_loss, double train_kd, double train_ce, double train_acc, double eval_loss,
               double eval_acc, double samples_per_s) {
    csv_.row({static_cast<double>(steps_), static_cast<double>(epoch + 1), opt_.lr(), train_loss, train_kd, train_ce,
              train_acc, eval_loss, eval_acc, samples_per_s, control_.loss_scale(),
              static_cast<double>(control_.skipped_steps())});
  }

  Student& student_;
  nn::parameter_store<Policy>& store_;
  Teacher& teacher_;
  Optimizer& opt_;
  Scheduler sched_;
  trainer_options o_;
  train::step_control<Policy> control_;
  hinton_loss<Policy, TS> loss_;
  generator gen_;
  nn::arena<D> memory_;          // the student's activations and gradients of a micro-batch
  nn::arena<D> teacher_memory_;  // one eval forward of the teacher
  train::csv_log csv_{o_.csv_path,
                      {"step", "epoch", "lr", "train_loss", "train_distillation", "train_cross_entropy", "train_acc",
                       "eval_loss", "eval_acc", "samples_per_s", "loss_scale", "skipped_steps"}};
  std::vector<float> logits_f32_;  // count_correct's float copy of the logits
  std::int64_t steps_ = 0;
  double flops_ = 0;
};

}  // namespace trident::distill
