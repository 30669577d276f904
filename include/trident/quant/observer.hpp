#pragma once
/// @file quant/observer.hpp
/// Observers: what calibration runs over a tensor's values to choose its quantization
/// parameters (scale, zero point), as PyTorch's torch.ao.quantization observers do.
///
///   quant::minmax_observer obs;                       // or moving_average_minmax_observer,
///   for (auto& batch : calibration) obs.observe(x);   //    percentile_observer
///   quant::qparams a = obs.params<std::uint8_t>();    // uint8, asymmetric (affine)
///   quant::qparams w = obs.params<std::int8_t>();     // int8, symmetric
///
/// The parameters follow PyTorch's _calculate_qparams to the float operation (computed in
/// float32 as PyTorch's tensors are): the observed range [lo, hi] is first widened to include
/// 0 (so that 0 is exactly representable: zero padding, ReLU outputs), then
///
///   uint8 (affine):    scale = (max(hi,0) - min(lo,0)) / 255,  zero_point = clamp(0 - round(min(lo,0) / scale), 0, 255)
///   int8 (symmetric):  scale = max(-min(lo,0), max(hi,0)) / 127.5,  zero_point = 0
///
/// with the scale raised to at least float epsilon (2^-23) and round() half to even. 127.5 is
/// PyTorch's (qmax - qmin) / 2 for int8. The weights of the int8 GEMM use their own per-channel
/// rule, amax / 127 (quant/packed_int8.hpp); observers are for activations.
///
/// Observers:
/// - minmax_observer: the running minimum and maximum (MinMaxObserver).
/// - moving_average_minmax_observer: min and max of each observed tensor averaged with a
///   constant c (0.01): m <- m + c (m_batch - m), the first tensor taken as is
///   (MovingAverageMinMaxObserver, the activation observer of PyTorch's QAT configs).
/// - percentile_observer: the p-th and (100 - p)-th percentiles of every value observed
///   (p = 99.99 by default), linear interpolation between order statistics as numpy's
///   percentile does; it clips the rare outliers that would stretch a min-max scale. It keeps
///   every observed value (4 bytes each) until reset(): meant for a few calibration batches.
///
/// Observing a NaN or an infinity is an error that names the observer and the position.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/tensor.hpp"
#include "../ops/transfer.hpp"
#include "onnx.hpp"

namespace trident::quant {

/// The parameters of one quantized tensor (or channel): x = (q - zero_point) * scale.
struct qparams {
  float scale = 1.0f;
  std::int32_t zero_point = 0;
  bool operator==(const qparams&) const = default;
};

/// The interval of real values a type represents under `p`: [(qmin - zp) s, (qmax - zp) s].
template <class Q>
struct representable {
  float lo, hi;
};
template <class Q>
inline representable<Q> representable_range(const qparams& p) noexcept {
  return {static_cast<float>(qrange<Q>::lo - p.zero_point) * p.scale, static_cast<float>(qrange<Q>::hi - p.zero_point) * p.scale};
}

namespace detail {
inline void check_range(float lo, float hi, const char* who) {
  if (!std::isfinite(lo) || !std::isfinite(hi) || lo > hi) {
    throw quantization_error(std::string(who) + ": the range [" + std::to_string(lo) + ", " + std::to_string(hi) +
                             "] is not a finite interval");
  }
}
}  // namespace detail

/// PyTorch's per-tensor affine parameters for the range [lo, hi] (widened to include 0).
template <class Q>
inline qparams affine_qparams(float lo, float hi) {
  detail::check_range(lo, hi, "quant::affine_qparams");
  constexpr int qmin = qrange<Q>::lo, qmax = qrange<Q>::hi;
  const float min_neg = std::min(lo, 0.0f), max_pos = std::max(hi, 0.0f);
  float scale = (max_pos - min_neg) / static_cast<float>(qmax - qmin);
  scale = std::max(scale, std::numeric_limits<float>::epsilon());
  const float zp = static_cast<float>(qmin) - round_half_even(min_neg / scale);
  const float clamped = std::clamp(zp, static_cast<float>(qmin), static_cast<float>(qmax));
  return {scale, static_cast<std::int32_t>(clamped)};
}

/// PyTorch's per-tensor symmetric parameters for the range [lo, hi]: zero point 0 for signed
/// types, 128 for uint8 (PyTorch's choice when a symmetric uint8 tensor is asked for).
template <class Q>
inline qparams symmetric_qparams(float lo, float hi) {
  detail::check_range(lo, hi, "quant::symmetric_qparams");
  constexpr int qmin = qrange<Q>::lo, qmax = qrange<Q>::hi;
  const float amax = std::max(-std::min(lo, 0.0f), std::max(hi, 0.0f));
  float scale = amax / (static_cast<float>(qmax - qmin) / 2.0f);
  scale = std::max(scale, std::numeric_limits<float>::epsilon());
  return {scale, std::is_same_v<Q, std::uint8_t> ? 128 : 0};
}

/// The parameters observers give for a type: uint8 affine (activations), int8 (and int4)
/// symmetric.
template <class Q>
inline qparams calculate_qparams(float lo, float hi) {
  if constexpr (std::is_same_v<Q, std::uint8_t>) {
    return affine_qparams<Q>(lo, hi);
  } else {
    return symmetric_qparams<Q>(lo, hi);
  }
}

/// What calibration and quantization-aware training need of an observer.
template <class O>
concept observer = requires(O& o, const O& c, std::span<const float> x) {
  o.observe(x);
  o.reset();
  { c.empty() } -> std::convertible_to<bool>;
  { c.lo() } -> std::convertible_to<float>;
  { c.hi() } -> std::convertible_to<float>;
  { c.template params<std::uint8_t>() } -> std::same_as<qparams>;
};

/// The shared part of the observers: checking and converting what they are shown.
template <class Derived>
class observer_base {
 public:
  /// Observes a tensor of any element type (converted to float).
  template <class T, class D>
  void observe(tensor_view<const T, D> x) {
    if constexpr (std::is_same_v<T, float>) {
      if (x.is_contiguous()) {
        self().observe(std::span<const float>(x.data(), static_cast<std::size_t>(x.numel())));
        return;
      }
    }
    tensor<float, D> f(x.shape());
    copy(x, f);
    self().observe(std::span<const float>(f.data(), static_cast<std::size_t>(f.numel())));
  }
  template <class T, class D>
  void observe(tensor_view<T, D> x) requires(!std::is_const_v<T>) {
    observe(tensor_view<const T, D>(x));
  }

  /// The quantization parameters of the observed range for type Q (see the file comment).
  template <class Q>
  qparams params() const {
    if (self().empty()) {
      throw error(std::string(Derived::name) + ": no values observed yet; observe calibration data before asking for parameters");
    }
    return calculate_qparams<Q>(self().lo(), self().hi());
  }

 protected:
  /// min and max of x, throwing on a non-finite value.
  static std::pair<float, float> extrema(std::span<const float> x) {
    float lo = std::numeric_limits<float>::infinity(), hi = -std::numeric_limits<float>::infinity();
    bool finite = true;
    for (const float v : x) {
      finite &= std::isfinite(v);
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    if (!finite) check_finite(x);
    return {lo, hi};
  }
  static void check_finite(std::span<const float> x) {
    for (std::size_t i = 0; i < x.size(); ++i) {
      if (!std::isfinite(x[i])) {
        throw quantization_error(std::string(Derived::name) + ": observed element " + std::to_string(i) + " is " +
                                 (std::isnan(x[i]) ? "NaN" : "infinite") + "; a range cannot be calibrated on it");
      }
    }
  }

 private:
  Derived& self() noexcept { return static_cast<Derived&>(*this); }
  const Derived& self() const noexcept { return static_cast<const Derived&>(*this); }
};

/// The running minimum and maximum of everything observed (PyTorch's MinMaxObserver).
class minmax_observer : public observer_base<minmax_observer> {
 public:
  static constexpr const char* name = "quant::minmax_observer";
  using observer_base::observe;

  void observe(std::span<const float> x) {
    if (x.empty()) return;
    const auto [lo, hi] = extrema(x);
    lo_ = empty() ? lo : std::min(lo_, lo);
    hi_ = empty() ? hi : std::max(hi_, hi);
    ++count_;
  }
  void reset() noexcept { *this = minmax_observer(); }
  bool empty() const noexcept { return count_ == 0; }
  /// Tensors observed since construction or reset().
  std::int64_t count() const noexcept { return count_; }
  float lo() const noexcept { return lo_; }
  float hi() const noexcept { return hi_; }

 private:
  float lo_ = 0.0f, hi_ = 0.0f;
  std::int64_t count_ = 0;
};

/// min and max averaged over the observed tensors with constant c (PyTorch's
/// MovingAverageMinMaxObserver): the first tensor's extrema are taken as they are, then
/// m <- m + c (m_tensor - m).
class moving_average_minmax_observer : public observer_base<moving_average_minmax_observer> {
 public:
  static constexpr const char* name = "quant::moving_average_minmax_observer";
  using observer_base::observe;

  /// @param averaging_constant c in (0, 1]; PyTorch's default is 0.01
  explicit moving_average_minmax_observer(float averaging_constant = 0.01f) : c_(averaging_constant) {
    if (!(averaging_constant > 0.0f && averaging_constant <= 1.0f)) {
      throw error(std::string(name) + ": the averaging constant must be in (0, 1], got " + std::to_string(averaging_constant));
    }
  }

  void observe(std::span<const float> x) {
    if (x.empty()) return;
    const auto [lo, hi] = extrema(x);
    if (empty()) {
      lo_ = lo;
      hi_ = hi;
    } else {
      lo_ = lo_ + c_ * (lo - lo_);
      hi_ = hi_ + c_ * (hi - hi_);
    }
    ++count_;
  }
  void reset() noexcept {
    lo_ = hi_ = 0.0f;
    count_ = 0;
  }
  bool empty() const noexcept { return count_ == 0; }
  std::int64_t count() const noexcept { return count_; }
  float averaging_constant() const noexcept { return c_; }
  float lo() const noexcept { return lo_; }
  float hi() const noexcept { return hi_; }

 private:
  float c_;
  float lo_ = 0.0f, hi_ = 0.0f;
  std::int64_t count_ = 0;
};

/// The (100 - p)-th and p-th percentiles of every value observed, interpolated linearly
/// between order statistics (numpy.percentile's default): at rank r = (n - 1) p / 100,
/// v[floor r] + (r - floor r) (v[floor r + 1] - v[floor r]) over the sorted values.
class percentile_observer : public observer_base<percentile_observer> {
 public:
  static constexpr const char* name = "quant::percentile_observer";
  using observer_base::observe;

  /// @param percentile p in (50, 100]; 100 is min-max
  explicit percentile_observer(double percentile = 99.99) : p_(percentile) {
    if (!(percentile > 50.0 && percentile <= 100.0)) {
      throw error(std::string(name) + ": the percentile must be in (50, 100], got " + std::to_string(percentile));
    }
  }

  void observe(std::span<const float> x) {
    if (x.empty()) return;
    check_finite(x);
    values_.insert(values_.end(), x.begin(), x.end());
    dirty_ = true;
  }
  void reset() noexcept {
    values_.clear();
    values_.shrink_to_fit();
    dirty_ = false;
  }
  bool empty() const noexcept { return values_.empty(); }
  /// Values kept.
  std::size_t size() const noexcept { return values_.size(); }
  double percentile() const noexcept { return p_; }
  float lo() const {
    update();
    return lo_;
  }
  float hi() const {
    update();
    return hi_;
  }

 private:
  /// The q-th percentile (q in [0, 100]) of the values, which it partially reorders.
  static float at(std::vector<float>& v, double q) {
    const double r = static_cast<double>(v.size() - 1) * q / 100.0;
    const auto i = static_cast<std::size_t>(std::floor(r));
    const double frac = r - static_cast<double>(i);
    std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(i), v.end());
    const double a = v[i];
    if (frac == 0.0 || i + 1 >= v.size()) return static_cast<float>(a);
    // the next order statistic is the smallest of the values above position i
    const double b = *std::min_element(v.begin() + static_cast<std::ptrdiff_t>(i) + 1, v.end());
    return static_cast<float>(a + frac * (b - a));
  }
  void update() const {
    if (!dirty_) return;
    lo_ = at(values_, 100.0 - p_);
    hi_ = at(values_, p_);
    dirty_ = false;
  }

  double p_;
  mutable std::vector<float> values_;
  mutable bool dirty_ = false;
  mutable float lo_ = 0.0f, hi_ = 0.0f;
};

static_assert(observer<minmax_observer> && observer<moving_average_minmax_observer> && observer<percentile_observer>);

}  // namespace trident::quant
