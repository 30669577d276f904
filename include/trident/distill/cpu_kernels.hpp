#pragma once
/// @file distill/cpu_kernels.hpp
/// distill_kernels<cpu>: Hinton's distillation loss on the CPU, fused: one pass over each row
/// of the student's and the teacher's logits gives both terms of the loss and, when asked, the
/// gradient. Rows are spread over threads; per-thread partial sums are merged in thread order,
/// so results do not depend on scheduling.
///
/// Numerics: every softmax is max-shifted, and the KL divergence is taken between the shifted
/// log-probabilities, so large logits, or a temperature far from 1, neither overflow nor lose
/// the terms to cancellation. Three exponentials per logit (student at 1 and at T, teacher at
/// T); two when T = 1.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../backend/cpu/device.hpp"
#include "../backend/cpu/kernels.hpp"
#include "../backend/cpu/parallel.hpp"
#include "../core/tensor.hpp"
#include "kernels.hpp"

namespace trident::distill {

template <>
struct distill_kernels<cpu> {
  template <class T>
  using view = tensor_view<T, cpu>;

  /// See distill/kernels.hpp. T: the student's element type, U: the teacher's, G: the gradient's.
  template <class T, class U, class G>
  static hinton_sums hinton(view<G> grad, view<const T> student, view<const U> teacher, const std::int32_t* labels,
                            double temperature, double alpha, double grad_scale) {
    using C = cpu_kernels::compute_of<T, U, G>;
    const index_t rows = student.size(0), classes = student.size(1);
    const bool want_grad = !grad.empty();
    const T* sd = student.data();
    const U* td = teacher.data();
    const index_t ss0 = student.stride(0), ss1 = student.stride(1);
    const index_t ts0 = teacher.stride(0), ts1 = teacher.stride(1);
    G* gd = want_grad ? grad.data() : nullptr;
    const index_t gs0 = want_grad ? grad.stride(0) : 0, gs1 = want_grad ? grad.stride(1) : 0;
    const index_t grain = std::max<index_t>(1, 2048 / std::max<index_t>(classes, 1));
    const int chunks = cpu_kernels::chunk_count(rows, grain);
    std::vector<hinton_sums> partial(static_cast<std::size_t>(chunks));
    const bool unit_temperature = temperature == 1.0;
    const C inv_t = C(1.0 / temperature);
    const C kd_weight = C(alpha * temperature), ce_weight = C(1.0 - alpha);
    const double t2 = temperature * temperature;
    cpu_kernels::parallel_chunks(rows, grain, 1, [&](index_t r0, index_t r1, int chunk) {
      // Per row: shifted student logits, their exponentials at 1 and at T, the teacher's shifted
      // log-probability numerators at T and their exponentials.
      std::vector<C> buf(static_cast<std::size_t>(5 * classes));
      C* zs = buf.data();
      C* e1 = zs + classes;
      C* es = e1 + classes;
      C* et = es + classes;
      C* lt = et + classes;
      hinton_sums sums;
      for (index_t r = r0; r < r1; ++r) {
        const T* srow = sd + r * ss0;
        const U* trow = td + r * ts0;
        C mx_s = -std::numeric_limits<C>::infinity(), mx_t = -std::numeric_limits<C>::infinity();
        bool finite = true;
        for (index_t c = 0; c < classes; ++c) {
          zs[c] = cpu_kernels::load<T, C>(srow[c * ss1]);
          et[c] = cpu_kernels::load<U, C>(trow[c * ts1]);
          mx_s = std::max(mx_s, zs[c]);
          if (!std::isfinite(et[c]) && finite) {
            finite = false;
            if (sums.bad_row < 0) {
              sums.bad_row = r;
              sums.bad_col = c;
              sums.bad_value = static_cast<double>(et[c]);
            }
          }
          mx_t = std::max(mx_t, et[c]);
        }
        G* grow = want_grad ? gd + r * gs0 : nullptr;
        if (!finite) {  // reported by the caller; the row contributes nothing
          if (want_grad)
            for (index_t c = 0; c < classes; ++c) grow[c * gs1] = G(0.0f);
          continue;
        }
        // Student at temperature 1 (cross-entropy) and at T; teacher at T. All shifted by the row max.
        C sum1 = 0, sum_s = 0, sum_t = 0;
        for (index_t c = 0; c < classes; ++c) {
          zs[c] -= mx_s;
          e1[c] = std::exp(zs[c]);
          sum1 += e1[c];
          lt[c] = (et[c] - mx_t) * inv_t;
        }
        if (unit_temperature) {
          for (index_t c = 0; c < classes; ++c) es[c] = e1[c];
          sum_s = sum1;
        } else {
          for (index_t c = 0; c < classes; ++c) {
            es[c] = std::exp(zs[c] * inv_t);
            sum_s += es[c];
          }
        }
        const C log_sum_s = std::log(sum_s);
        // KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s) with log p = shifted logit / T − log Σ.
        for (index_t c = 0; c < classes; ++c) {
          et[c] = std::exp(lt[c]);
          sum_t += et[c];
        }
        const C log_sum_t = std::log(sum_t), inv_sum_t = C(1) / sum_t;
        C kl = 0;
        for (index_t c = 0; c < classes; ++c) {
          const C pt = et[c] * inv_sum_t;
          kl += pt * ((lt[c] - log_sum_t) - (zs[c] * inv_t - log_sum_s));  // pt = 0 (underflow): 0, as the limit
        }
        const std::int32_t y = labels[r];
        sums.distillation += t2 * static_cast<double>(kl);
        sums.cross_entropy += static_cast<double>(std::log(sum1) - zs[y]);
        if (want_grad) {
          const C scale = C(grad_scale), inv1 = C(1) / sum1, inv_s = C(1) / sum_s;
          for (index_t c = 0; c < classes; ++c) {
            const C soft = kd_weight * (es[c] * inv_s - et[c] * inv_sum_t);
            const C hard = ce_weight * (e1[c] * inv1 - (c == y ? C(1) : C(0)));
            grow[c * gs1] = static_cast<G>((soft + hard) * scale);
          }
        }
      }
      partial[static_cast<std::size_t>(chunk)] = sums;
    });
    hinton_sums total;
    for (const auto& p : partial) {  // chunks are in row order: the first bad one is the first row
      total.distillation += p.distillation;
      total.cross_entropy += p.cross_entropy;
      if (total.bad_row < 0 && p.bad_row >= 0) {
        total.bad_row = p.bad_row;
        total.bad_col = p.bad_col;
        total.bad_value = p.bad_value;
      }
    }
    return total;
  }
};

}  // namespace trident::distill
