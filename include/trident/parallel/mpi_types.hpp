#pragma once
/// @file parallel/mpi_types.hpp
/// MPI plumbing: error checking, an RAII environment, and the MPI datatype of each element
/// type (half and bfloat16 travel as 2-byte words; reductions of them are trident's own,
/// accumulated in fp32).

#include <mpi.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "../core/error.hpp"
#include "../precision/bfloat16.hpp"
#include "../precision/half.hpp"

namespace trident {

/// An MPI call failed; the message names the call and MPI's error string.
class mpi_error : public error {
 public:
  using error::error;
};

namespace detail {
inline void check_mpi(int code, const char* call) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, text, &len);
  throw mpi_error(std::string(call) + " failed: " + std::string(text, static_cast<std::size_t>(len)));
}
}  // namespace detail

/// The MPI datatype that carries T.
template <class T>
MPI_Datatype mpi_type() noexcept {
  if constexpr (std::is_same_v<T, float>) return MPI_FLOAT;
  else if constexpr (std::is_same_v<T, double>) return MPI_DOUBLE;
  else if constexpr (std::is_same_v<T, half> || std::is_same_v<T, bfloat16>) return MPI_UINT16_T;
  else if constexpr (std::is_same_v<T, std::int32_t>) return MPI_INT32_T;
  else if constexpr (std::is_same_v<T, std::int64_t>) return MPI_INT64_T;
  else if constexpr (std::is_same_v<T, std::uint8_t>) return MPI_UINT8_T;
  else static_assert(sizeof(T) == 0, "trident::mpi_type<T>: no MPI datatype for T");
}

/// Initialises MPI (with MPI_THREAD_FUNNELED: only the main thread calls MPI, OpenMP threads
/// run kernels) unless already initialised, and finalises it if it initialised it.
class mpi_environment {
 public:
  mpi_environment(int* argc = nullptr, char*** argv = nullptr) {
    int initialised = 0;
    MPI_Initialized(&initialised);
    if (!initialised) {
      int provided = 0;
      detail::check_mpi(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
      owner_ = true;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
  }
  mpi_environment(const mpi_environment&) = delete;
  mpi_environment& operator=(const mpi_environment&) = delete;
  ~mpi_environment() {
    int finalised = 0;
    MPI_Finalized(&finalised);
    if (owner_ && !finalised) MPI_Finalize();
  }

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }

 private:
  bool owner_ = false;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace trident
