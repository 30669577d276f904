#pragma once
/// @file quant/packed_int8.hpp
/// Int8 weights packed for this CPU's integer GEMM, dynamic quantization of activations, and
/// the int8 linear layer built from both:
///
///   W (out x in, fp32)  --quantize, symmetric per output channel-->  q (int8), scale_j
///   x (m x in, fp32)    --DynamicQuantizeLinear, per tensor or row-->  a (uint8), scale_i, zero_i
///   y[i, j] = act(scale_i · scale_j · (Σ_k a[i,k]·q[j,k] − zero_i · Σ_k q[j,k]) + bias_j)
///
/// The sum is exact in int32 (uint8 x int8 products, VPDPBUSD / TDPBUSD): only the fp32
/// epilogue rounds. The element arithmetic is ONNX's (quant/onnx.hpp); the kernels are in
/// backend/cpu/qgemm/ (scalar, AVX512-VNNI, AMX-INT8), chosen at run time from what the CPU
/// has; qgemm::scoped_kernel forces one (tests, benchmarks).

#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "../backend/cpu/qgemm/dispatch.hpp"
#include "../config.hpp"
#include "../core/activation.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "onnx.hpp"

namespace trident::quant {

/// The int8 GEMM kernels and the scoped override, under the quantization namespace.
using int8_kernel = cpu_kernels::qgemm::kernel;
using cpu_kernels::qgemm::kernel_available;
using scoped_int8_kernel = cpu_kernels::qgemm::scoped_kernel;
using cpu_kernels::qgemm::to_string;

/// int8 weights W (out × in), symmetric per output channel (zero point 0), packed for this
/// CPU's int8 GEMM (the layout of backend/cpu/qgemm/common.hpp), with their per-channel
/// scales and row sums. Copyable; the packed bytes are 64-byte aligned.
class packed_int8_weight {
 public:
  packed_int8_weight() = default;

  /// Quantizes w (out × in, row-major, leading dimension ldw): scale_j = max_k |w[j,k]| / 127
  /// (a zero row gets scale 1), q = ONNX QuantizeLinear(w, scale_j, 0) as int8. NaN/Inf are
  /// rejected with quantization_error naming `name` and the element.
  static packed_int8_weight quantize(const float* w, index_t out, index_t in, index_t ldw,
                                     const std::string& name = "weight") {
    check_shape(out, in, "packed_int8_weight::quantize");
    if (ldw < in) {
      throw shape_error("packed_int8_weight::quantize('" + name + "'): leading dimension " + std::to_string(ldw) +
                        " is smaller than in = " + std::to_string(in));
    }
    std::vector<std::int8_t> q(static_cast<std::size_t>(out * in));
    std::vector<float> scales(static_cast<std::size_t>(out));
    for (index_t j = 0; j < out; ++j) {
      const float* wj = w + j * ldw;
      float amax = 0.0f;
      for (index_t k = 0; k < in; ++k) {
        if (!std::isfinite(wj[k])) {
          (void)quantize_checked<std::int8_t>(wj[k], 1.0f, 0, name, j * in + k);  // throws, naming the element
        }
        amax = std::max(amax, std::fabs(wj[k]));
      }
      const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
      scales[static_cast<std::size_t>(j)] = s;
      for (index_t k = 0; k < in; ++k) {
        q[static_cast<std::size_t>(j * in + k)] = static_cast<std::int8_t>(quantize_value<std::int8_t>(wj[k], s, 0));
      }
    }
    return packed_int8_weight(q.data(), scales.data(), out, in);
  }

  /// quantize() of a CPU fp32 matrix view (out × in, unit column stride), e.g. a linear
  /// layer's weight parameter.
  static packed_int8_weight quantize(tensor_view<const float> w, const std::string& name = "weight") {
    if (w.rank() != 2 || (w.size(1) > 1 && w.stride(1) != 1)) {
      throw shape_error("packed_int8_weight::quantize('" + name + "'): needs a 2-d row-major view, got " + w.layout().str());
    }
    return quantize(w.data(), w.size(0), w.size(1), w.size(0) > 1 ? w.stride(0) : w.size(1), name);
  }

  /// From int8 values already quantized (out × in row-major) and their per-channel scales
  /// (finite and positive).
  packed_int8_weight(const std::int8_t* q, const float* scales, index_t out, index_t in) {
    check_shape(out, in, "packed_int8_weight");
    for (index_t j = 0; j < out; ++j) check_scale(scales[j], "packed_int8_weight scale " + std::to_string(j));
    out_ = out;
    in_ = in;
    kp_ = cpu_kernels::qgemm::round_up(in, cpu_kernels::qgemm::qk_block);
    packed_ = cpu_kernels::qgemm::aligned_bytes(static_cast<std::size_t>(cpu_kernels::qgemm::packed_bytes(out, in)));
    scales_.assign(scales, scales + out);
    row_sums_.resize(static_cast<std::size_t>(out));
    cpu_kernels::qgemm::pack_int8(q, out, in, in, reinterpret_cast<std::int8_t*>(packed_.data()), row_sums_.data());
  }

  index_t out() const noexcept { return out_; }
  index_t in() const noexcept { return in_; }
  /// Whether this holds weights (not default-constructed).
  bool empty() const noexcept { return out_ == 0; }

  /// The per-output-channel scales (out values).
  std::span<const float> scales() const noexcept { return scales_; }

  /// The quantized element (j, k), read from the packed layout.
  std::int8_t value(index_t j, index_t k) const {
    if (j < 0 || j >= out_ || k < 0 || k >= in_) {
      throw shape_error("packed_int8_weight::value(" + std::to_string(j) + ", " + std::to_string(k) +
                        "): out of range for " + std::to_string(out_) + " x " + std::to_string(in_));
    }
    return static_cast<std::int8_t>(packed_.data()[cpu_kernels::qgemm::packed_offset(j, k, kp_)]);
  }

  /// Σ_k q[j,k] for each output channel j, for zero-point compensation.
  std::span<const std::int32_t> row_sums() const noexcept { return row_sums_; }

  /// Memory held: the packed int8 values (with their padding) + scales + row sums.
  std::size_t bytes() const noexcept {
    return packed_.size() + scales_.size() * sizeof(float) + row_sums_.size() * sizeof(std::int32_t);
  }

  /// The packed operand as the kernels take it.
  cpu_kernels::qgemm::packed_view view() const noexcept {
    return {reinterpret_cast<const std::int8_t*>(packed_.data()), out_, in_, kp_};
  }

 private:
  static void check_shape(index_t out, index_t in, const char* what) {
    if (out <= 0 || in <= 0) {
      throw shape_error(std::string(what) + ": sizes must be positive, got out = " + std::to_string(out) +
                        ", in = " + std::to_string(in));
    }
    if (in > cpu_kernels::qgemm::max_exact_k) {
      throw shape_error(std::string(what) + ": in = " + std::to_string(in) + " exceeds " +
                        std::to_string(cpu_kernels::qgemm::max_exact_k) +
                        ", beyond which uint8 x int8 sums can overflow int32");
    }
  }

  index_t out_ = 0, in_ = 0, kp_ = 0;
  cpu_kernels::qgemm::aligned_bytes packed_;
  std::vector<float> scales_;
  std::vector<std::int32_t> row_sums_;
};

/// Granularity of the activation quantization parameters.
enum class granularity {
  per_tensor,  ///< one scale and zero point for the whole m x k input
  per_row,     ///< one per row (token)
};

namespace detail {

inline void check_matrix(const char* fn, const char* what, index_t m, index_t k, index_t ld) {
  if (m <= 0 || k <= 0) {
    throw shape_error(std::string(fn) + ": " + what + " must have positive sizes, got " + std::to_string(m) + " x " +
                      std::to_string(k));
  }
  if (ld < k) {
    throw shape_error(std::string(fn) + ": leading dimension of " + what + " is " + std::to_string(ld) +
                      ", smaller than its " + std::to_string(k) + " columns");
  }
}

inline void check_weight(const char* fn, const packed_int8_weight& w) {
  if (w.empty()) throw shape_error(std::string(fn) + ": the packed weight is empty");
}

/// Throws quantization_error naming the first non-finite element of x (m x k, ldx).
[[noreturn]] inline void throw_nonfinite(const char* what, const float* x, index_t m, index_t k, index_t ldx) {
  for (index_t i = 0; i < m; ++i) {
    for (index_t p = 0; p < k; ++p) (void)quantize_checked<std::uint8_t>(x[i * ldx + p], 1.0f, 0, what, i * k + p);
  }
  throw quantization_error(std::string("quantize '") + what + "': a value is not finite");
}

}  // namespace detail

/// Dynamic quantization of activations (ONNX DynamicQuantizeLinear, to uint8, asymmetric),
/// per tensor or per row (token): scale = (max(0, max x) − min(0, min x)) / 255 (a range of 0
/// gets scale 1), zero_point = saturate(round_half_even(−min(0, min x) / scale)), q = ONNX
/// QuantizeLinear(x, scale, zero_point). x is m × k (leading dimension ldx); q is m × k
/// (leading dimension ldq); scales / zeros receive 1 value (per_tensor) or m values
/// (per_row). NaN/Inf are rejected with quantization_error naming the element.
inline void quantize_dynamic_u8(const float* x, index_t m, index_t k, index_t ldx, granularity g, std::uint8_t* q,
                                index_t ldq, float* scales, std::int32_t* zeros) {
  namespace qk = cpu_kernels::qgemm;
  detail::check_matrix("quantize_dynamic_u8", "x", m, k, ldx);
  detail::check_matrix("quantize_dynamic_u8", "q", m, k, ldq);
  qk::value_range all;
  for (index_t i = 0; i < m; ++i) {
    const qk::value_range r = qk::range_of(x + i * ldx, k);
    if (!r.finite) detail::throw_nonfinite("activation", x, m, k, ldx);
    if (g == granularity::per_row) {
      qk::dynamic_params(r.lo, r.hi, scales[i], zeros[i]);
    } else {
      all.merge(r);
    }
  }
  if (g == granularity::per_tensor) qk::dynamic_params(all.lo, all.hi, scales[0], zeros[0]);
  for (index_t i = 0; i < m; ++i) {
    const index_t r = g == granularity::per_row ? i : 0;
    qk::quantize_row_u8(x + i * ldx, k, scales[r], zeros[r], q + i * ldq);
  }
}

/// Static quantization of activations with given parameters (a calibrated scale and zero
/// point): q = ONNX QuantizeLinear(x, scale, zero_point) as uint8, bit for bit (vectorised).
/// x is m × k (leading dimension ldx), q m × k (leading dimension ldq). NaN/Inf are rejected
/// with quantization_error naming `name` and the element; so are a scale that is not finite
/// and positive and a zero point outside [0, 255].
inline void quantize_static_u8(const float* x, index_t m, index_t k, index_t ldx, float scale, std::int32_t zero_point,
                               std::uint8_t* q, index_t ldq, const std::string& name = "activation") {
  namespace qk = cpu_kernels::qgemm;
  detail::check_matrix("quantize_static_u8", "x", m, k, ldx);
  detail::check_matrix("quantize_static_u8", "q", m, k, ldq);
  check_scale(scale, name);
  if (zero_point < 0 || zero_point > 255) {
    throw quantization_error("quantize '" + name + "': the uint8 zero point must be in [0, 255], got " +
                             std::to_string(zero_point));
  }
  for (index_t i = 0; i < m; ++i) {
    if (!qk::range_of(x + i * ldx, k).finite) detail::throw_nonfinite(name.c_str(), x, m, k, ldx);
  }
  for (index_t i = 0; i < m; ++i) qk::quantize_row_u8(x + i * ldx, k, scale, zero_point, q + i * ldq);
}

/// The exact int32 product c (m × n) = a (m × k uint8) · Wᵀ, n = w.out(), k = w.in().
inline void int8_gemm(const std::uint8_t* a, index_t m, index_t lda, const packed_int8_weight& w, std::int32_t* c,
                      index_t ldc) {
  detail::check_weight("int8_gemm", w);
  detail::check_matrix("int8_gemm", "a", m, w.in(), lda);
  detail::check_matrix("int8_gemm", "c", m, w.out(), ldc);
  cpu_kernels::qgemm::store_params sp;
  sp.out_i32 = c;
  sp.ld = ldc;
  cpu_kernels::qgemm::gemm_u8s8(a, m, lda, w.view(), sp);
}

/// The fused epilogue of a quantized linear layer.
struct int8_epilogue {
  const float* a_scale = nullptr;        ///< 1 value (per tensor) or m values (per row)
  const std::int32_t* a_zero = nullptr;  ///< like a_scale; nullptr: 0
  granularity g = granularity::per_tensor;
  const float* bias = nullptr;        ///< n values, or nullptr
  activation act = activation::none;  ///< none or relu
};

namespace detail {
inline void check_activation(const char* fn, activation act) {
  if (act != activation::none && act != activation::relu) {
    throw error(std::string(fn) + ": the int8 epilogue applies none or relu, got " + to_string(act));
  }
}
}  // namespace detail

/// y (m × n fp32, ldy): y[i,j] = act(a_scale_i · w_scale_j · (Σ_k a[i,k]·q[j,k] − a_zero_i ·
/// Σ_k q[j,k]) + bias_j).
inline void int8_linear(const std::uint8_t* a, index_t m, index_t lda, const packed_int8_weight& w, float* y,
                        index_t ldy, const int8_epilogue& e) {
  detail::check_weight("int8_linear", w);
  detail::check_matrix("int8_linear", "a", m, w.in(), lda);
  detail::check_matrix("int8_linear", "y", m, w.out(), ldy);
  detail::check_activation("int8_linear", e.act);
  if (e.a_scale == nullptr) throw error("int8_linear: the epilogue has no activation scale (a_scale is null)");
  cpu_kernels::qgemm::store_params sp;
  sp.out_f32 = y;
  sp.ld = ldy;
  sp.a_scale = e.a_scale;
  sp.a_zero = e.a_zero;
  sp.per_row = e.g == granularity::per_row;
  sp.w_scale = w.scales().data();
  sp.row_sum = w.row_sums().data();
  sp.bias = e.bias;
  sp.act = e.act;
  cpu_kernels::qgemm::gemm_u8s8(a, m, lda, w.view(), sp);
}

/// Quantizes x (m × w.in(), ldx) dynamically and runs int8_linear, fused so that the uint8
/// rows stay in cache (scratch managed internally, reused between calls on a thread).
inline void dynamic_int8_linear(const float* x, index_t m, index_t ldx, const packed_int8_weight& w, float* y,
                                index_t ldy, const float* bias = nullptr, activation act = activation::none,
                                granularity g = granularity::per_tensor) {
  detail::check_weight("dynamic_int8_linear", w);
  detail::check_matrix("dynamic_int8_linear", "x", m, w.in(), ldx);
  detail::check_matrix("dynamic_int8_linear", "y", m, w.out(), ldy);
  detail::check_activation("dynamic_int8_linear", act);
  if (!cpu_kernels::qgemm::dynamic_linear(x, m, ldx, w.view(), w.scales().data(), w.row_sums().data(), y, ldy, bias,
                                          act, g == granularity::per_row)) {
    detail::throw_nonfinite("activation", x, m, w.in(), ldx);
  }
}

namespace detail {
/// Data and leading dimension of a 2-d row-major CPU view (unit column stride).
template <class T>
inline index_t leading_dim(const tensor_view<T>& v, const char* fn, const char* what) {
  if (v.rank() != 2 || (v.size(1) > 1 && v.stride(1) != 1)) {
    throw shape_error(std::string(fn) + ": " + what + " must be a 2-d row-major view, got " + v.layout().str());
  }
  return v.size(0) > 1 ? v.stride(0) : v.size(1);
}
}  // namespace detail

/// dynamic_int8_linear on tensor views: x (m × w.in()) and y (m × w.out()), 2-d row-major
/// fp32 on the CPU (unit column stride, any row stride); bias: (w.out()) contiguous, or empty.
inline void dynamic_int8_linear(tensor_view<const float> x, const packed_int8_weight& w, tensor_view<float> y,
                                tensor_view<const float> bias = {}, activation act = activation::none,
                                granularity g = granularity::per_tensor) {
  const index_t ldx = detail::leading_dim(x, "dynamic_int8_linear", "x");
  const index_t ldy = detail::leading_dim(y, "dynamic_int8_linear", "y");
  if (x.size(1) != w.in() || y.size(0) != x.size(0) || y.size(1) != w.out()) {
    throw shape_error("dynamic_int8_linear: x " + x.shape().str() + " times the (" + std::to_string(w.out()) + " x " +
                      std::to_string(w.in()) + ") weight does not give y " + y.shape().str());
  }
  const float* b = nullptr;
  if (bias.data() != nullptr) {
    if (bias.rank() != 1 || bias.size(0) != w.out() || !bias.is_contiguous()) {
      throw shape_error("dynamic_int8_linear: bias " + bias.shape().str() + " must be a contiguous (" +
                        std::to_string(w.out()) + ")");
    }
    b = bias.data();
  }
  dynamic_int8_linear(x.data(), x.size(0), ldx, w, y.data(), ldy, b, act, g);
}

}  // namespace trident::quant
