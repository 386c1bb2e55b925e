// dtype dispatch shared by the CPU loops, the CUDA launchers and the emulated launches.
#pragma once
#include "common/errors.h"
#include "common/tensor_view.h"
#include "kernels/common.h"

namespace hm {

// Calls fn(T{}) with the storage type of a floating dtype.
template <typename Fn>
void dispatch_floating(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32: fn(float{}); break;
    case DType::f64: fn(double{}); break;
    case DType::f16: fn(half_t{}); break;
    case DType::bf16: fn(bfloat16_t{}); break;
    default: type_error("internal: unexpected dtype ", dtype_name(dtype));
  }
}

}  // namespace hm
