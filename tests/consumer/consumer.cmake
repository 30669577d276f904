# Consumer tests: build and run tests/consumer against this tree in each way a user can get it.
# find_package consumes an install of this build into <build>/consumer-prefix.
if(NOT TRIDENT_INSTALL)
  return()
endif()
set(_prefix ${CMAKE_BINARY_DIR}/consumer-prefix)
set(_src ${CMAKE_CURRENT_LIST_DIR})
set(_common --build-generator ${CMAKE_GENERATOR} --build-makeprogram ${CMAKE_MAKE_PROGRAM}
    --build-options -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=${CMAKE_CXX_COMPILER})

add_test(NAME consumer.install COMMAND ${CMAKE_COMMAND} --install ${CMAKE_BINARY_DIR} --prefix ${_prefix})
set_tests_properties(consumer.install PROPERTIES FIXTURES_SETUP trident_installed LABELS consumer)

set(_cuda_opt -DWITH_CUDA=OFF)
if(TRIDENT_HAS_CUDA)
  set(_cuda_opt -DWITH_CUDA=ON -DCMAKE_CUDA_COMPILER=${CMAKE_CUDA_COMPILER} "-DCMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES}")
endif()
add_test(NAME consumer.find_package
         COMMAND ${CMAKE_CTEST_COMMAND} --build-and-test ${_src} ${CMAKE_BINARY_DIR}/consumer-find_package ${_common}
                 -DCONSUME=find_package -DCMAKE_PREFIX_PATH=${_prefix} ${_cuda_opt}
                 --test-command ${CMAKE_CTEST_COMMAND} --output-on-failure)
set_tests_properties(consumer.find_package PROPERTIES FIXTURES_REQUIRED trident_installed LABELS consumer TIMEOUT 900)

foreach(_mode add_subdirectory fetchcontent)
  add_test(NAME consumer.${_mode}
           COMMAND ${CMAKE_CTEST_COMMAND} --build-and-test ${_src} ${CMAKE_BINARY_DIR}/consumer-${_mode} ${_common}
                   -DCONSUME=${_mode} -DTRIDENT_SOURCE_DIR=${PROJECT_SOURCE_DIR} -DTRIDENT_CUDA=OFF
                   --test-command ${CMAKE_CTEST_COMMAND} --output-on-failure)
  set_tests_properties(consumer.${_mode} PROPERTIES LABELS consumer TIMEOUT 600)
endforeach()
