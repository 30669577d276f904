#pragma once
/// @file distill/kernels.hpp
/// The kernel of knowledge distillation, as a per-device table that a backend specialises
/// (distill/cpu_kernels.hpp for the CPU), in the way nn/kernels.hpp declares nn_kernels.
///
/// distill_kernels<D> provides:
///   hinton(grad, student, teacher, labels, temperature, alpha, grad_scale) -> hinton_sums
///       student (N, C) and teacher (N, C) logits, labels N int32 class indices in host-visible
///       memory (already checked to lie in [0, C)). Returns the summed per-row terms
///       T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) and CE(z_s, y) and the first non-finite teacher
///       logit, if any (its row is then skipped). grad (N, C) or empty: grad_scale times
///       α·T·(softmax(z_s/T) − softmax(z_t/T)) + (1 − α)·(softmax(z_s) − onehot(y)) per row,
///       the caller folding 1/N into grad_scale.

#include "../core/shape.hpp"
#include "../precision/policy.hpp"

namespace trident::distill {

/// Per-batch sums of the two terms of Hinton's loss, and where the teacher went wrong.
struct hinton_sums {
  double distillation = 0;  ///< Σ over rows of T²·KL(p_t^T ‖ p_s^T)
  double cross_entropy = 0;  ///< Σ over rows of −log softmax(z_s)[y]
  index_t bad_row = -1;      ///< first row (then column) whose teacher logit is not finite; -1: none
  index_t bad_col = -1;
  double bad_value = 0;      ///< that logit
};

/// Primary template: no backend in this translation unit.
template <class Device>
struct distill_kernels {
  static_assert(detail::dependent_false<Device>,
                "trident::distill::distill_kernels<Device>: no backend implements the distillation kernels for this "
                "device in this translation unit (include <trident/distill.hpp>)");
};

}  // namespace trident::distill
