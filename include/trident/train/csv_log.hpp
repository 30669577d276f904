#pragma once
/// @file train/csv_log.hpp
/// A CSV log of a training run: a header of column names, then one row per record, flushed
/// as written so that a run killed half-way keeps what it logged.

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <span>
#include <string>
#include <vector>

#include "../core/error.hpp"

namespace trident::train {

/// Appends rows of numbers under named columns to a CSV file.
class csv_log {
 public:
  /// Creates (truncates) `path` and writes the header. An empty path logs nothing.
  csv_log(const std::string& path, std::vector<std::string> columns) : columns_(std::move(columns)) {
    if (path.empty()) return;
    f_ = std::fopen(path.c_str(), "w");
    if (!f_) throw error("csv_log: cannot open '" + path + "' for writing: " + std::strerror(errno));
    for (std::size_t i = 0; i < columns_.size(); ++i) std::fprintf(f_, "%s%s", i ? "," : "", columns_[i].c_str());
    std::fputc('\n', f_);
    std::fflush(f_);
  }
  csv_log(const csv_log&) = delete;
  csv_log& operator=(const csv_log&) = delete;
  ~csv_log() {
    if (f_) std::fclose(f_);
  }

  /// One row; the number of values must match the columns.
  void row(std::initializer_list<double> values) { row(std::span<const double>(values.begin(), values.size())); }

  /// The same for a row built at run time (a trainer whose columns depend on its loss).
  void row(std::span<const double> values) {
    if (values.size() != columns_.size()) {
      throw error("csv_log::row: " + std::to_string(values.size()) + " values for " + std::to_string(columns_.size()) +
                  " columns");
    }
    if (!f_) return;
    std::size_t i = 0;
    for (double v : values) std::fprintf(f_, "%s%.9g", i++ ? "," : "", v);
    std::fputc('\n', f_);
    std::fflush(f_);
  }

 private:
  std::vector<std::string> columns_;
  std::FILE* f_ = nullptr;
};

}  // namespace trident::train
