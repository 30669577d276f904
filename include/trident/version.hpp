#pragma once
/// @file version.hpp
/// trident's version, as macros (for the preprocessor) and as constants.

#define TRIDENT_VERSION_MAJOR 0
#define TRIDENT_VERSION_MINOR 1
#define TRIDENT_VERSION_PATCH 0
#define TRIDENT_VERSION_STRING "0.1.0"

namespace trident {

/// The library version as a single comparable integer: major*10000 + minor*100 + patch.
inline constexpr int version = TRIDENT_VERSION_MAJOR * 10000 + TRIDENT_VERSION_MINOR * 100 + TRIDENT_VERSION_PATCH;
inline constexpr const char* version_string = TRIDENT_VERSION_STRING;

}  // namespace trident
