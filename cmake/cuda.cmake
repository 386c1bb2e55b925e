# Builds hetmerge._cuda when a CUDA compiler is available (see HETMERGE_CUDA in CMakeLists.txt).
#
# _cuda links the CUDA runtime statically (CUDA::cudart_static), so importing it needs no
# libcudart on the user's machine; the driver (libcuda) is loaded lazily by the runtime at the
# first CUDA call, which is how `unavailable_reason()` can report "no driver" instead of failing
# at import.
if(HETMERGE_CUDA STREQUAL "OFF")
  message(STATUS "hetmerge: CUDA backend disabled (HETMERGE_CUDA=OFF)")
  return()
endif()
if(NOT HETMERGE_CUDA MATCHES "^(AUTO|ON)$")
  message(FATAL_ERROR "hetmerge: HETMERGE_CUDA must be AUTO, ON or OFF, got '${HETMERGE_CUDA}'")
endif()

include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  if(HETMERGE_CUDA STREQUAL "ON")
    message(FATAL_ERROR "hetmerge: HETMERGE_CUDA=ON but no CUDA compiler was found; put nvcc on PATH or set CUDACXX")
  endif()
  message(STATUS "hetmerge: no CUDA compiler found, building the CPU backend only")
  return()
endif()

file(GLOB HETMERGE_CUDA_SOURCES CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/csrc/cuda/*.cu)
if(NOT HETMERGE_CUDA_SOURCES)
  message(STATUS "hetmerge: no CUDA sources yet, skipping the CUDA backend")
  return()
endif()

# SASS for Ampere (sm_80) and Hopper (sm_90), plus sm_90 PTX so newer GPUs JIT-compile it.
# An explicit list, never `native`: the build machine has no GPU and wheels must run anywhere.
# No sm_90a: no kernel uses Hopper-only instructions (wgmma/TMA).
set(HETMERGE_CUDA_ARCHITECTURES "80-real;90-real;90-virtual" CACHE STRING
    "CUDA architectures of hetmerge._cuda (CMAKE_CUDA_ARCHITECTURES syntax)")
set(CMAKE_CUDA_ARCHITECTURES ${HETMERGE_CUDA_ARCHITECTURES})
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
message(STATUS "hetmerge: building the CUDA backend with ${CMAKE_CUDA_COMPILER} "
               "(CUDA ${CUDAToolkit_VERSION}, architectures ${CMAKE_CUDA_ARCHITECTURES})")

# The element-wise kernels must round like the CPU loops: no fused multiply-add contraction there.
# (cost_matrix keeps FMA: its summation order differs from the CPU anyway, see docs/cuda.md.)
foreach(src IN LISTS HETMERGE_CUDA_SOURCES)
  if(src MATCHES "(interpolate|weighted_sum)\\.cu$")
    set_source_files_properties(${src} PROPERTIES COMPILE_OPTIONS "--fmad=false")
  endif()
endforeach()

# Kernels and their plain C++ launchers (no pybind11 or Python headers in .cu files).
add_library(hetmerge_cuda_kernels STATIC ${HETMERGE_CUDA_SOURCES})
target_include_directories(hetmerge_cuda_kernels PUBLIC ${CMAKE_SOURCE_DIR}/csrc)
target_compile_options(hetmerge_cuda_kernels PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:-O3 -Xcompiler=-fvisibility=hidden>)
set_target_properties(hetmerge_cuda_kernels PROPERTIES
  CUDA_RUNTIME_LIBRARY Static
  CUDA_VISIBILITY_PRESET hidden
  POSITION_INDEPENDENT_CODE ON)
target_link_libraries(hetmerge_cuda_kernels PUBLIC CUDA::cudart_static hetmerge_core)

pybind11_add_module(_cuda MODULE NO_EXTRAS
  ${CMAKE_SOURCE_DIR}/csrc/bindings/cuda_module.cpp
  ${CMAKE_SOURCE_DIR}/csrc/bindings/dlpack_import.cpp
  ${CMAKE_SOURCE_DIR}/csrc/bindings/map_cache.cpp)
target_include_directories(_cuda PRIVATE ${CMAKE_SOURCE_DIR}/csrc)
target_compile_options(_cuda PRIVATE ${HETMERGE_CXX_FLAGS})
target_link_libraries(_cuda PRIVATE hetmerge_cuda_kernels hetmerge_core CUDA::cudart_static)
set_target_properties(_cuda PROPERTIES CUDA_RUNTIME_LIBRARY Static)
install(TARGETS _cuda LIBRARY DESTINATION hetmerge)
