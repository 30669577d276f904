// Shapes, layouts and views: what each view operation does to extents, strides and data, and
// the messages of the shape errors.
#include <doctest/doctest.h>

#include <cstdint>
#include <numeric>

#include <trident/trident.hpp>

using namespace trident;

namespace {
tensor<float> iota(const shape& s) {
  auto t = tensor<float>(s);
  std::iota(t.data(), t.data() + t.numel(), 0.0f);
  return t;
}
}  // namespace

TEST_CASE("shape and layout basics") {
  const shape s{2, 3, 4};
  CHECK(s.rank() == 3);
  CHECK(s.numel() == 24);
  CHECK(s.str() == "(2, 3, 4)");
  CHECK(shape{}.numel() == 1);
  CHECK(shape{}.str() == "()");
  const layout l(s);
  CHECK(l.stride[0] == 12);
  CHECK(l.stride[1] == 4);
  CHECK(l.stride[2] == 1);
  CHECK(l.is_contiguous());
  CHECK(l.str() == "(2, 3, 4):(12, 4, 1)");
  CHECK_THROWS_AS((shape{1, 2, 3, 4, 5, 6}), shape_error);
  CHECK_THROWS_AS((shape{2, -1}), shape_error);
  CHECK(broadcast_shapes({3, 1, 5}, {4, 1}) == shape{3, 4, 5});
  CHECK_THROWS_WITH_AS(broadcast_shapes({3, 2}, {4, 3}), doctest::Contains("(3, 2) and (4, 3)"), shape_error);
}

TEST_CASE("tensors own aligned, zero-initialised memory and move") {
  auto t = tensor<float>({3, 5});
  CHECK(reinterpret_cast<std::uintptr_t>(t.data()) % 64 == 0);
  for (index_t i = 0; i < t.numel(); ++i) REQUIRE(t.data()[i] == 0.0f);
  auto h = tensor<half>({7});
  CHECK(reinterpret_cast<std::uintptr_t>(h.data()) % 64 == 0);
  float* p = t.data();
  tensor<float> u = std::move(t);
  CHECK(u.data() == p);
  CHECK(t.data() == nullptr);  // NOLINT(bugprone-use-after-move): moved-from is empty
  CHECK(t.numel() == 0);
  auto e = tensor<float>({0, 4});
  CHECK(e.empty());
  CHECK(sum(e) == 0.0);
}

TEST_CASE("views: slice, select, reshape, transpose, permute, unsqueeze, broadcast") {
  auto t = iota({2, 3, 4});  // value = 12 i + 4 j + k
  CHECK(t(1, 2, 3) == 23.0f);
  CHECK(t.at(1, 0, 2) == 14.0f);

  const auto s = t.slice(2, 1, 4, 2);  // k = 1, 3
  CHECK(s.shape() == shape{2, 3, 2});
  CHECK(s.stride(2) == 2);
  CHECK(s(1, 1, 1) == 12 + 4 + 3);
  CHECK(!s.is_contiguous());
  const auto neg = t.slice(-1, -2, 4);  // k = 2, 3
  CHECK(neg(0, 0, 0) == 2.0f);

  const auto row = t.select(1, 2);  // j = 2
  CHECK(row.shape() == shape{2, 4});
  CHECK(row(1, 3) == 12 + 8 + 3);

  const auto r = t.reshape({4, -1});
  CHECK(r.shape() == shape{4, 6});
  CHECK(r(3, 5) == 23.0f);

  const auto tr = t.transpose(0, 2);
  CHECK(tr.shape() == shape{4, 3, 2});
  CHECK(tr(3, 1, 1) == 12 + 4 + 3);
  CHECK(!tr.is_contiguous());

  const auto pm = t.permute({1, 2, 0});
  CHECK(pm.shape() == shape{3, 4, 2});
  CHECK(pm(2, 1, 1) == 12 + 8 + 1);

  const auto un = t.unsqueeze(1);
  CHECK(un.shape() == shape{2, 1, 3, 4});
  CHECK(un(1, 0, 2, 3) == 23.0f);
  CHECK(un.squeeze(1).shape() == shape{2, 3, 4});

  const auto b = t.select(0, 1).select(0, 0).broadcast_to({5, 4});  // row (1, 0, :) repeated
  CHECK(b.stride(0) == 0);
  CHECK(b(4, 2) == 14.0f);

  // writes through a view land in the tensor
  t.slice(0, 1, 2).select(0, 0)(0, 0) = -1.0f;
  CHECK(t(1, 0, 0) == -1.0f);
  // views convert to read-only views
  tensor_view<const float> cv = t.view();
  CHECK(cv.data() == t.data());
}

TEST_CASE("view errors name the shapes involved") {
  auto t = iota({2, 3, 4});
  CHECK_THROWS_WITH_AS(t.reshape({5, 5}), doctest::Contains("(2, 3, 4)"), shape_error);
  CHECK_THROWS_WITH_AS(t.reshape({5, 5}), doctest::Contains("(5, 5)"), shape_error);
  CHECK_THROWS_WITH_AS(t.reshape({-1, 5}), doctest::Contains("(2, 3, 4)"), shape_error);
  CHECK_THROWS_WITH_AS(t.transpose(0, 2).reshape({24}), doctest::Contains("not contiguous"), shape_error);
  CHECK_THROWS_WITH_AS(t.slice(1, 2, 5), doctest::Contains("(2, 3, 4)"), shape_error);
  CHECK_THROWS_WITH_AS(t.select(0, 2), doctest::Contains("(2, 3, 4)"), shape_error);
  CHECK_THROWS_WITH_AS(t.transpose(0, 3), doctest::Contains("axis 3"), shape_error);
  CHECK_THROWS_WITH_AS(t.permute({0, 0, 1}), doctest::Contains("repeated"), shape_error);
  CHECK_THROWS_WITH_AS(t.squeeze(1), doctest::Contains("(2, 3, 4)"), shape_error);
  CHECK_THROWS_WITH_AS(t.at(0, 3, 0), doctest::Contains("(2, 3, 4)"), shape_error);
  CHECK_THROWS_WITH_AS(t.broadcast_to({2, 5, 4}), doctest::Contains("(2, 5, 4)"), shape_error);
  CHECK_THROWS_WITH_AS(from_vector<float>({2, 2}, {1, 2, 3}), doctest::Contains("(2, 2)"), shape_error);
}

TEST_CASE("a tensor can hold every element type and the policies' storage types") {
  auto b = tensor<bfloat16>({4});
  fill(b, 1.25);
  CHECK(float(b(3)) == 1.25f);
  auto d = tensor<double>({2, 2});
  fill(d.slice(0, 0, 1), 0.1);
  CHECK(d(0, 1) == 0.1);
  CHECK(d(1, 1) == 0.0);
  using P = policy<bf16_mixed, cpu>;
  static_assert(std::is_same_v<P::storage_type, bfloat16>);
  tensor<P::storage_type, P::device> w({8});
  CHECK(w.bytes() == 16);
}
