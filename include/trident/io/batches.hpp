#pragma once
/// @file io/batches.hpp
/// Mini-batches over a dataset in host memory: (inputs, labels) with inputs a tensor whose
/// first dimension counts samples and labels one int32 per sample.
///
///   io::batch_loader<bfloat16> loader(train.images(), train.labels(), {.batch_size = 128, .seed = 7});
///   for (int e = 0; e < epochs; ++e)
///     for (const auto& b : loader.epoch(e)) step(b.inputs, b.labels);  // (128, 1, 28, 28) bf16
///
/// - Order: with `shuffle`, epoch e visits the samples in a permutation that depends only on
///   (seed, e) (Fisher-Yates driven by Philox4x32-10, so the same on every platform and rank);
///   without it, in dataset order. Every sample appears at most once per epoch.
/// - Global batch i is positions [i*batch_size, (i+1)*batch_size) of that order; the last one
///   is shorter unless `drop_last` drops it.
/// - Sharding: rank r of world_size W takes the r-th of W equal, contiguous slices of each
///   global batch, so the ranks' batches, concatenated in rank order, are the global batch.
///   batch_size must be a multiple of W. A short last batch of g samples gives each rank
///   floor(g / W) samples and its last g % W samples are skipped this epoch (other samples
///   next epoch, when shuffling); when g < W that batch is skipped. All ranks see the same
///   number of batches of the same size. With W = 1 nothing but drop_last ever skips samples.
/// - Memory: each batch is gathered into buffers allocated once by the constructor (64-byte
///   aligned) and reused: a batch's views are valid until the next batch is loaded. The gather
///   converts the elements to T (float -> bf16/half with the exact SIMD conversions).
///
/// The loader keeps views of the inputs and labels: they must outlive it.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <utility>

#include "../backend/cpu/device.hpp"
#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "../core/tensor.hpp"
#include "../precision/convert.hpp"

namespace trident::io {

/// How a batch_loader walks a dataset.
struct batch_options {
  index_t batch_size = 64;  ///< samples per global batch (all ranks together); a multiple of world_size
  bool shuffle = true;      ///< a new order each epoch; false: dataset order
  std::uint64_t seed = 0;   ///< shuffle seed; every rank must use the same one
  bool drop_last = false;   ///< drop a last global batch shorter than batch_size
  int rank = 0;             ///< this rank, 0..world_size-1
  int world_size = 1;       ///< ranks sharing each global batch
};

/// Fills `order` with a permutation of 0..order.size()-1 that depends only on (seed, epoch):
/// Fisher-Yates with unbiased draws from the Philox4x32-10 stream keyed by `seed`, counter
/// (block, epoch). The same on every platform, compiler and rank.
inline void shuffled_order(std::span<index_t> order, std::uint64_t seed, std::uint64_t epoch) noexcept {
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<index_t>(i);
  std::uint64_t block = 0;
  philox_block r{};
  int lanes_left = 0;  // 64-bit values left in r (two per block)
  auto next = [&]() noexcept -> std::uint64_t {
    if (lanes_left == 0) {
      r = philox4x32_10({{static_cast<std::uint32_t>(block), static_cast<std::uint32_t>(block >> 32), static_cast<std::uint32_t>(epoch),
                          static_cast<std::uint32_t>(epoch >> 32)}},
                        static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32));
      ++block;
      lanes_left = 2;
    }
    const int k = 2 * (2 - lanes_left--);
    return (std::uint64_t{r.v[k + 1]} << 32) | r.v[k];
  };
  for (std::size_t i = order.size(); i > 1; --i) {
    // Uniform in [0, i): reject the 2^64 mod i lowest values so that every residue is equally likely.
    const std::uint64_t n = i;
    const std::uint64_t threshold = (0 - n) % n;
    std::uint64_t x;
    do x = next();
    while (x < threshold);
    std::swap(order[i - 1], order[static_cast<std::size_t>(x % n)]);
  }
}

/// One batch: views of the loader's buffers, valid until it loads another batch.
/// @tparam T element type of the inputs (the model's storage type)
template <class T>
struct batch {
  tensor_view<const T, cpu> inputs;       ///< (b, sample shape...), contiguous, 64-byte aligned
  std::span<const std::int32_t> labels;   ///< b labels, 64-byte aligned
  std::span<const index_t> indices;       ///< dataset index of each sample (for checks and logging)
  std::uint64_t epoch = 0;                ///< the epoch it belongs to
  index_t index = 0;                      ///< its number within the epoch, 0..batches_per_epoch()-1
  index_t global_size = 0;                ///< samples of this global batch over all ranks (b * world_size)

  /// Samples in this batch on this rank (b).
  index_t size() const noexcept { return static_cast<index_t>(labels.size()); }
};

namespace detail {

/// An uninitialised, 64-byte aligned host array (for non-float element types, which tensor
/// does not hold).
template <class U>
class host_buffer {
 public:
  host_buffer() = default;
  explicit host_buffer(std::size_t n) : p_(static_cast<U*>(cpu::allocate(n * sizeof(U)))), n_(n) {}
  host_buffer(host_buffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  host_buffer& operator=(host_buffer&& o) noexcept {
    if (this != &o) {
      cpu::deallocate(p_, n_ * sizeof(U));
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  ~host_buffer() { cpu::deallocate(p_, n_ * sizeof(U)); }
  U* data() noexcept { return p_; }
  const U* data() const noexcept { return p_; }
  std::size_t size() const noexcept { return n_; }

 private:
  U* p_ = nullptr;
  std::size_t n_ = 0;
};

/// dst[k] = src[k] converted to To, k < n.
template <class From, class To>
inline void convert_row(const From* src, To* dst, std::size_t n) noexcept {
  if constexpr (std::is_same_v<From, To>) {
    std::memcpy(dst, src, n * sizeof(To));
  } else if constexpr (requires { simd::convert(src, dst, n); }) {
    simd::convert(src, dst, n);  // float <-> half / bfloat16, round to nearest even
  } else if constexpr (std::is_same_v<To, float> || std::is_same_v<To, double>) {
    for (std::size_t k = 0; k < n; ++k) dst[k] = static_cast<To>(static_cast<compute_type_of<From>>(src[k]));
  } else {  // to half / bfloat16 from double or from the other 2-byte type: through float
    for (std::size_t k = 0; k < n; ++k) dst[k] = To(static_cast<float>(src[k]));
  }
}

}  // namespace detail

/// Batches of (inputs, labels) gathered, in shuffled or dataset order, into reused buffers of
/// element type T, for one rank of world_size (see the file comment for the rules).
/// @tparam T element type of the batches' inputs (float, bfloat16, half or double)
/// @tparam Source element type of the dataset's inputs
template <class T = float, class Source = float>
class batch_loader {
  static_assert(element_type<T> && !std::is_const_v<T>, "trident::io::batch_loader<T>: T must be float, double, half or bfloat16");
  static_assert(element_type<Source> && !std::is_const_v<Source>,
                "trident::io::batch_loader<T, Source>: Source must be float, double, half or bfloat16");

 public:
  using value_type = T;

  /// A loader over `inputs` (N, ...) and `labels` (N values). Each sample (inputs.select(0, i))
  /// must be contiguous; the first dimension may have any stride. Throws trident::error for
  /// invalid options and shape_error when the inputs and labels disagree.
  batch_loader(tensor_view<const Source, cpu> inputs, std::span<const std::int32_t> labels, const batch_options& options = {})
      : inputs_(inputs), labels_(labels), opt_(options) {
    const std::string who = "trident::io::batch_loader: ";
    if (opt_.world_size < 1) throw error(who + "world_size " + std::to_string(opt_.world_size) + " must be at least 1");
    if (opt_.rank < 0 || opt_.rank >= opt_.world_size) {
      throw error(who + "rank " + std::to_string(opt_.rank) + " is outside 0.." + std::to_string(opt_.world_size - 1));
    }
    if (opt_.batch_size < 1 || opt_.batch_size % opt_.world_size != 0) {
      throw error(who + "batch_size " + std::to_string(opt_.batch_size) + " must be a positive multiple of world_size " +
                  std::to_string(opt_.world_size) + " (each rank takes an equal share of every global batch)");
    }
    if (inputs_.rank() < 1) throw shape_error(who + "inputs of shape " + inputs_.shape().str() + " have no sample dimension");
    n_ = inputs_.size(0);
    if (static_cast<index_t>(labels_.size()) != n_) {
      throw shape_error(who + std::to_string(labels_.size()) + " labels for inputs of shape " + inputs_.shape().str() + " (" +
                        std::to_string(n_) + " samples)");
    }
    index_array ext{}, st{};
    for (int d = 1; d < inputs_.rank(); ++d) {
      ext[d - 1] = inputs_.size(d);
      st[d - 1] = inputs_.stride(d);
    }
    const trident::layout sample(trident::shape(inputs_.rank() - 1, ext), st);
    if (!sample.is_contiguous()) {
      throw shape_error(who + "the samples of inputs " + inputs_.layout().str() + " are not contiguous; pass a contiguous() copy");
    }
    row_ = sample.numel();

    const index_t local = std::min(opt_.batch_size / opt_.world_size, n_);
    index_array bext{};
    bext[0] = local;
    for (int d = 1; d < inputs_.rank(); ++d) bext[d] = inputs_.size(d);
    buffer_ = tensor<T, cpu>::uninitialized(trident::shape(inputs_.rank(), bext));  // (local, sample shape...)
    label_buffer_ = detail::host_buffer<std::int32_t>(static_cast<std::size_t>(local));
    index_buffer_ = detail::host_buffer<index_t>(static_cast<std::size_t>(local));
    order_ = detail::host_buffer<index_t>(static_cast<std::size_t>(n_));
    set_epoch(0);
  }

  batch_loader(const batch_loader&) = delete;
  batch_loader& operator=(const batch_loader&) = delete;
  batch_loader(batch_loader&&) noexcept = default;
  batch_loader& operator=(batch_loader&&) noexcept = default;

  /// The options it was made with.
  const batch_options& options() const noexcept { return opt_; }
  /// Samples in the dataset (N).
  index_t num_samples() const noexcept { return n_; }
  /// Samples per rank in a full batch: batch_size / world_size.
  index_t local_batch_size() const noexcept { return opt_.batch_size / opt_.world_size; }
  /// Batches per epoch, the same on every rank.
  index_t batches_per_epoch() const noexcept {
    const index_t full = n_ / opt_.batch_size, rest = n_ % opt_.batch_size;
    return full + (!opt_.drop_last && rest >= opt_.world_size ? 1 : 0);
  }
  /// Samples this rank sees per epoch.
  index_t samples_per_epoch() const noexcept {
    const index_t full = n_ / opt_.batch_size, rest = n_ % opt_.batch_size;
    return full * local_batch_size() + (opt_.drop_last ? 0 : rest / opt_.world_size);
  }
  /// Samples no rank sees in an epoch (drop_last, or the remainder of a short last batch).
  index_t skipped_per_epoch() const noexcept { return n_ - samples_per_epoch() * opt_.world_size; }

  /// Makes `e` the current epoch: computes its order (nothing is allocated).
  void set_epoch(std::uint64_t e) {
    epoch_ = e;
    const std::span<index_t> o(order_.data(), order_.size());
    if (opt_.shuffle) {
      shuffled_order(o, opt_.seed, e);
    } else {
      for (std::size_t i = 0; i < o.size(); ++i) o[i] = static_cast<index_t>(i);
    }
  }
  /// The current epoch.
  std::uint64_t current_epoch() const noexcept { return epoch_; }
  /// The current epoch's global order of sample indices (the same on every rank).
  std::span<const index_t> order() const noexcept { return {order_.data(), order_.size()}; }

  /// Gathers batch i (0..batches_per_epoch()-1) of the current epoch for this rank into the
  /// buffers, converting to T, and returns it. Invalidates the previous batch's views.
  const batch<T>& load(index_t i) {
    if (i < 0 || i >= batches_per_epoch()) {
      throw error("trident::io::batch_loader::load: batch " + std::to_string(i) + " of an epoch of " +
                  std::to_string(batches_per_epoch()) + " batches");
    }
    const index_t start = i * opt_.batch_size;
    const index_t global = std::min(opt_.batch_size, n_ - start);
    const index_t b = global / opt_.world_size;  // equal shares; the global % world_size last are skipped
    const index_t first = start + opt_.rank * b;
    const Source* src = inputs_.data();
    const index_t src_stride = inputs_.stride(0);
    T* dst = buffer_.data();
    std::int32_t* lab = label_buffer_.data();
    index_t* idx = index_buffer_.data();
    const index_t* ord = order_.data();
    const index_t row = row_;
    [[maybe_unused]] const bool threaded = static_cast<std::size_t>(b * row) * sizeof(T) >= (std::size_t{1} << 20);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (threaded)
#endif
    for (index_t j = 0; j < b; ++j) {
      const index_t s = ord[first + j];
      detail::convert_row(src + s * src_stride, dst + j * row, static_cast<std::size_t>(row));
      lab[j] = labels_[static_cast<std::size_t>(s)];
      idx[j] = s;
    }
    current_.inputs = buffer_.view().slice(0, 0, b);
    current_.labels = std::span<const std::int32_t>(lab, static_cast<std::size_t>(b));
    current_.indices = std::span<const index_t>(idx, static_cast<std::size_t>(b));
    current_.epoch = epoch_;
    current_.index = i;
    current_.global_size = b * opt_.world_size;
    return current_;
  }
  /// The batch the last load() gathered.
  const batch<T>& current() const noexcept { return current_; }

  /// The batches of one epoch, from batch `first` on (to resume mid-epoch), as an input range:
  ///   for (const auto& b : loader.epoch(e)) ...
  /// Each step gathers the next batch into the same buffers.
  class epoch_range {
   public:
    /// Input iterator over the epoch's batches (each increment loads the next one).
    class iterator {
     public:
      using value_type = batch<T>;
      using difference_type = std::ptrdiff_t;
      iterator() = default;
      const batch<T>& operator*() const noexcept { return loader_->current(); }
      const batch<T>* operator->() const noexcept { return &loader_->current(); }
      iterator& operator++() {
        if (++i_ < end_) loader_->load(i_);
        return *this;
      }
      void operator++(int) { ++*this; }
      bool operator==(std::default_sentinel_t) const noexcept { return i_ >= end_; }

     private:
      friend class epoch_range;
      iterator(batch_loader* l, index_t i, index_t end) : loader_(l), i_(i), end_(end) {}
      batch_loader* loader_ = nullptr;
      index_t i_ = 0, end_ = 0;
    };

    /// Loads the first batch.
    iterator begin() {
      const index_t end = loader_->batches_per_epoch();
      if (first_ < end) loader_->load(first_);
      return iterator(loader_, first_, end);
    }
    std::default_sentinel_t end() const noexcept { return {}; }

   private:
    friend class batch_loader;
    epoch_range(batch_loader* l, index_t first) : loader_(l), first_(first) {}
    batch_loader* loader_;
    index_t first_;
  };

  /// Sets epoch `e` (see set_epoch) and returns its batches from batch `first` on.
  epoch_range epoch(std::uint64_t e, index_t first = 0) {
    if (first < 0) throw error("trident::io::batch_loader::epoch: first batch " + std::to_string(first) + " is negative");
    if (e != epoch_) set_epoch(e);
    return epoch_range(this, first);
  }

 private:
  tensor_view<const Source, cpu> inputs_;
  std::span<const std::int32_t> labels_;
  batch_options opt_;
  index_t n_ = 0;
  index_t row_ = 1;
  std::uint64_t epoch_ = 0;
  tensor<T, cpu> buffer_;
  detail::host_buffer<std::int32_t> label_buffer_;
  detail::host_buffer<index_t> index_buffer_;
  detail::host_buffer<index_t> order_;
  batch<T> current_{};
};

}  // namespace trident::io
