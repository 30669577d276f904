// MPI plumbing, run under mpiexec with 2 and 4 ranks: the environment, and trident's element
// types crossing process boundaries bit-exactly through their MPI datatypes.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <vector>

#include <trident/mpi.hpp>

using namespace trident;

TEST_CASE("every rank sees the world; 2-byte types travel bit-exactly") {
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  REQUIRE(size >= 2);
  // each rank contributes bfloat16/half values that only it can produce
  std::vector<bfloat16> mine_b(3);
  std::vector<half> mine_h(3);
  for (int i = 0; i < 3; ++i) {
    mine_b[static_cast<std::size_t>(i)] = bfloat16(static_cast<float>(rank * 10 + i) + 0.5f);
    mine_h[static_cast<std::size_t>(i)] = half(static_cast<float>(rank * 10 + i) / 3.0f);
  }
  std::vector<bfloat16> all_b(static_cast<std::size_t>(3 * size));
  std::vector<half> all_h(static_cast<std::size_t>(3 * size));
  detail::check_mpi(MPI_Allgather(mine_b.data(), 3, mpi_type<bfloat16>(), all_b.data(), 3, mpi_type<bfloat16>(), MPI_COMM_WORLD),
                    "MPI_Allgather");
  detail::check_mpi(MPI_Allgather(mine_h.data(), 3, mpi_type<half>(), all_h.data(), 3, mpi_type<half>(), MPI_COMM_WORLD),
                    "MPI_Allgather");
  for (int r = 0; r < size; ++r) {
    for (int i = 0; i < 3; ++i) {
      REQUIRE(all_b[static_cast<std::size_t>(r * 3 + i)].bits == bfloat16(static_cast<float>(r * 10 + i) + 0.5f).bits);
      REQUIRE(all_h[static_cast<std::size_t>(r * 3 + i)].bits == half(static_cast<float>(r * 10 + i) / 3.0f).bits);
    }
  }
  // a float sum over ranks: 0 + 1 + ... + (size-1)
  float v = static_cast<float>(rank), total = 0;
  detail::check_mpi(MPI_Allreduce(&v, &total, 1, mpi_type<float>(), MPI_SUM, MPI_COMM_WORLD), "MPI_Allreduce");
  CHECK(total == static_cast<float>(size * (size - 1) / 2));
}

TEST_CASE("MPI failures become mpi_error naming the call") {
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  float x = 0;
  const int code = MPI_Bcast(&x, -1, MPI_FLOAT, 0, MPI_COMM_WORLD);  // negative count
  CHECK(code != MPI_SUCCESS);
  CHECK_THROWS_WITH_AS(detail::check_mpi(code, "MPI_Bcast"), doctest::Contains("MPI_Bcast failed"), mpi_error);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_ARE_FATAL);
}

int main(int argc, char** argv) {
  mpi_environment env(&argc, &argv);
  doctest::Context ctx(argc, argv);
  if (env.rank() != 0) ctx.setOption("out", "/dev/null");  // one report, from rank 0
  const int failed = ctx.run();
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return any;
}
