// P6: trident's mpi_comm collectives against the plain MPI calls they wrap, on the same buffers,
// in the same process: all_reduce (sum, in place) against MPI_Allreduce(MPI_IN_PLACE),
// reduce_scatter against MPI_Reduce_scatter_block, all_gather against MPI_Allgather, broadcast
// against MPI_Bcast, all on fp32 buffers of each size; bf16 all_reduce and reduce_scatter
// against MPI_Allreduce and MPI_Reduce_scatter_block of an fp32 buffer of the same element count
// (mpi_comm reduces 2-byte types in fp32 and rounds once, which MPI cannot do on 2-byte words:
// MPI's fp32 reduction of the same values is the honest peer), bf16 all_gather against
// MPI_Allgather of 2-byte words. The plain calls run on MPI_COMM_WORLD; mpi_comm on its
// duplicate of it.
//
// Sizes are the bytes of the fp32 buffer as nccl-tests counts them (all_reduce and broadcast:
// the buffer; reduce_scatter: the input of size × n_per_rank; all_gather: the output), so one
// size means the same element count for every collective. bf16 rows have that element count.
// Bus bandwidth follows nccl-tests: busbw = bytes / time × 2(n-1)/n for all_reduce, × (n-1)/n
// for reduce_scatter and all_gather, × 1 for broadcast (n ranks). The bf16 reductions count 4
// bytes per element, their peer's, so that both columns compare the same element count (mpi_comm
// moves 2 bytes per element of them).
//
// A measurement is: barrier, `iters` back-to-back calls, the time per call of the slowest rank.
// `iters` is set once per case so that a measurement of the plain call lasts --min-seconds, and
// both use it. Each round measures every case, ours and MPI in alternating order; the table
// gives medians over the rounds of busbw and of the per-round ratio ours/MPI (= MPI time / our
// time). Before timing, each collective's result is checked bitwise against the plain call's on
// rank-dependent values (the bf16 reductions: against MPI's fp32 result rounded once to bf16).
// Timed all_reduce buffers hold zeros, so repeated in-place sums stay finite and normal.
//
//   mpiexec -n 2 bench_collectives [--sizes 64K,1M,16M,64M] [--rounds 5] [--min-seconds 0.2] [--json]
//
// Environment: OMP_NUM_THREADS=1 (the conversions of the bf16 reductions are single-threaded
// either way; this only keeps OpenMP from spinning beside MPI).
#include <trident/mpi.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common.hpp"

namespace {

using namespace trident;

/// One case: our collective and the plain MPI call, on buffers both use.
struct bench_case {
  std::string op, dtype;
  index_t elements = 0;      // elements of the whole (fp32-sized) buffer
  double bytes = 0;          // nccl-tests' size, in bytes
  double bus_factor = 1;     // busbw = bytes / time × bus_factor
  std::function<void()> ours, plain;
  int iters = 1;
  std::vector<double> t_ours, t_plain, ratio;
};

/// Seconds per call, slowest rank, of `iters` back-to-back calls after a barrier.
double time_calls(const std::function<void()>& f, int iters) {
  MPI_Barrier(MPI_COMM_WORLD);
  const auto t0 = bench::clock_type::now();
  for (int i = 0; i < iters; ++i) f();
  double local = std::chrono::duration<double>(bench::clock_type::now() - t0).count() / iters, slowest = 0;
  MPI_Allreduce(&local, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return slowest;
}

/// Whether every rank says ok.
bool all_ok(bool ok) {
  int mine = ok ? 1 : 0, all = 0;
  MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return all == 1;
}

/// k/64 for small k depending on rank and index: sums over up to 64 ranks are exact in fp32
/// and bf16 holds every value (8 significant bits).
float exact_value(int rank, index_t i) {
  const auto u = static_cast<std::uint64_t>(i) * 2654435761u + static_cast<std::uint64_t>(rank) * 40503u;
  return static_cast<float>(static_cast<int>(u % 255) - 127) / 64.0f;
}

template <class T>
bool same_bits(const T* a, const T* b, index_t n) {
  return std::memcmp(a, b, static_cast<std::size_t>(n) * sizeof(T)) == 0;
}

/// Each collective against the plain call on `n` elements (a multiple of the size) of
/// rank-dependent values: bitwise equal results on every rank.
bool check_results(mpi_comm& comm, index_t n) {
  const int rank = comm.rank(), size = comm.size();
  const index_t per = n / size;
  bool ok = true;
  std::vector<float> a(static_cast<std::size_t>(n)), b(a.size()), outa(a.size()), outb(a.size());
  for (index_t i = 0; i < n; ++i) a[static_cast<std::size_t>(i)] = b[static_cast<std::size_t>(i)] = exact_value(rank, i);

  comm.all_reduce(a.data(), n, reduce_op::sum);
  MPI_Allreduce(MPI_IN_PLACE, b.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  ok = ok && same_bits(a.data(), b.data(), n);

  for (index_t i = 0; i < n; ++i) a[static_cast<std::size_t>(i)] = exact_value(rank, i);
  comm.reduce_scatter(a.data(), outa.data(), per, reduce_op::sum);
  MPI_Reduce_scatter_block(a.data(), outb.data(), static_cast<int>(per), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  ok = ok && same_bits(outa.data(), outb.data(), per);

  comm.all_gather(a.data(), outa.data(), per);
  MPI_Allgather(a.data(), static_cast<int>(per), MPI_FLOAT, outb.data(), static_cast<int>(per), MPI_FLOAT, MPI_COMM_WORLD);
  ok = ok && same_bits(outa.data(), outb.data(), n);

  std::copy(a.begin(), a.end(), b.begin());
  comm.broadcast(a.data(), n, 0);
  MPI_Bcast(b.data(), static_cast<int>(n), MPI_FLOAT, 0, MPI_COMM_WORLD);
  ok = ok && same_bits(a.data(), b.data(), n);

  std::vector<bfloat16> h(a.size()), hout(a.size()), href(a.size());
  for (index_t i = 0; i < n; ++i) {
    b[static_cast<std::size_t>(i)] = exact_value(rank, i);
    h[static_cast<std::size_t>(i)] = bfloat16(b[static_cast<std::size_t>(i)]);
  }
  comm.all_reduce(h.data(), n, reduce_op::sum);
  MPI_Allreduce(MPI_IN_PLACE, b.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  for (index_t i = 0; i < n; ++i) href[static_cast<std::size_t>(i)] = bfloat16(b[static_cast<std::size_t>(i)]);
  ok = ok && same_bits(h.data(), href.data(), n);

  for (index_t i = 0; i < n; ++i) {
    b[static_cast<std::size_t>(i)] = exact_value(rank, i);
    h[static_cast<std::size_t>(i)] = bfloat16(b[static_cast<std::size_t>(i)]);
  }
  comm.reduce_scatter(h.data(), hout.data(), per, reduce_op::sum);
  MPI_Reduce_scatter_block(b.data(), outb.data(), static_cast<int>(per), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  for (index_t i = 0; i < per; ++i) href[static_cast<std::size_t>(i)] = bfloat16(outb[static_cast<std::size_t>(i)]);
  ok = ok && same_bits(hout.data(), href.data(), per);

  for (index_t i = 0; i < n; ++i) h[static_cast<std::size_t>(i)] = bfloat16(exact_value(rank, i));
  comm.all_gather(h.data(), hout.data(), per);
  MPI_Allgather(h.data(), static_cast<int>(per), MPI_UINT16_T, href.data(), static_cast<int>(per), MPI_UINT16_T, MPI_COMM_WORLD);
  ok = ok && same_bits(hout.data(), href.data(), n);
  return all_ok(ok);
}

/// "64 KiB", "16 MiB".
std::string size_label(double bytes) {
  char s[32];
  if (bytes >= 1024.0 * 1024.0) std::snprintf(s, sizeof s, "%g MiB", bytes / (1024.0 * 1024.0));
  else std::snprintf(s, sizeof s, "%g KiB", bytes / 1024.0);
  return s;
}

/// "64K", "1M", "1048576" → bytes.
index_t parse_size(const std::string& s) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  double m = 1;
  if (end && (*end == 'K' || *end == 'k')) m = 1024;
  else if (end && (*end == 'M' || *end == 'm')) m = 1024.0 * 1024.0;
  else if (end && (*end == 'G' || *end == 'g')) m = 1024.0 * 1024.0 * 1024.0;
  return static_cast<index_t>(v * m);
}

/// The buffers of one size (fp32 elements n, a multiple of the size), shared by ours and MPI.
struct buffers {
  tensor<float> reduce, scatter_in, scatter_out, gather_in, gather_out, bcast, peer16;
  tensor<bfloat16> reduce16, scatter16_in, scatter16_out, gather16_in, gather16_out;
  buffers(index_t n, int rank, int size)
      : reduce(tensor<float>::uninitialized({n})), scatter_in(tensor<float>::uninitialized({n})),
        scatter_out(tensor<float>::uninitialized({n / size})), gather_in(tensor<float>::uninitialized({n / size})),
        gather_out(tensor<float>::uninitialized({n})), bcast(tensor<float>::uninitialized({n})),
        peer16(tensor<float>::uninitialized({n})), reduce16(tensor<bfloat16>::uninitialized({n})),
        scatter16_in(tensor<bfloat16>::uninitialized({n})), scatter16_out(tensor<bfloat16>::uninitialized({n / size})),
        gather16_in(tensor<bfloat16>::uninitialized({n / size})), gather16_out(tensor<bfloat16>::uninitialized({n})) {
    // Every page touched before timing; all_reduce buffers hold zeros (repeated in-place sums).
    std::fill_n(reduce.data(), n, 0.0f);
    std::fill_n(peer16.data(), n, 0.0f);
    std::fill_n(reduce16.data(), n, bfloat16(0.0f));
    for (index_t i = 0; i < n; ++i) {
      scatter_in.data()[i] = bcast.data()[i] = exact_value(rank, i);
      scatter16_in.data()[i] = bfloat16(exact_value(rank, i));
      gather_out.data()[i] = 0.0f;
      gather16_out.data()[i] = bfloat16(0.0f);
    }
    for (index_t i = 0; i < n / size; ++i) {
      scatter_out.data()[i] = 0.0f;
      scatter16_out.data()[i] = bfloat16(0.0f);
      gather_in.data()[i] = exact_value(rank, i);
      gather16_in.data()[i] = bfloat16(exact_value(rank, i));
    }
  }
};

}  // namespace

int main(int argc, char** argv) {
  mpi_environment env(&argc, &argv);
  mpi_comm comm;
  const int rank = comm.rank(), size = comm.size();

  bench::run_options args{5, 0.2};
  std::vector<index_t> sizes = {index_t{64} << 10, index_t{1} << 20, index_t{16} << 20, index_t{64} << 20};
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--sizes") && i + 1 < argc) {
      sizes.clear();
      std::string list = argv[++i];
      for (std::size_t p = 0; p <= list.size();) {
        const std::size_t q = std::min(list.find(',', p), list.size());
        sizes.push_back(parse_size(list.substr(p, q - p)));
        p = q + 1;
      }
    } else if (args.parse(i, argc, argv)) {
    } else {
      if (rank == 0) std::fprintf(stderr, "usage: mpiexec -n N %s [--sizes 64K,1M,16M,64M] [--rounds R] [--min-seconds S] [--json]\n", argv[0]);
      return 2;
    }
  }
  if (args.rounds <= 0 || sizes.empty() || std::any_of(sizes.begin(), sizes.end(), [](index_t s) { return s < 4; })) {
    if (rank == 0) std::fprintf(stderr, "bench_collectives: rounds must be positive and sizes at least 4 bytes\n");
    return 2;
  }

  const bool ok = check_results(comm, index_t{1000} * size);
  const double allreduce_factor = 2.0 * (size - 1) / size, part_factor = static_cast<double>(size - 1) / size;

  std::vector<std::unique_ptr<buffers>> bufs;
  std::vector<bench_case> cases;
  auto add = [&cases](const char* op, const char* dtype, index_t n, double bytes, double factor, std::function<void()> ours,
                      std::function<void()> plain) {
    bench_case c;
    c.op = op;
    c.dtype = dtype;
    c.elements = n;
    c.bytes = bytes;
    c.bus_factor = factor;
    c.ours = std::move(ours);
    c.plain = std::move(plain);
    cases.push_back(std::move(c));
  };
  for (index_t bytes : sizes) {
    const index_t n = std::max<index_t>(size, bytes / 4 / size * size), per = n / size;  // fp32 elements, a multiple of the size
    bufs.push_back(std::make_unique<buffers>(n, rank, size));
    buffers& b = *bufs.back();
    const int cn = static_cast<int>(n), cper = static_cast<int>(per);
    const double fbytes = 4.0 * static_cast<double>(n);
    add("all_reduce", "fp32", n, fbytes, allreduce_factor,
                     [&comm, &b, n] { comm.all_reduce(b.reduce.data(), n, reduce_op::sum); },
                     [&b, cn] { MPI_Allreduce(MPI_IN_PLACE, b.reduce.data(), cn, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD); });
    add("reduce_scatter", "fp32", n, fbytes, part_factor,
                     [&comm, &b, per] { comm.reduce_scatter(b.scatter_in.data(), b.scatter_out.data(), per, reduce_op::sum); },
                     [&b, cper] {
                       MPI_Reduce_scatter_block(b.scatter_in.data(), b.scatter_out.data(), cper, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
                     });
    add("all_gather", "fp32", n, fbytes, part_factor,
                     [&comm, &b, per] { comm.all_gather(b.gather_in.data(), b.gather_out.data(), per); },
                     [&b, cper] {
                       MPI_Allgather(b.gather_in.data(), cper, MPI_FLOAT, b.gather_out.data(), cper, MPI_FLOAT, MPI_COMM_WORLD);
                     });
    add("broadcast", "fp32", n, fbytes, 1.0, [&comm, &b, n] { comm.broadcast(b.bcast.data(), n, 0); },
                     [&b, cn] { MPI_Bcast(b.bcast.data(), cn, MPI_FLOAT, 0, MPI_COMM_WORLD); });
    add("all_reduce", "bf16 (MPI: fp32)", n, fbytes, allreduce_factor,
                     [&comm, &b, n] { comm.all_reduce(b.reduce16.data(), n, reduce_op::sum); },
                     [&b, cn] { MPI_Allreduce(MPI_IN_PLACE, b.peer16.data(), cn, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD); });
    add("reduce_scatter", "bf16 (MPI: fp32)", n, fbytes, part_factor,
                     [&comm, &b, per] { comm.reduce_scatter(b.scatter16_in.data(), b.scatter16_out.data(), per, reduce_op::sum); },
                     [&b, cper] {
                       MPI_Reduce_scatter_block(b.scatter_in.data(), b.scatter_out.data(), cper, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
                     });
    add("all_gather", "bf16", n, 2.0 * static_cast<double>(n), part_factor,
                     [&comm, &b, per] { comm.all_gather(b.gather16_in.data(), b.gather16_out.data(), per); },
                     [&b, cper] {
                       MPI_Allgather(b.gather16_in.data(), cper, MPI_UINT16_T, b.gather16_out.data(), cper, MPI_UINT16_T, MPI_COMM_WORLD);
                     });
  }

  // Warm-up (both, twice) and the number of calls per measurement, from the plain call's time.
  for (auto& c : cases) {
    for (int k = 0; k < 2; ++k) {
      c.ours();
      c.plain();
    }
    const double t = std::max(time_calls(c.plain, 2), 1e-7);
    c.iters = static_cast<int>(std::clamp(std::ceil(args.min_seconds / t), 2.0, 100000.0));
  }

  for (int r = 0; r < args.rounds; ++r) {
    for (std::size_t k = 0; k < cases.size(); ++k) {
      auto& c = cases[k];
      double to = 0, tp = 0;
      if ((r + k) % 2 == 0) {
        to = time_calls(c.ours, c.iters);
        tp = time_calls(c.plain, c.iters);
      } else {
        tp = time_calls(c.plain, c.iters);
        to = time_calls(c.ours, c.iters);
      }
      c.t_ours.push_back(to);
      c.t_plain.push_back(tp);
      c.ratio.push_back(tp / to);
    }
  }

  if (rank == 0) {
    std::printf("# bench_collectives: %d ranks, %d rounds, >= %.2f s per measurement; results against the plain calls: %s\n", size,
                args.rounds, args.min_seconds, ok ? "ok" : "FAILED");
    std::printf("| collective | dtype | size | elements | calls | ours busbw GB/s | MPI busbw GB/s | ours us | MPI us | ours/MPI |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
    for (const auto& c : cases) {
      const double to = bench::median(c.t_ours), tp = bench::median(c.t_plain);
      std::printf("| %s | %s | %s | %lld | %d | %.2f | %.2f | %.1f | %.1f | %s |\n", c.op.c_str(), c.dtype.c_str(), size_label(c.bytes).c_str(),
                  static_cast<long long>(c.elements), c.iters, c.bytes / to * c.bus_factor * 1e-9, c.bytes / tp * c.bus_factor * 1e-9,
                  to * 1e6, tp * 1e6, bench::spread(c.ratio, "%.3f").c_str());
    }
    std::printf("# ours/MPI: median [min, max] of the per-round ratios (MPI time / our time); bar >= 0.95\n");
    if (args.json) {
      for (const auto& c : cases) {
        const double to = bench::median(c.t_ours), tp = bench::median(c.t_plain);
        std::printf("{\"bench\":\"collectives\",\"ranks\":%d,\"op\":\"%s\",\"dtype\":\"%s\",\"elements\":%lld,\"bytes\":%.0f,"
                    "\"ours_us\":%.3f,\"mpi_us\":%.3f,\"ours_busbw\":%.4f,\"mpi_busbw\":%.4f,\"ratio\":%.4f,\"ratio_min\":%.4f,"
                    "\"ratio_max\":%.4f,\"ok\":%s}\n",
                    size, c.op.c_str(), c.dtype.substr(0, 4).c_str(), static_cast<long long>(c.elements), c.bytes, to * 1e6, tp * 1e6,
                    c.bytes / to * c.bus_factor * 1e-9, c.bytes / tp * c.bus_factor * 1e-9, bench::median(c.ratio),
                    bench::min_of(c.ratio), bench::max_of(c.ratio), ok ? "true" : "false");
      }
    }
  }
  return ok ? 0 : 1;
}
