#pragma once
/// @file parallel/communicator.hpp
/// The communicator concept that data parallel and ZeRO are written against, and `local_comm`,
/// the communicator of a single rank.
///
/// A communicator is a group of `size()` ranks that call the same collectives in the same
/// order, each on its own contiguous buffers:
///
/// | collective                                 | before (rank r)                    | after (rank r)                          |
/// |--------------------------------------------|------------------------------------|-----------------------------------------|
/// | `all_reduce(data, n, op)`                  | `data[0, n)` = x_r                 | `data` = op(x_0, ..., x_{size-1})       |
/// | `reduce_scatter(in, out, n, op)`           | `in[0, size*n)` = chunks c_r[0..size) | `out[0, n)` = op over ranks of chunk r |
/// | `all_gather(in, out, n)`                   | `in[0, n)` = x_r                   | `out[0, size*n)` = x_0, ..., x_{size-1} |
/// | `reduce_scatter_v(in, out, counts, op)`    | `in[0, Σcounts)` = pieces c_r[0..size), piece s of counts[s] | `out[0, counts[r])` = op over ranks of piece r |
/// | `all_gather_v(in, out, counts)`            | `in[0, counts[r])` = x_r           | `out[0, Σcounts)` = x_0, ..., x_{size-1} |
/// | `broadcast(data, n, root)`                 | root's `data` = x                  | `data` = x                              |
/// | `barrier()`                                | —                                  | every rank has arrived                  |
///
/// The `_v` forms take a piece size per rank (`counts`, size() entries, the same on every rank;
/// a count may be 0): ZeRO reduces and gathers flat ranges that straddle the ranks' partitions
/// unevenly. They copy `counts`, which need not outlive the call.
///
/// `iall_reduce`, `ireduce_scatter`, `iall_gather`, `ireduce_scatter_v` and `iall_gather_v`
/// start the same collectives and return a request: `wait()` blocks until the buffers hold the
/// result (and rethrows a failure); `test()` says whether that has happened and eventually
/// returns true. Buffers must stay alive and untouched until then. Collectives (blocking or
/// not) are matched across ranks by the order in which each rank issues them.
///
/// Element types: float, double, std::int32_t, bfloat16 and half. Reductions of the 2-byte
/// types accumulate in fp32 and round to the 2-byte type once, at the end: a bf16 gradient
/// summed over 8 ranks carries one rounding error, not seven. float accumulates in float,
/// double in double, int32 in int64 (the result must fit in int32). `reduce_op::average` is
/// the sum divided by `size()` in the accumulation type (integer division for int32).
///
/// Arguments are checked before any communication: a negative count, a null buffer with a
/// non-zero count, a root outside [0, size), overlapping `in` and `out` where the collective
/// forbids it, or an unknown reduce_op throw trident::error naming the collective and the values.
///
/// Implementations: `local_comm` (here, one rank), `thread_comm` (parallel/thread_comm.hpp:
/// ranks as threads of one process, for tests) and `mpi_comm` (parallel/mpi_comm.hpp through
/// trident/mpi.hpp). Code that needs a communicator takes any type that models the concept:
///
/// ```cpp
/// template <trident::communicator Comm>
/// void average_gradients(Comm& comm, trident::bfloat16* grads, trident::index_t n) {
///   auto req = comm.iall_reduce(grads, n, trident::reduce_op::average);  // starts it
///   do_other_work();                                                      // overlaps with it
///   req.wait();                                                           // grads now hold the mean
/// }
/// ```

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <type_traits>
#include <utility>

#include "../config.hpp"
#include "../core/error.hpp"
#include "../precision/bfloat16.hpp"
#include "../precision/convert.hpp"
#include "../precision/half.hpp"

namespace trident {

/// How a reduction combines the ranks' values, element by element.
enum class reduce_op {
  sum,      ///< x_0 + x_1 + ... in rank order where the implementation fixes the order
  max,      ///< the largest value (NaN wins in local_comm and thread_comm)
  min,      ///< the smallest value (NaN wins in local_comm and thread_comm)
  average,  ///< the sum divided by size(), in the accumulation type
};

/// The name of a reduce_op, for messages.
constexpr const char* to_string(reduce_op op) noexcept {
  switch (op) {
    case reduce_op::sum: return "sum";
    case reduce_op::max: return "max";
    case reduce_op::min: return "min";
    case reduce_op::average: return "average";
  }
  return "unknown";
}

/// A collective could not complete: another rank failed or left, or the ranks called
/// different collectives or passed different counts. (Bad arguments throw trident::error;
/// failures inside MPI throw mpi_error.)
class comm_error : public error {
 public:
  using error::error;
};

/// The element types every communicator carries.
template <class T>
concept comm_element = std::same_as<T, float> || std::same_as<T, double> || std::same_as<T, std::int32_t> ||
                       std::same_as<T, bfloat16> || std::same_as<T, half>;

/// The type a reduction of T accumulates in: fp32 for the 2-byte types, int64 for int32.
template <comm_element T>
using comm_accumulator_t = std::conditional_t<
    std::same_as<T, bfloat16> || std::same_as<T, half>, float,
    std::conditional_t<std::same_as<T, std::int32_t>, std::int64_t, T>>;

/// The handle of a started non-blocking collective.
///   - `wait()`: blocks until the collective has completed on this rank and its output buffer
///     holds the result; rethrows the collective's failure;
///   - `test()`: true once it has completed (repeated calls make progress and eventually
///     return true); throws the collective's failure.
/// A request destroyed before completion waits for it (and swallows its failure).
template <class R>
concept comm_request = std::move_constructible<R> && requires(R& r) {
  r.wait();
  { r.test() } -> std::same_as<bool>;
};

namespace detail {
/// The collectives of one element type (a piece of the communicator concept).
template <class C, class T>
concept communicator_for = requires(C& c, T* data, const T* in, T* out, index_t n, reduce_op op, int root) {
  c.all_reduce(data, n, op);
  c.reduce_scatter(in, out, n, op);
  c.all_gather(in, out, n);
  c.broadcast(data, n, root);
  { c.iall_reduce(data, n, op) } -> comm_request;
  { c.ireduce_scatter(in, out, n, op) } -> comm_request;
  { c.iall_gather(in, out, n) } -> comm_request;
  c.reduce_scatter_v(in, out, static_cast<const index_t*>(nullptr), op);
  c.all_gather_v(in, out, static_cast<const index_t*>(nullptr));
  { c.ireduce_scatter_v(in, out, static_cast<const index_t*>(nullptr), op) } -> comm_request;
  { c.iall_gather_v(in, out, static_cast<const index_t*>(nullptr)) } -> comm_request;
};
}  // namespace detail

/// A group of ranks with the collectives described in this file's header, on float, double,
/// int32, bfloat16 and half buffers.
///   - `rank()`, `size()`: this rank's index in [0, size) and the number of ranks;
///   - `request_type`: what the non-blocking collectives return (a comm_request);
///   - `barrier()`: returns once every rank has called it.
template <class C>
concept communicator = requires(C& c, const C& cc) {
  { cc.rank() } -> std::same_as<int>;
  { cc.size() } -> std::same_as<int>;
  c.barrier();
  typename C::request_type;
  requires comm_request<typename C::request_type>;
} && detail::communicator_for<C, float> && detail::communicator_for<C, double> &&
                       detail::communicator_for<C, std::int32_t> && detail::communicator_for<C, bfloat16> &&
                       detail::communicator_for<C, half>;

namespace detail {

// --- argument checks shared by the implementations ---------------------------------------

inline std::string comm_where(const char* comm, const char* call) { return std::string("trident::") + comm + "::" + call; }

inline void check_count(index_t n, const char* comm, const char* call, const char* what = "n") {
  if (n < 0) throw error(comm_where(comm, call) + ": " + what + " = " + std::to_string(n) + " is negative");
}

inline void check_buffer(const void* p, index_t n, const char* comm, const char* call, const char* what) {
  if (n > 0 && p == nullptr)
    throw error(comm_where(comm, call) + ": " + what + " is null with " + std::to_string(n) + " elements");
}

inline void check_op(reduce_op op, const char* comm, const char* call) {
  switch (op) {
    case reduce_op::sum:
    case reduce_op::max:
    case reduce_op::min:
    case reduce_op::average: return;
  }
  throw error(comm_where(comm, call) + ": unknown reduce_op " + std::to_string(static_cast<int>(op)));
}

inline void check_root(int root, int size, const char* comm, const char* call) {
  if (root < 0 || root >= size)
    throw error(comm_where(comm, call) + ": root " + std::to_string(root) + " is outside [0, " + std::to_string(size) + ")");
}

/// size * n elements must be addressable.
inline void check_total(index_t n, int size, const char* comm, const char* call) {
  if (size > 0 && n > std::numeric_limits<index_t>::max() / size)
    throw error(comm_where(comm, call) + ": n = " + std::to_string(n) + " times " + std::to_string(size) +
                " ranks overflows index_t");
}

/// Whether [a, a + abytes) and [b, b + bbytes) share a byte.
inline bool overlaps(const void* a, std::size_t abytes, const void* b, std::size_t bbytes) noexcept {
  if (abytes == 0 || bbytes == 0) return false;
  const auto pa = reinterpret_cast<std::uintptr_t>(a), pb = reinterpret_cast<std::uintptr_t>(b);
  return pa < pb + bbytes && pb < pa + abytes;
}

/// reduce_scatter: `in` (size*n) and `out` (n) must not overlap.
template <class T>
void check_disjoint_scatter(const T* in, const T* out, index_t n, int size, const char* comm, const char* call) {
  const auto sn = static_cast<std::size_t>(n);
  if (overlaps(in, sn * static_cast<std::size_t>(size) * sizeof(T), out, sn * sizeof(T)))
    throw error(comm_where(comm, call) + ": out overlaps in (the input of every rank must stay intact; use a separate output)");
}

/// all_gather: `in` (n) must not overlap `out` (size*n), except being exactly this rank's slot
/// `out + rank*n` (in-place gather).
template <class T>
void check_disjoint_gather(const T* in, const T* out, index_t n, int rank, int size, const char* comm, const char* call) {
  const auto sn = static_cast<std::size_t>(n);
  if (n > 0 && in == out + static_cast<std::size_t>(rank) * sn) return;
  if (overlaps(in, sn * sizeof(T), out, sn * static_cast<std::size_t>(size) * sizeof(T)))
    throw error(comm_where(comm, call) + ": in overlaps out other than as this rank's slot out + rank*n = out + " +
                std::to_string(static_cast<index_t>(rank) * n));
}

/// The counts of a _v collective: non-null, each >= 0, their sum addressable. Returns the sum
/// and, through `displ` (if given, size entries), each rank's first element.
inline index_t check_counts(const index_t* counts, int size, const char* comm, const char* call, index_t* displ = nullptr) {
  if (counts == nullptr) throw error(comm_where(comm, call) + ": counts is null (it needs one count per rank)");
  index_t total = 0;
  for (int s = 0; s < size; ++s) {
    if (counts[s] < 0) throw error(comm_where(comm, call) + ": counts[" + std::to_string(s) + "] = " + std::to_string(counts[s]) + " is negative");
    if (counts[s] > std::numeric_limits<index_t>::max() - total) throw error(comm_where(comm, call) + ": the counts' sum overflows index_t");
    if (displ) displ[s] = total;
    total += counts[s];
  }
  return total;
}

/// reduce_scatter_v: `in` (total) and `out` (mine) must not overlap.
template <class T>
void check_disjoint_scatter_v(const T* in, index_t total, const T* out, index_t mine, const char* comm, const char* call) {
  if (overlaps(in, static_cast<std::size_t>(total) * sizeof(T), out, static_cast<std::size_t>(mine) * sizeof(T)))
    throw error(comm_where(comm, call) + ": out overlaps in (the input of every rank must stay intact; use a separate output)");
}

/// all_gather_v: `in` (mine) must not overlap `out` (total) except as exactly this rank's piece.
template <class T>
void check_disjoint_gather_v(const T* in, index_t mine, const T* out, index_t total, index_t my_displ, const char* comm, const char* call) {
  if (mine > 0 && in == out + my_displ) return;
  if (overlaps(in, static_cast<std::size_t>(mine) * sizeof(T), out, static_cast<std::size_t>(total) * sizeof(T)))
    throw error(comm_where(comm, call) + ": in overlaps out other than as this rank's piece out + " + std::to_string(my_displ));
}

// --- element-wise reduction kernels --------------------------------------------------------

template <class A>
constexpr bool is_nan_value(A a) noexcept {
  if constexpr (std::is_floating_point_v<A>) return a != a;
  else return false;
}

/// acc[i] = combine(acc[i], x[i]) for sum, max and min (average accumulates as sum).
/// max and min let a NaN win wherever it appears, so the result does not depend on where.
template <class A>
inline void combine_into(A* TRIDENT_RESTRICT acc, const A* TRIDENT_RESTRICT x, std::size_t n, reduce_op op) noexcept {
  switch (op) {
    case reduce_op::sum:
    case reduce_op::average:
      for (std::size_t i = 0; i < n; ++i) acc[i] += x[i];
      return;
    case reduce_op::max:
      for (std::size_t i = 0; i < n; ++i) acc[i] = (x[i] > acc[i] || is_nan_value(x[i])) ? x[i] : acc[i];
      return;
    case reduce_op::min:
      for (std::size_t i = 0; i < n; ++i) acc[i] = (x[i] < acc[i] || is_nan_value(x[i])) ? x[i] : acc[i];
      return;
  }
}

/// Divides by the number of ranks when the op is average.
template <class A>
inline void finish_reduction(A* acc, std::size_t n, reduce_op op, int size) noexcept {
  if (op != reduce_op::average || size == 1) return;
  const A d = static_cast<A>(size);
  for (std::size_t i = 0; i < n; ++i) acc[i] /= d;
}

/// The name of a communicator element type, for messages.
template <comm_element T>
constexpr const char* comm_type_name() noexcept {
  if constexpr (std::same_as<T, float>) return "float";
  else if constexpr (std::same_as<T, double>) return "double";
  else if constexpr (std::same_as<T, std::int32_t>) return "int32";
  else if constexpr (std::same_as<T, bfloat16>) return "bfloat16";
  else return "half";
}

/// Widens T to its accumulation type (exact).
template <comm_element T>
inline void to_accumulator(const T* in, comm_accumulator_t<T>* out, std::size_t n) noexcept {
  if constexpr (std::same_as<T, bfloat16> || std::same_as<T, half>) simd::convert(in, out, n);
  else if constexpr (std::same_as<T, comm_accumulator_t<T>>) {
    if (n) std::memcpy(out, in, n * sizeof(T));
  } else {
    for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<comm_accumulator_t<T>>(in[i]);
  }
}

/// Narrows the accumulation type to T: round to nearest even for the 2-byte types, modulo
/// 2^32 for int32.
template <comm_element T>
inline void from_accumulator(const comm_accumulator_t<T>* in, T* out, std::size_t n) noexcept {
  if constexpr (std::same_as<T, bfloat16> || std::same_as<T, half>) simd::convert(in, out, n);
  else if constexpr (std::same_as<T, comm_accumulator_t<T>>) {
    if (n) std::memcpy(out, in, n * sizeof(T));
  } else {
    for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<T>(in[i]);
  }
}

/// Elements [begin, end) of rank r's share when n elements are split over p ranks: the first
/// n % p ranks get one more.
inline std::pair<index_t, index_t> even_share(index_t n, int p, int r) noexcept {
  const index_t q = n / p, rem = n % p;
  const index_t begin = r * q + std::min<index_t>(r, rem);
  return {begin, begin + q + (r < rem ? 1 : 0)};
}

/// acc[0, m) = op over ranks s = 0, 1, ..., p-1 of piece(s)[0, m), in rank order, in the
/// accumulation type A (not finished: average is still a sum). tmp holds m elements of A for
/// the widening (unused when T is A). The one rank-order reduction of thread_comm and of
/// mpi_comm's reductions in pieces.
template <class T, class A, class Piece>
inline void reduce_in_rank_order(Piece piece, std::size_t m, int p, reduce_op op, A* acc, A* tmp) noexcept {
  to_accumulator(piece(0), acc, m);
  for (int s = 1; s < p; ++s) {
    if constexpr (std::same_as<T, A>) {
      combine_into(acc, piece(s), m, op);
    } else {
      to_accumulator(piece(s), tmp, m);
      combine_into(acc, tmp, m, op);
    }
  }
}

/// A growable, 64-byte-aligned scratch buffer (reused across collectives).
class comm_scratch {
 public:
  comm_scratch() = default;
  comm_scratch(const comm_scratch&) = delete;
  comm_scratch& operator=(const comm_scratch&) = delete;
  ~comm_scratch() { release(); }

  /// At least `count` objects of A (contents unspecified).
  template <class A>
  A* get(std::size_t count) {
    const std::size_t bytes = count * sizeof(A);
    if (bytes > capacity_) {
      release();
      p_ = ::operator new(bytes, std::align_val_t{64});
      capacity_ = bytes;
    }
    return static_cast<A*>(p_);
  }

 private:
  void release() noexcept {
    if (p_) ::operator delete(p_, std::align_val_t{64});
    p_ = nullptr;
    capacity_ = 0;
  }
  void* p_ = nullptr;
  std::size_t capacity_ = 0;
};

}  // namespace detail

/// A request that is complete from the start: what local_comm's non-blocking collectives
/// (which finish before returning) give back.
class completed_request {
 public:
  /// Returns at once.
  void wait() noexcept {}
  /// Always true.
  bool test() noexcept { return true; }
};

/// The communicator of one rank: rank 0 of size 1. all_reduce leaves the data as it is
/// (a 2-byte value summed alone and rounded once is itself; its average divides by 1),
/// reduce_scatter and all_gather copy, broadcast and barrier do nothing. What single-process
/// training passes where a communicator is expected.
class local_comm {
 public:
  /// What the non-blocking collectives return (always complete).
  using request_type = completed_request;

  /// Always 0.
  int rank() const noexcept { return 0; }
  /// Always 1.
  int size() const noexcept { return 1; }

  /// Checks the arguments; the data is already the reduction over the one rank.
  template <comm_element T>
  void all_reduce(T* data, index_t n, reduce_op op) const {
    detail::check_count(n, "local_comm", "all_reduce");
    detail::check_buffer(data, n, "local_comm", "all_reduce", "data");
    detail::check_op(op, "local_comm", "all_reduce");
  }

  /// Copies in[0, n) to out (they must not overlap).
  template <comm_element T>
  void reduce_scatter(const T* in, T* out, index_t n_per_rank, reduce_op op) const {
    detail::check_count(n_per_rank, "local_comm", "reduce_scatter", "n_per_rank");
    detail::check_buffer(in, n_per_rank, "local_comm", "reduce_scatter", "in");
    detail::check_buffer(out, n_per_rank, "local_comm", "reduce_scatter", "out");
    detail::check_op(op, "local_comm", "reduce_scatter");
    detail::check_disjoint_scatter(in, out, n_per_rank, 1, "local_comm", "reduce_scatter");
    if (n_per_rank) std::memcpy(out, in, static_cast<std::size_t>(n_per_rank) * sizeof(T));
  }

  /// Copies in[0, n) to out (nothing to do when in == out).
  template <comm_element T>
  void all_gather(const T* in, T* out, index_t n_per_rank) const {
    detail::check_count(n_per_rank, "local_comm", "all_gather", "n_per_rank");
    detail::check_buffer(in, n_per_rank, "local_comm", "all_gather", "in");
    detail::check_buffer(out, n_per_rank, "local_comm", "all_gather", "out");
    detail::check_disjoint_gather(in, out, n_per_rank, 0, 1, "local_comm", "all_gather");
    if (n_per_rank && in != out) std::memcpy(out, in, static_cast<std::size_t>(n_per_rank) * sizeof(T));
  }

  /// Copies in[0, counts[0]) to out (they must not overlap).
  template <comm_element T>
  void reduce_scatter_v(const T* in, T* out, const index_t* counts, reduce_op op) const {
    const index_t n = detail::check_counts(counts, 1, "local_comm", "reduce_scatter_v");
    detail::check_buffer(in, n, "local_comm", "reduce_scatter_v", "in");
    detail::check_buffer(out, n, "local_comm", "reduce_scatter_v", "out");
    detail::check_op(op, "local_comm", "reduce_scatter_v");
    detail::check_disjoint_scatter_v(in, n, out, n, "local_comm", "reduce_scatter_v");
    if (n) std::memcpy(out, in, static_cast<std::size_t>(n) * sizeof(T));
  }

  /// Copies in[0, counts[0]) to out (nothing to do when in == out).
  template <comm_element T>
  void all_gather_v(const T* in, T* out, const index_t* counts) const {
    const index_t n = detail::check_counts(counts, 1, "local_comm", "all_gather_v");
    detail::check_buffer(in, n, "local_comm", "all_gather_v", "in");
    detail::check_buffer(out, n, "local_comm", "all_gather_v", "out");
    detail::check_disjoint_gather_v(in, n, out, n, 0, "local_comm", "all_gather_v");
    if (n && in != out) std::memcpy(out, in, static_cast<std::size_t>(n) * sizeof(T));
  }

  /// Checks the arguments (root must be 0); the data is already the root's.
  template <comm_element T>
  void broadcast(T* data, index_t n, int root) const {
    detail::check_count(n, "local_comm", "broadcast");
    detail::check_buffer(data, n, "local_comm", "broadcast", "data");
    detail::check_root(root, 1, "local_comm", "broadcast");
  }

  /// Returns at once.
  void barrier() const noexcept {}

  /// all_reduce, complete on return.
  template <comm_element T>
  completed_request iall_reduce(T* data, index_t n, reduce_op op) const {
    all_reduce(data, n, op);
    return {};
  }
  /// reduce_scatter, complete on return.
  template <comm_element T>
  completed_request ireduce_scatter(const T* in, T* out, index_t n_per_rank, reduce_op op) const {
    reduce_scatter(in, out, n_per_rank, op);
    return {};
  }
  /// all_gather, complete on return.
  template <comm_element T>
  completed_request iall_gather(const T* in, T* out, index_t n_per_rank) const {
    all_gather(in, out, n_per_rank);
    return {};
  }
  /// reduce_scatter_v, complete on return.
  template <comm_element T>
  completed_request ireduce_scatter_v(const T* in, T* out, const index_t* counts, reduce_op op) const {
    reduce_scatter_v(in, out, counts, op);
    return {};
  }
  /// all_gather_v, complete on return.
  template <comm_element T>
  completed_request iall_gather_v(const T* in, T* out, const index_t* counts) const {
    all_gather_v(in, out, counts);
    return {};
  }
};

static_assert(comm_request<completed_request>);
static_assert(communicator<local_comm>);

}  // namespace trident
