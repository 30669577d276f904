// CUDA-specific tests: the cuda device against the cpu backend on the same inputs (bit for bit
// where both compute the same IEEE operations), random streams identical to the cpu's, host
// <-> device transfers, cuBLASLt GEMM in fp32 / tf32 / bf16 / fp16 / double against a double
// reference with every epilogue, batching with a broadcast operand, streams, and errors.
// The shared bodies are instantiated in test_cuda_bodies.cu.
//
// main() skips the whole suite (exit code 77, CTest's SKIP_RETURN_CODE) when the machine has
// no CUDA device, saying why.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <trident/cuda.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

int main(int argc, char** argv) {
  // Listing the cases and asking for help need no device.
  bool listing = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    listing = listing || arg.rfind("--list", 0) == 0 || arg.rfind("-l", 0) == 0 || arg == "--help" || arg == "-h" ||
              arg == "-?";
  }
  const trident::cuda_probe_result probe = trident::cuda_probe();
  if (probe.count == 0 && !listing) {
    std::printf("trident CUDA tests skipped: no CUDA device (cudaGetDeviceCount: %s)\n", probe.message());
    std::fflush(stdout);
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}

namespace {

using trident::activation;
using trident::bfloat16;
using trident::cpu;
using trident::cuda;
using trident::index_t;
using trident::shape;
using trident::tensor;

// --- helpers ------------------------------------------------------------------------------

/// Deterministic values in [lo, hi) (xorshift), rounded to T.
template <class T>
std::vector<T> values_of(index_t n, std::uint64_t seed, double lo = -2.0, double hi = 2.0) {
  std::vector<T> v(static_cast<std::size_t>(n));
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 7;
  for (auto& x : v) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    const double u = static_cast<double>(s >> 11) * (1.0 / 9007199254740992.0);
    x = static_cast<T>(lo + (hi - lo) * u);
  }
  return v;
}

/// The same values as a cpu tensor and as a cuda tensor.
template <class T>
struct twin {
  tensor<T, cpu> h;
  tensor<T, cuda> d;
};
template <class T>
twin<T> make_twin(const shape& s, std::uint64_t seed, double lo = -2.0, double hi = 2.0) {
  auto h = trident::from_vector<T, cpu>(s, values_of<T>(s.numel(), seed, lo, hi));
  auto d = trident::to<cuda>(h);
  return {std::move(h), std::move(d)};
}

/// Raw encoding of an element, for bit-exact comparisons.
template <class T>
std::uint64_t bits_of(T x) {
  if constexpr (std::is_same_v<T, double>) {
    return std::bit_cast<std::uint64_t>(x);
  } else if constexpr (std::is_same_v<T, float>) {
    return std::bit_cast<std::uint32_t>(x);
  } else {
    return x.bits;
  }
}

/// Position of an encoding on the number line (adjacent values differ by 1).
template <class T>
std::int64_t ordinal(T x) {
  constexpr int width = static_cast<int>(sizeof(T) * 8);
  const std::uint64_t b = bits_of(x);
  const std::uint64_t sign = std::uint64_t{1} << (width - 1);
  const std::int64_t mag = static_cast<std::int64_t>(b & (sign - 1));
  return (b & sign) ? -mag : mag;
}

/// Checks two host vectors element by element: at most `max_ulps` apart (0: same bits). Two
/// NaNs match; with `nan_bits` only when their encodings are equal too (arithmetic NaNs differ
/// between x86 and CUDA, converted ones must not).
template <class T>
void check_ulps(const std::vector<T>& got, const std::vector<T>& want, std::int64_t max_ulps, const std::string& what,
                bool nan_bits = false) {
  REQUIRE_MESSAGE(got.size() == want.size(), what << ": " << got.size() << " values, expected " << want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double g = static_cast<double>(static_cast<std::conditional_t<std::is_same_v<T, double>, double, float>>(got[i]));
    const double w = static_cast<double>(static_cast<std::conditional_t<std::is_same_v<T, double>, double, float>>(want[i]));
    if (std::isnan(g) && std::isnan(w) && (!nan_bits || bits_of(got[i]) == bits_of(want[i]))) continue;
    const std::int64_t d = ordinal(got[i]) - ordinal(want[i]);
    if ((d < 0 ? -d : d) > max_ulps) {
      FAIL_CHECK(what << ": element " << i << " is " << g << " (bits " << bits_of(got[i]) << "), the cpu gives " << w
                      << " (bits " << bits_of(want[i]) << "); allowed " << max_ulps << " ulp");
      return;
    }
  }
}

/// Checks |got - want| <= rtol*|want| + atol element-wise.
inline void check_near(const std::vector<double>& got, const std::vector<double>& want, double rtol, double atol,
                       const std::string& what) {
  REQUIRE_MESSAGE(got.size() == want.size(), what << ": " << got.size() << " values, expected " << want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i]) && std::isnan(want[i])) continue;
    if (std::isinf(got[i]) && got[i] == want[i]) continue;
    const double err = std::fabs(got[i] - want[i]);
    if (!(err <= rtol * std::fabs(want[i]) + atol)) {
      FAIL_CHECK(what << ": element " << i << " is " << got[i] << ", expected " << want[i] << " (error " << err << ")");
      return;
    }
  }
}

template <class X>
std::vector<double> as_doubles(const X& x) {
  const auto v = trident::to_vector(x);
  std::vector<double> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    if constexpr (std::is_same_v<typename X::value_type, double>) {
      out[i] = v[i];
    } else {
      out[i] = static_cast<double>(static_cast<float>(v[i]));
    }
  }
  return out;
}

template <class T>
double widen(T x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else {
    return static_cast<double>(static_cast<float>(x));
  }
}

/// Machine epsilon of an element type (2^-23 float, 2^-10 half, 2^-7 bfloat16, 2^-52 double).
template <class T>
constexpr double epsilon_of() {
  if constexpr (std::is_same_v<T, double>) return std::numeric_limits<double>::epsilon();
  if constexpr (std::is_same_v<T, float>) return std::numeric_limits<float>::epsilon();
  if constexpr (std::is_same_v<T, trident::half>) return 1.0 / 1024;
  return 1.0 / 128;
}

/// Double reference of one GEMM (row-major C = act(alpha op(A) op(B) + beta C + bias)) and the
/// magnitude sum_p |op(A)_ip op(B)_pj| that bounds its rounding error.
struct gemm_ref {
  std::vector<double> c, mag;
};
inline gemm_ref reference_gemm(const std::vector<double>& a, index_t lda, bool ta, const std::vector<double>& b, index_t ldb,
                               bool tb, const std::vector<double>& c0, index_t m, index_t n, index_t k, double alpha, double beta,
                               const std::vector<double>* bias, activation act) {
  gemm_ref r{std::vector<double>(static_cast<std::size_t>(m * n)), std::vector<double>(static_cast<std::size_t>(m * n))};
  for (index_t i = 0; i < m; ++i) {
    for (index_t j = 0; j < n; ++j) {
      double acc = 0, mag = 0;
      for (index_t p = 0; p < k; ++p) {
        const double av = ta ? a[static_cast<std::size_t>(p * lda + i)] : a[static_cast<std::size_t>(i * lda + p)];
        const double bv = tb ? b[static_cast<std::size_t>(j * ldb + p)] : b[static_cast<std::size_t>(p * ldb + j)];
        acc += av * bv;
        mag += std::fabs(av * bv);
      }
      double v = alpha * acc;
      if (beta != 0) v += beta * c0[static_cast<std::size_t>(i * n + j)];
      if (bias) v += (*bias)[static_cast<std::size_t>(j)];
      r.c[static_cast<std::size_t>(i * n + j)] = trident::apply_activation(act, v);
      r.mag[static_cast<std::size_t>(i * n + j)] = std::fabs(alpha) * mag + std::fabs(beta * (beta != 0 ? c0[static_cast<std::size_t>(i * n + j)] : 0.0)) +
                                                   (bias ? std::fabs((*bias)[static_cast<std::size_t>(j)]) : 0.0);
    }
  }
  return r;
}

/// |got - want| <= 1.25 u mag + rtol |want| + atol, element-wise: a GEMM's error bound (the
/// 1.25 covers an activation's slope), plus the activation's own rounding.
inline void check_gemm(const std::vector<double>& got, const gemm_ref& ref, double u, double atol, const std::string& what,
                       double rtol = 0) {
  REQUIRE(got.size() == ref.c.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(got[i] - ref.c[i]);
    const double bound = 1.25 * u * ref.mag[i] + rtol * std::fabs(ref.c[i]) + atol;
    if (!(err <= bound)) {
      FAIL_CHECK(what << ": element " << i << " is " << got[i] << ", expected " << ref.c[i] << " (error " << err << ", bound "
                      << bound << ")");
      return;
    }
  }
}

/// Restores cuda_settings on scope exit.
struct settings_guard {
  bool tf32 = trident::cuda_settings::allow_tf32.load();
  bool gelu = trident::cuda_settings::fused_gelu.load();
  ~settings_guard() {
    trident::cuda_settings::allow_tf32 = tf32;
    trident::cuda_settings::fused_gelu = gelu;
  }
};

}  // namespace

// --- the element-wise index plumbing (host-side) -------------------------------------------

TEST_CASE("merged loop plans decode every layout as layout::offset_of_linear does") {
  using namespace trident;
  std::uint64_t state = 12345;
  auto next = [&](std::uint64_t mod) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return static_cast<index_t>(state % mod);
  };
  for (int trial = 0; trial < 3000; ++trial) {
    const int r = 1 + static_cast<int>(next(5));
    index_array ext{}, s0{}, s1{}, s2{};
    for (int d = 0; d < r; ++d) ext[d] = 1 + next(5);
    const shape sh(r, ext);
    const strides cs = contiguous_strides(sh);
    for (int d = 0; d < r; ++d) {
      s0[d] = cs[d];                       // contiguous output
      s1[d] = next(3) == 0 ? 0 : cs[d];    // broadcast in some dimensions
      s2[d] = next(7);                     // arbitrary strides
    }
    const strides* st[3] = {&s0, &s1, &s2};
    const auto p = cuda_kernels::make_plan<3>(sh, st);
    const layout l[3] = {layout(sh, s0), layout(sh, s1), layout(sh, s2)};
    for (index_t i = 0; i < sh.numel(); ++i) {
      index_t narrow_off[3], wide_off[3];
      cuda_kernels::offsets_of(p, i, narrow_off, true);
      cuda_kernels::offsets_of(p, i, wide_off, false);
      for (int k = 0; k < 3; ++k) {
        const index_t want = l[k].offset_of_linear(i);
        const index_t got = p.rank == 1 ? i * p.st[k][0] : narrow_off[k];
        REQUIRE(got == want);
        if (p.rank > 1) REQUIRE(wide_off[k] == want);
      }
    }
  }
}

// --- device, memory, errors ---------------------------------------------------------------

TEST_CASE("cuda device: policy, allocation, and errors that name the call") {
  using namespace trident;
  static_assert(device_policy<cuda>);
  static_assert(!cuda::host_accessible);
  CHECK(cuda_device_count() >= 1);
  CHECK(cuda_probe().status == cudaSuccess);
  CHECK(cuda::allocate(0) == nullptr);
  cuda::deallocate(nullptr, 0);
  void* p = cuda::allocate(1000);
  CHECK(p != nullptr);
  CHECK(reinterpret_cast<std::uintptr_t>(p) % 256 == 0);
  cuda::deallocate(p, 1000);
  cuda::synchronize();

  // an impossible allocation: device_error naming the size
  CHECK_THROWS_WITH_AS(cuda::allocate(std::size_t{1} << 60), doctest::Contains("1152921504606846976 bytes"), device_error);
  // a failing runtime call: the call's text, the file and the error's name
  CHECK_THROWS_WITH_AS(TRIDENT_CUDA_CHECK(cudaSetDevice(-1)), doctest::Contains("cudaSetDevice(-1)"), device_error);
  CHECK_THROWS_WITH_AS(TRIDENT_CUDA_CHECK(cudaSetDevice(-1)), doctest::Contains("test_cuda.cu"), device_error);
  CHECK_THROWS_WITH_AS(TRIDENT_CUDA_CHECK(cudaSetDevice(-1)), doctest::Contains("cudaErrorInvalidDevice"), device_error);
  // a GEMM whose leading dimension is too small for cuBLASLt
  {
    auto a = tensor<float, cuda>({4, 4});
    auto c = tensor<float, cuda>({4, 4});
    gemm_call<float, float> g;
    g.m = g.n = g.k = 4;
    g.a = a.data();
    g.lda = 2;
    g.b = a.data();
    g.ldb = 4;
    g.c = c.data();
    g.ldc = 4;
    CHECK_THROWS_WITH_AS(kernels<cuda>::gemm(g), doctest::Contains("lda=2"), device_error);
  }
  // the errors above were not sticky: the device still works
  auto x = from_vector<float, cuda>({3}, {1, 2, 3});
  CHECK(to_vector(scale(x, 2.0)) == std::vector<float>{2, 4, 6});
}

TEST_CASE("host <-> device round trips of every size and type") {
  using namespace trident;
  for (index_t n : {index_t{0}, index_t{1}, index_t{3}, index_t{4}, index_t{1000}, index_t{(1 << 20) + 3}}) {
    INFO("n = " << n);
    const auto vf = values_of<float>(n, 1);
    CHECK(to_vector(from_vector<float, cuda>({n}, vf)) == vf);
    const auto vh = values_of<trident::half>(n, 2);
    const auto bh = to_vector(from_vector<trident::half, cuda>({n}, vh));
    std::vector<trident::half> expected = vh;
    check_ulps(bh, expected, 0, "half round trip");
    const auto vb = values_of<bfloat16>(n, 3);
    check_ulps(to_vector(from_vector<bfloat16, cuda>({n}, vb)), vb, 0, "bfloat16 round trip");
    const auto vd = values_of<double>(n, 4);
    CHECK(to_vector(from_vector<double, cuda>({n}, vd)) == vd);
  }
  // cpu -> cuda -> cuda (clone) -> cpu, of a strided cpu view
  auto h = from_vector<float, cpu>({3, 5}, values_of<float>(15, 5));
  const auto d = to<cuda>(h.t());
  const auto d2 = d.clone();
  const auto back = to<cpu>(d2);
  for (index_t i = 0; i < 5; ++i)
    for (index_t j = 0; j < 3; ++j) REQUIRE(back(i, j) == h(j, i));
  // pinned staging buffer
  cuda_pinned_buffer<float> pin(1024);
  for (std::size_t i = 0; i < pin.size(); ++i) pin[i] = static_cast<float>(i);
  auto dev = tensor<float, cuda>::uninitialized({1024});
  kernels<cuda>::copy_from_host(dev.data(), pin.data(), 1024 * sizeof(float));
  const auto got = to_vector(dev);
  for (std::size_t i = 0; i < got.size(); ++i) REQUIRE(got[i] == static_cast<float>(i));
}

// --- element-wise against the cpu backend -------------------------------------------------

TEST_CASE_TEMPLATE("element-wise ops equal the cpu backend's bit for bit (IEEE operations)", T, float, trident::half,
                   bfloat16, double) {
  using namespace trident;
  // sizes that are not multiples of 4 (vector tail), large enough for several blocks
  const shape s{37, 1031};
  const auto a = make_twin<T>(s, 11);
  const auto b = make_twin<T>(s, 12, 0.5, 3.0);
  const auto row = make_twin<T>({1031}, 13);
  const auto col = make_twin<T>({37, 1}, 14);
  const auto scalar = make_twin<T>({1}, 15);

  check_ulps(to_vector(add(a.d, b.d)), to_vector(add(a.h, b.h)), 0, "add");
  check_ulps(to_vector(sub(a.d, b.d)), to_vector(sub(a.h, b.h)), 0, "sub");
  check_ulps(to_vector(mul(a.d, b.d)), to_vector(mul(a.h, b.h)), 0, "mul");
  check_ulps(to_vector(div(a.d, b.d)), to_vector(div(a.h, b.h)), 0, "div");
  check_ulps(to_vector(maximum(a.d, b.d)), to_vector(maximum(a.h, b.h)), 0, "maximum");
  check_ulps(to_vector(add(a.d, row.d)), to_vector(add(a.h, row.h)), 0, "add a broadcast row");
  check_ulps(to_vector(mul(a.d, col.d)), to_vector(mul(a.h, col.h)), 0, "mul a broadcast column");
  check_ulps(to_vector(sub(scalar.d, a.d)), to_vector(sub(scalar.h, a.h)), 0, "scalar minus tensor");
  check_ulps(to_vector(sub(a.d, scalar.d)), to_vector(sub(a.h, scalar.h)), 0, "tensor minus scalar");
  check_ulps(to_vector(relu(a.d)), to_vector(relu(a.h)), 0, "relu");
  check_ulps(to_vector(neg(a.d)), to_vector(neg(a.h)), 0, "neg");
  check_ulps(to_vector(sqrt(b.d)), to_vector(sqrt(b.h)), 0, "sqrt");
  check_ulps(to_vector(scale(a.d, 0.375)), to_vector(scale(a.h, 0.375)), 0, "scale");
  // transcendental functions: CUDA's and glibc's differ by an ulp or two of the compute type
  // (more, relatively, where gelu cancels: 1 + erf(x) for negative x), which rounding to the
  // element type mostly hides
  using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const double rt = 2 * epsilon_of<T>() + 8 * epsilon_of<C>(), at = 16 * epsilon_of<C>();
  check_near(as_doubles(exp(a.d)), as_doubles(exp(a.h)), rt, 0, "exp");
  check_near(as_doubles(log(b.d)), as_doubles(log(b.h)), rt, at, "log");
  check_near(as_doubles(tanh(a.d)), as_doubles(tanh(a.h)), rt, at, "tanh");
  check_near(as_doubles(gelu(a.d)), as_doubles(gelu(a.h)), rt, at, "gelu");
  check_near(as_doubles(gelu_tanh(a.d)), as_doubles(gelu_tanh(a.h)), rt, at, "gelu_tanh");
  check_near(as_doubles(sigmoid(a.d)), as_doubles(sigmoid(a.h)), rt, at, "sigmoid");
  // axpby may be contracted into a fused multiply-add on either side
  check_ulps(to_vector(zip(ops::axpby{0.5, -1.25}, a.d, b.d)), to_vector(zip(ops::axpby{0.5, -1.25}, a.h, b.h)), 1, "axpby");

  // strided operands: transposed, sliced with an odd offset (misaligned), permuted output
  const auto tr = make_twin<T>({1031, 37}, 16);
  check_ulps(to_vector(add(tr.d.t(), b.d)), to_vector(add(tr.h.t(), b.h)), 0, "add of a transposed view");
  const auto sa_d = a.d.slice(1, 1, 1030);
  const auto sb_d = b.d.slice(1, 1, 1030);
  const auto sa_h = a.h.slice(1, 1, 1030);
  const auto sb_h = b.h.slice(1, 1, 1030);
  check_ulps(to_vector(mul(sa_d, sb_d)), to_vector(mul(sa_h, sb_h)), 0, "mul of misaligned slices");
  const auto flat_d = a.d.reshape({-1}).slice(0, 1, s.numel());
  const auto flat_h = a.h.reshape({-1}).slice(0, 1, s.numel());
  check_ulps(to_vector(neg(flat_d)), to_vector(neg(flat_h)), 0, "neg of a misaligned contiguous run");
  auto out_d = tensor<T, cuda>({1031, 37});
  auto out_h = tensor<T, cpu>({1031, 37});
  mul(a.d, b.d, out_d.t());
  mul(a.h, b.h, out_h.t());
  check_ulps(to_vector(out_d), to_vector(out_h), 0, "mul into a transposed output");
  // in place
  auto ip_d = a.d.clone();
  auto ip_h = a.h.clone();
  add(ip_d, b.d, ip_d);
  add(ip_h, b.h, ip_h);
  check_ulps(to_vector(ip_d), to_vector(ip_h), 0, "add in place");
  // five dimensions with broadcasting in several of them
  const auto p5 = make_twin<T>({2, 3, 1, 5, 7}, 17);
  const auto q5 = make_twin<T>({3, 4, 1, 7}, 18);
  check_ulps(to_vector(add(p5.d, q5.d)), to_vector(add(p5.h, q5.h)), 0, "add in five dimensions");
}

TEST_CASE("fill and conversions equal the cpu's, NaN included") {
  using namespace trident;
  for (double v : {0.0, -1.5, 3.14159, 65519.0, 1e-7, std::numeric_limits<double>::quiet_NaN(),
                   -std::numeric_limits<double>::infinity()}) {
    INFO("value " << v);
    auto hd = tensor<trident::half, cuda>({1001});
    auto hh = tensor<trident::half, cpu>({1001});
    fill(hd, v);
    fill(hh, v);
    check_ulps(to_vector(hd), to_vector(hh), 0, "fill half", true);
    auto bd = tensor<bfloat16, cuda>({7, 9});
    auto bh = tensor<bfloat16, cpu>({7, 9});
    fill(bd.t(), v);
    fill(bh.t(), v);
    check_ulps(to_vector(bd), to_vector(bh), 0, "fill a transposed bfloat16 view", true);
  }
  // float -> half / bfloat16 rounding on the device equals the cpu's, over a wide range with
  // subnormals, overflow, infinities and NaN
  std::vector<float> f;
  for (int e = -30; e <= 20; ++e)
    for (float m : {1.0f, 1.0009765625f, 1.00048828125f, 1.5f, 1.99951171875f, -1.25f}) f.push_back(std::ldexp(m, e));
  for (float x : {65504.0f, 65519.99f, 65520.0f, 3.0e38f, INFINITY, -INFINITY, NAN, -NAN, 5.96e-8f, 2.98e-8f, 0.0f, -0.0f})
    f.push_back(x);
  const auto fh = from_vector<float, cpu>({static_cast<index_t>(f.size())}, f);
  const auto fd = to<cuda>(fh);
  check_ulps(to_vector(cast<trident::half>(fd)), to_vector(cast<trident::half>(fh)), 0, "float -> half", true);
  check_ulps(to_vector(cast<bfloat16>(fd)), to_vector(cast<bfloat16>(fh)), 0, "float -> bfloat16", true);
  check_ulps(to_vector(cast<float>(cast<trident::half>(fd))), to_vector(cast<float>(cast<trident::half>(fh))), 0,
             "half -> float", true);
  const auto dd = cast<double>(fd);
  check_ulps(to_vector(cast<trident::half>(dd)), to_vector(cast<trident::half>(cast<double>(fh))), 0, "double -> half", true);
}

// --- random ---------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("random fills equal the cpu's: uniform bit for bit, normal within an ulp", T, float, trident::half,
                   bfloat16, double) {
  using namespace trident;
  for (index_t n : {index_t{1}, index_t{5}, index_t{4099}, index_t{(1 << 20) + 1}}) {
    INFO("n = " << n);
    generator gd(1234), gh(1234);
    auto ud = tensor<T, cuda>({n});
    auto uh = tensor<T, cpu>({n});
    uniform(ud, gd, -1.0, 3.0);  // (b - a) * u is exact: no rounding for either side to disagree on
    uniform(uh, gh, -1.0, 3.0);
    check_ulps(to_vector(ud), to_vector(uh), 0, "uniform");
    auto nd = tensor<T, cuda>({n});
    auto nh = tensor<T, cpu>({n});
    normal(nd, gd, 0.5, 2.0);
    normal(nh, gh, 0.5, 2.0);
    if constexpr (std::is_same_v<T, double>) {
      // computed in double on both sides: log/sin/cos differ by an ulp or so of double
      check_near(as_doubles(nd), as_doubles(nh), 1e-13, 1e-14, "normal");
    } else {
      // computed in double, rounded to T: the roundings agree, or differ by one ulp
      check_ulps(to_vector(nd), to_vector(nh), 1, "normal");
    }
  }
  // a strided destination receives the same values in its row-major order
  generator gd(99), gh(99);
  auto md = tensor<T, cuda>({33, 65});
  auto mh = tensor<T, cpu>({33, 65});
  uniform(md.t(), gd);
  uniform(mh.t(), gh);
  check_ulps(to_vector(md), to_vector(mh), 0, "uniform into a transposed view");
}

// --- reductions -----------------------------------------------------------------------------

TEST_CASE_TEMPLATE("reductions equal the cpu's (double accumulation) and are deterministic", T, float, trident::half,
                   bfloat16, double) {
  using namespace trident;
  // whole tensor: several passes-1 block counts, a strided view
  for (index_t n : {index_t{1}, index_t{1000}, index_t{(1 << 22) + 7}}) {
    INFO("n = " << n);
    const auto x = make_twin<T>({n}, 21);
    const double sd = sum(x.d), sh = sum(x.h);
    CHECK(std::fabs(sd - sh) <= 1e-12 * (std::fabs(sh) + static_cast<double>(n)));
    CHECK(sum(x.d) == sd);  // the same bits again
    CHECK(std::fabs(mean(x.d) - mean(x.h)) <= 1e-12 * (std::fabs(mean(x.h)) + 1));
    CHECK(max(x.d) == max(x.h));
    CHECK(std::fabs(l2_norm(x.d) - l2_norm(x.h)) <= 1e-12 * l2_norm(x.h));
  }
  const auto m = make_twin<T>({513, 771}, 22);
  CHECK(std::fabs(sum(m.d.t()) - sum(m.h.t())) <= 1e-9);
  CHECK(max(m.d.slice(1, 3, 700, 7)) == max(m.h.slice(1, 3, 700, 7)));
  CHECK(std::isnan(mean(tensor<T, cuda>({0}))));
  CHECK(max(tensor<T, cuda>({0})) == -INFINITY);

  // along an axis, through every kernel shape: short rows (a warp per row), long rows and few
  // (a block per row), a column reduction (a thread per output), a strided non-column axis.
  // Both sides accumulate in double (in different orders), so the results differ by the final
  // rounding to T: at most an ulp of T (or, for double, a few ulps of the sum's magnitude).
  const double rt = epsilon_of<T>();
  struct axis_case {
    shape s;
    int axis;
  };
  for (const auto& [s, axis] : {axis_case{{300, 77}, 1}, axis_case{{3, 100003}, 1}, axis_case{{2049, 1500}, 0},
                                axis_case{{40, 17, 3}, 1}, axis_case{{5, 6000, 2}, 1}, axis_case{{7}, 0}}) {
    INFO("shape " << s.str() << " axis " << axis);
    const auto x = make_twin<T>(s, 23);
    const double len = static_cast<double>(s[axis]);
    const double at = 8 * len * 2.0 * std::numeric_limits<double>::epsilon();  // |x| < 2
    check_near(as_doubles(sum(x.d, axis)), as_doubles(sum(x.h, axis)), rt, at, "sum");
    check_near(as_doubles(mean(x.d, axis)), as_doubles(mean(x.h, axis)), rt, at / len, "mean");
    check_ulps(to_vector(max(x.d, axis)), to_vector(max(x.h, axis)), 0, "max");
    check_near(as_doubles(l2_norm(x.d, axis)), as_doubles(l2_norm(x.h, axis)), rt, 2 * at, "l2_norm");
  }
  // a reduction of an empty axis: sum 0, mean NaN, max -inf
  const auto e = tensor<T, cuda>({3, 0});
  CHECK(as_doubles(sum(e, 1)) == std::vector<double>{0, 0, 0});
  for (double v : as_doubles(mean(e, 1))) CHECK(std::isnan(v));
  for (double v : as_doubles(max(e, 1))) CHECK(v == -INFINITY);
}

// --- softmax --------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("softmax and log-softmax equal the cpu's within an ulp or two", T, float, trident::half, bfloat16,
                   double) {
  using namespace trident;
  using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
  struct axis_case {
    shape s;
    int axis;
  };
  for (const auto& [s, axis] : {axis_case{{64, 65}, 1}, axis_case{{5, 5000}, 1}, axis_case{{300, 9}, 0},
                                axis_case{{3, 2048, 2}, 1}, axis_case{{1, 1}, 1}}) {
    INFO("shape " << s.str() << " axis " << axis);
    const auto x = make_twin<T>(s, 31, -20.0, 20.0);
    // the sums of exponentials are added in different orders: relative differences grow
    // like sqrt(len) ulps of the compute type
    const double tol = 2 * epsilon_of<T>() + 16 * std::sqrt(static_cast<double>(s[axis])) * epsilon_of<C>();
    // outputs below half's normal range are rounded to its subnormal grid (2^-24 apart)
    const double floor = std::is_same_v<T, trident::half> ? std::ldexp(1.0, -24) : 1e-30;
    check_near(as_doubles(softmax(x.d, axis)), as_doubles(softmax(x.h, axis)), tol, floor, "softmax");
    check_near(as_doubles(log_softmax(x.d, axis)), as_doubles(log_softmax(x.h, axis)), tol, tol, "log_softmax");
  }
  // in place, and rows of -inf and NaN
  auto xd = from_vector<T, cuda>({3, 4}, std::vector<T>(12, T(1.0f)));
  auto xh = from_vector<T, cpu>({3, 4}, std::vector<T>(12, T(1.0f)));
  fill(xd.select(0, 1), -INFINITY);
  fill(xh.select(0, 1), -INFINITY);
  fill(xd.slice(0, 2, 3).slice(1, 2, 3), std::numeric_limits<double>::quiet_NaN());
  fill(xh.slice(0, 2, 3).slice(1, 2, 3), std::numeric_limits<double>::quiet_NaN());
  softmax(xd, 1, xd);
  softmax(xh, 1, xh);
  check_ulps(to_vector(xd), to_vector(xh), 0, "softmax in place with -inf and NaN rows");
}

// --- GEMM -----------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("gemm against a double reference: fp32, tf32, bf16, fp16, double, every transpose", T, float,
                   trident::half, bfloat16, double) {
  using namespace trident;
  using Acc = gemm_accumulate_t<T>;
  settings_guard restore;
  // unit roundoff of the accumulation, with room for the tensor cores' summation order
  const double u_acc = std::is_same_v<T, double> ? 1e-15 : 2.0 * std::ldexp(1.0, -24);
  struct dims {
    index_t m, n, k;
  };
  for (bool tf32 : {false, true}) {
    if (tf32 && !std::is_same_v<T, float>) continue;
    cuda_settings::allow_tf32 = tf32;
    // TF32 rounds each input to 10 mantissa bits: each product is off by up to 2 * 2^-11
    const double u = tf32 ? 2.0 * std::ldexp(1.0, -11) + 8 * u_acc : 0.0;
    for (const auto& [m, n, k] : {dims{1, 1, 1}, dims{128, 96, 256}, dims{257, 129, 65}, dims{1, 1000, 64}, dims{3, 5, 2000}}) {
      for (bool ta : {false, true}) {
        for (bool tb : {false, true}) {
          INFO("tf32=" << tf32 << " m=" << m << " n=" << n << " k=" << k << " ta=" << ta << " tb=" << tb);
          const auto va = values_of<T>(m * k, 41, -1, 1), vb = values_of<T>(k * n, 42, -1, 1);
          const auto vc = values_of<Acc>(m * n, 43, -1, 1);
          const auto a = from_vector<T, cuda>(ta ? shape{k, m} : shape{m, k}, va);
          const auto b = from_vector<T, cuda>(tb ? shape{n, k} : shape{k, n}, vb);
          auto c = from_vector<Acc, cuda>({m, n}, vc);
          gemm_options opt;
          opt.trans_a = ta;
          opt.trans_b = tb;
          opt.alpha = -0.75;
          opt.beta = 0.5;
          gemm(a, b, c, opt);
          std::vector<double> da(va.size()), db(vb.size()), dc(vc.size());
          for (std::size_t i = 0; i < va.size(); ++i) da[i] = widen(va[i]);
          for (std::size_t i = 0; i < vb.size(); ++i) db[i] = widen(vb[i]);
          for (std::size_t i = 0; i < vc.size(); ++i) dc[i] = widen(vc[i]);
          const auto ref = reference_gemm(da, ta ? m : k, ta, db, tb ? k : n, tb, dc, m, n, k, -0.75, 0.5, nullptr, activation::none);
          check_gemm(as_doubles(c), ref, u + static_cast<double>(k + 2) * u_acc, 0, "gemm");
        }
      }
    }
  }
}

TEST_CASE_TEMPLATE("gemm epilogues: bias, relu, gelu (exact and tanh), fused or not, aligned or not", T, float, bfloat16,
                   trident::half, double) {
  using namespace trident;
  using Acc = gemm_accumulate_t<T>;
  settings_guard restore;
  const double u = (std::is_same_v<T, double> ? 1e-15 : 2.0 * std::ldexp(1.0, -24));
  const index_t m = 70, n = 52, k = 96;
  const auto va = values_of<T>(m * k, 51, -1, 1), vb = values_of<T>(k * n, 52, -1, 1);
  const auto vc = values_of<Acc>(m * n, 53, -1, 1);
  const auto vbias = values_of<float>(n + 1, 54, -1, 1);
  std::vector<double> da(va.size()), db(vb.size()), dc(vc.size());
  for (std::size_t i = 0; i < va.size(); ++i) da[i] = widen(va[i]);
  for (std::size_t i = 0; i < vb.size(); ++i) db[i] = widen(vb[i]);
  for (std::size_t i = 0; i < vc.size(); ++i) dc[i] = widen(vc[i]);
  const auto a = from_vector<T, cuda>({m, k}, va);
  const auto b = from_vector<T, cuda>({k, n}, vb);
  const auto bias_all = from_vector<float, cuda>({n + 1}, vbias);
  for (bool fused_gelu : {true, false}) {
    cuda_settings::fused_gelu = fused_gelu;
    for (bool misaligned : {false, true}) {
      // a bias one float past a 256-byte boundary cannot be handed to cuBLASLt: our epilogue adds it
      const auto bias = bias_all.slice(0, misaligned ? 1 : 0, misaligned ? n + 1 : n);
      std::vector<double> dbias(static_cast<std::size_t>(n));
      for (index_t j = 0; j < n; ++j) dbias[static_cast<std::size_t>(j)] = vbias[static_cast<std::size_t>(j + (misaligned ? 1 : 0))];
      for (auto act : {activation::none, activation::relu, activation::gelu, activation::gelu_tanh}) {
        for (double beta : {0.0, 0.5}) {
          INFO("fused_gelu=" << fused_gelu << " misaligned=" << misaligned << " act=" << to_string(act) << " beta=" << beta);
          auto c = from_vector<Acc, cuda>({m, n}, vc);
          if (beta == 0) fill(c, std::numeric_limits<double>::quiet_NaN());  // must not be read
          gemm_options opt;
          opt.beta = beta;
          opt.act = act;
          gemm(a, b, c, opt, bias);
          const auto ref = reference_gemm(da, k, false, db, n, false, dc, m, n, k, 1.0, beta, &dbias, act);
          // the activation's own rounding (cuBLASLt's fused tanh-GELU has its own tanh)
          const bool smooth = act == activation::gelu || act == activation::gelu_tanh;
          const double act_rtol = smooth ? (std::is_same_v<T, double> ? 1e-14 : 4e-6) : 0.0;
          const double act_atol = smooth ? (std::is_same_v<T, double> ? 1e-14 : 1e-5) : 0.0;
          check_gemm(as_doubles(c), ref, static_cast<double>(k + 4) * u, act_atol, "gemm with bias", act_rtol);
        }
      }
    }
  }
  // no product: k == 0 gives act(beta * C + bias); alpha == 0 too
  {
    const auto a0 = tensor<T, cuda>({m, 0});
    const auto b0 = tensor<T, cuda>({0, n});
    auto c = from_vector<Acc, cuda>({m, n}, vc);
    gemm_options opt;
    opt.beta = 2.0;
    opt.act = activation::relu;
    const auto bias = bias_all.slice(0, 0, n);
    gemm(a0, b0, c, opt, bias);
    const auto got = as_doubles(c);
    for (index_t i = 0; i < m; ++i)
      for (index_t j = 0; j < n; ++j) {
        const double w = std::max(0.0, 2.0 * dc[static_cast<std::size_t>(i * n + j)] + static_cast<double>(vbias[static_cast<std::size_t>(j)]));
        REQUIRE(std::fabs(got[static_cast<std::size_t>(i * n + j)] - w) <= 4 * u * (std::fabs(w) + 1));
      }
    auto c2 = tensor<Acc, cuda>({m, n});
    fill(c2, std::numeric_limits<double>::quiet_NaN());
    gemm_options zero;
    zero.alpha = 0.0;
    gemm(a, b, c2, zero);
    for (double v : as_doubles(c2)) REQUIRE(v == 0.0);
  }
}

TEST_CASE_TEMPLATE("batched gemm: broadcast operands, column-major output, input-type output", T, float, bfloat16,
                   trident::half, double) {
  using namespace trident;
  using Acc = gemm_accumulate_t<T>;
  const double u = (std::is_same_v<T, double> ? 1e-15 : 2.0 * std::ldexp(1.0, -24));
  const index_t batch = 6, m = 33, n = 40, k = 24;
  const auto va = values_of<T>(batch * m * k, 61, -1, 1), vb = values_of<T>(batch * k * n, 62, -1, 1);
  std::vector<double> da(va.size()), db(vb.size());
  for (std::size_t i = 0; i < va.size(); ++i) da[i] = widen(va[i]);
  for (std::size_t i = 0; i < vb.size(); ++i) db[i] = widen(vb[i]);
  const auto a3 = from_vector<T, cuda>({batch, m, k}, va);
  const auto b3 = from_vector<T, cuda>({batch, k, n}, vb);
  const auto a2 = a3.select(0, 0);  // (m, k), shared across the batch
  const auto b2 = b3.select(0, 0);  // (k, n), shared across the batch
  const auto part = [](const std::vector<double>& v, index_t i, index_t len) {
    return std::vector<double>(v.begin() + i * len, v.begin() + (i + 1) * len);
  };
  const std::vector<double> zero(static_cast<std::size_t>(m * n), 0.0);
  const auto c_ab = as_doubles(matmul(a3, b3));
  const auto c_a_shared = as_doubles(matmul(a2, b3));
  const auto c_b_shared = as_doubles(matmul(a3, b2));
  for (index_t i = 0; i < batch; ++i) {
    INFO("batch " << i);
    const auto ai = part(da, i, m * k), bi = part(db, i, k * n), a0 = part(da, 0, m * k), b0 = part(db, 0, k * n);
    check_gemm(part(c_ab, i, m * n), reference_gemm(ai, k, false, bi, n, false, zero, m, n, k, 1, 0, nullptr, activation::none),
               (k + 2) * u, 0, "batched");
    check_gemm(part(c_a_shared, i, m * n), reference_gemm(a0, k, false, bi, n, false, zero, m, n, k, 1, 0, nullptr, activation::none),
               (k + 2) * u, 0, "batched with a broadcast A");
    check_gemm(part(c_b_shared, i, m * n), reference_gemm(ai, k, false, b0, n, false, zero, m, n, k, 1, 0, nullptr, activation::none),
               (k + 2) * u, 0, "batched with a broadcast B");
  }
  // batch dimensions broadcast on both sides: (2, 1, m, k) x (1, 3, k, n) -> (2, 3, m, n)
  const auto a4 = a3.slice(0, 0, 2).unsqueeze(1);
  const auto b4 = b3.slice(0, 0, 3).unsqueeze(0);
  const auto c4 = as_doubles(matmul(a4, b4));
  for (index_t i = 0; i < 2; ++i)
    for (index_t j = 0; j < 3; ++j) {
      INFO("batch (" << i << ", " << j << ")");
      check_gemm(part(c4, i * 3 + j, m * n),
                 reference_gemm(part(da, i, m * k), k, false, part(db, j, k * n), n, false, zero, m, n, k, 1, 0, nullptr, activation::none),
                 (k + 2) * u, 0, "two-sided batch broadcast");
    }
  // a column-major C (a transposed view): computed as C^T in place
  auto ct = tensor<Acc, cuda>({batch, n, m});
  gemm(a3, b3, ct.transpose(1, 2));
  const auto vct = as_doubles(ct);
  for (index_t i = 0; i < batch; ++i) {
    const auto ref = reference_gemm(part(da, i, m * k), k, false, part(db, i, k * n), n, false, zero, m, n, k, 1, 0, nullptr, activation::none);
    std::vector<double> got(static_cast<std::size_t>(m * n));
    for (index_t r = 0; r < m; ++r)
      for (index_t c = 0; c < n; ++c) got[static_cast<std::size_t>(r * n + c)] = vct[static_cast<std::size_t>(i * m * n + c * m + r)];
    check_gemm(got, ref, (k + 2) * u, 0, "column-major C");
  }
  // C of the input type: computed in the accumulate type, rounded once
  if constexpr (!std::is_same_v<T, double>) {
    auto ci = tensor<T, cuda>({batch, m, n});
    gemm(a3, b3, ci);
    const auto got = as_doubles(ci);
    const auto want = as_doubles(cast<T>(matmul(a3, b3)));
    CHECK(got == want);
  }
}

TEST_CASE("tf32 is off by default and changes fp32 GEMM results only within TF32's precision") {
  using namespace trident;
  settings_guard restore;
  CHECK_FALSE(cuda_settings::allow_tf32.load());
  const index_t m = 256, n = 256, k = 512;
  const auto a = from_vector<float, cuda>({m, k}, values_of<float>(m * k, 71, -1, 1));
  const auto b = from_vector<float, cuda>({k, n}, values_of<float>(k * n, 72, -1, 1));
  const auto exact = as_doubles(matmul(a, b));
  cuda_settings::allow_tf32 = true;
  const auto fast = as_doubles(matmul(a, b));
  double worst = 0;
  for (std::size_t i = 0; i < exact.size(); ++i) worst = std::max(worst, std::fabs(fast[i] - exact[i]));
  // |sum of 512 products of |x| < 1| ~ sqrt(512)/3; TF32 keeps ~3 decimal digits per input
  CHECK(worst < 0.05);
}

// --- streams and threads --------------------------------------------------------------------

TEST_CASE("work follows the current stream; threads with their own streams do not interfere") {
  using namespace trident;
  cudaStream_t s = nullptr;
  TRIDENT_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  {
    cuda_stream_guard guard(s);
    CHECK(cuda_current_stream() == s);
    auto x = from_vector<float, cuda>({1 << 16}, values_of<float>(1 << 16, 81));
    auto y = tensor<float, cuda>({1 << 16});
    map(ops::scale{2.0}, x, y);
    const auto m = matmul(y.reshape({256, 256}), x.reshape({256, 256}));
    cuda::synchronize();
    const auto vx = to_vector(x), vy = to_vector(y);
    for (std::size_t i = 0; i < vx.size(); ++i) REQUIRE(vy[i] == 2.0f * vx[i]);
    const auto dy = as_doubles(y), dx = as_doubles(x);
    const std::vector<double> zero(256 * 256, 0.0);
    check_gemm(as_doubles(m), reference_gemm(dy, 256, false, dx, 256, false, zero, 256, 256, 256, 1, 0, nullptr, activation::none),
               258 * std::ldexp(1.0, -24), 0, "gemm on a non-default stream");
  }
  CHECK(cuda_current_stream() == nullptr);
  cuda_release_stream(s);  // its cuBLASLt workspace
  TRIDENT_CUDA_CHECK(cudaStreamDestroy(s));

  // two threads, each on its own stream, GEMMs and reductions at once
  const auto a = from_vector<float, cuda>({128, 128}, values_of<float>(128 * 128, 82));
  const double want = sum(matmul(a, a));
  int device = cuda_current_device();
  std::vector<double> got(2, 0.0);
  std::vector<std::string> errors(2);
  auto work = [&](int t) {
    try {
      TRIDENT_CUDA_CHECK(cudaSetDevice(device));
      cudaStream_t st = nullptr;
      TRIDENT_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
      {
        cuda_stream_guard guard(st);
        double acc = 0;
        for (int r = 0; r < 20; ++r) acc = sum(matmul(a, a));
        got[static_cast<std::size_t>(t)] = acc;
      }
      cuda_release_stream(st);
      TRIDENT_CUDA_CHECK(cudaStreamDestroy(st));
    } catch (const std::exception& e) {
      errors[static_cast<std::size_t>(t)] = e.what();
    }
  };
  std::thread t0(work, 0), t1(work, 1);
  t0.join();
  t1.join();
  CHECK(errors[0] == "");
  CHECK(errors[1] == "");
  // a race on a shared workspace would give garbage, not rounding differences
  CHECK(std::fabs(got[0] - want) <= 1e-9 * (std::fabs(want) + 1));
  CHECK(std::fabs(got[1] - want) <= 1e-9 * (std::fabs(want) + 1));
}
