# The library targets. Used by the top-level CMakeLists.txt (add_subdirectory or a build of
# trident itself); an installed trident gets the same targets from tridentConfig.cmake.
#
#   trident::trident  headers, C++20 (always)
#   trident::openmp   + OpenMP threads in the CPU kernels
#   trident::mpi      + MPI (for trident/mpi.hpp)
#   trident::io       + zlib (for trident/io.hpp: IDX/.gz datasets such as Fashion-MNIST)
#   trident::json     + nlohmann/json (for trident/config/deepspeed.hpp: DeepSpeed JSON configs)
#   trident::cuda     + CUDA runtime, cuBLAS/cuBLASLt (for trident/cuda.hpp, nvcc TUs)

include(GNUInstallDirs)  # CMAKE_INSTALL_INCLUDEDIR for the install interface below

add_library(trident INTERFACE)
add_library(trident::trident ALIAS trident)
target_include_directories(trident INTERFACE
  $<BUILD_INTERFACE:${CMAKE_CURRENT_SOURCE_DIR}/include>
  $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
target_compile_features(trident INTERFACE cxx_std_20)
set_target_properties(trident PROPERTIES EXPORT_NAME trident)

find_package(OpenMP COMPONENTS CXX)
if(OpenMP_CXX_FOUND)
  add_library(trident_openmp INTERFACE)
  add_library(trident::openmp ALIAS trident_openmp)
  target_link_libraries(trident_openmp INTERFACE trident OpenMP::OpenMP_CXX)
  set_target_properties(trident_openmp PROPERTIES EXPORT_NAME openmp)
endif()

find_package(MPI COMPONENTS CXX)
if(MPI_CXX_FOUND)
  add_library(trident_mpi INTERFACE)
  add_library(trident::mpi ALIAS trident_mpi)
  target_link_libraries(trident_mpi INTERFACE trident MPI::MPI_CXX)
  set_target_properties(trident_mpi PROPERTIES EXPORT_NAME mpi)
endif()

find_package(ZLIB)
if(ZLIB_FOUND)
  add_library(trident_io INTERFACE)
  add_library(trident::io ALIAS trident_io)
  target_link_libraries(trident_io INTERFACE trident ZLIB::ZLIB)
  set_target_properties(trident_io PROPERTIES EXPORT_NAME io)
endif()

find_package(nlohmann_json 3 QUIET)
if(nlohmann_json_FOUND)
  add_library(trident_json INTERFACE)
  add_library(trident::json ALIAS trident_json)
  target_link_libraries(trident_json INTERFACE trident nlohmann_json::nlohmann_json)
  set_target_properties(trident_json PROPERTIES EXPORT_NAME json)
endif()

set(TRIDENT_HAS_CUDA OFF)
if(NOT TRIDENT_CUDA STREQUAL "OFF")
  if(NOT DEFINED CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      # Hopper plus one older generation (Ampere).
      set(CMAKE_CUDA_ARCHITECTURES 90 80)
    endif()
    enable_language(CUDA)
    find_package(CUDAToolkit)
  endif()
  if(CMAKE_CUDA_COMPILER AND CUDAToolkit_FOUND)
    set(TRIDENT_HAS_CUDA ON)
    add_library(trident_cuda INTERFACE)
    add_library(trident::cuda ALIAS trident_cuda)
    target_link_libraries(trident_cuda INTERFACE trident CUDA::cudart CUDA::cublas CUDA::cublasLt)
    target_compile_options(trident_cuda INTERFACE
      # CMake 3.25 does not know CUDA 13's language levels, so the standard is passed directly.
      $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20 --expt-relaxed-constexpr --extended-lambda>)
    set_target_properties(trident_cuda PROPERTIES EXPORT_NAME cuda)
  elseif(TRIDENT_CUDA STREQUAL "ON")
    message(FATAL_ERROR "TRIDENT_CUDA=ON but no CUDA compiler or CUDA Toolkit was found")
  endif()
endif()
message(STATUS "trident: OpenMP ${OpenMP_CXX_FOUND}, MPI ${MPI_CXX_FOUND}, zlib ${ZLIB_FOUND}, nlohmann_json ${nlohmann_json_FOUND}, CUDA ${TRIDENT_HAS_CUDA}")

# Flags for trident's own tests, examples and benchmarks (never imposed on consumers).
add_library(trident_project_options INTERFACE)
target_compile_options(trident_project_options INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic>)
if(TRIDENT_NATIVE)
  target_compile_options(trident_project_options INTERFACE
    $<$<COMPILE_LANGUAGE:CXX>:-march=native>
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-march=native>)
endif()
