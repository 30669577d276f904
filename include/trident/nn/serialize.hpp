#pragma once
/// @file nn/serialize.hpp
/// Saving and loading a model's weights: every tensor of a parameter_store by name and
/// shape, as fp32 (the master weights), in one self-checking file.
///
/// Format (little-endian): "TRDNTW01"; u64 tensor count; per tensor u32 name length, the
/// name, u32 rank, u64 extents, then the fp32 values; finally the u64 FNV-1a hash of all the
/// bytes before it. A save writes `path.tmp` and renames it over `path`, so an interrupted
/// save never leaves a truncated file in place; a load parses and checks the whole file
/// (hash, names, shapes, finite values) before it changes the store, so a bad file leaves
/// the model as it was.
///
///   nn::save_weights(store, "model.bin");
///   nn::load_weights(store, "model.bin");   // same architecture: names and shapes must match

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../ops/transfer.hpp"
#include "parameters.hpp"

namespace trident::nn {

namespace detail {

inline constexpr char weights_magic[8] = {'T', 'R', 'D', 'N', 'T', 'W', '0', '1'};

inline std::uint64_t fnv1a(const char* p, std::size_t n) noexcept {
  std::uint64_t h = 1469598103934665603ull;
  for (std::size_t i = 0; i < n; ++i) {
    h ^= static_cast<unsigned char>(p[i]);
    h *= 1099511628211ull;
  }
  return h;
}

template <class T>
void put(std::string& out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  out.append(b, sizeof(T));
}

/// Reads the file's fields in order, with errors that name the file and what is wrong.
struct weights_reader {
  const std::string& bytes;
  std::size_t pos = 0;
  std::string file;

  template <class T>
  T get(const char* what) {
    if (bytes.size() - pos < sizeof(T)) throw error("nn::load_weights: '" + file + "' is truncated (reading " + what + ")");
    T v;
    std::memcpy(&v, bytes.data() + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
};

}  // namespace detail

/// Writes every tensor of `store` (its master weights, as fp32) to `path`.
template <class Policy>
void save_weights(parameter_store<Policy>& store, const std::filesystem::path& path) {
  if (!store.allocated()) throw error("nn::save_weights: the store is not allocated");
  std::string out(detail::weights_magic, sizeof detail::weights_magic);
  detail::put<std::uint64_t>(out, store.infos().size());
  const auto master = to_vector(store.master());
  for (const auto& info : store.infos()) {
    detail::put<std::uint32_t>(out, static_cast<std::uint32_t>(info.name.size()));
    out += info.name;
    detail::put<std::uint32_t>(out, static_cast<std::uint32_t>(info.extents.rank()));
    for (int d = 0; d < info.extents.rank(); ++d) detail::put<std::uint64_t>(out, static_cast<std::uint64_t>(info.extents[d]));
    for (index_t i = 0; i < info.numel(); ++i) {
      detail::put<float>(out, static_cast<float>(master[static_cast<std::size_t>(info.offset + i)]));
    }
  }
  detail::put<std::uint64_t>(out, detail::fnv1a(out.data(), out.size()));
  const std::filesystem::path tmp = path.string() + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw error("nn::save_weights: cannot create '" + tmp.string() + "': " + std::strerror(errno));
    f.write(out.data(), static_cast<std::streamsize>(out.size()));
    f.flush();
    if (!f) {
      std::error_code ec;
      std::filesystem::remove(tmp, ec);
      throw error("nn::save_weights: writing '" + tmp.string() + "' failed (disk full?)");
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) throw error("nn::save_weights: cannot rename '" + tmp.string() + "' to '" + path.string() + "': " + ec.message());
}

/// Reads weights saved by save_weights into `store` (master weights, then the parameters in
/// the storage type). The file must hold exactly the store's tensors, by name and shape.
template <class Policy>
void load_weights(parameter_store<Policy>& store, const std::filesystem::path& path) {
  if (!store.allocated()) throw error("nn::load_weights: the store is not allocated");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw error("nn::load_weights: cannot open '" + path.string() + "': " + std::strerror(errno));
  const std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const std::string file = path.string();
  if (bytes.size() < sizeof detail::weights_magic + 16 ||
      std::memcmp(bytes.data(), detail::weights_magic, sizeof detail::weights_magic) != 0) {
    throw error("nn::load_weights: '" + file + "' is not a trident weights file");
  }
  std::uint64_t stored_hash;
  std::memcpy(&stored_hash, bytes.data() + bytes.size() - 8, 8);
  if (detail::fnv1a(bytes.data(), bytes.size() - 8) != stored_hash) {
    throw error("nn::load_weights: '" + file + "' is corrupt (checksum mismatch)");
  }
  detail::weights_reader r{bytes, sizeof detail::weights_magic, file};
  const auto count = r.get<std::uint64_t>("the tensor count");
  if (count != store.infos().size()) {
    throw error("nn::load_weights: '" + file + "' holds " + std::to_string(count) + " tensors, the model has " +
                std::to_string(store.infos().size()));
  }
  std::vector<double> values(static_cast<std::size_t>(store.size()), 0.0);  // padding stays 0
  std::vector<bool> seen(store.infos().size(), false);
  for (std::uint64_t t = 0; t < count; ++t) {
    const auto len = r.get<std::uint32_t>("a name length");
    if (bytes.size() - 8 - r.pos < len) throw error("nn::load_weights: '" + file + "' is truncated (reading a name)");
    const std::string name = bytes.substr(r.pos, len);
    r.pos += len;
    std::size_t k = 0;
    while (k < store.infos().size() && store.infos()[k].name != name) ++k;
    if (k == store.infos().size()) throw error("nn::load_weights: '" + file + "' has a tensor '" + name + "' the model does not");
    if (seen[k]) throw error("nn::load_weights: '" + file + "' holds '" + name + "' twice");
    seen[k] = true;
    const auto& info = store.infos()[k];
    const auto rank = r.get<std::uint32_t>("a rank");
    bool same = rank == static_cast<std::uint32_t>(info.extents.rank());
    std::string file_shape = "(";
    for (std::uint32_t d = 0; d < rank && d < 8; ++d) {
      const auto e = r.get<std::uint64_t>("an extent");
      file_shape += (d ? ", " : "") + std::to_string(e);
      if (same && static_cast<index_t>(e) != info.extents[static_cast<int>(d)]) same = false;
    }
    file_shape += ")";
    if (!same) {
      throw shape_error("nn::load_weights: '" + name + "' is " + file_shape + " in '" + file + "' but " +
                        info.extents.str() + " in the model");
    }
    for (index_t i = 0; i < info.numel(); ++i) {
      const float v = r.get<float>("values");
      if (!std::isfinite(v)) {
        throw error("nn::load_weights: '" + name + "' holds a non-finite value at element " + std::to_string(i) + " in '" +
                    file + "'");
      }
      values[static_cast<std::size_t>(info.offset + i)] = v;
    }
  }
  if (r.pos != bytes.size() - 8) throw error("nn::load_weights: '" + file + "' has trailing bytes");
  using M = typename parameter_store<Policy>::master_type;
  std::vector<M> cast(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) cast[i] = static_cast<M>(values[i]);
  copy(from_vector<M, typename Policy::device>({store.size()}, cast), store.master());
  store.params_from_master();
}

}  // namespace trident::nn
