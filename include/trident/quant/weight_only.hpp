#pragma once
/// @file quant/weight_only.hpp
/// Weight-only quantization: the weights W (out x in) of a linear layer stored as int8 or
/// int4 with one fp32 scale per group of `group` consecutive inputs of a row; activations
/// stay fp32. The products run through weight_only_linear, which dequantises W a panel at a
/// time into the fp32 GEMM's packed layout (backend/cpu/qgemm_weight_only.hpp), never the
/// whole matrix.
///
/// Quantization is symmetric (zero point 0), per group:
///
///   scale = max |w| / qmax      (qmax 127 for int8, 7 for int4; an all-zero group: 1)
///   q     = ONNX QuantizeLinear(w, scale, 0)   (ties to even, saturated to the type's range)
///
/// with the element arithmetic of quant/onnx.hpp. int4 values are packed two per byte, the
/// first of a pair in the low nibble (ONNX's order); a row of int4 takes in/2 bytes.
///
///   auto qw = quant::groupwise_weight<std::int8_t>::quantize(w, out, in, in, 128, "fc1.weight");
///   quant::weight_only_linear(x, batch, in, qw, y, out, bias, activation::relu);
///   auto d = qw.dequantized();   // d(j, k) == qw.value(j, k) * scale, read in place
///
/// The dequantised weights are a view, not a copy: dequantized() pairs a handle to the packed
/// values and scales with a groupwise_accessor, an accessor policy in the sense of
/// std::mdspan (access(handle, i) reads element i of the row-major out x in layout as
/// value * scale; offset(handle, i) moves both pointers to element i).

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../backend/cpu/qgemm_weight_only.hpp"
#include "../config.hpp"
#include "../core/activation.hpp"
#include "../core/error.hpp"
#include "onnx.hpp"

namespace trident::quant {

/// Bits per value of a weight-only type: 8 for std::int8_t, 4 for int4_t.
template <class Q>
inline constexpr int weight_bits = std::is_same_v<Q, int4_t> ? 4 : 8;

/// The integer at element k of a packed row of Q values.
template <class Q>
inline int packed_value(const std::uint8_t* row, index_t k) noexcept {
  if constexpr (std::is_same_v<Q, int4_t>) {
    return unpack_int4(row[k >> 1], k);
  } else {
    return static_cast<std::int8_t>(row[k]);
  }
}

/// Data handle of the dequantised view: the packed values and their scales, both at the
/// same element of the row-major (out x in) matrix.
struct groupwise_handle {
  const std::uint8_t* values = nullptr;  ///< packed values (int4: the byte holding element 0, which is even)
  const float* scales = nullptr;         ///< the scale of element 0's group
};

/// Accessor policy of the dequantised view (in the manner of std::mdspan's AccessorPolicy):
/// offset i of the row-major matrix reads value(i) * scale(i / group). Because in is a
/// multiple of group, i / group is also the index of the scale in the row-major
/// out x (in / group) scales. Holds no pointer of its own; trivially copyable.
template <class Q>
struct groupwise_accessor {
  using element_type = const float;
  using reference = float;  ///< elements are computed, so they are returned by value
  using data_handle_type = groupwise_handle;
  using offset_policy = groupwise_accessor;

  index_t group = 1;  ///< consecutive elements sharing a scale

  /// Element `i` (row-major) of the matrix that `p` points at: value * scale.
  reference access(data_handle_type p, std::size_t i) const noexcept {
    const index_t idx = static_cast<index_t>(i);
    return dequantize_value(packed_value<Q>(p.values, idx), p.scales[idx / group], 0);
  }
  /// The handle of element `i`: i must start a group (a row start always does) and, for int4,
  /// be even (start a byte).
  data_handle_type offset(data_handle_type p, std::size_t i) const noexcept {
    const index_t idx = static_cast<index_t>(i);
    return {p.values + (std::is_same_v<Q, int4_t> ? idx / 2 : idx), p.scales + idx / group};
  }
};

/// The dequantised weights as a read-only (out x in) row-major matrix view: handle +
/// accessor + extents, all trivially copyable; nothing is allocated or copied.
template <class Q>
class dequantized_view {
 public:
  using accessor_type = groupwise_accessor<Q>;
  using reference = typename accessor_type::reference;
  using data_handle_type = typename accessor_type::data_handle_type;

  dequantized_view() = default;
  dequantized_view(data_handle_type data, const accessor_type& acc, index_t out, index_t in) noexcept
      : data_(data), acc_(acc), out_(out), in_(in) {}

  /// W(j, k) = value(j, k) * scale(j, k / group).
  reference operator()(index_t j, index_t k) const noexcept {
    return acc_.access(data_, static_cast<std::size_t>(j * in_ + k));
  }
  /// Extent of dimension r: 0 rows (out), 1 columns (in).
  index_t extent(int r) const noexcept { return r == 0 ? out_ : in_; }
  index_t rows() const noexcept { return out_; }
  index_t cols() const noexcept { return in_; }
  index_t size() const noexcept { return out_ * in_; }
  /// Rows [j0, j1) as a view of their own (no copy).
  dequantized_view slice_rows(index_t j0, index_t j1) const noexcept {
    return dequantized_view(acc_.offset(data_, static_cast<std::size_t>(j0 * in_)), acc_, j1 - j0, in_);
  }
  data_handle_type data_handle() const noexcept { return data_; }
  const accessor_type& accessor() const noexcept { return acc_; }

 private:
  data_handle_type data_{};
  accessor_type acc_{};
  index_t out_ = 0, in_ = 0;
};

/// Weights W (out x in) quantized symmetrically per group of `group` consecutive elements
/// along `in` (see the file comment).
/// @tparam Q std::int8_t or int4_t
template <class Q>
class groupwise_weight {
  static_assert(std::is_same_v<Q, std::int8_t> || std::is_same_v<Q, int4_t>,
                "groupwise_weight<Q>: Q must be std::int8_t or quant::int4_t");

 public:
  using value_type = Q;
  static constexpr int bits = weight_bits<Q>;
  static constexpr int qmax = qrange<Q>::hi == 127 ? 127 : 7;

  groupwise_weight() = default;

  /// Quantizes W (out x in, row stride ldw). `in` must be a positive multiple of `group`
  /// (and even for int4); NaN or infinite weights are rejected (quantization_error naming
  /// `name` and the element).
  static groupwise_weight quantize(const float* w, index_t out, index_t in, index_t ldw, index_t group,
                                   const std::string& name = "weight") {
    check_dims(out, in, group, name);
    if (ldw < in) {
      throw shape_error("groupwise_weight::quantize '" + name + "': the row stride " + std::to_string(ldw) +
                        " is smaller than in " + std::to_string(in));
    }
    if (w == nullptr && out * in > 0) throw error("groupwise_weight::quantize '" + name + "': null weights");
    groupwise_weight r;
    r.out_ = out;
    r.in_ = in;
    r.group_ = group;
    r.data_.assign(static_cast<std::size_t>(out * r.row_bytes()), 0);
    r.scales_.resize(static_cast<std::size_t>(out * (in / group)));
    for (index_t j = 0; j < out; ++j) {
      const float* wj = w + j * ldw;
      std::uint8_t* row = r.data_.data() + j * r.row_bytes();
      for (index_t g0 = 0; g0 < in; g0 += group) {
        float amax = 0.0f;
        for (index_t k = g0; k < g0 + group; ++k) {
          if (!std::isfinite(wj[k])) {
            throw quantization_error("groupwise_weight::quantize '" + name + "': element (" + std::to_string(j) + ", " +
                                     std::to_string(k) + ") is " + (std::isnan(wj[k]) ? "NaN" : "infinite") +
                                     ", which has no quantized value");
          }
          amax = std::max(amax, std::fabs(wj[k]));
        }
        float scale = amax > 0.0f ? amax / static_cast<float>(qmax) : 1.0f;
        // A group of tiny (subnormal) weights: the quotient can underflow to 0.
        if (!(scale > 0.0f)) scale = std::numeric_limits<float>::denorm_min();
        r.scales_[static_cast<std::size_t>(j * (in / group) + g0 / group)] = scale;
        for (index_t k = g0; k < g0 + group; ++k) {
          const int q = quantize_value<Q>(wj[k], scale, 0);
          if constexpr (bits == 8) {
            row[k] = static_cast<std::uint8_t>(static_cast<std::int8_t>(q));
          } else {
            row[k >> 1] = static_cast<std::uint8_t>(row[k >> 1] | ((static_cast<unsigned>(q) & 0xFu) << ((k & 1) * 4)));
          }
        }
      }
    }
    return r;
  }

  /// Adopts already quantized values (packed as data() describes) and scales, e.g. read
  /// from a file. Sizes must match the dims, and every scale must be finite and positive.
  static groupwise_weight from_packed(std::vector<std::uint8_t> data, std::vector<float> scales, index_t out,
                                      index_t in, index_t group, const std::string& name = "weight") {
    check_dims(out, in, group, name);
    groupwise_weight r;
    r.out_ = out;
    r.in_ = in;
    r.group_ = group;
    if (data.size() != static_cast<std::size_t>(out * r.row_bytes())) {
      throw shape_error("groupwise_weight::from_packed '" + name + "': " + std::to_string(data.size()) +
                        " bytes of values, (" + std::to_string(out) + " x " + std::to_string(in) + ") " + qrange<Q>::name +
                        " takes " + std::to_string(out * r.row_bytes()));
    }
    if (scales.size() != static_cast<std::size_t>(out * (in / group))) {
      throw shape_error("groupwise_weight::from_packed '" + name + "': " + std::to_string(scales.size()) +
                        " scales, (" + std::to_string(out) + " x " + std::to_string(in) + ") in groups of " +
                        std::to_string(group) + " takes " + std::to_string(out * (in / group)));
    }
    for (std::size_t i = 0; i < scales.size(); ++i) {
      if (!(scales[i] > 0.0f) || !std::isfinite(scales[i])) {
        throw quantization_error("groupwise_weight::from_packed '" + name + "': scale " + std::to_string(i) + " is " +
                                 std::to_string(scales[i]) + ", it must be finite and positive");
      }
    }
    r.data_ = std::move(data);
    r.scales_ = std::move(scales);
    return r;
  }

  index_t out() const noexcept { return out_; }
  index_t in() const noexcept { return in_; }
  index_t group() const noexcept { return group_; }
  /// Groups per row (in / group).
  index_t groups() const noexcept { return group_ > 0 ? in_ / group_ : 0; }
  /// Bytes of one packed row: in (int8) or in / 2 (int4).
  index_t row_bytes() const noexcept { return bits == 8 ? in_ : in_ / 2; }

  /// The packed values, row-major: out x in bytes (int8) or out x in/2 (int4).
  std::span<const std::uint8_t> data() const noexcept { return data_; }
  /// The scales, out x (in / group), row-major.
  std::span<const float> scales() const noexcept { return scales_; }
  /// The quantized integer W(j, k).
  int value(index_t j, index_t k) const noexcept { return packed_value<Q>(data_.data() + j * row_bytes(), k); }
  /// The scale of element (j, k).
  float scale(index_t j, index_t k) const noexcept { return scales_[static_cast<std::size_t>(j * groups() + k / group_)]; }
  /// Storage: packed values plus scales.
  std::size_t bytes() const noexcept { return data_.size() + scales_.size() * sizeof(float); }

  /// The dequantised weights as a view (see dequantized_view): no copy.
  dequantized_view<Q> dequantized() const noexcept {
    return dequantized_view<Q>({data_.data(), scales_.data()}, groupwise_accessor<Q>{group_ > 0 ? group_ : 1}, out_, in_);
  }

  /// The weights as the CPU kernels read them.
  cpu_kernels::detail::groupwise_b<bits> kernel_view() const noexcept {
    return {data_.data(), scales_.data(), out_, in_, group_};
  }

 private:
  static void check_dims(index_t out, index_t in, index_t group, const std::string& name) {
    if (out < 0 || in <= 0 || group <= 0) {
      throw shape_error("groupwise_weight '" + name + "': out " + std::to_string(out) + ", in " + std::to_string(in) +
                        ", group " + std::to_string(group) + ": out must be >= 0, in and group positive");
    }
    if (in % group != 0) {
      throw shape_error("groupwise_weight '" + name + "': in " + std::to_string(in) + " is not a multiple of group " +
                        std::to_string(group));
    }
    if (bits == 4 && in % 2 != 0) {
      throw shape_error("groupwise_weight '" + name + "': int4 rows pack two values per byte, in " + std::to_string(in) +
                        " must be even");
    }
  }

  index_t out_ = 0, in_ = 0, group_ = 0;
  std::vector<std::uint8_t> data_;
  std::vector<float> scales_;
};

/// y (m x out, ldy) = act(x (m x in, ldx) W^T + bias): the dequantising GEMM, in fp32 with the
/// fp32 GEMM's micro-kernels. W is dequantised a micro-panel at a time into their packed
/// layout (m > 32), or a few rows at a time in registers or L1 (m <= 32, memory bound);
/// never as a whole (backend/cpu/qgemm_weight_only.hpp). bias (length out) may be null; y
/// must not overlap x. Threads with OpenMP like the fp32 GEMM.
template <class Q>
void weight_only_linear(const float* x, index_t m, index_t ldx, const groupwise_weight<Q>& w, float* y, index_t ldy,
                        const float* bias = nullptr, activation act = activation::none) {
  if (m < 0) throw shape_error("weight_only_linear: m is " + std::to_string(m) + ", it must be >= 0");
  if (m > 0 && ldx < w.in()) {
    throw shape_error("weight_only_linear: x's row stride " + std::to_string(ldx) + " is smaller than the weights' in " +
                      std::to_string(w.in()));
  }
  if (m > 0 && ldy < w.out()) {
    throw shape_error("weight_only_linear: y's row stride " + std::to_string(ldy) + " is smaller than the weights' out " +
                      std::to_string(w.out()));
  }
  if (m > 0 && w.out() > 0 && (x == nullptr || y == nullptr)) throw error("weight_only_linear: null x or y");
  cpu_kernels::gemm_epilogue ep;
  ep.bias = bias;
  ep.act = act;
  cpu_kernels::weight_only_gemm(x, m, ldx, w.kernel_view(), y, ldy, ep);
}

}  // namespace trident::quant
