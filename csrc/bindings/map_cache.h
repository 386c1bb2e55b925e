// CUDA index maps are validated once per map object, not once per call: validating a device map
// means copying it to the host and synchronizing the stream, and align/sweep loops pass the same
// maps to many calls. Used by csrc/bindings/cuda_module.cpp; the same code runs in CPU tests
// through hetmerge._C.emulated.map_checks (a CPU scan standing in for the device fetch).
//
// An entry is tied to the Python object through a weak reference, so it dies with the tensor (a new tensor at a reused address or id() is never taken for a checked one), and records
// what the check depended on: torch's version counter (`_version`, bumped by every in-place write
// through torch, on any view of the storage), the data pointer, length, stride, and the size of
// the axis the map indexes. Objects without `_version` (other DLPack producers) are checked on
// every call. Not seen: writes that bypass torch's version counter (`t.data[...] = `, another
// framework writing the memory through its own alias); docs/cuda.md says so.
#pragma once
#include <pybind11/pybind11.h>

#include <functional>
#include <string>
#include <vector>

#include "common/tensor_view.h"

namespace hm {

class ValidatedMaps {
 public:
  // GIL held for both.
  bool contains(pybind11::handle obj, const TensorView& map, int64_t n_source) const;
  void insert(pybind11::handle obj, const TensorView& map, int64_t n_source);

 private:
  pybind11::object key(pybind11::handle obj, const TensorView& map, int64_t n_source) const;
  pybind11::object cache_;  // {id(obj): (weakref(obj), set of keys obj was checked under)}
};

// The maps of one call: collected with the GIL held (cached ones are dropped), checked without it,
// remembered with it again once every check of the call has passed.
class MapChecks {
 public:
  struct Pending {
    pybind11::handle obj;
    TensorView map;
    int64_t n_source;
    std::string arg, source_desc;
  };
  explicit MapChecks(ValidatedMaps& cache) : cache_(cache) {}
  void add(pybind11::handle obj, const TensorView* map, int64_t n_source, std::string arg, std::string source_desc);
  // check(map, arg, n_source, source_desc) raises on a bad map. No GIL needed.
  void run(const std::function<void(const Pending&)>& check) const;
  void commit();  // GIL held
  const std::vector<Pending>& pending() const { return pending_; }

 private:
  ValidatedMaps& cache_;
  std::vector<Pending> pending_;
};

}  // namespace hm
