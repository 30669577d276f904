#pragma once
/// @file fwd.hpp
/// Forward declarations of trident's public names.

namespace trident {

// precision policies (precision/policy.hpp)
struct fp32;
struct fp16_mixed;
struct bf16_mixed;
struct fp64;
template <class Precision>
struct precision_traits;

// devices: cpu (backend/cpu/device.hpp); cuda is declared here for every translation unit and
// defined only by trident/cuda.hpp, which needs nvcc.
struct cpu;
struct cuda;

// parallel strategies (parallel/strategy.hpp)
struct single;
struct data_parallel;
template <int Stage>
struct zero;

template <class Precision, class Device, class Strategy>
struct policy;

// tensors (core/tensor.hpp)
template <class T, class Device>
class tensor_view;
template <class T, class Device>
class tensor;

// the per-device kernel table each backend specialises (core/kernels.hpp)
template <class Device>
struct kernels;

}  // namespace trident
