#pragma once
/// @file blocked.hpp
/// The BLIS-style loop nest shared by the register-blocked paths (fp32 AVX-512 / AVX2 /
/// portable, AVX512-BF16 dot products, double), and the threading skeleton that the AMX
/// path reuses:
///
///   for jc in N step NC              (B panel K x nc packed once, shared by all threads)
///     pack B panel, all K blocks      (micro-panels handed out dynamically, double-buffered)
///     barrier                         (the only one per panel: usually one per GEMM)
///     for each work item              (handed out dynamically: an MC-row block of A, and a
///                                      column range of the panel when rows are too few)
///       for pc in K step KC
///         pack A block                (mc x kc, per thread, lives in L2)
///         for jr in the item's columns step NR   (B micro-panel stays in L1)
///           for ir in mc step MR                 (A micro-panel streams from L2)
///             micro-kernel, with the epilogue fused into the store of the last K block
///
/// Work is handed out through atomic counters rather than a fixed split: on a shared
/// machine a core that is busy elsewhere then just takes fewer items instead of holding
/// everyone up at the next barrier.

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "common.hpp"
#include "packing.hpp"

// GCC 12 reports false -Wmaybe-uninitialized inside AVX-512 intrinsics (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace trident::cpu_kernels::detail {

/// How the rows and columns of one B panel are cut into work items.
struct item_grid {
  index_t mc = 0;                ///< most rows of an item (a multiple of the register tile's rows)
  index_t m_items = 0;           ///< row blocks
  index_t n_chunks = 1;          ///< column ranges per panel (> 1 only when there are too few row blocks)
  std::vector<index_t> starts;  ///< first row of each row block, then m
};

/// Cuts m rows into blocks of at most mc_max rows (multiples of mr). Threaded, the blocks
/// shrink towards the end ("guided": each takes a 1/(2 nt) share of the rows left, but no
/// fewer than 4 tiles), so that threads finish within a small block of each other; column
/// ranges are added when rows alone cannot feed the threads.
inline item_grid choose_items(index_t m, index_t nc, index_t mr, index_t nr, index_t mc_max, int nt) {
  item_grid g;
  const index_t t = std::max(1, nt);
  const index_t mc_cap = std::max(mr, mc_max / mr * mr);
  if (t == 1) {
    const index_t blocks = ceil_div(m, mc_cap);
    g.mc = round_up(ceil_div(m, blocks), mr);
    for (index_t i = 0; i < m; i += g.mc) g.starts.push_back(i);
  } else {
    const index_t min_rows = std::min(mc_cap, 4 * mr);
    for (index_t i = 0; i < m;) {
      const index_t rows = std::clamp(round_up(ceil_div(m - i, 2 * t), mr), min_rows, mc_cap);
      g.starts.push_back(i);
      g.mc = std::max(g.mc, std::min(rows, m - i));
      i += rows;
    }
  }
  g.m_items = static_cast<index_t>(g.starts.size());
  g.starts.push_back(m);
  g.mc = round_up(g.mc, mr);
  if (t > 1 && g.m_items < 2 * t) g.n_chunks = std::min(ceil_div(nc, nr), ceil_div(2 * t, g.m_items));
  return g;
}

/// Runs `body(tid, nt, waited)` on `nthreads` OpenMP threads (or inline when 1). `waited`
/// points to the calling thread's wait counter (ns) on thread 0 and is null elsewhere; the
/// time the caller waited, there and at the join, goes to report_threading().
template <class Body>
void run_parallel(int nthreads, Body&& body) {
#if defined(TRIDENT_HAS_OPENMP)
  if (nthreads > 1) {
    const std::int64_t t0 = monotonic_ns();
    std::int64_t waited = 0, master_done = 0;
#pragma omp parallel num_threads(nthreads)
    {
      const int tid = omp_get_thread_num();
      body(tid, omp_get_num_threads(), tid == 0 ? &waited : nullptr);
      if (tid == 0) master_done = monotonic_ns();
    }
    const std::int64_t t1 = monotonic_ns();
    report_threading(t1 - t0, waited + (t1 - master_done));
    return;
  }
#endif
  (void)nthreads;
  std::int64_t waited = 0;
  body(0, 1, &waited);
}

/// Hand-out and completion counters of one shared panel, so that threads synchronise on
/// the work itself rather than on each other: packing units and work items are claimed
/// with fetch_add, and a thread waits only until the packing it needs is complete. A thread
/// that starts late (its core busy elsewhere) then finds the work done instead of making
/// everyone wait for it at a barrier.
struct panel_sync {
  std::atomic<index_t> pack_next{0};  ///< next packing unit to claim
  std::atomic<index_t> pack_done{0};  ///< packing units finished
  std::atomic<index_t> item_next{0};  ///< next work item to claim
  std::atomic<index_t> item_done{0};  ///< work items finished
};

/// Spins (politely) until `counter` reaches `target`; adds the time spent to *waited if given.
inline void wait_until(const std::atomic<index_t>& counter, index_t target, std::int64_t* waited) noexcept {
  if (counter.load(std::memory_order_acquire) >= target) return;
  const std::int64_t t0 = waited != nullptr ? monotonic_ns() : 0;
  for (unsigned spins = 0; counter.load(std::memory_order_acquire) < target; ++spins) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
    if ((spins & 1023u) == 1023u) std::this_thread::yield();
  }
  if (waited != nullptr) *waited += monotonic_ns() - t0;
}

/// Runs one shared panel with `nt` threads: packs its `units` (pack(u0, u1)) and then runs
/// its `items` (compute(item)), claiming both dynamically. `prev2` is the panel that used
/// the same buffer two panels ago (or nullptr): its items must be finished before packing.
template <class Pack, class Compute>
void run_panel(panel_sync& sync, const panel_sync* prev2, index_t prev2_items, index_t units, index_t unit_grain,
               index_t items, std::int64_t* waited, Pack&& pack, Compute&& compute) {
  if (prev2 != nullptr) wait_until(prev2->item_done, prev2_items, waited);
  for (;;) {
    const index_t u0 = sync.pack_next.fetch_add(unit_grain, std::memory_order_relaxed);
    if (u0 >= units) break;
    const index_t u1 = std::min(units, u0 + unit_grain);
    pack(u0, u1);
    sync.pack_done.fetch_add(u1 - u0, std::memory_order_release);
  }
  wait_until(sync.pack_done, units, waited);
  for (;;) {
    const index_t it = sync.item_next.fetch_add(1, std::memory_order_relaxed);
    if (it >= items) break;
    compute(it);
    sync.item_done.fetch_add(1, std::memory_order_release);
  }
}

/// Most elements of packed B the shared panel may hold (32 MiB of fp32).
inline constexpr index_t max_packed_b_elements = index_t(8) << 20;

/// Runs the blocked GEMM with micro-kernel `Kernel` on `nthreads` threads.
/// @tparam Kernel micro-kernel policy (value_type, packed_type, mr, nr, kg, mc_blk, kc_blk, nc_blk, run)
/// @tparam TA element type of A as stored (converted to Kernel::packed_type while packing)
/// @tparam TB element type of B as stored
template <class Kernel, class TA, class TB>
void gemm_blocked(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, typename Kernel::value_type alpha,
                  const TA* a, index_t lda, const TB* b, index_t ldb, typename Kernel::value_type beta,
                  typename Kernel::value_type* c, index_t ldc, const gemm_epilogue& ep, int nthreads) {
  using V = typename Kernel::value_type;
  using P = typename Kernel::packed_type;
  constexpr index_t MR = Kernel::mr, NR = Kernel::nr, KG = Kernel::kg;

  // Balanced K blocks (a multiple of 16 deep, so that the next block starts on a fresh k group).
  const index_t kblocks = ceil_div(k, Kernel::kc_blk);
  const index_t kc_max = round_up(ceil_div(k, kblocks), 16);
  const index_t kcp_max = round_up(kc_max, KG);
  // Column panels: B is packed for all of K at once (one barrier per panel, not per K
  // block), so a panel is as wide as nc_blk and the packed-B budget allow.
  const index_t nc_cap =
      std::max<index_t>(NR, std::min<index_t>(Kernel::nc_blk, max_packed_b_elements / (kblocks * kcp_max)) / NR * NR);
  const index_t nblocks = ceil_div(n, nc_cap);
  const index_t nc_max = round_up(ceil_div(n, nblocks), NR);
  const item_grid grid = choose_items(m, nc_max, MR, NR, Kernel::mc_blk, nthreads);

  // Packed B of one panel: [K block][micro-panel][kcp x NR]; two buffers when threaded.
  const index_t kblock_elems = nc_max * kcp_max;
  const std::size_t b_elems = static_cast<std::size_t>(kblocks * kblock_elems);
  P* bbuf = static_cast<P*>(thread_workspace(0).get((nthreads > 1 ? 2 : 1) * b_elems * sizeof(P)));
  std::unique_ptr<panel_sync[]> sync(new panel_sync[static_cast<std::size_t>(nthreads > 1 ? nblocks : 0)]);

  run_parallel(nthreads, [&](int tid, int nt, std::int64_t* waited) {
    (void)tid;
    P* abuf = static_cast<P*>(thread_workspace(1).get(static_cast<std::size_t>(grid.mc * kcp_max) * sizeof(P)));
    tile_store<V> ts;
    ts.alpha = alpha;
    ts.beta = beta;
    ts.act = ep.act;
    index_t iter = 0;
    for (index_t jc = 0; jc < n; jc += nc_max, ++iter) {
      const index_t nc = std::min(nc_max, n - jc);
      const index_t npanels = ceil_div(nc, NR);
      P* bp = bbuf + (nt > 1 ? (iter & 1) : 0) * b_elems;
      // Unit u packs the group of up to `group` micro-panels u % ngroups of K block u / ngroups
      // (small units: a thread that loses its core while holding one delays the others little).
      constexpr index_t group = 2;
      const index_t ngroups = ceil_div(npanels, group);
      auto pack_b = [&](index_t u0, index_t u1) {
        for (index_t u = u0; u < u1; ++u) {
          const index_t kb = u / ngroups, g = u % ngroups;
          const index_t pc = kb * kc_max, kc = std::min(kc_max, k - pc), kcp = round_up(kc, KG);
          const index_t jp = g * group, count = std::min(group, npanels - jp);
          pack_b_panels<P, NR, KG>(b, trans_b, ldb, jc + jp * NR, jc + nc, count, pc, kc, kcp,
                                   bp + kb * kblock_elems + jp * NR * kcp);
        }
      };
      auto compute = [&](index_t item) {
        const index_t ib = item / grid.n_chunks, jb = item % grid.n_chunks;
        const index_t ic = grid.starts[static_cast<std::size_t>(ib)];
        const index_t mc = grid.starts[static_cast<std::size_t>(ib) + 1] - ic;
        index_t n0, n1;
        split_range(nc, NR, grid.n_chunks, jb, n0, n1);
        if (n0 >= n1) return;
        for (index_t kb = 0; kb < kblocks; ++kb) {
          const index_t pc = kb * kc_max, kc = std::min(kc_max, k - pc), kcp = round_up(kc, KG);
          ts.first = kb == 0;
          ts.last = kb + 1 == kblocks;
          for (index_t ir = 0; ir < mc; ir += MR) {
            pack_a_panel<P, MR, KG>(a, trans_a, lda, ic + ir, std::min(MR, mc - ir), pc, kc, abuf + ir * kcp);
          }
          const P* bk = bp + kb * kblock_elems;
          for (index_t jr = n0; jr < n1; jr += NR) {
            const index_t nr = std::min(NR, n1 - jr);
            ts.bias = ep.bias != nullptr ? ep.bias + jc + jr : nullptr;
            const P* bpanel = bk + jr * kcp;
            for (index_t ir = 0; ir < mc; ir += MR) {
              Kernel::run(kcp, abuf + ir * kcp, bpanel, c + (ic + ir) * ldc + jc + jr, ldc, std::min(MR, mc - ir),
                          nr, ts);
            }
          }
        }
      };
      const index_t units = kblocks * ngroups, items = grid.m_items * grid.n_chunks;
      if (nt == 1) {
        pack_b(0, units);
        for (index_t it = 0; it < items; ++it) compute(it);
        continue;
      }
      // This buffer was last read two panels ago: wait until those items are finished.
      run_panel(sync[static_cast<std::size_t>(iter)], iter >= 2 ? &sync[static_cast<std::size_t>(iter - 2)] : nullptr,
                items, units, 1, items, waited, pack_b, compute);
    }
  });
}

}  // namespace trident::cpu_kernels::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
