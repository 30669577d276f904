#pragma once
/// @file nn/kernels.hpp
/// The kernels neural-network modules need beyond the tensor ops of core/kernels.hpp, as a
/// second per-device table that each backend specialises (backend/cpu/nn_kernels.hpp).
///
/// nn_kernels<D> provides, for element types T (storage) and float/double statistics:
///   softmax_xent(grad, logits, labels, ignore_index, smoothing, grad_scale) -> loss sum (double)
///       logits (N, C); labels: N int32 class indices in host-visible memory; grad (N, C) or
///       empty: d(loss)/d(logits) * grad_scale, for the mean being taken by the caller.
///   dropout(out, in, spec, p)     out = in * keep / (1 - p), keep = (uniform(spec, i) >= p)
///   layer_norm_forward(y, mean, rstd, x, gamma, beta, eps)          over the last axis
///   layer_norm_backward(dx, dgamma, dbeta, dy, x, mean, rstd, gamma) dgamma/dbeta accumulate
///   embedding_forward(y, weight, ids, pos, period)   y[r] = weight[ids[r]] (+ pos[r % period])
///   embedding_backward(dweight, ids, dy, dpos, period) the scatter-add, deterministic
///   attention_forward(y, lse, qkv, heads, scale, dropout, spec)     fused causal attention
///   attention_backward(dqkv, qkv, y, dy, lse, heads, scale, dropout, spec)

#include "../precision/policy.hpp"

namespace trident::nn {

/// Primary template: no backend in this translation unit.
template <class Device>
struct nn_kernels {
  static_assert(detail::dependent_false<Device>,
                "trident::nn::nn_kernels<Device>: no backend implements the neural-network kernels for this device "
                "in this translation unit");
};

}  // namespace trident::nn
