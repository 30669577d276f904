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
///
/// The epoch loop, fit(), the step over micro-batches, the evaluation loop and the summary are
/// train/trainer_base.hpp's, shared with distill::trainer; this file is the cross-entropy's
/// micro-batch and evaluation.

#include <cstdint>
#include <span>
#include <utility>

#include "../core/error.hpp"
#include "../core/policy.hpp"
#include "../core/tensor.hpp"
#include "../nn/loss.hpp"
#include "../nn/module.hpp"
#include "../nn/parameters.hpp"
#include "trainer_base.hpp"

namespace trident::train {

/// How a run goes (train/trainer_base.hpp): the loss field is the cross-entropy's label
/// smoothing and ignore index.
using trainer_options = basic_trainer_options<nn::cross_entropy_options>;

/// One optimizer step on one global batch.
struct batch_result {
  double loss = 0;      ///< mean loss of the batch (unscaled)
  index_t correct = 0;  ///< rows whose arg-max logit is the label
  index_t counted = 0;  ///< rows not ignored
  step_outcome step{};
};

/// The trainer.
/// @tparam Policy    the model's policy bundle
/// @tparam Model     a module of Policy producing (N, classes) logits
/// @tparam Optimizer an optimizer with step(store, grad_scale), lr() and set_lr()
/// @tparam Scheduler anything with step(optimizer) (sched::warmup_lr, ..., constant_lr)
template <policy_bundle Policy, class Model, class Optimizer, class Scheduler = constant_lr>
class trainer : public trainer_base<trainer<Policy, Model, Optimizer, Scheduler>, Policy, Optimizer, Scheduler, trainer_options> {
  using base = trainer_base<trainer, Policy, Optimizer, Scheduler, trainer_options>;

 public:
  using S = typename Policy::storage_type;
  using D = typename Policy::device;

  trainer(Model& model, nn::parameter_store<Policy>& store, Optimizer& opt, trainer_options o = {}, Scheduler sched = {})
      : base(trainer_wording{}, store, opt, std::move(o), std::move(sched)), model_(model), loss_(this->o_.loss) {}

  /// One optimizer step on a global batch x (N, ...) with labels: split into
  /// gradient_accumulation_steps micro-batches, forward and backward each (gradients of the
  /// mean loss over the whole batch), then the step (skipped on fp16 overflow; the scheduler
  /// steps only when it is applied).
  batch_result train_batch(tensor_view<const S, D> x, std::span<const std::int32_t> labels) {
    batch_result r;
    for (const std::int32_t y : labels) r.counted += y != this->o_.loss.ignore_index;
    double loss_sum = 0;
    r.step = this->train_step(x, labels, [&](nn::context<Policy>& ctx, index_t m, tensor_view<const S, D> xm,
                                             std::span<const std::int32_t> ym, double scale) {
      auto logits = model_.forward(ctx, xm);
      const double l = loss_.forward(ctx, logits, ym);
      const index_t c = loss_.count();
      this->check_loss(l, m);
      loss_sum += l * static_cast<double>(c);
      r.correct += this->count_correct(logits, ym);
      this->flops_ += this->forward_flops(model_) + this->backward_flops(model_);
      if (r.counted > 0) {
        auto dlogits = loss_.backward(ctx, scale * static_cast<double>(c) / static_cast<double>(r.counted));
        model_.backward(ctx, dlogits);
      }
    });
    r.loss = r.counted ? loss_sum / static_cast<double>(r.counted) : 0.0;
    return r;
  }

  /// Loss and accuracy of the model in eval mode (no dropout, running statistics) over one
  /// pass of `loader` (its epoch 0 order).
  template <class Loader>
  metrics evaluate(Loader& loader) {
    return this->template evaluate_model<Policy>(model_, this->memory_, loss_, loader, &this->gen_);
  }

 private:
  Model& model_;
  nn::softmax_cross_entropy<Policy> loss_;
};

}  // namespace trident::train
