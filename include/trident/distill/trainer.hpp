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
/// step runs a second model, and the log has two more columns. What does not change (the epoch
/// loop, fit(), the step over micro-batches, the evaluation loop, the summary, the metrics and
/// summary types) is train::trainer_base's (train/trainer_base.hpp), which both derive from.
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

#include <array>
#include <concepts>
#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <type_traits>
#include <utility>

#include "../core/error.hpp"
#include "../core/policy.hpp"
#include "../core/tensor.hpp"
#include "../nn/arena.hpp"
#include "../nn/loss.hpp"
#include "../nn/module.hpp"
#include "../nn/parameters.hpp"
#include "../train/trainer_base.hpp"
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

/// How a distillation run goes: train::trainer_options with Hinton's loss (temperature and α)
/// in place of the cross-entropy's options; the seed is the student's dropout generator's.
using trainer_options = train::basic_trainer_options<hinton_options>;

/// One optimizer step of the student on one global batch.
struct batch_result {
  double loss = 0;           ///< mean Hinton loss of the batch (unscaled)
  double distillation = 0;   ///< its mean soft term T²·KL, before α
  double cross_entropy = 0;  ///< its mean cross-entropy on the labels, before 1 − α
  index_t correct = 0;       ///< rows whose arg-max student logit is the label
  index_t counted = 0;       ///< rows
  train::step_outcome step{};
};

namespace detail {
/// distill::trainer's words in errors and logs.
inline constexpr train::trainer_wording trainer_words{
    .name = "distill::trainer",
    .store = "the student's parameter store",
    .verb = "distilling into",
    .parameters = "student parameters+gradients+master",
    .activations = "activations (student and teacher)",
    .flops_note = " (teacher forward included)",
};
}  // namespace detail

/// The teacher–student trainer.
/// @tparam Policy        the student's policy bundle
/// @tparam Student       a module of Policy producing (N, classes) logits
/// @tparam Teacher       a teacher_module of TeacherPolicy producing (N, classes) logits
/// @tparam Optimizer     an optimizer with step(store, grad_scale), lr() and set_lr()
/// @tparam Scheduler     anything with step(optimizer) (sched::warmup_lr, ..., train::constant_lr)
/// @tparam TeacherPolicy the teacher's policy bundle (the student's by default); same device
template <policy_bundle Policy, class Student, class Teacher, class Optimizer, class Scheduler = train::constant_lr,
          policy_bundle TeacherPolicy = Policy>
class trainer : public train::trainer_base<trainer<Policy, Student, Teacher, Optimizer, Scheduler, TeacherPolicy>, Policy,
                                           Optimizer, Scheduler, trainer_options> {
  using base = train::trainer_base<trainer, Policy, Optimizer, Scheduler, trainer_options>;
  friend base;

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
      : base(detail::trainer_words, store, opt, std::move(o), std::move(sched), {"distillation", "cross_entropy"}),
        student_(student), teacher_(teacher), loss_(this->o_.loss) {}

  /// One optimizer step of the student on a global batch x (N, ...) with labels: split into
  /// gradient_accumulation_steps micro-batches; for each, the teacher's logits (inference),
  /// the student's forward, Hinton's loss and the student's backward (gradients of the mean
  /// loss over the whole batch); then the step (skipped on fp16 overflow; the scheduler steps
  /// only when it is applied).
  batch_result train_batch(tensor_view<const S, D> x, std::span<const std::int32_t> labels) {
    const auto n = static_cast<double>(labels.size());
    batch_result r;
    double loss_sum = 0, kd_sum = 0, ce_sum = 0;
    r.step = this->train_step(x, labels, [&](nn::context<Policy>& ctx, index_t m, tensor_view<const S, D> xm,
                                             std::span<const std::int32_t> ym, double scale) {
      const auto teacher_logits = teacher_logits_of(xm);
      auto logits = student_.forward(ctx, xm);
      const double l = loss_.forward(ctx, logits, teacher_logits, ym);
      this->check_loss(l, m);
      const auto c = static_cast<double>(ym.size());
      loss_sum += l * c;
      kd_sum += loss_.distillation_term() * c;
      ce_sum += loss_.cross_entropy_term() * c;
      r.correct += this->count_correct(logits, ym);
      this->flops_ += this->forward_flops(student_) + this->backward_flops(student_) + this->forward_flops(teacher_);
      auto dlogits = loss_.backward(ctx, scale * c / n);
      student_.backward(ctx, dlogits);
    });
    r.counted = static_cast<index_t>(labels.size());
    r.loss = loss_sum / n;
    r.distillation = kd_sum / n;
    r.cross_entropy = ce_sum / n;
    return r;
  }

  /// The student's own loss (plain cross-entropy on the labels) and accuracy in eval mode over
  /// one pass of `loader` (its epoch 0 order).
  template <class Loader>
  train::metrics evaluate(Loader& loader) {
    nn::softmax_cross_entropy<Policy> ce;
    return this->template evaluate_model<Policy>(student_, this->memory_, ce, loader, nullptr);
  }

  /// The same for the teacher (its inputs converted to its storage type when that differs).
  template <class Loader>
  train::metrics evaluate_teacher(Loader& loader) {
    nn::softmax_cross_entropy<TeacherPolicy> ce;
    return this->template evaluate_model<TeacherPolicy>(teacher_, teacher_memory_, ce, loader, nullptr);
  }

  /// Bytes held now, by role: the student's store and optimizer state; activations are the
  /// student's arena and the teacher's together (the teacher's parameters are its own affair).
  train::memory_breakdown memory() {
    auto b = base::memory();
    b.activations += teacher_memory_.capacity_bytes();
    return b;
  }

  hinton_loss<Policy, TS>& loss() noexcept { return loss_; }
  nn::arena<D>& teacher_activations() noexcept { return teacher_memory_; }

 private:
  /// The loss's parts logged beside it, as named to the base.
  static std::array<double, 2> train_terms_of(const batch_result& r) noexcept { return {r.distillation, r.cross_entropy}; }

  /// fit()'s opening line: the loss's settings and the teacher's precision.
  std::string run_details() const {
    char buf[160];
    std::snprintf(buf, sizeof buf, "temperature %g, alpha %g, teacher in %s, ", this->o_.loss.temperature, this->o_.loss.alpha,
                  TeacherPolicy::traits::name);
    return buf;
  }

  /// The teacher's logits for a micro-batch, in its own arena (reset here), in eval mode.
  tensor_view<const TS, D> teacher_logits_of(tensor_view<const S, D> x) {
    teacher_memory_.reset();
    nn::context<TeacherPolicy> tctx{teacher_memory_, false, nullptr};
    return teacher_.forward(tctx, this->template input_for<TeacherPolicy>(tctx, x));
  }

  Student& student_;
  Teacher& teacher_;
  hinton_loss<Policy, TS> loss_;
  nn::arena<D> teacher_memory_;  // one eval forward of the teacher
};

}  // namespace trident::distill
