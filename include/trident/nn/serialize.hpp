#pragma once
/// @file nn/serialize.hpp
/// Saving and loading a model's weights: every tensor of a parameter_store by name and
/// shape, as fp32 (the master weights), in one self-checking file.
///
/// Format (little-endian): "TRDNTW01"; u64 tensor count; per tensor u32 name length, the
/// name, u32 rank, u64 extents, then the fp32 values; finally the u64 FNV-1a hash of all the
/// bytes before it, started from detail::weights_checksum_seed (not FNV's offset basis). A
/// save writes `path.tmp` and renames it over `path` (core/binary.hpp), so an interrupted
/// save never leaves a truncated file in place; a load parses and checks the whole file
/// (hash, names, shapes, finite values) before it changes the store, so a bad file leaves
/// the model as it was.
///
///   nn::save_weights(store, "model.bin");
///   nn::load_weights(store, "model.bin");   // same architecture: names and shapes must match

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "../core/binary.hpp"
#include "../core/error.hpp"
#include "../ops/transfer.hpp"
#include "parameters.hpp"

namespace trident::nn {

namespace detail {

inline constexpr char weights_magic[8] = {'T', 'R', 'D', 'N', 'T', 'W', '0', '1'};

/// The start of this format's FNV-1a checksum: 1469598103934665603, a digit short of FNV's
/// offset basis (14695981039346656037). Files have been written with it since the format
/// began, so it stays: with the standard basis none of them would load.
inline constexpr std::uint64_t weights_checksum_seed = 1469598103934665603ull;

inline std::uint64_t weights_checksum(const char* p, std::size_t n) noexcept {
  return binary::fnv1a(p, n, weights_checksum_seed);
}

}  // namespace detail

/// Writes every tensor of `store` (its master weights, as fp32) to `path`.
template <class Policy>
void save_weights(parameter_store<Policy>& store, const std::filesystem::path& path) {
  if (!store.allocated()) throw error("nn::save_weights: the store is not allocated");
  std::string out(detail::weights_magic, sizeof detail::weights_magic);
  binary::put<std::uint64_t>(out, store.infos().size());
  const auto master = to_vector(store.master());
  for (const auto& info : store.infos()) {
    binary::put<std::uint32_t>(out, static_cast<std::uint32_t>(info.name.size()));
    out += info.name;
    binary::put<std::uint32_t>(out, static_cast<std::uint32_t>(info.extents.rank()));
    for (int d = 0; d < info.extents.rank(); ++d) binary::put<std::uint64_t>(out, static_cast<std::uint64_t>(info.extents[d]));
    for (index_t i = 0; i < info.numel(); ++i) {
      binary::put<float>(out, static_cast<float>(master[static_cast<std::size_t>(info.offset + i)]));
    }
  }
  binary::put<std::uint64_t>(out, detail::weights_checksum(out.data(), out.size()));
  binary::write_file(path, out, "nn::save_weights");
}

/// Reads weights saved by save_weights into `store` (master weights, then the parameters in
/// the storage type). The file must hold exactly the store's tensors, by name and shape.
template <class Policy>
void load_weights(parameter_store<Policy>& store, const std::filesystem::path& path) {
  if (!store.allocated()) throw error("nn::load_weights: the store is not allocated");
  const std::string bytes = binary::read_file(path, "nn::load_weights");
  const std::string file = path.string();
  if (bytes.size() < sizeof detail::weights_magic + 16 ||
      std::memcmp(bytes.data(), detail::weights_magic, sizeof detail::weights_magic) != 0) {
    throw error("nn::load_weights: '" + file + "' is not a trident weights file");
  }
  std::uint64_t stored_hash;
  std::memcpy(&stored_hash, bytes.data() + bytes.size() - 8, 8);
  if (detail::weights_checksum(bytes.data(), bytes.size() - 8) != stored_hash) {
    throw error("nn::load_weights: '" + file + "' is corrupt (checksum mismatch)");
  }
  // The fields, up to the checksum.
  binary::reader r(std::string_view(bytes).substr(0, bytes.size() - 8), "nn::load_weights: '" + file + "'",
                   sizeof detail::weights_magic);
  const auto count = r.get<std::uint64_t>("the tensor count");
  if (count != store.infos().size()) {
    throw error("nn::load_weights: '" + file + "' holds " + std::to_string(count) + " tensors, the model has " +
                std::to_string(store.infos().size()));
  }
  std::vector<double> values(static_cast<std::size_t>(store.size()), 0.0);  // padding stays 0
  std::vector<bool> seen(store.infos().size(), false);
  for (std::uint64_t t = 0; t < count; ++t) {
    const auto len = r.get<std::uint32_t>("a name length");
    const std::string name = r.get_string(len, "a name");
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
  if (r.left() != 0) throw error("nn::load_weights: '" + file + "' has trailing bytes");
  using M = typename parameter_store<Policy>::master_type;
  std::vector<M> cast(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) cast[i] = static_cast<M>(values[i]);
  copy(from_vector<M, typename Policy::device>({store.size()}, cast), store.master());
  store.params_from_master();
}

}  // namespace trident::nn
