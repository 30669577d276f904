#pragma once
/// @file core/tensor.hpp
/// Tensors: a pointer into a device allocation plus a strided layout.
///   tensor_view<T, Device>  non-owning, trivially copyable, cheap to pass by value
///   tensor<T, Device>       owning (move-only; clone() copies), always contiguous
/// Views are made by slicing, reshaping, transposing, permuting and broadcasting; none of
/// them copies. Every shape mismatch throws shape_error naming the shapes involved.

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../fwd.hpp"
#include "../precision/policy.hpp"
#include "concepts.hpp"
#include "error.hpp"
#include "kernels.hpp"
#include "shape.hpp"

namespace trident {

/// A strided window onto device memory.
/// @tparam T element type (float, double, half, bfloat16), const-qualified for read-only views
/// @tparam Device where the memory lives
template <class T, class Device = cpu>
class tensor_view {
  static_assert(element_type<T>, "trident::tensor_view<T>: T must be float, double, half or bfloat16");

 public:
  using element_type = T;
  using value_type = std::remove_const_t<T>;
  using device_type = Device;

  tensor_view() = default;
  /// A view of `data` with layout `l`.
  TRIDENT_HD tensor_view(T* data, const trident::layout& l) noexcept : data_(data), layout_(l) {}
  /// A contiguous row-major view of `data` with shape `s`.
  tensor_view(T* data, const trident::shape& s) noexcept : data_(data), layout_(s) {}
  /// Mutable views convert to read-only ones.
  template <class U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
  TRIDENT_HD tensor_view(const tensor_view<U, Device>& o) noexcept : data_(o.data()), layout_(o.layout()) {}

  TRIDENT_HD T* data() const noexcept { return data_; }
  TRIDENT_HD const trident::layout& layout() const noexcept { return layout_; }
  TRIDENT_HD const trident::shape& shape() const noexcept { return layout_.extents; }
  TRIDENT_HD const trident::strides& strides() const noexcept { return layout_.stride; }
  TRIDENT_HD int rank() const noexcept { return layout_.rank(); }
  TRIDENT_HD index_t numel() const noexcept { return layout_.numel(); }
  TRIDENT_HD index_t size(int dim) const noexcept { return layout_.extents[dim]; }
  TRIDENT_HD index_t stride(int dim) const noexcept { return layout_.stride[dim]; }
  TRIDENT_HD bool is_contiguous() const noexcept { return layout_.is_contiguous(); }
  TRIDENT_HD bool empty() const noexcept { return numel() == 0; }

  tensor_view view() const noexcept { return *this; }
  tensor_view<const T, Device> as_const() const noexcept { return *this; }

  /// Element access on host-accessible devices, one index per dimension.
  template <class... I>
    requires(sizeof...(I) <= max_rank && (std::is_integral_v<I> && ...))
  T& operator()(I... i) const noexcept {
    static_assert(Device::host_accessible, "tensor_view::operator(): this device's memory is not host accessible; copy to cpu first");
    const index_t idx[max_rank > sizeof...(I) ? max_rank : 1] = {static_cast<index_t>(i)...};
    return data_[layout_.offset(idx)];
  }

  /// Bounds-checked element access; throws shape_error naming the index and the shape.
  template <class... I>
    requires(sizeof...(I) <= max_rank && (std::is_integral_v<I> && ...))
  T& at(I... i) const {
    const index_t idx[max_rank] = {static_cast<index_t>(i)...};
    if (static_cast<int>(sizeof...(I)) != rank()) {
      throw shape_error("tensor_view::at: " + std::to_string(sizeof...(I)) + " indices for shape " + shape().str());
    }
    for (int d = 0; d < rank(); ++d) {
      if (idx[d] < 0 || idx[d] >= size(d)) {
        throw shape_error("tensor_view::at: index " + std::to_string(idx[d]) + " out of range in dimension " +
                          std::to_string(d) + " of shape " + shape().str());
      }
    }
    return (*this)(i...);
  }

  /// Elements [begin, end) with step `step` of dimension `dim` (negative dim counts from the end).
  tensor_view slice(int dim, index_t begin, index_t end, index_t step = 1) const {
    const int d = normalize_axis(dim, shape(), "tensor_view::slice");
    const index_t n = size(d);
    if (begin < 0) begin += n;
    if (end < 0) end += n;
    if (step <= 0 || begin < 0 || end > n || begin > end) {
      throw shape_error("tensor_view::slice: range [" + std::to_string(begin) + ", " + std::to_string(end) + ") step " +
                        std::to_string(step) + " is invalid for dimension " + std::to_string(d) + " of shape " +
                        shape().str());
    }
    trident::layout l = layout_;
    l.extents[d] = (end - begin + step - 1) / step;
    l.stride[d] = layout_.stride[d] * step;
    return tensor_view(data_ + begin * layout_.stride[d], l);
  }

  /// The sub-tensor at index `i` of dimension `dim`, one rank lower.
  tensor_view select(int dim, index_t i) const {
    const int d = normalize_axis(dim, shape(), "tensor_view::select");
    if (i < 0) i += size(d);
    if (i < 0 || i >= size(d)) {
      throw shape_error("tensor_view::select: index " + std::to_string(i) + " out of range for dimension " +
                        std::to_string(d) + " of shape " + shape().str());
    }
    index_array ext{}, st{};
    int r = 0;
    for (int k = 0; k < rank(); ++k) {
      if (k == d) continue;
      ext[r] = size(k);
      st[r++] = stride(k);
    }
    return tensor_view(data_ + i * stride(d), trident::layout(trident::shape(r, ext), st));
  }

  /// The same elements with another shape (at most one extent may be -1, inferred).
  /// Needs a contiguous view; call contiguous() first otherwise.
  tensor_view reshape(std::initializer_list<index_t> extents) const {
    index_array ext{};
    int r = 0, infer = -1;
    index_t known = 1;
    if (extents.size() > static_cast<std::size_t>(max_rank)) {
      throw shape_error("tensor_view::reshape: rank " + std::to_string(extents.size()) + " exceeds " + std::to_string(max_rank));
    }
    for (index_t e : extents) {
      if (e == -1 && infer < 0) {
        infer = r;
      } else if (e < 0) {
        throw shape_error("tensor_view::reshape: invalid extent " + std::to_string(e) + " reshaping " + shape().str());
      } else {
        known *= e;
      }
      ext[r++] = e;
    }
    if (infer >= 0) {
      if (known == 0 || numel() % known != 0) {
        throw shape_error("tensor_view::reshape: cannot infer -1 reshaping " + shape().str() + " to " + std::to_string(numel()) +
                          " elements");
      }
      ext[infer] = numel() / known;
    }
    return reshape(trident::shape(r, ext));
  }
  tensor_view reshape(const trident::shape& s) const {
    if (s.numel() != numel()) {
      throw shape_error("tensor_view::reshape: shape " + shape().str() + " (" + std::to_string(numel()) +
                        " elements) cannot be viewed as " + s.str() + " (" + std::to_string(s.numel()) + " elements)");
    }
    if (!is_contiguous()) {
      throw shape_error("tensor_view::reshape: the view " + layout_.str() + " is not contiguous; reshape a contiguous() copy to " +
                        s.str());
    }
    return tensor_view(data_, trident::layout(s));
  }

  /// Swaps two dimensions.
  tensor_view transpose(int d0, int d1) const {
    const int a = normalize_axis(d0, shape(), "tensor_view::transpose");
    const int b = normalize_axis(d1, shape(), "tensor_view::transpose");
    trident::layout l = layout_;
    std::swap(l.extents[a], l.extents[b]);
    std::swap(l.stride[a], l.stride[b]);
    return tensor_view(data_, l);
  }
  /// The transpose of a matrix (rank 2), or of the last two dimensions.
  tensor_view t() const {
    if (rank() < 2) throw shape_error("tensor_view::t: needs rank >= 2, got shape " + shape().str());
    return transpose(-2, -1);
  }

  /// Reorders dimensions: result dimension i is input dimension order[i].
  tensor_view permute(std::initializer_list<int> order) const {
    if (static_cast<int>(order.size()) != rank()) {
      throw shape_error("tensor_view::permute: " + std::to_string(order.size()) + " axes given for shape " + shape().str());
    }
    bool seen[max_rank] = {};
    index_array ext{}, st{};
    int i = 0;
    for (int o : order) {
      const int a = normalize_axis(o, shape(), "tensor_view::permute");
      if (seen[a]) throw shape_error("tensor_view::permute: axis " + std::to_string(a) + " repeated, shape " + shape().str());
      seen[a] = true;
      ext[i] = size(a);
      st[i++] = stride(a);
    }
    return tensor_view(data_, trident::layout(trident::shape(rank(), ext), st));
  }

  /// Inserts a dimension of extent 1 at `dim` (0..rank).
  tensor_view unsqueeze(int dim) const {
    if (rank() >= max_rank) throw shape_error("tensor_view::unsqueeze: shape " + shape().str() + " is already of maximum rank");
    const int d = dim < 0 ? dim + rank() + 1 : dim;
    if (d < 0 || d > rank()) {
      throw shape_error("tensor_view::unsqueeze: dimension " + std::to_string(dim) + " out of range for shape " + shape().str());
    }
    index_array ext{}, st{};
    for (int k = 0, j = 0; k <= rank(); ++k) {
      if (k == d) {
        ext[k] = 1;
        st[k] = 0;
      } else {
        ext[k] = size(j);
        st[k] = stride(j++);
      }
    }
    return tensor_view(data_, trident::layout(trident::shape(rank() + 1, ext), st));
  }

  /// Removes dimension `dim`, which must have extent 1.
  tensor_view squeeze(int dim) const {
    const int d = normalize_axis(dim, shape(), "tensor_view::squeeze");
    if (size(d) != 1) {
      throw shape_error("tensor_view::squeeze: dimension " + std::to_string(d) + " of shape " + shape().str() + " is not 1");
    }
    return select(d, 0);
  }

  /// A read-only view with shape `s`, stretching extent-1 dimensions (stride 0).
  tensor_view<const T, Device> broadcast_to(const trident::shape& s) const {
    return tensor_view<const T, Device>(data_, broadcast_layout(layout_, s, "tensor_view::broadcast_to"));
  }

 private:
  T* data_ = nullptr;
  trident::layout layout_ = empty_layout();
};

/// Anything that is a tensor or a view of one.
template <class X>
concept tensor_like = requires(const X& x) {
  typename X::value_type;
  typename X::device_type;
  { x.view() };
  { x.shape() } -> std::convertible_to<const shape&>;
};

/// An owning, contiguous tensor in memory of `Device`. Move-only: copies are explicit (clone()).
/// @tparam T element type (float, double, half, bfloat16)
/// @tparam Device where the memory lives
template <class T, class Device = cpu>
class tensor {
  static_assert(element_type<T> && !std::is_const_v<T>, "trident::tensor<T>: T must be float, double, half or bfloat16");
  static_assert(!std::is_same_v<Device, cuda> || device_policy<Device>,
                "trident::tensor<T, cuda>: the cuda device is not available in this translation unit; it needs nvcc "
                "and #include <trident/cuda.hpp>");
  static_assert(device_policy<Device>, "trident::tensor<T, Device>: Device is not a device policy");

 public:
  using element_type = T;
  using value_type = T;
  using device_type = Device;

  tensor() = default;
  /// A zero-filled tensor of shape `s`.
  explicit tensor(const trident::shape& s) : tensor(s, no_init) { fill_zero(); }
  explicit tensor(std::initializer_list<index_t> extents) : tensor(trident::shape(extents)) {}

  /// A tensor whose elements are left uninitialised (for outputs about to be overwritten).
  static tensor uninitialized(const trident::shape& s) { return tensor(s, no_init); }

  tensor(tensor&& o) noexcept : data_(std::exchange(o.data_, nullptr)), layout_(std::exchange(o.layout_, trident::empty_layout())) {}
  tensor& operator=(tensor&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      layout_ = std::exchange(o.layout_, trident::empty_layout());
    }
    return *this;
  }
  tensor(const tensor&) = delete;
  tensor& operator=(const tensor&) = delete;
  ~tensor() { release(); }

  tensor_view<T, Device> view() noexcept { return {data_, layout_}; }
  tensor_view<const T, Device> view() const noexcept { return {data_, layout_}; }
  operator tensor_view<T, Device>() noexcept { return view(); }
  operator tensor_view<const T, Device>() const noexcept { return view(); }

  T* data() noexcept { return data_; }
  const T* data() const noexcept { return data_; }
  const trident::layout& layout() const noexcept { return layout_; }
  const trident::shape& shape() const noexcept { return layout_.extents; }
  const trident::strides& strides() const noexcept { return layout_.stride; }
  int rank() const noexcept { return layout_.rank(); }
  index_t numel() const noexcept { return layout_.numel(); }
  index_t size(int dim) const noexcept { return layout_.extents[dim]; }
  index_t stride(int dim) const noexcept { return layout_.stride[dim]; }
  bool is_contiguous() const noexcept { return true; }
  bool empty() const noexcept { return numel() == 0; }
  std::size_t bytes() const noexcept { return static_cast<std::size_t>(numel()) * sizeof(T); }

  template <class... I>
  T& operator()(I... i) noexcept {
    return view()(i...);
  }
  template <class... I>
  const T& operator()(I... i) const noexcept {
    return view()(i...);
  }
  template <class... I>
  T& at(I... i) {
    return view().at(i...);
  }
  template <class... I>
  const T& at(I... i) const {
    return view().at(i...);
  }

  // View-returning operations, forwarded (see tensor_view).
  auto slice(int dim, index_t b, index_t e, index_t step = 1) { return view().slice(dim, b, e, step); }
  auto slice(int dim, index_t b, index_t e, index_t step = 1) const { return view().slice(dim, b, e, step); }
  auto select(int dim, index_t i) { return view().select(dim, i); }
  auto select(int dim, index_t i) const { return view().select(dim, i); }
  auto reshape(std::initializer_list<index_t> s) { return view().reshape(s); }
  auto reshape(std::initializer_list<index_t> s) const { return view().reshape(s); }
  auto reshape(const trident::shape& s) { return view().reshape(s); }
  auto reshape(const trident::shape& s) const { return view().reshape(s); }
  auto transpose(int a, int b) { return view().transpose(a, b); }
  auto transpose(int a, int b) const { return view().transpose(a, b); }
  auto t() { return view().t(); }
  auto t() const { return view().t(); }
  auto permute(std::initializer_list<int> o) { return view().permute(o); }
  auto permute(std::initializer_list<int> o) const { return view().permute(o); }
  auto unsqueeze(int d) { return view().unsqueeze(d); }
  auto unsqueeze(int d) const { return view().unsqueeze(d); }
  auto squeeze(int d) { return view().squeeze(d); }
  auto squeeze(int d) const { return view().squeeze(d); }
  auto broadcast_to(const trident::shape& s) const { return view().broadcast_to(s); }

  /// A deep copy on the same device.
  tensor clone() const {
    tensor out(shape(), no_init);
    if (numel()) kernels<Device>::copy_within(out.data_, data_, bytes());
    return out;
  }

 private:
  struct no_init_t {};
  static constexpr no_init_t no_init{};

  tensor(const trident::shape& s, no_init_t) : layout_(s) {
    const std::size_t n = static_cast<std::size_t>(s.numel()) * sizeof(T);
    data_ = static_cast<T*>(Device::allocate(n));
  }
  void fill_zero() {
    if (numel()) kernels<Device>::fill(view(), 0.0);
  }
  void release() noexcept {
    Device::deallocate(data_, bytes());
    data_ = nullptr;
    layout_ = trident::empty_layout();
  }

  T* data_ = nullptr;
  trident::layout layout_ = trident::empty_layout();
};

/// The read-only view of a tensor or view.
template <tensor_like X>
auto cview(const X& x) noexcept {
  return tensor_view<const typename X::value_type, typename X::device_type>(x.view());
}

}  // namespace trident
