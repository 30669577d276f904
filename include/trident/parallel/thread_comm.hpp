#pragma once
/// @file parallel/thread_comm.hpp
/// `thread_comm`: ranks as threads of one process, so that every collective (and, built on
/// them, every parallel strategy) can be tested by doctest without mpiexec.
///
/// Design. The ranks share a `thread_group`: one slot per rank where each publishes its
/// buffer pointers, count, op and element type, and a generation-counting barrier (mutex and
/// condition variable, so oversubscribed cores are not burnt spinning). A collective is
/// publish → barrier → work on the other ranks' buffers directly → barrier; after the first
/// barrier every rank checks that all ranks called the same collective with the same type,
/// count, op and root, and that no rank's output overlaps a buffer another rank reads.
/// all_reduce is a reduce-scatter and all-gather in shared memory: rank r reduces elements
/// [r*n/size, (r+1)*n/size) over all ranks, then (after a barrier) writes them into every
/// rank's buffer, so the work is spread over the ranks.
///
/// Determinism. Every element is reduced in rank order 0, 1, ..., size-1 in the accumulation
/// type (fp32 for bf16 and fp16, rounded once at the end), whichever rank does the work, so
/// results are bitwise identical on every rank, in every run, for any split of the work.
///
/// Non-blocking collectives run on a helper thread per rank (started on first use), in the
/// order they were issued; a blocking collective first waits for this rank's pending ones,
/// so collectives stay matched by issue order as in MPI. A request's `wait()` blocks until
/// its collective is done; `test()` returns true once it is.
///
/// Failure. A group is broken as soon as a collective fails on any rank (bad arguments,
/// mismatched calls) or a rank's function throws under `run_ranks`; every rank then waiting
/// in, or later entering, a collective gets a comm_error naming the rank that failed and why.
/// A rank whose thread_comm is destroyed while others still call collectives makes those
/// collectives throw too. Nothing waits forever on a rank that is gone, and there are no
/// timeouts.
///
/// ```cpp
/// trident::run_ranks(4, [](trident::thread_comm& comm) {
///   std::vector<float> g(1000, float(comm.rank()));
///   comm.all_reduce(g.data(), 1000, trident::reduce_op::sum);  // every g[i] == 0+1+2+3
/// });  // joins the 4 threads; rethrows the first rank's failure
/// ```

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "communicator.hpp"

namespace trident {

namespace detail {

/// Which collective a rank is in (published so that mismatches are caught).
enum class thread_coll : int { none, all_reduce, reduce_scatter, all_gather, reduce_scatter_v, all_gather_v, broadcast, barrier };

inline const char* to_string(thread_coll k) noexcept {
  switch (k) {
    case thread_coll::none: return "none";
    case thread_coll::all_reduce: return "all_reduce";
    case thread_coll::reduce_scatter: return "reduce_scatter";
    case thread_coll::all_gather: return "all_gather";
    case thread_coll::reduce_scatter_v: return "reduce_scatter_v";
    case thread_coll::all_gather_v: return "all_gather_v";
    case thread_coll::broadcast: return "broadcast";
    case thread_coll::barrier: return "barrier";
  }
  return "unknown";
}

/// What a rank publishes for the collective it is in.
struct thread_slot {
  thread_coll kind = thread_coll::none;
  const char* type = "";  // comm_type_name<T>()
  reduce_op op = reduce_op::sum;
  int root = 0;
  index_t n = 0;
  const void* in = nullptr;
  void* out = nullptr;
  const index_t* counts = nullptr;  // the _v collectives: one per rank
};

/// Completion state of one non-blocking collective.
struct thread_op_state {
  std::mutex m;
  std::condition_variable cv;
  std::atomic<bool> done{false};
  std::exception_ptr error;
};

inline std::string describe(const std::exception_ptr& e) {
  try {
    if (e) std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "an exception not derived from std::exception";
  }
  return "no exception";
}

}  // namespace detail

class thread_comm;

/// The state the ranks of a thread_comm share: a slot per rank and a barrier. One group per
/// set of ranks; each rank attaches one thread_comm to it. `run_ranks` makes and owns one.
class thread_group {
 public:
  /// A group of `size` ranks (size >= 1).
  explicit thread_group(int size) : size_(size) {
    if (size < 1) throw error("trident::thread_group: size " + std::to_string(size) + " must be at least 1");
    slots_.resize(static_cast<std::size_t>(size));
    attached_.assign(static_cast<std::size_t>(size), false);
  }
  thread_group(const thread_group&) = delete;
  thread_group& operator=(const thread_group&) = delete;

  /// The number of ranks.
  int size() const noexcept { return size_; }

  /// Breaks the group: every rank waiting in a collective, and every later collective, throws
  /// comm_error with `reason`. The first call wins (its rank and reason are kept); later calls
  /// do nothing. `rank` is the failing rank, or -1 when no rank is to blame.
  void abort(int rank, const std::string& reason) noexcept {
    {
      std::lock_guard lk(m_);
      if (broken_) return;
      broken_ = true;
      failed_rank_ = rank;
      try {
        reason_ = reason;
      } catch (...) {
      }
    }
    cv_.notify_all();
  }

  /// Whether abort() has been called.
  bool broken() const {
    std::lock_guard lk(m_);
    return broken_;
  }

  /// The rank passed to the first abort() (-1 when none or none to blame).
  int failed_rank() const {
    std::lock_guard lk(m_);
    return broken_ ? failed_rank_ : -1;
  }

  /// The reason passed to the first abort() (empty when not broken).
  std::string reason() const {
    std::lock_guard lk(m_);
    return reason_;
  }

 private:
  friend class thread_comm;

  void attach(int rank) {
    if (rank < 0 || rank >= size_)
      throw error("trident::thread_comm: rank " + std::to_string(rank) + " is outside [0, " + std::to_string(size_) + ")");
    std::lock_guard lk(m_);
    if (attached_[static_cast<std::size_t>(rank)])
      throw error("trident::thread_comm: rank " + std::to_string(rank) + " already has a thread_comm in this group");
    attached_[static_cast<std::size_t>(rank)] = true;
  }

  /// The rank is gone: collectives waiting for it can never complete.
  void leave(int rank) noexcept {
    {
      std::lock_guard lk(m_);
      if (departed_rank_ < 0) departed_rank_ = rank;
    }
    cv_.notify_all();
  }

  [[noreturn]] void throw_unusable_locked() const {
    if (broken_) {
      const std::string who = failed_rank_ >= 0 ? "rank " + std::to_string(failed_rank_) + " failed: " : "";
      throw comm_error("trident::thread_comm: the group is broken (" + who + reason_ + ")");
    }
    throw comm_error("trident::thread_comm: rank " + std::to_string(departed_rank_) +
                     " has left the group (its thread_comm was destroyed) while the other ranks still call collectives");
  }

  /// The barrier: returns when all ranks have arrived; throws comm_error when the group is
  /// broken or a rank has left.
  void sync() {
    std::unique_lock lk(m_);
    if (broken_ || departed_rank_ >= 0) throw_unusable_locked();
    const std::uint64_t gen = generation_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++generation_;
      lk.unlock();
      cv_.notify_all();
      return;
    }
    cv_.wait(lk, [&] { return generation_ != gen || broken_ || departed_rank_ >= 0; });
    if (generation_ != gen) return;  // completed before the failure: this collective is fine
    throw_unusable_locked();
  }

  detail::thread_slot& slot(int rank) noexcept { return slots_[static_cast<std::size_t>(rank)]; }

  int size_;
  std::vector<detail::thread_slot> slots_;  // slot r: written by rank r only, read after a barrier
  std::vector<bool> attached_;
  mutable std::mutex m_;
  std::condition_variable cv_;
  int arrived_ = 0;
  std::uint64_t generation_ = 0;
  bool broken_ = false;
  int failed_rank_ = -1;
  int departed_rank_ = -1;
  std::string reason_;
};

/// The handle of a thread_comm non-blocking collective (a comm_request). A default-made
/// request is complete. Destroying a request that is not complete waits for it.
class thread_request {
 public:
  /// A complete request.
  thread_request() noexcept = default;
  /// Takes over the collective of `o` (which becomes complete).
  thread_request(thread_request&& o) noexcept = default;
  /// Waits for this request's collective, then takes over that of `o`.
  thread_request& operator=(thread_request&& o) noexcept {
    if (this != &o) {
      wait_quietly();
      state_ = std::move(o.state_);
    }
    return *this;
  }
  thread_request(const thread_request&) = delete;
  thread_request& operator=(const thread_request&) = delete;
  ~thread_request() { wait_quietly(); }

  /// Blocks until the collective has completed; rethrows its failure (on every call).
  void wait() {
    if (!state_) return;
    if (!state_->done.load(std::memory_order_acquire)) {
      std::unique_lock lk(state_->m);
      state_->cv.wait(lk, [&] { return state_->done.load(std::memory_order_acquire); });
    }
    if (state_->error) std::rethrow_exception(state_->error);
  }

  /// Whether the collective has completed; throws its failure.
  bool test() {
    if (!state_) return true;
    if (!state_->done.load(std::memory_order_acquire)) return false;
    if (state_->error) std::rethrow_exception(state_->error);
    return true;
  }

 private:
  friend class thread_comm;
  explicit thread_request(std::shared_ptr<detail::thread_op_state> s) noexcept : state_(std::move(s)) {}

  void wait_quietly() noexcept {
    try {
      wait();
    } catch (...) {
    }
  }

  std::shared_ptr<detail::thread_op_state> state_;
};

/// One rank of a thread_group: a communicator whose ranks are threads of this process. Used by
/// the thread of its rank only (one thread at a time); neither copyable nor movable.
/// See the file header for the design; `run_ranks` is the usual way to get one.
class thread_comm {
 public:
  /// What the non-blocking collectives return.
  using request_type = thread_request;

  /// Rank `rank` of `group` (each rank attaches once).
  thread_comm(thread_group& group, int rank) : group_(&group), rank_(rank) { group.attach(rank); }
  thread_comm(const thread_comm&) = delete;
  thread_comm& operator=(const thread_comm&) = delete;

  /// Finishes this rank's pending non-blocking collectives, then leaves the group: collectives
  /// that other ranks call afterwards throw comm_error instead of waiting for this rank.
  ~thread_comm() {
    {
      std::lock_guard lk(qm_);
      stopping_ = true;
    }
    qcv_.notify_all();
    if (worker_.joinable()) worker_.join();
    group_->leave(rank_);
  }

  /// This rank, in [0, size()).
  int rank() const noexcept { return rank_; }
  /// The number of ranks in the group.
  int size() const noexcept { return group_->size(); }
  /// The group this rank belongs to.
  thread_group& group() const noexcept { return *group_; }

  /// In place: every rank's data[0, n) becomes op over the ranks, reduced in rank order.
  template <comm_element T>
  void all_reduce(T* data, index_t n, reduce_op op) {
    guarded([&] { check_all_reduce(data, n, op); });
    drain();
    guarded([&] { do_all_reduce(data, n, op); });
  }

  /// out[0, n_per_rank) = op over ranks of their in[rank*n_per_rank, (rank+1)*n_per_rank).
  /// `in` (size*n_per_rank elements) and `out` must not overlap.
  template <comm_element T>
  void reduce_scatter(const T* in, T* out, index_t n_per_rank, reduce_op op) {
    guarded([&] { check_reduce_scatter(in, out, n_per_rank, op); });
    drain();
    guarded([&] { do_reduce_scatter(in, out, n_per_rank, op); });
  }

  /// out[s*n_per_rank, (s+1)*n_per_rank) = rank s's in[0, n_per_rank). `in` may be this rank's
  /// own slot `out + rank*n_per_rank` (in place); it may not overlap `out` otherwise.
  template <comm_element T>
  void all_gather(const T* in, T* out, index_t n_per_rank) {
    guarded([&] { check_all_gather(in, out, n_per_rank); });
    drain();
    guarded([&] { do_all_gather(in, out, n_per_rank); });
  }

  /// out[0, counts[rank]) = op over ranks of their piece `rank` of in (pieces in rank order,
  /// piece s of counts[s] elements). `in` and `out` must not overlap.
  template <comm_element T>
  void reduce_scatter_v(const T* in, T* out, const index_t* counts, reduce_op op) {
    std::vector<index_t> c;
    guarded([&] { c = check_reduce_scatter_v(in, out, counts, op); });
    drain();
    guarded([&] { do_reduce_scatter_v(in, out, c.data(), op); });
  }

  /// out = the ranks' in[0, counts[s]) one after another, in rank order. `in` may be this
  /// rank's piece of `out` (in place); it may not overlap `out` otherwise.
  template <comm_element T>
  void all_gather_v(const T* in, T* out, const index_t* counts) {
    std::vector<index_t> c;
    guarded([&] { c = check_all_gather_v(in, out, counts); });
    drain();
    guarded([&] { do_all_gather_v(in, out, c.data()); });
  }

  /// Every rank's data[0, n) becomes the root's.
  template <comm_element T>
  void broadcast(T* data, index_t n, int root) {
    guarded([&] { check_broadcast(data, n, root); });
    drain();
    guarded([&] { do_broadcast(data, n, root); });
  }

  /// Returns once every rank has called barrier().
  void barrier() {
    drain();
    guarded([&] {
      group_->slot(rank_) = detail::thread_slot{.kind = detail::thread_coll::barrier};
      group_->sync();
      check_matching("barrier");
    });
  }

  /// Starts all_reduce on this rank's helper thread. Arguments are checked now.
  template <comm_element T>
  thread_request iall_reduce(T* data, index_t n, reduce_op op) {
    guarded([&] { check_all_reduce(data, n, op); });
    return enqueue([this, data, n, op] { guarded([&] { do_all_reduce(data, n, op); }); });
  }

  /// Starts reduce_scatter on this rank's helper thread. Arguments are checked now.
  template <comm_element T>
  thread_request ireduce_scatter(const T* in, T* out, index_t n_per_rank, reduce_op op) {
    guarded([&] { check_reduce_scatter(in, out, n_per_rank, op); });
    return enqueue([this, in, out, n_per_rank, op] { guarded([&] { do_reduce_scatter(in, out, n_per_rank, op); }); });
  }

  /// Starts all_gather on this rank's helper thread. Arguments are checked now.
  template <comm_element T>
  thread_request iall_gather(const T* in, T* out, index_t n_per_rank) {
    guarded([&] { check_all_gather(in, out, n_per_rank); });
    return enqueue([this, in, out, n_per_rank] { guarded([&] { do_all_gather(in, out, n_per_rank); }); });
  }

  /// Starts reduce_scatter_v on this rank's helper thread. Arguments are checked now.
  template <comm_element T>
  thread_request ireduce_scatter_v(const T* in, T* out, const index_t* counts, reduce_op op) {
    std::vector<index_t> c;
    guarded([&] { c = check_reduce_scatter_v(in, out, counts, op); });
    return enqueue([this, in, out, c = std::move(c), op] { guarded([&] { do_reduce_scatter_v(in, out, c.data(), op); }); });
  }

  /// Starts all_gather_v on this rank's helper thread. Arguments are checked now.
  template <comm_element T>
  thread_request iall_gather_v(const T* in, T* out, const index_t* counts) {
    std::vector<index_t> c;
    guarded([&] { c = check_all_gather_v(in, out, counts); });
    return enqueue([this, in, out, c = std::move(c)] { guarded([&] { do_all_gather_v(in, out, c.data()); }); });
  }

 private:
  static constexpr std::size_t block = 4096;  // elements reduced per pass over the ranks

  // Any failure inside a collective breaks the group, so that no other rank waits for this one.
  template <class Fn>
  void guarded(Fn&& fn) {
    try {
      fn();
    } catch (...) {
      group_->abort(rank_, detail::describe(std::current_exception()));
      throw;
    }
  }

  // --- argument checks (this rank's view) ---------------------------------------------------

  template <class T>
  void check_all_reduce(const T* data, index_t n, reduce_op op) const {
    detail::check_count(n, "thread_comm", "all_reduce");
    detail::check_buffer(data, n, "thread_comm", "all_reduce", "data");
    detail::check_op(op, "thread_comm", "all_reduce");
  }
  template <class T>
  void check_reduce_scatter(const T* in, const T* out, index_t n, reduce_op op) const {
    detail::check_count(n, "thread_comm", "reduce_scatter", "n_per_rank");
    detail::check_total(n, size(), "thread_comm", "reduce_scatter");
    detail::check_buffer(in, n, "thread_comm", "reduce_scatter", "in");
    detail::check_buffer(out, n, "thread_comm", "reduce_scatter", "out");
    detail::check_op(op, "thread_comm", "reduce_scatter");
    detail::check_disjoint_scatter(in, out, n, size(), "thread_comm", "reduce_scatter");
  }
  template <class T>
  void check_all_gather(const T* in, const T* out, index_t n) const {
    detail::check_count(n, "thread_comm", "all_gather", "n_per_rank");
    detail::check_total(n, size(), "thread_comm", "all_gather");
    detail::check_buffer(in, n, "thread_comm", "all_gather", "in");
    detail::check_buffer(out, n, "thread_comm", "all_gather", "out");
    detail::check_disjoint_gather(in, out, n, rank_, size(), "thread_comm", "all_gather");
  }
  /// Returns a copy of the counts.
  template <class T>
  std::vector<index_t> check_reduce_scatter_v(const T* in, const T* out, const index_t* counts, reduce_op op) const {
    const index_t total = detail::check_counts(counts, size(), "thread_comm", "reduce_scatter_v");
    const index_t mine = counts[rank_];
    detail::check_buffer(in, total, "thread_comm", "reduce_scatter_v", "in");
    detail::check_buffer(out, mine, "thread_comm", "reduce_scatter_v", "out");
    detail::check_op(op, "thread_comm", "reduce_scatter_v");
    detail::check_disjoint_scatter_v(in, total, out, mine, "thread_comm", "reduce_scatter_v");
    return std::vector<index_t>(counts, counts + size());
  }
  template <class T>
  std::vector<index_t> check_all_gather_v(const T* in, const T* out, const index_t* counts) const {
    std::vector<index_t> displ(static_cast<std::size_t>(size()));
    const index_t total = detail::check_counts(counts, size(), "thread_comm", "all_gather_v", displ.data());
    const index_t mine = counts[rank_];
    detail::check_buffer(in, mine, "thread_comm", "all_gather_v", "in");
    detail::check_buffer(out, total, "thread_comm", "all_gather_v", "out");
    detail::check_disjoint_gather_v(in, mine, out, total, displ[static_cast<std::size_t>(rank_)], "thread_comm", "all_gather_v");
    return std::vector<index_t>(counts, counts + size());
  }
  template <class T>
  void check_broadcast(const T* data, index_t n, int root) const {
    detail::check_count(n, "thread_comm", "broadcast");
    detail::check_buffer(data, n, "thread_comm", "broadcast", "data");
    detail::check_root(root, size(), "thread_comm", "broadcast");
  }

  // --- checks across ranks (after the first barrier; every rank reaches the same verdict) ---

  void check_matching(const char* call) {
    const detail::thread_slot& a = group_->slot(0);
    for (int s = 1; s < size(); ++s) {
      const detail::thread_slot& b = group_->slot(s);
      std::string what;
      if (a.kind != b.kind) what = std::string("rank 0 called ") + to_string(a.kind) + ", rank " + std::to_string(s) + " called " + to_string(b.kind);
      else if (std::strcmp(a.type, b.type) != 0) what = std::string("rank 0 passed ") + a.type + ", rank " + std::to_string(s) + " passed " + b.type;
      else if (a.n != b.n) what = "rank 0 passed n = " + std::to_string(a.n) + ", rank " + std::to_string(s) + " passed n = " + std::to_string(b.n);
      else if (a.op != b.op) what = std::string("rank 0 passed reduce_op ") + to_string(a.op) + ", rank " + std::to_string(s) + " passed " + to_string(b.op);
      else if (a.root != b.root) what = "rank 0 passed root " + std::to_string(a.root) + ", rank " + std::to_string(s) + " passed root " + std::to_string(b.root);
      else if (a.counts != nullptr && b.counts != nullptr) {
        for (int t = 0; t < size() && what.empty(); ++t) {
          if (a.counts[t] != b.counts[t])
            what = "rank 0 passed counts[" + std::to_string(t) + "] = " + std::to_string(a.counts[t]) + ", rank " + std::to_string(s) +
                   " passed " + std::to_string(b.counts[t]);
        }
      }
      if (!what.empty()) throw comm_error(std::string("trident::thread_comm::") + call + ": the ranks disagree: " + what);
    }
  }

  /// Rank r writes `written(r)` bytes at slot(r).out (`written_at(r)`), while every rank s reads
  /// `read(s)` bytes at slot(s).in; writes must not overlap each other or another rank's reads.
  template <class W, class R>
  void check_cross_overlap(const char* call, W written, R read) {
    const int p = size();
    for (int r = 0; r < p; ++r) {
      const auto [wp, wb] = written(r);
      for (int s = 0; s < p; ++s) {
        if (s == r) continue;
        const auto [op_, ob] = written(s);
        const auto [rp, rb] = read(s);
        if (detail::overlaps(wp, wb, op_, ob) || detail::overlaps(wp, wb, rp, rb))
          throw comm_error(std::string("trident::thread_comm::") + call + ": the buffer rank " + std::to_string(r) +
                           " writes overlaps a buffer of rank " + std::to_string(s) + " (ranks need separate buffers)");
      }
    }
  }

  void publish(detail::thread_slot s) { group_->slot(rank_) = s; }

  // --- the collectives ----------------------------------------------------------------------

  /// Elements [begin, end) of this rank's share.
  std::pair<index_t, index_t> share(index_t n) const noexcept { return detail::even_share(n, size(), rank_); }

  /// acc[0, len) = op over ranks s = 0, 1, ... of src[s][0, len), finished (average divided).
  template <class T, class A = comm_accumulator_t<T>>
  void reduce_ranks(const T* const* src, std::size_t len, reduce_op op, A* acc) {
    const int p = size();
    A* tmp = nullptr;
    if constexpr (!std::same_as<T, A>) tmp = tmp_scratch_.get<A>(block);
    for (std::size_t i = 0; i < len; i += block) {
      const std::size_t m = std::min(block, len - i);
      detail::reduce_in_rank_order<T>([&](int s) { return src[s] + i; }, m, p, op, acc + i, tmp);
    }
    detail::finish_reduction(acc, len, op, p);
  }

  template <class T>
  void do_all_reduce(T* data, index_t n, reduce_op op) {
    using A = comm_accumulator_t<T>;
    publish({.kind = detail::thread_coll::all_reduce, .type = detail::comm_type_name<T>(), .op = op, .n = n, .in = data, .out = data});
    group_->sync();
    check_matching("all_reduce");
    const auto bytes = static_cast<std::size_t>(n) * sizeof(T);
    check_cross_overlap("all_reduce", [&](int s) { return std::pair{group_->slot(s).out, bytes}; },
                        [&](int) { return std::pair{static_cast<const void*>(nullptr), std::size_t{0}}; });
    const auto [begin, end] = share(n);
    const auto len = static_cast<std::size_t>(end - begin);
    const int p = size();
    std::vector<const T*> src(static_cast<std::size_t>(p));
    for (int s = 0; s < p; ++s) src[static_cast<std::size_t>(s)] = static_cast<const T*>(group_->slot(s).in) + begin;
    A* acc = acc_scratch_.get<A>(len);
    reduce_ranks(src.data(), len, op, acc);
    const T* result = nullptr;
    if constexpr (std::same_as<T, A>) {
      result = acc;
    } else {
      T* narrow = out_scratch_.get<T>(len);
      detail::from_accumulator(acc, narrow, len);
      result = narrow;
    }
    group_->sync();  // every rank has read every buffer: now write this rank's share everywhere
    if (len)
      for (int s = 0; s < p; ++s) std::memcpy(static_cast<T*>(group_->slot(s).out) + begin, result, len * sizeof(T));
    group_->sync();
  }

  template <class T>
  void do_reduce_scatter(const T* in, T* out, index_t n, reduce_op op) {
    using A = comm_accumulator_t<T>;
    publish({.kind = detail::thread_coll::reduce_scatter, .type = detail::comm_type_name<T>(), .op = op, .n = n, .in = in, .out = out});
    group_->sync();
    check_matching("reduce_scatter");
    const auto len = static_cast<std::size_t>(n);
    const int p = size();
    check_cross_overlap("reduce_scatter", [&](int s) { return std::pair{group_->slot(s).out, len * sizeof(T)}; },
                        [&](int s) { return std::pair{group_->slot(s).in, len * static_cast<std::size_t>(p) * sizeof(T)}; });
    std::vector<const T*> src(static_cast<std::size_t>(p));
    for (int s = 0; s < p; ++s)
      src[static_cast<std::size_t>(s)] = static_cast<const T*>(group_->slot(s).in) + static_cast<std::size_t>(rank_) * len;
    A* acc = acc_scratch_.get<A>(len);
    reduce_ranks(src.data(), len, op, acc);
    detail::from_accumulator(acc, out, len);
    group_->sync();  // the inputs may be reused once every rank has read them
  }

  template <class T>
  void do_all_gather(const T* in, T* out, index_t n) {
    publish({.kind = detail::thread_coll::all_gather, .type = detail::comm_type_name<T>(), .n = n, .in = in, .out = out});
    group_->sync();
    check_matching("all_gather");
    const auto len = static_cast<std::size_t>(n);
    const int p = size();
    check_cross_overlap("all_gather", [&](int s) { return std::pair{group_->slot(s).out, len * static_cast<std::size_t>(p) * sizeof(T)}; },
                        [&](int s) { return std::pair{group_->slot(s).in, len * sizeof(T)}; });
    if (len)
      for (int s = 0; s < p; ++s) {
        const T* src = static_cast<const T*>(group_->slot(s).in);
        T* dst = out + static_cast<std::size_t>(s) * len;
        if (src != dst) std::memcpy(dst, src, len * sizeof(T));
      }
    group_->sync();
  }

  /// Each rank's first element of `out` in a _v collective, and the total.
  index_t displacements(const index_t* counts, std::vector<std::size_t>& displ) const {
    displ.resize(static_cast<std::size_t>(size()));
    index_t total = 0;
    for (int s = 0; s < size(); ++s) {
      displ[static_cast<std::size_t>(s)] = static_cast<std::size_t>(total);
      total += counts[s];
    }
    return total;
  }

  template <class T>
  void do_reduce_scatter_v(const T* in, T* out, const index_t* counts, reduce_op op) {
    using A = comm_accumulator_t<T>;
    std::vector<std::size_t> displ;
    const index_t total = displacements(counts, displ);
    publish({.kind = detail::thread_coll::reduce_scatter_v, .type = detail::comm_type_name<T>(), .op = op, .n = total, .in = in, .out = out,
             .counts = counts});
    group_->sync();
    check_matching("reduce_scatter_v");
    const int p = size();
    check_cross_overlap("reduce_scatter_v",
                        [&](int s) { return std::pair{group_->slot(s).out, static_cast<std::size_t>(counts[s]) * sizeof(T)}; },
                        [&](int s) { return std::pair{group_->slot(s).in, static_cast<std::size_t>(total) * sizeof(T)}; });
    const auto len = static_cast<std::size_t>(counts[rank_]);
    std::vector<const T*> src(static_cast<std::size_t>(p));
    for (int s = 0; s < p; ++s) src[static_cast<std::size_t>(s)] = static_cast<const T*>(group_->slot(s).in) + displ[static_cast<std::size_t>(rank_)];
    A* acc = acc_scratch_.get<A>(len);
    reduce_ranks(src.data(), len, op, acc);
    detail::from_accumulator(acc, out, len);
    group_->sync();  // the inputs may be reused once every rank has read them
  }

  template <class T>
  void do_all_gather_v(const T* in, T* out, const index_t* counts) {
    std::vector<std::size_t> displ;
    const index_t total = displacements(counts, displ);
    publish({.kind = detail::thread_coll::all_gather_v, .type = detail::comm_type_name<T>(), .n = total, .in = in, .out = out, .counts = counts});
    group_->sync();
    check_matching("all_gather_v");
    const int p = size();
    check_cross_overlap("all_gather_v", [&](int s) { return std::pair{group_->slot(s).out, static_cast<std::size_t>(total) * sizeof(T)}; },
                        [&](int s) { return std::pair{group_->slot(s).in, static_cast<std::size_t>(counts[s]) * sizeof(T)}; });
    for (int s = 0; s < p; ++s) {
      const auto len = static_cast<std::size_t>(counts[s]);
      const T* src = static_cast<const T*>(group_->slot(s).in);
      T* dst = out + displ[static_cast<std::size_t>(s)];
      if (len && src != dst) std::memcpy(dst, src, len * sizeof(T));
    }
    group_->sync();
  }

  template <class T>
  void do_broadcast(T* data, index_t n, int root) {
    publish({.kind = detail::thread_coll::broadcast, .type = detail::comm_type_name<T>(), .root = root, .n = n, .in = data, .out = data});
    group_->sync();
    check_matching("broadcast");
    const auto bytes = static_cast<std::size_t>(n) * sizeof(T);
    check_cross_overlap("broadcast", [&](int s) { return std::pair{group_->slot(s).out, bytes}; },
                        [&](int) { return std::pair{static_cast<const void*>(nullptr), std::size_t{0}}; });
    if (rank_ != root && bytes) std::memcpy(data, group_->slot(root).in, bytes);
    group_->sync();
  }

  // --- the helper thread --------------------------------------------------------------------

  struct task {
    std::function<void()> work;
    std::shared_ptr<detail::thread_op_state> state;
  };

  thread_request enqueue(std::function<void()> work) {
    auto state = std::make_shared<detail::thread_op_state>();
    {
      std::lock_guard lk(qm_);
      if (!worker_.joinable()) worker_ = std::thread([this] { worker_loop(); });
      queue_.push_back(task{std::move(work), state});
      ++pending_;
    }
    qcv_.notify_all();
    return thread_request(std::move(state));
  }

  void worker_loop() {
    for (;;) {
      task t;
      {
        std::unique_lock lk(qm_);
        qcv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping, and everything issued has run
        t = std::move(queue_.front());
        queue_.pop_front();
      }
      try {
        t.work();
      } catch (...) {
        t.state->error = std::current_exception();
      }
      {
        std::lock_guard lk(t.state->m);
        t.state->done.store(true, std::memory_order_release);
      }
      t.state->cv.notify_all();
      {
        std::lock_guard lk(qm_);
        --pending_;
      }
      qcv_.notify_all();
    }
  }

  /// Waits until this rank's non-blocking collectives have run (successfully or not).
  void drain() {
    std::unique_lock lk(qm_);
    qcv_.wait(lk, [&] { return pending_ == 0; });
  }

  thread_group* group_;
  int rank_;
  // Scratch, used by one collective at a time (blocking ones drain the helper thread first).
  detail::comm_scratch acc_scratch_, tmp_scratch_, out_scratch_;
  std::mutex qm_;
  std::condition_variable qcv_;
  std::deque<task> queue_;
  std::size_t pending_ = 0;
  bool stopping_ = false;
  std::thread worker_;
};

static_assert(comm_request<thread_request>);
static_assert(communicator<thread_comm>);

/// Runs `f(comm)` on `n` threads, rank r getting a thread_comm of rank r in a fresh group of
/// n; joins them all. `f` is called concurrently, so it must be safe to call from n threads.
/// If any rank throws, the group is broken (the other ranks' collectives throw comm_error
/// rather than wait) and, after every thread has ended, the exception of the rank that
/// failed first is rethrown.
template <class F>
  requires std::invocable<F&, thread_comm&>
void run_ranks(int n, F f) {
  if (n < 1) throw error("trident::run_ranks: " + std::to_string(n) + " ranks; need at least 1");
  thread_group group(n);
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(n));
  auto body = [&](int r) {
    auto& err = errors[static_cast<std::size_t>(r)];
    try {
      thread_comm comm(group, r);
      try {
        f(comm);
      } catch (...) {
        err = std::current_exception();
        group.abort(r, detail::describe(err));  // before comm's destructor waits for its helper thread
      }
    } catch (...) {
      if (!err) err = std::current_exception();
      group.abort(r, detail::describe(err));
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(n));
  try {
    for (int r = 0; r < n; ++r) threads.emplace_back(body, r);
  } catch (...) {
    group.abort(-1, "trident::run_ranks could not start all threads");
    for (auto& t : threads) t.join();
    throw;
  }
  for (auto& t : threads) t.join();
  const int first = group.failed_rank();
  if (first >= 0 && errors[static_cast<std::size_t>(first)]) std::rethrow_exception(errors[static_cast<std::size_t>(first)]);
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  if (group.broken()) throw comm_error("trident::run_ranks: a collective failed: " + group.reason());
}

}  // namespace trident
