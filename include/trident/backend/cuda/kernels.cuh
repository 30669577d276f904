#pragma once
#if !defined(__CUDACC__)
#error "trident/backend/cuda/kernels.cuh contains CUDA kernels: compile this file as CUDA with nvcc (a .cu file, or set_source_files_properties(... LANGUAGE CUDA)), link trident::cuda, and include <trident/cuda.hpp>"
#else  // the rest only under nvcc, so that the #error above is the one message
/// @file backend/cuda/kernels.cuh
/// kernels<cuda>: the CUDA implementation of the kernel table declared in core/kernels.hpp,
/// with the CPU backend's semantics (backend/cpu/kernels.hpp). Everything is enqueued on the
/// calling thread's current stream (api.hpp); only the calls that hand a value or memory to
/// the host (copy_to_host, copy_from_host, reduce_all) wait for it.
///
/// Launch strategy
/// - Element-wise (fill, map, zip, copy, the GEMM's own epilogue): one grid-stride kernel per
///   operation. The host first merges the dimensions every operand steps through
///   contiguously (as the CPU backend does), so that contiguous operands, and contiguous ones
///   with a broadcast scalar, become a single run; such a run with 4-element-aligned pointers
///   moves 4 elements per thread with vector loads/stores. Other layouts decode each linear
///   index through the merged extents (32-bit division while the index fits), 64-bit offsets.
///   The grid is one full wave (SMs x 2048 threads), the loop covers the rest.
/// - random: one thread per Philox block (4 elements), via random_spec::block/value, so the
///   numbers are those of the CPU backend.
/// - reduce_all: two passes, no atomics. Pass 1: a grid whose size depends only on the
///   element count (at most 1024 blocks of 256) folds a grid-stride share per thread in
///   double and tree-reduces each block (warp shuffles, then one warp over the per-warp
///   results); pass 2: one block merges the block results in a fixed order. The result is
///   therefore bit-reproducible run to run and GPU to GPU.
/// - reduce_last: sums accumulate in double (as on the CPU), max in the compute type. One
///   warp per row, lanes striding along it (coalesced when the row is contiguous); a block per
///   row when rows are long (>= 2048) and too few to fill the GPU with warps; and, for strided
///   rows whose neighbours are adjacent in memory (a column reduction, >= 1024 outputs), one
///   thread per output so that a warp reads consecutive addresses. Each output is reduced by
///   one warp/block/thread in a fixed order: deterministic. (Not done yet: splitting a long
///   column reduction with few outputs over several blocks.)
/// - softmax_last: one warp per row (a block per row for rows of 1024 and more): max, sum of
///   exp(x - max), write; max-shifted like the CPU, log variant x - max - log(sum).
/// - gemm: cuBLASLt (see lt_matmul and kernels<cuda>::gemm for the row-major and epilogue
///   mapping). The heuristic's choice is cached per problem; descriptors are made per call.
///
/// Element conversions: half is widened with the hardware instruction and narrowed with
/// round-to-nearest-even in hardware (NaN through trident's own rule so that the bits equal
/// the CPU's); bfloat16 uses trident's integer conversions. Compute is float (double when
/// any operand is double), as on the CPU.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cublasLt.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "../../core/activation.hpp"
#include "../../core/kernels.hpp"
#include "../../core/rng.hpp"
#include "../../core/shape.hpp"
#include "../../core/tensor.hpp"
#include "../../ops/functors.hpp"
#include "../../precision/bfloat16.hpp"
#include "../../precision/half.hpp"
#include "api.hpp"
#include "device.hpp"

namespace trident {

namespace cuda_kernels {

/// Threads per block of every trident kernel.
inline constexpr int block_threads = 256;
/// Blocks of pass 1 of reduce_all, at most (a constant, so that results do not depend on the GPU).
inline constexpr index_t reduce_all_max_blocks = 1024;

template <class T>
using bare_t = std::remove_const_t<T>;

/// The compute type for a set of element types: double if any is double, else float.
template <class... T>
using compute_of = std::conditional_t<(std::is_same_v<bare_t<T>, double> || ...), double, float>;

// --- element conversions ------------------------------------------------------------------

/// An element widened to the compute type C (exact).
template <class C, class T>
__device__ __forceinline__ C load(const T& x) {
  using U = bare_t<T>;
  if constexpr (std::is_same_v<U, half>) {
    return static_cast<C>(__half2float(__ushort_as_half(x.bits)));
  } else if constexpr (std::is_same_v<U, bfloat16>) {
    return static_cast<C>(__uint_as_float(static_cast<unsigned>(x.bits) << 16));
  } else {
    return static_cast<C>(x);
  }
}

/// A compute value rounded to the element type T (nearest even), bit-identical to the CPU's
/// static_cast<T>(v) (double goes through float for the 2-byte types, as there).
template <class T, class C>
__device__ __forceinline__ T narrow(C v) {
  if constexpr (std::is_same_v<T, half>) {
    const float f = static_cast<float>(v);
    if (f != f) return half(f);  // NaN: trident's quieting rule (the instruction returns a canonical NaN)
    return half::from_bits(__half_as_ushort(__float2half_rn(f)));
  } else if constexpr (std::is_same_v<T, bfloat16>) {
    return bfloat16(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

/// Four consecutive elements, aligned for one vector access.
template <class T>
struct alignas(4 * sizeof(T)) pack4 {
  T v[4];
};

template <class C, class T>
__device__ __forceinline__ void load4(const T* p, C (&out)[4]) {
  const pack4<bare_t<T>> v = *reinterpret_cast<const pack4<bare_t<T>>*>(p);
TRIDENT_CUDA_UNROLL
  for (int j = 0; j < 4; ++j) out[j] = load<C>(v.v[j]);
}

template <class T, class C>
__device__ __forceinline__ void store4(T* p, const C (&in)[4]) {
  pack4<T> v;
TRIDENT_CUDA_UNROLL
  for (int j = 0; j < 4; ++j) v.v[j] = narrow<T>(in[j]);
  *reinterpret_cast<pack4<T>*>(p) = v;
}

/// Whether p may be accessed as pack4<T>.
template <class T>
inline bool aligned4(const T* p) noexcept {
  return reinterpret_cast<std::uintptr_t>(p) % (4 * sizeof(T)) == 0;
}

// --- device math --------------------------------------------------------------------------

__device__ __forceinline__ float dev_exp(float x) { return ::expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return ::exp(x); }
__device__ __forceinline__ float dev_log(float x) { return ::logf(x); }
__device__ __forceinline__ double dev_log(double x) { return ::log(x); }

// --- launch helpers -----------------------------------------------------------------------

constexpr index_t ceil_div(index_t a, index_t b) noexcept { return (a + b - 1) / b; }

/// Blocks for a grid-stride loop over `items` with `per_block` items per block per
/// iteration: enough for the items, at most one full wave of the current device.
inline int grid_for(index_t items, index_t per_block = block_threads) {
  const index_t wave = static_cast<index_t>(cuda_detail::current_info().sm_count) * (2048 / block_threads);
  return static_cast<int>(std::clamp<index_t>(ceil_div(items, per_block), 1, wave));
}

// --- strided loops ------------------------------------------------------------------------

/// Operands of one element-wise loop with their dimensions merged: extents, and one stride
/// row per operand. A plain aggregate passed to kernels by value.
template <int N>
struct loop_plan {
  int rank = 1;
  index_t ext[max_rank] = {};
  index_t st[N][max_rank] = {};
};

/// Drops extent-1 dimensions and merges adjacent ones that every operand steps through
/// contiguously (host side). A scalar becomes rank 1 of extent 1.
template <int N>
loop_plan<N> make_plan(const shape& s, const strides* const (&st)[N]) {
  loop_plan<N> p;
  p.rank = 0;
  for (int d = 0; d < s.rank(); ++d) {
    if (s[d] == 1) continue;
    const int r = p.rank;
    bool merge = r > 0;
    for (int k = 0; k < N && merge; ++k) merge = p.st[k][r - 1] == (*st[k])[d] * s[d];
    if (merge) {
      p.ext[r - 1] *= s[d];
      for (int k = 0; k < N; ++k) p.st[k][r - 1] = (*st[k])[d];
    } else {
      p.ext[r] = s[d];
      for (int k = 0; k < N; ++k) p.st[k][r] = (*st[k])[d];
      ++p.rank;
    }
  }
  if (p.rank == 0) {
    p.rank = 1;
    p.ext[0] = 1;
    for (int k = 0; k < N; ++k) p.st[k][0] = 1;
  }
  return p;
}

/// Element offsets of linear position i (row-major over the plan's extents), per operand.
/// `narrow_index`: i and every extent fit in 32 bits, so the divisions can be 32-bit.
/// The loops run over max_rank with constant indices (skipping dimensions past the rank), so
/// the plan stays in the kernel's parameter space instead of being copied to local memory.
/// (Host-callable too, for tests.)
template <int N>
__host__ __device__ __forceinline__ void offsets_of(const loop_plan<N>& p, index_t i, index_t (&off)[N], bool narrow_index) {
TRIDENT_CUDA_UNROLL
  for (int k = 0; k < N; ++k) off[k] = 0;
  if (narrow_index) {
    unsigned rem = static_cast<unsigned>(i);
TRIDENT_CUDA_UNROLL
    for (int d = max_rank - 1; d > 0; --d) {
      if (d >= p.rank) continue;
      const unsigned e = static_cast<unsigned>(p.ext[d]);
      const unsigned q = rem / e;
      const index_t c = static_cast<index_t>(rem - q * e);
TRIDENT_CUDA_UNROLL
      for (int k = 0; k < N; ++k) off[k] += c * p.st[k][d];
      rem = q;
    }
TRIDENT_CUDA_UNROLL
    for (int k = 0; k < N; ++k) off[k] += static_cast<index_t>(rem) * p.st[k][0];
  } else {
    index_t rem = i;
TRIDENT_CUDA_UNROLL
    for (int d = max_rank - 1; d > 0; --d) {
      if (d >= p.rank) continue;
      const index_t e = p.ext[d];
      const index_t q = rem / e;
      const index_t c = rem - q * e;
TRIDENT_CUDA_UNROLL
      for (int k = 0; k < N; ++k) off[k] += c * p.st[k][d];
      rem = q;
    }
TRIDENT_CUDA_UNROLL
    for (int k = 0; k < N; ++k) off[k] += rem * p.st[k][0];
  }
}

/// The one element-wise kernel. F provides
///   f(off)      one element at operand offsets off[0..N)
///   f.vec4(i)   elements i..i+3 of a unit-stride run (only called when `vectorized`)
/// `vectorized` is true only for a rank-1 plan whose pointers allow pack4 accesses.
template <int N, class F>
__global__ void __launch_bounds__(block_threads) elementwise_kernel(index_t n, loop_plan<N> p, F f, bool vectorized) {
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  const index_t first = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  index_t begin = 0;
  if (vectorized) {
    const index_t quads = n / 4;
    for (index_t q = first; q < quads; q += step) f.vec4(q * 4);
    begin = quads * 4;  // the tail (< 4 elements) goes through the scalar path below
  }
  if (p.rank == 1) {
    for (index_t i = begin + first; i < n; i += step) {
      index_t off[N];
TRIDENT_CUDA_UNROLL
      for (int k = 0; k < N; ++k) off[k] = i * p.st[k][0];
      f(off);
    }
  } else {
    const bool narrow_index = n <= static_cast<index_t>(UINT_MAX);
    for (index_t i = first; i < n; i += step) {
      index_t off[N];
      offsets_of(p, i, off, narrow_index);
      f(off);
    }
  }
}

/// Launches elementwise_kernel over n elements on the current stream.
template <int N, class F>
void launch_elementwise(const char* what, index_t n, const loop_plan<N>& p, const F& f, bool vectorized) {
  if (n <= 0) return;
  const int grid = grid_for(vectorized ? std::max<index_t>(n / 4, 1) : n);
  elementwise_kernel<N, F><<<grid, block_threads, 0, cuda_current_stream()>>>(n, p, f, vectorized);
  TRIDENT_CUDA_CHECK_LAUNCH(what);
}

/// Whether a plan is one run in which operand 0 has unit stride and every other operand unit
/// or zero stride.
template <int N>
bool unit_run(const loop_plan<N>& p) noexcept {
  if (p.rank != 1 || p.st[0][0] != 1) return false;
  for (int k = 1; k < N; ++k)
    if (p.st[k][0] != 1 && p.st[k][0] != 0) return false;
  return true;
}

// --- element-wise functors ----------------------------------------------------------------

template <class T>
struct fill_fn {
  T* out;
  T value;
  __device__ void operator()(const index_t (&off)[1]) const { out[off[0]] = value; }
  __device__ void vec4(index_t i) const {
    pack4<T> v;
TRIDENT_CUDA_UNROLL
    for (int j = 0; j < 4; ++j) v.v[j] = value;
    *reinterpret_cast<pack4<T>*>(out + i) = v;
  }
};

template <class Op, class To, class Ti>
struct map_fn {
  using C = compute_of<To, Ti>;
  Op op;
  To* out;
  const Ti* in;
  bool in_scalar;  ///< in has stride 0 in the vectorised run
  __device__ void operator()(const index_t (&off)[2]) const { out[off[0]] = narrow<To>(op(load<C>(in[off[1]]))); }
  __device__ void vec4(index_t i) const {
    C x[4], y[4];
    if (in_scalar) {
      const C s = load<C>(in[0]);
TRIDENT_CUDA_UNROLL
      for (int j = 0; j < 4; ++j) x[j] = s;
    } else {
      load4(in + i, x);
    }
TRIDENT_CUDA_UNROLL
    for (int j = 0; j < 4; ++j) y[j] = static_cast<C>(op(x[j]));
    store4(out + i, y);
  }
};

template <class Op, class To, class Ta, class Tb>
struct zip_fn {
  using C = compute_of<To, Ta, Tb>;
  Op op;
  To* out;
  const Ta* a;
  const Tb* b;
  bool a_scalar, b_scalar;  ///< stride 0 in the vectorised run
  __device__ void operator()(const index_t (&off)[3]) const {
    out[off[0]] = narrow<To>(op(load<C>(a[off[1]]), load<C>(b[off[2]])));
  }
  __device__ void vec4(index_t i) const {
    C x[4], y[4], z[4];
    if (a_scalar) {
      const C s = load<C>(a[0]);
TRIDENT_CUDA_UNROLL
      for (int j = 0; j < 4; ++j) x[j] = s;
    } else {
      load4(a + i, x);
    }
    if (b_scalar) {
      const C s = load<C>(b[0]);
TRIDENT_CUDA_UNROLL
      for (int j = 0; j < 4; ++j) y[j] = s;
    } else {
      load4(b + i, y);
    }
TRIDENT_CUDA_UNROLL
    for (int j = 0; j < 4; ++j) z[j] = static_cast<C>(op(x[j], y[j]));
    store4(out + i, z);
  }
};

/// The GEMM's own epilogue, c = act(c + bias[j]) (operand 1's offset is the column j).
template <class Tc>
struct gemm_epilogue_fn {
  Tc* c;
  const float* bias;
  activation act;
  __device__ void operator()(const index_t (&off)[2]) const {
    Tc x = c[off[0]];
    if (bias) x += static_cast<Tc>(bias[off[1]]);
    c[off[0]] = apply_activation(act, x);
  }
  __device__ void vec4(index_t) const {}  // never vectorised
};

/// C = act(beta * C + bias) without a product (k == 0 or alpha == 0); C not read when beta == 0.
template <class Tc>
struct gemm_scale_fn {
  Tc* c;
  const float* bias;
  activation act;
  Tc beta;
  __device__ void operator()(const index_t (&off)[2]) const {
    Tc x = beta == Tc(0) ? Tc(0) : beta * c[off[0]];
    if (bias) x += static_cast<Tc>(bias[off[1]]);
    c[off[0]] = apply_activation(act, x);
  }
  __device__ void vec4(index_t) const {}  // never vectorised
};

// --- random -------------------------------------------------------------------------------

/// One thread per Philox block: elements 4q..4q+3 (row-major positions of the view, placed
/// through the merged plan of its layout).
template <class T>
__global__ void __launch_bounds__(block_threads) random_kernel(T* out, loop_plan<1> p, index_t n, random_spec spec) {
  const index_t blocks = (n + 3) / 4;
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  const bool narrow_index = n <= static_cast<index_t>(UINT_MAX);
  for (index_t q = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < blocks; q += step) {
    const philox_block r = spec.block(static_cast<std::uint64_t>(q) * 4);
    const index_t end = q * 4 + 4 < n ? q * 4 + 4 : n;
    for (index_t i = q * 4; i < end; ++i) {
      index_t off[1];
      if (p.rank == 1) {
        off[0] = i * p.st[0][0];
      } else {
        offsets_of(p, i, off, narrow_index);
      }
      out[off[0]] = narrow<T>(spec.value(r, static_cast<std::uint64_t>(i)));
    }
  }
}

// --- reductions ---------------------------------------------------------------------------

/// Merge operations for the tree reductions, with their identities.
template <class Red>
struct reducer_merge {
  template <class A>
  __device__ __forceinline__ A operator()(A a, A b) const {
    return Red::template merge<A>(a, b);
  }
  template <class A>
  __device__ __forceinline__ A identity() const {
    return Red::template init<A>();
  }
};
using max_merge = reducer_merge<ops::max_reducer>;
using sum_merge = reducer_merge<ops::sum_reducer>;

/// Reduces v over the warp; the result is in lane 0 (fixed order: deterministic).
template <class A, class M>
__device__ __forceinline__ A warp_reduce(A v, const M& merge) {
TRIDENT_CUDA_UNROLL
  for (int o = 16; o > 0; o >>= 1) v = merge(v, __shfl_down_sync(0xffffffffu, v, o));
  return v;
}

/// Reduces v over the warp; every lane gets the same result (butterfly: each step combines
/// the same two values in every lane, and merge is commutative).
template <class A, class M>
__device__ __forceinline__ A warp_allreduce(A v, const M& merge) {
TRIDENT_CUDA_UNROLL
  for (int o = 16; o > 0; o >>= 1) v = merge(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

/// Reduces v over the block (blockDim.x a multiple of 32, at most 1024); the result is in
/// thread 0. `scratch` holds 32 values. Starts with a barrier, so calls may follow each other.
template <class A, class M>
__device__ A block_reduce(A v, const M& merge, A* scratch) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_reduce(v, merge);
  __syncthreads();  // the previous call's readers of scratch are done
  if (lane == 0) scratch[w] = v;
  __syncthreads();
  if (w == 0) {
    v = lane < warps ? scratch[lane] : merge.template identity<A>();
    v = warp_reduce(v, merge);
  }
  return v;
}

/// block_reduce whose result every thread gets. `scratch` holds 33 values.
template <class A, class M>
__device__ A block_allreduce(A v, const M& merge, A* scratch) {
  v = block_reduce(v, merge, scratch);
  if (threadIdx.x == 0) scratch[32] = v;
  __syncthreads();
  return scratch[32];
}

/// Pass 1 of reduce_all: one partial per block.
template <class Red, class T>
__global__ void __launch_bounds__(block_threads) reduce_all_kernel(Red red, const T* x, index_t n, loop_plan<1> p, double* partial) {
  __shared__ double scratch[32];
  double acc = red.template init<double>();
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  const index_t first = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p.rank == 1) {
    const index_t s = p.st[0][0];
    for (index_t i = first; i < n; i += step) acc = red.fold(acc, load<double>(x[i * s]));
  } else {
    const bool narrow_index = n <= static_cast<index_t>(UINT_MAX);
    for (index_t i = first; i < n; i += step) {
      index_t off[1];
      offsets_of(p, i, off, narrow_index);
      acc = red.fold(acc, load<double>(x[off[0]]));
    }
  }
  acc = block_reduce(acc, reducer_merge<Red>{}, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

/// Pass 2 of reduce_all: one block merges the partials in a fixed order into *out.
template <class Red>
__global__ void __launch_bounds__(block_threads) merge_partials_kernel(const double* partial, int count, double* out) {
  __shared__ double scratch[32];
  const reducer_merge<Red> merge{};
  double acc = merge.template identity<double>();
  for (int i = threadIdx.x; i < count; i += blockDim.x) acc = merge(acc, partial[i]);
  acc = block_reduce(acc, merge, scratch);
  if (threadIdx.x == 0) *out = acc;
}

/// The rows of a row-wise kernel: row q starts at in + in_outer.offset_of_linear(q) and has
/// `len` elements `step` apart; its result goes to out + out_outer.offset_of_linear(q).
struct row_set {
  layout in_outer;
  layout out_outer;
  index_t rows = 0;
  index_t len = 0;
  index_t step = 1;
  index_t out_step = 1;  ///< softmax: stride of the output row
};

/// One warp per row.
template <class A, class Red, class To, class Ti>
__global__ void __launch_bounds__(block_threads) reduce_rows_warp_kernel(Red red, To* out, const Ti* in, row_set rs) {
  const int lane = threadIdx.x & 31;
  const index_t warps = static_cast<index_t>(gridDim.x) * (blockDim.x >> 5);
  for (index_t row = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; row < rs.rows; row += warps) {
    const Ti* x = in + rs.in_outer.offset_of_linear(row);
    A acc = red.template init<A>();
    for (index_t i = lane; i < rs.len; i += 32) acc = red.fold(acc, load<A>(x[i * rs.step]));
    acc = warp_reduce(acc, reducer_merge<Red>{});
    if (lane == 0) out[rs.out_outer.offset_of_linear(row)] = narrow<To>(red.finish(acc, rs.len));
  }
}

/// One block per row (long rows, few of them).
template <class A, class Red, class To, class Ti>
__global__ void __launch_bounds__(block_threads) reduce_rows_block_kernel(Red red, To* out, const Ti* in, row_set rs) {
  __shared__ A scratch[32];
  for (index_t row = blockIdx.x; row < rs.rows; row += gridDim.x) {
    const Ti* x = in + rs.in_outer.offset_of_linear(row);
    A acc = red.template init<A>();
    for (index_t i = threadIdx.x; i < rs.len; i += blockDim.x) acc = red.fold(acc, load<A>(x[i * rs.step]));
    acc = block_reduce(acc, reducer_merge<Red>{}, scratch);
    if (threadIdx.x == 0) out[rs.out_outer.offset_of_linear(row)] = narrow<To>(red.finish(acc, rs.len));
  }
}

/// One thread per row (strided rows whose starts are adjacent: column reductions).
template <class A, class Red, class To, class Ti>
__global__ void __launch_bounds__(block_threads) reduce_rows_thread_kernel(Red red, To* out, const Ti* in, row_set rs) {
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t row = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < rs.rows; row += step) {
    const Ti* x = in + rs.in_outer.offset_of_linear(row);
    A acc = red.template init<A>();
    for (index_t i = 0; i < rs.len; ++i) acc = red.fold(acc, load<A>(x[i * rs.step]));
    out[rs.out_outer.offset_of_linear(row)] = narrow<To>(red.finish(acc, rs.len));
  }
}

// --- softmax ------------------------------------------------------------------------------

/// One warp per row.
template <class C, class To, class Ti>
__global__ void __launch_bounds__(block_threads) softmax_warp_kernel(To* out, const Ti* in, row_set rs, bool log) {
  const int lane = threadIdx.x & 31;
  const index_t warps = static_cast<index_t>(gridDim.x) * (blockDim.x >> 5);
  const index_t len = rs.len, si = rs.step, so = rs.out_step;
  for (index_t row = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; row < rs.rows; row += warps) {
    const Ti* x = in + rs.in_outer.offset_of_linear(row);
    To* o = out + rs.out_outer.offset_of_linear(row);
    C mx = -std::numeric_limits<C>::infinity();
    for (index_t i = lane; i < len; i += 32) mx = ops::max_reducer::fold(mx, load<C>(x[i * si]));
    mx = warp_allreduce(mx, max_merge{});
    if (mx == -std::numeric_limits<C>::infinity()) mx = 0;  // all -inf: keep exp finite-shifted
    C sum = 0;
    for (index_t i = lane; i < len; i += 32) sum += dev_exp(load<C>(x[i * si]) - mx);
    sum = warp_allreduce(sum, sum_merge{});
    if (log) {
      const C lse = dev_log(sum);
      for (index_t i = lane; i < len; i += 32) o[i * so] = narrow<To>((load<C>(x[i * si]) - mx) - lse);
    } else {
      const C inv = C(1) / sum;
      for (index_t i = lane; i < len; i += 32) o[i * so] = narrow<To>(dev_exp(load<C>(x[i * si]) - mx) * inv);
    }
  }
}

/// One block per row (long rows).
template <class C, class To, class Ti>
__global__ void __launch_bounds__(block_threads) softmax_block_kernel(To* out, const Ti* in, row_set rs, bool log) {
  __shared__ C scratch[33];
  const index_t len = rs.len, si = rs.step, so = rs.out_step;
  for (index_t row = blockIdx.x; row < rs.rows; row += gridDim.x) {
    const Ti* x = in + rs.in_outer.offset_of_linear(row);
    To* o = out + rs.out_outer.offset_of_linear(row);
    C mx = -std::numeric_limits<C>::infinity();
    for (index_t i = threadIdx.x; i < len; i += blockDim.x) mx = ops::max_reducer::fold(mx, load<C>(x[i * si]));
    mx = block_allreduce(mx, max_merge{}, scratch);
    if (mx == -std::numeric_limits<C>::infinity()) mx = 0;
    C sum = 0;
    for (index_t i = threadIdx.x; i < len; i += blockDim.x) sum += dev_exp(load<C>(x[i * si]) - mx);
    sum = block_allreduce(sum, sum_merge{}, scratch);
    // Every element is read and written by the same thread below, so out may alias in.
    if (log) {
      const C lse = dev_log(sum);
      for (index_t i = threadIdx.x; i < len; i += blockDim.x) o[i * so] = narrow<To>((load<C>(x[i * si]) - mx) - lse);
    } else {
      const C inv = C(1) / sum;
      for (index_t i = threadIdx.x; i < len; i += blockDim.x) o[i * so] = narrow<To>(dev_exp(load<C>(x[i * si]) - mx) * inv);
    }
    __syncthreads();  // scratch[32] is rewritten by the next row's first allreduce
  }
}

/// The rows of `in` (reduced or normalised along its last axis) and where their results go.
template <class Vin, class Vout>
row_set rows_of(const Vin& in, const Vout& out) {
  const int r = in.rank();
  index_array ext{}, ist{}, ost{};
  for (int d = 0; d < r - 1; ++d) {
    ext[d] = in.size(d);
    ist[d] = in.stride(d);
    ost[d] = out.stride(d);
  }
  row_set rs;
  const shape outer(r - 1, ext);
  rs.in_outer = layout(outer, ist);
  rs.out_outer = layout(outer, ost);
  rs.rows = outer.numel();
  rs.len = in.size(r - 1);
  rs.step = in.stride(r - 1);
  rs.out_step = out.rank() == r ? out.stride(r - 1) : 1;
  return rs;
}

// --- GEMM (cuBLASLt) ----------------------------------------------------------------------

template <class T>
constexpr cudaDataType_t data_type_of() {
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, double>) return CUDA_R_64F;
  else if constexpr (std::is_same_v<T, half>) return CUDA_R_16F;
  else return CUDA_R_16BF;
}

/// Largest power of two (at most 256) dividing the address and, in a batch, the byte stride.
inline std::uint32_t alignment_of(const void* p, index_t stride_bytes) noexcept {
  std::uint64_t v = reinterpret_cast<std::uintptr_t>(p) | 256u | static_cast<std::uint64_t>(stride_bytes);
  return static_cast<std::uint32_t>(v & (~v + 1));
}

/// RAII owners of the cuBLASLt descriptors of one call.
struct lt_desc {
  cublasLtMatmulDesc_t h = nullptr;
  ~lt_desc() {
    if (h) cublasLtMatmulDescDestroy(h);
  }
};
struct lt_layout {
  cublasLtMatrixLayout_t h = nullptr;
  ~lt_layout() {
    if (h) cublasLtMatrixLayoutDestroy(h);
  }
};
struct lt_pref {
  cublasLtMatmulPreference_t h = nullptr;
  ~lt_pref() {
    if (h) cublasLtMatmulPreferenceDestroy(h);
  }
};

/// How a GEMM's epilogue is split between cuBLASLt and trident's own kernel.
struct epilogue_plan {
  cublasLtEpilogue_t lt = CUBLASLT_EPILOGUE_DEFAULT;
  bool lt_bias = false;                    ///< cuBLASLt adds the bias
  bool own_bias = false;                   ///< our kernel adds the bias afterwards
  activation own_act = activation::none;  ///< our kernel applies this afterwards
};

/// The cache key of one cuBLASLt problem (bytes compared, so it is zeroed before filling).
struct lt_key {
  int device, in_type, out_type, compute, epilogue, trans_a, trans_b;
  std::uint32_t align_a, align_b, align_c, align_bias;
  std::int64_t rows_d, cols_d, k, lda, ldb, ldc, batch, stride_a, stride_b, stride_c;
};

/// A column-major layout descriptor, with strided-batch attributes when batch > 1.
template <class T>
void make_layout(lt_layout& l, index_t rows, index_t cols, index_t ld, int batch, index_t stride) {
  TRIDENT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l.h, data_type_of<T>(), static_cast<std::uint64_t>(rows),
                                                  static_cast<std::uint64_t>(cols), static_cast<std::int64_t>(ld)));
  if (batch > 1) {
    const std::int32_t count = batch;
    const std::int64_t s = stride;
    TRIDENT_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l.h, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
    TRIDENT_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l.h, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &s, sizeof(s)));
  }
}

/// One cublasLtMatmul over `batch` (<= INT32_MAX) problems of g starting at a, b, c.
/// Returns false (having launched nothing) when cuBLASLt's heuristic has no algorithm for
/// the problem with this epilogue; throws device_error on any other failure.
///
/// Row-major to column-major: a row-major X (r x c, leading dimension ld) is, read
/// column-major, X^T (c x r, same ld). So C = op(A) op(B) (row-major, m x n) is computed as
/// the column-major D = C^T = op(B)^T op(A)^T (n x m): cuBLASLt's "A" is our B with our
/// trans_b, its "B" is our A with our trans_a, and D has n rows, m columns, ld = ldc.
/// Our bias is per column of C, i.e. per row of D: exactly what CUBLASLT_EPILOGUE_BIAS adds
/// (a vector of D's row count, broadcast along D's columns).
template <class Ti, class Tc>
bool lt_matmul(const gemm_call<Ti, Tc>& g, int batch, const Ti* a, const Ti* b, Tc* c, const epilogue_plan& ep) {
  const cudaStream_t stream = cuda_current_stream();
  const cuda_detail::lt_context ctx = cuda_detail::cublaslt_context(stream);

  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  cudaDataType_t scale_type = CUDA_R_32F;
  if constexpr (std::is_same_v<Ti, double>) {
    compute = CUBLAS_COMPUTE_64F;
    scale_type = CUDA_R_64F;
  } else if constexpr (std::is_same_v<Ti, float>) {
    if (cuda_settings::allow_tf32.load(std::memory_order_relaxed)) compute = CUBLAS_COMPUTE_32F_FAST_TF32;
  }

  // cuBLASLt's operands (column-major), see above.
  const index_t rows_d = g.n, cols_d = g.m;
  const index_t a_rows = g.trans_b ? g.k : g.n, a_cols = g.trans_b ? g.n : g.k;  // our B
  const index_t b_rows = g.trans_a ? g.m : g.k, b_cols = g.trans_a ? g.k : g.m;  // our A
  // A single column's leading dimension is irrelevant; cuBLASLt still wants ld >= rows.
  const index_t ld_a = a_cols <= 1 ? std::max(g.ldb, a_rows) : g.ldb;
  const index_t ld_b = b_cols <= 1 ? std::max(g.lda, b_rows) : g.lda;
  const index_t ld_d = cols_d <= 1 ? std::max(g.ldc, rows_d) : g.ldc;
  if (ld_a < a_rows || ld_b < b_rows || ld_d < rows_d) {
    throw device_error("trident::kernels<cuda>::gemm: leading dimensions too small for m=" + std::to_string(g.m) +
                       " n=" + std::to_string(g.n) + " k=" + std::to_string(g.k) + " (lda=" + std::to_string(g.lda) +
                       ", ldb=" + std::to_string(g.ldb) + ", ldc=" + std::to_string(g.ldc) + ")");
  }

  lt_desc desc;
  TRIDENT_CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc.h, compute, scale_type));
  const cublasOperation_t op_a = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  TRIDENT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.h, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  TRIDENT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.h, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  const cublasLtEpilogue_t epi = ep.lt;
  TRIDENT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.h, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
  if (ep.lt_bias) {
    const void* bias = g.bias;
    const cudaDataType_t bias_type = CUDA_R_32F;
    TRIDENT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.h, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    TRIDENT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.h, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type)));
    // BIAS_BATCH_STRIDE stays 0: one bias for every matrix of the batch.
  }

  const index_t sa = batch > 1 ? g.stride_b : 0, sb = batch > 1 ? g.stride_a : 0, sc = batch > 1 ? g.stride_c : 0;
  lt_layout la, lb, lc;
  make_layout<Ti>(la, a_rows, a_cols, ld_a, batch, sa);
  make_layout<Ti>(lb, b_rows, b_cols, ld_b, batch, sb);
  make_layout<Tc>(lc, rows_d, cols_d, ld_d, batch, sc);

  lt_key key;
  std::memset(&key, 0, sizeof(key));
  key.device = cuda_current_device();
  key.in_type = static_cast<int>(data_type_of<Ti>());
  key.out_type = static_cast<int>(data_type_of<Tc>());
  key.compute = static_cast<int>(compute);
  key.epilogue = static_cast<int>(epi);
  key.trans_a = static_cast<int>(op_a);
  key.trans_b = static_cast<int>(op_b);
  key.align_a = alignment_of(b, sa * static_cast<index_t>(sizeof(Ti)));
  key.align_b = alignment_of(a, sb * static_cast<index_t>(sizeof(Ti)));
  key.align_c = alignment_of(c, sc * static_cast<index_t>(sizeof(Tc)));
  key.align_bias = ep.lt_bias ? alignment_of(g.bias, 0) : 0;
  key.rows_d = rows_d;
  key.cols_d = cols_d;
  key.k = g.k;
  key.lda = ld_a;
  key.ldb = ld_b;
  key.ldc = ld_d;
  key.batch = batch;
  key.stride_a = sa;
  key.stride_b = sb;
  key.stride_c = sc;
  const std::string key_bytes(reinterpret_cast<const char*>(&key), sizeof(key));

  cuda_detail::lt_algo chosen;
  if (!cuda_detail::find_algo(*ctx.state, key_bytes, chosen)) {
    lt_pref pref;
    TRIDENT_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref.h));
    const std::uint64_t ws = ctx.workspace_bytes;
    TRIDENT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    TRIDENT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &key.align_a,
                                                              sizeof(key.align_a)));
    TRIDENT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &key.align_b,
                                                              sizeof(key.align_b)));
    TRIDENT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &key.align_c,
                                                              sizeof(key.align_c)));
    TRIDENT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &key.align_c,
                                                              sizeof(key.align_c)));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t s =
        cublasLtMatmulAlgoGetHeuristic(ctx.handle, desc.h, la.h, lb.h, lc.h, lc.h, pref.h, 1, &result, &found);
    // No algorithm: the heuristic says NOT_SUPPORTED or finds none; an unsupported epilogue
    // or batch may also be reported as INVALID_VALUE, so those fall back too. A plain single
    // GEMM that fails is an error worth its status.
    const bool fallback_possible = ep.lt != CUBLASLT_EPILOGUE_DEFAULT || batch > 1;
    if (s == CUBLAS_STATUS_NOT_SUPPORTED || (s == CUBLAS_STATUS_SUCCESS && (found < 1 || result.state != CUBLAS_STATUS_SUCCESS)) ||
        (s != CUBLAS_STATUS_SUCCESS && fallback_possible)) {
      chosen.available = false;
      cuda_detail::remember_algo(*ctx.state, key_bytes, chosen);
    } else {
      TRIDENT_CUBLAS_CHECK(s);
      chosen.algo = result.algo;
      chosen.workspace = result.workspaceSize;
      cuda_detail::remember_algo(*ctx.state, key_bytes, chosen);
    }
  }
  if (!chosen.available) return false;  // the caller retries with less fused, or less batched

  const Tc alpha = g.alpha, beta = g.beta;
  // C and D are the same matrix; with beta == 0 cuBLASLt does not read C.
  TRIDENT_CUBLAS_CHECK(cublasLtMatmul(ctx.handle, desc.h, &alpha, b, la.h, a, lb.h, &beta, c, lc.h, c, lc.h, &chosen.algo,
                                      ctx.workspace, ctx.workspace_bytes, stream));
  return true;
}

/// lt_matmul one matrix of the batch at a time; false if cuBLASLt declines any (those before
/// it have run).
template <class Ti, class Tc>
bool lt_matmul_each(const gemm_call<Ti, Tc>& g, int batch, const Ti* a, const Ti* b, Tc* c, const epilogue_plan& ep) {
  if (batch <= 1) return false;
  for (int i = 0; i < batch; ++i) {
    if (!lt_matmul(g, 1, a + i * g.stride_a, b + i * g.stride_b, c + i * g.stride_c, ep)) return false;
  }
  return true;
}

/// Applies what cuBLASLt did not fuse: c = act(c + bias) over the batch, or the whole GEMM
/// when there is no product (scale_only: c = act(beta*c + bias)).
template <class Tc>
void own_epilogue(index_t batch, index_t m, index_t n, Tc* c, index_t ldc, index_t stride_c, const float* bias,
                  activation act, bool scale_only, Tc beta) {
  const index_t ext_v[3] = {batch, m, n};
  index_array ext{}, st_c{}, st_bias{};
  for (int d = 0; d < 3; ++d) ext[d] = ext_v[d];
  st_c[0] = stride_c;
  st_c[1] = ldc;
  st_c[2] = 1;
  st_bias[0] = 0;
  st_bias[1] = 0;
  st_bias[2] = 1;
  const shape s(3, ext);
  const strides* st[2] = {&st_c, &st_bias};
  const auto p = make_plan<2>(s, st);
  if (scale_only) {
    launch_elementwise("trident gemm (k == 0 or alpha == 0)", s.numel(), p, gemm_scale_fn<Tc>{c, bias, act, beta}, false);
  } else {
    launch_elementwise("trident gemm epilogue", s.numel(), p, gemm_epilogue_fn<Tc>{c, bias, act}, false);
  }
}

}  // namespace cuda_kernels

/// The CUDA backend. Operations are asynchronous on the current stream except where noted.
template <>
struct kernels<cuda> {
  template <class T>
  using view = tensor_view<T, cuda>;

  /// Device -> host; returns when the bytes are in `dst`.
  static void copy_to_host(void* dst, const void* src, std::size_t bytes) {
    if (!bytes) return;
    const cudaStream_t s = cuda_current_stream();
    TRIDENT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s));
    TRIDENT_CUDA_CHECK(cudaStreamSynchronize(s));
  }
  /// Host -> device; returns when `src` may be reused (the copy has completed).
  static void copy_from_host(void* dst, const void* src, std::size_t bytes) {
    if (!bytes) return;
    const cudaStream_t s = cuda_current_stream();
    TRIDENT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s));
    TRIDENT_CUDA_CHECK(cudaStreamSynchronize(s));
  }
  /// Device -> device, asynchronous.
  static void copy_within(void* dst, const void* src, std::size_t bytes) {
    if (!bytes) return;
    TRIDENT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cuda_current_stream()));
  }

  /// out = v (converted to out's element type on the host, exactly as the CPU does).
  template <class T>
  static void fill(view<T> out, double v) {
    if (out.empty()) return;
    const strides* st[1] = {&out.strides()};
    const auto p = cuda_kernels::make_plan<1>(out.shape(), st);
    const bool vec = cuda_kernels::unit_run(p) && cuda_kernels::aligned4(out.data());
    cuda_kernels::launch_elementwise("trident::fill", out.numel(), p, cuda_kernels::fill_fn<T>{out.data(), static_cast<T>(v)},
                                     vec);
  }

  /// out = op(in), in broadcast to out's shape.
  template <class Op, class To, class Ti>
  static void map(const Op& op, view<To> out, view<const Ti> in) {
    if (out.empty()) return;
    const strides* st[2] = {&out.strides(), &in.strides()};
    const auto p = cuda_kernels::make_plan<2>(out.shape(), st);
    const bool vec = cuda_kernels::unit_run(p) && cuda_kernels::aligned4(out.data()) &&
                     (p.st[1][0] == 0 || cuda_kernels::aligned4(in.data()));
    cuda_kernels::launch_elementwise("trident::map", out.numel(), p,
                                     cuda_kernels::map_fn<Op, To, Ti>{op, out.data(), in.data(), p.st[1][0] == 0}, vec);
  }

  /// out = op(a, b), a and b broadcast to out's shape.
  template <class Op, class To, class Ta, class Tb>
  static void zip(const Op& op, view<To> out, view<const Ta> a, view<const Tb> b) {
    if (out.empty()) return;
    const strides* st[3] = {&out.strides(), &a.strides(), &b.strides()};
    const auto p = cuda_kernels::make_plan<3>(out.shape(), st);
    const bool vec = cuda_kernels::unit_run(p) && cuda_kernels::aligned4(out.data()) &&
                     (p.st[1][0] == 0 || cuda_kernels::aligned4(a.data())) &&
                     (p.st[2][0] == 0 || cuda_kernels::aligned4(b.data()));
    cuda_kernels::launch_elementwise(
        "trident::zip", out.numel(), p,
        cuda_kernels::zip_fn<Op, To, Ta, Tb>{op, out.data(), a.data(), b.data(), p.st[1][0] == 0, p.st[2][0] == 0}, vec);
  }

  /// Fills out from the counter-based stream described by `spec`: the same numbers as the CPU.
  template <class T>
  static void random(view<T> out, const random_spec& spec) {
    const index_t n = out.numel();
    if (n == 0) return;
    const index_t blocks = (n + 3) / 4;
    const strides* st[1] = {&out.strides()};
    const auto p = cuda_kernels::make_plan<1>(out.shape(), st);
    cuda_kernels::random_kernel<T><<<cuda_kernels::grid_for(blocks), cuda_kernels::block_threads, 0, cuda_current_stream()>>>(
        out.data(), p, n, spec);
    TRIDENT_CUDA_CHECK_LAUNCH("trident::random");
  }

  /// Reduces the last axis of `in` into `out` (in's shape without its last axis). Sums
  /// accumulate in double, max in the compute type (as on the CPU).
  template <class Reducer, class To, class Ti>
  static void reduce_last(const Reducer& red, view<To> out, view<const Ti> in) {
    using A = std::conditional_t<std::is_same_v<Reducer, ops::max_reducer>, cuda_kernels::compute_of<Ti>, double>;
    if (out.empty()) return;
    const int r = in.rank();
    const cuda_kernels::row_set rs = cuda_kernels::rows_of(in, out);
    const cudaStream_t s = cuda_current_stream();
    const index_t wave = static_cast<index_t>(cuda_detail::current_info().sm_count) * (2048 / cuda_kernels::block_threads);
    const bool column = r >= 2 && rs.step != 1 && rs.len > 1 && in.stride(r - 2) == 1 && in.size(r - 2) > 1;
    if (column && rs.rows >= 1024) {
      cuda_kernels::reduce_rows_thread_kernel<A><<<cuda_kernels::grid_for(rs.rows), cuda_kernels::block_threads, 0, s>>>(
          red, out.data(), in.data(), rs);
    } else if (rs.len >= 2048 && rs.rows < wave * 4) {
      const int grid = static_cast<int>(std::min<index_t>(rs.rows, wave));
      cuda_kernels::reduce_rows_block_kernel<A><<<grid, cuda_kernels::block_threads, 0, s>>>(red, out.data(), in.data(), rs);
    } else {
      const int grid = cuda_kernels::grid_for(rs.rows, cuda_kernels::block_threads / 32);
      cuda_kernels::reduce_rows_warp_kernel<A><<<grid, cuda_kernels::block_threads, 0, s>>>(red, out.data(), in.data(), rs);
    }
    TRIDENT_CUDA_CHECK_LAUNCH("trident::reduce_last");
  }

  /// Reduces every element of `in` to one value, in double; waits for the result.
  template <class Reducer, class T>
  static double reduce_all(const Reducer& red, view<const T> in) {
    const index_t n = in.numel();
    if (n == 0) return red.finish(red.template init<double>(), 0);
    const strides* st[1] = {&in.strides()};
    const auto p = cuda_kernels::make_plan<1>(in.shape(), st);
    // The grid depends on n only, so the summation order (and the result) is the same on every GPU.
    const int blocks = static_cast<int>(
        std::clamp<index_t>(cuda_kernels::ceil_div(n, index_t{cuda_kernels::block_threads} * 8), 1, cuda_kernels::reduce_all_max_blocks));
    const std::size_t bytes = static_cast<std::size_t>(blocks + 1) * sizeof(double);
    struct scratch_guard {
      void* p;
      std::size_t bytes;
      ~scratch_guard() { cuda::deallocate(p, bytes); }
    } scratch{cuda::allocate(bytes), bytes};
    double* partial = static_cast<double*>(scratch.p);
    const cudaStream_t s = cuda_current_stream();
    cuda_kernels::reduce_all_kernel<<<blocks, cuda_kernels::block_threads, 0, s>>>(red, in.data(), n, p, partial);
    TRIDENT_CUDA_CHECK_LAUNCH("trident::reduce_all (pass 1)");
    cuda_kernels::merge_partials_kernel<Reducer><<<1, cuda_kernels::block_threads, 0, s>>>(partial, blocks, partial + blocks);
    TRIDENT_CUDA_CHECK_LAUNCH("trident::reduce_all (pass 2)");
    double result = 0;
    TRIDENT_CUDA_CHECK(cudaMemcpyAsync(&result, partial + blocks, sizeof(double), cudaMemcpyDeviceToHost, s));
    TRIDENT_CUDA_CHECK(cudaStreamSynchronize(s));
    return red.finish(result, n);
  }

  /// Softmax (or log-softmax) along the last axis. Max-shifted; out may be in.
  template <class To, class Ti>
  static void softmax_last(view<To> out, view<const Ti> in, bool log) {
    using C = cuda_kernels::compute_of<To, Ti>;
    const cuda_kernels::row_set rs = cuda_kernels::rows_of(in, out);
    if (rs.len == 0 || rs.rows == 0) return;
    const cudaStream_t s = cuda_current_stream();
    if (rs.len >= 1024) {
      const index_t wave = static_cast<index_t>(cuda_detail::current_info().sm_count) * (2048 / cuda_kernels::block_threads);
      const int grid = static_cast<int>(std::min<index_t>(rs.rows, wave));
      cuda_kernels::softmax_block_kernel<C><<<grid, cuda_kernels::block_threads, 0, s>>>(out.data(), in.data(), rs, log);
    } else {
      const int grid = cuda_kernels::grid_for(rs.rows, cuda_kernels::block_threads / 32);
      cuda_kernels::softmax_warp_kernel<C><<<grid, cuda_kernels::block_threads, 0, s>>>(out.data(), in.data(), rs, log);
    }
    TRIDENT_CUDA_CHECK_LAUNCH("trident::softmax_last");
  }

  /// Batched strided GEMM with epilogue, through cuBLASLt: fp32 (TF32 tensor cores when
  /// cuda_settings::allow_tf32), bf16 and half inputs with fp32 accumulation and output,
  /// double in double. Bias, relu and the tanh GELU are fused into cuBLASLt's epilogue;
  /// the exact (erf) GELU, double's epilogue, a misaligned bias and any epilogue cuBLASLt
  /// declines run as one extra element-wise pass over C.
  template <class Ti, class Tc>
  static void gemm(const gemm_call<Ti, Tc>& g) {
    static_assert(std::is_same_v<Tc, std::conditional_t<std::is_same_v<Ti, double>, double, float>>,
                  "kernels<cuda>::gemm: double inputs accumulate in double, the others in float");
    if (g.batch <= 0 || g.m <= 0 || g.n <= 0) return;
    if (g.k <= 0 || g.alpha == Tc(0)) {
      cuda_kernels::own_epilogue<Tc>(g.batch, g.m, g.n, g.c, g.ldc, g.stride_c, g.bias, g.act, true, g.beta);
      return;
    }
    constexpr index_t int_max = INT32_MAX;
    if (g.m > int_max || g.n > int_max || g.k > int_max) {
      throw device_error("trident::kernels<cuda>::gemm: m=" + std::to_string(g.m) + " n=" + std::to_string(g.n) +
                         " k=" + std::to_string(g.k) + " exceed cuBLASLt's 32-bit sizes");
    }

    // What cuBLASLt fuses, and what our own pass does afterwards.
    cuda_kernels::epilogue_plan ep;
    const bool bias_fusable = g.bias != nullptr && reinterpret_cast<std::uintptr_t>(g.bias) % 16 == 0;
    if constexpr (std::is_same_v<Ti, double>) {
      ep.own_bias = g.bias != nullptr;
      ep.own_act = g.act;
    } else if (g.bias != nullptr && !bias_fusable) {
      ep.own_bias = true;
      ep.own_act = g.act;
    } else {
      const bool bias = g.bias != nullptr;
      ep.lt_bias = bias;
      switch (g.act) {
        case activation::none: ep.lt = bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT; break;
        case activation::relu: ep.lt = bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU; break;
        case activation::gelu_tanh:
          if (cuda_settings::fused_gelu.load(std::memory_order_relaxed)) {
            ep.lt = bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
          } else {
            ep.lt = bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
            ep.own_act = activation::gelu_tanh;
          }
          break;
        case activation::gelu:  // cuBLASLt's GELU is the tanh approximation: the exact one is ours
          ep.lt = bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
          ep.own_act = activation::gelu;
          break;
      }
    }

    for (index_t b0 = 0; b0 < g.batch; b0 += int_max) {
      const int count = static_cast<int>(std::min<index_t>(g.batch - b0, int_max));
      const Ti* a = g.a + b0 * g.stride_a;
      const Ti* b = g.b + b0 * g.stride_b;
      Tc* c = g.c + b0 * g.stride_c;
      cuda_kernels::epilogue_plan use = ep;
      if (!cuda_kernels::lt_matmul(g, count, a, b, c, use)) {
        // cuBLASLt declined the fused epilogue: plain product, then our pass
        use = cuda_kernels::epilogue_plan{};
        use.own_bias = g.bias != nullptr;
        use.own_act = g.act;
        // ... or declined the strided batch (e.g. a broadcast operand): one matrix at a time.
        // Nothing has run when lt_matmul returns false, so each retry starts from the old C;
        // a failure part-way through the last resort is an error, not another retry.
        if (!cuda_kernels::lt_matmul(g, count, a, b, c, use) && !cuda_kernels::lt_matmul_each(g, count, a, b, c, use)) {
          throw device_error("trident::kernels<cuda>::gemm: cuBLASLt has no algorithm for m=" + std::to_string(g.m) +
                             " n=" + std::to_string(g.n) + " k=" + std::to_string(g.k) + " batch=" + std::to_string(count) +
                             " (lda=" + std::to_string(g.lda) + ", ldb=" + std::to_string(g.ldb) + ", ldc=" +
                             std::to_string(g.ldc) + ", trans_a=" + std::to_string(g.trans_a) +
                             ", trans_b=" + std::to_string(g.trans_b) + ")");
        }
      }
      if (use.own_bias || use.own_act != activation::none) {
        cuda_kernels::own_epilogue<Tc>(count, g.m, g.n, c, g.ldc, g.stride_c, use.own_bias ? g.bias : nullptr, use.own_act,
                                       false, Tc(0));
      }
    }
  }
};

}  // namespace trident

#endif  // defined(__CUDACC__)
