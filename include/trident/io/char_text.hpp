#pragma once
/// @file io/char_text.hpp
/// A character-level text dataset, as nanoGPT's shakespeare_char prepares it (prepare.py) and
/// samples it (train.py's get_batch): the text is read as UTF-8, the vocabulary is the sorted
/// set of distinct Unicode code points in it (`sorted(list(set(data)))`), a token is the int32
/// index of its character in the vocabulary, the first int(n * 0.9) tokens are the training
/// split and the rest the validation split, and a batch is `batch` windows of `block` tokens at
/// offsets drawn uniformly from [0, len - block - 1], with the targets shifted by one.
///
///   io::char_text text("/path/to/tinyshakespeare.txt");   // 1115394 characters, vocabulary 65
///   io::batch_rng rng(1337);                                // the run is reproducible from the seed
///   std::vector<std::int32_t> x(12 * 64), y(12 * 64);       // (B, T) row-major
///   text.batch(io::char_text::split::train, 12, 64, rng, x.data(), y.data());
///   std::string s = text.decode(text.encode("First Citizen"));
///
/// The bytes are taken as they are: "\r\n" stays two characters (Python's text mode, which
/// prepare.py uses, would turn it into "\n"), and a leading byte-order mark is a character.
/// Every failure throws: a file that cannot be read, is empty or is not valid UTF-8 throws
/// io_error naming the file (and the byte offset); a bad argument throws trident::error
/// naming the value.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "../config.hpp"
#include "idx.hpp"  // io_error

namespace trident::io {

/// A seeded stream of random integers for drawing batches: the i-th 64-bit value is half of the
/// Philox4x32-10 block with counter (i / 2, tag) under key `seed`, so the stream is the same on
/// every platform and compiler, and its whole state is (seed, position): a run restarted from a
/// checkpoint at the same position draws the same batches.
class batch_rng {
 public:
  /// A stream that starts at position 0 of `seed`.
  constexpr explicit batch_rng(std::uint64_t seed = 0) noexcept : seed_(seed) {}

  /// The next 64 random bits.
  constexpr std::uint64_t next() noexcept {
    const std::uint64_t b = pos_ / 2;
    const philox_block r = philox4x32_10(
        {{static_cast<std::uint32_t>(b), static_cast<std::uint32_t>(b >> 32), tag, 0u}}, static_cast<std::uint32_t>(seed_),
        static_cast<std::uint32_t>(seed_ >> 32));
    const int k = 2 * static_cast<int>(pos_ % 2);
    ++pos_;
    return (std::uint64_t{r.v[k + 1]} << 32) | r.v[k];
  }

  /// A uniform integer in [0, n), n > 0 (throws trident::error otherwise): the values below
  /// 2^64 mod n are rejected, so that every residue is equally likely.
  constexpr std::uint64_t below(std::uint64_t n) {
    if (n == 0) throw error("trident::io::batch_rng::below: empty range [0, 0)");
    const std::uint64_t threshold = (0 - n) % n;
    std::uint64_t x;
    do x = next();
    while (x < threshold);
    return x % n;
  }

  /// The seed.
  constexpr std::uint64_t seed() const noexcept { return seed_; }
  /// How many 64-bit values have been drawn.
  constexpr std::uint64_t position() const noexcept { return pos_; }
  /// Restores a position (e.g. from a checkpoint).
  constexpr void set_position(std::uint64_t pos) noexcept { pos_ = pos; }

 private:
  /// Third counter word: keeps this stream apart from other Philox streams of the same seed.
  static constexpr std::uint32_t tag = 0x74657874u;  // "text"
  std::uint64_t seed_;
  std::uint64_t pos_ = 0;
};

namespace detail {

/// Appends the UTF-8 encoding of code point `c` (a valid scalar value) to `out`.
inline void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

/// "U+00E9".
inline std::string code_point_name(char32_t c) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "U+%04X", static_cast<unsigned>(c));
  return buf;
}

/// "'é' (U+00E9)", or just "U+000A" for a control character.
inline std::string describe_char(char32_t c) {
  if (c < 0x20 || c == 0x7F || (c >= 0x80 && c < 0xA0)) return code_point_name(c);
  std::string s = "'";
  append_utf8(s, c);
  return s + "' (" + code_point_name(c) + ")";
}

/// Decodes strict UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF)
/// into code points. On invalid input returns false and sets `bad_offset` to the byte offset
/// of the sequence that is wrong and `why` to what is wrong with it.
inline bool decode_utf8(std::string_view s, std::vector<char32_t>& out, std::size_t& bad_offset, std::string& why) {
  out.clear();
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  auto hex = [](unsigned b) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "0x%02X", b);
    return std::string(buf);
  };
  std::size_t i = 0;
  while (i < n) {
    const unsigned b0 = p[i];
    if (b0 < 0x80) {  // the common case: runs of ASCII
      out.push_back(b0);
      ++i;
      continue;
    }
    int len;
    char32_t c, min;
    if (b0 >= 0xC2 && b0 <= 0xDF) {
      len = 2, c = b0 & 0x1F, min = 0x80;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
      len = 3, c = b0 & 0x0F, min = 0x800;
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
      len = 4, c = b0 & 0x07, min = 0x10000;
    } else {
      bad_offset = i;
      why = b0 < 0xC0 ? "continuation byte " + hex(b0) + " without a lead byte"
                      : "byte " + hex(b0) + " can never appear in UTF-8";
      return false;
    }
    if (n - i < static_cast<std::size_t>(len)) {
      bad_offset = i;
      why = "the text ends inside a " + std::to_string(len) + "-byte sequence (lead byte " + hex(b0) + ")";
      return false;
    }
    for (int k = 1; k < len; ++k) {
      const unsigned b = p[i + static_cast<std::size_t>(k)];
      if ((b & 0xC0) != 0x80) {
        bad_offset = i;
        why = "byte " + std::to_string(k + 1) + " of a " + std::to_string(len) + "-byte sequence is " + hex(b) +
              ", not a continuation byte (lead byte " + hex(b0) + ")";
        return false;
      }
      c = (c << 6) | (b & 0x3F);
    }
    if (c < min) {
      bad_offset = i;
      why = "overlong encoding of " + code_point_name(c);
      return false;
    }
    if (c >= 0xD800 && c <= 0xDFFF) {
      bad_offset = i;
      why = "surrogate " + code_point_name(c) + " encoded";
      return false;
    }
    if (c > 0x10FFFF) {
      bad_offset = i;
      why = "code point " + code_point_name(c) + " is above U+10FFFF";
      return false;
    }
    out.push_back(c);
    i += static_cast<std::size_t>(len);
  }
  return true;
}

/// The whole contents of `file`; throws io_error naming the file and strerror's reason.
inline std::string read_file_bytes(const std::filesystem::path& file, const std::string& who) {
  auto fail = [&](const std::string& what, int e) {
    throw io_error(who + file.string() + ": " + what + ": " + std::strerror(e));
  };
  const int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("cannot open", errno);
  struct closer {
    int fd;
    ~closer() { ::close(fd); }
  } guard{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail("cannot stat", errno);
  if (S_ISDIR(st.st_mode)) fail("cannot read", EISDIR);
  std::string data;
  if (S_ISREG(st.st_mode) && st.st_size > 0) data.reserve(static_cast<std::size_t>(st.st_size));
  std::array<char, 1 << 16> buf;
  for (;;) {
    const ssize_t got = ::read(fd, buf.data(), buf.size());
    if (got < 0) {
      if (errno == EINTR) continue;
      fail("read error", errno);
    }
    if (got == 0) break;
    data.append(buf.data(), static_cast<std::size_t>(got));
  }
  return data;
}

}  // namespace detail

/// A UTF-8 text as character tokens with nanoGPT's vocabulary and train/validation split (see
/// the file comment). Holds the tokens of the whole text (4 bytes per character) and the
/// vocabulary; copyable and movable.
class char_text {
 public:
  /// Which part of the text: the first int(n * train_fraction) tokens, or the rest.
  /// (Nested because io::split, Fashion-MNIST's, names train and test.)
  enum class split { train, val };

  /// Reads `file` (UTF-8) and splits it at int(n * train_fraction) characters. Throws io_error
  /// when the file cannot be read (naming the path and the system's reason), is empty or is not
  /// valid UTF-8 (naming the byte offset); trident::error when train_fraction is not in (0, 1).
  explicit char_text(const std::filesystem::path& file, double train_fraction = 0.9) : name_(file.string()) {
    check_fraction(train_fraction);
    build(detail::read_file_bytes(file, "trident::io::char_text: "), train_fraction);
  }

  /// The same from text in memory; `name` stands for the file in messages.
  static char_text from_string(std::string_view text, std::string name = "<string>", double train_fraction = 0.9) {
    check_fraction(train_fraction);
    char_text t;
    t.name_ = std::move(name);
    t.build(text, train_fraction);
    return t;
  }

  /// The file's path, or the name given to from_string.
  const std::string& name() const noexcept { return name_; }
  /// Number of distinct characters (65 for tinyshakespeare).
  index_t vocab_size() const noexcept { return static_cast<index_t>(vocab_.size()); }
  /// The vocabulary: distinct code points in increasing order; token id i is vocab()[i].
  std::span<const char32_t> vocab() const noexcept { return vocab_; }
  /// Number of characters (code points) in the text, n.
  index_t size() const noexcept { return static_cast<index_t>(tokens_.size()); }
  /// Tokens in the training split: int(n * train_fraction), truncated as Python's int() does.
  index_t train_size() const noexcept { return train_size_; }
  /// Tokens in the validation split: n - train_size().
  index_t val_size() const noexcept { return size() - train_size_; }
  /// Tokens in split `s`.
  index_t size(split s) const noexcept { return s == split::train ? train_size() : val_size(); }
  /// The fraction of the text the training split takes.
  double train_fraction() const noexcept { return fraction_; }

  /// All tokens of the text, in order.
  std::span<const std::int32_t> tokens() const noexcept { return tokens_; }
  /// The training split's tokens (the start of tokens()).
  std::span<const std::int32_t> train_tokens() const noexcept { return tokens().first(static_cast<std::size_t>(train_size_)); }
  /// The validation split's tokens (the rest of tokens()).
  std::span<const std::int32_t> val_tokens() const noexcept { return tokens().subspan(static_cast<std::size_t>(train_size_)); }
  /// The tokens of split `s`.
  std::span<const std::int32_t> tokens(split s) const noexcept { return s == split::train ? train_tokens() : val_tokens(); }

  /// The token id of code point `c`, or -1 when `c` is not in the vocabulary.
  std::int32_t id_of(char32_t c) const noexcept {
    if (c < ascii_.size()) return ascii_[c];
    const auto it = std::lower_bound(vocab_.begin(), vocab_.end(), c);
    return it != vocab_.end() && *it == c ? static_cast<std::int32_t>(it - vocab_.begin()) : -1;
  }

  /// The tokens of UTF-8 text `s`. Throws trident::error naming the character (and its
  /// position) when it is not in the vocabulary, or the byte offset when `s` is not UTF-8.
  std::vector<std::int32_t> encode(std::string_view s) const {
    std::vector<char32_t> cps;
    std::size_t bad = 0;
    std::string why;
    if (!detail::decode_utf8(s, cps, bad, why)) {
      throw error("trident::io::char_text::encode: invalid UTF-8 at byte offset " + std::to_string(bad) + ": " + why);
    }
    std::vector<std::int32_t> ids(cps.size());
    for (std::size_t i = 0; i < cps.size(); ++i) {
      ids[i] = id_of(cps[i]);
      if (ids[i] < 0) {
        throw error("trident::io::char_text::encode: character " + detail::describe_char(cps[i]) + " at position " +
                    std::to_string(i) + " is not in the vocabulary of " + name_ + " (" + std::to_string(vocab_.size()) +
                    " characters)");
      }
    }
    return ids;
  }

  /// The UTF-8 text of tokens `ids`. Throws trident::error naming the id and its position when
  /// it is outside 0..vocab_size()-1.
  std::string decode(std::span<const std::int32_t> ids) const {
    std::string out;
    out.reserve(ids.size());
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const std::int32_t id = ids[i];
      if (id < 0 || static_cast<std::size_t>(id) >= vocab_.size()) {
        throw error("trident::io::char_text::decode: token " + std::to_string(id) + " at position " + std::to_string(i) +
                    " is outside the vocabulary 0.." + std::to_string(vocab_.size() - 1) + " of " + name_);
      }
      detail::append_utf8(out, vocab_[static_cast<std::size_t>(id)]);
    }
    return out;
  }

  /// Draws the `batch_size` window offsets of a batch of split `s`, uniform in
  /// [0, size(s) - block - 1] (torch.randint(len(data) - block_size, (batch_size,))), taking
  /// exactly the random values batch() takes for the same arguments. Throws trident::error when
  /// batch_size or block is not positive, or the split holds fewer than block + 1 tokens.
  std::vector<index_t> batch_offsets(split s, index_t batch_size, index_t block, batch_rng& rng) const {
    const index_t len = check_batch("batch_offsets", s, batch_size, block);
    std::vector<index_t> o(static_cast<std::size_t>(batch_size));
    const auto range = static_cast<std::uint64_t>(len - block);
    for (auto& v : o) v = static_cast<index_t>(rng.below(range));
    return o;
  }

  /// A batch of split `s`, as get_batch: for b < batch_size, with o the b-th offset drawn from
  /// `rng` (see batch_offsets), row b of x (batch_size, block) is tokens o .. o+block-1 of the
  /// split and row b of y is tokens o+1 .. o+block (the next character of each). x and y hold
  /// batch_size * block int32 each, row-major. When `offsets` is not null the offsets are
  /// written to it (batch_size of them). Throws as batch_offsets.
  void batch(split s, index_t batch_size, index_t block, batch_rng& rng, std::int32_t* x, std::int32_t* y,
             index_t* offsets = nullptr) const {
    const index_t len = check_batch("batch", s, batch_size, block);
    const std::int32_t* data = tokens(s).data();
    const auto range = static_cast<std::uint64_t>(len - block);
    const auto row = static_cast<std::size_t>(block);
    for (index_t b = 0; b < batch_size; ++b) {
      const auto o = static_cast<index_t>(rng.below(range));
      if (offsets) offsets[b] = o;
      std::memcpy(x + static_cast<std::size_t>(b) * row, data + o, row * sizeof(std::int32_t));
      std::memcpy(y + static_cast<std::size_t>(b) * row, data + o + 1, row * sizeof(std::int32_t));
    }
  }

  /// batch() into spans, which must hold batch_size * block tokens each (trident::error
  /// naming the sizes otherwise).
  void batch(split s, index_t batch_size, index_t block, batch_rng& rng, std::span<std::int32_t> x, std::span<std::int32_t> y) const {
    check_batch("batch", s, batch_size, block);
    const auto need = static_cast<std::size_t>(batch_size) * static_cast<std::size_t>(block);
    if (x.size() != need || y.size() != need) {
      throw error("trident::io::char_text::batch: x holds " + std::to_string(x.size()) + " and y " + std::to_string(y.size()) +
                  " tokens; a batch of " + std::to_string(batch_size) + " x " + std::to_string(block) + " needs " +
                  std::to_string(need) + " each");
    }
    batch(s, batch_size, block, rng, x.data(), y.data());
  }

  /// Rank `rank` of `world_size`'s share of a global batch (data parallel): every rank draws the
  /// same global_batch offsets from its copy of `rng` (all ranks must seed it alike) and keeps
  /// rows [rank * b, (rank + 1) * b), b = global_batch / world_size, into x and y (b * block
  /// each). The ranks' shares, in rank order, are exactly batch(s, global_batch, ...), so the
  /// global batch does not depend on the number of ranks, and every rank's rng ends in the same
  /// state. Throws trident::error when world_size < 1, rank is outside [0, world_size) or
  /// global_batch is not a multiple of world_size, and as batch_offsets otherwise.
  void shard_batch(split s, index_t global_batch, index_t block, batch_rng& rng, int rank, int world_size, std::int32_t* x,
                   std::int32_t* y) const {
    const std::string who = "trident::io::char_text::shard_batch: ";
    if (world_size < 1) throw error(who + "world_size " + std::to_string(world_size) + " must be at least 1");
    if (rank < 0 || rank >= world_size) {
      throw error(who + "rank " + std::to_string(rank) + " is outside 0.." + std::to_string(world_size - 1));
    }
    if (global_batch % world_size != 0) {
      throw error(who + "the global batch " + std::to_string(global_batch) + " is not a multiple of world_size " +
                  std::to_string(world_size) + " (each rank takes an equal share)");
    }
    const auto offsets = batch_offsets(s, global_batch, block, rng);
    const std::int32_t* data = tokens(s).data();
    const index_t b = global_batch / world_size;
    const auto row = static_cast<std::size_t>(block);
    for (index_t i = 0; i < b; ++i) {
      const index_t o = offsets[static_cast<std::size_t>(rank * b + i)];
      std::memcpy(x + static_cast<std::size_t>(i) * row, data + o, row * sizeof(std::int32_t));
      std::memcpy(y + static_cast<std::size_t>(i) * row, data + o + 1, row * sizeof(std::int32_t));
    }
  }

  /// "train" or "val".
  static constexpr const char* split_name(split s) noexcept { return s == split::train ? "train" : "val"; }

 private:
  char_text() = default;

  static void check_fraction(double f) {
    if (!(f > 0 && f < 1)) {
      throw error("trident::io::char_text: train_fraction " + std::to_string(f) + " is not in (0, 1)");
    }
  }

  /// The split's length, after checking the batch's arguments against it (small, so that it
  /// inlines and the compiler sees block > 0 in the copies that follow).
  index_t check_batch(const char* fn, split s, index_t batch_size, index_t block) const {
    const index_t len = size(s);
    if (batch_size <= 0 || block <= 0 || len < block + 1) bad_batch(fn, s, batch_size, block);
    return len;
  }

  /// Throws the error check_batch found.
  [[noreturn]] void bad_batch(const char* fn, split s, index_t batch_size, index_t block) const {
    const std::string who = std::string("trident::io::char_text::") + fn + ": ";
    if (batch_size <= 0) throw error(who + "batch size " + std::to_string(batch_size) + " is not positive");
    if (block <= 0) throw error(who + "block size " + std::to_string(block) + " is not positive");
    throw error(who + "the " + split_name(s) + " split of " + name_ + " holds " + std::to_string(size(s)) +
                " tokens, too few for a block of " + std::to_string(block) + " (it needs block + 1 = " +
                std::to_string(block + 1) + " for the shifted targets)");
  }

  void build(std::string_view bytes, double train_fraction) {
    const std::string who = "trident::io::char_text: " + name_ + ": ";
    if (bytes.empty()) throw io_error(who + "the text is empty (no characters to build a vocabulary from)");
    std::vector<char32_t> cps;
    std::size_t bad = 0;
    std::string why;
    if (!detail::decode_utf8(bytes, cps, bad, why)) {
      throw io_error(who + "invalid UTF-8 at byte offset " + std::to_string(bad) + ": " + why);
    }
    // The vocabulary: distinct code points in increasing order (a bit per possible code point).
    std::vector<bool> seen(0x110000);
    char32_t hi = 0;
    for (char32_t c : cps) {
      seen[c] = true;
      hi = std::max(hi, c);
    }
    for (char32_t c = 0; c <= hi; ++c) {
      if (seen[c]) vocab_.push_back(c);
    }
    ascii_.fill(-1);
    for (std::size_t i = 0; i < vocab_.size() && vocab_[i] < ascii_.size(); ++i) ascii_[vocab_[i]] = static_cast<std::int32_t>(i);
    tokens_.resize(cps.size());
    for (std::size_t i = 0; i < cps.size(); ++i) tokens_[i] = id_of(cps[i]);
    fraction_ = train_fraction;
    // Python's int(n * 0.9): the product in double, truncated.
    train_size_ = static_cast<index_t>(static_cast<double>(cps.size()) * train_fraction);
  }

  std::string name_;
  std::vector<char32_t> vocab_;                // sorted distinct code points
  std::array<std::int32_t, 128> ascii_{};      // id of each ASCII code point, -1 when absent
  std::vector<std::int32_t> tokens_;           // the whole text
  index_t train_size_ = 0;
  double fraction_ = 0.9;
};

}  // namespace trident::io
