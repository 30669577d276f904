# Install rules: headers, exported targets and a package config with components, so that
#   find_package(trident CONFIG REQUIRED COMPONENTS openmp mpi io json cuda)
# works from an installed prefix.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(DIRECTORY include/trident DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})

set(_trident_export_targets trident)
foreach(_c openmp mpi io json cuda)
  if(TARGET trident_${_c})
    list(APPEND _trident_export_targets trident_${_c})
  endif()
endforeach()
install(TARGETS ${_trident_export_targets} EXPORT tridentTargets)
install(EXPORT tridentTargets NAMESPACE trident:: DESTINATION ${CMAKE_INSTALL_DATADIR}/cmake/trident)

configure_package_config_file(cmake/tridentConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/tridentConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_DATADIR}/cmake/trident)
# Header-only: the package fits any architecture.
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/tridentConfigVersion.cmake
  COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES
  ${CMAKE_CURRENT_BINARY_DIR}/tridentConfig.cmake
  ${CMAKE_CURRENT_BINARY_DIR}/tridentConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_DATADIR}/cmake/trident)
