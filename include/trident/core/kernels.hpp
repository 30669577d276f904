#pragma once
/// @file core/kernels.hpp
/// The table of kernels a device backend provides. The core (tensor, ops) is written
/// against this table only; each backend folder specialises it for its device, as Kokkos
/// backends specialise the core's ParallelFor. There is no backend #ifdef in the core.
///
/// A specialisation kernels<D> provides, for element types T (const-qualified where read):
///   fill(view<T> out, double v)
///   map(op, view<To> out, view<const Ti> in)                   in already broadcast to out's shape
///   zip(op, view<To> out, view<const Ta> a, view<const Tb> b)  a, b already broadcast to out's shape
///   random(view<T> out, const random_spec&)                    counter-based Philox stream
///   reduce_last(reducer, view<To> out, view<const Ti> in)      reduce the last axis of in into out
///   reduce_all(reducer, view<const T> in) -> double
///   softmax_last(view<To> out, view<const Ti> in, bool log)
///   gemm(const gemm_call<Ti, Tc>&)                             batched, strided, epilogue
///   copy_to_host(void* dst, const void* src, bytes), copy_from_host(void* dst, const void* src, bytes)
///   copy_within(void* dst, const void* src, bytes)

#include "activation.hpp"
#include "../fwd.hpp"
#include "../precision/policy.hpp"

namespace trident {

/// One (possibly batched) GEMM, resolved to pointers and leading dimensions:
/// for each i < batch, C_i(m×n) = act(alpha * op(A_i) * op(B_i) + beta * C_i + bias),
/// row-major, A_i = a + i*stride_a (0: shared), op = transpose when trans_*.
/// @tparam Ti input element type (float, double, bfloat16, half)
/// @tparam Tc output/accumulate type (float; double for double inputs)
template <class Ti, class Tc>
struct gemm_call {
  index_t batch = 1, m = 0, n = 0, k = 0;
  bool trans_a = false, trans_b = false;
  const Ti* a = nullptr;
  index_t lda = 0, stride_a = 0;
  const Ti* b = nullptr;
  index_t ldb = 0, stride_b = 0;
  Tc* c = nullptr;
  index_t ldc = 0, stride_c = 0;
  Tc alpha = 1, beta = 0;
  const float* bias = nullptr;  ///< length n, in the device's memory, or nullptr
  activation act = activation::none;
};

/// Primary template: the device has no backend in this translation unit.
template <class Device>
struct kernels {
  static_assert(detail::dependent_false<Device>,
                "trident::kernels<Device>: no backend implements this device in this translation unit "
                "(for trident::cuda: compile with nvcc and #include <trident/cuda.hpp>)");
};

}  // namespace trident
