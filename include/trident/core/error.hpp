#pragma once
/// @file error.hpp
/// The exceptions trident throws. Every message names what was wrong and with what values.

#include <stdexcept>
#include <string>

namespace trident {

/// Base of every trident exception.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Operands whose shapes do not fit together; the message names both shapes.
class shape_error : public error {
 public:
  using error::error;
};

/// A device operation (allocation, copy, kernel launch, library call) failed.
class device_error : public error {
 public:
  using error::error;
};

}  // namespace trident
