#pragma once
/// @file backend/cpu/nn_kernels.hpp
/// nn_kernels<cpu>: the neural-network kernels of nn/kernels.hpp on the CPU. Rows are spread
/// over threads; per-thread partial sums are merged in thread order, so results do not
/// depend on scheduling.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../../core/rng.hpp"
#include "../../core/tensor.hpp"
#include "../../nn/kernels.hpp"
#include "attention.hpp"
#include "kernels.hpp"
#include "parallel.hpp"

namespace trident::nn {

template <>
struct nn_kernels<cpu> {
  template <class T>
  using view = tensor_view<T, cpu>;

  /// Fused, max-shifted softmax cross-entropy with label smoothing and an ignored label.
  /// Returns the summed loss of the rows; writes grad (if not empty) scaled by grad_scale.
  /// One exp per logit: the softmax is e / sum(e) with e = exp(z - max) kept per row.
  template <class T, class G>
  static double softmax_xent(view<G> grad, view<const T> logits, const std::int32_t* labels, std::int32_t ignore_index,
                             double smoothing, double grad_scale) {
    using C = cpu_kernels::compute_of<T, G>;
    const index_t rows = logits.size(0), classes = logits.size(1);
    const bool want_grad = !grad.empty();
    // Raw pointers and strides: a view's general index arithmetic would cost more than the exp.
    const T* lg = logits.data();
    const index_t ls0 = logits.stride(0), ls1 = logits.stride(1);
    G* gd = want_grad ? grad.data() : nullptr;
    const index_t gs0 = want_grad ? grad.stride(0) : 0, gs1 = want_grad ? grad.stride(1) : 0;
    const index_t grain = std::max<index_t>(1, 4096 / std::max<index_t>(classes, 1));
    const int chunks = cpu_kernels::chunk_count(rows, grain);
    std::vector<double> partial(static_cast<std::size_t>(chunks), 0.0);
    const C on = C(1.0 - smoothing), off = C(smoothing / static_cast<double>(classes));
    cpu_kernels::parallel_chunks(rows, grain, 1, [&](index_t r0, index_t r1, int chunk) {
      std::vector<C> zbuf(static_cast<std::size_t>(2 * classes));
      C* z = zbuf.data();
      C* e = z + classes;
      double loss = 0;
      for (index_t r = r0; r < r1; ++r) {
        const std::int32_t y = labels[r];
        G* gr = want_grad ? gd + r * gs0 : nullptr;
        if (y == ignore_index) {
          if (want_grad)
            for (index_t c = 0; c < classes; ++c) gr[c * gs1] = G(0.0f);
          continue;
        }
        const T* lr = lg + r * ls0;
        C mx = -std::numeric_limits<C>::infinity();
        for (index_t c = 0; c < classes; ++c) {
          z[c] = cpu_kernels::load<T, C>(lr[c * ls1]);
          mx = std::max(mx, z[c]);
        }
        C sum = 0, sum_logp = 0;
        for (index_t c = 0; c < classes; ++c) {
          e[c] = std::exp(z[c] - mx);
          sum += e[c];
        }
        const C lse = mx + std::log(sum);
        for (index_t c = 0; c < classes; ++c) sum_logp += z[c] - lse;
        loss += -static_cast<double>(on) * static_cast<double>(z[y] - lse) - static_cast<double>(off) * static_cast<double>(sum_logp);
        if (want_grad) {
          const C scale = C(grad_scale), inv = C(1) / sum;
          for (index_t c = 0; c < classes; ++c) {
            const C target = (c == y ? on : C(0)) + off;
            gr[c * gs1] = static_cast<G>((e[c] * inv - target) * scale);
          }
        }
      }
      partial[static_cast<std::size_t>(chunk)] = loss;
    });
    double total = 0;
    for (double v : partial) total += v;
    return total;
  }

  /// out = in * keep / (1 - p) with keep = (uniform_i >= p), uniform_i from the counter-based
  /// stream `spec` at the element's row-major position (so backward regenerates the mask).
  template <class T>
  static void dropout(view<T> out, view<const T> in, const random_spec& spec, double p) {
    using C = cpu_kernels::compute_of<T>;
    const index_t n = out.numel();
    const C scale = C(1.0 / (1.0 - p));
    const bool dense = out.is_contiguous() && in.is_contiguous();
    cpu_kernels::parallel_chunks((n + 3) / 4, 1024, 16, [&](index_t q0, index_t q1, int) {
      for (index_t q = q0; q < q1; ++q) {
        const philox_block r = spec.block(static_cast<std::uint64_t>(q) * 4);
        for (index_t i = q * 4; i < std::min(n, q * 4 + 4); ++i) {
          const bool keep = spec.value(r, static_cast<std::uint64_t>(i)) >= p;
          const index_t oi = dense ? i : out.layout().offset_of_linear(i);
          const index_t ii = dense ? i : in.layout().offset_of_linear(i);
          out.data()[oi] = keep ? static_cast<T>(cpu_kernels::load<T, C>(in.data()[ii]) * scale) : static_cast<T>(C(0));
        }
      }
    });
  }

  /// Layer normalisation over the last axis of x viewed as (rows, n): y = xhat * gamma + beta
  /// with xhat = (x - mean) * rstd; mean and rstd (one per row) are kept for backward.
  /// gamma may be empty (no affine transform), and beta alone (scale without shift). Each row is widened once into a buffer of
  /// the compute type (fp32, or double for double data); the mean and the variance are two
  /// vectorised passes over it (the variance about the mean, so no cancellation).
  template <class T, class S, class P>
  static void layer_norm_forward(view<T> y, view<S> mean, view<S> rstd, view<const T> x, view<const P> gamma,
                                 view<const P> beta, double eps) {
    using C = cpu_kernels::compute_of<T, S>;
    const index_t n = x.size(x.rank() - 1), rows = x.numel() / std::max<index_t>(n, 1);
    const bool affine = !gamma.empty();
    std::vector<C> gw(affine ? static_cast<std::size_t>(n) : 0), bw(gw.size());
    for (std::size_t i = 0; i < gw.size(); ++i) {
      gw[i] = cpu_kernels::load<P, C>(gamma.data()[i]);
      bw[i] = beta.empty() ? C(0) : cpu_kernels::load<P, C>(beta.data()[i]);
    }
    cpu_kernels::parallel_chunks(rows, std::max<index_t>(1, 8192 / std::max<index_t>(n, 1)), 1, [&](index_t r0, index_t r1, int) {
      std::vector<C> buf(static_cast<std::size_t>(n));
      C* v = buf.data();
      const C* g = gw.data();
      const C* bb = bw.data();
      for (index_t r = r0; r < r1; ++r) {
        const T* xr = x.data() + r * n;
        T* yr = y.data() + r * n;
        C s = 0;
        TRIDENT_SIMD(reduction(+ : s))
        for (index_t i = 0; i < n; ++i) {
          v[i] = cpu_kernels::load<T, C>(xr[i]);
          s += v[i];
        }
        const C mu = s / C(n);
        C ss = 0;
        TRIDENT_SIMD(reduction(+ : ss))
        for (index_t i = 0; i < n; ++i) ss += (v[i] - mu) * (v[i] - mu);
        const C q = C(1) / std::sqrt(ss / C(n) + C(eps));
        mean.data()[r] = static_cast<S>(mu);
        rstd.data()[r] = static_cast<S>(q);
        if (affine) {
          TRIDENT_SIMD()
          for (index_t i = 0; i < n; ++i) cpu_kernels::put(yr, i, (v[i] - mu) * q * g[i] + bb[i]);
        } else {
          TRIDENT_SIMD()
          for (index_t i = 0; i < n; ++i) cpu_kernels::put(yr, i, (v[i] - mu) * q);
        }
      }
    });
  }

  /// Backward of layer_norm_forward: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with
  /// g = dy * gamma; dgamma += sum over rows of dy * xhat, dbeta (when not empty) += sum of dy. Rows are split
  /// in fixed chunks whose partial parameter sums are added in chunk order (deterministic).
  template <class T, class S, class P, class G>
  static void layer_norm_backward(view<T> dx, view<G> dgamma, view<G> dbeta, view<const T> dy, view<const T> x,
                                  view<const S> mean, view<const S> rstd, view<const P> gamma) {
    using C = cpu_kernels::compute_of<T, S, G>;
    const index_t n = x.size(x.rank() - 1), rows = x.numel() / std::max<index_t>(n, 1);
    const bool affine = !gamma.empty();
    const index_t grain = std::max<index_t>(1, 8192 / std::max<index_t>(n, 1));
    const int chunks = cpu_kernels::chunk_count(rows, grain);
    std::vector<C> part_g(affine ? static_cast<std::size_t>(chunks * n) : 0, C(0)), part_b(part_g.size(), C(0));
    std::vector<C> gw(affine ? static_cast<std::size_t>(n) : 0);
    for (std::size_t i = 0; i < gw.size(); ++i) gw[i] = cpu_kernels::load<P, C>(gamma.data()[i]);
    cpu_kernels::parallel_chunks(rows, grain, 1, [&](index_t r0, index_t r1, int chunk) {
      std::vector<C> gbuf(static_cast<std::size_t>(n)), xbuf(static_cast<std::size_t>(n)), dbuf(static_cast<std::size_t>(n));
      C* g = gbuf.data();
      C* xh = xbuf.data();
      C* d = dbuf.data();
      const C* gam = gw.data();
      C* pg = affine ? part_g.data() + chunk * n : nullptr;
      C* pb = affine ? part_b.data() + chunk * n : nullptr;
      for (index_t r = r0; r < r1; ++r) {
        const T* xr = x.data() + r * n;
        const T* dyr = dy.data() + r * n;
        T* dxr = dx.data() + r * n;
        const C m = cpu_kernels::load<S, C>(mean.data()[r]), q = cpu_kernels::load<S, C>(rstd.data()[r]);
        C sg = 0, sgx = 0;
        TRIDENT_SIMD(reduction(+ : sg, sgx))
        for (index_t i = 0; i < n; ++i) {
          d[i] = cpu_kernels::load<T, C>(dyr[i]);
          xh[i] = (cpu_kernels::load<T, C>(xr[i]) - m) * q;
          g[i] = affine ? d[i] * gam[i] : d[i];
          sg += g[i];
          sgx += g[i] * xh[i];
        }
        if (affine) {
          TRIDENT_SIMD()
          for (index_t i = 0; i < n; ++i) {
            pg[i] += d[i] * xh[i];
            pb[i] += d[i];
          }
        }
        const C mg = sg / C(n), mgx = sgx / C(n);
        TRIDENT_SIMD()
        for (index_t i = 0; i < n; ++i) cpu_kernels::put(dxr, i, q * (g[i] - mg - xh[i] * mgx));
      }
    });
    if (affine) {
      for (index_t i = 0; i < n; ++i) {
        double sg = 0, sb = 0;
        for (int c = 0; c < chunks; ++c) {
          sg += static_cast<double>(part_g[static_cast<std::size_t>(c * n + i)]);
          sb += static_cast<double>(part_b[static_cast<std::size_t>(c * n + i)]);
        }
        dgamma.data()[i] = static_cast<G>(static_cast<double>(cpu_kernels::load<G, C>(dgamma.data()[i])) + sg);
        if (!dbeta.empty()) dbeta.data()[i] = static_cast<G>(static_cast<double>(cpu_kernels::load<G, C>(dbeta.data()[i])) + sb);
      }
    }
  }

  /// Token (+ position) embedding lookup: row r of y (N, n) is weight[ids[r]] + pos[r % period]
  /// (pos (>= period, n) may be empty). Ids are checked by the caller.
  template <class T, class P>
  static void embedding_forward(view<T> y, view<const P> weight, const std::int32_t* ids, view<const P> pos,
                                index_t period) {
    using C = cpu_kernels::compute_of<T, P>;
    const index_t n = weight.size(1), rows = y.numel() / std::max<index_t>(n, 1);
    cpu_kernels::parallel_chunks(rows, std::max<index_t>(1, 16384 / std::max<index_t>(n, 1)), 1, [&](index_t r0, index_t r1, int) {
      for (index_t r = r0; r < r1; ++r) {
        const P* w = weight.data() + static_cast<index_t>(ids[r]) * n;
        T* yr = y.data() + r * n;
        if (pos.empty()) {
          for (index_t i = 0; i < n; ++i) yr[i] = static_cast<T>(cpu_kernels::load<P, C>(w[i]));
        } else {
          const P* pr = pos.data() + (r % period) * n;
          for (index_t i = 0; i < n; ++i) yr[i] = static_cast<T>(cpu_kernels::load<P, C>(w[i]) + cpu_kernels::load<P, C>(pr[i]));
        }
      }
    });
  }

  /// Backward of embedding_forward: dweight[ids[r]] += dy[r] and, when dpos is not empty,
  /// dpos[r % period] += dy[r]. Threads own column ranges and add the rows in order, so the
  /// result is the same bits for every thread count (repeated ids add up deterministically).
  template <class G, class T>
  static void embedding_backward(view<G> dweight, const std::int32_t* ids, view<const T> dy, view<G> dpos,
                                 index_t period) {
    using C = cpu_kernels::compute_of<G, T>;
    const index_t n = dweight.size(1), rows = dy.numel() / std::max<index_t>(n, 1);
    cpu_kernels::parallel_chunks(n, 16, 16, [&](index_t c0, index_t c1, int) {
      for (index_t r = 0; r < rows; ++r) {
        const T* g = dy.data() + r * n;
        G* w = dweight.data() + static_cast<index_t>(ids[r]) * n;
        for (index_t i = c0; i < c1; ++i) w[i] = static_cast<G>(cpu_kernels::load<G, C>(w[i]) + cpu_kernels::load<T, C>(g[i]));
        if (!dpos.empty()) {
          G* pr = dpos.data() + (r % period) * n;
          for (index_t i = c0; i < c1; ++i) pr[i] = static_cast<G>(cpu_kernels::load<G, C>(pr[i]) + cpu_kernels::load<T, C>(g[i]));
        }
      }
    });
  }
  /// Fused causal self-attention (backend/cpu/attention.hpp) on qkv (B, T, 3 width) with
  /// `heads` heads: y (B, T, width) and the per-row log-sum-exp lse (B, heads, T).
  template <class T, class S>
  static void attention_forward(view<T> y, view<S> lse, view<const T> qkv, index_t heads, double scale, double dropout,
                                const random_spec& spec) {
    const index_t width = qkv.size(2) / 3;
    const cpu_kernels::attention_options o{scale, dropout, spec};
    cpu_kernels::attention_forward<T, S>(qkv.size(0), qkv.size(1), heads, width / heads, qkv.data(), y.data(), lse.data(), o);
  }

  /// Backward of attention_forward: dqkv (B, T, 3 width) is written.
  template <class T, class S>
  static void attention_backward(view<T> dqkv, view<const T> qkv, view<const T> y, view<const T> dy, view<const S> lse,
                                 index_t heads, double scale, double dropout, const random_spec& spec) {
    const index_t width = qkv.size(2) / 3;
    const cpu_kernels::attention_options o{scale, dropout, spec};
    cpu_kernels::attention_backward<T, S>(qkv.size(0), qkv.size(1), heads, width / heads, qkv.data(), y.data(), dy.data(),
                                          lse.data(), dqkv.data(), o);
  }
};

}  // namespace trident::nn
