#pragma once
/// @file parallel/mpi_shm.hpp
/// `detail::shm_reducer`: mpi_comm's all-reduces of floating-point buffers when every rank is
/// on one node, through an MPI-3 shared-memory window (MPI_Win_allocate_shared) instead of
/// MPI's messages. Included by mpi_comm.hpp.
///
/// Why. With one thread per rank, a non-blocking MPI all-reduce moves only while its rank is
/// inside an MPI call, and both ranks must be inside one at the same time for a message to
/// cross; the all-reduces data parallel starts during backward mostly waited for the end of
/// backward (benchmarks/RESULTS.md). Here every step a rank takes needs only what the other
/// ranks have already published in the window, never their attention, and the bytes move
/// once: each rank reads the others' buffers where they lie.
///
/// How. Each rank's segment of the window holds a header (three counters and one signature per
/// slot, each on its own cache line) and `slots` slots of slot_bytes. Request i (the i-th
/// all-reduce since the window was made, the same i on every rank, since collectives are called
/// in the same order) uses slot i % slots of every rank, and its n elements are split as
/// thread_comm splits them (detail::even_share): rank s owns piece s. Three steps, each
/// published by a counter:
///  1. post (in start()): copy the pieces this rank does not own into its slot; posted = i+1.
///     The slot must be free: every rank's done >= i+1-slots.
///  2. reduce (once every rank's posted > i): op over ranks 0, 1, ... of its own piece, in the
///     accumulation type (fp32 for bfloat16 and half; this rank's piece is read from its own
///     buffer), finished (average divided) and rounded once, into this rank's slot and into
///     its own buffer; reduced = i+1.
///  3. copy (once every rank's reduced > i): every other rank's piece from that rank's slot
///     into this rank's buffer; done = i+1.
/// The result is thread_comm's, bit for bit. progress() takes every step that can be taken,
/// in request order; a rank that must wait for the others (test(), wait(), start() on a full
/// slot) calls progress() in its loop, drives MPI's own progress (MPI_Iprobe on the
/// communicator, which carries no messages of its own) and yields the core.
///
/// Deadlock freedom. A step of request i needs only steps the other ranks take in their own
/// progress() of requests they have already started, and every rank takes the steps of every
/// reducer in the process (all communicators) whenever it waits for anything: so long as no
/// rank blocks elsewhere with a request in flight, every request completes. mpi_comm keeps that
/// true: before any blocking MPI call (its blocking collectives, and MPI_Wait on its other
/// non-blocking ones) it drains every reducer's requests in flight (drain_all()), as MPI's own
/// blocking calls progress every non-blocking collective of the process.
/// A request larger than the slots drains the ones in flight and remakes the window (a
/// collective: every rank makes the same request at the same point).
///
/// Mismatched calls. Each rank also publishes each request's count, element type and op with
/// it; a rank that finds another's different (a user error that MPI itself need not detect)
/// throws an error naming both, on every rank, and the reducer stays failed: its later calls
/// throw the same error, and the process's other communicators go on. A mismatch in count
/// that makes only some ranks remake the window cannot be detected that way (they would wait
/// for each other).

#include <mpi.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <new>
#include <string>
#include <vector>

#include "communicator.hpp"
#include "mpi_types.hpp"

namespace trident::detail {

class shm_reducer {
 public:
  /// Slots per rank: how many all-reduces one rank may have posted ahead of the slowest.
  static constexpr int slots = 3;

  /// `node` is a communicator of the same ranks as the caller's, all on one node (this
  /// object frees it). The window is made on first use.
  explicit shm_reducer(MPI_Comm node) : node_(node) {
    check_mpi(MPI_Comm_set_errhandler(node_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    check_mpi(MPI_Comm_rank(node_, &rank_), "MPI_Comm_rank");
    check_mpi(MPI_Comm_size(node_, &size_), "MPI_Comm_size");
    seg_.resize(static_cast<std::size_t>(size_));
    live().push_back(this);
  }
  shm_reducer(const shm_reducer&) = delete;
  shm_reducer& operator=(const shm_reducer&) = delete;
  ~shm_reducer() { close(); }

  /// Starts the all-reduce of data[0, n) (in place) and returns its ticket; the caller's
  /// arguments are already checked. `data` must stay untouched until the ticket completes.
  template <class T>
  std::uint64_t start(T* data, index_t n, reduce_op op) {
    if (closed_) throw error("trident::mpi_comm: all_reduce on a communicator that was freed");
    check_failed();
    const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(T);
    if (win_ == MPI_WIN_NULL || bytes > slot_bytes_) remake(bytes);
    const std::uint64_t i = started_ - base_;
    if (i >= static_cast<std::uint64_t>(slots)) spin([&] { return least(done_at) + slots > i; });
    const std::size_t k = i % slots;
    signature& sig = sign(rank_, k);
    sig.n = static_cast<std::uint64_t>(n);
    sig.type = type_code<T>();
    sig.op = static_cast<std::uint32_t>(op);
    T* mine = slot<T>(rank_, k);
    for (int s = 0; s < size_; ++s) {
      if (s == rank_) continue;
      const auto [b, e] = even_share(n, size_, s);
      if (e > b) std::memcpy(mine + b, data + b, static_cast<std::size_t>(e - b) * sizeof(T));
    }
    counter(rank_, posted_at).store(i + 1, std::memory_order_release);
    pending_.push_back({data, n, op, &reduce_piece<T>, &copy_pieces<T>});
    const std::uint64_t ticket = started_++;
    progress();
    return ticket;
  }

  /// Takes every step that can be taken now, in request order.
  void progress() {
    if (closed_) return;  // drained when closed (unless MPI was finalised first)
    check_failed();
    for (bool moved = true; moved;) {
      moved = false;
      if (reduced_ < started_ && least(posted_at) > reduced_ - base_) {
        const std::uint64_t i = reduced_ - base_;
        check_signatures(i % slots);
        const job& j = pending_[static_cast<std::size_t>(reduced_ - copied_)];
        j.reduce(*this, j, i % slots);
        counter(rank_, reduced_at).store(i + 1, std::memory_order_release);
        ++reduced_;
        moved = true;
      }
      if (copied_ < reduced_ && least(reduced_at) > copied_ - base_) {
        const std::uint64_t i = copied_ - base_;
        const job& j = pending_.front();
        j.copy(*this, j, i % slots);
        counter(rank_, done_at).store(i + 1, std::memory_order_release);
        pending_.pop_front();
        ++copied_;
        moved = true;
      }
    }
  }

  /// Whether request `ticket` is complete (after a progress()).
  bool test(std::uint64_t ticket) {
    if (ticket < copied_ || closed_) return true;
    check_failed();
    progress();
    return ticket < copied_;
  }

  /// Blocks until request `ticket` is complete.
  void wait(std::uint64_t ticket) {
    if (ticket < copied_ || closed_) return;
    check_failed();
    spin([&] { return ticket < copied_; });
  }

  /// Blocks until every request started is complete.
  void drain() {
    if (copied_ < started_) spin([&] { return copied_ == started_; });
  }

  /// progress() of every reducer in the process.
  static void progress_all() {
    for (shm_reducer* r : live()) r->progress();
  }
  /// drain() of every reducer in the process (before a blocking MPI call).
  static void drain_all() {
    for (shm_reducer* r : live()) r->drain();
  }

  /// Bytes of this rank's segment of the window (0 before the first all-reduce).
  std::size_t segment_bytes() const noexcept { return win_ == MPI_WIN_NULL ? 0 : header_bytes + slots * slot_bytes_; }

  /// Drains, frees the window and the node communicator (unless MPI is finalised).
  void close() noexcept {
    if (closed_) return;
    leave_live();
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) {
      try {
        if (failed_.empty()) spin([&] { return copied_ == started_; });  // drain(), out of live()
      } catch (...) {
      }
      if (win_ != MPI_WIN_NULL) MPI_Win_free(&win_);
      MPI_Comm_free(&node_);
    }
    closed_ = true;
  }

 private:
  struct job {
    void* data;
    index_t n;
    reduce_op op;
    void (*reduce)(shm_reducer&, const job&, std::size_t);
    void (*copy)(shm_reducer&, const job&, std::size_t);
  };

  /// What a rank publishes of each request, to check that the ranks' calls match.
  struct signature {
    std::uint64_t n;
    std::uint32_t type;  // type_code
    std::uint32_t op;
  };

  static constexpr std::size_t line = 64;
  // lines 0-2: the counters posted, reduced, done; lines 3 to 3+slots: each slot's signature;
  // the slots from byte 512
  static constexpr std::size_t header_bytes = 8 * line;
  static constexpr int posted_at = 0, reduced_at = 1, done_at = 2;
  static_assert(3 + slots <= 8, "the header holds the counters and one signature per slot");
  static constexpr std::size_t block = 4096;  // elements reduced per pass over the ranks

  std::atomic<std::uint64_t>& counter(int rank, int which) const noexcept {
    return *std::launder(reinterpret_cast<std::atomic<std::uint64_t>*>(seg_[static_cast<std::size_t>(rank)] + which * line));
  }
  signature& sign(int rank, std::size_t k) const noexcept {
    return *reinterpret_cast<signature*>(seg_[static_cast<std::size_t>(rank)] + (3 + k) * line);
  }
  template <class T>
  static constexpr std::uint32_t type_code() noexcept {
    if constexpr (std::same_as<T, float>) return 0;
    else if constexpr (std::same_as<T, double>) return 1;
    else if constexpr (std::same_as<T, bfloat16>) return 2;
    else return 3;
  }
  static const char* type_name(std::uint32_t code) noexcept {
    constexpr const char* names[] = {comm_type_name<float>(), comm_type_name<double>(), comm_type_name<bfloat16>(),
                                     comm_type_name<half>()};
    return code < 4 ? names[code] : "unknown type";
  }
  static std::string describe(const signature& s) {
    return std::to_string(s.n) + " " + type_name(s.type) + " elements, " + to_string(static_cast<reduce_op>(s.op));
  }

  /// Every rank posted slot k's request (acquired): their signatures must be this rank's.
  void check_signatures(std::size_t k) {
    const signature& mine = sign(rank_, k);
    for (int s = 0; s < size_; ++s) {
      const signature& other = sign(s, k);
      if (other.n == mine.n && other.type == mine.type && other.op == mine.op) continue;
      failed_ = "trident::mpi_comm::all_reduce: the ranks' calls differ (rank " + std::to_string(rank_) + ": " + describe(mine) +
                "; rank " + std::to_string(s) + ": " + describe(other) +
                "): every rank must all-reduce the same count and type with the same op, in the same order";
      leave_live();  // never completes: the other reducers' waits must not wait on it
      throw error(failed_);
    }
  }
  void check_failed() const {
    if (!failed_.empty()) throw error(failed_);
  }

  /// The smallest value of counter `which` over the ranks.
  std::uint64_t least(int which) const noexcept {
    std::uint64_t m = counter(0, which).load(std::memory_order_acquire);
    for (int s = 1; s < size_; ++s) m = std::min(m, counter(s, which).load(std::memory_order_acquire));
    return m;
  }
  template <class T>
  T* slot(int rank, std::size_t k) const noexcept {
    return reinterpret_cast<T*>(seg_[static_cast<std::size_t>(rank)] + header_bytes + k * slot_bytes_);
  }

  /// The reducers of this process (mpi_comm is called from one thread: MPI_THREAD_FUNNELED).
  static std::vector<shm_reducer*>& live() {
    static std::vector<shm_reducer*> reducers;
    return reducers;
  }

  void leave_live() noexcept {
    auto& l = live();
    l.erase(std::remove(l.begin(), l.end(), this), l.end());
  }

  /// Waits for `done()`, taking steps of every reducer meanwhile and letting MPI and the other
  /// ranks run.
  template <class Done>
  void spin(Done done) {
    for (;;) {
      progress();  // also when closing, out of live()
      progress_all();
      if (done()) return;
      int flag = 0;
      MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, node_, &flag, MPI_STATUS_IGNORE);
      sched_yield();
    }
  }

  /// Drains, then frees the window and makes one whose slots hold `bytes` (collective).
  void remake(std::size_t bytes) {
    drain();
    if (win_ != MPI_WIN_NULL) check_mpi(MPI_Win_free(&win_), "MPI_Win_free");
    slot_bytes_ = std::max({(bytes + 4095) / 4096 * 4096, 2 * slot_bytes_, std::size_t{1} << 20});
    MPI_Info info = MPI_INFO_NULL;
    check_mpi(MPI_Info_create(&info), "MPI_Info_create");
    MPI_Info_set(info, "alloc_shared_noncontig", "true");  // each segment on its own pages
    void* base = nullptr;
    const int made = MPI_Win_allocate_shared(static_cast<MPI_Aint>(header_bytes + slots * slot_bytes_), 1, info, node_, &base, &win_);
    MPI_Info_free(&info);
    check_mpi(made, "MPI_Win_allocate_shared");
    check_mpi(MPI_Win_set_errhandler(win_, MPI_ERRORS_RETURN), "MPI_Win_set_errhandler");
    for (int s = 0; s < size_; ++s) {
      MPI_Aint size = 0;
      int unit = 0;
      void* p = nullptr;
      check_mpi(MPI_Win_shared_query(win_, s, &size, &unit, &p), "MPI_Win_shared_query");
      seg_[static_cast<std::size_t>(s)] = static_cast<unsigned char*>(p);
    }
    for (int w : {posted_at, reduced_at, done_at})
      ::new (seg_[static_cast<std::size_t>(rank_)] + w * line) std::atomic<std::uint64_t>(0);
    check_mpi(MPI_Barrier(node_), "MPI_Barrier");  // every header is made before anyone reads it
    base_ = started_;
  }

  /// Step 2 of request `j` in slot k: this rank's piece, reduced in rank order.
  template <class T>
  static void reduce_piece(shm_reducer& r, const job& j, std::size_t k) {
    using A = comm_accumulator_t<T>;
    T* data = static_cast<T*>(j.data);
    const auto [b, e] = even_share(j.n, r.size_, r.rank_);
    T* out = r.slot<T>(r.rank_, k);
    A* acc = nullptr;
    A* tmp = nullptr;
    if constexpr (!std::same_as<T, A>) {
      acc = r.scratch_.get<A>(2 * block);
      tmp = acc + block;
    }
    for (index_t i = b; i < e; i += static_cast<index_t>(block)) {
      const auto m = static_cast<std::size_t>(std::min<index_t>(static_cast<index_t>(block), e - i));
      auto piece = [&](int s) -> const T* { return (s == r.rank_ ? data : r.slot<T>(s, k)) + i; };
      if constexpr (std::same_as<T, A>) {
        reduce_in_rank_order<T>(piece, m, r.size_, j.op, out + i, tmp);
        finish_reduction(out + i, m, j.op, r.size_);
      } else {
        reduce_in_rank_order<T>(piece, m, r.size_, j.op, acc, tmp);
        finish_reduction(acc, m, j.op, r.size_);
        from_accumulator(acc, out + i, m);
      }
      std::memcpy(data + i, out + i, m * sizeof(T));
    }
  }

  /// Step 3 of request `j` in slot k: the other ranks' reduced pieces into this rank's buffer.
  template <class T>
  static void copy_pieces(shm_reducer& r, const job& j, std::size_t k) {
    T* data = static_cast<T*>(j.data);
    for (int s = 0; s < r.size_; ++s) {
      if (s == r.rank_) continue;
      const auto [b, e] = even_share(j.n, r.size_, s);
      if (e > b) std::memcpy(data + b, r.slot<T>(s, k) + b, static_cast<std::size_t>(e - b) * sizeof(T));
    }
  }

  MPI_Comm node_ = MPI_COMM_NULL;
  MPI_Win win_ = MPI_WIN_NULL;
  int rank_ = 0;
  int size_ = 1;
  bool closed_ = false;
  std::string failed_;  // the error of a mismatched call (the reducer is unusable after it)
  std::size_t slot_bytes_ = 0;
  std::vector<unsigned char*> seg_;  // every rank's segment, mapped here
  std::deque<job> pending_;          // requests copied_ .. started_
  // tickets: requests are numbered from 0 for the life of the object; the window's counters
  // count from base_, the ticket of its first request
  std::uint64_t started_ = 0, reduced_ = 0, copied_ = 0, base_ = 0;
  comm_scratch scratch_;  // accumulation blocks of the 2-byte types
};

}  // namespace trident::detail
