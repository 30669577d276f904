// A consumer of trident::mpi: the environment and the datatype of bfloat16.
#include <trident/mpi.hpp>

#include <cstdio>

int main(int argc, char** argv) {
  trident::mpi_environment env(&argc, &argv);
  int size = 0;
  MPI_Type_size(trident::mpi_type<trident::bfloat16>(), &size);
  std::printf("rank %d of %d, bfloat16 travels as %d bytes\n", env.rank(), env.size(), size);
  return size == 2 ? 0 : 1;
}
