#pragma once
/// @file nn/parameters.hpp
/// A model's parameters and gradients in flat, aligned buffers, one per role, with a view per
/// tensor into each. Optimizers and (later) sharding work on the flat buffers; modules see
/// their tensors.
///
///   params   storage type (what kernels read: fp32, bf16 or fp16)
///   grads    gradient type (fp32, or fp16 under fp16_mixed)
///   master   fp32 copy the optimizer updates; under fp32 it *is* params (no second copy)
///
/// Use: modules declare() their tensors while the model is built, the model calls
/// allocate() once, then handles give views. Each tensor starts on a 64-byte boundary.
///
/// Data parallel and ZeRO (parallel/zero.hpp) need three things of the store: buffers that
/// divide into equal, aligned partitions, one per rank (pad_to_multiple() grows them with
/// zero padding at the end); from ZeRO stage 1 on, no full fp32 master copy: each rank
/// keeps only its partition of it, so release_master() frees the store's copy once the
/// partitioned step has taken its partition; and, from stage 2 on, no full gradient buffer
/// (stage 3: no full params either): release_grads() / release_params() free them and a
/// `residency` installed by the step says where each tensor's gradient (params) lives while
/// backward (forward) needs it. param(h) and grad(h) keep working; the flat params() and
/// grads() then throw, naming the reason.

#include <cstddef>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/policy.hpp"
#include "../core/tensor.hpp"
#include "../ops/fill.hpp"
#include "../ops/transfer.hpp"

namespace trident::nn {

/// One declared parameter tensor.
struct parameter_info {
  std::string name;           ///< e.g. "fc1.weight"
  shape extents;              ///< its shape
  index_t offset = 0;         ///< first element in the flat buffers
  bool weight_decay = true;   ///< in the decayed parameter group (false for biases and norms)
  index_t numel() const noexcept { return extents.numel(); }
};

/// Refers to a declared parameter (an index into the store).
struct parameter_handle {
  int index = -1;
  bool valid() const noexcept { return index >= 0; }
};

/// Told by a parameter_store, during backward, that a tensor's gradient is final for this
/// backward pass (parameter_store::grad_ready). Data parallel listens to start reducing the
/// gradients of the layers backward has finished while it still runs on the earlier ones.
class gradient_listener {
 public:
  /// Tensor `index` (declaration order) has received its last contribution of this backward.
  virtual void gradient_ready(int index) = 0;

 protected:
  ~gradient_listener() = default;
};

/// The flat parameter, gradient and master buffers of one model.
/// @tparam Policy the policy bundle (precision and device)
template <policy_bundle Policy>
class parameter_store {
 public:
  using policy_type = Policy;
  using device = typename Policy::device;
  using storage_type = typename Policy::storage_type;
  using gradient_type = typename Policy::gradient_type;
  using master_type = typename Policy::master_type;
  /// Whether master weights are a separate copy (mixed precision) or the params themselves.
  static constexpr bool separate_master = !std::is_same_v<storage_type, master_type>;
  /// Elements per alignment unit: every tensor starts on a 64-byte boundary in every buffer.
  static constexpr index_t align_elements = 64 / sizeof(gradient_type) > 64 / sizeof(storage_type)
                                                ? 64 / sizeof(gradient_type)
                                                : 64 / sizeof(storage_type);

  /// Where the gradients (and params) of tensors live once the flat buffers are released: a
  /// ZeRO stage 2 or 3 step implements it, handing out a buffer per group of tensors on first
  /// use and reducing (releasing) it when backward (forward) is done with it.
  class residency {
   public:
    /// The params of tensor `index` (ZeRO-3: gathered on demand).
    virtual storage_type* param_data(int index) = 0;
    /// The gradient of tensor `index`, to accumulate into (zero before its first use).
    virtual gradient_type* grad_data(int index) = 0;
    /// What zero_grad() does once the flat gradients are released.
    virtual void zero_grad() = 0;

   protected:
    ~residency() = default;
  };

  parameter_store() = default;
  parameter_store(const parameter_store&) = delete;
  parameter_store& operator=(const parameter_store&) = delete;

  /// Declares a tensor; only before allocate().
  parameter_handle declare(std::string name, const shape& extents, bool weight_decay = true) {
    if (allocated()) throw error("parameter_store::declare: '" + name + "' declared after allocate()");
    for (const auto& p : infos_) {
      if (p.name == name) throw error("parameter_store::declare: the name '" + name + "' is declared twice");
    }
    parameter_info info{std::move(name), extents, total_, weight_decay};
    total_ += (extents.numel() + align_elements - 1) / align_elements * align_elements;
    infos_.push_back(std::move(info));
    return parameter_handle{static_cast<int>(infos_.size()) - 1};
  }

  /// Allocates the flat buffers (zero-filled) once every tensor is declared.
  void allocate() {
    if (allocated()) throw error("parameter_store::allocate: already allocated");
    params_ = tensor<storage_type, device>({total_});
    grads_ = tensor<gradient_type, device>({total_});
    if constexpr (separate_master) master_ = tensor<master_type, device>({total_});
    allocated_ = true;
  }
  /// Whether allocate() has run.
  bool allocated() const noexcept { return allocated_; }

  /// Grows the flat buffers with zero padding at the end until size() is a multiple of
  /// `multiple` (which must itself be a multiple of align_elements, so that partitions start
  /// on 64-byte boundaries). Before allocate() it only changes the size to allocate; after, it
  /// reallocates and copies params, grads and master: views taken earlier are then invalid
  /// (modules take their views afresh at every call), and an optimizer bound to the old size
  /// refuses the new one. Data-parallel and ZeRO steps call it to partition the buffers evenly.
  void pad_to_multiple(index_t multiple) {
    if (multiple < 1 || multiple % align_elements != 0) {
      throw error("parameter_store::pad_to_multiple: " + std::to_string(multiple) + " is not a positive multiple of " +
                  std::to_string(align_elements) + " elements (the 64-byte alignment unit of this store)");
    }
    const index_t padded = (total_ + multiple - 1) / multiple * multiple;
    if (padded == total_) return;
    if (residency_ != nullptr) throw error("parameter_store::pad_to_multiple: the buffers were released; pad before that");
    if (allocated()) {
      if (master_released_) throw error("parameter_store::pad_to_multiple: the master weights were released; pad before that");
      params_ = grown(params_, padded);
      grads_ = grown(grads_, padded);
      if constexpr (separate_master) master_ = grown(master_, padded);
    }
    total_ = padded;
  }

  /// Frees the full fp32 master copy (mixed precision only; a no-op under fp32, where the
  /// params are the master). For ZeRO stage >= 1, whose step keeps each rank's partition of the
  /// master itself; master(), master_from_params() and params_from_master() then throw.
  void release_master() {
    if constexpr (separate_master) {
      checked(master_);
      master_ = tensor<master_type, device>();
      master_released_ = true;
    }
  }
  /// Whether release_master() freed the master copy.
  bool master_released() const noexcept { return master_released_; }

  /// Installs `r` (not owned; it must outlive its use) and frees the flat gradient buffer
  /// (ZeRO stage >= 2), and with `params` the flat params too (stage 3; and, under fp32, the
  /// master, which is the params). grad(h) (and param(h)) then ask `r`. Irreversible.
  void release_to(residency& r, bool params) {
    if (!allocated()) throw error("parameter_store::release_to: the store is not allocated");
    if (residency_ != nullptr) throw error("parameter_store::release_to: the buffers were already released to a residency");
    residency_ = &r;
    grads_ = tensor<gradient_type, device>();
    grads_released_ = true;
    if (params) {
      params_ = tensor<storage_type, device>();
      params_released_ = true;
    }
  }
  /// Forgets `r` (its owner is going away): grad(h) and param(h) of released buffers then throw.
  void detach(residency& r) noexcept {
    if (residency_ == &r) residency_ = nullptr;
  }
  /// Whether the flat gradients (params) were released to a residency.
  bool grads_released() const noexcept { return grads_released_; }
  bool params_released() const noexcept { return params_released_; }

  /// The declared tensors, in declaration (and buffer) order.
  const std::vector<parameter_info>& infos() const noexcept { return infos_; }
  const parameter_info& info(parameter_handle h) const { return infos_.at(static_cast<std::size_t>(h.index)); }
  /// Elements in each flat buffer, padding included.
  index_t size() const noexcept { return total_; }
  /// Parameters, padding excluded.
  index_t count() const noexcept {
    index_t n = 0;
    for (const auto& p : infos_) n += p.numel();
    return n;
  }

  tensor_view<storage_type, device> param(parameter_handle h) {
    if (params_released_) return tensor_view<storage_type, device>(resident().param_data(h.index), info(h).extents);
    return view_of(params_, h);
  }
  tensor_view<gradient_type, device> grad(parameter_handle h) {
    if (grads_released_) return tensor_view<gradient_type, device>(resident().grad_data(h.index), info(h).extents);
    return view_of(grads_, h);
  }
  tensor_view<master_type, device> master(parameter_handle h) {
    if constexpr (separate_master) {
      return view_of(master_, h);
    } else {
      return view_of(params_, h);
    }
  }

  /// The whole flat buffers (padding elements are zero and stay zero).
  tensor_view<storage_type, device> params() { return checked(params_).view(); }
  tensor_view<gradient_type, device> grads() { return checked(grads_).view(); }
  tensor_view<master_type, device> master() {
    if constexpr (separate_master) {
      return checked(master_).view();
    } else {
      return checked(params_).view();
    }
  }

  /// Sets every gradient to zero (start of an accumulation window).
  void zero_grad() {
    if (grads_released_) {
      resident().zero_grad();
      return;
    }
    fill(checked(grads_), 0.0);
  }

  /// What a module's backward calls once it has accumulated its last contribution of the pass
  /// into the gradient of `h`, a tensor it owns (a layer that uses another module's tensor, as
  /// a tied output head uses the token embedding, leaves the call to the owner, whose backward
  /// runs last). Tells the listener, if any; a no-op otherwise. Backward runs the modules in
  /// reverse order of declaration, so the gradients become final from the end of the flat
  /// buffer towards its start.
  void grad_ready(parameter_handle h) {
    if (listener_ != nullptr && h.valid()) listener_->gradient_ready(h.index);
  }
  /// Installs the listener grad_ready() tells (nullptr: none). Not owned; one at a time.
  void set_gradient_listener(gradient_listener* l) noexcept { listener_ = l; }
  gradient_listener* listener() const noexcept { return listener_; }

  /// After initialising params (or loading them): master = params. No-op under fp32.
  void master_from_params() {
    if constexpr (separate_master) copy(checked(params_), checked(master_));
  }
  /// After an optimizer step on master: params = master rounded to the storage type.
  void params_from_master() {
    if constexpr (separate_master) copy(checked(master_), params_);
  }

  /// Bytes held in the flat buffers for parameters, gradients and master weights (those
  /// released excluded).
  std::size_t bytes() const noexcept {
    return static_cast<std::size_t>(total_) * ((params_released_ ? 0 : sizeof(storage_type)) + (grads_released_ ? 0 : sizeof(gradient_type)) +
                                               (separate_master && !master_released_ ? sizeof(master_type) : 0));
  }

 private:
  residency& resident() const {
    if (residency_ == nullptr) {
      throw error("parameter_store: the flat buffers were released to a ZeRO step that no longer exists (a store whose "
                  "gradients or params a parallel::distributed_step partitioned lives only as long as that step)");
    }
    return *residency_;
  }
  template <class T>
  tensor<T, device>& checked(tensor<T, device>& t) {
    if (!allocated()) throw error("parameter_store: used before allocate()");
    if constexpr (std::is_same_v<T, gradient_type>) {
      if (&t == &grads_ && grads_released_) {
        throw error("parameter_store: the flat gradient buffer was released (ZeRO stage >= 2 keeps each rank's reduced "
                    "gradient shard in its parallel::distributed_step; grad(h) still gives a tensor's gradient during backward)");
      }
    }
    if constexpr (std::is_same_v<T, storage_type>) {
      if (&t == &params_ && params_released_) {
        throw error("parameter_store: the flat params were released (ZeRO stage 3 keeps each rank's partition; param(h) "
                    "gathers a tensor on demand, and parallel::distributed_step::gather_params gives them all)");
      }
    }
    if constexpr (std::is_same_v<T, master_type> && separate_master) {
      if (&t == &master_ && master_released_) {
        throw error("parameter_store: the full master weights were released (ZeRO stage >= 1 keeps each rank's partition "
                    "in its parallel::distributed_step; use its master() and master_from_params())");
      }
    }
    return t;
  }
  template <class T>
  static tensor<T, device> grown(tensor<T, device>& t, index_t n) {
    tensor<T, device> g({n});
    copy(t.view(), g.view().slice(0, 0, t.numel()));
    return g;
  }
  template <class T>
  tensor_view<T, device> view_of(tensor<T, device>& flat, parameter_handle h) {
    const auto& p = info(h);
    return checked(flat).view().slice(0, p.offset, p.offset + p.numel()).reshape(p.extents);
  }

  std::vector<parameter_info> infos_;
  index_t total_ = 0;
  bool allocated_ = false;
  bool master_released_ = false;
  gradient_listener* listener_ = nullptr;
  residency* residency_ = nullptr;
  bool grads_released_ = false;
  bool params_released_ = false;
  tensor<storage_type, device> params_;
  tensor<gradient_type, device> grads_;
  tensor<master_type, device> master_;
};

}  // namespace trident::nn
