#pragma once
/// @file io/idx.hpp
/// A reader for IDX files, the format of MNIST and Fashion-MNIST: a big-endian magic number
/// 0x0000TTRR (TT the element type, 0x08 for unsigned bytes; RR the rank), RR big-endian
/// uint32 dimensions, then the elements in row-major order. Files may be gzip-compressed
/// (recognised by their first two bytes, 1f 8b, not by their name) or plain.
///
/// Needs zlib: link ZLIB::ZLIB (the trident::io CMake component does). Every failure throws
/// io_error naming the file and what is wrong with it; nothing partially read is returned.
/// Bytes after the end of a gzip stream are ignored, as zlib's gzread and gzip(1) do; bytes
/// after the IDX data inside the stream (or in a plain file) are an error.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "../core/error.hpp"

namespace trident::io {

/// A file that cannot be read as what it should be: missing, unreadable, corrupt, truncated or
/// of the wrong kind. The message names the file and the problem, with the values involved.
class io_error : public error {
 public:
  using error::error;
};

/// IDX element type code for unsigned bytes (the only one MNIST-style files use).
inline constexpr std::uint32_t idx_ubyte = 0x08;
/// Magic number of an IDX file of unsigned bytes with `rank` dimensions.
constexpr std::uint32_t idx_magic(int rank) noexcept { return (idx_ubyte << 8) | static_cast<std::uint32_t>(rank); }
/// Magic of a 3-D unsigned-byte file (images: count, rows, columns).
inline constexpr std::uint32_t idx_images_magic = 0x00000803;
/// Magic of a 1-D unsigned-byte file (labels).
inline constexpr std::uint32_t idx_labels_magic = 0x00000801;

/// The contents of an IDX file of unsigned bytes.
struct idx_data {
  std::vector<std::uint32_t> dims;  ///< extents, first dimension slowest (e.g. {60000, 28, 28})
  std::vector<std::uint8_t> values;  ///< the elements, row-major; size() == product of dims

  /// Number of elements the dimensions describe.
  std::size_t count() const noexcept {
    std::size_t n = 1;
    for (auto d : dims) n *= d;
    return n;
  }
  /// "(60000, 28, 28)".
  std::string dims_str() const {
    std::string s = "(";
    for (std::size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
    return s + ")";
  }
};

namespace detail {

/// "0x00000803".
inline std::string hex32(std::uint32_t v) {
  char buf[11];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

/// Name of an IDX element type code, for messages.
inline const char* idx_type_name(std::uint32_t t) noexcept {
  switch (t) {
    case 0x08: return "unsigned byte";
    case 0x09: return "signed byte";
    case 0x0B: return "int16";
    case 0x0C: return "int32";
    case 0x0D: return "float32";
    case 0x0E: return "float64";
    default: return "unknown type";
  }
}

/// A file read sequentially, through zlib when it starts with the gzip magic (1f 8b) and with
/// read(2) otherwise. Short reads mean end of data; errors throw io_error.
class byte_source {
 public:
  /// Opens `path`; `who` prefixes messages (e.g. "trident::io::read_idx").
  byte_source(const std::filesystem::path& path, std::string who) : where_(std::move(who) + ": " + path.string()) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) fail("cannot open: " + errno_str(errno));
    struct stat st {};
    if (::fstat(fd_, &st) != 0) fail("cannot stat: " + errno_str(errno));
    if (S_ISDIR(st.st_mode)) fail("cannot read: it is a directory");
    if (S_ISREG(st.st_mode)) file_size_ = static_cast<std::uint64_t>(st.st_size);
    unsigned char magic[2] = {0, 0};
    const ssize_t got = ::pread(fd_, magic, 2, 0);
    if (got < 0) fail("read error: " + errno_str(errno));
    if (got == 2 && magic[0] == 0x1f && magic[1] == 0x8b) {
      gz_ = ::gzdopen(fd_, "rb");
      if (!gz_) fail("cannot start gzip decompression (out of memory)");
      fd_ = -1;  // gzclose closes it now
      ::gzbuffer(gz_, 1u << 20);  // 1 MiB reads instead of 8 KiB: fewer system calls (a few percent here)
    }
  }
  byte_source(const byte_source&) = delete;
  byte_source& operator=(const byte_source&) = delete;
  ~byte_source() {
    if (gz_) ::gzclose_r(gz_);
    if (fd_ >= 0) ::close(fd_);
  }

  /// "trident::io::read_idx: /path/to/file"
  const std::string& where() const noexcept { return where_; }
  bool gzipped() const noexcept { return gz_ != nullptr; }
  /// Size of a plain regular file in bytes (0 when compressed or not a regular file).
  std::uint64_t plain_size() const noexcept { return gz_ ? 0 : file_size_; }
  /// Set when the last short read came from a gzip stream that ends before its trailer.
  bool gzip_cut_short() const noexcept { return cut_short_; }

  /// Reads up to n bytes into buf; fewer only at the end of the data.
  std::size_t read(void* buf, std::size_t n) {
    auto* p = static_cast<unsigned char*>(buf);
    std::size_t total = 0;
    while (total < n) {
      const std::size_t want = std::min<std::size_t>(n - total, std::size_t{1} << 30);
      if (gz_) {
        const int got = ::gzread(gz_, p + total, static_cast<unsigned>(want));
        if (got > 0) {
          total += static_cast<std::size_t>(got);
          continue;
        }
        int err = Z_OK;
        const char* msg = ::gzerror(gz_, &err);
        if (err == Z_OK) break;  // end of the gzip stream
        if (err == Z_BUF_ERROR) {  // the compressed data stops before its end
          cut_short_ = true;
          zlib_msg_ = zlib_message(msg);
          break;
        }
        if (err == Z_ERRNO) fail("read error: " + errno_str(errno));
        if (err == Z_MEM_ERROR) fail("out of memory while decompressing");
        fail("corrupt gzip data (zlib: " + zlib_message(msg) + ")");
      } else {
        const ssize_t got = ::read(fd_, p + total, want);
        if (got > 0) {
          total += static_cast<std::size_t>(got);
        } else if (got == 0) {
          break;
        } else if (errno != EINTR) {
          fail("read error: " + errno_str(errno));
        }
      }
    }
    return total;
  }

  /// " (the gzip stream is cut short: zlib: unexpected end of file)" after a cut-short read, else "".
  std::string cut_short_note() const {
    return cut_short_ ? " (the gzip stream is cut short: zlib: " + zlib_msg_ + ")" : std::string();
  }

  /// Throws io_error "<where>: <what>".
  [[noreturn]] void fail(const std::string& what) const { throw io_error(where_ + ": " + what); }

 private:
  static std::string errno_str(int e) { return std::strerror(e); }
  /// gzerror's text is "<fd:N>: message" for a gzdopen'ed file; keep the message.
  static std::string zlib_message(const char* msg) {
    std::string s = msg ? msg : "unknown error";
    if (s.rfind("<fd:", 0) == 0) {
      const auto colon = s.find(": ");
      if (colon != std::string::npos) s.erase(0, colon + 2);
    }
    return s;
  }

  std::string where_;
  int fd_ = -1;
  gzFile gz_ = nullptr;
  std::uint64_t file_size_ = 0;
  bool cut_short_ = false;
  std::string zlib_msg_;
};

}  // namespace detail

/// Reads an IDX file of unsigned bytes with `rank` dimensions (3 for images, 1 for labels),
/// gzip-compressed or plain. Throws io_error when the file cannot be opened, is corrupt
/// gzip data, has another magic, type or rank, holds fewer bytes than its dimensions say
/// (truncated) or more (trailing bytes).
inline idx_data read_idx(const std::filesystem::path& file, int rank) {
  if (rank < 0 || rank > 255) {
    throw io_error("trident::io::read_idx: " + file.string() + ": rank " + std::to_string(rank) + " asked for; IDX ranks are 0..255");
  }
  detail::byte_source src(file, "trident::io::read_idx");
  const std::uint32_t expected = idx_magic(rank);

  unsigned char head[4];
  const std::size_t got_head = src.read(head, 4);
  if (got_head == 0) {
    src.fail(std::string(src.gzipped() ? "no data in the gzip stream" : "the file is empty") + "; expected an IDX header (magic " +
             detail::hex32(expected) + ")" + src.cut_short_note());
  }
  if (got_head < 4) {
    src.fail("truncated header: expected 4 bytes of magic number, got " + std::to_string(got_head) + src.cut_short_note());
  }
  const std::uint32_t magic = (std::uint32_t{head[0]} << 24) | (std::uint32_t{head[1]} << 16) | (std::uint32_t{head[2]} << 8) | head[3];
  if (magic != expected) {
    std::string why;
    if (head[0] != 0 || head[1] != 0) {
      why = "not an IDX file";
    } else if (head[2] != idx_ubyte) {
      why = "wrong data type 0x" + detail::hex32(head[2]).substr(8) + " (" + detail::idx_type_name(head[2]) +
            "), expected 0x08 (unsigned byte)";
    } else {
      why = "wrong rank " + std::to_string(head[3]) + ", expected " + std::to_string(rank);
    }
    src.fail(why + ": magic number " + detail::hex32(magic) + " found, " + detail::hex32(expected) + " expected");
  }

  idx_data out;
  out.dims.resize(static_cast<std::size_t>(rank));
  std::vector<unsigned char> raw(4 * static_cast<std::size_t>(rank));
  const std::size_t got_dims = src.read(raw.data(), raw.size());
  if (got_dims < raw.size()) {
    src.fail("truncated header: expected " + std::to_string(raw.size()) + " bytes of dimensions, got " + std::to_string(got_dims) +
             src.cut_short_note());
  }
  std::uint64_t n = 1;
  bool overflow = false;
  for (int d = 0; d < rank; ++d) {
    const unsigned char* b = raw.data() + 4 * d;
    out.dims[d] = (std::uint32_t{b[0]} << 24) | (std::uint32_t{b[1]} << 16) | (std::uint32_t{b[2]} << 8) | b[3];
    if (out.dims[d] != 0 && n > std::numeric_limits<std::uint64_t>::max() / out.dims[d]) overflow = true;
    n *= out.dims[d];
  }
  const std::uint64_t header_bytes = 4 + raw.size();
  if (overflow || n > std::numeric_limits<std::size_t>::max() / 2) {
    src.fail("dimensions " + out.dims_str() + " describe more bytes than can be held in memory");
  }
  const std::string expect_str = "expected " + std::to_string(n) + " bytes of data for dimensions " + out.dims_str();
  // Plain files: the size says whether the data is all there before anything is allocated.
  if (src.plain_size() && src.plain_size() < header_bytes + n) {
    src.fail("truncated: " + expect_str + ", got " + std::to_string(src.plain_size() - header_bytes));
  }

  // Grow the buffer as data arrives (a corrupt header must not allocate what is not there).
  std::size_t have = 0;
  const std::size_t first_chunk = std::size_t{64} << 20;
  out.values.resize(static_cast<std::size_t>(std::min<std::uint64_t>(n, first_chunk)));
  while (have < n) {
    if (have == out.values.size()) out.values.resize(static_cast<std::size_t>(std::min<std::uint64_t>(n, 2 * have)));
    const std::size_t want = out.values.size() - have;
    const std::size_t got = src.read(out.values.data() + have, want);
    have += got;
    if (got < want) {
      src.fail("truncated: " + expect_str + ", got " + std::to_string(have) + src.cut_short_note());
    }
  }

  // Anything left is an error; reading to the end also makes zlib check the gzip trailer (CRC, length).
  std::uint64_t extra = 0;
  unsigned char sink[1 << 16];
  for (std::size_t got; (got = src.read(sink, sizeof sink)) > 0;) extra += got;
  if (extra) {
    src.fail(std::to_string(extra) + " trailing bytes after the data (" + std::to_string(n) + " bytes for dimensions " + out.dims_str() + ")");
  }
  if (src.gzip_cut_short()) src.fail("truncated gzip file: the data is complete but the gzip trailer is missing" + src.cut_short_note());
  return out;
}

/// Reads a 3-D IDX file of unsigned bytes (magic 0x00000803): images as (count, rows, columns).
inline idx_data read_idx_images(const std::filesystem::path& file) { return read_idx(file, 3); }
/// Reads a 1-D IDX file of unsigned bytes (magic 0x00000801): labels.
inline idx_data read_idx_labels(const std::filesystem::path& file) { return read_idx(file, 1); }

}  // namespace trident::io
