// Tests of the CPU GEMM kernels (trident/backend/cpu/gemm.hpp) against a double-precision
// reference computed here with a plain triple loop from the exact (widened) inputs.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include <trident/backend/cpu/gemm.hpp>

#if defined(TRIDENT_HAS_OPENMP)
#include <omp.h>
#endif

namespace {

using trident::activation;
using trident::bfloat16;
using trident::half;
using trident::index_t;
namespace ck = trident::cpu_kernels;

/// Unit roundoff of the accumulate type.
template <class Acc>
constexpr double unit_roundoff() {
  return std::numeric_limits<Acc>::epsilon() / 2;
}

/// One problem: shapes, scalars, epilogue and padding of the leading dimensions.
struct problem {
  bool ta = false, tb = false;
  index_t m = 1, n = 1, k = 1;
  double alpha = 1, beta = 0;
  bool bias = false;
  activation act = activation::none;
  index_t pad_a = 0, pad_b = 0, pad_c = 0;  // extra elements per row beyond the width
  index_t offset = 0;                       // elements by which every pointer is misaligned
};

template <class T>
T from_double(double x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else {
    return T(static_cast<float>(x));
  }
}

/// Runs `fn` (a GEMM with the public signature) on random inputs and checks every element
/// of C, and that the padding of C is untouched, against the double reference.
template <class T, class Acc, class Fn>
void check(const problem& p, Fn&& fn, double tol_factor = 1.0, std::uint32_t seed = 1) {
  std::mt19937 gen(seed + static_cast<std::uint32_t>(p.m * 131 + p.n * 17 + p.k));
  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  const index_t ra = p.ta ? p.k : p.m, ca = p.ta ? p.m : p.k;
  const index_t rb = p.tb ? p.n : p.k, cb = p.tb ? p.k : p.n;
  const index_t lda = ca + p.pad_a, ldb = cb + p.pad_b, ldc = p.n + p.pad_c;
  std::vector<T> a(static_cast<std::size_t>(ra * lda + p.offset + 1)), b(static_cast<std::size_t>(rb * ldb + p.offset + 1));
  std::vector<Acc> c(static_cast<std::size_t>(p.m * ldc + p.offset + 1));
  std::vector<float> bias(static_cast<std::size_t>(p.n + p.offset + 1));
  for (auto& x : a) x = from_double<T>(uni(gen));
  for (auto& x : b) x = from_double<T>(uni(gen));
  const Acc sentinel = Acc(12345);
  const Acc qnan = std::numeric_limits<Acc>::quiet_NaN();
  for (index_t i = 0; i < p.m; ++i) {
    for (index_t j = 0; j < ldc; ++j) {
      c[p.offset + i * ldc + j] = j >= p.n ? sentinel : (p.beta == 0 ? qnan : static_cast<Acc>(uni(gen)));
    }
  }
  for (auto& x : bias) x = static_cast<float>(2 * uni(gen));
  const std::vector<Acc> c0 = c;
  const T* pa = a.data() + p.offset;
  const T* pb = b.data() + p.offset;
  Acc* pc = c.data() + p.offset;
  ck::gemm_epilogue ep;
  ep.bias = p.bias ? bias.data() + p.offset : nullptr;
  ep.act = p.act;

  fn(p.ta, p.tb, p.m, p.n, p.k, static_cast<Acc>(p.alpha), pa, lda, pb, ldb, static_cast<Acc>(p.beta), pc, ldc, ep);

  const double u = unit_roundoff<Acc>();
  index_t bad = 0;
  for (index_t i = 0; i < p.m; ++i) {
    for (index_t j = 0; j < ldc; ++j) {
      const double got = static_cast<double>(pc[i * ldc + j]);
      if (j >= p.n) {
        if (got != static_cast<double>(sentinel)) ++bad;
        continue;
      }
      double s = 0, mag = 0;
      for (index_t q = 0; q < p.k; ++q) {
        const double x = static_cast<double>(static_cast<Acc>(p.ta ? pa[q * lda + i] : pa[i * lda + q]));
        const double y = static_cast<double>(static_cast<Acc>(p.tb ? pb[j * ldb + q] : pb[q * ldb + j]));
        s += x * y;
        mag += std::abs(x * y);
      }
      double ref = p.alpha * s;
      mag = std::abs(p.alpha) * mag;
      if (p.beta != 0) {
        const double old = static_cast<double>(c0[p.offset + i * ldc + j]);
        ref += p.beta * old;
        mag += std::abs(p.beta * old);
      }
      if (p.bias) {
        ref += static_cast<double>(ep.bias[j]);
        mag += std::abs(static_cast<double>(ep.bias[j]));
      }
      ref = trident::apply_activation(p.act, ref);
      // Rounding of a k-term sum plus the scaling steps; the vectorised activations add a few ulps.
      const double tol = tol_factor * ((2.0 * static_cast<double>(p.k) + 8.0) * u * mag + 64.0 * u * std::abs(ref)) + 1e-300;
      if (!(std::abs(got - ref) <= tol)) {
        if (bad < 5) {
          MESSAGE("mismatch at (", i, ",", j, "): got ", got, " expected ", ref, " tol ", tol, " m=", p.m, " n=", p.n,
                  " k=", p.k, " ta=", p.ta, " tb=", p.tb);
        }
        ++bad;
      }
    }
  }
  CHECK(bad == 0);
}

/// The public entry point, as a callable.
struct public_gemm {
  template <class... Args>
  void operator()(Args... args) const {
    ck::gemm(args...);
  }
};

/// A blocked path with an explicit micro-kernel.
template <class Kernel>
struct kernel_gemm {
  template <class... Args>
  void operator()(Args... args) const {
    ck::paths::gemm_with<Kernel>(args...);
  }
};

const index_t odd_sizes[][3] = {{1, 1, 1}, {7, 17, 33}, {33, 7, 17}, {17, 33, 7}, {100, 129, 65}, {129, 100, 257}, {257, 31, 100}, {64, 64, 64}};

/// Every transpose combination over the odd sizes, beta = 0 with NaN in C.
template <class T, class Acc, class Fn>
void check_sizes_and_transposes(Fn fn, double tol_factor = 1.0) {
  for (const auto& s : odd_sizes) {
    for (int t = 0; t < 4; ++t) {
      problem p;
      p.ta = t & 1;
      p.tb = (t >> 1) & 1;
      p.m = s[0];
      p.n = s[1];
      p.k = s[2];
      check<T, Acc>(p, fn, tol_factor);
    }
  }
}

/// Scaling, bias and every activation, with padded leading dimensions and misaligned pointers,
/// and a K deep enough to need several K blocks.
template <class T, class Acc, class Fn>
void check_epilogues(Fn fn, double tol_factor = 1.0) {
  const activation acts[] = {activation::none, activation::relu, activation::gelu, activation::gelu_tanh};
  int variant = 0;
  for (activation act : acts) {
    for (double beta : {0.0, -1.5}) {
      problem p;
      p.ta = variant & 1;
      p.tb = (variant >> 1) & 1;
      ++variant;
      p.m = 45;
      p.n = 70;
      p.k = 1100;  // several K blocks for every kernel
      p.alpha = (variant & 2) ? 1.0 : 0.75;  // alpha == 1 lets kernels accumulate in place
      p.beta = beta;
      p.bias = true;
      p.act = act;
      p.pad_a = 3;
      p.pad_b = 5;
      p.pad_c = 7;
      p.offset = 1;
      check<T, Acc>(p, fn, tol_factor);
    }
  }
}

}  // namespace

TEST_CASE("gemm fp32: all transposes over odd sizes, beta 0 with NaN-filled C") {
  check_sizes_and_transposes<float, float>(public_gemm{});
}

TEST_CASE("gemm fp32: alpha, beta, bias and activations, padded and misaligned") {
  check_epilogues<float, float>(public_gemm{});
}

TEST_CASE("gemm fp32: larger than one block in every dimension") {
  problem p;
  p.m = 301;
  p.n = 4200;  // more than one N panel for every kernel
  p.k = 5;
  p.beta = 0.5;
  p.bias = true;
  p.act = activation::relu;
  check<float, float>(p, public_gemm{});
  p.m = 513;
  p.n = 67;
  p.k = 900;
  p.ta = true;
  check<float, float>(p, public_gemm{});
}

TEST_CASE("gemm fp32: few rows and many columns (the shapes computed transposed), every epilogue") {
  // A linear layer's shapes at batch 128/256: threaded GEMMs with 64 <= m <= 512, n >= 2m,
  // k >= 512 are computed as C^T into a scratch and stored back transposed; every transpose,
  // beta, bias and activation must survive that, with padded C rows.
  const activation acts[] = {activation::none, activation::relu, activation::gelu};
  int variant = 0;
  for (index_t m : {64, 128, 256}) {
    for (activation act : acts) {
      problem p;
      p.m = m;
      p.n = 1024;
      p.k = variant % 2 ? 784 : 1024;
      p.ta = variant & 1;
      p.tb = (variant >> 1) & 1;
      p.beta = variant % 3 == 0 ? 1.0 : 0.0;
      p.bias = variant % 2 == 0;
      p.act = act;
      p.pad_c = variant % 2 ? 0 : 5;
      ++variant;
      CAPTURE(m);
      CAPTURE(variant);
      check<float, float>(p, public_gemm{});
    }
  }
}

TEST_CASE("gemm fp32: k == 0 and alpha == 0 give act(beta*C + bias) without reading A or B") {
  for (double beta : {0.0, 2.0}) {
    for (index_t k : {0, 9}) {
      problem p;
      p.m = 5;
      p.n = 19;
      p.k = k;
      p.alpha = k == 0 ? 1.0 : 0.0;
      p.beta = beta;
      p.bias = true;
      p.act = activation::gelu_tanh;
      p.pad_c = 2;
      check<float, float>(p, public_gemm{});
    }
  }
  // Empty outputs touch nothing.
  float c = 7.0f;
  const float* none = nullptr;
  ck::gemm(false, false, 0, 1, 3, 1.0f, none, 3, none, 1, 0.0f, &c, 1);
  ck::gemm(false, false, 1, 0, 3, 1.0f, none, 3, none, 1, 0.0f, &c, 1);
  CHECK(c == 7.0f);
}

TEST_CASE("gemm fp32: each micro-kernel path") {
  using portable = ck::kernel_scalar<float, 4, 16>;
  SUBCASE("portable") {
    check_sizes_and_transposes<float, float>(kernel_gemm<portable>{});
    check_epilogues<float, float>(kernel_gemm<portable>{});
  }
#if defined(TRIDENT_HAS_AVX2)
  SUBCASE("avx2") {
    check_sizes_and_transposes<float, float>(kernel_gemm<ck::kernel_avx2_f32>{});
    check_epilogues<float, float>(kernel_gemm<ck::kernel_avx2_f32>{});
  }
#endif
#if defined(TRIDENT_HAS_AVX512)
  SUBCASE("avx512 wide") {
    check_sizes_and_transposes<float, float>(kernel_gemm<ck::kernel_avx512_f32>{});
    check_epilogues<float, float>(kernel_gemm<ck::kernel_avx512_f32>{});
  }
  SUBCASE("avx512 narrow") {
    check_sizes_and_transposes<float, float>(kernel_gemm<ck::kernel_avx512_f32_narrow>{});
    check_epilogues<float, float>(kernel_gemm<ck::kernel_avx512_f32_narrow>{});
  }
#endif
}

TEST_CASE("gemm double: reference quality") {
  check_sizes_and_transposes<double, double>(public_gemm{});
  check_epilogues<double, double>(public_gemm{});
}

TEST_CASE("gemm bf16 inputs, fp32 accumulation: default and every path") {
  SUBCASE("default") {
    check_sizes_and_transposes<bfloat16, float>(public_gemm{});
    check_epilogues<bfloat16, float>(public_gemm{});
  }
  SUBCASE("scalar (widened to fp32)") {
    check_sizes_and_transposes<bfloat16, float>([](auto... args) { ck::paths::gemm_bf16_scalar(args...); });
    check_epilogues<bfloat16, float>([](auto... args) { ck::paths::gemm_bf16_scalar(args...); });
  }
  if constexpr (ck::paths::avx512_bf16_available) {
    SUBCASE("avx512-bf16") {
      check_sizes_and_transposes<bfloat16, float>([](auto... args) { ck::paths::gemm_bf16_avx512(args...); });
      check_epilogues<bfloat16, float>([](auto... args) { ck::paths::gemm_bf16_avx512(args...); });
    }
  }
#if defined(TRIDENT_HAS_AVX512BF16)
  SUBCASE("avx512-bf16 wide (6 x 64), on every shape") {
    check_sizes_and_transposes<bfloat16, float>(kernel_gemm<ck::kernel_avx512_bf16>{});
    check_epilogues<bfloat16, float>(kernel_gemm<ck::kernel_avx512_bf16>{});
  }
  SUBCASE("avx512-bf16 narrow (14 x 32), on every shape") {
    check_sizes_and_transposes<bfloat16, float>(kernel_gemm<ck::kernel_avx512_bf16_narrow>{});
    check_epilogues<bfloat16, float>(kernel_gemm<ck::kernel_avx512_bf16_narrow>{});
  }
#endif
  SUBCASE("amx") {
    if (ck::paths::amx_available()) {
      check_sizes_and_transposes<bfloat16, float>([](auto... args) { ck::paths::gemm_bf16_amx(args...); });
      check_epilogues<bfloat16, float>([](auto... args) { ck::paths::gemm_bf16_amx(args...); });
    } else {
      MESSAGE("AMX-BF16 not available here (not compiled in, or refused by the OS): path not checked");
    }
  }
}

TEST_CASE("gemm bf16: several column blocks, deep K") {
  problem p;
  p.m = 40;
  p.n = 1000;
  p.k = 600;
  p.beta = 0.5;
  p.bias = true;
  p.act = activation::gelu;
  p.tb = true;
  check<bfloat16, float>(p, public_gemm{});
}

TEST_CASE("gemm half inputs, fp32 accumulation") {
  check_sizes_and_transposes<half, float>(public_gemm{});
  check_epilogues<half, float>(public_gemm{});
}

TEST_CASE("gemm_batched: shared weight (stride 0), small and large problems") {
  for (index_t size : {9, 150}) {
    const index_t batch = 3, m = size, n = size + 3, k = size + 1;
    std::mt19937 gen(7);
    std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
    std::vector<float> a(static_cast<std::size_t>(batch * m * k)), w(static_cast<std::size_t>(n * k));
    std::vector<float> c(static_cast<std::size_t>(batch * m * n), std::numeric_limits<float>::quiet_NaN());
    std::vector<float> bias(static_cast<std::size_t>(n));
    for (auto& x : a) x = uni(gen);
    for (auto& x : w) x = uni(gen);
    for (auto& x : bias) x = uni(gen);
    ck::gemm_epilogue ep{bias.data(), activation::relu};
    // x_i (m x k) times W^T, W stored n x k and shared by the whole batch.
    ck::gemm_batched(batch, false, true, m, n, k, 1.0f, a.data(), k, m * k, w.data(), k, 0, 0.0f, c.data(), n, m * n, ep);
    index_t bad = 0;
    for (index_t s = 0; s < batch; ++s) {
      for (index_t i = 0; i < m; ++i) {
        for (index_t j = 0; j < n; ++j) {
          double ref = bias[j], mag = std::abs(bias[j]);
          for (index_t q = 0; q < k; ++q) {
            ref += double(a[s * m * k + i * k + q]) * w[j * k + q];
            mag += std::abs(double(a[s * m * k + i * k + q]) * w[j * k + q]);
          }
          ref = ref > 0 ? ref : 0;
          if (!(std::abs(c[s * m * n + i * n + j] - ref) <= (2.0 * k + 8) * 6e-8 * mag)) ++bad;
        }
      }
    }
    CHECK(bad == 0);
  }
  SUBCASE("every input type") {
    problem p;
    p.m = 20;
    p.n = 21;
    p.k = 22;
    p.beta = 1.0;
    auto batched = [](auto ta, auto tb, index_t m, index_t n, index_t k, auto alpha, auto* a, index_t lda, auto* b,
                      index_t ldb, auto beta, auto* c, index_t ldc, const ck::gemm_epilogue& ep) {
      // A batch of one through the batched entry point, for each (input, accumulate) pair.
      ck::gemm_batched(index_t(1), ta, tb, m, n, k, alpha, a, lda, index_t(0), b, ldb, index_t(0), beta, c, ldc,
                       index_t(0), ep);
    };
    check<float, float>(p, batched);
    check<double, double>(p, batched);
    check<bfloat16, float>(p, batched);
    check<half, float>(p, batched);
  }
}

#if defined(TRIDENT_HAS_OPENMP)
TEST_CASE("gemm inside a parallel region runs single-threaded and stays correct") {
  problem p;
  p.m = 130;
  p.n = 70;
  p.k = 90;
  p.beta = 0.5;
  int failures = 0;
#pragma omp parallel num_threads(2) reduction(+ : failures)
  {
    // Each thread checks its own problem; doctest's CHECK is not thread-safe, so count here.
    std::vector<float> a(static_cast<std::size_t>(p.m * p.k), 0.5f), b(static_cast<std::size_t>(p.k * p.n), 0.25f);
    std::vector<float> c(static_cast<std::size_t>(p.m * p.n), 1.0f);
    ck::gemm(false, false, p.m, p.n, p.k, 1.0f, a.data(), p.k, b.data(), p.n, 0.5f, c.data(), p.n);
    for (float x : c) failures += (x != static_cast<float>(0.5 + 0.125 * 90)) ? 1 : 0;
  }
  CHECK(failures == 0);
}
#endif
