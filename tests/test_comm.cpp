// Communicators without MPI: local_comm and thread_comm with 1 to 4 ranks. Every collective,
// reduce_op and element type against a serial reference (the accumulation type in rank order,
// rounded once; also within a rounding of the exact value in double); sizes 0, 1, odd and
// large; non-blocking collectives overlapped with work; bad arguments; failing ranks.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

#include <trident/parallel/communicator.hpp>
#include <trident/parallel/thread_comm.hpp>

using namespace trident;

namespace {

constexpr reduce_op all_ops[] = {reduce_op::sum, reduce_op::max, reduce_op::min, reduce_op::average};
constexpr index_t sizes[] = {0, 1, 7, 1001};

std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/// A value only (rank, i, seed) produces: random sign, mantissa and a spread of magnitudes, so
/// that the order and the precision of accumulation show in the bits.
template <class T>
T value(int rank, index_t i, std::uint64_t seed) {
  const std::uint64_t u = mix(seed * 0x100000001b3ull + static_cast<std::uint64_t>(rank) * 1000003ull + static_cast<std::uint64_t>(i));
  if constexpr (std::is_same_v<T, std::int32_t>) {
    return static_cast<std::int32_t>((u >> 33) % 2001) - 1000;
  } else {
    const double d = (static_cast<double>(u >> 11) * 0x1p-53 * 8.0 - 4.0) * std::ldexp(1.0, static_cast<int>(u & 7) - 3);
    if constexpr (std::is_same_v<T, double>) return d;
    else if constexpr (std::is_same_v<T, float>) return static_cast<float>(d);
    else return T(static_cast<float>(d));
  }
}

template <class T>
std::vector<T> values(int rank, index_t n, std::uint64_t seed) {
  std::vector<T> v(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = value<T>(rank, i, seed);
  return v;
}

template <class T>
double to_double(T x) {
  if constexpr (std::is_same_v<T, bfloat16> || std::is_same_v<T, half>) return static_cast<double>(static_cast<float>(x));
  else return static_cast<double>(x);
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

/// The reference reduction of element i over ranks 0..p-1 (x(s) gives rank s's value): the
/// accumulation type, one element at a time, in rank order, rounded once.
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
  if constexpr (std::is_same_v<T, bfloat16> || std::is_same_v<T, half>) return T(static_cast<float>(acc));
  else return static_cast<T>(acc);
}

/// The same reduction exactly, in double.
template <class T, class X>
double reference_double(int p, reduce_op op, X x, double* abs_sum) {
  double acc = to_double(x(0));
  *abs_sum = std::abs(acc);
  for (int s = 1; s < p; ++s) {
    const double v = to_double(x(s));
    *abs_sum += std::abs(v);
    if (op == reduce_op::sum || op == reduce_op::average) acc += v;
    else if (op == reduce_op::max) acc = std::max(acc, v);
    else acc = std::min(acc, v);
  }
  if (op == reduce_op::average) {
    if constexpr (std::is_same_v<T, std::int32_t>) return static_cast<double>(static_cast<std::int64_t>(acc) / p);
    acc /= p;
  }
  return acc;
}

template <class T>
double epsilon() {
  if constexpr (std::is_same_v<T, bfloat16>) return 0x1p-8;
  else if constexpr (std::is_same_v<T, half>) return 0x1p-11;
  else if constexpr (std::is_same_v<T, float>) return 0x1p-24;
  else if constexpr (std::is_same_v<T, double>) return 0x1p-53;
  else return 0;
}

/// result[i] equals the rank-order reference bit for bit, and is within the accumulation's
/// and the final rounding's error of the exact value.
template <class T, class X>
void check_reduction(const std::vector<T>& result, index_t n, int p, reduce_op op, X x_of, const char* what) {
  INFO(std::string(what) << ": " << p << " ranks, n = " << n << ", op " << to_string(op));
  REQUIRE(result.size() == static_cast<std::size_t>(n));
  int bad = 0, far = 0;
  for (index_t i = 0; i < n; ++i) {
    auto x = [&](int s) { return x_of(s, i); };
    const T want = reference<T>(p, op, x);
    if (std::memcmp(&want, &result[static_cast<std::size_t>(i)], sizeof(T)) != 0) ++bad;
    double abs_sum = 0;
    const double exact = reference_double<T>(p, op, x, &abs_sum);
    const double acc_eps = std::is_same_v<comm_accumulator_t<T>, float> ? 0x1p-24 : epsilon<T>();
    const double tol = epsilon<T>() * std::abs(exact) + p * acc_eps * abs_sum + 1e-300;
    if (std::abs(to_double(result[static_cast<std::size_t>(i)]) - exact) > tol) ++far;
  }
  CHECK(bad == 0);
  CHECK(far == 0);
}

/// What every rank produced, per case: outputs[case][rank].
template <class T>
using outputs = std::vector<std::vector<std::vector<T>>>;

template <class T>
outputs<T> make_outputs(std::size_t cases, int p) {
  return outputs<T>(cases, std::vector<std::vector<T>>(static_cast<std::size_t>(p)));
}

template <class T>
void check_identical_on_ranks(const outputs<T>& out, const char* what) {
  for (std::size_t c = 0; c < out.size(); ++c)
    for (std::size_t r = 1; r < out[c].size(); ++r) {
      INFO(std::string(what) << ": case " << c << ", rank " << r);
      CHECK(same_bits(out[c][r], out[c][0]));
    }
}

std::uint64_t seed_of(index_t n, reduce_op op, int which) {
  return static_cast<std::uint64_t>(n) * 131 + static_cast<std::uint64_t>(op) * 7 + static_cast<std::uint64_t>(which);
}

/// Every collective with every op and size on one communicator, blocking or non-blocking;
/// each rank stores what it got in its own slots of the outputs.
template <class T, communicator C>
void exercise(C& comm, bool nonblocking, outputs<T>& ar, outputs<T>& rs, outputs<T>& ag, outputs<T>& agi, outputs<T>& bc) {
  const int r = comm.rank(), p = comm.size();
  const auto ur = static_cast<std::size_t>(r);
  using request = typename C::request_type;
  std::vector<request> pending;
  std::size_t c = 0;
  // all_reduce and reduce_scatter: every size and op
  for (index_t n : sizes)
    for (reduce_op op : all_ops) {
      auto& x = ar[c][ur];
      x = values<T>(r, n, seed_of(n, op, 1));
      auto& in = rs[c][ur];  // the input first, replaced by the output below
      in = values<T>(r, n * p, seed_of(n, op, 2));
      if (!nonblocking) {
        comm.all_reduce(x.data(), n, op);
        std::vector<T> out(static_cast<std::size_t>(n));
        comm.reduce_scatter(in.data(), out.data(), n, op);
        in = std::move(out);
      } else {
        pending.push_back(comm.iall_reduce(x.data(), n, op));
      }
      ++c;
    }
  if (nonblocking) {
    // reduce_scatter into separate outputs, issued behind the all_reduces
    std::vector<std::vector<T>> outs(c);
    for (std::size_t k = 0; k < c; ++k) {
      outs[k].resize(rs[k][ur].size() / static_cast<std::size_t>(p));
      const auto n = static_cast<index_t>(outs[k].size());
      pending.push_back(comm.ireduce_scatter(rs[k][ur].data(), outs[k].data(), n, all_ops[k % 4]));
    }
    double busy = 0;  // work while the collectives run
    for (int i = 0; i < 20000; ++i) busy += std::sin(i * 1e-3);
    CHECK(busy != 0);
    for (std::size_t k = pending.size(); k-- > 0;) pending[k].wait();  // any order
    pending.clear();
    for (std::size_t k = 0; k < c; ++k) rs[k][ur] = std::move(outs[k]);
  }
  // all_gather (separate and in place) and broadcast from every root
  c = 0;
  for (index_t n : sizes) {
    const auto mine = values<T>(r, n, seed_of(n, reduce_op::sum, 3));
    auto& out = ag[c][ur];
    out.assign(static_cast<std::size_t>(n * p), T{});
    auto& inplace = agi[c][ur];
    inplace.assign(static_cast<std::size_t>(n * p), T{});
    std::copy(mine.begin(), mine.end(), inplace.begin() + static_cast<std::ptrdiff_t>(n * r));
    if (!nonblocking) {
      comm.all_gather(mine.data(), out.data(), n);
      comm.all_gather(inplace.data() + n * r, inplace.data(), n);
    } else {
      auto a = comm.iall_gather(mine.data(), out.data(), n);
      auto b = comm.iall_gather(inplace.data() + n * r, inplace.data(), n);
      while (!a.test()) std::this_thread::yield();  // test() eventually says yes
      b.wait();
    }
    for (int root = 0; root < p; ++root) {
      auto& d = bc[c * static_cast<std::size_t>(p) + static_cast<std::size_t>(root)][ur];
      d = values<T>(r, n, seed_of(n, reduce_op::sum, 4));
      comm.broadcast(d.data(), n, root);
    }
    ++c;
  }
  comm.barrier();
}

template <class T>
void check_exercise(int p, bool nonblocking, const char* what, auto&& run) {
  const std::size_t cases = std::size(sizes) * std::size(all_ops);
  auto ar = make_outputs<T>(cases, p), rs = make_outputs<T>(cases, p);
  auto ag = make_outputs<T>(std::size(sizes), p), agi = make_outputs<T>(std::size(sizes), p);
  auto bc = make_outputs<T>(std::size(sizes) * static_cast<std::size_t>(p), p);
  run([&](auto& comm) { exercise<T>(comm, nonblocking, ar, rs, ag, agi, bc); });
  INFO(std::string(what) << (nonblocking ? ", non-blocking" : ", blocking"));
  check_identical_on_ranks(ar, "all_reduce");
  check_identical_on_ranks(ag, "all_gather");
  check_identical_on_ranks(agi, "all_gather in place");
  check_identical_on_ranks(bc, "broadcast");
  std::size_t c = 0;
  for (index_t n : sizes)
    for (reduce_op op : all_ops) {
      const auto s1 = seed_of(n, op, 1), s2 = seed_of(n, op, 2);
      for (int r = 0; r < p; ++r) {
        check_reduction(ar[c][static_cast<std::size_t>(r)], n, p, op, [&](int s, index_t i) { return value<T>(s, i, s1); }, "all_reduce");
        check_reduction(rs[c][static_cast<std::size_t>(r)], n, p, op,
                        [&](int s, index_t i) { return value<T>(s, static_cast<index_t>(r) * n + i, s2); }, "reduce_scatter");
      }
      ++c;
    }
  c = 0;
  for (index_t n : sizes) {
    std::vector<T> gathered;
    for (int s = 0; s < p; ++s) {
      const auto v = values<T>(s, n, seed_of(n, reduce_op::sum, 3));
      gathered.insert(gathered.end(), v.begin(), v.end());
    }
    CHECK(same_bits(ag[c][0], gathered));
    CHECK(same_bits(agi[c][0], gathered));
    for (int root = 0; root < p; ++root) {
      INFO("broadcast n = " << n << " from root " << root);
      CHECK(same_bits(bc[c * static_cast<std::size_t>(p) + static_cast<std::size_t>(root)][0],
                      values<T>(root, n, seed_of(n, reduce_op::sum, 4))));
    }
    ++c;
  }
}

/// Piece sizes per rank for the _v collectives: uneven, with zeros, all zero.
std::vector<std::vector<index_t>> count_patterns(int p) {
  std::vector<std::vector<index_t>> out;
  for (int k = 0; k < 4; ++k) {
    std::vector<index_t> c(static_cast<std::size_t>(p));
    for (int s = 0; s < p; ++s) c[static_cast<std::size_t>(s)] = k == 3 ? 0 : static_cast<index_t>((s * 7 + k * 5) % 6) * (k == 2 ? 200 : 1);
    out.push_back(c);
  }
  return out;
}

/// reduce_scatter_v (every op) and all_gather_v (separate and in place), blocking or not; each
/// rank keeps its results: [pattern][op] for the reduction, [pattern][0 | 1] for the gathers.
template <class T, communicator C>
void exercise_v(C& comm, bool nonblocking, std::vector<std::vector<T>>& rsv, std::vector<std::vector<T>>& agv) {
  const int r = comm.rank(), p = comm.size();
  std::size_t k = 0;
  for (const auto& counts : count_patterns(p)) {
    index_t total = 0, displ = 0;
    for (int s = 0; s < p; ++s) {
      if (s == r) displ = total;
      total += counts[static_cast<std::size_t>(s)];
    }
    const index_t mine = counts[static_cast<std::size_t>(r)];
    for (reduce_op op : all_ops) {
      const auto in = values<T>(r, total, seed_of(total, op, 5));
      auto& out = rsv[k * 4 + static_cast<std::size_t>(op)];
      out.assign(static_cast<std::size_t>(mine), T{});
      if (nonblocking) comm.ireduce_scatter_v(in.data(), out.data(), counts.data(), op).wait();
      else comm.reduce_scatter_v(in.data(), out.data(), counts.data(), op);
    }
    const auto piece = values<T>(r, mine, seed_of(mine, reduce_op::sum, 6));
    auto& sep = agv[k * 2];
    auto& inplace = agv[k * 2 + 1];
    sep.assign(static_cast<std::size_t>(total), T{});
    inplace.assign(static_cast<std::size_t>(total), T{});
    std::copy(piece.begin(), piece.end(), inplace.begin() + static_cast<std::ptrdiff_t>(displ));
    std::vector<index_t> temporary = counts;  // the counts need not outlive the call
    if (nonblocking) {
      auto a = comm.iall_gather_v(piece.data(), sep.data(), temporary.data());
      auto b = comm.iall_gather_v(inplace.data() + displ, inplace.data(), temporary.data());
      temporary.assign(temporary.size(), -1);
      b.wait();
      a.wait();
    } else {
      comm.all_gather_v(piece.data(), sep.data(), counts.data());
      comm.all_gather_v(inplace.data() + displ, inplace.data(), counts.data());
    }
    ++k;
  }
}

/// What exercise_v gave rank r of p, against the references.
template <class T>
void check_v(int r, int p, const std::vector<std::vector<T>>& rsv, const std::vector<std::vector<T>>& agv) {
  std::size_t k = 0;
  for (const auto& counts : count_patterns(p)) {
    index_t total = 0, displ = 0;
    std::vector<T> gathered;
    for (int s = 0; s < p; ++s) {
      if (s == r) displ = total;
      const index_t c = counts[static_cast<std::size_t>(s)];
      const auto v = values<T>(s, c, seed_of(c, reduce_op::sum, 6));
      gathered.insert(gathered.end(), v.begin(), v.end());
      total += c;
    }
    INFO("rank " << r << " of " << p << ", counts pattern " << k);
    for (reduce_op op : all_ops) {
      const auto seed = seed_of(total, op, 5);
      check_reduction(rsv[k * 4 + static_cast<std::size_t>(op)], counts[static_cast<std::size_t>(r)], p, op,
                      [&](int s, index_t i) { return value<T>(s, displ + i, seed); }, "reduce_scatter_v");
    }
    CHECK(same_bits(agv[k * 2], gathered));
    CHECK(same_bits(agv[k * 2 + 1], gathered));
    ++k;
  }
}

}  // namespace

TEST_CASE_TEMPLATE("local_comm and thread_comm: reduce_scatter_v and all_gather_v against the reference, 1 to 4 ranks", T, float,
                   double, std::int32_t, bfloat16, half) {
  for (bool nonblocking : {false, true}) {
    {
      std::vector<std::vector<T>> rsv(16), agv(8);
      local_comm comm;
      exercise_v<T>(comm, nonblocking, rsv, agv);
      check_v<T>(0, 1, rsv, agv);
    }
    for (int p = 1; p <= 4; ++p) {
      std::vector<std::vector<std::vector<T>>> rsv(static_cast<std::size_t>(p), std::vector<std::vector<T>>(16)),
          agv(static_cast<std::size_t>(p), std::vector<std::vector<T>>(8));
      run_ranks(p, [&](thread_comm& comm) {
        exercise_v<T>(comm, nonblocking, rsv[static_cast<std::size_t>(comm.rank())], agv[static_cast<std::size_t>(comm.rank())]);
      });
      for (int r = 0; r < p; ++r) check_v<T>(r, p, rsv[static_cast<std::size_t>(r)], agv[static_cast<std::size_t>(r)]);
    }
  }
}

TEST_CASE("thread_comm: _v collectives whose counts differ between ranks fail on every rank") {
  CHECK_THROWS_WITH_AS(run_ranks(2,
                                 [](thread_comm& comm) {
                                   std::vector<float> in(4, 1.0f), out(4);
                                   const index_t counts[2] = {comm.rank() == 0 ? index_t{2} : index_t{1}, comm.rank() == 0 ? index_t{1} : index_t{2}};
                                   comm.reduce_scatter_v(in.data(), out.data(), counts, reduce_op::sum);
                                 }),
                       doctest::Contains("counts[0] = 2, rank 1 passed 1"), comm_error);
  local_comm one;
  std::vector<float> a(2);
  const index_t bad[1] = {-1};
  CHECK_THROWS_WITH_AS(one.all_gather_v(a.data(), a.data(), bad), doctest::Contains("counts[0] = -1 is negative"), error);
  CHECK_THROWS_WITH_AS(one.reduce_scatter_v(a.data(), a.data(), static_cast<const index_t*>(nullptr), reduce_op::sum),
                       doctest::Contains("counts is null"), error);
}

TEST_CASE_TEMPLATE("local_comm: every collective is the one-rank reduction or a copy", T, float, double, std::int32_t,
                   bfloat16, half) {
  for (bool nonblocking : {false, true})
    check_exercise<T>(1, nonblocking, "local_comm", [](auto&& body) {
      local_comm comm;
      body(comm);
    });
}

TEST_CASE_TEMPLATE("thread_comm: every collective against the rank-order reference, 1 to 4 ranks", T, float, double,
                   std::int32_t, bfloat16, half) {
  for (int p = 1; p <= 4; ++p)
    for (bool nonblocking : {false, true})
      check_exercise<T>(p, nonblocking, "thread_comm", [p](auto&& body) { run_ranks(p, [&](thread_comm& comm) { body(comm); }); });
}

TEST_CASE("thread_comm: 2-byte sums round once, after summing in fp32") {
  // 1 + 3 * 2^-9 in bf16: rounding after each step would stay at 1 (each 2^-9 is a quarter of
  // an ulp); summing in fp32 and rounding once gives 1 + 2^-7
  run_ranks(4, [](thread_comm& comm) {
    bfloat16 x(comm.rank() == 0 ? 1.0f : 0x1p-9f);
    comm.all_reduce(&x, 1, reduce_op::sum);
    CHECK(static_cast<float>(x) == 1.0f + 0x1p-7f);
    half h(comm.rank() == 0 ? 1.0f : 0x1p-12f);  // half: 10 mantissa bits, the same effect
    comm.all_reduce(&h, 1, reduce_op::sum);
    CHECK(static_cast<float>(h) == 1.0f + 0x1p-10f);
  });
}

TEST_CASE("thread_comm: max and min let NaN win on every rank") {
  run_ranks(3, [](thread_comm& comm) {
    float v[2] = {comm.rank() == 1 ? std::nanf("") : 1.0f, comm.rank() == 1 ? std::nanf("") : 1.0f};
    comm.all_reduce(v, 1, reduce_op::max);
    comm.all_reduce(v + 1, 1, reduce_op::min);
    CHECK(std::isnan(v[0]));
    CHECK(std::isnan(v[1]));
  });
}

TEST_CASE("thread_comm: large buffers (1<<20 floats), identical on every rank and in every run") {
  constexpr index_t n = index_t{1} << 20;
  constexpr int p = 4;
  std::vector<std::vector<float>> first(p), second(p);
  for (auto* out : {&first, &second})
    run_ranks(p, [&](thread_comm& comm) {
      auto x = values<float>(comm.rank(), n, 99);
      comm.all_reduce(x.data(), n, reduce_op::sum);
      (*out)[static_cast<std::size_t>(comm.rank())] = std::move(x);
    });
  check_reduction(first[0], n, p, reduce_op::sum, [](int s, index_t i) { return value<float>(s, i, 99); }, "large all_reduce");
  for (int r = 0; r < p; ++r) {
    CHECK(same_bits(first[static_cast<std::size_t>(r)], first[0]));
    CHECK(same_bits(second[static_cast<std::size_t>(r)], first[0]));
  }
  // bf16 reduce_scatter and all_gather of the same size, non-blocking
  std::vector<std::vector<bfloat16>> shards(p), gathered(p);
  run_ranks(p, [&](thread_comm& comm) {
    const auto r = static_cast<std::size_t>(comm.rank());
    const auto in = values<bfloat16>(comm.rank(), n, 7);
    shards[r].resize(n / p);
    auto req = comm.ireduce_scatter(in.data(), shards[r].data(), n / p, reduce_op::average);
    req.wait();
    gathered[r].resize(n);
    comm.iall_gather(shards[r].data(), gathered[r].data(), n / p).wait();
  });
  for (int r = 0; r < p; ++r) {
    check_reduction(shards[static_cast<std::size_t>(r)], n / p, p, reduce_op::average,
                    [r](int s, index_t i) { return value<bfloat16>(s, r * (n / p) + i, 7); }, "large reduce_scatter");
    CHECK(same_bits(gathered[static_cast<std::size_t>(r)], gathered[0]));
    CHECK(std::memcmp(gathered[0].data() + r * (n / p), shards[static_cast<std::size_t>(r)].data(), sizeof(bfloat16) * (n / p)) == 0);
  }
}

TEST_CASE("thread_comm: non-blocking collectives overlap work, keep their order, and mix with blocking ones") {
  constexpr index_t n = 1 << 16;
  run_ranks(3, [](thread_comm& comm) {
    const int r = comm.rank();
    auto a = values<float>(r, n, 1), b = values<float>(r, n, 2);
    auto req = comm.iall_reduce(a.data(), n, reduce_op::sum);
    // a blocking collective issued while the first is pending runs after it on every rank
    comm.all_reduce(b.data(), n, reduce_op::max);
    double work = 0;
    for (int i = 0; i < 100000; ++i) work += std::sqrt(static_cast<double>(i));
    CHECK(work > 0);
    int polls = 0;
    while (!req.test()) {
      ++polls;
      std::this_thread::yield();
    }
    CHECK(req.test());  // stays true
    req.wait();         // and wait() returns at once
    int bad = 0;
    for (index_t i = 0; i < n; i += 97) {
      auto va = [&](int s) { return value<float>(s, i, 1); };
      auto vb = [&](int s) { return value<float>(s, i, 2); };
      const float ra = reference<float>(3, reduce_op::sum, va), rb = reference<float>(3, reduce_op::max, vb);
      if (std::memcmp(&ra, &a[static_cast<std::size_t>(i)], 4) != 0 || std::memcmp(&rb, &b[static_cast<std::size_t>(i)], 4) != 0) ++bad;
    }
    CHECK(bad == 0);
    // a request dropped before wait() completes on destruction; moved requests carry the collective
    std::vector<std::int32_t> c(5, r + 1);
    {
      auto dropped = comm.iall_reduce(c.data(), 5, reduce_op::sum);
      thread_request moved = std::move(dropped);
      CHECK(dropped.test());  // moved-from: complete
    }
    CHECK(c[4] == 1 + 2 + 3);
    thread_request none;
    CHECK(none.test());
    none.wait();
  });
}

TEST_CASE("communicators reject bad arguments with messages that name them") {
  SUBCASE("local_comm") {
    local_comm comm;
    float x[4] = {};
    CHECK_THROWS_WITH_AS(comm.all_reduce(x, -1, reduce_op::sum), doctest::Contains("local_comm::all_reduce: n = -1 is negative"), error);
    CHECK_THROWS_WITH_AS(comm.broadcast(x, 4, 1), doctest::Contains("root 1 is outside [0, 1)"), error);
    CHECK_THROWS_WITH_AS(comm.reduce_scatter(x, x, 4, reduce_op::sum), doctest::Contains("out overlaps in"), error);
    CHECK_THROWS_WITH_AS(comm.all_gather(x, x + 1, 2), doctest::Contains("in overlaps out"), error);
    CHECK_THROWS_WITH_AS(comm.all_reduce(static_cast<float*>(nullptr), 3, reduce_op::sum), doctest::Contains("data is null"), error);
    CHECK_THROWS_WITH_AS(comm.all_reduce(x, 4, static_cast<reduce_op>(42)), doctest::Contains("unknown reduce_op 42"), error);
    comm.all_gather(x, x, 4);  // in place is fine
    comm.all_reduce(static_cast<float*>(nullptr), 0, reduce_op::sum);
  }
  SUBCASE("thread_comm: the same checks, on every rank") {
    auto expect = [](auto&& call, const char* message) {
      CHECK_THROWS_WITH_AS(run_ranks(2, [&](thread_comm& comm) { call(comm); }), doctest::Contains(message), error);
    };
    float x[8] = {};
    expect([](thread_comm& c) { float y[2]; c.all_reduce(y, -1, reduce_op::sum); }, "thread_comm::all_reduce: n = -1 is negative");
    expect([](thread_comm& c) { float y[2]; c.broadcast(y, 2, 2); }, "thread_comm::broadcast: root 2 is outside [0, 2)");
    expect([](thread_comm& c) { float y[2]; c.broadcast(y, 2, -1); }, "root -1 is outside [0, 2)");
    expect([](thread_comm& c) { float y[4]; c.reduce_scatter(y, y + 1, 2, reduce_op::sum); }, "out overlaps in");
    expect([](thread_comm& c) { float y[4]; c.all_gather(y + 1 - c.rank(), y, 2); }, "in overlaps out");
    expect([](thread_comm& c) { float y[4]; c.iall_gather(y, y + 1, 2); }, "in overlaps out");
    expect([](thread_comm& c) { c.ireduce_scatter(static_cast<const half*>(nullptr), static_cast<half*>(nullptr), -3, reduce_op::sum); },
           "n_per_rank = -3 is negative");
    // checks across ranks: disagreement and shared buffers are comm_errors
    expect([](thread_comm& c) { float y[4]{}; c.all_reduce(y, 3 + c.rank(), reduce_op::sum); }, "rank 0 passed n = 3, rank 1 passed n = 4");
    expect([](thread_comm& c) { float y[4]{}; c.all_reduce(y, 4, c.rank() ? reduce_op::max : reduce_op::sum); }, "the ranks disagree");
    expect([](thread_comm& c) {
      float y[4]{};
      if (c.rank() == 0) c.all_reduce(y, 4, reduce_op::sum);
      else c.barrier();
    }, "rank 0 called all_reduce, rank 1 called barrier");
    expect([](thread_comm& c) {
      if (c.rank() == 0) { float y[2]{}; c.all_reduce(y, 2, reduce_op::sum); }
      else { double y[2]{}; c.all_reduce(y, 2, reduce_op::sum); }
    }, "rank 0 passed float, rank 1 passed double");
    expect([&x](thread_comm& c) { c.all_reduce(x, 4, reduce_op::sum); }, "(ranks need separate buffers)");
    CHECK_THROWS_AS(run_ranks(2, [&x](thread_comm& c) { c.broadcast(x + c.rank(), 4, 0); }), comm_error);
    CHECK_THROWS_WITH_AS(run_ranks(0, [](thread_comm&) {}), doctest::Contains("need at least 1"), error);
    CHECK_THROWS_AS(thread_group(0), error);
    thread_group g(2);
    CHECK_THROWS_WITH_AS(thread_comm(g, 2), doctest::Contains("rank 2 is outside [0, 2)"), error);
  }
}

TEST_CASE("thread_comm: a failing rank breaks the group instead of hanging the others") {
  SUBCASE("a rank throws while the others wait in a collective") {
    std::atomic<int> others{0};
    CHECK_THROWS_WITH_AS(run_ranks(3, [&](thread_comm& comm) {
      std::vector<float> x(10, 1.0f);
      comm.all_reduce(x.data(), 10, reduce_op::sum);  // a collective that succeeds first
      if (comm.rank() == 1) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the others are waiting by now
        throw std::runtime_error("boom");
      }
      try {
        comm.all_reduce(x.data(), 10, reduce_op::sum);
      } catch (const comm_error& e) {
        CHECK(std::string(e.what()).find("rank 1 failed: boom") != std::string::npos);
        ++others;
        throw;
      }
    }), "boom", std::runtime_error);
    CHECK(others == 2);
  }
  SUBCASE("a rank passes a bad argument the others did not") {
    std::atomic<int> others{0};
    CHECK_THROWS_WITH_AS(run_ranks(4, [&](thread_comm& comm) {
      int root = comm.rank() == 2 ? 9 : 0;
      float y = 0;
      try {
        comm.broadcast(&y, 1, root);
      } catch (const comm_error&) {
        ++others;
        throw;
      }
    }), doctest::Contains("root 9 is outside [0, 4)"), error);
    CHECK(others == 3);
  }
  SUBCASE("pending non-blocking collectives fail too") {
    std::atomic<int> others{0};
    CHECK_THROWS_WITH_AS(run_ranks(3, [&](thread_comm& comm) {
      if (comm.rank() == 0) throw std::logic_error("rank 0 gave up");
      std::vector<bfloat16> g(100);
      auto req = comm.iall_reduce(g.data(), 100, reduce_op::sum);
      try {
        while (!req.test()) std::this_thread::yield();
      } catch (const comm_error&) {
        ++others;
      }
      CHECK_THROWS_AS(req.wait(), comm_error);  // the failure stays with the request
      CHECK_THROWS_AS(comm.barrier(), comm_error);
    }), "rank 0 gave up", std::logic_error);
    CHECK(others == 2);
  }
  SUBCASE("a rank that returns early leaves the group") {
    CHECK_THROWS_WITH_AS(run_ranks(2, [](thread_comm& comm) {
      if (comm.rank() == 1) return;
      comm.barrier();
    }), doctest::Contains("rank 1 has left the group"), comm_error);
  }
}
