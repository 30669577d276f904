#pragma once
/// @file parallel/mpi_comm.hpp
/// `mpi_comm`: the communicator over MPI, between processes. Include it through
/// trident/mpi.hpp (link trident::mpi).
///
/// Design. An mpi_comm duplicates the MPI_Comm it is given (MPI_COMM_WORLD by default), so
/// that trident's collectives can never match a collective of the user's on that
/// communicator, and sets MPI_ERRORS_RETURN on the duplicate only, so MPI failures become
/// mpi_error exceptions (naming the call) instead of aborting the job. The collectives are
/// MPI_Allreduce, MPI_Allgather, MPI_Allgatherv (the _v form), MPI_Bcast, MPI_Barrier, their
/// MPI-3 non-blocking forms, and the reductions below; `mpi_request` wraps the MPI_Request (and
/// owns what a non-blocking collective needs until it completes: count and displacement
/// arrays, staging, the step that finishes it).
///
/// All-reduces on one node. When every rank of the communicator is on one node
/// (MPI_Comm_split_type with MPI_COMM_TYPE_SHARED keeps them all) and the element type is a
/// floating-point one (float, double, bfloat16, half), all_reduce and iall_reduce go through an
/// MPI-3 shared-memory window instead (detail::shm_reducer, mpi_shm.hpp): each rank reduces its
/// piece of every rank's buffer in rank order where it lies and copies the others' reduced
/// pieces, so a started all-reduce advances whenever its rank calls test(), not only when the
/// ranks meet inside MPI, and the result is thread_comm's, bit for bit. On the large GPT shape
/// this made data parallel's 2-rank step a few percent faster than with MPI_Iallreduce
/// (benchmarks/RESULTS.md). The window is made on the first all-reduce and grows with the
/// largest; it holds 3 slots of that size per rank (shared_memory_bytes()). Construct with
/// intra_node::mpi to use MPI's all-reduces instead.
///
/// Reductions. Otherwise all_reduce of float, double and int32 is MPI_Allreduce
/// (MPI_Iallreduce) with MPI's own op (average: MPI_SUM, then a local division by size()), and
/// so are int32's reduce-scatters. The other reductions are done in pieces: each rank receives
/// its piece of every other rank's buffer in the element type (MPI_Alltoallv, or MPI_Ialltoallv
/// for the non-blocking ones, whose request reduces on completion), reduces the pieces in rank
/// order in the accumulation type (fp32 for bfloat16 and half) and rounds once; all_reduce of
/// the 2-byte types then gathers the rounded pieces (MPI_Allgatherv). That is every
/// reduce_scatter and reduce_scatter_v of float, double, bfloat16 and half, blocking or not,
/// and the blocking 2-byte all_reduce. Why:
///  - Open MPI's reduce-scatters were slower on this library's development machine than an
///    all-to-all of the same pieces and a local sum (MPI_Reduce_scatter_block 1.35-17x at
///    64 KiB-64 MiB), and ZeRO-1/2/3 live on them: ZeRO-2's step on the large GPT went from
///    1.14x data parallel's to 1.00x (benchmarks/RESULTS.md);
///  - 2-byte words are summed in fp32 and rounded once, which MPI cannot do (a user-defined
///    MPI_Op on 2-byte words would round at every step of MPI's reduction tree), and moving
///    them as 2-byte words halves the bytes of widening to fp32 first;
///  - the result is thread_comm's, bit for bit, whatever MPI's algorithms.
/// The cost: a scratch of (size-1) pieces (kept by the communicator between blocking calls,
/// owned by the request of a non-blocking one) and, for the 2-byte all_reduce, two
/// collectives' latency where MPI_Allreduce takes one. The non-blocking 2-byte all_reduce
/// widens into an fp32 buffer the request owns, reduces it with MPI_Iallreduce of MPI_FLOAT
/// and rounds back once on completion: one MPI request, in MPI's order.
///
/// Order. Where MPI reduces (int32 all_reduce and reduce-scatters; float and double all_reduce
/// and the non-blocking 2-byte all_reduce across nodes), it chooses the order: its algorithm
/// depends on the size and the implementation, so unlike thread_comm the order is not rank
/// order; MPI implementations give the same result on every rank and, for the same ranks, sizes
/// and process layout, the same result every run. Those results are exactly a rank-order
/// reduction's whenever the fp32 (fp64) sums involved are exact; the reductions done in pieces
/// and through shared memory always are.
///
/// Threads. mpi_environment initialises MPI with MPI_THREAD_FUNNELED: call an mpi_comm from
/// the main thread only. Non-blocking collectives progress inside MPI calls (test(), wait(),
/// other collectives), so poll test() or call wait(). Requests must complete before their
/// communicator is destroyed (the destructor completes the shared-memory ones).
///
/// ```cpp
/// trident::mpi_environment env(&argc, &argv);
/// trident::mpi_comm comm;                         // a duplicate of MPI_COMM_WORLD
/// std::vector<trident::bfloat16> g(n);
/// auto req = comm.iall_reduce(g.data(), n, trident::reduce_op::average);
/// // ... work that does not touch g ...
/// req.wait();                                     // g holds the mean over ranks, rounded once
/// ```

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "communicator.hpp"
#include "mpi_shm.hpp"
#include "mpi_types.hpp"

namespace trident {

namespace detail {

inline MPI_Op mpi_op(reduce_op op) noexcept {
  switch (op) {
    case reduce_op::max: return MPI_MAX;
    case reduce_op::min: return MPI_MIN;
    case reduce_op::sum:
    case reduce_op::average: break;
  }
  return MPI_SUM;
}

/// MPI counts are ints.
inline int mpi_count(index_t n, const char* call) {
  if (n > INT_MAX)
    throw error(std::string("trident::mpi_comm::") + call + ": n = " + std::to_string(n) +
                " exceeds MPI's int count limit " + std::to_string(INT_MAX) + "; split the buffer");
  return static_cast<int>(n);
}

template <class T>
constexpr bool is_two_byte_float = std::same_as<T, bfloat16> || std::same_as<T, half>;

/// Whose reduce-scatters mpi_comm does in pieces (Alltoallv and a rank-order reduction).
template <class T>
constexpr bool reduced_in_pieces = is_two_byte_float<T> || std::floating_point<T>;

/// The division of `average`, in the type MPI reduced in, done locally after the sum.
template <class A>
void divide_by(A* data, std::size_t n, int size) noexcept {
  if (size == 1) return;
  const A d = static_cast<A>(size);
  for (std::size_t i = 0; i < n; ++i) data[i] /= d;
}

}  // namespace detail

/// The handle of an mpi_comm non-blocking collective (a comm_request): the MPI_Request, the
/// staging of a reduction (the pieces received from the other ranks, or the fp32 widening of a
/// 2-byte all_reduce), and the step that finishes it (reduce the pieces, or round back to 2
/// bytes; divide for average), run once on completion. A default-made request is complete.
/// Destroying a request that is not complete waits for it.
class mpi_request {
 public:
  /// A complete request.
  mpi_request() noexcept = default;
  /// Takes over the collective of `o` (which becomes complete).
  mpi_request(mpi_request&& o) noexcept
      : req_(std::exchange(o.req_, MPI_REQUEST_NULL)),
        shm_(std::move(o.shm_)),
        ticket_(o.ticket_),
        scratch_(std::move(o.scratch_)),
        ints_(std::move(o.ints_)),
        finish_(std::move(o.finish_)) {
    o.finish_ = nullptr;
  }
  /// Waits for this request's collective, then takes over that of `o`.
  mpi_request& operator=(mpi_request&& o) noexcept {
    if (this != &o) {
      wait_quietly();
      req_ = std::exchange(o.req_, MPI_REQUEST_NULL);
      shm_ = std::move(o.shm_);
      ticket_ = o.ticket_;
      scratch_ = std::move(o.scratch_);
      ints_ = std::move(o.ints_);
      finish_ = std::move(o.finish_);
      o.finish_ = nullptr;
    }
    return *this;
  }
  mpi_request(const mpi_request&) = delete;
  mpi_request& operator=(const mpi_request&) = delete;
  ~mpi_request() { wait_quietly(); }

  /// Blocks until the collective has completed and the output holds the result (MPI_Wait, or
  /// the shared-memory all-reduce's steps; the process's shared-memory all-reduces in flight
  /// are completed before MPI_Wait blocks).
  void wait() {
    if (shm_) {
      shm_->wait(ticket_);
    } else if (req_ != MPI_REQUEST_NULL) {
      detail::shm_reducer::drain_all();
      detail::check_mpi(MPI_Wait(&req_, MPI_STATUS_IGNORE), "MPI_Wait");
    }
    complete();
  }

  /// Whether the collective has completed (MPI_Test, which also drives MPI's progress, or the
  /// steps of a shared-memory all-reduce that can be taken now); when it has, the output holds
  /// the result.
  bool test() {
    if (shm_) {
      if (!shm_->test(ticket_)) return false;
    } else if (req_ != MPI_REQUEST_NULL) {
      detail::shm_reducer::progress_all();
      int flag = 0;
      detail::check_mpi(MPI_Test(&req_, &flag, MPI_STATUS_IGNORE), "MPI_Test");
      if (!flag) return false;
    }
    complete();
    return true;
  }

  /// The underlying request (MPI_REQUEST_NULL once complete).
  MPI_Request native() const noexcept { return req_; }

 private:
  friend class mpi_comm;

  void complete() {
    if (finish_) {
      auto f = std::move(finish_);
      finish_ = nullptr;
      f();
    }
    scratch_.reset();
    ints_.reset();
    shm_.reset();
  }

  void wait_quietly() noexcept {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    try {
      wait();
    } catch (...) {
    }
  }

  MPI_Request req_ = MPI_REQUEST_NULL;
  std::shared_ptr<detail::shm_reducer> shm_;  // a shared-memory all-reduce's reducer, until complete
  std::uint64_t ticket_ = 0;                  // and its ticket
  std::unique_ptr<float[]> scratch_;  // staging of a reduction (its address is stable)
  std::unique_ptr<int[]> ints_;       // counts and displacements of a _v collective
  std::function<void()> finish_;
};

/// How an mpi_comm all-reduces floating-point buffers when all its ranks are on one node:
/// through a shared-memory window (mpi_shm.hpp), or with MPI's own all-reduce.
enum class intra_node { shared_memory, mpi };

/// A communicator over MPI (see the file header): a duplicate of an MPI communicator, with
/// trident's collectives on it. Movable, not copyable; frees the duplicate on destruction
/// (unless MPI is already finalised).
class mpi_comm {
 public:
  /// What the non-blocking collectives return.
  using request_type = mpi_request;

  /// Duplicates `parent` (MPI must be initialised; collective over `parent`). With
  /// intra_node::shared_memory (the default), floating-point all-reduces go through a
  /// shared-memory window when every rank is on one node (see the file header).
  explicit mpi_comm(MPI_Comm parent = MPI_COMM_WORLD, intra_node how = intra_node::shared_memory) {
    int initialised = 0;
    MPI_Initialized(&initialised);
    if (!initialised) throw error("trident::mpi_comm: MPI is not initialised (make a trident::mpi_environment first)");
    detail::check_mpi(MPI_Comm_dup(parent, &comm_), "MPI_Comm_dup");
    detail::check_mpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    detail::check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    detail::check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
    if (how == intra_node::shared_memory && size_ > 1) {
      MPI_Comm node = MPI_COMM_NULL;
      detail::check_mpi(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node), "MPI_Comm_split_type");
      int node_size = 0;
      MPI_Comm_size(node, &node_size);
      if (node_size == size_) shm_ = std::make_shared<detail::shm_reducer>(node);
      else MPI_Comm_free(&node);
    }
  }
  mpi_comm(const mpi_comm&) = delete;
  mpi_comm& operator=(const mpi_comm&) = delete;
  /// Takes over `o`'s communicator (`o` is left without one).
  mpi_comm(mpi_comm&& o) noexcept
      : comm_(std::exchange(o.comm_, MPI_COMM_NULL)), rank_(o.rank_), size_(o.size_), shm_(std::move(o.shm_)) {}
  /// Frees this communicator and takes over `o`'s.
  mpi_comm& operator=(mpi_comm&& o) noexcept {
    if (this != &o) {
      free();
      comm_ = std::exchange(o.comm_, MPI_COMM_NULL);
      rank_ = o.rank_;
      size_ = o.size_;
      shm_ = std::move(o.shm_);
    }
    return *this;
  }
  ~mpi_comm() { free(); }

  /// This process's rank in the communicator.
  int rank() const noexcept { return rank_; }
  /// The number of processes.
  int size() const noexcept { return size_; }
  /// The duplicated MPI communicator, for calls of one's own.
  MPI_Comm native() const noexcept { return comm_; }
  /// Whether floating-point all-reduces go through the shared-memory window.
  bool shared_memory() const noexcept { return shm_ != nullptr; }
  /// Bytes of this rank's segment of that window (0 without one, or before the first use).
  std::size_t shared_memory_bytes() const noexcept { return shm_ ? shm_->segment_bytes() : 0; }

  /// In place: every rank's data[0, n) becomes op over the ranks (2-byte types in fp32).
  template <comm_element T>
  void all_reduce(T* data, index_t n, reduce_op op) {
    check_all_reduce(data, n, op);
    const int count = detail::mpi_count(n, "all_reduce");
    const auto len = static_cast<std::size_t>(n);
    if constexpr (detail::reduced_in_pieces<T>) {
      if (shm_) {
        if (n > 0) shm_->wait(shm_->start(data, n, op));
        return;
      }
    }
    quiesce();
    if constexpr (detail::is_two_byte_float<T>) {
      if (size_ == 1) return;  // one value, summed alone and rounded once, is itself
      int* c = even_pieces(n);
      const int* d = c + size_;
      reduce_pieces(data, data + d[rank_], c, d, op);
      detail::check_mpi(MPI_Allgatherv(MPI_IN_PLACE, 0, mpi_type<T>(), data, c, d, mpi_type<T>(), comm_), "MPI_Allgatherv");
    } else {
      detail::check_mpi(MPI_Allreduce(MPI_IN_PLACE, data, count, mpi_type<T>(), detail::mpi_op(op), comm_), "MPI_Allreduce");
      if (op == reduce_op::average) detail::divide_by(data, len, size_);
    }
  }

  /// out[0, n_per_rank) = op over ranks of their in[rank*n_per_rank, (rank+1)*n_per_rank).
  /// `in` and `out` must not overlap.
  template <comm_element T>
  void reduce_scatter(const T* in, T* out, index_t n_per_rank, reduce_op op) {
    check_reduce_scatter(in, out, n_per_rank, op);
    const int count = detail::mpi_count(n_per_rank, "reduce_scatter");
    quiesce();
    if constexpr (detail::reduced_in_pieces<T>) {
      const int* c = equal_pieces(count);
      reduce_pieces(in, out, c, c + size_, op);
    } else {
      detail::check_mpi(MPI_Reduce_scatter_block(in, out, count, mpi_type<T>(), detail::mpi_op(op), comm_), "MPI_Reduce_scatter_block");
      if (op == reduce_op::average) detail::divide_by(out, static_cast<std::size_t>(n_per_rank), size_);
    }
  }

  /// out[s*n_per_rank, (s+1)*n_per_rank) = rank s's in[0, n_per_rank). `in` may be this rank's
  /// slot `out + rank*n_per_rank` (MPI_IN_PLACE); it may not overlap `out` otherwise.
  template <comm_element T>
  void all_gather(const T* in, T* out, index_t n_per_rank) {
    check_all_gather(in, out, n_per_rank);
    const int count = detail::mpi_count(n_per_rank, "all_gather");
    quiesce();
    const void* send = in_place_gather(in, out, n_per_rank) ? MPI_IN_PLACE : static_cast<const void*>(in);
    detail::check_mpi(MPI_Allgather(send, count, mpi_type<T>(), out, count, mpi_type<T>(), comm_), "MPI_Allgather");
  }

  /// out[0, counts[rank]) = op over ranks of their piece `rank` of in (pieces in rank order).
  /// `in` and `out` must not overlap.
  template <comm_element T>
  void reduce_scatter_v(const T* in, T* out, const index_t* counts, reduce_op op) {
    auto ints = v_arrays(counts, "reduce_scatter_v");
    check_reduce_scatter_v(in, out, counts, op);
    quiesce();
    if constexpr (detail::reduced_in_pieces<T>) {
      reduce_pieces(in, out, ints.get(), ints.get() + size_, op);
    } else {
      mpi_request r = start_reduce_scatter_v(in, out, counts, op, std::move(ints), false);
      r.wait();
    }
  }

  /// out = the ranks' in[0, counts[s]) in rank order. `in` may be this rank's piece of `out`
  /// (MPI_IN_PLACE); it may not overlap `out` otherwise.
  template <comm_element T>
  void all_gather_v(const T* in, T* out, const index_t* counts) {
    auto ints = v_arrays(counts, "all_gather_v");
    const int* c = ints.get();
    const int* d = c + size_;
    const void* send = counts[rank_] > 0 && in == out + d[rank_] ? MPI_IN_PLACE : static_cast<const void*>(in);
    check_all_gather_v(in, out, counts, d[rank_]);
    quiesce();
    detail::check_mpi(MPI_Allgatherv(send, c[rank_], mpi_type<T>(), out, c, d, mpi_type<T>(), comm_), "MPI_Allgatherv");
  }

  /// Every rank's data[0, n) becomes the root's.
  template <comm_element T>
  void broadcast(T* data, index_t n, int root) {
    detail::check_count(n, "mpi_comm", "broadcast");
    detail::check_buffer(data, n, "mpi_comm", "broadcast", "data");
    detail::check_root(root, size_, "mpi_comm", "broadcast");
    quiesce();
    detail::check_mpi(MPI_Bcast(data, detail::mpi_count(n, "broadcast"), mpi_type<T>(), root, comm_), "MPI_Bcast");
  }

  /// Returns once every rank has called barrier().
  void barrier() {
    quiesce();
    detail::check_mpi(MPI_Barrier(comm_), "MPI_Barrier");
  }

  /// Starts all_reduce (MPI_Iallreduce). Arguments are checked now.
  template <comm_element T>
  mpi_request iall_reduce(T* data, index_t n, reduce_op op) {
    check_all_reduce(data, n, op);
    const int count = detail::mpi_count(n, "iall_reduce");
    const auto len = static_cast<std::size_t>(n);
    const int size = size_;
    mpi_request r;
    if constexpr (detail::reduced_in_pieces<T>) {
      if (shm_) {
        if (n > 0) {
          r.ticket_ = shm_->start(data, n, op);
          r.shm_ = shm_;
        }
        return r;
      }
    }
    if constexpr (detail::is_two_byte_float<T>) {
      r.scratch_ = std::make_unique_for_overwrite<float[]>(len);
      float* s = r.scratch_.get();
      detail::to_accumulator(data, s, len);
      detail::check_mpi(MPI_Iallreduce(MPI_IN_PLACE, s, count, MPI_FLOAT, detail::mpi_op(op), comm_, &r.req_), "MPI_Iallreduce");
      r.finish_ = [s, data, len, op, size] {
        if (op == reduce_op::average) detail::divide_by(s, len, size);
        detail::from_accumulator(s, data, len);
      };
    } else {
      detail::check_mpi(MPI_Iallreduce(MPI_IN_PLACE, data, count, mpi_type<T>(), detail::mpi_op(op), comm_, &r.req_), "MPI_Iallreduce");
      if (op == reduce_op::average) r.finish_ = [data, len, size] { detail::divide_by(data, len, size); };
    }
    return r;
  }

  /// Starts reduce_scatter (MPI_Ireduce_scatter_block). Arguments are checked now.
  template <comm_element T>
  mpi_request ireduce_scatter(const T* in, T* out, index_t n_per_rank, reduce_op op) {
    check_reduce_scatter(in, out, n_per_rank, op);
    const int count = detail::mpi_count(n_per_rank, "ireduce_scatter");
    if constexpr (detail::reduced_in_pieces<T>) {
      const int* c = equal_pieces(count);
      return start_pieces(in, out, c, c + size_, op);
    } else {
      const auto len = static_cast<std::size_t>(n_per_rank);
      const int size = size_;
      mpi_request r;
      detail::check_mpi(MPI_Ireduce_scatter_block(in, out, count, mpi_type<T>(), detail::mpi_op(op), comm_, &r.req_),
                        "MPI_Ireduce_scatter_block");
      if (op == reduce_op::average) r.finish_ = [out, len, size] { detail::divide_by(out, len, size); };
      return r;
    }
  }

  /// Starts all_gather (MPI_Iallgather). Arguments are checked now.
  template <comm_element T>
  mpi_request iall_gather(const T* in, T* out, index_t n_per_rank) {
    check_all_gather(in, out, n_per_rank);
    const int count = detail::mpi_count(n_per_rank, "iall_gather");
    const void* send = in_place_gather(in, out, n_per_rank) ? MPI_IN_PLACE : static_cast<const void*>(in);
    mpi_request r;
    detail::check_mpi(MPI_Iallgather(send, count, mpi_type<T>(), out, count, mpi_type<T>(), comm_, &r.req_), "MPI_Iallgather");
    return r;
  }

  /// Starts reduce_scatter_v (MPI_Ireduce_scatter). Arguments are checked now.
  template <comm_element T>
  mpi_request ireduce_scatter_v(const T* in, T* out, const index_t* counts, reduce_op op) {
    auto ints = v_arrays(counts, "ireduce_scatter_v");
    check_reduce_scatter_v(in, out, counts, op);
    if constexpr (detail::reduced_in_pieces<T>) {
      return start_pieces(in, out, ints.get(), ints.get() + size_, op);
    } else {
      return start_reduce_scatter_v(in, out, counts, op, std::move(ints), true);
    }
  }

  /// Starts all_gather_v (MPI_Iallgatherv). Arguments are checked now.
  template <comm_element T>
  mpi_request iall_gather_v(const T* in, T* out, const index_t* counts) {
    auto ints = v_arrays(counts, "iall_gather_v");
    const int* c = ints.get();
    const int* d = c + size_;
    check_all_gather_v(in, out, counts, d[rank_]);
    const void* send = counts[rank_] > 0 && in == out + d[rank_] ? MPI_IN_PLACE : static_cast<const void*>(in);
    mpi_request r;
    detail::check_mpi(MPI_Iallgatherv(send, c[rank_], mpi_type<T>(), out, c, d, mpi_type<T>(), comm_, &r.req_), "MPI_Iallgatherv");
    r.ints_ = std::move(ints);
    return r;
  }

 private:
  /// Before a blocking MPI call: completes the process's shared-memory all-reduces in flight,
  /// which the other ranks may be waiting for (see mpi_shm.hpp).
  static void quiesce() { detail::shm_reducer::drain_all(); }

  /// The int counts (size entries) then displacements (size entries) of a _v collective;
  /// every count and the total must fit MPI's int.
  std::unique_ptr<int[]> v_arrays(const index_t* counts, const char* call) const {
    const index_t total = detail::check_counts(counts, size_, "mpi_comm", call);
    detail::mpi_count(total, call);
    auto a = std::make_unique_for_overwrite<int[]>(2 * static_cast<std::size_t>(size_));
    int at = 0;
    for (int s = 0; s < size_; ++s) {
      a[static_cast<std::size_t>(s)] = static_cast<int>(counts[s]);
      a[static_cast<std::size_t>(size_ + s)] = at;
      at += static_cast<int>(counts[s]);
    }
    return a;
  }

  template <class T>
  mpi_request start_reduce_scatter_v(const T* in, T* out, const index_t* counts, reduce_op op, std::unique_ptr<int[]> ints, bool nonblocking) {
    static_assert(!detail::reduced_in_pieces<T>, "floating-point reduce-scatters go through reduce_pieces / start_pieces");
    const int* c = ints.get();
    const auto len = static_cast<std::size_t>(counts[rank_]);
    const int size = size_;
    mpi_request r;
    if (nonblocking) {
      detail::check_mpi(MPI_Ireduce_scatter(in, out, c, mpi_type<T>(), detail::mpi_op(op), comm_, &r.req_), "MPI_Ireduce_scatter");
    } else {
      detail::check_mpi(MPI_Reduce_scatter(in, out, c, mpi_type<T>(), detail::mpi_op(op), comm_), "MPI_Reduce_scatter");
    }
    if (op == reduce_op::average) r.finish_ = [out, len, size] { detail::divide_by(out, len, size); };
    r.ints_ = std::move(ints);
    return r;
  }

  template <class T>
  void check_reduce_scatter_v(const T* in, const T* out, const index_t* counts, reduce_op op) const {
    const index_t total = detail::check_counts(counts, size_, "mpi_comm", "reduce_scatter_v");
    detail::check_buffer(in, total, "mpi_comm", "reduce_scatter_v", "in");
    detail::check_buffer(out, counts[rank_], "mpi_comm", "reduce_scatter_v", "out");
    detail::check_op(op, "mpi_comm", "reduce_scatter_v");
    detail::check_disjoint_scatter_v(in, total, out, counts[rank_], "mpi_comm", "reduce_scatter_v");
  }
  template <class T>
  void check_all_gather_v(const T* in, const T* out, const index_t* counts, index_t my_displ) const {
    const index_t total = detail::check_counts(counts, size_, "mpi_comm", "all_gather_v");
    detail::check_buffer(in, counts[rank_], "mpi_comm", "all_gather_v", "in");
    detail::check_buffer(out, total, "mpi_comm", "all_gather_v", "out");
    detail::check_disjoint_gather_v(in, counts[rank_], out, total, my_displ, "mpi_comm", "all_gather_v");
  }

  /// Reductions done in pieces (see the file header): rank s gets piece s (counts[s] elements
  /// at displs[s]) of every other rank's `in` in the element type (MPI_Alltoallv), and reduces
  /// the pieces in rank order in the accumulation type, rounded once into `out` (counts[rank]
  /// elements; `out` may be this rank's own piece of `in`, which never travels).
  template <class T>
  void reduce_pieces(const T* in, T* out, const int* counts, const int* displs, reduce_op op) {
    using A = comm_accumulator_t<T>;
    const auto mine = static_cast<std::size_t>(counts[rank_]);
    const std::size_t piece_bytes = pieces_bytes<T>(mine);
    auto* base = scratch_.get<unsigned char>(piece_bytes + 2 * block * sizeof(A));
    int* a = piece_ints() + 2 * size_;  // after the callers' counts and displacements
    exchange_arrays(counts, displs, a);
    T* recv = reinterpret_cast<T*>(base);
    detail::check_mpi(MPI_Alltoallv(in, a, a + size_, mpi_type<T>(), recv, a + 2 * size_, a + 3 * size_, mpi_type<T>(), comm_),
                      "MPI_Alltoallv");
    A* acc = reinterpret_cast<A*>(base + piece_bytes);
    reduce_received(in + displs[rank_], recv, out, mine, size_, rank_, op, acc, acc + block);
  }

  /// The same, non-blocking (MPI_Ialltoallv): the request owns the received pieces and the
  /// arrays, and reduces on completion. `in` must stay as it is until then.
  template <class T>
  mpi_request start_pieces(const T* in, T* out, const int* counts, const int* displs, reduce_op op) {
    using A = comm_accumulator_t<T>;
    const int p = size_, me = rank_;
    const auto mine = static_cast<std::size_t>(counts[me]);
    const std::size_t piece_bytes = pieces_bytes<T>(mine);
    mpi_request r;
    r.scratch_ = std::make_unique_for_overwrite<float[]>((piece_bytes + 2 * block * sizeof(A)) / sizeof(float));
    r.ints_ = std::make_unique_for_overwrite<int[]>(4 * static_cast<std::size_t>(p));
    int* a = r.ints_.get();
    exchange_arrays(counts, displs, a);
    auto* base = reinterpret_cast<unsigned char*>(r.scratch_.get());
    T* recv = reinterpret_cast<T*>(base);
    detail::check_mpi(MPI_Ialltoallv(in, a, a + p, mpi_type<T>(), recv, a + 2 * p, a + 3 * p, mpi_type<T>(), comm_, &r.req_),
                      "MPI_Ialltoallv");
    A* acc = reinterpret_cast<A*>(base + piece_bytes);
    r.finish_ = [own = in + displs[me], recv, out, mine, p, me, op, acc] {
      reduce_received(own, recv, out, mine, p, me, op, acc, acc + block);
    };
    return r;
  }

  /// Bytes of the received pieces (size slots of `mine` elements), rounded up to 64.
  template <class T>
  std::size_t pieces_bytes(std::size_t mine) const noexcept {
    return (mine * static_cast<std::size_t>(size_) * sizeof(T) + 63) / 64 * 64;
  }

  /// a[0, 4 size): Alltoallv's send counts and displacements (this rank's own piece not sent)
  /// and receive counts and displacements (slot s at s * counts[rank]).
  void exchange_arrays(const int* counts, const int* displs, int* a) const noexcept {
    const int p = size_, me = rank_;
    for (int s = 0; s < p; ++s) {
      a[s] = s == me ? 0 : counts[s];
      a[p + s] = displs[s];
      a[2 * p + s] = s == me ? 0 : counts[me];
      a[3 * p + s] = s * counts[me];
    }
  }

  /// out[0, mine) = op over ranks s = 0, 1, ... of piece s (this rank's: `own`; the others':
  /// recv + s * mine), in the accumulation type, block by block in acc and tmp (block elements
  /// each), finished (average divided) and rounded once.
  template <class T, class A>
  static void reduce_received(const T* own, const T* recv, T* out, std::size_t mine, int p, int me, reduce_op op, A* acc,
                              A* tmp) noexcept {
    for (std::size_t i = 0; i < mine; i += block) {
      const std::size_t m = std::min(block, mine - i);
      auto piece = [&](int s) { return (s == me ? own : recv + static_cast<std::size_t>(s) * mine) + i; };
      detail::reduce_in_rank_order<T>(piece, m, p, op, acc, tmp);
      detail::finish_reduction(acc, m, op, p);
      // Rounded in the scratch, then copied: out + i of a runtime length, where an inlined
      // vector store would make GCC warn about one-element outputs (all_reduce(&x, 1, ...)).
      T* narrow = reinterpret_cast<T*>(tmp);
      detail::from_accumulator(acc, narrow, m);
      std::memcpy(out + i, narrow, m * sizeof(T));
    }
  }

  /// 6 * size ints: a collective's counts and displacements, then reduce_pieces' exchange_arrays.
  int* piece_ints() {
    pieces_.resize(static_cast<std::size_t>(6 * size_));
    return pieces_.data();
  }

  /// Counts and displacements (in piece_ints()) of reduce_scatter's pieces: `count` elements
  /// each, rank s's at s * count.
  int* equal_pieces(int count) {
    int* c = piece_ints();
    for (int s = 0; s < size_; ++s) c[s] = count, c[size_ + s] = s * count;
    return c;
  }

  /// Counts and displacements (in piece_ints()) of thread_comm's split of n elements
  /// (detail::even_share).
  int* even_pieces(index_t n) {
    int* c = piece_ints();
    int* d = c + size_;
    for (int s = 0; s < size_; ++s) {
      const auto [begin, end] = detail::even_share(n, size_, s);
      c[s] = static_cast<int>(end - begin);
      d[s] = static_cast<int>(begin);
    }
    return c;
  }

  void free() noexcept {
    if (comm_ == MPI_COMM_NULL) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (shm_) shm_->close();  // drains, frees the window
    shm_.reset();
    if (!finalized) MPI_Comm_free(&comm_);
    comm_ = MPI_COMM_NULL;
  }

  template <class T>
  void check_all_reduce(const T* data, index_t n, reduce_op op) const {
    detail::check_count(n, "mpi_comm", "all_reduce");
    detail::check_buffer(data, n, "mpi_comm", "all_reduce", "data");
    detail::check_op(op, "mpi_comm", "all_reduce");
  }
  template <class T>
  void check_reduce_scatter(const T* in, const T* out, index_t n, reduce_op op) const {
    detail::check_count(n, "mpi_comm", "reduce_scatter", "n_per_rank");
    detail::check_total(n, size_, "mpi_comm", "reduce_scatter");
    detail::check_buffer(in, n, "mpi_comm", "reduce_scatter", "in");
    detail::check_buffer(out, n, "mpi_comm", "reduce_scatter", "out");
    detail::check_op(op, "mpi_comm", "reduce_scatter");
    detail::check_disjoint_scatter(in, out, n, size_, "mpi_comm", "reduce_scatter");
  }
  template <class T>
  void check_all_gather(const T* in, const T* out, index_t n) const {
    detail::check_count(n, "mpi_comm", "all_gather", "n_per_rank");
    detail::check_total(n, size_, "mpi_comm", "all_gather");
    detail::check_buffer(in, n, "mpi_comm", "all_gather", "in");
    detail::check_buffer(out, n, "mpi_comm", "all_gather", "out");
    detail::check_disjoint_gather(in, out, n, rank_, size_, "mpi_comm", "all_gather");
  }
  template <class T>
  bool in_place_gather(const T* in, const T* out, index_t n) const noexcept {
    return n > 0 && in == out + static_cast<std::size_t>(rank_) * static_cast<std::size_t>(n);
  }

  static constexpr std::size_t block = 4096;  // elements of a reduction in pieces per pass over the ranks

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  // staging of the blocking reductions in pieces, kept between calls (a fresh buffer each
  // time page-faults its way in on every call); a non-blocking one owns its staging until done
  detail::comm_scratch scratch_;
  std::vector<int> pieces_;  // piece_ints()
  std::shared_ptr<detail::shm_reducer> shm_;  // floating-point all-reduces on one node (shared with requests)
};

static_assert(comm_request<mpi_request>);
static_assert(communicator<mpi_comm>);

}  // namespace trident
