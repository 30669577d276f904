#pragma once
/// @file quant/storage.hpp
/// Saving and loading quantized weights: a model's quantized layers, by name, in one file
/// whose size is the packed values and fp32 scales plus a few dozen bytes per layer.
///
///   std::vector<quant::weight_entry> layers;
///   layers.push_back({"fc1.weight", quant::groupwise_weight<quant::int4_t>::quantize(w1, 1024, 1024, 1024, 128)});
///   layers.push_back({"fc2.weight", quant::packed_int8_weight::quantize(w2, 10, 1024, 1024)});
///   quant::save("model.tqw", layers);
///   auto loaded = quant::load("model.tqw");          // same entries, same order, bit for bit
///   const auto& w = quant::get<quant::groupwise_weight<quant::int4_t>>(loaded, "fc1.weight");
///
/// Format (little-endian):
///
///   header (32 bytes)  "TRDNTQW\n", u32 version (1), u32 entry count, u64 file size,
///                      u64 FNV-1a hash of every byte after the header
///   per entry          u32 format (1 int8 per channel, 2 int8 group-wise, 3 int4 group-wise),
///                      u32 name length, the name, u64 out, u64 in, u64 group (in for per
///                      channel), u64 value bytes, u64 scale count, the packed values
///                      (row-major; int8 one per byte, int4 two per byte with the first in
///                      the low nibble: ONNX's order), the fp32 scales (row-major)
///
/// A save writes `path.tmp` and renames it over `path`, so an interrupted save never leaves
/// a partial file in place. A load checks, in order, the magic, the version, the size
/// against the header (a truncated file says so), the hash, and then each entry (known
/// format, dims that fit the format, value and scale counts that match the dims, finite
/// positive scales, no duplicate names, nothing left over). Every error names the file and
/// what is wrong.

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "../core/binary.hpp"
#include "../core/error.hpp"
#include "onnx.hpp"
#include "packed_int8.hpp"
#include "weight_only.hpp"

namespace trident::quant {

/// The formats a quantized-weights file holds; the values are those written to disk.
enum class weight_format : std::uint32_t {
  int8_per_channel = 1,  ///< packed_int8_weight: int8, one scale per output row
  int8_groupwise = 2,    ///< groupwise_weight<std::int8_t>
  int4_groupwise = 3,    ///< groupwise_weight<int4_t>
};

/// Name of a format, for messages.
constexpr const char* to_string(weight_format f) noexcept {
  switch (f) {
    case weight_format::int8_per_channel: return "int8 per-channel";
    case weight_format::int8_groupwise: return "int8 group-wise";
    case weight_format::int4_groupwise: return "int4 group-wise";
  }
  return "?";
}

/// A quantized weight of any storable format.
using stored_weight = std::variant<packed_int8_weight, groupwise_weight<std::int8_t>, groupwise_weight<int4_t>>;

/// One named layer of a quantized-weights file.
struct weight_entry {
  std::string name;
  stored_weight weight;
};

/// The format of a stored weight.
inline weight_format format_of(const stored_weight& w) noexcept {
  switch (w.index()) {
    case 0: return weight_format::int8_per_channel;
    case 1: return weight_format::int8_groupwise;
    default: return weight_format::int4_groupwise;
  }
}

/// The ideal storage of a weight: its values at 8 or 4 bits plus its fp32 scales.
inline std::size_t ideal_bytes(const stored_weight& w) noexcept {
  return std::visit(
      [](const auto& x) -> std::size_t {
        const auto values = static_cast<std::size_t>(x.out() * x.in());
        const std::size_t scales = x.scales().size() * sizeof(float);
        if constexpr (std::is_same_v<std::decay_t<decltype(x)>, groupwise_weight<int4_t>>) {
          return values / 2 + scales;
        } else {
          return values + scales;
        }
      },
      w);
}

/// The weight called `name` in `entries`, as type W; throws error when there is none, or
/// when it has another format.
template <class W>
const W& get(const std::vector<weight_entry>& entries, const std::string& name) {
  for (const auto& e : entries) {
    if (e.name != name) continue;
    if (const W* w = std::get_if<W>(&e.weight)) return *w;
    throw error("quant::get: '" + name + "' is stored as " + to_string(format_of(e.weight)) + ", not the type asked for");
  }
  throw error("quant::get: no weight named '" + name + "'");
}

namespace detail {

inline constexpr char storage_magic[8] = {'T', 'R', 'D', 'N', 'T', 'Q', 'W', '\n'};
inline constexpr std::uint32_t storage_version = 1;
inline constexpr std::size_t storage_header_bytes = 32;

static_assert(std::endian::native == std::endian::little, "quant/storage.hpp writes and reads little-endian hosts");

/// Appends one entry to `out`.
inline void put_entry(std::string& out, const weight_entry& e) {
  const weight_format f = format_of(e.weight);
  binary::put<std::uint32_t>(out, static_cast<std::uint32_t>(f));
  binary::put<std::uint32_t>(out, static_cast<std::uint32_t>(e.name.size()));
  out += e.name;
  std::visit(
      [&](const auto& w) {
        using W = std::decay_t<decltype(w)>;
        const index_t group = [&] {
          if constexpr (std::is_same_v<W, packed_int8_weight>) {
            return w.in();
          } else {
            return w.group();
          }
        }();
        binary::put<std::uint64_t>(out, static_cast<std::uint64_t>(w.out()));
        binary::put<std::uint64_t>(out, static_cast<std::uint64_t>(w.in()));
        binary::put<std::uint64_t>(out, static_cast<std::uint64_t>(group));
        if constexpr (std::is_same_v<W, packed_int8_weight>) {
          // The packed layout belongs to this CPU's kernels: store the plain row-major values.
          binary::put<std::uint64_t>(out, static_cast<std::uint64_t>(w.out() * w.in()));
          binary::put<std::uint64_t>(out, static_cast<std::uint64_t>(w.scales().size()));
          const std::size_t at = out.size();
          out.resize(at + static_cast<std::size_t>(w.out() * w.in()));
          char* dst = out.data() + at;
          for (index_t j = 0; j < w.out(); ++j) {
            for (index_t k = 0; k < w.in(); ++k) dst[j * w.in() + k] = static_cast<char>(w.value(j, k));
          }
        } else {
          binary::put<std::uint64_t>(out, static_cast<std::uint64_t>(w.data().size()));
          binary::put<std::uint64_t>(out, static_cast<std::uint64_t>(w.scales().size()));
          out.append(reinterpret_cast<const char*>(w.data().data()), w.data().size());
        }
        out.append(reinterpret_cast<const char*>(w.scales().data()), w.scales().size() * sizeof(float));
      },
      e.weight);
}

/// Reads one entry (number `index`) at r's position.
inline weight_entry get_entry(binary::reader& r, std::uint32_t index) {
  const std::string at = "entry " + std::to_string(index);
  const auto format = r.get<std::uint32_t>(at + "'s format");
  if (format < 1 || format > 3) {
    r.fail(at + " has an unknown format " + std::to_string(format) + " (1 int8 per-channel, 2 int8 group-wise, 3 int4 group-wise)");
  }
  const auto f = static_cast<weight_format>(format);
  const auto len = r.get<std::uint32_t>(at + "'s name length");
  weight_entry e;
  e.name.resize(len);
  r.read(e.name.data(), len, at + "'s name");
  const std::string what = at + " '" + e.name + "' (" + to_string(f) + ")";
  const auto out = r.get<std::uint64_t>(what + ": out");
  const auto in = r.get<std::uint64_t>(what + ": in");
  const auto group = r.get<std::uint64_t>(what + ": group");
  const auto value_bytes = r.get<std::uint64_t>(what + ": the value byte count");
  const auto scale_count = r.get<std::uint64_t>(what + ": the scale count");
  // Dims: positive, small enough that their products cannot overflow, and fitting the format.
  constexpr std::uint64_t dim_max = std::uint64_t(1) << 31;
  const std::string dims =
      "out " + std::to_string(out) + ", in " + std::to_string(in) + ", group " + std::to_string(group);
  if (out == 0 || in == 0 || group == 0 || out > dim_max || in > dim_max || group > in) {
    r.fail(what + " has bad dims: " + dims + " (each must be positive, at most 2^31, group at most in)");
  }
  if (in % group != 0) r.fail(what + " has bad dims: " + dims + " (in is not a multiple of the group)");
  if (f == weight_format::int8_per_channel && group != in) {
    r.fail(what + " has bad dims: " + dims + " (a per-channel weight has one group per row)");
  }
  if (f == weight_format::int4_groupwise && in % 2 != 0) {
    r.fail(what + " has bad dims: " + dims + " (int4 rows need an even in)");
  }
  const std::uint64_t expect_values = f == weight_format::int4_groupwise ? out * in / 2 : out * in;
  const std::uint64_t expect_scales = out * (in / group);
  if (value_bytes != expect_values) {
    r.fail(what + " holds " + std::to_string(value_bytes) + " value bytes, its dims (" + dims + ") take " +
           std::to_string(expect_values));
  }
  if (scale_count != expect_scales) {
    r.fail(what + " holds " + std::to_string(scale_count) + " scales, its dims (" + dims + ") take " +
           std::to_string(expect_scales));
  }
  r.need(static_cast<std::size_t>(value_bytes + scale_count * sizeof(float)), what + "'s values and scales");
  std::vector<std::uint8_t> values(static_cast<std::size_t>(value_bytes));
  std::vector<float> scales(static_cast<std::size_t>(scale_count));
  r.read(values.data(), values.size(), what + "'s values");
  r.read(scales.data(), scales.size() * sizeof(float), what + "'s scales");
  for (std::size_t i = 0; i < scales.size(); ++i) {
    if (!(scales[i] > 0.0f) || !std::isfinite(scales[i])) {
      r.fail(what + ": scale " + std::to_string(i) + " is " + std::to_string(scales[i]) +
             ", it must be finite and positive");
    }
  }
  try {
    const auto o = static_cast<index_t>(out), n = static_cast<index_t>(in), g = static_cast<index_t>(group);
    switch (f) {
      case weight_format::int8_per_channel:
        e.weight.emplace<packed_int8_weight>(reinterpret_cast<const std::int8_t*>(values.data()), scales.data(), o, n);
        break;
      case weight_format::int8_groupwise:
        e.weight = groupwise_weight<std::int8_t>::from_packed(std::move(values), std::move(scales), o, n, g, e.name);
        break;
      case weight_format::int4_groupwise:
        e.weight = groupwise_weight<int4_t>::from_packed(std::move(values), std::move(scales), o, n, g, e.name);
        break;
    }
  } catch (const error& ex) {
    r.fail(what + ": " + ex.what());
  }
  return e;
}

}  // namespace detail

/// Writes `entries` to `path` (see the file comment for the format): to `path.tmp` first,
/// renamed over `path` once complete. Names must be unique.
inline void save(const std::filesystem::path& path, const std::vector<weight_entry>& entries) {
  const std::string file = path.string();
  if (entries.size() > 0xFFFFFFFFu) throw error("quant::save: '" + file + "': too many entries");
  for (std::size_t i = 0; i < entries.size(); ++i) {
    if (entries[i].name.size() > 0xFFFFFFFFu) throw error("quant::save: '" + file + "': a name is too long");
    for (std::size_t j = 0; j < i; ++j) {
      if (entries[j].name == entries[i].name) {
        throw error("quant::save: '" + file + "': two entries are named '" + entries[i].name + "'");
      }
    }
    if (std::visit([](const auto& w) { return w.out() <= 0 || w.in() <= 0; }, entries[i].weight)) {
      throw error("quant::save: '" + file + "': entry '" + entries[i].name + "' holds no weights");
    }
  }
  std::size_t total = detail::storage_header_bytes;
  for (const auto& e : entries) total += 48 + e.name.size() + ideal_bytes(e.weight);
  std::string out;
  out.reserve(total);
  out.append(detail::storage_magic, sizeof detail::storage_magic);
  binary::put<std::uint32_t>(out, detail::storage_version);
  binary::put<std::uint32_t>(out, static_cast<std::uint32_t>(entries.size()));
  binary::put<std::uint64_t>(out, 0);  // file size, filled in below
  binary::put<std::uint64_t>(out, 0);  // hash, filled in below
  for (const auto& e : entries) detail::put_entry(out, e);
  const std::uint64_t size = out.size();
  const std::uint64_t hash =
      binary::fnv1a(out.data() + detail::storage_header_bytes, out.size() - detail::storage_header_bytes);
  std::memcpy(out.data() + 16, &size, 8);
  std::memcpy(out.data() + 24, &hash, 8);

  binary::write_file(path, out, "quant::save");
}

/// Reads a file written by save: its entries in the order they were saved, bit for bit.
/// Throws error naming the file and the problem (see the file comment for the checks).
inline std::vector<weight_entry> load(const std::filesystem::path& path) {
  const std::string file = path.string();
  const std::string bytes = binary::read_file(path, "quant::load");
  binary::reader r(bytes, "quant::load: '" + file + "'");
  r.expect({detail::storage_magic, sizeof detail::storage_magic}, "not a trident quantized-weights file (bad magic)");
  const auto version = r.get<std::uint32_t>("the version");
  if (version != detail::storage_version) {
    r.fail("version " + std::to_string(version) + " is not supported (this build reads version " +
           std::to_string(detail::storage_version) + ")");
  }
  const auto count = r.get<std::uint32_t>("the entry count");
  const auto size = r.get<std::uint64_t>("the file size");
  const auto hash = r.get<std::uint64_t>("the hash");
  if (bytes.size() < size) {
    r.fail("truncated: " + std::to_string(bytes.size()) + " bytes, the header says " + std::to_string(size));
  }
  if (bytes.size() > size) {
    r.fail(std::to_string(bytes.size() - size) + " bytes after the end the header gives (" + std::to_string(size) + ")");
  }
  if (binary::fnv1a(bytes.data() + detail::storage_header_bytes, bytes.size() - detail::storage_header_bytes) != hash) {
    r.fail("corrupt (hash mismatch)");
  }
  std::vector<weight_entry> entries;
  entries.reserve(std::min<std::size_t>(count, bytes.size() / 48));  // a corrupt count cannot reserve much
  for (std::uint32_t i = 0; i < count; ++i) {
    weight_entry e = detail::get_entry(r, i);
    for (const auto& prev : entries) {
      if (prev.name == e.name) r.fail("entry " + std::to_string(i) + ": the name '" + e.name + "' appears twice");
    }
    entries.push_back(std::move(e));
  }
  if (r.left() != 0) {
    r.fail(std::to_string(r.left()) + " bytes left over after " + std::to_string(count) + " entries");
  }
  return entries;
}

}  // namespace trident::quant
