// Test-only entry points (hetmerge._C.emulated): the CUDA kernels' __host__ __device__ bodies run
// on the CPU under an emulated launch (blocks and threads as loops, shared memory as local arrays),
// so CI without a GPU checks the device code's index and tile logic against the references.
#pragma once
#include <pybind11/pybind11.h>

namespace hm {
void register_emulation(pybind11::module_& m);
}
