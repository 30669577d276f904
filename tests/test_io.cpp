// Data loading: the IDX reader (plain and gzip, and every way a file can be wrong), the
// Fashion-MNIST dataset on the real files against the published statistics, and the batch
// loader (sizes, deterministic shuffles, sharding across ranks, conversion while gathering).
#include <doctest/doctest.h>
#include <unistd.h>
#include <zlib.h>

#include <trident/io.hpp>
#include <trident/trident.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

using namespace trident;
namespace fs = std::filesystem;

namespace {

using bytes = std::vector<std::uint8_t>;

/// A fresh directory under the system's temporary directory, removed with everything in it.
struct temp_dir {
  fs::path path;
  temp_dir() {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() / ("trident_io_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& name) const { return path / name; }
};

/// An IDX file's bytes: big-endian magic, dimensions, then `payload` as it is.
bytes idx_file(std::uint32_t magic, const std::vector<std::uint32_t>& dims, const bytes& payload) {
  bytes out;
  auto be32 = [&](std::uint32_t v) {
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<std::uint8_t>(v >> s));
  };
  be32(magic);
  for (auto d : dims) be32(d);
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

void write_plain(const fs::path& p, const bytes& b) {
  std::ofstream f(p, std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  REQUIRE(f.good());
}

void write_gz(const fs::path& p, const bytes& b) {
  gzFile g = gzopen(p.c_str(), "wb");
  REQUIRE(g != nullptr);
  if (!b.empty()) REQUIRE(gzwrite(g, b.data(), static_cast<unsigned>(b.size())) == static_cast<int>(b.size()));
  REQUIRE(gzclose(g) == Z_OK);
}

bytes read_all(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return bytes(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

/// n bytes of a fixed pseudo-random sequence (poorly compressible, so gzip streams are long).
bytes noise(std::size_t n, std::uint32_t seed = 1) {
  bytes out(n);
  for (auto& b : out) {
    seed = seed * 1664525u + 1013904223u;
    b = static_cast<std::uint8_t>(seed >> 24);
  }
  return out;
}

/// The message of the io_error that f throws (a test failure when it throws none).
template <class F>
std::string io_error_of(F&& f) {
  try {
    f();
  } catch (const io::io_error& e) {
    return e.what();
  }
  FAIL("no io_error was thrown");
  return {};
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

/// Sets an environment variable for a scope, restoring the old value after.
struct scoped_env {
  std::string name;
  std::optional<std::string> old;
  scoped_env(const std::string& n, const std::string& value) : name(n) {
    if (const char* v = std::getenv(n.c_str())) old = v;
    ::setenv(n.c_str(), value.c_str(), 1);
  }
  ~scoped_env() {
    if (old) {
      ::setenv(name.c_str(), old->c_str(), 1);
    } else {
      ::unsetenv(name.c_str());
    }
  }
};

// The real files are read once for the whole run (~0.4 s for both splits).
const io::fashion_mnist& real_train() {
  static const io::fashion_mnist d(io::split::train);
  return d;
}
const io::fashion_mnist& real_test() {
  static const io::fashion_mnist d(io::split::test);
  return d;
}

/// Mean and population standard deviation of a float array, in double.
std::pair<double, double> moments(const float* x, std::size_t n) {
  double s = 0;
  for (std::size_t i = 0; i < n; ++i) s += x[i];
  const double m = s / static_cast<double>(n);
  double v = 0;
  for (std::size_t i = 0; i < n; ++i) v += (x[i] - m) * (x[i] - m);
  return {m, std::sqrt(v / static_cast<double>(n))};
}

}  // namespace

// --- IDX reader ------------------------------------------------------------------------------

TEST_CASE("read_idx: plain and gzip files give the same dimensions and bytes") {
  temp_dir dir;
  const bytes payload = noise(2 * 3 * 4);
  const bytes file = idx_file(0x00000803, {2, 3, 4}, payload);
  write_plain(dir / "a-idx3-ubyte", file);
  write_gz(dir / "a-idx3-ubyte.gz", file);
  write_gz(dir / "named-plain", file);  // detected by its bytes, not its name
  for (const char* name : {"a-idx3-ubyte", "a-idx3-ubyte.gz", "named-plain"}) {
    CAPTURE(name);
    const io::idx_data d = io::read_idx_images(dir / name);
    CHECK(d.dims == std::vector<std::uint32_t>{2, 3, 4});
    CHECK(d.count() == 24);
    CHECK(d.values == payload);
    CHECK(d.dims_str() == "(2, 3, 4)");
  }
  write_gz(dir / "labels.gz", idx_file(0x00000801, {3}, {7, 8, 9}));
  CHECK(io::read_idx_labels(dir / "labels.gz").values == bytes{7, 8, 9});
  write_plain(dir / "none", idx_file(0x00000801, {0}, {}));  // an empty array is valid
  CHECK(io::read_idx_labels(dir / "none").values.empty());
}

TEST_CASE("read_idx: a missing file, a directory and an empty file name the problem") {
  temp_dir dir;
  const auto missing = dir / "no-such-file.gz";
  std::string m = io_error_of([&] { io::read_idx_images(missing); });
  CHECK(contains(m, missing.string()));
  CHECK(contains(m, "cannot open: No such file or directory"));

  m = io_error_of([&] { io::read_idx_images(dir.path); });
  CHECK(contains(m, "is a directory"));

  write_plain(dir / "empty", {});
  m = io_error_of([&] { io::read_idx_images(dir / "empty"); });
  CHECK(contains(m, (dir / "empty").string()));
  CHECK(contains(m, "the file is empty"));

  write_gz(dir / "empty.gz", {});
  m = io_error_of([&] { io::read_idx_images(dir / "empty.gz"); });
  CHECK(contains(m, "no data in the gzip stream"));
}

TEST_CASE("read_idx: truncated files, plain and gzip, say how much data was expected and found") {
  temp_dir dir;
  const bytes file = idx_file(0x00000803, {10, 20, 30}, noise(6000));

  write_plain(dir / "short", bytes(file.begin(), file.end() - 100));
  std::string m = io_error_of([&] { io::read_idx_images(dir / "short"); });
  CHECK(contains(m, "truncated: expected 6000 bytes of data for dimensions (10, 20, 30), got 5900"));

  write_plain(dir / "short-header", bytes(file.begin(), file.begin() + 9));
  m = io_error_of([&] { io::read_idx_images(dir / "short-header"); });
  CHECK(contains(m, "truncated header: expected 12 bytes of dimensions, got 5"));

  write_gz(dir / "full.gz", file);
  const bytes gz = read_all(dir / "full.gz");
  REQUIRE(gz.size() > 1000);
  write_plain(dir / "cut.gz", bytes(gz.begin(), gz.begin() + static_cast<std::ptrdiff_t>(gz.size() / 2)));
  m = io_error_of([&] { io::read_idx_images(dir / "cut.gz"); });
  CHECK(contains(m, (dir / "cut.gz").string()));
  CHECK(contains(m, "truncated: expected 6000 bytes of data"));
  CHECK(contains(m, "the gzip stream is cut short: zlib: unexpected end of file"));

  // All the data but not the gzip trailer (CRC and length): still incomplete.
  write_plain(dir / "no-trailer.gz", bytes(gz.begin(), gz.end() - 8));
  m = io_error_of([&] { io::read_idx_images(dir / "no-trailer.gz"); });
  CHECK(contains(m, "gzip trailer is missing"));
}

TEST_CASE("read_idx: every truncation of a plain or gzip file is an io_error") {
  temp_dir dir;
  const bytes file = idx_file(0x00000803, {2, 5, 7}, noise(70, 3));
  write_gz(dir / "full.gz", file);
  const bytes gz = read_all(dir / "full.gz");
  for (const bytes* whole : {&file, &gz}) {
    for (std::size_t len = 0; len < whole->size(); ++len) {
      CAPTURE(len);
      write_plain(dir / "cut", bytes(whole->begin(), whole->begin() + static_cast<std::ptrdiff_t>(len)));
      CHECK_THROWS_AS(io::read_idx_images(dir / "cut"), io::io_error);
    }
  }
}

TEST_CASE("read_idx: wrong magic, data type or rank: the magic found and the one expected") {
  temp_dir dir;
  write_plain(dir / "labels", idx_file(0x00000801, {3}, {1, 2, 3}));
  std::string m = io_error_of([&] { io::read_idx_images(dir / "labels"); });
  CHECK(contains(m, "wrong rank 1, expected 3: magic number 0x00000801 found, 0x00000803 expected"));

  write_gz(dir / "floats.gz", idx_file(0x00000D03, {1, 1, 1}, {0, 0, 0, 0}));
  m = io_error_of([&] { io::read_idx_images(dir / "floats.gz"); });
  CHECK(contains(m, "wrong data type 0x0d (float32), expected 0x08 (unsigned byte)"));
  CHECK(contains(m, "magic number 0x00000d03 found, 0x00000803 expected"));

  const std::string text = "this is not an IDX file at all";
  write_plain(dir / "text", bytes(text.begin(), text.end()));
  m = io_error_of([&] { io::read_idx_labels(dir / "text"); });
  CHECK(contains(m, "not an IDX file: magic number 0x74686973 found, 0x00000801 expected"));
}

TEST_CASE("read_idx: bytes after the data are an error, plain or inside the gzip stream") {
  temp_dir dir;
  bytes file = idx_file(0x00000801, {4}, {1, 2, 3, 4});
  file.insert(file.end(), {'x', 'y', 'z'});
  write_plain(dir / "extra", file);
  write_gz(dir / "extra.gz", file);
  for (const char* name : {"extra", "extra.gz"}) {
    CAPTURE(name);
    const std::string m = io_error_of([&] { io::read_idx_labels(dir / name); });
    CHECK(contains(m, "3 trailing bytes after the data (4 bytes for dimensions (4))"));
  }
}

TEST_CASE("read_idx: corrupt gzip data reports zlib's message") {
  temp_dir dir;
  write_gz(dir / "good.gz", idx_file(0x00000803, {8, 20, 20}, noise(3200, 7)));
  const bytes gz = read_all(dir / "good.gz");
  REQUIRE(gz.size() > 2000);

  bytes bad = gz;  // damage the deflate payload in the middle
  for (std::size_t i = bad.size() / 2; i < bad.size() / 2 + 16; ++i) bad[i] ^= 0xA5;
  write_plain(dir / "payload.gz", bad);
  std::string m = io_error_of([&] { io::read_idx_images(dir / "payload.gz"); });
  CHECK(contains(m, (dir / "payload.gz").string()));
  CHECK(contains(m, "corrupt gzip data (zlib: "));

  bad = gz;  // intact data, wrong CRC-32 in the trailer
  bad[bad.size() - 6] ^= 0x01;
  write_plain(dir / "crc.gz", bad);
  m = io_error_of([&] { io::read_idx_images(dir / "crc.gz"); });
  CHECK(contains(m, "corrupt gzip data (zlib: incorrect data check)"));

  const bytes fake = {0x1f, 0x8b, 0x00, 'j', 'u', 'n', 'k', 0, 0, 0, 0, 0, 0, 0};  // gzip magic, no gzip behind it
  write_plain(dir / "fake.gz", fake);
  m = io_error_of([&] { io::read_idx_images(dir / "fake.gz"); });
  CHECK(contains(m, "corrupt gzip data (zlib: unknown compression method)"));
}

// --- Fashion-MNIST on the real files ---------------------------------------------------------

TEST_CASE("fashion_mnist: the real files: 60000 + 10000 images of 28x28, 6000/1000 per class") {
  const auto& train = real_train();
  const auto& test = real_test();
  CHECK(train.which() == io::split::train);
  CHECK(train.size() == 60000);
  CHECK(test.size() == 10000);
  CHECK(train.images().shape() == shape{60000, 1, 28, 28});
  CHECK(test.images().shape() == shape{10000, 1, 28, 28});
  for (const auto* d : {&train, &test}) {
    std::map<int, int> per_class;
    for (std::int32_t l : d->labels()) {
      REQUIRE(l >= 0);
      REQUIRE(l <= 9);
      ++per_class[l];
    }
    CHECK(per_class.size() == 10);
    for (const auto& entry : per_class) {
      const int label = entry.first;
      CAPTURE(label);
      CHECK(entry.second == d->size() / 10);
    }
    const auto* x = d->images().data();
    const auto [lo, hi] = std::minmax_element(x, x + d->images().numel());
    CHECK(*lo == 0.0f);
    CHECK(*hi == 1.0f);
  }
  CHECK(io::fashion_mnist::class_names[0] == "T-shirt/top");
  CHECK(io::fashion_mnist::class_names[9] == "Ankle boot");
}

TEST_CASE("fashion_mnist: the pixels are the file's bytes / 255 and the statistics are the published ones") {
  const auto& train = real_train();
  // Independent reference: the published Fashion-MNIST training-set mean and std (0.2860, 0.3530).
  CHECK(std::abs(train.stats().mean - 0.2860) < 5e-4);
  CHECK(std::abs(train.stats().std - 0.3530) < 5e-4);
  // The exact statistics (integer sums of the bytes) agree with the moments of the float pixels,
  // up to the rounding of b / 255 to float (at most 2^-25 per pixel).
  const auto [m, s] = moments(train.images().data(), static_cast<std::size_t>(train.images().numel()));
  CHECK(std::abs(m - train.stats().mean) < 3e-8);
  CHECK(std::abs(s - train.stats().std) < 6e-8);

  // Every test pixel against the bytes read straight from the file.
  const auto& test = real_test();
  const auto raw = io::read_idx_images(test.directory() / "t10k-images-idx3-ubyte.gz");
  REQUIRE(raw.values.size() == static_cast<std::size_t>(test.images().numel()));
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < raw.values.size(); ++i) wrong += test.images().data()[i] != static_cast<float>(raw.values[i]) / 255.0f;
  CHECK(wrong == 0);
}

TEST_CASE("fashion_mnist: the test split normalised with the training statistics; batches of the real data") {
  const auto& train = real_train();
  const io::pixel_stats s = train.stats();
  io::fashion_mnist test(io::split::test);  // a fresh copy to normalise (10000 images)
  test.normalize(s);
  REQUIRE(test.normalization().has_value());
  CHECK(test.normalization()->mean == s.mean);
  CHECK(test.normalization()->std == s.std);
  const auto [tm, tsd] = moments(test.images().data(), static_cast<std::size_t>(test.images().numel()));
  CHECK(std::abs(tm - (test.stats().mean - s.mean) / s.std) < 1e-6);
  CHECK(std::abs(tsd - test.stats().std / s.std) < 1e-6);
  CHECK(test.images()(0, 0, 0, 0) == doctest::Approx((0.0 - s.mean) / s.std).epsilon(1e-6));
  CHECK_THROWS_AS(test.normalize(s), trident::error);  // once only

  // Batches of the real data carry the dataset's labels and pixels, in bf16.
  io::batch_loader<bfloat16> loader(train.images(), train.labels(), {.batch_size = 256, .seed = 3});
  CHECK(loader.batches_per_epoch() == 235);
  const auto& b = loader.load(17);
  REQUIRE(b.size() == 256);
  for (index_t j = 0; j < b.size(); j += 51) {
    const index_t i = b.indices[static_cast<std::size_t>(j)];
    CHECK(b.labels[static_cast<std::size_t>(j)] == train.labels()[static_cast<std::size_t>(i)]);
    CHECK(b.inputs(j, 0, 14, 14).bits == bfloat16(train.images()(i, 0, 14, 14)).bits);
  }
}

// --- Fashion-MNIST layer on files this test writes -------------------------------------------

namespace {

/// Writes a tiny Fashion-MNIST-shaped split into dir: n images (pixel = (i + k) % 256) and labels.
void write_split(const fs::path& dir, const std::string& prefix, std::uint32_t n, const bytes& labels, bool gz = true,
                 std::uint32_t rows = 28) {
  bytes pixels(static_cast<std::size_t>(n) * rows * 28);
  for (std::size_t k = 0; k < pixels.size(); ++k) pixels[k] = static_cast<std::uint8_t>(k % 256);
  const auto img = idx_file(0x00000803, {n, rows, 28}, pixels);
  const auto lab = idx_file(0x00000801, {static_cast<std::uint32_t>(labels.size())}, labels);
  if (gz) {
    write_gz(dir / (prefix + "-images-idx3-ubyte.gz"), img);
    write_gz(dir / (prefix + "-labels-idx1-ubyte.gz"), lab);
  } else {
    write_plain(dir / (prefix + "-images-idx3-ubyte"), img);
    write_plain(dir / (prefix + "-labels-idx1-ubyte"), lab);
  }
}

}  // namespace

TEST_CASE("fashion_mnist: the directory comes from the argument, else the environment, else the default") {
  temp_dir dir;
  write_split(dir.path, "train", 5, {0, 1, 2, 9, 4});
  write_split(dir.path, "t10k", 3, {5, 6, 7}, /*gz=*/false);  // plain files are found too

  const io::fashion_mnist train(io::split::train, dir.path);
  CHECK(train.size() == 5);
  CHECK(train.directory() == dir.path);
  CHECK(std::vector<std::int32_t>(train.labels().begin(), train.labels().end()) == std::vector<std::int32_t>{0, 1, 2, 9, 4});
  CHECK(train.images()(1, 0, 0, 3) == static_cast<float>((784 + 3) % 256) / 255.0f);

  {
    scoped_env env(io::fashion_mnist::directory_variable, dir.path.string());
    CHECK(io::fashion_mnist::resolve_directory() == dir.path);
    CHECK(io::fashion_mnist::resolve_directory("/elsewhere") == fs::path("/elsewhere"));  // the argument wins
    const io::fashion_mnist test(io::split::test);
    CHECK(test.size() == 3);
    CHECK(test.labels()[2] == 7);
  }
  {
    scoped_env env(io::fashion_mnist::directory_variable, "");
    CHECK(io::fashion_mnist::resolve_directory() == fs::path("/usr/share/datasets/fashion-mnist/"));
  }
}

TEST_CASE("fashion_mnist: load_fashion_mnist normalises both splits with the training statistics") {
  temp_dir dir;
  write_split(dir.path, "train", 6, {0, 1, 2, 3, 4, 5});
  write_split(dir.path, "t10k", 2, {6, 7});
  auto [train, test] = io::load_fashion_mnist(true, dir.path);
  const io::pixel_stats s = train.stats();
  // The pixels are k % 256 over 6 * 784 = 4704 bytes: the statistics by direct summation in double.
  double s1 = 0, s2 = 0;
  for (int k = 0; k < 4704; ++k) {
    const double v = (k % 256) / 255.0;
    s1 += v;
    s2 += v * v;
  }
  const double mean = s1 / 4704, sd = std::sqrt(s2 / 4704 - mean * mean);
  CHECK(s.mean == doctest::Approx(mean).epsilon(1e-12));
  CHECK(s.std == doctest::Approx(sd).epsilon(1e-12));
  REQUIRE(test.normalization().has_value());
  CHECK(test.normalization()->mean == s.mean);  // the train statistics, not the test split's own
  CHECK(test.normalization()->std == s.std);
  const auto [m, msd] = moments(train.images().data(), static_cast<std::size_t>(train.images().numel()));
  CHECK(std::abs(m) < 1e-6);
  CHECK(std::abs(msd - 1) < 1e-6);
  CHECK(test.images()(1, 0, 2, 5) == doctest::Approx(((784 + 2 * 28 + 5) % 256 / 255.0 - s.mean) / s.std).epsilon(1e-6));

  auto raw = io::load_fashion_mnist(false, dir.path);
  CHECK_FALSE(raw.train.normalization().has_value());
  CHECK(raw.train.images()(0, 0, 0, 255) == 1.0f);
}

TEST_CASE("fashion_mnist: disagreeing files, bad labels, wrong image size and missing files are io_errors") {
  temp_dir dir;
  write_split(dir.path, "train", 5, {0, 1, 2, 3});  // 5 images, 4 labels
  std::string m = io_error_of([&] { io::fashion_mnist(io::split::train, dir.path); });
  CHECK(contains(m, "holds 5 images but the labels file"));
  CHECK(contains(m, "holds 4 labels"));
  CHECK(contains(m, "train-images-idx3-ubyte.gz"));

  write_split(dir.path, "train", 5, {0, 1, 10, 3, 4});
  m = io_error_of([&] { io::fashion_mnist(io::split::train, dir.path); });
  CHECK(contains(m, "train-labels-idx1-ubyte.gz: label 10 of sample 2 is outside 0..9"));

  write_split(dir.path, "train", 2, {0, 1}, true, 27);
  m = io_error_of([&] { io::fashion_mnist(io::split::train, dir.path); });
  CHECK(contains(m, "images of 27x28 pixels, expected 28x28"));

  m = io_error_of([&] { io::fashion_mnist(io::split::test, dir.path); });
  CHECK(contains(m, "t10k-images-idx3-ubyte.gz: cannot open: No such file or directory"));
  CHECK(contains(m, "TRIDENT_FASHION_MNIST_DIR"));

  write_split(dir.path, "train", 2, {0, 1});
  io::fashion_mnist ok(io::split::train, dir.path);
  CHECK_THROWS_AS(ok.normalize({0.5, 0.0}), trident::error);
}

// --- batches ---------------------------------------------------------------------------------

namespace {

/// A dataset of n samples of 3 floats: sample i is (10 i, 10 i + 1, 10 i + 2), label i % 7.
struct toy {
  tensor<float> x;
  std::vector<std::int32_t> y;
  explicit toy(index_t n) : x(tensor<float>::uninitialized({n, 3})), y(static_cast<std::size_t>(n)) {
    for (index_t i = 0; i < n; ++i) {
      for (index_t k = 0; k < 3; ++k) x(i, k) = static_cast<float>(10 * i + k);
      y[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i % 7);
    }
  }
};

std::vector<index_t> indices_of(const io::batch<float>& b) { return {b.indices.begin(), b.indices.end()}; }

/// Checks that a batch's inputs and labels are those of the samples it names.
template <class T>
void check_contents(const io::batch<T>& b, const toy& t) {
  for (index_t j = 0; j < b.size(); ++j) {
    const index_t i = b.indices[static_cast<std::size_t>(j)];
    CHECK(b.labels[static_cast<std::size_t>(j)] == t.y[static_cast<std::size_t>(i)]);
    for (index_t k = 0; k < 3; ++k) CHECK(static_cast<float>(b.inputs(j, k)) == static_cast<float>(10 * i + k));
  }
}

}  // namespace

TEST_CASE("batches: sizes, the last partial batch and drop_last") {
  toy t(10);
  io::batch_loader<float> keep(t.x, t.y, {.batch_size = 4, .shuffle = false});
  CHECK(keep.batches_per_epoch() == 3);
  CHECK(keep.samples_per_epoch() == 10);
  std::vector<index_t> sizes;
  std::vector<index_t> seen;
  for (const auto& b : keep.epoch(0)) {
    sizes.push_back(b.size());
    CHECK(b.inputs.shape() == shape{b.size(), 3});
    check_contents(b, t);
    for (auto i : b.indices) seen.push_back(i);
  }
  CHECK(sizes == std::vector<index_t>{4, 4, 2});
  CHECK(seen == std::vector<index_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9});  // no shuffle: dataset order

  io::batch_loader<float> drop(t.x, t.y, {.batch_size = 4, .shuffle = false, .drop_last = true});
  CHECK(drop.batches_per_epoch() == 2);
  CHECK(drop.skipped_per_epoch() == 2);
  sizes.clear();
  for (const auto& b : drop.epoch(0)) sizes.push_back(b.size());
  CHECK(sizes == std::vector<index_t>{4, 4});

  io::batch_loader<float> big(t.x, t.y, {.batch_size = 64});  // one batch of everything
  CHECK(big.batches_per_epoch() == 1);
  CHECK(big.load(0).size() == 10);
  CHECK_THROWS_AS(big.load(1), trident::error);

  // Resuming mid-epoch gives the same batches as the full pass.
  io::batch_loader<float> a(t.x, t.y, {.batch_size = 3, .seed = 5});
  std::vector<std::vector<index_t>> full, resumed;
  for (const auto& b : a.epoch(2)) full.push_back(indices_of(b));
  for (const auto& b : a.epoch(2, 2)) resumed.push_back(indices_of(b));
  REQUIRE(full.size() == 4);
  CHECK(resumed == std::vector<std::vector<index_t>>(full.begin() + 2, full.end()));
}

TEST_CASE("batches: every sample exactly once per epoch, with its own inputs and label") {
  toy t(1000);
  io::batch_loader<float> loader(t.x, t.y, {.batch_size = 64, .seed = 11});
  CHECK(loader.batches_per_epoch() == 16);
  for (std::uint64_t e = 0; e < 3; ++e) {
    std::vector<int> count(1000, 0);
    index_t batches = 0;
    for (const auto& b : loader.epoch(e)) {
      CHECK(b.epoch == e);
      CHECK(b.index == batches++);
      check_contents(b, t);
      for (auto i : b.indices) ++count[static_cast<std::size_t>(i)];
    }
    CHECK(batches == 16);
    CHECK(std::count(count.begin(), count.end(), 1) == 1000);
  }
}

TEST_CASE("batches: shuffles are deterministic per (seed, epoch) and differ between epochs and seeds") {
  toy t(200);
  io::batch_loader<float> a(t.x, t.y, {.batch_size = 16, .seed = 42});
  io::batch_loader<float> b(t.x, t.y, {.batch_size = 16, .seed = 42});
  io::batch_loader<float> c(t.x, t.y, {.batch_size = 16, .seed = 43});
  auto order = [](io::batch_loader<float>& l, std::uint64_t e) {
    l.set_epoch(e);
    return std::vector<index_t>(l.order().begin(), l.order().end());
  };
  const auto a0 = order(a, 0), a1 = order(a, 1);
  CHECK(a0 == order(b, 0));
  CHECK(a1 == order(b, 1));
  CHECK(a0 != a1);
  CHECK(a0 != order(c, 0));
  CHECK(order(a, 0) == a0);  // going back to an epoch gives its order again
  std::vector<index_t> identity(200);
  for (index_t i = 0; i < 200; ++i) identity[static_cast<std::size_t>(i)] = i;
  CHECK(a0 != identity);
  auto sorted = a0;
  std::sort(sorted.begin(), sorted.end());
  CHECK(sorted == identity);

  // Pinned (a regression value from this implementation): the stream behind the shuffle must
  // not change, or resumed runs and other ranks' builds would see other orders.
  std::vector<index_t> small(10);
  io::shuffled_order(small, 1, 0);
  CHECK(small == std::vector<index_t>{7, 2, 5, 4, 1, 6, 9, 3, 0, 8});
}

TEST_CASE("batches: the shuffle is uniform over permutations (Fisher-Yates, unbiased draws)") {
  // 24 permutations of 4 elements, 24000 epochs: each about 1000 times (sd ~31).
  std::map<std::vector<index_t>, int> seen;
  std::vector<index_t> o(4);
  for (std::uint64_t e = 0; e < 24000; ++e) {
    io::shuffled_order(o, 99, e);
    ++seen[o];
  }
  CHECK(seen.size() == 24);
  for (const auto& [perm, n] : seen) {
    CHECK(n > 850);
    CHECK(n < 1150);
  }
}

TEST_CASE("batches: the buffers are allocated once, 64-byte aligned, and reused") {
  toy t(100);
  io::batch_loader<float> loader(t.x, t.y, {.batch_size = 8, .seed = 1});
  const float* first = loader.load(0).inputs.data();
  const std::int32_t* labels = loader.current().labels.data();
  CHECK(reinterpret_cast<std::uintptr_t>(first) % 64 == 0);
  CHECK(reinterpret_cast<std::uintptr_t>(labels) % 64 == 0);
  for (std::uint64_t e = 0; e < 2; ++e) {
    for (const auto& b : loader.epoch(e)) {
      CHECK(b.inputs.data() == first);
      CHECK(b.labels.data() == labels);
      CHECK(b.inputs.is_contiguous());
    }
  }
}

TEST_CASE("batches: sharding over 1, 2 and 4 ranks splits every global batch disjointly") {
  toy t(103);  // 12 full global batches of 8 and a short one of 7
  for (int world : {1, 2, 4}) {
    CAPTURE(world);
    io::batch_options opt{.batch_size = 8, .seed = 9};
    io::batch_loader<float> global(t.x, t.y, opt);  // the single-process view
    std::vector<io::batch_loader<float>> ranks;
    for (int r = 0; r < world; ++r) {
      opt.rank = r;
      opt.world_size = world;
      ranks.emplace_back(t.x, t.y, opt);
    }
    const index_t nb = ranks[0].batches_per_epoch();
    CHECK(nb == 13);  // the short batch of 7 still gives every rank floor(7 / world) >= 1 samples
    CHECK(ranks[0].samples_per_epoch() * world + ranks[0].skipped_per_epoch() == 103);
    CHECK(ranks[0].skipped_per_epoch() == 7 % world);
    for (std::uint64_t e = 0; e < 2; ++e) {
      std::set<index_t> epoch_union;
      for (auto& l : ranks) l.set_epoch(e);
      global.set_epoch(e);
      for (index_t i = 0; i < nb; ++i) {
        const auto g = indices_of(global.load(i));
        std::vector<index_t> joined;
        for (auto& l : ranks) {
          const auto& b = l.load(i);
          CHECK(b.size() == ranks[0].current().size());  // equal shares
          CHECK(b.global_size == b.size() * world);
          check_contents(b, t);
          for (auto s : b.indices) joined.push_back(s);
        }
        // In rank order the shares are the global batch (its first global_size samples).
        REQUIRE(joined.size() <= g.size());
        CHECK(joined == std::vector<index_t>(g.begin(), g.begin() + static_cast<std::ptrdiff_t>(joined.size())));
        CHECK(g.size() - joined.size() == (i + 1 < nb ? 0u : static_cast<std::size_t>(7 % world)));
        for (auto s : joined) CHECK(epoch_union.insert(s).second);  // disjoint within the epoch
      }
      CHECK(static_cast<index_t>(epoch_union.size()) == 103 - 7 % world);
    }
  }

  // A short last batch smaller than the world is skipped by every rank alike.
  toy small(10);
  io::batch_loader<float> r3(small.x, small.y, {.batch_size = 8, .rank = 3, .world_size = 4});
  CHECK(r3.batches_per_epoch() == 1);
  CHECK(r3.skipped_per_epoch() == 2);
  CHECK(r3.load(0).size() == 2);
}

TEST_CASE("batches: conversion to bf16 and half while gathering, from any float type") {
  const index_t n = 37, width = 50;
  auto x = tensor<float>::uninitialized({n, width});
  generator gen(5);
  normal(x, gen, 0.0, 3.0);
  std::vector<std::int32_t> y(static_cast<std::size_t>(n), 1);

  io::batch_loader<bfloat16> bf(x, y, {.batch_size = 16, .seed = 2});
  io::batch_loader<half> hf(x, y, {.batch_size = 16, .seed = 2});
  std::size_t wrong = 0, checked = 0;
  for (index_t i = 0; i < bf.batches_per_epoch(); ++i) {
    const auto& b = bf.load(i);
    const auto& h = hf.load(i);
    for (index_t j = 0; j < b.size(); ++j) {
      const index_t s = b.indices[static_cast<std::size_t>(j)];
      for (index_t k = 0; k < width; ++k, ++checked) {
        wrong += b.inputs(j, k).bits != bfloat16(x(s, k)).bits;  // the scalar reference conversion
        wrong += h.inputs(j, k).bits != half(x(s, k)).bits;
      }
    }
  }
  CHECK(checked == static_cast<std::size_t>(n * width));
  CHECK(wrong == 0);

  // double -> float and a strided first dimension (every other sample).
  auto xd = cast<double>(x);
  const auto odd = xd.view().slice(0, 1, n, 2);  // (18, 50)
  std::vector<std::int32_t> yo(static_cast<std::size_t>(odd.size(0)), 0);
  io::batch_loader<float, double> fd(odd, yo, {.batch_size = 18, .shuffle = false});
  const auto& b = fd.load(0);
  REQUIRE(b.size() == 18);
  CHECK(b.inputs(5, 7) == static_cast<float>(xd(11, 7)));
}

TEST_CASE("batches: invalid options and inputs are refused with a message") {
  toy t(10);
  auto msg = [&](const io::batch_options& o) -> std::string {
    try {
      io::batch_loader<float> l(t.x, t.y, o);
    } catch (const trident::error& e) {
      return e.what();
    }
    return "";
  };
  CHECK(contains(msg({.batch_size = 6, .world_size = 4}), "batch_size 6 must be a positive multiple of world_size 4"));
  CHECK(contains(msg({.batch_size = 0}), "batch_size 0"));
  CHECK(contains(msg({.batch_size = 8, .rank = 4, .world_size = 4}), "rank 4 is outside 0..3"));
  CHECK(contains(msg({.batch_size = 8, .world_size = 0}), "world_size 0"));

  std::vector<std::int32_t> nine(9, 0);
  CHECK_THROWS_AS(io::batch_loader<float>(t.x, nine), shape_error);
  const auto cols = t.x.view().t();  // (3, 10): samples not contiguous
  std::vector<std::int32_t> three(3, 0);
  CHECK_THROWS_AS(io::batch_loader<float>(cols, three), shape_error);
}
