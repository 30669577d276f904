# "Must not compile" tests. Each snippet names the message it must fail with on its first line
# ("// expect: <regex>"); compiled with -DTRIDENT_EXPECT_FAILURE it must fail with that message,
# and compiled without it (the control) it must succeed, so that the failure is the intended one.
file(GLOB _trident_compile_fail_sources CONFIGURE_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/*.cpp)
foreach(_src IN LISTS _trident_compile_fail_sources)
  get_filename_component(_name ${_src} NAME_WE)
  file(STRINGS ${_src} _expect LIMIT_COUNT 1 REGEX "^// expect: ")
  string(REGEX REPLACE "^// expect: " "" _expect "${_expect}")
  set(_cmd ${CMAKE_CXX_COMPILER} -std=c++20 -fsyntax-only -I${PROJECT_SOURCE_DIR}/include ${_src})
  add_test(NAME compile_fail.${_name} COMMAND ${_cmd} -DTRIDENT_EXPECT_FAILURE)
  set_tests_properties(compile_fail.${_name} PROPERTIES PASS_REGULAR_EXPRESSION "${_expect}" LABELS compile_fail)
  add_test(NAME compile_fail.${_name}.control COMMAND ${_cmd})
  set_tests_properties(compile_fail.${_name}.control PROPERTIES LABELS compile_fail)
endforeach()
