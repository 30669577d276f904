#pragma once
/// @file ops/gemm.hpp
/// Matrix products on tensors. Operands are matrices (rank 2) or batches of them (rank 3 and
/// up, leading dimensions broadcast); a transposed view is read in place, not copied, so
/// gemm(a.t(), b, c) is as fast as gemm(a, b, c). bf16 and half inputs accumulate in fp32.

#include <string>
#include <type_traits>

#include "../core/activation.hpp"
#include "../core/tensor.hpp"
#include "detail.hpp"
#include "transfer.hpp"

namespace trident {

/// Options of a GEMM: C = act(alpha * op(A) op(B) + beta * C + bias).
struct gemm_options {
  bool trans_a = false;  ///< use A^T (in addition to any transposition already in A's view)
  bool trans_b = false;  ///< use B^T
  double alpha = 1.0;
  double beta = 0.0;  ///< 0: C is write-only
  activation act = activation::none;
};

/// The accumulate/output type of a product of Ti inputs.
template <class Ti>
using gemm_accumulate_t = std::conditional_t<std::is_same_v<std::remove_const_t<Ti>, double>, double, float>;

namespace detail {

/// A matrix view as (pointer, leading dimension, transposed?) for a row-major GEMM, if its
/// layout allows reading it in place.
struct matrix_access {
  bool ok = false;
  bool trans = false;
  index_t ld = 0;
};
inline matrix_access access_of(index_t rows, index_t cols, index_t s0, index_t s1) {
  if (s1 == 1 || cols == 1) {
    const index_t ld = rows == 1 ? cols : s0;
    if (ld >= cols || rows == 1) return {true, false, ld < cols ? cols : ld};
  }
  if (s0 == 1 || rows == 1) {
    const index_t ld = cols == 1 ? rows : s1;
    if (ld >= rows || cols == 1) return {true, true, ld < rows ? rows : ld};
  }
  return {};
}

/// Collapses the batch dimensions (all but the last two) of a view broadcast to `batch_shape`
/// into one count and one stride, if they are uniformly strided.
inline bool collapse_batch(const layout& l, index_t& count, index_t& stride) {
  count = 1;
  stride = 0;
  bool first = true;
  index_t expected = 0;
  for (int d = l.rank() - 3; d >= 0; --d) {
    const index_t e = l.extents[d], s = l.stride[d];
    if (e == 1) continue;
    if (first) {
      stride = s;
      first = false;
    } else if (s != expected) {
      return false;
    }
    count *= e;
    expected = s * e;
    if (s == 0) expected = 0;
  }
  return true;
}

}  // namespace detail

/// c = act(alpha * op(a) op(b) + beta * c + bias); bias (length n, float) may be omitted.
/// Shapes: a (..., m, k), b (..., k, n), c (..., m, n) after the options' transpositions;
/// batch dimensions broadcast. c may be float (double for double inputs) or the input type
/// (then a float result is rounded into it).
template <tensor_like A, tensor_like B, class C, class Bias = std::nullptr_t>
void gemm(const A& a_in, const B& b_in, C&& c_out, const gemm_options& opt = {}, const Bias& bias = nullptr) {
  static_assert(detail::same_device_v<A, B, C>, "trident::gemm: operands live on different devices");
  using D = typename A::device_type;
  using Ti = typename A::value_type;
  using Tc = gemm_accumulate_t<Ti>;
  static_assert(std::is_same_v<Ti, typename B::value_type>, "trident::gemm: A and B must have the same element type");
  auto c = detail::out_view(c_out);
  using Tout = typename decltype(c)::value_type;
  static_assert(std::is_same_v<Tout, Tc> || std::is_same_v<Tout, Ti>,
                "trident::gemm: C must have the accumulate type (float; double for double) or the input type");

  auto a = cview(a_in);
  auto b = cview(b_in);
  if (a.rank() < 2 || b.rank() < 2 || c.rank() < 2) {
    throw shape_error("trident::gemm: operands must have rank >= 2, got A " + a.shape().str() + ", B " + b.shape().str() +
                      ", C " + c.shape().str());
  }
  if (opt.trans_a) a = a.t();
  if (opt.trans_b) b = b.t();
  const index_t m = a.size(a.rank() - 2), k = a.size(a.rank() - 1), n = b.size(b.rank() - 1);
  if (b.size(b.rank() - 2) != k || c.size(c.rank() - 2) != m || c.size(c.rank() - 1) != n) {
    throw shape_error("trident::gemm: shapes do not multiply: A " + a.shape().str() + (opt.trans_a ? " (transposed)" : "") +
                      " x B " + b.shape().str() + (opt.trans_b ? " (transposed)" : "") + " -> C " + c.shape().str());
  }
  // Batch dimensions: broadcast A and B to C's.
  const int r = c.rank();
  index_array bext{};
  for (int d = 0; d < r - 2; ++d) bext[d] = c.size(d);
  auto batch_view = [&](auto v, index_t rows, index_t cols, const char* role) {
    bext[r - 2] = rows;
    bext[r - 1] = cols;
    const shape target(r, bext);
    try {
      return decltype(v)(v.data(), broadcast_layout(v.layout(), target, "trident::gemm"));
    } catch (const shape_error&) {
      throw shape_error(std::string("trident::gemm: batch dimensions of ") + role + " " + v.shape().str() +
                        " do not broadcast to C " + c.shape().str());
    }
  };
  const auto ab = batch_view(a, m, k, "A");
  const auto bb = batch_view(b, k, n, "B");

  // Bias.
  const float* bias_ptr = nullptr;
  if constexpr (!std::is_same_v<Bias, std::nullptr_t>) {
    const auto bv = cview(bias);
    static_assert(std::is_same_v<typename decltype(bv)::value_type, float>, "trident::gemm: bias must be a float tensor");
    static_assert(std::is_same_v<typename decltype(bv)::device_type, D>, "trident::gemm: bias lives on another device");
    if (bv.rank() != 1 || bv.size(0) != n || !bv.is_contiguous()) {
      throw shape_error("trident::gemm: bias has shape " + bv.shape().str() + " but a contiguous (" + std::to_string(n) +
                        ") is required for C " + c.shape().str());
    }
    bias_ptr = bv.data();
  }

  // Output: written in place when it is an accumulate-type matrix (or batch of them) the
  // kernel can address (row-major, or column-major: then C^T is computed); else staged.
  tensor<Tc, D> staging;
  tensor_view<Tc, D> cc;
  index_t batch_c = 1, sc = 0;
  bool in_place = false;
  if constexpr (std::is_same_v<Tout, Tc>) {
    in_place = detail::collapse_batch(c.layout(), batch_c, sc) && detail::access_of(m, n, c.stride(r - 2), c.stride(r - 1)).ok;
    cc = c;
  }
  if (!in_place) {
    staging = tensor<Tc, D>::uninitialized(c.shape());
    if (opt.beta != 0) copy(c, staging);
    cc = staging.view();
    detail::collapse_batch(cc.layout(), batch_c, sc);
  }

  gemm_call<Ti, Tc> g;
  g.m = m;
  g.n = n;
  g.k = k;
  g.alpha = static_cast<Tc>(opt.alpha);
  g.beta = static_cast<Tc>(opt.beta);
  g.bias = bias_ptr;
  g.act = opt.act;
  index_t batch_a = 1, sa = 0, batch_b = 1, sb = 0;
  const bool collapsible = detail::collapse_batch(ab.layout(), batch_a, sa) && detail::collapse_batch(bb.layout(), batch_b, sb);
  const auto ma = detail::access_of(m, k, ab.stride(r - 2), ab.stride(r - 1));
  const auto mb = detail::access_of(k, n, bb.stride(r - 2), bb.stride(r - 1));
  const auto mc = detail::access_of(m, n, cc.stride(r - 2), cc.stride(r - 1));
  if (!collapsible || !ma.ok || !mb.ok || (batch_a != 1 && batch_a != batch_c) || (batch_b != 1 && batch_b != batch_c)) {
    // Unusual strides: multiply contiguous copies.
    auto ac = contiguous(ab);
    auto bc = contiguous(bb);
    gemm_options o2 = opt;
    o2.trans_a = o2.trans_b = false;
    if constexpr (std::is_same_v<Bias, std::nullptr_t>) {
      gemm(ac, bc, cc, o2);
    } else {
      gemm(ac, bc, cc, o2, bias);
    }
  } else {
    g.batch = batch_c;
    g.stride_a = batch_a == 1 ? 0 : sa;
    g.stride_b = batch_b == 1 ? 0 : sb;
    g.stride_c = sc;
    if (!mc.trans) {
      g.a = ab.data(), g.lda = ma.ld, g.trans_a = ma.trans;
      g.b = bb.data(), g.ldb = mb.ld, g.trans_b = mb.trans;
      g.c = cc.data(), g.ldc = mc.ld;
    } else {
      // C is column-major: compute C^T = op(B)^T op(A)^T into its row-major reading.
      if (bias_ptr) {
        throw shape_error("trident::gemm: a bias epilogue needs a row-major C, got C " + cc.layout().str());
      }
      g.m = n;
      g.n = m;
      g.a = bb.data(), g.lda = mb.ld, g.trans_a = !mb.trans, g.stride_a = batch_b == 1 ? 0 : sb;
      g.b = ab.data(), g.ldb = ma.ld, g.trans_b = !ma.trans, g.stride_b = batch_a == 1 ? 0 : sa;
      g.c = cc.data(), g.ldc = mc.ld;
    }
    kernels<D>::gemm(g);
  }
  if (!in_place && c.numel()) copy(staging, c);
}

/// a @ b as a new tensor (float; double for double inputs).
template <tensor_like A, tensor_like B>
auto matmul(const A& a, const B& b) {
  using Tc = gemm_accumulate_t<typename A::value_type>;
  const auto& sa = a.shape();
  const auto& sb = b.shape();
  if (sa.rank() < 2 || sb.rank() < 2) {
    throw shape_error("trident::matmul: operands must have rank >= 2, got " + sa.str() + " and " + sb.str());
  }
  // Batch shape: broadcast of the leading dimensions.
  index_array ea{}, eb{};
  for (int d = 0; d < sa.rank() - 2; ++d) ea[d] = sa[d];
  for (int d = 0; d < sb.rank() - 2; ++d) eb[d] = sb[d];
  const shape batch = broadcast_shapes(shape(sa.rank() - 2, ea), shape(sb.rank() - 2, eb), "trident::matmul");
  index_array ec{};
  for (int d = 0; d < batch.rank(); ++d) ec[d] = batch[d];
  ec[batch.rank()] = sa[sa.rank() - 2];
  ec[batch.rank() + 1] = sb[sb.rank() - 1];
  auto c = tensor<Tc, typename A::device_type>::uninitialized(shape(batch.rank() + 2, ec));
  gemm(a, b, c);
  return c;
}

}  // namespace trident
