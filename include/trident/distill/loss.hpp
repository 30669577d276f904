#pragma once
/// @file distill/loss.hpp
/// Hinton's knowledge-distillation loss (Hinton, Vinyals, Dean, "Distilling the Knowledge in a
/// Neural Network", 2015), fused with the student's cross-entropy on the true labels:
///
///   L = α · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)) + (1 − α) · CE(z_s, y),
///
/// averaged over the batch, z_s the student's and z_t the teacher's logits. The T² keeps the
/// soft term's gradient, α·T·(softmax(z_s/T) − softmax(z_t/T)), on the scale of the hard
/// term's as the temperature changes (the paper's section 2); as T → ∞ with zero-mean logits
/// the soft term tends to Σ (z_s − z_t)² / 2C, plain logit matching.
///
///   distill::hinton_loss<P> loss({.temperature = 4, .alpha = 0.9});
///   const double l = loss.forward(ctx, student_logits, teacher_logits, labels);
///   auto dlogits = loss.backward(ctx, loss_scale);
///
/// The teacher's logits may have another element type than the student's (an fp32 teacher
/// for a bf16 student): the second template parameter. A non-finite teacher logit is an error
/// naming its row and class (a broken teacher is not something to train on); a non-finite
/// student logit gives a non-finite loss, which the trainer treats as divergence or, under
/// fp16 loss scaling, as an overflow to skip.
///
/// The kernel is per device (distill/kernels.hpp); <trident/distill.hpp> brings in the CPU's.

#include <cmath>
#include <cstdint>
#include <span>
#include <string>

#include "../core/error.hpp"
#include "../core/policy.hpp"
#include "../core/tensor.hpp"
#include "../nn/module.hpp"
#include "kernels.hpp"

namespace trident::distill {

/// The two knobs of Hinton's loss.
struct hinton_options {
  double temperature = 4.0;  ///< T > 0: the softmax temperature of both models' soft targets
  double alpha = 0.9;        ///< α ∈ [0, 1]: the soft (distillation) term's weight; 1 − α on the labels
};

/// Hinton's distillation loss over (N, C) student and teacher logits and N labels.
/// @tparam Policy   the student's policy bundle (its logits and the gradient are its storage type)
/// @tparam TeacherS the element type of the teacher's logits (the student's by default)
template <policy_bundle Policy, class TeacherS = typename Policy::storage_type>
class hinton_loss {
 public:
  using S = typename Policy::storage_type;
  using D = typename Policy::device;

  explicit hinton_loss(hinton_options o = {}) : o_(o) {
    if (!(o.temperature > 0.0) || !std::isfinite(o.temperature)) {
      throw error("distill::hinton_loss: the temperature must be finite and > 0, got " + std::to_string(o.temperature));
    }
    if (!(o.alpha >= 0.0 && o.alpha <= 1.0)) {
      throw error("distill::hinton_loss: alpha must be in [0, 1], got " + std::to_string(o.alpha));
    }
  }

  /// The mean loss over the N rows. The teacher's logits must stay valid until backward (the
  /// trainer keeps them in the teacher's arena for the step). Labels are host memory, each in [0, C).
  double forward(nn::context<Policy>&, tensor_view<const S, D> student, tensor_view<const TeacherS, D> teacher,
                 std::span<const std::int32_t> labels) {
    check(student, teacher, labels);
    student_ = student;
    teacher_ = teacher;
    labels_ = labels;
    const hinton_sums s = distill_kernels<D>::hinton(tensor_view<S, D>{}, student, teacher, labels.data(), o_.temperature,
                                                     o_.alpha, 0.0);
    if (s.bad_row >= 0) {
      throw error("distill::hinton_loss: the teacher's logit at row " + std::to_string(s.bad_row) + ", class " +
                  std::to_string(s.bad_col) + " is " + std::to_string(s.bad_value) +
                  " (the teacher's logits must be finite; is the teacher broken or in the wrong precision?)");
    }
    const double n = static_cast<double>(count_);
    distillation_ = s.distillation / n;
    cross_entropy_ = s.cross_entropy / n;
    return o_.alpha * distillation_ + (1.0 - o_.alpha) * cross_entropy_;
  }

  /// d(loss_scale · mean loss)/d(student logits), (N, C), in this step's memory.
  tensor_view<S, D> backward(nn::context<Policy>& ctx, double loss_scale = 1.0) {
    if (count_ == 0) throw error("distill::hinton_loss::backward: no forward to take the gradient of");
    auto g = ctx.template allocate<S>(student_.shape());
    distill_kernels<D>::hinton(g, student_, teacher_, labels_.data(), o_.temperature, o_.alpha,
                               loss_scale / static_cast<double>(count_));
    return g;
  }

  /// Rows of the last forward.
  index_t count() const noexcept { return count_; }
  /// The last forward's mean soft term T²·KL(p_t^T ‖ p_s^T), before the weight α.
  double distillation_term() const noexcept { return distillation_; }
  /// The last forward's mean cross-entropy against the labels, before the weight 1 − α.
  double cross_entropy_term() const noexcept { return cross_entropy_; }
  const hinton_options& options() const noexcept { return o_; }

 private:
  void check(tensor_view<const S, D> student, tensor_view<const TeacherS, D> teacher, std::span<const std::int32_t> labels) {
    count_ = 0;
    if (student.rank() != 2 || student.size(0) == 0) {
      throw shape_error("distill::hinton_loss: the student's logits must be (N, C) with N >= 1, got " + student.shape().str());
    }
    if (teacher.shape() != student.shape()) {
      throw shape_error("distill::hinton_loss: the teacher's logits " + teacher.shape().str() +
                        " do not match the student's " + student.shape().str());
    }
    if (static_cast<index_t>(labels.size()) != student.size(0)) {
      throw shape_error("distill::hinton_loss: " + std::to_string(labels.size()) + " labels for logits " +
                        student.shape().str());
    }
    const index_t classes = student.size(1);
    for (std::size_t i = 0; i < labels.size(); ++i) {
      if (labels[i] < 0 || labels[i] >= classes) {
        throw error("distill::hinton_loss: label " + std::to_string(labels[i]) + " of row " + std::to_string(i) +
                    " is outside [0, " + std::to_string(classes) + ")");
      }
    }
    count_ = student.size(0);
  }

  hinton_options o_;
  tensor_view<const S, D> student_{};
  tensor_view<const TeacherS, D> teacher_{};
  std::span<const std::int32_t> labels_{};
  index_t count_ = 0;
  double distillation_ = 0, cross_entropy_ = 0;
};

}  // namespace trident::distill
