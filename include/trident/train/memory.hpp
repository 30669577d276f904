#pragma once
/// @file train/memory.hpp
/// Resident memory of the process (Linux /proc), for memory breakdowns of training runs.

#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

namespace trident::train {

namespace detail {
inline std::size_t proc_status_kib(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const std::size_t n = std::strlen(key);
  while (std::getline(in, line)) {
    if (line.compare(0, n, key) == 0) return static_cast<std::size_t>(std::strtoull(line.c_str() + n, nullptr, 10));
  }
  return 0;
}
}  // namespace detail

/// The most resident memory this process has used (VmHWM), in bytes; 0 where unknown.
inline std::size_t peak_resident_bytes() { return detail::proc_status_kib("VmHWM:") * 1024; }
/// Resident memory now (VmRSS), in bytes; 0 where unknown.
inline std::size_t resident_bytes() { return detail::proc_status_kib("VmRSS:") * 1024; }

}  // namespace trident::train
