#pragma once
/// @file optim/optimizer.hpp
/// What every trident optimizer shares: hyperparameter checks, parameter groups, the flat fp32
/// state buffers, and the driver of the fused step.
///
/// An optimizer is an object holding hyperparameters (ensmallen's shape); the state it needs
/// (momentum, second moments, ...) is created for a parameter store the first time it steps on
/// it (or explicitly with init(), e.g. before loading a checkpoint into state_tensors()). State
/// buffers are fp32 and laid out exactly like the store's flat buffers: element i of
/// "exp_avg" belongs to element i of params()/grads()/master().
///
/// The step is one pass over the flat buffers (LAMB: two, its trust ratio needs the norms
/// first): it reads each gradient in the gradient type (fp32, or half under fp16_mixed) and
/// widens it to float, multiplies it by the caller's `grad_scale` (1 / loss scale, times the
/// clipping factor: unscaling and clipping cost no pass of their own), updates the fp32 master
/// weights and the state, and writes the params buffer in the storage type (the master rounded
/// to nearest even under bf16_mixed/fp16_mixed, so no params_from_master() pass is needed).
///
/// Gradient accumulation: step() does not zero the gradients (unless set_zero_grad_in_step()
/// asks it to, for loops without accumulation). Accumulate over micro-batches, step once, then
/// call store.zero_grad() at the accumulation boundary (and scale the loss or the grad_scale
/// by 1/accumulation_steps if the accumulated gradient should be a mean).
///
/// Partitioned steps (ZeRO): every optimizer also steps a contiguous range [begin, end) of the
/// flat buffers alone, given as a flat_shard: that range's gradients, fp32 master and params,
/// each in memory of its own (a rank's reduced gradient shard, its master partition, its slice
/// of the full params). The state is then allocated for the range only (state element k
/// belongs to flat element begin + k, and state_tensors() are range-sized), so N ranks
/// stepping N disjoint ranges hold 1/N of the state each. The update of each element is the
/// same arithmetic as in the whole-store step; LAMB, whose trust ratio needs per-tensor norms
/// over the whole tensor, adds up its partial norms across ranks through the shard's
/// sum_across_ranks. An optimizer is bound to one range for its lifetime.
///
/// Parameter groups: by default two, from parameter_info::weight_decay: "decay" (the
/// optimizer's weight_decay) and "no_decay" (weight decay 0: biases, norms). Custom groups
/// (group_spec) take the tensors their predicate selects, first match wins, with their own lr
/// multiplier and weight decay; tensors no custom group takes fall into the two default groups.
/// A group's lr is optimizer.lr() * lr_scale, so a scheduler's set_lr() moves every group
/// (DeepSpeed's schedulers give every group the same lr; lr_scale is our extension for
/// layer-wise rates).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../backend/cpu/device.hpp"
#include "../backend/cpu/parallel.hpp"
#include "../core/error.hpp"
#include "../nn/parameters.hpp"
#include "../precision/convert.hpp"

namespace trident::optim {

/// Selects tensors of a store for a custom parameter group.
using tensor_predicate = std::function<bool(const nn::parameter_info&)>;

/// Selects the tensors with exactly these names.
inline tensor_predicate names(std::vector<std::string> list) {
  return [list = std::move(list)](const nn::parameter_info& p) {
    return std::find(list.begin(), list.end(), p.name) != list.end();
  };
}

/// Selects the tensors whose name starts with `prefix` (e.g. "encoder.").
inline tensor_predicate prefix(std::string prefix) {
  return [prefix = std::move(prefix)](const nn::parameter_info& p) { return p.name.rfind(prefix, 0) == 0; };
}

/// A custom parameter group: which tensors, and how their hyperparameters differ.
struct group_spec {
  std::string name{};                  ///< for messages and groups()
  tensor_predicate selects{};          ///< the tensors this group takes (first matching group wins)
  double lr_scale = 1.0;               ///< the group's lr is optimizer lr() * lr_scale
  std::optional<double> weight_decay{};  ///< unset: the optimizer's weight_decay
};

/// A resolved parameter group: the tensors (indices into the store's infos()) it holds.
struct param_group {
  std::string name;
  double lr_scale = 1.0;
  std::optional<double> weight_decay{};  ///< unset: follows the optimizer's weight_decay
  std::vector<int> tensors;
};

/// A named flat view of optimizer state, laid out like the store's flat buffers.
struct state_tensor {
  std::string name;  ///< PyTorch's state key: "exp_avg", "exp_avg_sq", "momentum_buffer", "sum"
  tensor_view<float, cpu> values;
};

/// The partition of a store's flat buffers that one step updates (ZeRO: this rank's), and the
/// memory holding it. Pointers address flat element `begin` (element k is flat element
/// begin + k); `master` and `params` may be the same memory (fp32, where the params are the
/// master). A step on a shard never clears gradients (they are a reduced copy, not the store's).
/// @tparam Policy the policy bundle of the store the shard is of
template <policy_bundle Policy>
struct flat_shard {
  index_t begin = 0;  ///< first flat element of the range
  index_t end = 0;    ///< one past the last
  const typename Policy::gradient_type* grads = nullptr;  ///< the range's gradients (e.g. reduce-scattered)
  float* master = nullptr;                               ///< the range's fp32 master weights, updated in place
  typename Policy::storage_type* params = nullptr;       ///< receives the master rounded to the storage type
  /// Sums `n` doubles element-wise over every rank stepping a shard of the same store (an
  /// all-reduce); empty for a single shard. LAMB calls it once per step with its per-tensor
  /// partial norms; the other optimizers never call it.
  std::function<void(double*, index_t)> sum_across_ranks{};
  /// Elements in the range.
  index_t size() const noexcept { return end - begin; }
};

namespace detail {

/// The flat range of one tensor (with the padding up to the next one) and its group.
struct segment {
  index_t begin = 0;
  index_t end = 0;
  int tensor = 0;
  int group = 0;
};

inline std::string format_value(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

/// Elements per block: gradients are widened and params narrowed through L1-resident buffers.
inline constexpr index_t block_elements = 1024;
/// Elements a thread gets at least (small stores run on one thread).
inline constexpr index_t min_chunk_elements = index_t{1} << 15;
/// Chunk boundaries are multiples of this: 64-byte aligned in every buffer (half and float).
inline constexpr index_t chunk_align_elements = 64;

/// Runs body(segment, k, count, g, chunk) over the flat range [begin, end) in blocks, threads
/// splitting the range. `grads`, `master`, `params` and `clear` address flat element `begin`,
/// and k is the block's index relative to it (flat element begin + k), as is the state of an
/// optimizer bound to that range. `g` points at `count` gradients as float (widened from G
/// when G is not float; nullptr when ReadGrads is false). After each block, with WriteParams
/// and a separate master, the block of master is rounded into the params buffer; with
/// `clear` (the gradients, writable), the block of gradients is zeroed while it is still in cache.
template <bool ReadGrads, bool WriteParams, class G, class S, class Body>
void fused_pass(const std::vector<segment>& segs, index_t begin, index_t end, const G* grads, const float* master, S* params,
                Body&& body, G* clear = nullptr) {
  cpu_kernels::parallel_chunks(end - begin, min_chunk_elements, chunk_align_elements, [&](index_t lb, index_t le, int chunk) {
    alignas(64) float gbuf[block_elements];
    const index_t b = begin + lb, e = begin + le;
    // first segment that ends after b
    auto it = std::upper_bound(segs.begin(), segs.end(), b, [](index_t v, const segment& s) { return v < s.end; });
    for (; it != segs.end() && it->begin < e; ++it) {
      const index_t lo = std::max(b, it->begin), hi = std::min(e, it->end);
      for (index_t i = lo; i < hi; i += block_elements) {
        const index_t m = std::min(block_elements, hi - i);
        const index_t k = i - begin;
        const float* g = nullptr;
        if constexpr (ReadGrads) {
          if constexpr (std::is_same_v<G, float>) {
            g = grads + k;
          } else {
            simd::convert(grads + k, gbuf, static_cast<std::size_t>(m));
            g = gbuf;
          }
        }
        body(*it, k, m, g, chunk);
        if (clear != nullptr) std::memset(static_cast<void*>(clear + k), 0, static_cast<std::size_t>(m) * sizeof(G));
        if constexpr (WriteParams && !std::is_same_v<S, float>) {
          simd::convert(master + k, params + k, static_cast<std::size_t>(m));
        }
      }
    }
  });
}

/// The whole store as one shard (what the store-wide step() runs on).
template <class Policy>
flat_shard<Policy> whole_store(nn::parameter_store<Policy>& store) {
  if (!store.allocated()) return {};
  return {0, store.size(), store.grads().data(), store.master().data(), store.params().data(), {}};
}

}  // namespace detail

/// The part of every optimizer that does not depend on its update rule: lr, step count,
/// parameter groups, the binding to a store's layout, and the state buffers.
class optimizer_base {
 public:
  /// The base learning rate (a group's lr is this times its lr_scale).
  double lr() const noexcept { return lr_; }
  /// Sets the base learning rate (schedulers call this); must be finite and >= 0.
  void set_lr(double lr) {
    check_lr(name_, lr);
    lr_ = lr;
  }
  /// The weight decay of the "decay" group and of custom groups that do not set their own.
  double weight_decay() const noexcept { return weight_decay_; }
  /// Sets that weight decay; must be >= 0.
  void set_weight_decay(double wd) {
    check_non_negative(name_, "weight_decay", wd);
    weight_decay_ = wd;
  }
  /// Steps taken (PyTorch's state["step"]; bias corrections use it).
  std::int64_t step_count() const noexcept { return step_; }
  /// Restores the step count (checkpoint resume, after filling state_tensors()).
  void set_step_count(std::int64_t n) {
    if (n < 0) throw error(std::string(name_) + ": set_step_count: the step count must be >= 0, got " + std::to_string(n));
    step_ = n;
    on_step_count_restored();
  }
  /// The resolved parameter groups (empty until the optimizer is bound to a store).
  const std::vector<param_group>& groups() const noexcept { return groups_; }
  /// The custom group specifications given at construction.
  const std::vector<group_spec>& group_specs() const noexcept { return specs_; }
  /// Whether state exists (the optimizer has been bound to a store).
  bool initialized() const noexcept { return bound_; }
  /// The flat range [begin, end) of the store the state covers (the whole store unless the
  /// optimizer steps a shard); {0, 0} before it is bound.
  std::pair<index_t, index_t> bound_range() const noexcept { return {begin_, end_}; }
  /// Bytes of optimizer state held (fp32 buffers over the bound range).
  std::size_t state_bytes() const noexcept {
    std::size_t b = 0;
    for (const auto& t : state_) b += static_cast<std::size_t>(t.numel()) * sizeof(float);
    return b;
  }
  /// Whether step() also zeroes the gradients (default false). The step clears each block of
  /// gradients right after reading it, while it is in cache, which replaces the separate pass
  /// of store.zero_grad() (as PyTorch's zero_grad(set_to_none=True) skips its own). Only for
  /// loops that zero the gradients after every step: not with gradient accumulation across
  /// steps, nor where a step may be skipped (a loss scaler's overflow) and zero_grad() must
  /// still run.
  bool zero_grad_in_step() const noexcept { return zero_grad_in_step_; }
  void set_zero_grad_in_step(bool on) noexcept { zero_grad_in_step_ = on; }
  /// The state buffers by PyTorch's names, as flat fp32 views over the store's layout.
  std::vector<state_tensor> state_tensors() {
    std::vector<state_tensor> out;
    for (std::size_t i = 0; i < state_.size(); ++i) out.push_back({state_names_[i], state_[i].view()});
    return out;
  }
  /// The optimizer's name, as error messages spell it ("adamw", "sgd", ...).
  const char* name() const noexcept { return name_; }

  virtual ~optimizer_base() = default;
  optimizer_base(const optimizer_base&) = delete;
  optimizer_base& operator=(const optimizer_base&) = delete;
  optimizer_base(optimizer_base&&) = default;
  optimizer_base& operator=(optimizer_base&&) = default;

 protected:
  optimizer_base(const char* name, double lr, std::vector<group_spec> specs) : name_(name), specs_(std::move(specs)) {
    set_lr(lr);
    for (const auto& s : specs_) {
      if (!s.selects) throw error(std::string(name_) + ": parameter group '" + s.name + "' has no predicate (selects)");
      if (!(std::isfinite(s.lr_scale) && s.lr_scale >= 0)) {
        throw error(std::string(name_) + ": parameter group '" + s.name + "': lr_scale must be finite and >= 0, got " +
                    detail::format_value(s.lr_scale));
      }
      if (s.weight_decay) check_non_negative(name_, ("weight_decay of group '" + s.name + "'").c_str(), *s.weight_decay);
    }
  }

  static void check_lr(const char* who, double lr) {
    if (!(std::isfinite(lr) && lr >= 0)) {
      throw error(std::string(who) + ": invalid learning rate " + detail::format_value(lr) + " (must be finite and >= 0)");
    }
  }
  static void check_non_negative(const char* who, const char* what, double v) {
    if (!(std::isfinite(v) && v >= 0)) {
      throw error(std::string(who) + ": invalid " + what + " " + detail::format_value(v) + " (must be finite and >= 0)");
    }
  }
  static void check_beta(const char* who, const char* what, double v) {
    if (!(v >= 0 && v < 1)) throw error(std::string(who) + ": invalid " + what + " " + detail::format_value(v) + " (must be in [0, 1))");
  }
  // eps > 0 (PyTorch allows 0): padding elements have zero gradient and zero state, and 0 / (0 + eps)
  // must stay 0, not become NaN.
  static void check_eps(const char* who, double v) {
    if (!(std::isfinite(v) && v > 0)) throw error(std::string(who) + ": invalid eps " + detail::format_value(v) + " (must be finite and > 0)");
  }
  void check_grad_scale(double s) const {
    if (!(std::isfinite(s) && s > 0)) {
      throw error(std::string(name_) + "::step: grad_scale must be finite and > 0, got " + detail::format_value(s) +
                  " (check for overflow before stepping: optim::grad_norm reports non-finite gradients)");
    }
  }

  /// Resolves groups and segments for `store` and allocates state for the flat range [begin,
  /// end) (the whole store by default) the first time; later calls check that the store has
  /// the layout, and the range is the one, the state was made for.
  template <class Policy>
  void bind(nn::parameter_store<Policy>& store, index_t begin = 0, index_t end = -1) {
    static_assert(std::is_same_v<typename Policy::device, cpu>,
                  "trident::optim: the fused optimizer step runs on the cpu device; for a cuda parameter store use "
                  "ZeRO-Offload (optimizer state and step on the CPU)");
    if (!store.allocated()) {
      throw error(std::string(name_) + ": the parameter store is not allocated (call allocate() after declaring its tensors)");
    }
    if (end < 0) end = store.size();
    if (begin < 0 || begin > end || end > store.size()) {
      throw error(std::string(name_) + ": the range [" + std::to_string(begin) + ", " + std::to_string(end) +
                  ") is not inside the store's " + std::to_string(store.size()) + " flat elements");
    }
    const auto& infos = store.infos();
    if (bound_) {
      bool same = size_ == store.size() && layout_.size() == infos.size();
      for (std::size_t i = 0; same && i < infos.size(); ++i) same = layout_[i] == infos[i].offset;
      if (!same) {
        throw error(std::string(name_) + ": this optimizer's state was created for a parameter store of " +
                    std::to_string(size_) + " elements in " + std::to_string(layout_.size()) + " tensors; this store has " +
                    std::to_string(store.size()) + " elements in " + std::to_string(infos.size()) + " tensors");
      }
      if (begin != begin_ || end != end_) {
        throw error(std::string(name_) + ": this optimizer's state covers flat elements [" + std::to_string(begin_) + ", " +
                    std::to_string(end_) + ") of its store; it cannot step [" + std::to_string(begin) + ", " + std::to_string(end) +
                    ") (one optimizer per partition)");
      }
      return;
    }
    groups_.clear();
    for (const auto& s : specs_) groups_.push_back({s.name, s.lr_scale, s.weight_decay, {}});
    const int decay_group = static_cast<int>(groups_.size());
    groups_.push_back({"decay", 1.0, std::nullopt, {}});
    groups_.push_back({"no_decay", 1.0, 0.0, {}});
    segs_.clear();
    layout_.clear();
    for (std::size_t t = 0; t < infos.size(); ++t) {
      int g = -1;
      for (std::size_t s = 0; s < specs_.size() && g < 0; ++s) {
        if (specs_[s].selects(infos[t])) g = static_cast<int>(s);
      }
      if (g < 0) g = infos[t].weight_decay ? decay_group : decay_group + 1;
      groups_[static_cast<std::size_t>(g)].tensors.push_back(static_cast<int>(t));
      const index_t end = t + 1 < infos.size() ? infos[t + 1].offset : store.size();
      segs_.push_back({infos[t].offset, end, static_cast<int>(t), g});
      layout_.push_back(infos[t].offset);
    }
    for (std::size_t s = 0; s < specs_.size(); ++s) {
      if (groups_[s].tensors.empty()) {
        throw error(std::string(name_) + ": parameter group '" + specs_[s].name + "' selects no tensor of the store" +
                    (infos.empty() ? std::string() : " (first tensor: '" + infos.front().name + "')"));
      }
    }
    size_ = store.size();
    begin_ = begin;
    end_ = end;
    tensor_names_.clear();
    for (const auto& p : infos) tensor_names_.push_back(p.name);
    allocate_state();
    bound_ = true;
  }

  /// Adds a zero-filled (or `init`-filled) fp32 state buffer over the bound range.
  void add_state(std::string name, double init = 0.0) {
    // Filled by the threads and chunks that will step it (first touch); no kernel table needed.
    auto t = tensor<float>::uninitialized(trident::shape({end_ - begin_}));
    float* d = t.data();
    const float v = static_cast<float>(init);
    cpu_kernels::parallel_chunks(t.numel(), detail::min_chunk_elements, detail::chunk_align_elements,
                                 [&](index_t b, index_t e, int) { std::fill(d + b, d + e, v); });
    state_.push_back(std::move(t));
    state_names_.push_back(std::move(name));
  }
  float* state_data(std::size_t i) noexcept { return state_[i].data(); }

  /// The gradients for fused_pass to clear: `grads` when zero_grad_in_step(), else nullptr.
  template <class G>
  G* grads_to_clear(G* grads) const noexcept {
    return zero_grad_in_step_ ? grads : nullptr;
  }

  /// Weight decay of group g: its own, else the optimizer's.
  double group_weight_decay(std::size_t g) const { return groups_[g].weight_decay.value_or(weight_decay_); }

  /// An optimizer's options `o` with the values that can change after construction (lr from
  /// schedulers, weight decay) as they are now: what hyperparameters() returns.
  template <class Options>
  Options current(Options o) const {
    o.lr = lr_;
    o.weight_decay = weight_decay_;
    return o;
  }

  /// Checks a shard against `store` and binds the optimizer to its range.
  template <class Policy>
  void bind_shard(nn::parameter_store<Policy>& store, const flat_shard<Policy>& s) {
    if (!store.allocated()) {
      throw error(std::string(name_) + ": the parameter store is not allocated (call allocate() after declaring its tensors)");
    }
    if (s.begin < 0 || s.begin > s.end || s.end > store.size()) {
      throw error(std::string(name_) + "::step: the shard [" + std::to_string(s.begin) + ", " + std::to_string(s.end) +
                  ") is not inside the store's " + std::to_string(store.size()) + " flat elements");
    }
    if (s.size() > 0 && (s.grads == nullptr || s.master == nullptr || s.params == nullptr)) {
      throw error(std::string(name_) + "::step: the shard [" + std::to_string(s.begin) + ", " + std::to_string(s.end) +
                  ") lacks its " + (s.grads == nullptr ? "gradients" : s.master == nullptr ? "master weights" : "params"));
    }
    bind(store, s.begin, s.end);
  }

  /// Subclasses create their state buffers here (add_state).
  virtual void allocate_state() = 0;
  virtual void on_step_count_restored() {}

  const char* name_;
  double lr_ = 0;
  double weight_decay_ = 0;  ///< set by each optimizer from its options
  std::int64_t step_ = 0;
  std::vector<group_spec> specs_;
  std::vector<param_group> groups_;
  std::vector<detail::segment> segs_;
  std::vector<index_t> layout_;  ///< tensor offsets of the bound store
  std::vector<std::string> tensor_names_;
  index_t size_ = 0;    ///< flat elements of the bound store
  index_t begin_ = 0;   ///< the bound range [begin_, end_) the state covers
  index_t end_ = 0;
  bool bound_ = false;
  bool zero_grad_in_step_ = false;
  std::vector<tensor<float>> state_;
  std::vector<std::string> state_names_;
};

}  // namespace trident::optim
