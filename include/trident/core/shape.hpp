#pragma once
/// @file shape.hpp
/// Shapes and strided layouts of up to five dimensions. Plain trivially copyable values,
/// usable on host and device; a tensor is storage plus one of these (as in CuTe).

#include <cstdint>
#include <initializer_list>
#include <string>

#include "../config.hpp"
#include "error.hpp"

namespace trident {

/// Most dimensions a tensor may have.
inline constexpr int max_rank = 5;

/// A fixed array of max_rank indices (a plain aggregate, so device code can index it).
struct index_array {
  index_t v[max_rank]{};
  TRIDENT_HD constexpr index_t& operator[](int i) noexcept { return v[i]; }
  TRIDENT_HD constexpr index_t operator[](int i) const noexcept { return v[i]; }
};

/// Strides in elements, one per dimension.
using strides = index_array;

/// The extents of a tensor: rank <= max_rank, each extent >= 0.
class shape {
 public:
  constexpr shape() noexcept = default;
  constexpr shape(std::initializer_list<index_t> extents) : rank_(static_cast<int>(extents.size())) {
    if (extents.size() > static_cast<std::size_t>(max_rank)) {
      throw shape_error("trident::shape: rank " + std::to_string(extents.size()) + " exceeds the maximum of " +
                        std::to_string(max_rank));
    }
    int i = 0;
    for (index_t e : extents) {
      if (e < 0) throw shape_error("trident::shape: negative extent " + std::to_string(e));
      ext_[i++] = e;
    }
  }
  /// From a rank and an array of extents (the first `rank` are used).
  constexpr shape(int rank, const index_array& extents) : ext_{}, rank_(rank) {
    if (rank < 0 || rank > max_rank) throw shape_error("trident::shape: rank " + std::to_string(rank) + " out of range");
    for (int i = 0; i < rank; ++i) {
      if (extents[i] < 0) throw shape_error("trident::shape: negative extent " + std::to_string(extents[i]));
      ext_[i] = extents[i];
    }
  }

  TRIDENT_HD constexpr int rank() const noexcept { return rank_; }
  TRIDENT_HD constexpr index_t operator[](int i) const noexcept { return ext_[i]; }
  TRIDENT_HD constexpr index_t& operator[](int i) noexcept { return ext_[i]; }
  /// Number of elements (1 for rank 0).
  TRIDENT_HD constexpr index_t numel() const noexcept {
    index_t n = 1;
    for (int i = 0; i < rank_; ++i) n *= ext_[i];
    return n;
  }
  constexpr const index_t* begin() const noexcept { return ext_.v; }
  constexpr const index_t* end() const noexcept { return ext_.v + rank_; }

  friend constexpr bool operator==(const shape& a, const shape& b) noexcept {
    if (a.rank_ != b.rank_) return false;
    for (int i = 0; i < a.rank_; ++i)
      if (a.ext_[i] != b.ext_[i]) return false;
    return true;
  }

  /// "(2, 3, 4)"; rank 0 is "()".
  std::string str() const {
    std::string s = "(";
    for (int i = 0; i < rank_; ++i) {
      if (i) s += ", ";
      s += std::to_string(ext_[i]);
    }
    return s + ")";
  }

 private:
  index_array ext_{};
  int rank_ = 0;
};


/// Row-major (C order) strides of a shape.
TRIDENT_HD constexpr strides contiguous_strides(const shape& s) noexcept {
  strides st{};
  index_t step = 1;
  for (int i = s.rank() - 1; i >= 0; --i) {
    st[i] = step;
    step *= s[i];
  }
  return st;
}

/// A shape with a stride per dimension: where element (i0, ..., ir) lives relative to the
/// view's base pointer. Broadcast dimensions have stride 0.
struct layout {
  shape extents{};  ///< extent per dimension
  strides stride{};  ///< stride per dimension, in elements

  constexpr layout() noexcept = default;
  constexpr layout(const shape& s) noexcept : extents(s), stride(contiguous_strides(s)) {}
  constexpr layout(const shape& s, const strides& st) noexcept : extents(s), stride(st) {}

  TRIDENT_HD constexpr int rank() const noexcept { return extents.rank(); }
  TRIDENT_HD constexpr index_t numel() const noexcept { return extents.numel(); }

  /// True when the elements are densely packed in row-major order (size-1 dims ignored).
  TRIDENT_HD constexpr bool is_contiguous() const noexcept {
    index_t step = 1;
    for (int i = rank() - 1; i >= 0; --i) {
      if (extents[i] == 1) continue;
      if (stride[i] != step) return false;
      step *= extents[i];
    }
    return true;
  }

  /// Offset in elements of a multi-index.
  TRIDENT_HD constexpr index_t offset(const index_t* idx) const noexcept {
    index_t o = 0;
    for (int i = 0; i < rank(); ++i) o += idx[i] * stride[i];
    return o;
  }

  /// Offset of the element with row-major linear position `linear`.
  TRIDENT_HD constexpr index_t offset_of_linear(index_t linear) const noexcept {
    index_t o = 0;
    for (int i = rank() - 1; i >= 0; --i) {
      const index_t e = extents[i];
      if (e == 0) return 0;
      o += (linear % e) * stride[i];
      linear /= e;
    }
    return o;
  }

  /// "(2, 3):(3, 1)" shape:strides, CuTe's notation.
  std::string str() const {
    std::string s = extents.str() + ":(";
    for (int i = 0; i < rank(); ++i) {
      if (i) s += ", ";
      s += std::to_string(stride[i]);
    }
    return s + ")";
  }
};

/// The layout of nothing: shape (0). Default-constructed views and tensors have it.
constexpr layout empty_layout() noexcept {
  layout l{};
  l.extents = shape(1, index_array{});
  return l;
}

/// Normalises a possibly negative axis against a rank; throws naming the shape when out of range.
inline int normalize_axis(int axis, const shape& s, const char* what) {
  const int r = s.rank();
  const int a = axis < 0 ? axis + r : axis;
  if (a < 0 || a >= r) {
    throw shape_error(std::string(what) + ": axis " + std::to_string(axis) + " is out of range for shape " + s.str());
  }
  return a;
}

/// The shape two operands broadcast to (NumPy rules: align trailing dimensions; an extent of
/// 1 stretches). Throws a shape_error naming both shapes when they do not broadcast.
inline shape broadcast_shapes(const shape& a, const shape& b, const char* what = "broadcast") {
  const int r = a.rank() > b.rank() ? a.rank() : b.rank();
  index_array out{};
  for (int i = 0; i < r; ++i) {
    const int ia = a.rank() - r + i, ib = b.rank() - r + i;
    const index_t ea = ia >= 0 ? a[ia] : 1, eb = ib >= 0 ? b[ib] : 1;
    if (ea != eb && ea != 1 && eb != 1) {
      throw shape_error(std::string(what) + ": shapes " + a.str() + " and " + b.str() + " cannot be broadcast together");
    }
    out[i] = ea == 1 ? eb : ea;
  }
  return shape(r, out);
}

/// The layout that reads `l` as if it had shape `target` (stride 0 on stretched dimensions).
inline layout broadcast_layout(const layout& l, const shape& target, const char* what = "broadcast") {
  const int r = target.rank();
  if (l.rank() > r) {
    throw shape_error(std::string(what) + ": shape " + l.extents.str() + " cannot be broadcast to " + target.str());
  }
  strides st{};
  for (int i = 0; i < r; ++i) {
    const int j = l.rank() - r + i;
    if (j < 0) {
      st[i] = 0;
    } else if (l.extents[j] == target[i]) {
      st[i] = l.extents[j] == 1 ? 0 : l.stride[j];
    } else if (l.extents[j] == 1) {
      st[i] = 0;
    } else {
      throw shape_error(std::string(what) + ": shape " + l.extents.str() + " cannot be broadcast to " + target.str());
    }
  }
  return layout(target, st);
}

}  // namespace trident
