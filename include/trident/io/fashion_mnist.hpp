#pragma once
/// @file io/fashion_mnist.hpp
/// Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017): 70000 grey 28x28 images of 10 kinds of
/// clothing, 60000 for training and 10000 for testing, read from the four IDX files that
/// Debian's `dataset-fashion-mnist` installs in /usr/share/datasets/fashion-mnist/.
///
///   auto [train, test] = io::load_fashion_mnist();  // both normalised with the train statistics
///   train.images()   // (60000, 1, 28, 28) float
///   train.labels()   // 60000 int32 in 0..9
///
/// Needs zlib (see io/idx.hpp).

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "../backend/cpu/device.hpp"
#include "../core/tensor.hpp"
#include "idx.hpp"

namespace trident::io {

/// Which part of a dataset.
enum class split { train, test };

/// Mean and standard deviation of a set of pixel values scaled to [0, 1]. The standard
/// deviation is the population one (divided by the count, not count - 1).
struct pixel_stats {
  double mean = 0;  ///< average pixel value
  double std = 1;   ///< standard deviation of the pixel values
};

/// One split of Fashion-MNIST in host memory.
///
/// Images are float, shape (N, 1, 28, 28) (NCHW with one channel), each pixel byte b stored as
/// b / 255 (the float nearest to it), so in [0, 1]; normalize() turns them into
/// (x - mean) / std. Labels are `std::int32_t` in 0..9 (the class index; see class_names),
/// int32 because trident's tensors hold floating-point types only and every loss takes class
/// indices as int32.
class fashion_mnist {
 public:
  /// Number of classes.
  static constexpr int num_classes = 10;
  /// Image height and width in pixels.
  static constexpr index_t rows = 28, cols = 28;
  /// The class names, indexed by label (Zalando's names).
  static constexpr std::array<std::string_view, num_classes> class_names = {
      "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"};
  /// Where Debian's dataset-fashion-mnist puts the files.
  static constexpr const char* default_directory = "/usr/share/datasets/fashion-mnist/";
  /// Environment variable that overrides default_directory when no directory is passed.
  static constexpr const char* directory_variable = "TRIDENT_FASHION_MNIST_DIR";

  /// The directory a load uses: `dir` when not empty, else $TRIDENT_FASHION_MNIST_DIR when set
  /// and not empty, else default_directory.
  static std::filesystem::path resolve_directory(const std::filesystem::path& dir = {}) {
    if (!dir.empty()) return dir;
    if (const char* env = std::getenv(directory_variable); env && *env) return env;
    return default_directory;
  }

  /// Loads split `s` from `dir` (see resolve_directory): `train-images-idx3-ubyte.gz` and
  /// `train-labels-idx1-ubyte.gz`, or `t10k-...` for the test split; a file without `.gz` is
  /// used when only that one exists. Throws io_error when a file is missing or malformed, the
  /// images are not 28x28, the two files count different numbers of samples, or a label is
  /// outside 0..9.
  explicit fashion_mnist(split s, const std::filesystem::path& dir = {}) : split_(s), dir_(resolve_directory(dir)) {
    const std::string prefix = s == split::train ? "train" : "t10k";
    const auto images_file = pick(prefix + "-images-idx3-ubyte");
    const auto labels_file = pick(prefix + "-labels-idx1-ubyte");
    idx_data img = read(images_file, 3);
    idx_data lab = read(labels_file, 1);
    const std::string who = "trident::io::fashion_mnist: ";
    if (img.dims[1] != rows || img.dims[2] != cols) {
      throw io_error(who + images_file.string() + ": images of " + std::to_string(img.dims[1]) + "x" + std::to_string(img.dims[2]) +
                     " pixels, expected 28x28");
    }
    if (img.dims[0] != lab.dims[0]) {
      throw io_error(who + "the images file " + images_file.string() + " holds " + std::to_string(img.dims[0]) +
                     " images but the labels file " + labels_file.string() + " holds " + std::to_string(lab.dims[0]) + " labels");
    }
    const auto n = static_cast<index_t>(img.dims[0]);
    labels_.resize(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) {
      const std::uint8_t v = lab.values[static_cast<std::size_t>(i)];
      if (v >= num_classes) {
        throw io_error(who + labels_file.string() + ": label " + std::to_string(v) + " of sample " + std::to_string(i) +
                       " is outside 0.." + std::to_string(num_classes - 1));
      }
      labels_[static_cast<std::size_t>(i)] = v;
    }

    // Exact statistics from the bytes: sums of b and b^2 are integers that fit in 64 bits.
    const std::uint8_t* b = img.values.data();
    const index_t count = n * rows * cols;
    std::uint64_t s1 = 0, s2 = 0;
    images_ = tensor<float>::uninitialized({n, 1, rows, cols});  // (N, 1, 28, 28)
    float* x = images_.data();
    constexpr index_t block = index_t{1} << 16;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) reduction(+ : s1, s2)
#endif
    for (index_t lo = 0; lo < count; lo += block) {
      const index_t hi = std::min(count, lo + block);
      std::uint32_t a1 = 0, a2 = 0;  // a block's sums fit in 32 bits: 2^16 * 255^2 < 2^32
      for (index_t i = lo; i < hi; ++i) {
        const std::uint32_t v = b[i];
        a1 += v;
        a2 += v * v;
        x[i] = static_cast<float>(v) / 255.0f;
      }
      s1 += a1;
      s2 += a2;
    }
    if (count > 0) {
      const long double m = static_cast<long double>(s1) / count;
      const long double var = static_cast<long double>(s2) / count - m * m;
      stats_.mean = static_cast<double>(m / 255);
      stats_.std = static_cast<double>(std::sqrt(std::max<long double>(var, 0)) / 255);
    }
  }

  /// Which split this is.
  split which() const noexcept { return split_; }
  /// The directory the files were read from.
  const std::filesystem::path& directory() const noexcept { return dir_; }
  /// Number of samples (60000 for train, 10000 for test).
  index_t size() const noexcept { return static_cast<index_t>(labels_.size()); }

  /// The images, (N, 1, 28, 28): in [0, 1], or normalised after normalize().
  const tensor<float>& images() const noexcept { return images_; }
  tensor<float>& images() noexcept { return images_; }
  /// The labels, one per image, in 0..9.
  std::span<const std::int32_t> labels() const noexcept { return labels_; }

  /// Mean and standard deviation of this split's pixels in [0, 1], computed exactly from the
  /// file's bytes at load time (before any normalisation). The training split's are
  /// 0.2860 and 0.3530.
  const pixel_stats& stats() const noexcept { return stats_; }

  /// Normalises the images in place to (x - s.mean) / s.std. Use the training split's stats()
  /// for both splits. Once only: throws trident::error when already normalised or s.std <= 0.
  void normalize(const pixel_stats& s) {
    if (norm_) {
      throw error("trident::io::fashion_mnist::normalize: already normalised (mean " + std::to_string(norm_->mean) + ", std " +
                  std::to_string(norm_->std) + ")");
    }
    if (!(s.std > 0)) throw error("trident::io::fashion_mnist::normalize: std " + std::to_string(s.std) + " is not positive");
    const double inv = 1.0 / s.std;
    float* x = images_.data();
    const index_t count = images_.numel();
#if defined(_OPENMP)
#pragma omp parallel for simd schedule(static)
#endif
    for (index_t i = 0; i < count; ++i) x[i] = static_cast<float>((static_cast<double>(x[i]) - s.mean) * inv);
    norm_ = s;
  }
  /// The statistics normalize() applied, if it was called.
  const std::optional<pixel_stats>& normalization() const noexcept { return norm_; }

 private:
  /// dir/name.gz, or dir/name when only that exists.
  std::filesystem::path pick(const std::string& name) const {
    std::error_code ec;
    auto gz = dir_ / (name + ".gz");
    if (std::filesystem::exists(gz, ec)) return gz;
    auto plain = dir_ / name;
    if (std::filesystem::exists(plain, ec)) return plain;
    return gz;
  }
  /// read_idx, with a hint on where the files come from when one is missing.
  idx_data read(const std::filesystem::path& file, int rank) const {
    try {
      return read_idx(file, rank);
    } catch (const io_error& e) {
      std::error_code ec;
      if (std::filesystem::exists(file, ec)) throw;
      throw io_error(std::string(e.what()) + " (Fashion-MNIST directory " + dir_.string() +
                     "; install Debian's dataset-fashion-mnist, or pass a directory or set " + directory_variable + ")");
    }
  }

  split split_;
  std::filesystem::path dir_;
  tensor<float> images_;
  std::vector<std::int32_t> labels_;
  pixel_stats stats_{};
  std::optional<pixel_stats> norm_;
};

/// Both splits of Fashion-MNIST.
struct fashion_mnist_splits {
  fashion_mnist train;
  fashion_mnist test;
};

/// Loads both splits from `dir` (see fashion_mnist::resolve_directory); with `normalize`, both
/// are normalised with the training split's mean and standard deviation.
inline fashion_mnist_splits load_fashion_mnist(bool normalize = true, const std::filesystem::path& dir = {}) {
  fashion_mnist_splits d{fashion_mnist(split::train, dir), fashion_mnist(split::test, dir)};
  if (normalize) {
    const pixel_stats s = d.train.stats();
    d.train.normalize(s);
    d.test.normalize(s);
  }
  return d;
}

}  // namespace trident::io
