# CMake package of pskv's C library (installed by scripts/install-c.sh):
#   find_package(pskv 0.1 REQUIRED)
#   target_link_libraries(app PRIVATE pskv::pskv)          # libpskv.so
#   target_link_libraries(app PRIVATE pskv::pskv_static)   # libpskv.a
# The package is relocatable: paths are found from this file's place,
# PREFIX/lib/cmake/pskv.
get_filename_component(_pskv_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
set(pskv_INCLUDE_DIRS "${_pskv_prefix}/include")

include(CMakeFindDependencyMacro)
find_dependency(Threads)

if(NOT TARGET pskv::pskv)
  add_library(pskv::pskv SHARED IMPORTED)
  set_target_properties(pskv::pskv PROPERTIES
    IMPORTED_LOCATION "${_pskv_prefix}/lib/libpskv.so"
    IMPORTED_SONAME "libpskv.so.@SOABI@"
    INTERFACE_INCLUDE_DIRECTORIES "${_pskv_prefix}/include")
endif()
if(NOT TARGET pskv::pskv_static)
  add_library(pskv::pskv_static STATIC IMPORTED)
  set_target_properties(pskv::pskv_static PROPERTIES
    IMPORTED_LOCATION "${_pskv_prefix}/lib/libpskv.a"
    INTERFACE_INCLUDE_DIRECTORIES "${_pskv_prefix}/include"
    INTERFACE_LINK_LIBRARIES "Threads::Threads;${CMAKE_DL_LIBS};m")
endif()
set(pskv_LIBRARIES pskv::pskv)
set(pskv_ABI_VERSION @ABI@)
unset(_pskv_prefix)
