#pragma once
/// @file core/binary.hpp
/// The pieces of trident's binary files (nn/serialize.hpp's weights, quant/storage.hpp's
/// quantized weights): the FNV-1a hash they are checked with, fields appended to a byte
/// buffer, a reader that takes the fields back in order and names what it was reading when the
/// bytes run out, and whole-file reads and atomic writes (`path.tmp` renamed over `path`, so
/// an interrupted save never leaves a partial file in place).
///
/// Fields are the host's bytes: little-endian on the hosts trident builds for (the formats
/// say little-endian, and quant/storage.hpp asserts it).
///
///   std::string out;
///   binary::put<std::uint32_t>(out, 7);
///   binary::put<std::uint64_t>(out, binary::fnv1a(out.data(), out.size()));
///   binary::write_file("x.bin", out, "my::save");
///
///   const std::string bytes = binary::read_file("x.bin", "my::load");
///   binary::reader r(bytes, "my::load: 'x.bin'");
///   const auto n = r.get<std::uint32_t>("the count");   // "...: truncated while reading the count (...)"

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>

#include "error.hpp"

namespace trident::binary {

/// FNV-1a's 64-bit offset basis and prime (Fowler, Noll, Vo).
inline constexpr std::uint64_t fnv1a_offset_basis = 14695981039346656037ull;
inline constexpr std::uint64_t fnv1a_prime = 1099511628211ull;

/// The 64-bit FNV-1a hash of n bytes at p, started from `basis` (FNV's offset basis unless a
/// format was defined with another).
constexpr std::uint64_t fnv1a(const char* p, std::size_t n, std::uint64_t basis = fnv1a_offset_basis) noexcept {
  std::uint64_t h = basis;
  for (std::size_t i = 0; i < n; ++i) {
    h ^= static_cast<unsigned char>(p[i]);
    h *= fnv1a_prime;
  }
  return h;
}
// The published FNV-1a 64-bit test vectors (Noll's FNV test suite).
static_assert(fnv1a("", 0) == 0xcbf29ce484222325ull && fnv1a("a", 1) == 0xaf63dc4c8601ec8cull &&
              fnv1a("foobar", 6) == 0x85944171f73967e8ull);

/// Appends the bytes of `v` to `out`.
template <class T>
void put(std::string& out, T v) {
  static_assert(std::is_trivially_copyable_v<T>, "trident::binary::put: T must be trivially copyable");
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  out.append(b, sizeof(T));
}

/// Reads fields from a run of bytes in order. Every error is a trident::error that starts with
/// the context the reader was made with (who reads which file) and names what was being read.
class reader {
 public:
  /// A reader of `bytes` (not copied: they must outlive it) from offset `pos`.
  reader(std::string_view bytes, std::string context, std::size_t pos = 0)
      : bytes_(bytes), context_(std::move(context)), pos_(pos) {}

  /// Throws error "<context>: <what>".
  [[noreturn]] void fail(const std::string& what) const { throw error(context_ + ": " + what); }

  /// Fails, naming `what`, the offset and the bytes left, unless n more bytes are there.
  void need(std::size_t n, const std::string& what) const {
    if (left() < n) {
      fail("truncated while reading " + what + " (" + std::to_string(n) + " bytes needed at offset " + std::to_string(pos_) +
           ", " + std::to_string(left()) + " left)");
    }
  }

  /// Skips the next bytes when they are `expected` (a file's magic); fails with `what` when
  /// they are not.
  void expect(std::string_view expected, const std::string& what) {
    if (left() < expected.size() || bytes_.substr(pos_, expected.size()) != expected) fail(what);
    pos_ += expected.size();
  }

  /// The next sizeof(T) bytes as a T.
  template <class T>
  T get(const std::string& what) {
    static_assert(std::is_trivially_copyable_v<T>, "trident::binary::reader::get: T must be trivially copyable");
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  /// The next n bytes, copied to dst.
  void read(void* dst, std::size_t n, const std::string& what) {
    need(n, what);
    if (n != 0) std::memcpy(dst, bytes_.data() + pos_, n);
    pos_ += n;
  }

  /// The next n bytes as a string.
  std::string get_string(std::size_t n, const std::string& what) {
    need(n, what);
    std::string s(bytes_.substr(pos_, n));
    pos_ += n;
    return s;
  }

  std::size_t pos() const noexcept { return pos_; }
  std::size_t left() const noexcept { return bytes_.size() - pos_; }

 private:
  std::string_view bytes_;
  std::string context_;
  std::size_t pos_;
};

/// The whole of `path`, read in one call of its size. Errors start with `who`.
inline std::string read_file(const std::filesystem::path& path, const std::string& who) {
  const std::string file = path.string();
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw error(who + ": cannot open '" + file + "': " + std::strerror(errno));
  const std::streamoff length = f.tellg();
  if (length < 0) throw error(who + ": cannot read '" + file + "'");
  std::string bytes(static_cast<std::size_t>(length), '\0');
  f.seekg(0);
  if (!f.read(bytes.data(), length)) throw error(who + ": reading '" + file + "' failed");
  return bytes;
}

/// Writes `bytes` to `path.tmp`, then renames it over `path`: a reader of `path` sees the old
/// file or the whole new one. The temporary is removed when writing or renaming fails. Errors
/// start with `who`.
inline void write_file(const std::filesystem::path& path, std::string_view bytes, const std::string& who) {
  const std::filesystem::path tmp = path.string() + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw error(who + ": cannot create '" + tmp.string() + "': " + std::strerror(errno));
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    f.flush();
    if (!f) {
      std::error_code ec;
      std::filesystem::remove(tmp, ec);
      throw error(who + ": writing '" + tmp.string() + "' failed (disk full?)");
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::error_code ec2;
    std::filesystem::remove(tmp, ec2);
    throw error(who + ": cannot rename '" + tmp.string() + "' to '" + path.string() + "': " + ec.message());
  }
}

}  // namespace trident::binary
