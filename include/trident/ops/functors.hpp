#pragma once
/// @file ops/functors.hpp
/// The point-wise operations and reducers that element-wise and reduction kernels apply.
/// Small function objects callable on host and device, computing in the element type's
/// compute type (float, or double for double tensors). Users may pass their own to map/zip.

#include <cmath>
#include <limits>

#include "../config.hpp"
#include "../core/activation.hpp"

namespace trident::ops {

// --- binary ---------------------------------------------------------------------------
struct add {
  template <class C>
  TRIDENT_HD constexpr C operator()(C a, C b) const noexcept { return a + b; }
};
struct sub {
  template <class C>
  TRIDENT_HD constexpr C operator()(C a, C b) const noexcept { return a - b; }
};
struct mul {
  template <class C>
  TRIDENT_HD constexpr C operator()(C a, C b) const noexcept { return a * b; }
};
struct div {
  template <class C>
  TRIDENT_HD constexpr C operator()(C a, C b) const noexcept { return a / b; }
};
/// max, propagating NaN from either side (as torch.maximum does).
struct maximum {
  template <class C>
  TRIDENT_HD constexpr C operator()(C a, C b) const noexcept { return (a != a || a > b) ? a : b; }
};
/// min, propagating NaN from either side.
struct minimum {
  template <class C>
  TRIDENT_HD constexpr C operator()(C a, C b) const noexcept { return (a != a || a < b) ? a : b; }
};
/// a*x + b*y (STREAM's triad is axpby{1, s}).
struct axpby {
  double alpha = 1, beta = 1;
  template <class C>
  TRIDENT_HD constexpr C operator()(C x, C y) const noexcept { return C(alpha) * x + C(beta) * y; }
};

// --- unary ----------------------------------------------------------------------------
struct identity {
  template <class C>
  TRIDENT_HD constexpr C operator()(C x) const noexcept { return x; }
};
struct neg {
  template <class C>
  TRIDENT_HD constexpr C operator()(C x) const noexcept { return -x; }
};
struct abs {
  template <class C>
  TRIDENT_HD constexpr C operator()(C x) const noexcept { return x < C(0) ? -x : x; }
};
struct exp {
  template <class C>
  TRIDENT_HD C operator()(C x) const noexcept { using std::exp; return exp(x); }
};
struct log {
  template <class C>
  TRIDENT_HD C operator()(C x) const noexcept { using std::log; return log(x); }
};
struct sqrt {
  template <class C>
  TRIDENT_HD C operator()(C x) const noexcept { using std::sqrt; return sqrt(x); }
};
struct tanh {
  template <class C>
  TRIDENT_HD C operator()(C x) const noexcept { using std::tanh; return tanh(x); }
};
struct sigmoid {
  template <class C>
  TRIDENT_HD C operator()(C x) const noexcept { using std::exp; return C(1) / (C(1) + exp(-x)); }
};
/// s*x
struct scale {
  double s = 1;
  template <class C>
  TRIDENT_HD constexpr C operator()(C x) const noexcept { return C(s) * x; }
};
/// x + s
struct add_scalar {
  double s = 0;
  template <class C>
  TRIDENT_HD constexpr C operator()(C x) const noexcept { return x + C(s); }
};
// relu, gelu, gelu_tanh: core/activation.hpp

// --- reducers -------------------------------------------------------------------------
// A reducer folds values into an accumulator of type A: init(), fold(acc, x), merge(a, b)
// for partial results, finish(acc, count).

struct sum_reducer {
  template <class A>
  TRIDENT_HD static constexpr A init() noexcept { return A(0); }
  template <class A>
  TRIDENT_HD static constexpr A fold(A acc, A x) noexcept { return acc + x; }
  template <class A>
  TRIDENT_HD static constexpr A merge(A a, A b) noexcept { return a + b; }
  template <class A>
  TRIDENT_HD static constexpr A finish(A acc, index_t) noexcept { return acc; }
};
struct mean_reducer : sum_reducer {
  template <class A>
  TRIDENT_HD static constexpr A finish(A acc, index_t n) noexcept { return n ? acc / A(n) : std::numeric_limits<A>::quiet_NaN(); }
};
/// Maximum; NaN wins; the maximum of nothing is -inf.
struct max_reducer {
  template <class A>
  TRIDENT_HD static constexpr A init() noexcept { return -std::numeric_limits<A>::infinity(); }
  template <class A>
  TRIDENT_HD static constexpr A fold(A acc, A x) noexcept {
    if (acc != acc) return acc;
    return (x > acc || x != x) ? x : acc;
  }
  template <class A>
  TRIDENT_HD static constexpr A merge(A a, A b) noexcept { return fold(a, b); }
  template <class A>
  TRIDENT_HD static constexpr A finish(A acc, index_t) noexcept { return acc; }
};
/// Euclidean norm: sqrt of the sum of squares.
struct l2_reducer {
  template <class A>
  TRIDENT_HD static constexpr A init() noexcept { return A(0); }
  template <class A>
  TRIDENT_HD static constexpr A fold(A acc, A x) noexcept { return acc + x * x; }
  template <class A>
  TRIDENT_HD static constexpr A merge(A a, A b) noexcept { return a + b; }
  template <class A>
  TRIDENT_HD static A finish(A acc, index_t) noexcept { using std::sqrt; return sqrt(acc); }
};

}  // namespace trident::ops
