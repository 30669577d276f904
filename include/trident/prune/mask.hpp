#pragma once
/// @file prune/mask.hpp
/// Pruning masks over a parameter store and the rules that compute them: unstructured
/// magnitude pruning, layer-wise (each selected tensor to sparsity s) or global (one threshold
/// over all selected tensors), and N:M semi-structured sparsity (2:4: in every group of four
/// consecutive weights of a row, the two largest magnitudes stay). Also the sparsity report.
///
/// A mask_set holds one keep/prune byte per element of each pruned tensor, located by the
/// tensor's offset in the store's flat buffers, so that an optimizer step over the whole store
/// or over a ZeRO shard [begin, end) can find the pruned elements of its range
/// (prune/masked.hpp). apply() zeroes the pruned params and fp32 master weights.
///
/// Counts are exact: pruning a tensor of n elements to sparsity s prunes round(s n) elements
/// (ties to even, as torch.nn.utils.prune rounds an amount given as a fraction); global
/// pruning prunes round(s N) of the N selected elements. Elements are ranked by magnitude,
/// equal magnitudes by position (the one earlier in the flat buffer is pruned first), so the
/// pruned set never depends on sort stability. N:M keeps, of equal magnitudes, the earlier.
/// Magnitudes are read from the fp32 master weights where the store has them (mixed
/// precision), else from the params. A NaN weight is an error, named.
///
///   auto masks = prune::magnitude_global(store, 0.8);     // 80% of all rank >= 2 tensors
///   prune::apply(store, masks);
///   prune::masked<optim::adamw> opt(masks, {.lr = 1e-3}); // keeps them zero (masked.hpp)

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../nn/parameters.hpp"

namespace trident::prune {

/// Selects the tensors of a store to prune.
using tensor_predicate = std::function<bool(const nn::parameter_info&)>;

/// The default selection: tensors of rank >= 2 (linear and convolution weights, embeddings),
/// not biases or norms.
inline tensor_predicate matrices() {
  return [](const nn::parameter_info& p) { return p.extents.rank() >= 2; };
}

/// Exactly the tensors with these names.
inline tensor_predicate named(std::vector<std::string> names) {
  return [names = std::move(names)](const nn::parameter_info& p) {
    return std::find(names.begin(), names.end(), p.name) != names.end();
  };
}

/// The mask of one tensor: keep[i] is 1 where element i stays, 0 where it is pruned.
struct tensor_mask {
  int tensor = -1;                 ///< index into the store's infos()
  std::string name;                ///< the tensor's name
  index_t offset = 0;              ///< its first element in the flat buffers
  std::vector<std::uint8_t> keep;  ///< one per element
  index_t numel() const noexcept { return static_cast<index_t>(keep.size()); }
  /// Pruned elements.
  index_t pruned() const noexcept {
    return numel() - static_cast<index_t>(std::count(keep.begin(), keep.end(), std::uint8_t{1}));
  }
  double sparsity() const noexcept { return keep.empty() ? 0.0 : static_cast<double>(pruned()) / static_cast<double>(numel()); }
};

/// The masks of a store's pruned tensors, in flat-buffer order.
class mask_set {
 public:
  /// Sets (or replaces) the mask of tensor `index` of `infos`.
  void set(const std::vector<nn::parameter_info>& infos, int index, std::vector<std::uint8_t> keep) {
    if (index < 0 || index >= static_cast<int>(infos.size())) {
      throw error("prune::mask_set::set: tensor index " + std::to_string(index) + " is not one of the store's " +
                  std::to_string(infos.size()) + " tensors");
    }
    const auto& info = infos[static_cast<std::size_t>(index)];
    if (static_cast<index_t>(keep.size()) != info.numel()) {
      throw shape_error("prune::mask_set::set: a mask of " + std::to_string(keep.size()) + " elements for '" + info.name +
                        "' of shape " + info.extents.str() + " (" + std::to_string(info.numel()) + " elements)");
    }
    for (auto& k : keep) k = k != 0;
    tensor_mask m{index, info.name, info.offset, std::move(keep)};
    auto it = std::lower_bound(masks_.begin(), masks_.end(), m.offset,
                               [](const tensor_mask& a, index_t off) { return a.offset < off; });
    if (it != masks_.end() && it->tensor == index) {
      *it = std::move(m);
    } else {
      masks_.insert(it, std::move(m));
    }
  }
  /// The mask of tensor `index`, or nullptr when it is not pruned.
  const tensor_mask* find(int index) const noexcept {
    for (const auto& m : masks_)
      if (m.tensor == index) return &m;
    return nullptr;
  }
  const std::vector<tensor_mask>& tensors() const noexcept { return masks_; }
  bool empty() const noexcept { return masks_.empty(); }
  /// Elements under a mask, and pruned among them.
  index_t masked_elements() const noexcept {
    index_t n = 0;
    for (const auto& m : masks_) n += m.numel();
    return n;
  }
  index_t pruned() const noexcept {
    index_t n = 0;
    for (const auto& m : masks_) n += m.pruned();
    return n;
  }
  /// Pruned / masked elements (0 when nothing is masked).
  double sparsity() const noexcept {
    const index_t n = masked_elements();
    return n ? static_cast<double>(pruned()) / static_cast<double>(n) : 0.0;
  }
  /// Calls f(flat_index) for every pruned element in the flat range [begin, end), in order.
  template <class F>
  void for_each_pruned(index_t begin, index_t end, F&& f) const {
    for (const auto& m : masks_) {
      const index_t lo = std::max(begin, m.offset), hi = std::min(end, m.offset + m.numel());
      for (index_t i = lo; i < hi; ++i) {
        if (!m.keep[static_cast<std::size_t>(i - m.offset)]) f(i);
      }
    }
  }
  /// Checks that the masks fit `store` (same tensors at the same offsets).
  template <class P>
  void check_fits(const nn::parameter_store<P>& store, const char* who) const {
    const auto& infos = store.infos();
    for (const auto& m : masks_) {
      if (m.tensor >= static_cast<int>(infos.size()) || infos[static_cast<std::size_t>(m.tensor)].name != m.name ||
          infos[static_cast<std::size_t>(m.tensor)].offset != m.offset || infos[static_cast<std::size_t>(m.tensor)].numel() != m.numel()) {
        throw error(std::string(who) + ": the mask of '" + m.name + "' (tensor " + std::to_string(m.tensor) +
                    ") does not fit this store (masks are made for the store they were computed on)");
      }
    }
  }

 private:
  std::vector<tensor_mask> masks_;
};

namespace detail {

inline std::string fmt(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%g", v);
  return b;
}

inline void check_sparsity(const char* who, double s) {
  if (!(s >= 0.0 && s <= 1.0)) throw error(std::string(who) + ": sparsity must be in [0, 1], got " + fmt(s));
}

/// Elements of round(s n), ties to even.
inline index_t prune_count(double s, index_t n) {
  return static_cast<index_t>(std::nearbyint(s * static_cast<double>(n)));
}

/// The weights of tensor `index` as doubles: the fp32 master where the store keeps one,
/// else the params.
template <class P>
std::vector<double> weights_of(nn::parameter_store<P>& store, int index, const char* who) {
  const auto& info = store.infos()[static_cast<std::size_t>(index)];
  std::vector<double> out(static_cast<std::size_t>(info.numel()));
  bool done = false;
  if constexpr (nn::parameter_store<P>::separate_master) {
    if (!store.master_released()) {
      const auto* m = store.master().data() + info.offset;
      for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(m[i]);
      done = true;
    }
  }
  if (!done) {
    if (store.params_released()) {
      throw error(std::string(who) + ": the store's params were released to a ZeRO-3 step; compute masks before "
                                     "constructing it (or on the params gathered with distributed_step::gather_params)");
    }
    const auto* p = store.params().data() + info.offset;
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(static_cast<float>(p[i]));
  }
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (std::isnan(out[i])) {
      throw error(std::string(who) + ": tensor '" + info.name + "' holds NaN at element " + std::to_string(i) +
                  " (magnitudes cannot be ranked)");
    }
  }
  return out;
}

/// Indices of the selected tensors, in flat order; throws when there are none.
template <class P>
std::vector<int> selected(const nn::parameter_store<P>& store, const tensor_predicate& select, const char* who) {
  if (!store.allocated()) throw error(std::string(who) + ": the parameter store is not allocated");
  if (!select) throw error(std::string(who) + ": no tensor predicate");
  std::vector<int> out;
  const auto& infos = store.infos();
  for (std::size_t i = 0; i < infos.size(); ++i)
    if (select(infos[i])) out.push_back(static_cast<int>(i));
  if (out.empty()) throw error(std::string(who) + ": the predicate selects no tensor of the store");
  return out;
}

/// keep = 0 for the `k` smallest |v| (earlier position first among equals), 1 elsewhere.
inline std::vector<std::uint8_t> prune_smallest(const std::vector<double>& v, index_t k) {
  std::vector<std::uint8_t> keep(v.size(), 1);
  if (k <= 0) return keep;
  std::vector<index_t> idx(v.size());
  std::iota(idx.begin(), idx.end(), index_t{0});
  auto less = [&](index_t a, index_t b) {
    const double x = std::fabs(v[static_cast<std::size_t>(a)]), y = std::fabs(v[static_cast<std::size_t>(b)]);
    return x < y || (x == y && a < b);
  };
  if (k < static_cast<index_t>(idx.size())) std::nth_element(idx.begin(), idx.begin() + (k - 1), idx.end(), less);
  for (index_t i = 0; i < k && i < static_cast<index_t>(idx.size()); ++i) keep[static_cast<std::size_t>(idx[static_cast<std::size_t>(i)])] = 0;
  return keep;
}

}  // namespace detail

/// Layer-wise magnitude pruning: each selected tensor loses its round(s n) smallest-magnitude
/// elements.
template <class P>
mask_set magnitude_layerwise(nn::parameter_store<P>& store, double sparsity, const tensor_predicate& select = matrices()) {
  detail::check_sparsity("prune::magnitude_layerwise", sparsity);
  mask_set out;
  for (int t : detail::selected(store, select, "prune::magnitude_layerwise")) {
    const auto w = detail::weights_of(store, t, "prune::magnitude_layerwise");
    out.set(store.infos(), t, detail::prune_smallest(w, detail::prune_count(sparsity, static_cast<index_t>(w.size()))));
  }
  return out;
}

/// Global magnitude pruning: one ranking over all selected tensors together; the round(s N)
/// smallest magnitudes go, wherever they are (so layers end at different sparsities).
template <class P>
mask_set magnitude_global(nn::parameter_store<P>& store, double sparsity, const tensor_predicate& select = matrices()) {
  detail::check_sparsity("prune::magnitude_global", sparsity);
  const auto tensors = detail::selected(store, select, "prune::magnitude_global");
  std::vector<double> all;
  std::vector<std::size_t> starts;
  for (int t : tensors) {
    starts.push_back(all.size());
    const auto w = detail::weights_of(store, t, "prune::magnitude_global");
    all.insert(all.end(), w.begin(), w.end());
  }
  const auto keep = detail::prune_smallest(all, detail::prune_count(sparsity, static_cast<index_t>(all.size())));
  mask_set out;
  for (std::size_t j = 0; j < tensors.size(); ++j) {
    const std::size_t b = starts[j], e = j + 1 < tensors.size() ? starts[j + 1] : all.size();
    out.set(store.infos(), tensors[j], std::vector<std::uint8_t>(keep.begin() + static_cast<std::ptrdiff_t>(b),
                                                                 keep.begin() + static_cast<std::ptrdiff_t>(e)));
  }
  return out;
}

/// N:M sparsity along the input dimension: each selected tensor is seen as rows (its first
/// dimension: output features or channels) of numel / rows elements; in every group of `m`
/// consecutive elements of a row the `n` largest magnitudes stay (of equal ones, the earlier).
/// The row length must be a multiple of m. For a convolution weight (C_out, C_in, kh, kw) the
/// groups run over C_in kh kw in that layout.
template <class P>
mask_set n_m(nn::parameter_store<P>& store, index_t n = 2, index_t m = 4, const tensor_predicate& select = matrices()) {
  if (m <= 0 || n < 0 || n > m) {
    throw error("prune::n_m: need 0 <= n <= m and m > 0, got " + std::to_string(n) + ":" + std::to_string(m));
  }
  mask_set out;
  for (int t : detail::selected(store, select, "prune::n_m")) {
    const auto& info = store.infos()[static_cast<std::size_t>(t)];
    const index_t rows = info.extents.rank() >= 1 ? info.extents[0] : 1;
    const index_t len = rows > 0 ? info.numel() / rows : 0;
    if (len % m != 0) {
      throw shape_error("prune::n_m: rows of '" + info.name + "' " + info.extents.str() + " hold " + std::to_string(len) +
                        " elements, not a multiple of m = " + std::to_string(m));
    }
    const auto w = detail::weights_of(store, t, "prune::n_m");
    std::vector<std::uint8_t> keep(w.size(), 0);
    std::vector<index_t> g(static_cast<std::size_t>(m));
    for (index_t base = 0; base < info.numel(); base += m) {
      std::iota(g.begin(), g.end(), base);
      std::sort(g.begin(), g.end(), [&](index_t a, index_t b) {
        const double x = std::fabs(w[static_cast<std::size_t>(a)]), y = std::fabs(w[static_cast<std::size_t>(b)]);
        return x > y || (x == y && a < b);
      });
      for (index_t j = 0; j < n; ++j) keep[static_cast<std::size_t>(g[static_cast<std::size_t>(j)])] = 1;
    }
    out.set(store.infos(), t, std::move(keep));
  }
  return out;
}

/// Zeroes the pruned elements of the params and (mixed precision) of the fp32 master weights.
/// Call it before constructing a ZeRO step (which takes the master partitions and, at stage
/// 3, the params from the store); a masked optimizer keeps them zero afterwards.
template <class P>
void apply(nn::parameter_store<P>& store, const mask_set& masks) {
  masks.check_fits(store, "prune::apply");
  if (store.params_released()) {
    throw error("prune::apply: the store's params were released to a ZeRO-3 step; apply the masks before constructing it");
  }
  using S = typename P::storage_type;
  auto* p = store.params().data();
  typename P::master_type* master = nullptr;
  if constexpr (nn::parameter_store<P>::separate_master) {
    if (!store.master_released()) master = store.master().data();
  }
  masks.for_each_pruned(0, store.size(), [&](index_t i) {
    p[i] = static_cast<S>(0.0f);
    if (master) master[i] = 0;
  });
}

/// Zeros of one tensor's params.
struct tensor_sparsity {
  std::string name;
  index_t numel = 0;
  index_t zeros = 0;
  double sparsity() const noexcept { return numel ? static_cast<double>(zeros) / static_cast<double>(numel) : 0.0; }
};

/// Per-tensor and global sparsity (exact zeros in the params) of the selected tensors.
struct sparsity_report {
  std::vector<tensor_sparsity> tensors;
  index_t numel = 0;
  index_t zeros = 0;
  double global() const noexcept { return numel ? static_cast<double>(zeros) / static_cast<double>(numel) : 0.0; }
  /// One line per tensor and a total: "fc1.weight  (25088 elements)  sparsity 0.8000".
  std::string str() const {
    std::string s;
    char b[160];
    for (const auto& t : tensors) {
      std::snprintf(b, sizeof b, "%-32s %12lld elements  sparsity %.4f\n", t.name.c_str(), static_cast<long long>(t.numel), t.sparsity());
      s += b;
    }
    std::snprintf(b, sizeof b, "%-32s %12lld elements  sparsity %.4f\n", "global", static_cast<long long>(numel), global());
    return s + b;
  }
};

/// Counts the exact zeros of the selected tensors' params.
template <class P>
sparsity_report report_sparsity(nn::parameter_store<P>& store, const tensor_predicate& select = matrices()) {
  sparsity_report r;
  if (store.params_released()) {
    throw error("prune::report_sparsity: the store's params were released to a ZeRO-3 step (report on gathered params)");
  }
  const auto* p = store.params().data();
  for (int t : detail::selected(store, select, "prune::report_sparsity")) {
    const auto& info = store.infos()[static_cast<std::size_t>(t)];
    tensor_sparsity ts{info.name, info.numel(), 0};
    for (index_t i = 0; i < info.numel(); ++i) ts.zeros += static_cast<float>(p[info.offset + i]) == 0.0f;
    r.numel += ts.numel;
    r.zeros += ts.zeros;
    r.tensors.push_back(std::move(ts));
  }
  return r;
}

}  // namespace trident::prune
