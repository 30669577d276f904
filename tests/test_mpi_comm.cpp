// mpi_comm under mpiexec (2 and 4 ranks; main and MPI_Init are in test_mpi.cpp): every
// collective, reduce_op and element type, blocking and non-blocking, on values that depend on
// the rank, each rank checking its own result against a reference it computes alone.
//
// Where MPI picks the reduction order (int32, and floating-point all-reduces when the ranks
// are not on one node), exact comparisons use values whose fp32 (fp64, int) sums are exact in
// any order (multiples of 1/64 of a few bits): the result must then be the rank-order sum
// rounded once to the element type. Random values check that every rank gets
// the same bits and that the result is within the accumulation's error of the exact one.
// Checks are CHECKs, not REQUIREs, so that a failure on one rank does not leave the others
// waiting in a collective it skipped.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include <trident/mpi.hpp>

using namespace trident;

namespace {

constexpr reduce_op ops[] = {reduce_op::sum, reduce_op::max, reduce_op::min, reduce_op::average};
constexpr index_t sizes[] = {0, 1, 7, 1001};

std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

template <class T>
constexpr bool two_byte = std::is_same_v<T, bfloat16> || std::is_same_v<T, half>;

/// k/64 with |k| small enough that T holds it exactly and sums over 4 ranks are exact in the
/// accumulation type; integers for int32.
template <class T>
T exact_value(int rank, index_t i, std::uint64_t seed) {
  const std::uint64_t u = mix(seed * 0x100000001b3ull + static_cast<std::uint64_t>(rank) * 1000003ull + static_cast<std::uint64_t>(i));
  if constexpr (std::is_same_v<T, std::int32_t>) return static_cast<std::int32_t>(u % 200001) - 100000;
  const int span = std::is_same_v<T, bfloat16> ? 255 : 2047;  // 8 and 11 significant bits
  const float f = static_cast<float>(static_cast<int>(u % static_cast<std::uint64_t>(2 * span + 1)) - span) / 64.0f;
  if constexpr (two_byte<T>) return T(f);
  else return static_cast<T>(f);
}

template <class T>
std::vector<T> exact_values(int rank, index_t n, std::uint64_t seed) {
  std::vector<T> v(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = exact_value<T>(rank, i, seed);
  return v;
}

/// Rank order in the accumulation type, rounded once.
template <class T, class X>
T reference(int p, reduce_op op, X x) {
  using A = comm_accumulator_t<T>;
  A acc = static_cast<A>(x(0));
  for (int s = 1; s < p; ++s) {
    const A v = static_cast<A>(x(s));
    if (op == reduce_op::sum || op == reduce_op::average) acc += v;
    else if (op == reduce_op::max) acc = v > acc ? v : acc;
    else acc = v < acc ? v : acc;
  }
  if (op == reduce_op::average) acc /= static_cast<A>(p);
  if constexpr (two_byte<T>) return T(static_cast<float>(acc));
  else return static_cast<T>(acc);
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

std::uint64_t seed_of(index_t n, reduce_op op, int which) {
  return static_cast<std::uint64_t>(n) * 131 + static_cast<std::uint64_t>(op) * 7 + static_cast<std::uint64_t>(which);
}

/// How many elements differ from the reference (each rank checks its own output).
template <class T, class X>
int count_wrong(const std::vector<T>& got, index_t n, int p, reduce_op op, X x_of) {
  if (got.size() != static_cast<std::size_t>(n)) return -1;
  int bad = 0;
  for (index_t i = 0; i < n; ++i) {
    const T want = reference<T>(p, op, [&](int s) { return x_of(s, i); });
    if (std::memcmp(&want, &got[static_cast<std::size_t>(i)], sizeof(T)) != 0) ++bad;
  }
  return bad;
}

/// Every collective, op and size, blocking or not, checked on this rank.
template <class T>
void exercise(mpi_comm& comm, bool nonblocking) {
  const int r = comm.rank(), p = comm.size();
  std::vector<std::vector<T>> reduced, ins, shards;
  std::vector<mpi_request> pending;
  for (index_t n : sizes)
    for (reduce_op op : ops) {
      reduced.push_back(exact_values<T>(r, n, seed_of(n, op, 1)));
      ins.push_back(exact_values<T>(r, n * p, seed_of(n, op, 2)));
      shards.emplace_back(static_cast<std::size_t>(n));
    }
  std::size_t c = 0;
  for (index_t n : sizes)
    for (reduce_op op : ops) {
      if (nonblocking) {
        pending.push_back(comm.iall_reduce(reduced[c].data(), n, op));
        pending.push_back(comm.ireduce_scatter(ins[c].data(), shards[c].data(), n, op));
      } else {
        comm.all_reduce(reduced[c].data(), n, op);
        comm.reduce_scatter(ins[c].data(), shards[c].data(), n, op);
      }
      ++c;
    }
  if (nonblocking) {
    double work = 0;
    for (int i = 0; i < 20000; ++i) work += std::sin(i * 1e-3);
    CHECK(work != 0);
    while (!pending.front().test()) std::this_thread::yield();  // test() drives progress
    for (std::size_t k = pending.size(); k-- > 0;) pending[k].wait();
  }
  c = 0;
  for (index_t n : sizes)
    for (reduce_op op : ops) {
      INFO("n = " << n << ", op " << to_string(op) << (nonblocking ? ", non-blocking" : ", blocking"));
      const auto s1 = seed_of(n, op, 1), s2 = seed_of(n, op, 2);
      CHECK(count_wrong(reduced[c], n, p, op, [&](int s, index_t i) { return exact_value<T>(s, i, s1); }) == 0);
      CHECK(count_wrong(shards[c], n, p, op, [&](int s, index_t i) { return exact_value<T>(s, static_cast<index_t>(r) * n + i, s2); }) == 0);
      ++c;
    }
  for (index_t n : sizes) {
    INFO("n = " << n << (nonblocking ? ", non-blocking" : ", blocking"));
    const auto mine = exact_values<T>(r, n, seed_of(n, reduce_op::sum, 3));
    std::vector<T> out(static_cast<std::size_t>(n * p)), inplace(static_cast<std::size_t>(n * p)), want;
    std::copy(mine.begin(), mine.end(), inplace.begin() + static_cast<std::ptrdiff_t>(n * r));
    for (int s = 0; s < p; ++s) {
      const auto v = exact_values<T>(s, n, seed_of(n, reduce_op::sum, 3));
      want.insert(want.end(), v.begin(), v.end());
    }
    if (nonblocking) {
      auto a = comm.iall_gather(mine.data(), out.data(), n);
      auto b = comm.iall_gather(inplace.data() + n * r, inplace.data(), n);
      b.wait();
      a.wait();
    } else {
      comm.all_gather(mine.data(), out.data(), n);
      comm.all_gather(inplace.data() + n * r, inplace.data(), n);
    }
    CHECK(same_bits(out, want));
    CHECK(same_bits(inplace, want));
    for (int root = 0; root < p; ++root) {
      auto d = exact_values<T>(r, n, seed_of(n, reduce_op::sum, 4));
      comm.broadcast(d.data(), n, root);
      CHECK(same_bits(d, exact_values<T>(root, n, seed_of(n, reduce_op::sum, 4))));
    }
  }
  comm.barrier();
}

/// reduce_scatter_v (every op) and all_gather_v (separate and in place) with uneven pieces,
/// zero-sized ones and all-zero counts, blocking or not, checked on this rank.
template <class T>
void exercise_v(mpi_comm& comm, bool nonblocking) {
  const int r = comm.rank(), p = comm.size();
  for (int k = 0; k < 4; ++k) {
    std::vector<index_t> counts(static_cast<std::size_t>(p));
    for (int s = 0; s < p; ++s) counts[static_cast<std::size_t>(s)] = k == 3 ? 0 : static_cast<index_t>((s * 7 + k * 5) % 6) * (k == 2 ? 200 : 1);
    index_t total = 0, displ = 0;
    for (int s = 0; s < p; ++s) {
      if (s == r) displ = total;
      total += counts[static_cast<std::size_t>(s)];
    }
    const index_t mine = counts[static_cast<std::size_t>(r)];
    INFO("counts pattern " << k << (nonblocking ? ", non-blocking" : ", blocking"));
    for (reduce_op op : ops) {
      const auto seed = seed_of(total, op, 5);
      const auto in = exact_values<T>(r, total, seed);
      std::vector<T> out(static_cast<std::size_t>(mine));
      if (nonblocking) comm.ireduce_scatter_v(in.data(), out.data(), counts.data(), op).wait();
      else comm.reduce_scatter_v(in.data(), out.data(), counts.data(), op);
      CHECK(count_wrong(out, mine, p, op, [&](int s, index_t i) { return exact_value<T>(s, displ + i, seed); }) == 0);
    }
    const auto piece = exact_values<T>(r, mine, seed_of(mine, reduce_op::sum, 6));
    std::vector<T> sep(static_cast<std::size_t>(total)), inplace(static_cast<std::size_t>(total)), want;
    std::copy(piece.begin(), piece.end(), inplace.begin() + static_cast<std::ptrdiff_t>(displ));
    for (int s = 0; s < p; ++s) {
      const index_t c = counts[static_cast<std::size_t>(s)];
      const auto v = exact_values<T>(s, c, seed_of(c, reduce_op::sum, 6));
      want.insert(want.end(), v.begin(), v.end());
    }
    if (nonblocking) {
      std::vector<index_t> temporary = counts;  // the counts need not outlive the call
      auto a = comm.iall_gather_v(piece.data(), sep.data(), temporary.data());
      auto b = comm.iall_gather_v(inplace.data() + displ, inplace.data(), temporary.data());
      temporary.assign(temporary.size(), -1);
      while (!b.test()) std::this_thread::yield();
      a.wait();
    } else {
      comm.all_gather_v(piece.data(), sep.data(), counts.data());
      comm.all_gather_v(inplace.data() + displ, inplace.data(), counts.data());
    }
    CHECK(same_bits(sep, want));
    CHECK(same_bits(inplace, want));
  }
}

/// A hash of the bytes, to compare results across ranks.
template <class T>
std::uint64_t fingerprint(const std::vector<T>& v) {
  std::uint64_t h = 1469598103934665603ull;
  const auto* b = reinterpret_cast<const unsigned char*>(v.data());
  for (std::size_t i = 0; i < v.size() * sizeof(T); ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

/// Whether every rank holds the same fingerprint.
bool same_on_all_ranks(mpi_comm& comm, std::uint64_t h) {
  std::vector<std::uint64_t> all(static_cast<std::size_t>(comm.size()));
  detail::check_mpi(MPI_Allgather(&h, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, comm.native()), "MPI_Allgather");
  for (auto x : all)
    if (x != h) return false;
  return true;
}

}  // namespace

TEST_CASE("mpi_comm: a duplicate of the world, movable") {
  mpi_comm comm;
  int rank = 0, size = 0, cmp = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  CHECK(comm.rank() == rank);
  CHECK(comm.size() == size);
  MPI_Comm_compare(comm.native(), MPI_COMM_WORLD, &cmp);
  CHECK(cmp == MPI_CONGRUENT);  // same group, separate traffic
  mpi_comm moved(std::move(comm));
  CHECK(moved.size() == size);
  CHECK(comm.native() == MPI_COMM_NULL);
  int x = 1;
  moved.all_reduce(&x, 1, reduce_op::sum);
  CHECK(x == size);
}

TEST_CASE_TEMPLATE("mpi_comm: every collective against the rank-order reference", T, float, double, std::int32_t, bfloat16,
                   half) {
  mpi_comm comm;
  exercise<T>(comm, false);
  exercise<T>(comm, true);
}

TEST_CASE_TEMPLATE("mpi_comm: reduce_scatter_v and all_gather_v against the rank-order reference", T, float, double, std::int32_t,
                   bfloat16, half) {
  mpi_comm comm;
  exercise_v<T>(comm, false);
  exercise_v<T>(comm, true);
}

TEST_CASE("mpi_comm: 2-byte sums round once, after summing in fp32") {
  mpi_comm comm;
  // 1 + (size-1) * 2^-9: each 2^-9 is a quarter of a bf16 ulp at 1, lost if rounded per step;
  // with 4 ranks the once-rounded sum is 1 + 2^-7
  bfloat16 x(comm.rank() == 0 ? 1.0f : 0x1p-9f);
  comm.all_reduce(&x, 1, reduce_op::sum);
  const float want = static_cast<float>(bfloat16(1.0f + static_cast<float>(comm.size() - 1) * 0x1p-9f));
  if (comm.size() == 4) CHECK(want == 1.0f + 0x1p-7f);
  CHECK(static_cast<float>(x) == want);
  half h(comm.rank() == 0 ? 1.0f : 0x1p-12f);
  auto req = comm.iall_reduce(&h, 1, reduce_op::sum);
  req.wait();
  CHECK(static_cast<float>(h) == static_cast<float>(half(1.0f + static_cast<float>(comm.size() - 1) * 0x1p-12f)));
}

TEST_CASE("mpi_comm: random values give the same bits on every rank, close to the exact sum") {
  mpi_comm comm;
  const int r = comm.rank(), p = comm.size();
  constexpr index_t n = 4099;
  auto rnd = [](int rank, index_t i) {
    const std::uint64_t u = mix(static_cast<std::uint64_t>(rank) * 7919 + static_cast<std::uint64_t>(i));
    return static_cast<double>(u >> 11) * 0x1p-53 * 2.0 - 1.0;
  };
  std::vector<float> f(n);
  std::vector<bfloat16> b(n);
  for (index_t i = 0; i < n; ++i) {
    f[static_cast<std::size_t>(i)] = static_cast<float>(rnd(r, i));
    b[static_cast<std::size_t>(i)] = bfloat16(static_cast<float>(rnd(r, i)));
  }
  comm.all_reduce(f.data(), n, reduce_op::sum);
  comm.all_reduce(b.data(), n, reduce_op::sum);
  CHECK(same_on_all_ranks(comm, fingerprint(f)));
  CHECK(same_on_all_ranks(comm, fingerprint(b)));
  int far = 0;
  for (index_t i = 0; i < n; ++i) {
    double exact_f = 0, exact_b = 0, abs_sum = 0;
    for (int s = 0; s < p; ++s) {
      exact_f += static_cast<double>(static_cast<float>(rnd(s, i)));
      exact_b += static_cast<double>(static_cast<float>(bfloat16(static_cast<float>(rnd(s, i)))));
      abs_sum += std::abs(rnd(s, i));
    }
    if (std::abs(f[static_cast<std::size_t>(i)] - exact_f) > p * 0x1p-24 * abs_sum) ++far;
    if (std::abs(static_cast<float>(b[static_cast<std::size_t>(i)]) - exact_b) > 0x1p-8 * std::abs(exact_b) + p * 0x1p-24 * abs_sum) ++far;
  }
  CHECK(far == 0);
}

TEST_CASE_TEMPLATE("mpi_comm: reductions in pieces and through shared memory are the rank-order reduction rounded once, bit for bit", T, bfloat16,
                   half, float, double) {
  // Values whose sums in the accumulation type depend on the order (1 + e rounds to 1 where e
  // is half an ulp of 1, while e - 1 is exact: ((1 + e) + e) - 1 = 0 but (1 + e) + (e - 1) = e),
  // so that a reduction in another order than rank order (Open MPI's recursive doubling at 4
  // ranks) gives other bits. Every floating-point reduce-scatter, blocking or not, and the
  // blocking 2-byte all_reduce reduce in rank order whatever MPI's algorithms: the bits must be
  // the reference's (thread_comm's order), at sizes that are not multiples of the number of
  // ranks and across several of the reduction's blocks. So must every floating-point
  // all_reduce, blocking or not, when it goes through shared memory (all ranks on one node).
  using A = comm_accumulator_t<T>;
  mpi_comm comm;
  const int r = comm.rank(), p = comm.size();
  auto x = [](int rank, index_t i) {
    const A e = std::numeric_limits<A>::epsilon() / 2;
    const A pick[] = {A(1), A(-1), e, -e, 2 * e, A(0.5), A(-0.5), A(1.5) * e};
    const std::uint64_t u = mix(static_cast<std::uint64_t>(rank) * 104729 + static_cast<std::uint64_t>(i));
    if constexpr (two_byte<T>) return T(static_cast<float>(pick[u % 8]));
    else return static_cast<T>(pick[u % 8]);
  };
  for (const index_t n : {index_t{1}, index_t{3}, index_t{4099}, index_t{20011}}) {
    for (const reduce_op op : {reduce_op::sum, reduce_op::average, reduce_op::max}) {
      INFO("n = " << n << ", op " << to_string(op));
      if (two_byte<T> || comm.shared_memory()) {
        std::vector<T> all(static_cast<std::size_t>(n));
        for (index_t i = 0; i < n; ++i) all[static_cast<std::size_t>(i)] = x(r, i);
        std::vector<T> iall = all;
        comm.all_reduce(all.data(), n, op);
        CHECK(count_wrong(all, n, p, op, [&](int s, index_t i) { return x(s, i); }) == 0);
        if (comm.shared_memory()) {
          auto req = comm.iall_reduce(iall.data(), n, op);
          req.wait();
          CHECK(count_wrong(iall, n, p, op, [&](int s, index_t i) { return x(s, i); }) == 0);
        }
      }
      std::vector<T> in(static_cast<std::size_t>(n * p)), shard(static_cast<std::size_t>(n)), ishard(shard.size());
      for (index_t i = 0; i < n * p; ++i) in[static_cast<std::size_t>(i)] = x(r, n + i);
      comm.reduce_scatter(in.data(), shard.data(), n, op);
      auto req = comm.ireduce_scatter(in.data(), ishard.data(), n, op);
      req.wait();
      CHECK(count_wrong(shard, n, p, op, [&](int s, index_t i) { return x(s, n + r * n + i); }) == 0);
      CHECK(count_wrong(ishard, n, p, op, [&](int s, index_t i) { return x(s, n + r * n + i); }) == 0);
      // reduce_scatter_v: rank s gets n + s elements
      std::vector<index_t> counts(static_cast<std::size_t>(p));
      index_t total = 0, mine_at = 0;
      for (int s = 0; s < p; ++s) {
        counts[static_cast<std::size_t>(s)] = n + s;
        if (s < r) mine_at += n + s;
        total += n + s;
      }
      std::vector<T> vin(static_cast<std::size_t>(total)), vout(static_cast<std::size_t>(n + r)), ivout(vout.size());
      for (index_t i = 0; i < total; ++i) vin[static_cast<std::size_t>(i)] = x(r, 7 * n + i);
      comm.reduce_scatter_v(vin.data(), vout.data(), counts.data(), op);
      auto vreq = comm.ireduce_scatter_v(vin.data(), ivout.data(), counts.data(), op);
      while (!vreq.test()) std::this_thread::yield();  // test() progresses it and finishes the reduction
      CHECK(vreq.test());
      CHECK(count_wrong(vout, n + r, p, op, [&](int s, index_t i) { return x(s, 7 * n + mine_at + i); }) == 0);
      CHECK(count_wrong(ivout, n + r, p, op, [&](int s, index_t i) { return x(s, 7 * n + mine_at + i); }) == 0);
    }
  }
}

TEST_CASE("mpi_comm: large buffers, non-blocking collectives overlapped with work and with blocking ones") {
  mpi_comm comm;
  const int r = comm.rank(), p = comm.size();
  constexpr index_t n = index_t{1} << 20;
  const index_t shard = n / p;
  auto a = exact_values<float>(r, n, 11);
  const auto in = exact_values<bfloat16>(r, n, 12);
  std::vector<bfloat16> out(static_cast<std::size_t>(shard));
  std::vector<half> mine = exact_values<half>(r, shard, 13), gathered(static_cast<std::size_t>(n));
  auto ra = comm.iall_reduce(a.data(), n, reduce_op::sum);
  auto rs = comm.ireduce_scatter(in.data(), out.data(), shard, reduce_op::average);
  auto rg = comm.iall_gather(mine.data(), gathered.data(), shard);
  int small = r;
  comm.broadcast(&small, 1, p - 1);  // a blocking collective behind the pending ones
  CHECK(small == p - 1);
  double work = 0;
  for (int i = 0; i < 200000; ++i) work += std::sqrt(static_cast<double>(i));
  CHECK(work > 0);
  while (!rs.test()) std::this_thread::yield();
  rg.wait();
  ra.wait();
  CHECK(rs.test());
  CHECK(count_wrong(a, n, p, reduce_op::sum, [](int s, index_t i) { return exact_value<float>(s, i, 11); }) == 0);
  CHECK(count_wrong(out, shard, p, reduce_op::average, [&](int s, index_t i) { return exact_value<bfloat16>(s, r * shard + i, 12); }) == 0);
  int bad = 0;
  for (int s = 0; s < p; ++s)
    for (index_t i = 0; i < shard; ++i) bad += gathered[static_cast<std::size_t>(s * shard + i)].bits != exact_value<half>(s, i, 13).bits;
  CHECK(bad == 0);
  // a request destroyed before completion waits for it
  std::vector<std::int32_t> c(3, r + 1);
  { auto dropped = comm.iall_reduce(c.data(), 3, reduce_op::max); }
  CHECK(c[2] == p);
  mpi_request none;
  CHECK(none.test());
}

TEST_CASE("mpi_comm: floating-point all-reduces go through shared memory exactly when the ranks share one node") {
  int p = 0, node_size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  MPI_Comm node = MPI_COMM_NULL;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
  MPI_Comm_size(node, &node_size);
  MPI_Comm_free(&node);
  mpi_comm comm;
  CHECK(comm.shared_memory() == (p > 1 && node_size == p));
  CHECK(comm.shared_memory_bytes() == 0);  // the window is made on first use
  mpi_comm plain(MPI_COMM_WORLD, intra_node::mpi);
  CHECK_FALSE(plain.shared_memory());
  const int r = comm.rank();
  for (mpi_comm* c : {&comm, &plain}) {
    auto v = exact_values<float>(r, 1001, 41);
    c->all_reduce(v.data(), 1001, reduce_op::average);
    CHECK(count_wrong(v, 1001, p, reduce_op::average, [](int s, index_t i) { return exact_value<float>(s, i, 41); }) == 0);
  }
  if (comm.shared_memory()) CHECK(comm.shared_memory_bytes() >= 3 * 1001 * sizeof(float));
  CHECK(plain.shared_memory_bytes() == 0);
}

TEST_CASE("mpi_comm: many all-reduces in flight, growing, mixed with MPI's collectives, waited in different orders") {
  // More requests in flight than the shared-memory slots, sizes that outgrow the window while
  // others are in flight, a blocking collective and an MPI non-blocking one among them, and
  // ranks that wait in opposite orders (one after a delay): every result must be exact.
  mpi_comm comm;
  const int r = comm.rank(), p = comm.size();
  const index_t ns[] = {3, 100000, 1, 777777, 5, (index_t{1} << 20) + 3, 64, 40000, 0, 2500000};
  constexpr int count = 10;
  constexpr reduce_op cycle[] = {reduce_op::sum, reduce_op::max, reduce_op::min, reduce_op::average};
  std::vector<std::vector<float>> f(count);
  std::vector<std::vector<double>> d(count);
  std::vector<std::vector<bfloat16>> b(count);
  std::vector<mpi_request> reqs;
  std::vector<std::int32_t> mine(5, r), gathered(static_cast<std::size_t>(5 * p));
  mpi_request gather;
  for (int k = 0; k < count; ++k) {
    const index_t n = ns[k];
    const reduce_op op = cycle[k % 4];
    f[k] = exact_values<float>(r, n, 100 + k);
    d[k] = exact_values<double>(r, n / 7, 200 + k);
    b[k] = exact_values<bfloat16>(r, n / 3, 300 + k);
    reqs.push_back(comm.iall_reduce(f[k].data(), n, op));
    reqs.push_back(comm.iall_reduce(d[k].data(), n / 7, op));
    reqs.push_back(comm.iall_reduce(b[k].data(), n / 3, op));
    if (k == 2) gather = comm.iall_gather(mine.data(), gathered.data(), 5);
    if (k == 4) {
      int root_value = r == p - 1 ? 42 : 0;
      comm.broadcast(&root_value, 1, p - 1);  // blocking, behind requests in flight
      CHECK(root_value == 42);
    }
  }
  if (r % 2 == 1) {
    double work = 0;
    for (int i = 0; i < 3000000; ++i) work += std::sqrt(static_cast<double>(i));
    CHECK(work > 0);
    for (std::size_t k = reqs.size(); k-- > 0;) reqs[k].wait();
    gather.wait();
  } else {
    gather.wait();
    while (!reqs[reqs.size() / 2].test()) std::this_thread::yield();
    for (auto& q : reqs) q.wait();
  }
  int bad = 0;
  for (int k = 0; k < count; ++k) {
    const index_t n = ns[k];
    const reduce_op op = cycle[k % 4];
    INFO("request " << k << ", n = " << n << ", op " << to_string(op));
    CHECK(count_wrong(f[k], n, p, op, [&](int s, index_t i) { return exact_value<float>(s, i, 100 + k); }) == 0);
    CHECK(count_wrong(d[k], n / 7, p, op, [&](int s, index_t i) { return exact_value<double>(s, i, 200 + k); }) == 0);
    CHECK(count_wrong(b[k], n / 3, p, op, [&](int s, index_t i) { return exact_value<bfloat16>(s, i, 300 + k); }) == 0);
  }
  for (int s = 0; s < p; ++s)
    for (int i = 0; i < 5; ++i) bad += gathered[static_cast<std::size_t>(5 * s + i)] != s;
  CHECK(bad == 0);
  if (comm.shared_memory()) CHECK(comm.shared_memory_bytes() >= 3 * sizeof(float) * static_cast<std::size_t>(ns[count - 1]));
  // a request dropped unfinished waits for itself; one moved over another waits for the other
  std::vector<float> one(3, 1.0f), two(3, 2.0f);
  {
    auto q1 = comm.iall_reduce(one.data(), 3, reduce_op::sum);
    auto q2 = comm.iall_reduce(two.data(), 3, reduce_op::sum);
    q1 = std::move(q2);
  }
  CHECK(one[0] == static_cast<float>(p));
  CHECK(two[2] == static_cast<float>(2 * p));
}

TEST_CASE("mpi_comm: an all-reduce in flight on one communicator while the ranks block on another, in different orders") {
  // Half the ranks wait for comm's all-reduce before other's barrier, half after: other's
  // blocking call must let comm's all-reduce finish, as MPI's own calls progress every
  // non-blocking collective of the process.
  mpi_comm comm, other;
  const int r = comm.rank(), p = comm.size();
  auto v = exact_values<float>(r, 5000, 51);
  auto w = exact_values<double>(r, 300, 52);
  auto req = comm.iall_reduce(v.data(), 5000, reduce_op::sum);
  auto req2 = other.iall_reduce(w.data(), 300, reduce_op::max);
  if (r % 2 == 0) {
    other.barrier();
    req.wait();
  } else {
    req.wait();
    other.barrier();
  }
  req2.wait();
  CHECK(count_wrong(v, 5000, p, reduce_op::sum, [](int s, index_t i) { return exact_value<float>(s, i, 51); }) == 0);
  CHECK(count_wrong(w, 300, p, reduce_op::max, [](int s, index_t i) { return exact_value<double>(s, i, 52); }) == 0);
}

TEST_CASE("mpi_comm: a communicator destroyed with all-reduces in flight completes them first") {
  const int r = [] {
    int x = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &x);
    return x;
  }();
  int p = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  auto v = exact_values<float>(r, 70000, 61);
  auto w = exact_values<half>(r, 33, 62);
  mpi_request a, b;
  {
    mpi_comm comm;
    a = comm.iall_reduce(v.data(), 70000, reduce_op::average);
    b = comm.iall_reduce(w.data(), 33, reduce_op::min);
  }  // the requests outlive their communicator: its destructor completed them
  CHECK(a.test());
  b.wait();
  CHECK(count_wrong(v, 70000, p, reduce_op::average, [](int s, index_t i) { return exact_value<float>(s, i, 61); }) == 0);
  CHECK(count_wrong(w, 33, p, reduce_op::min, [](int s, index_t i) { return exact_value<half>(s, i, 62); }) == 0);
}

TEST_CASE("mpi_comm: all-reduces whose count, type or op differ between the ranks fail on every rank, naming both calls") {
  mpi_comm comm, other;
  const int r = comm.rank(), p = comm.size();
  if (!comm.shared_memory()) return;  // MPI's own all-reduce need not detect it
  std::vector<float> v(200, 1.0f);
  comm.all_reduce(v.data(), 200, reduce_op::sum);  // the window exists, large enough for both calls below
  CHECK(v[0] == static_cast<float>(p));
  const std::string want = r == 0 ? "rank 0: 100 float elements, sum; rank 1: 101 float elements, sum" : "the ranks' calls differ";
  CHECK_THROWS_WITH_AS(
      [&] {
        auto q = comm.iall_reduce(v.data(), 100 + (r > 0 ? 1 : 0), reduce_op::sum);
        q.wait();
      }(),
      doctest::Contains(want.c_str()), error);
  CHECK_THROWS_WITH_AS(comm.all_reduce(v.data(), 5, reduce_op::sum), doctest::Contains("the ranks' calls differ"), error);
  // the process's other communicators are not affected
  std::vector<double> w(7, 2.0);
  other.all_reduce(w.data(), 7, reduce_op::max);
  other.barrier();
  CHECK(w[6] == 2.0);
}

TEST_CASE("mpi_comm: bad arguments are rejected before any communication, on every rank") {
  mpi_comm comm;
  const int p = comm.size();
  std::vector<float> x(static_cast<std::size_t>(4 * p));
  CHECK_THROWS_WITH_AS(comm.all_reduce(x.data(), -1, reduce_op::sum), doctest::Contains("mpi_comm::all_reduce: n = -1 is negative"), error);
  const std::string bad_root = "root " + std::to_string(p) + " is outside [0, " + std::to_string(p) + ")";
  CHECK_THROWS_WITH_AS(comm.broadcast(x.data(), 4, p), doctest::Contains(bad_root.c_str()), error);
  CHECK_THROWS_WITH_AS(comm.broadcast(x.data(), 4, -1), doctest::Contains("is outside"), error);
  CHECK_THROWS_WITH_AS(comm.reduce_scatter(x.data(), x.data() + 1, 2, reduce_op::sum), doctest::Contains("out overlaps in"), error);
  CHECK_THROWS_WITH_AS(comm.ireduce_scatter(x.data(), x.data(), 2, reduce_op::min), doctest::Contains("out overlaps in"), error);
  const index_t wrong_slot = comm.rank() == 0 ? 1 : 0;
  CHECK_THROWS_WITH_AS(comm.all_gather(x.data() + wrong_slot, x.data(), 2), doctest::Contains("in overlaps out"), error);
  CHECK_THROWS_WITH_AS(comm.iall_reduce(static_cast<half*>(nullptr), 5, reduce_op::sum), doctest::Contains("data is null"), error);
  CHECK_THROWS_WITH_AS(comm.all_reduce(x.data(), 4, static_cast<reduce_op>(9)), doctest::Contains("unknown reduce_op 9"), error);
  CHECK_THROWS_WITH_AS(comm.all_reduce(x.data(), index_t{1} << 33, reduce_op::sum), doctest::Contains("exceeds MPI's int count limit"), error);
  // the communicator still works afterwards
  float one = 1;
  comm.all_reduce(&one, 1, reduce_op::sum);
  CHECK(one == static_cast<float>(p));
}
