#pragma once
/// @file prune/structured.hpp
/// Structured pruning with physical shrinking: whole rows (a linear layer's output features, a
/// convolution's output channels) or attention heads are ranked by the L1 or L2 norm of their
/// weights, the top k kept, and a smaller model built in which the pruned dimension really is
/// smaller, its consumer included.
///
/// trident models are compile-time types whose sizes are run-time constructor arguments, so
/// shrinking is three steps, all exact (values are copied, nothing is recomputed):
///
///   1. choose the kept indices:       auto k1 = prune::rank_rows(dense.store, fc1.weight(), 256);
///   2. build the smaller model:       model small(784, k1.size(), ...);  small.store.allocate();
///   3. copy the kept weights into it: prune::copy_unchanged(dense.store, small.store);
///                                     prune::copy_shrunk_linear_pair(dense.store, fc1, fc2, small.store, sfc1, sfc2, k1);
///
/// The pairs this header shrinks, each (producer, consumer):
///   linear -> linear            out features of one (rows of W, b), in features of the next (columns of W)
///   conv2d -> batch_norm        output channels (filters, bias), the BN's channels (gamma, beta, running statistics)
///   ... -> conv2d               the next convolution's input channels (W[:, c, :, :])
///   ... -> flatten -> linear    the linear's in features c·H·W .. c·H·W + H·W − 1 for each kept channel c
///   attention heads             c_attn rows of q, k and v of each kept head, c_proj columns of it
///   a GPT's heads, per block    a gpt built with layer_heads (rank_gpt_heads, copy_shrunk_gpt_heads)
///
/// A kept-index list is strictly increasing (rank_* return it so): the shrunk model keeps the
/// units in their original order. The shrunk model computes what the dense model computes with
/// the pruned units zeroed (zero_rows / zero_heads build that reference): a zeroed linear row
/// or convolution filter with zero bias outputs 0 (and ReLU or GELU of 0 is 0), a BN channel
/// with gamma = beta = 0 outputs 0, a head whose q, k and v are zero outputs 0; the consumer
/// multiplies those zeros by the weights the shrunk model drops.
///
/// Copies write the params and, under mixed precision, the fp32 master of the destination.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/error.hpp"
#include "../nn/attention.hpp"
#include "../nn/batch_norm.hpp"
#include "../nn/conv2d.hpp"
#include "../nn/gpt.hpp"
#include "../nn/linear.hpp"
#include "../nn/parameters.hpp"
#include "mask.hpp"

namespace trident::prune {

/// How a row or head is scored.
enum class norm { l1, l2 };

namespace detail {

template <class P>
void check_usable(nn::parameter_store<P>& store, const char* who) {
  if (!store.allocated()) throw error(std::string(who) + ": the parameter store is not allocated");
  if (store.params_released()) throw error(std::string(who) + ": the store's params were released to a ZeRO-3 step");
}

/// dst[i] = src[map(i)] for every element of tensor `hd` of `dst`, in the params and, when
/// both stores keep one, the fp32 master.
template <class P, class Map>
void copy_mapped(nn::parameter_store<P>& src, nn::parameter_handle hs, nn::parameter_store<P>& dst, nn::parameter_handle hd,
                 Map&& map) {
  check_usable(src, "prune: copy");
  check_usable(dst, "prune: copy");
  const auto& is = src.info(hs);
  const auto& id = dst.info(hd);
  const auto* sp = src.params().data() + is.offset;
  auto* dp = dst.params().data() + id.offset;
  for (index_t i = 0; i < id.numel(); ++i) dp[i] = sp[map(i)];
  if constexpr (nn::parameter_store<P>::separate_master) {
    if (!src.master_released() && !dst.master_released()) {
      const auto* sm = src.master().data() + is.offset;
      auto* dm = dst.master().data() + id.offset;
      for (index_t i = 0; i < id.numel(); ++i) dm[i] = sm[map(i)];
    }
  }
}

inline void check_kept(const std::vector<index_t>& kept, index_t n, const std::string& what) {
  if (kept.empty()) throw error("prune: " + what + ": no unit kept (at least one must stay)");
  for (std::size_t i = 0; i < kept.size(); ++i) {
    if (kept[i] < 0 || kept[i] >= n || (i > 0 && kept[i] <= kept[i - 1])) {
      throw error("prune: " + what + ": kept indices must be strictly increasing in [0, " + std::to_string(n) +
                  "); entry " + std::to_string(i) + " is " + std::to_string(kept[i]));
    }
  }
}

inline std::string dims(const shape& s) { return s.str(); }

}  // namespace detail

/// The norm of each row of tensor `h` (rows: its first dimension; a row: the other elements,
/// e.g. a conv filter C_in·kh·kw), computed in double from the params.
template <class P>
std::vector<double> row_norms(nn::parameter_store<P>& store, nn::parameter_handle h, norm kind = norm::l2) {
  detail::check_usable(store, "prune::row_norms");
  const auto& info = store.info(h);
  if (info.extents.rank() < 1) throw shape_error("prune::row_norms: '" + info.name + "' is a scalar");
  const index_t rows = info.extents[0], len = info.numel() / rows;
  const auto* p = store.params().data() + info.offset;
  std::vector<double> out(static_cast<std::size_t>(rows));
  for (index_t r = 0; r < rows; ++r) {
    double s = 0;
    for (index_t j = 0; j < len; ++j) {
      const double v = static_cast<double>(static_cast<float>(p[r * len + j]));
      s += kind == norm::l1 ? std::fabs(v) : v * v;
    }
    if (std::isnan(s)) throw error("prune::row_norms: row " + std::to_string(r) + " of '" + info.name + "' holds NaN");
    out[static_cast<std::size_t>(r)] = kind == norm::l1 ? s : std::sqrt(s);
  }
  return out;
}

/// The `keep` highest scores' indices in increasing order (of equal scores, the earlier).
inline std::vector<index_t> top_k(const std::vector<double>& scores, index_t keep) {
  const index_t n = static_cast<index_t>(scores.size());
  if (keep < 1 || keep > n) {
    throw error("prune::top_k: cannot keep " + std::to_string(keep) + " of " + std::to_string(n) + " units (need 1 <= keep <= " +
                std::to_string(n) + ")");
  }
  for (std::size_t i = 0; i < scores.size(); ++i) {
    if (std::isnan(scores[i])) throw error("prune::top_k: score " + std::to_string(i) + " is NaN");
  }
  std::vector<index_t> idx(static_cast<std::size_t>(n));
  std::iota(idx.begin(), idx.end(), index_t{0});
  auto better = [&](index_t a, index_t b) {
    const double x = scores[static_cast<std::size_t>(a)], y = scores[static_cast<std::size_t>(b)];
    return x > y || (x == y && a < b);
  };
  std::nth_element(idx.begin(), idx.begin() + (keep - 1), idx.end(), better);
  idx.resize(static_cast<std::size_t>(keep));
  std::sort(idx.begin(), idx.end());
  return idx;
}

/// The indices in [0, n) not in `kept` (increasing): the pruned units.
inline std::vector<index_t> complement(const std::vector<index_t>& kept, index_t n) {
  std::vector<index_t> out;
  std::size_t j = 0;
  for (index_t i = 0; i < n; ++i) {
    if (j < kept.size() && kept[j] == i) {
      ++j;
    } else {
      out.push_back(i);
    }
  }
  return out;
}

/// The `keep` rows of `h` (output features / channels) with the largest norms, increasing.
template <class P>
std::vector<index_t> rank_rows(nn::parameter_store<P>& store, nn::parameter_handle h, index_t keep, norm kind = norm::l2) {
  return top_k(row_norms(store, h, kind), keep);
}

/// Each head's norm over all its weights: its q, k and v rows of c_attn and its columns of c_proj.
template <class P>
std::vector<double> head_norms(nn::parameter_store<P>& store, nn::causal_self_attention<P>& attn, norm kind = norm::l2) {
  detail::check_usable(store, "prune::head_norms");
  const index_t heads = attn.heads(), hw = attn.head_width(), inner = attn.inner_width(), width = attn.width();
  const auto* qkv = store.params().data() + store.info(attn.c_attn().weight()).offset;   // (3 inner, width)
  const auto* proj = store.params().data() + store.info(attn.c_proj().weight()).offset;  // (width, inner)
  std::vector<double> out(static_cast<std::size_t>(heads), 0.0);
  auto add = [&](double& s, double v) { s += kind == norm::l1 ? std::fabs(v) : v * v; };
  for (index_t h = 0; h < heads; ++h) {
    double s = 0;
    for (index_t part = 0; part < 3; ++part)
      for (index_t j = 0; j < hw; ++j)
        for (index_t c = 0; c < width; ++c) add(s, static_cast<double>(static_cast<float>(qkv[(part * inner + h * hw + j) * width + c])));
    for (index_t r = 0; r < width; ++r)
      for (index_t j = 0; j < hw; ++j) add(s, static_cast<double>(static_cast<float>(proj[r * inner + h * hw + j])));
    if (std::isnan(s)) throw error("prune::head_norms: head " + std::to_string(h) + " holds NaN");
    out[static_cast<std::size_t>(h)] = kind == norm::l1 ? s : std::sqrt(s);
  }
  return out;
}

/// The `keep` heads of `attn` with the largest norms, increasing.
template <class P>
std::vector<index_t> rank_heads(nn::parameter_store<P>& store, nn::causal_self_attention<P>& attn, index_t keep, norm kind = norm::l2) {
  return top_k(head_norms(store, attn, kind), keep);
}

// --- copies ------------------------------------------------------------------------------

/// Copies tensor `hs` of `src` into `hd` of `dst` (same shape).
template <class P>
void copy_tensor(nn::parameter_store<P>& src, nn::parameter_handle hs, nn::parameter_store<P>& dst, nn::parameter_handle hd) {
  if (!(src.info(hs).extents == dst.info(hd).extents)) {
    throw shape_error("prune::copy_tensor: '" + src.info(hs).name + "' " + src.info(hs).extents.str() + " into '" +
                      dst.info(hd).name + "' " + dst.info(hd).extents.str());
  }
  detail::copy_mapped(src, hs, dst, hd, [](index_t i) { return i; });
}

/// Copies every tensor of `dst` that `src` has under the same name and shape (what shrinking
/// leaves unchanged); returns how many. The shrunk tensors are then copied by the functions below.
template <class P>
int copy_unchanged(nn::parameter_store<P>& src, nn::parameter_store<P>& dst) {
  int n = 0;
  const auto& si = src.infos();
  const auto& di = dst.infos();
  for (std::size_t d = 0; d < di.size(); ++d) {
    for (std::size_t s = 0; s < si.size(); ++s) {
      if (si[s].name == di[d].name && si[s].extents == di[d].extents) {
        copy_tensor(src, nn::parameter_handle{static_cast<int>(s)}, dst, nn::parameter_handle{static_cast<int>(d)});
        ++n;
        break;
      }
    }
  }
  return n;
}

/// dst = src with rows `rows` (first dimension) and column blocks `cols` kept, src seen as
/// (rows, columns): column block c is columns c·block .. c·block + block − 1. nullptr keeps
/// all of them. copy_rows and copy_column_blocks are its two halves; shrinking a layer that
/// both loses outputs and consumes a shrunk layer needs both at once.
template <class P>
void copy_selected(nn::parameter_store<P>& src, nn::parameter_handle hs, nn::parameter_store<P>& dst, nn::parameter_handle hd,
                   const std::vector<index_t>* rows, const std::vector<index_t>* cols, index_t block = 1) {
  const auto& is = src.info(hs);
  const auto& id = dst.info(hd);
  if (is.extents.rank() < 1 || block < 1) {
    throw shape_error("prune::copy_selected: '" + is.name + "' " + is.extents.str() + " with blocks of " + std::to_string(block));
  }
  const index_t n_rows = is.extents[0], n_cols = is.numel() / n_rows;
  if (cols && (is.extents.rank() < 2 || n_cols % block != 0)) {
    throw shape_error("prune::copy_selected: rows of '" + is.name + "' " + is.extents.str() + " hold " + std::to_string(n_cols) +
                      " elements, not blocks of " + std::to_string(block));
  }
  if (rows) detail::check_kept(*rows, n_rows, "rows of '" + is.name + "'");
  if (cols) detail::check_kept(*cols, n_cols / block, "columns of '" + is.name + "'");
  const index_t out_rows = rows ? static_cast<index_t>(rows->size()) : n_rows;
  const index_t out_cols = cols ? static_cast<index_t>(cols->size()) * block : n_cols;
  shape want = is.extents;
  want[0] = out_rows;
  if (cols) want[1] = want[1] / (n_cols / block) * static_cast<index_t>(cols->size());
  if (!(id.extents == want) || id.numel() != out_rows * out_cols) {
    throw shape_error("prune::copy_selected: keeping " + std::to_string(out_rows) + " rows and " + std::to_string(out_cols) +
                      " columns of '" + is.name + "' " + is.extents.str() + " gives " + want.str() + ", but '" + id.name + "' is " +
                      id.extents.str());
  }
  detail::copy_mapped(src, hs, dst, hd, [&](index_t i) {
    const index_t r = i / out_cols, c = i % out_cols;
    const index_t sr = rows ? (*rows)[static_cast<std::size_t>(r)] : r;
    const index_t sc = cols ? (*cols)[static_cast<std::size_t>(c / block)] * block + c % block : c;
    return sr * n_cols + sc;
  });
}

/// dst = the rows `kept` of src along the first dimension (a weight's output features or
/// channels, or a bias / BN vector).
template <class P>
void copy_rows(nn::parameter_store<P>& src, nn::parameter_handle hs, nn::parameter_store<P>& dst, nn::parameter_handle hd,
               const std::vector<index_t>& kept) {
  copy_selected(src, hs, dst, hd, &kept, nullptr);
}

/// dst = the column blocks `kept` of src seen as (rows, columns) with rows its first dimension:
/// kept index c selects columns c·block .. c·block + block − 1. block 1: a linear's in
/// features; block kh·kw: a convolution's input channels; block H·W: a linear after a flatten
/// of (C, H, W).
template <class P>
void copy_column_blocks(nn::parameter_store<P>& src, nn::parameter_handle hs, nn::parameter_store<P>& dst, nn::parameter_handle hd,
                        const std::vector<index_t>& kept, index_t block = 1) {
  if (src.info(hs).extents.rank() < 2) {
    throw shape_error("prune::copy_column_blocks: '" + src.info(hs).name + "' " + src.info(hs).extents.str() + " has no columns");
  }
  copy_selected(src, hs, dst, hd, nullptr, &kept, block);
}

/// linear a -> linear b with a's output features `kept`: a's weight rows and bias, b's
/// weight columns; b's bias as it is. b keeps all its own outputs; when b's outputs are
/// pruned too, use copy_shrunk_linear_chain (or copy_selected), which cuts rows and columns
/// of a layer at once.
template <class P>
void copy_shrunk_linear_pair(nn::parameter_store<P>& src, const nn::linear<P>& a, const nn::linear<P>& b, nn::parameter_store<P>& dst,
                             const nn::linear<P>& a2, const nn::linear<P>& b2, const std::vector<index_t>& kept) {
  if (a.out_features() != b.in_features()) {
    throw shape_error("prune::copy_shrunk_linear_pair: the first layer gives " + std::to_string(a.out_features()) +
                      " features, the second takes " + std::to_string(b.in_features()));
  }
  copy_rows(src, a.weight(), dst, a2.weight(), kept);
  if (a.bias().valid() != a2.bias().valid()) throw error("prune::copy_shrunk_linear_pair: one first layer has a bias, the other not");
  if (a.bias().valid()) copy_rows(src, a.bias(), dst, a2.bias(), kept);
  copy_column_blocks(src, b.weight(), dst, b2.weight(), kept, 1);
  if (b.bias().valid() != b2.bias().valid()) throw error("prune::copy_shrunk_linear_pair: one second layer has a bias, the other not");
  if (b.bias().valid()) copy_tensor(src, b.bias(), dst, b2.bias());
}

/// A chain of linear layers l0 -> l1 -> ... -> lL whose hidden widths (the outputs of l0 ..
/// l(L−1)) keep kept[0] .. kept[L−1]: each layer's rows (and bias) from its own list, its
/// columns from the previous layer's.
template <class P>
void copy_shrunk_linear_chain(nn::parameter_store<P>& src, const std::vector<const nn::linear<P>*>& dense, nn::parameter_store<P>& dst,
                              const std::vector<const nn::linear<P>*>& shrunk, const std::vector<std::vector<index_t>>& kept) {
  if (dense.size() != shrunk.size() || dense.size() != kept.size() + 1 || dense.empty()) {
    throw error("prune::copy_shrunk_linear_chain: " + std::to_string(dense.size()) + " dense layers, " + std::to_string(shrunk.size()) +
                " shrunk layers and " + std::to_string(kept.size()) + " kept lists (need L + 1, L + 1 and L)");
  }
  for (std::size_t l = 0; l < dense.size(); ++l) {
    const auto& d = *dense[l];
    const auto& s = *shrunk[l];
    const std::vector<index_t>* rows = l < kept.size() ? &kept[l] : nullptr;
    const std::vector<index_t>* cols = l > 0 ? &kept[l - 1] : nullptr;
    if (l > 0 && dense[l - 1]->out_features() != d.in_features()) {
      throw shape_error("prune::copy_shrunk_linear_chain: layer " + std::to_string(l - 1) + " gives " +
                        std::to_string(dense[l - 1]->out_features()) + " features, layer " + std::to_string(l) + " takes " +
                        std::to_string(d.in_features()));
    }
    if (d.bias().valid() != s.bias().valid()) throw error("prune::copy_shrunk_linear_chain: layer " + std::to_string(l) + " has a bias in one model only");
    copy_selected(src, d.weight(), dst, s.weight(), rows, cols, 1);
    if (d.bias().valid()) {
      if (rows) {
        copy_rows(src, d.bias(), dst, s.bias(), *rows);
      } else {
        copy_tensor(src, d.bias(), dst, s.bias());
      }
    }
  }
}

/// batch_norm with channels `kept`: gamma, beta and the running statistics.
template <class P>
void copy_batch_norm_channels(nn::parameter_store<P>& src, nn::batch_norm<P>& bn, nn::parameter_store<P>& dst, nn::batch_norm<P>& bn2,
                              const std::vector<index_t>& kept) {
  copy_rows(src, bn.weight(), dst, bn2.weight(), kept);
  copy_rows(src, bn.bias(), dst, bn2.bias(), kept);
  auto rm = bn.running_mean(), rv = bn.running_var();
  auto rm2 = bn2.running_mean(), rv2 = bn2.running_var();
  for (std::size_t i = 0; i < kept.size(); ++i) {
    rm2.data()[i] = rm.data()[kept[i]];
    rv2.data()[i] = rv.data()[kept[i]];
  }
}

/// conv2d -> batch_norm with output channels `kept`: the filters (and bias) of the conv, the
/// BN's gamma, beta and running statistics. With `in_kept` (not empty) the convolution also
/// keeps only those input channels (it consumes a shrunk layer itself). The shrunk BN's eps
/// and momentum must match.
template <class P>
void copy_shrunk_conv_bn(nn::parameter_store<P>& src, const nn::conv2d<P>& conv, nn::batch_norm<P>& bn, nn::parameter_store<P>& dst,
                         const nn::conv2d<P>& conv2, nn::batch_norm<P>& bn2, const std::vector<index_t>& kept,
                         const std::vector<index_t>& in_kept = {}) {
  if (conv.out_channels() != bn.num_features()) {
    throw shape_error("prune::copy_shrunk_conv_bn: the convolution gives " + std::to_string(conv.out_channels()) +
                      " channels, the batch norm '" + bn.name() + "' takes " + std::to_string(bn.num_features()));
  }
  if (bn.eps() != bn2.eps() || bn.momentum() != bn2.momentum()) {
    throw error("prune::copy_shrunk_conv_bn: the batch norms differ in eps or momentum ('" + bn.name() + "', '" + bn2.name() + "')");
  }
  if (!(conv.kernel_size() == conv2.kernel_size())) {
    throw shape_error("prune::copy_shrunk_conv_bn: kernels " + conv.kernel_size().str() + " and " + conv2.kernel_size().str() + " differ");
  }
  copy_selected(src, conv.weight(), dst, conv2.weight(), &kept, in_kept.empty() ? nullptr : &in_kept,
                conv.kernel_size().h * conv.kernel_size().w);
  if (conv.bias().valid() != conv2.bias().valid()) throw error("prune::copy_shrunk_conv_bn: one convolution has a bias, the other not");
  if (conv.bias().valid()) copy_rows(src, conv.bias(), dst, conv2.bias(), kept);
  copy_batch_norm_channels(src, bn, dst, bn2, kept);
}

/// A conv2d consuming channels `kept` of its input: W[:, kept, :, :].
template <class P>
void copy_shrunk_conv_input(nn::parameter_store<P>& src, const nn::conv2d<P>& conv, nn::parameter_store<P>& dst, const nn::conv2d<P>& conv2,
                            const std::vector<index_t>& kept) {
  if (!(conv.kernel_size() == conv2.kernel_size())) {
    throw shape_error("prune::copy_shrunk_conv_input: kernels " + conv.kernel_size().str() + " and " + conv2.kernel_size().str() + " differ");
  }
  copy_column_blocks(src, conv.weight(), dst, conv2.weight(), kept, conv.kernel_size().h * conv.kernel_size().w);
  if (conv.bias().valid() != conv2.bias().valid()) throw error("prune::copy_shrunk_conv_input: one convolution has a bias, the other not");
  if (conv.bias().valid()) copy_tensor(src, conv.bias(), dst, conv2.bias());
}

/// A linear consuming a flatten of (C, H, W) whose channels `kept` stay: for each kept c, the
/// in features c·plane .. c·plane + plane − 1 (plane = H·W; 1 for an (N, C) input).
template <class P>
void copy_shrunk_linear_input(nn::parameter_store<P>& src, const nn::linear<P>& lin, nn::parameter_store<P>& dst, const nn::linear<P>& lin2,
                              const std::vector<index_t>& kept, index_t plane = 1) {
  copy_column_blocks(src, lin.weight(), dst, lin2.weight(), kept, plane);
  if (lin.bias().valid() != lin2.bias().valid()) throw error("prune::copy_shrunk_linear_input: one layer has a bias, the other not");
  if (lin.bias().valid()) copy_tensor(src, lin.bias(), dst, lin2.bias());
}

/// Attention with heads `kept`: their q, k, v rows of c_attn (weight and bias) and their
/// columns of c_proj (c_proj's bias as it is). The shrunk attention has kept.size() heads of
/// the same head width (nn::causal_self_attention's head_width argument).
template <class P>
void copy_shrunk_attention(nn::parameter_store<P>& src, nn::causal_self_attention<P>& attn, nn::parameter_store<P>& dst,
                           nn::causal_self_attention<P>& attn2, const std::vector<index_t>& kept) {
  detail::check_kept(kept, attn.heads(), "copy_shrunk_attention");
  const index_t hw = attn.head_width(), inner = attn.inner_width(), width = attn.width();
  if (attn2.heads() != static_cast<index_t>(kept.size()) || attn2.head_width() != hw || attn2.width() != width) {
    throw shape_error("prune::copy_shrunk_attention: keeping " + std::to_string(kept.size()) + " heads of width " + std::to_string(hw) +
                      " on width " + std::to_string(width) + ", but the shrunk attention has " + std::to_string(attn2.heads()) +
                      " heads of width " + std::to_string(attn2.head_width()) + " on width " + std::to_string(attn2.width()));
  }
  const index_t inner2 = attn2.inner_width();
  // q, k, v row of the shrunk attention -> row of the dense one
  auto row = [&](index_t r2) {
    const index_t part = r2 / inner2, within = r2 % inner2;
    return part * inner + kept[static_cast<std::size_t>(within / hw)] * hw + within % hw;
  };
  detail::copy_mapped(src, attn.c_attn().weight(), dst, attn2.c_attn().weight(),
                      [&](index_t i) { return row(i / width) * width + i % width; });
  if (attn.c_attn().bias().valid() != attn2.c_attn().bias().valid()) throw error("prune::copy_shrunk_attention: bias in one model only");
  if (attn.c_attn().bias().valid()) detail::copy_mapped(src, attn.c_attn().bias(), dst, attn2.c_attn().bias(), row);
  std::vector<index_t> heads(kept);
  copy_column_blocks(src, attn.c_proj().weight(), dst, attn2.c_proj().weight(), heads, hw);
  if (attn.c_proj().bias().valid()) copy_tensor(src, attn.c_proj().bias(), dst, attn2.c_proj().bias());
}

/// The heads to keep in each block of `model`: keep[i] of block i's, by norm (increasing).
template <class P>
std::vector<std::vector<index_t>> rank_gpt_heads(nn::parameter_store<P>& store, nn::gpt<P>& model, const std::vector<index_t>& keep,
                                                 norm kind = norm::l2) {
  if (static_cast<index_t>(keep.size()) != model.config().n_layer) {
    throw error("prune::rank_gpt_heads: " + std::to_string(keep.size()) + " head counts for " + std::to_string(model.config().n_layer) +
                " blocks");
  }
  std::vector<std::vector<index_t>> out;
  for (index_t i = 0; i < model.config().n_layer; ++i) out.push_back(rank_heads(store, model.block(i).attn(), keep[static_cast<std::size_t>(i)], kind));
  return out;
}

/// Fills `shrunk`, a gpt of the same config built with layer_heads[i] = kept[i].size(), from
/// `dense`: every tensor whose shape did not change, and each block's kept heads.
template <class P>
void copy_shrunk_gpt_heads(nn::parameter_store<P>& src, nn::gpt<P>& dense, nn::parameter_store<P>& dst, nn::gpt<P>& shrunk,
                           const std::vector<std::vector<index_t>>& kept) {
  const index_t n = dense.config().n_layer;
  if (static_cast<index_t>(kept.size()) != n || shrunk.config().n_layer != n || shrunk.config().n_embd != dense.config().n_embd) {
    throw error("prune::copy_shrunk_gpt_heads: " + std::to_string(kept.size()) + " kept lists for a gpt of " + std::to_string(n) +
                " blocks into one of " + std::to_string(shrunk.config().n_layer) + " (widths " + std::to_string(dense.config().n_embd) +
                ", " + std::to_string(shrunk.config().n_embd) + ")");
  }
  copy_unchanged(src, dst);
  for (index_t i = 0; i < n; ++i) copy_shrunk_attention(src, dense.block(i).attn(), dst, shrunk.block(i).attn(), kept[static_cast<std::size_t>(i)]);
}

// --- the dense reference: pruned units zeroed ---------------------------------------------

/// Zeroes rows `rows` (first dimension) of tensor `h`, params and master: a pruned unit left
/// in place, the reference a shrunk model must reproduce.
template <class P>
void zero_rows(nn::parameter_store<P>& store, nn::parameter_handle h, const std::vector<index_t>& rows) {
  detail::check_usable(store, "prune::zero_rows");
  const auto& info = store.info(h);
  const index_t n = info.extents[0], len = info.numel() / n;
  auto* p = store.params().data() + info.offset;
  typename P::master_type* m = nullptr;
  if constexpr (nn::parameter_store<P>::separate_master) {
    if (!store.master_released()) m = store.master().data() + info.offset;
  }
  for (index_t r : rows) {
    if (r < 0 || r >= n) throw error("prune::zero_rows: row " + std::to_string(r) + " of '" + info.name + "' " + info.extents.str());
    for (index_t j = 0; j < len; ++j) {
      p[r * len + j] = static_cast<typename P::storage_type>(0.0f);
      if (m) m[r * len + j] = 0;
    }
  }
}

/// Zeroes the q, k and v rows (weight and bias) of heads `heads` of `attn`.
template <class P>
void zero_heads(nn::parameter_store<P>& store, nn::causal_self_attention<P>& attn, const std::vector<index_t>& heads) {
  std::vector<index_t> rows;
  for (index_t h : heads) {
    if (h < 0 || h >= attn.heads()) throw error("prune::zero_heads: head " + std::to_string(h) + " of " + std::to_string(attn.heads()));
    for (index_t part = 0; part < 3; ++part)
      for (index_t j = 0; j < attn.head_width(); ++j) rows.push_back(part * attn.inner_width() + h * attn.head_width() + j);
  }
  zero_rows(store, attn.c_attn().weight(), rows);
  if (attn.c_attn().bias().valid()) zero_rows(store, attn.c_attn().bias(), rows);
}

// --- sizes -------------------------------------------------------------------------------

/// Parameters and bytes (in the storage type) of a dense and a shrunk model.
struct size_report {
  index_t dense_parameters = 0, shrunk_parameters = 0;
  std::size_t dense_bytes = 0, shrunk_bytes = 0;
  /// shrunk / dense.
  double ratio() const noexcept { return dense_bytes ? static_cast<double>(shrunk_bytes) / static_cast<double>(dense_bytes) : 0.0; }
  std::string str() const {
    char b[200];
    std::snprintf(b, sizeof b, "dense %lld parameters (%.3f MiB), shrunk %lld parameters (%.3f MiB): %.4f of dense",
                  static_cast<long long>(dense_parameters), static_cast<double>(dense_bytes) / (1 << 20),
                  static_cast<long long>(shrunk_parameters), static_cast<double>(shrunk_bytes) / (1 << 20), ratio());
    return b;
  }
};

/// The parameter counts (padding excluded) and bytes of the params of two stores.
template <class P>
size_report compare_sizes(const nn::parameter_store<P>& dense, const nn::parameter_store<P>& shrunk) {
  using S = typename P::storage_type;
  size_report r;
  r.dense_parameters = dense.count();
  r.shrunk_parameters = shrunk.count();
  r.dense_bytes = static_cast<std::size_t>(r.dense_parameters) * sizeof(S);
  r.shrunk_bytes = static_cast<std::size_t>(r.shrunk_parameters) * sizeof(S);
  return r;
}

}  // namespace trident::prune
