#include "bindings/dlpack_import.h"

#include <memory>
#include <string>

#include "common/dlpack.h"

namespace py = pybind11;

namespace hm {
namespace {

DType to_dtype(const DLDataType& t) {
  if (t.lanes != 1) return DType::other;
  if (t.code == kDLFloat && t.bits == 32) return DType::f32;
  if (t.code == kDLFloat && t.bits == 64) return DType::f64;
  if (t.code == kDLFloat && t.bits == 16) return DType::f16;
  if (t.code == kDLBfloat && t.bits == 16) return DType::bf16;
  if (t.code == kDLInt && t.bits == 64) return DType::i64;
  if (t.code == kDLInt && t.bits == 32) return DType::i32;
  return DType::other;
}

py::object call_dlpack(py::handle obj, const char* fn, const char* arg) {
  // CUDA producers get stream=-1 ("do not synchronize"): the wrappers launch on the producer's
  // current stream, so no cross-stream ordering is needed.
  py::object stream = py::none();
  if (py::hasattr(obj, "__dlpack_device__")) {
    py::tuple dev = obj.attr("__dlpack_device__")();
    if (dev[0].cast<int>() == kDLCUDA) stream = py::int_(-1);
  }
  try {
    return obj.attr("__dlpack__")(py::arg("stream") = stream, py::arg("max_version") = py::make_tuple(1, 0));
  } catch (py::error_already_set& e) {
    if (!e.matches(PyExc_TypeError)) throw;  // older producers do not know max_version
  }
  return obj.attr("__dlpack__")(py::arg("stream") = stream);
}

}  // namespace

TensorView DLPackArgs::view(py::handle obj, const char* fn, const char* arg) {
  if (obj.is_none()) type_error(fn, ": ", arg, " must be a tensor, got None");
  if (!py::hasattr(obj, "__dlpack__"))
    type_error(fn, ": ", arg, " must be a tensor or array supporting DLPack (torch.Tensor, numpy.ndarray, ...), got ",
               std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  py::object capsule;
  try {
    capsule = call_dlpack(obj, fn, arg);
  } catch (py::error_already_set& e) {
    type_error(fn, ": ", arg, " could not be exported through DLPack: ", e.what());
  }
  const DLTensor* dl = nullptr;
  bool read_only = false;
  if (PyCapsule_IsValid(capsule.ptr(), "dltensor_versioned")) {
    auto* managed = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor_versioned"));
    if (managed->version.major != 1)
      type_error(fn, ": ", arg, " uses DLPack ", managed->version.major, ".x, expected 1.x");
    dl = &managed->dl_tensor;
    read_only = (managed->flags & kDLPackFlagReadOnly) != 0;
  } else if (PyCapsule_IsValid(capsule.ptr(), "dltensor")) {
    dl = &static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"))->dl_tensor;
  } else {
    type_error(fn, ": ", arg, ".__dlpack__() did not return a DLPack capsule");
  }
  // The capsule is not consumed: when it is released, the producer's destructor frees the export.
  capsules_.push_back(capsule);

  TensorView v;
  v.read_only = read_only;
  v.dtype = to_dtype(dl->dtype);
  if (v.dtype == DType::other)
    type_error(fn, ": ", arg, " has an unsupported dtype (DLPack code ", int(dl->dtype.code), ", ", int(dl->dtype.bits),
               " bits, ", dl->dtype.lanes, " lanes)");
  switch (dl->device.device_type) {
    case kDLCPU: case kDLCUDAHost: v.device = Device::cpu; break;
    case kDLCUDA: case kDLCUDAManaged: v.device = Device::cuda; break;
    default: type_error(fn, ": ", arg, " lives on an unsupported device (DLPack device type ", dl->device.device_type, ")");
  }
  v.device_id = dl->device.device_id;
  if (dl->ndim < 0 || dl->ndim > kMaxDims) value_error(fn, ": ", arg, " has ", dl->ndim, " dimensions, at most ", kMaxDims, " are supported");
  v.ndim = dl->ndim;
  int64_t expected = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.shape[d] = dl->shape[d];
    v.strides[d] = dl->strides ? dl->strides[d] : expected;
    expected *= dl->shape[d];
  }
  v.data = static_cast<char*>(dl->data) + dl->byte_offset;
  return v;
}

const TensorView* DLPackArgs::optional_view(py::handle obj, const char* fn, const char* arg) {
  if (obj.is_none()) return nullptr;
  optional_views_.push_back(std::make_unique<TensorView>(view(obj, fn, arg)));
  return optional_views_.back().get();
}

std::vector<CostTermViews> import_cost_terms(DLPackArgs& args, const py::sequence& terms, const char* fn) {
  std::vector<CostTermViews> views;
  for (size_t t = 0; t < terms.size(); ++t) {
    const std::string name = concat("terms[", t, "]");
    py::tuple term = py::reinterpret_borrow<py::object>(terms[t]);
    if (term.size() != 4) value_error(fn, ": ", name, " must be (A, B, map, block)");
    CostTermViews v;
    v.a = args.view(term[0], fn, (name + ".A").c_str());
    v.b = args.view(term[1], fn, (name + ".B").c_str());
    v.has_map = !term[2].is_none();
    if (v.has_map) v.map = args.view(term[2], fn, (name + ".map").c_str());
    v.block = term[3].cast<int64_t>();
    views.push_back(v);
  }
  return views;
}

void register_exceptions() {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });
}

}  // namespace hm
