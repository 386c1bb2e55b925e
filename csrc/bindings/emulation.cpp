#include "bindings/emulation.h"

namespace hm {

void register_emulation(pybind11::module_& m) {
  m.doc() = "CUDA kernel bodies run on the CPU under an emulated launch (for tests)";
}

}  // namespace hm
