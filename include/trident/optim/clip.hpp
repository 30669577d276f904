#pragma once
/// @file optim/clip.hpp
/// Gradient clipping by global L2 norm, and overflow detection, over a parameter store's flat
/// gradient buffer.
///
/// A step with fp16 loss scaling and clipping, the way the pieces fit (one read of the
/// gradients for the norm, one fused optimizer pass that unscales and clips):
///
///     const auto gn = optim::grad_norm(store);                  // of the scaled gradients
///     const double scale = scaler.scale();                      // the scale backward used
///     if (scaler.update(!gn.finite, gn.finite ? "" : optim::first_nonfinite(store))) {
///       const double norm = gn.norm / scale;                    // the true gradient norm
///       opt.step(store, optim::clip_factor(norm, max_norm) / scale);
///       sched.step(opt);                                        // DeepSpeed skips it on overflow too
///     }
///     store.zero_grad();

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "optimizer.hpp"
#include "vec.hpp"

namespace trident::optim {

/// The global L2 norm of a store's gradients, and whether every gradient is finite.
struct grad_norm_result {
  double norm = 0;     ///< √(Σ g²), accumulated in double (inf or NaN when some g is not finite)
  bool finite = true;  ///< false when any gradient is inf or NaN (an fp16 overflow)
};

/// Σ g² over g[0, n) (gradients of type G, widened to float), accumulated in double; one
/// pass, threads splitting the range and their sums added in chunk order (deterministic for a
/// given thread count). Infinite or NaN exactly when some g is: a float's square cannot
/// overflow a double, nor can a sum of 2^63 of them.
template <class G>
double sum_of_squares(const G* grads, index_t n) {
  const int chunks = cpu_kernels::chunk_count(n, detail::min_chunk_elements);
  std::vector<double> partial(static_cast<std::size_t>(chunks), 0.0);
  cpu_kernels::parallel_chunks(n, detail::min_chunk_elements, detail::chunk_align_elements, [&](index_t b, index_t e, int chunk) {
    alignas(64) float buf[detail::block_elements];
    detail::vecf::dacc acc;
    detail::vec1::dacc tail;
    for (index_t i = b; i < e; i += detail::block_elements) {
      const index_t m = std::min(detail::block_elements, e - i);
      const float* g;
      if constexpr (std::is_same_v<G, float>) {
        g = grads + i;
      } else {
        simd::convert(grads + i, buf, static_cast<std::size_t>(m));
        g = buf;
      }
      detail::for_each_vector(m, [&]<class V>(V, index_t j) {
        if constexpr (V::width == 1) {
          tail.add_sq(V::load(g + j));
        } else {
          acc.add_sq(V::load(g + j));
        }
      });
    }
    double s = tail.sum();
    if constexpr (detail::vecf::width > 1) s += acc.sum();
    partial[static_cast<std::size_t>(chunk)] = s;
  });
  double sum = 0;
  for (double s : partial) sum += s;
  return sum;
}

/// One pass over the gradients: their global L2 norm (double accumulation, deterministic for a
/// given thread count) and whether all are finite. The norm is of the gradients as stored
/// (under loss scaling: of the scaled gradients; divide by the scale).
template <policy_bundle P>
grad_norm_result grad_norm(nn::parameter_store<P>& store) {
  static_assert(std::is_same_v<typename P::device, cpu>, "trident::optim::grad_norm: runs on the cpu device");
  if (!store.allocated()) throw error("optim::grad_norm: the parameter store is not allocated (call allocate() first)");
  const double sum = sum_of_squares(store.grads().data(), store.size());
  return {std::sqrt(sum), std::isfinite(sum)};
}

/// The factor torch.nn.utils.clip_grad_norm_ multiplies gradients by: max_norm / (norm + 1e-6),
/// clamped to at most 1. Pass it (divided by the loss scale) as the optimizer's grad_scale.
/// A NaN norm gives NaN and an infinite one 0, as in PyTorch: check grad_norm().finite first.
inline double clip_factor(double norm, double max_norm) {
  if (!(max_norm > 0) || !std::isfinite(max_norm)) {
    throw error("optim::clip_factor: max_norm must be finite and > 0, got " + detail::format_value(max_norm) +
                " (to disable clipping, pass a grad_scale of 1 / loss scale)");
  }
  if (std::isnan(norm)) return norm;
  return std::min(1.0, max_norm / (norm + 1e-6));
}

/// The index (in declaration order) of the first tensor of `store` with a non-finite value
/// in the flat range [begin, end), read from `grads`, which holds that range (grads[k] is flat
/// element begin + k: the store's own buffer offset by begin, or a rank's gradient shard);
/// -1 when every value is finite.
template <policy_bundle P>
int first_nonfinite_tensor(const nn::parameter_store<P>& store, const typename P::gradient_type* grads, index_t begin, index_t end) {
  using G = typename P::gradient_type;
  const auto& infos = store.infos();
  for (std::size_t t = 0; t < infos.size(); ++t) {
    const index_t lo = std::max(begin, infos[t].offset), hi = std::min(end, infos[t].offset + infos[t].numel());
    for (index_t i = lo; i < hi; ++i) {
      const G x = grads[i - begin];
      bool bad;
      if constexpr (std::is_same_v<G, float> || std::is_same_v<G, double>) {
        bad = !std::isfinite(x);
      } else {
        using trident::isfinite;
        bad = !isfinite(x);
      }
      if (bad) return static_cast<int>(t);
    }
  }
  return -1;
}

/// The name of the first tensor (in declaration order) with a non-finite gradient, or "" when
/// every gradient is finite. For error messages after grad_norm() reported an overflow.
template <policy_bundle P>
std::string first_nonfinite(nn::parameter_store<P>& store) {
  static_assert(std::is_same_v<typename P::device, cpu>, "trident::optim::first_nonfinite: runs on the cpu device");
  if (!store.allocated()) throw error("optim::first_nonfinite: the parameter store is not allocated (call allocate() first)");
  const int t = first_nonfinite_tensor(store, store.grads().data(), 0, store.size());
  return t < 0 ? std::string() : store.infos()[static_cast<std::size_t>(t)].name;
}

}  // namespace trident::optim
