#pragma once
/// @file mpi.hpp
/// Opt-in MPI support (link trident::mpi). Brings in <mpi.h>; the rest of trident never does.
/// This header holds the process-level pieces (the environment and the MPI datatypes of
/// trident's element types) and `mpi_comm`, the communicator over MPI.

#include <mpi.h>

#include "trident.hpp"
#include "parallel/mpi_types.hpp"
#include "parallel/mpi_comm.hpp"

