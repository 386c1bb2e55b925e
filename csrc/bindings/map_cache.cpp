#include "bindings/map_cache.h"

namespace py = pybind11;

namespace hm {

py::object ValidatedMaps::key(py::handle obj, const TensorView& map, int64_t n_source) const {
  if (!py::hasattr(obj, "_version")) return py::none();
  return py::make_tuple(obj.attr("_version"), reinterpret_cast<uintptr_t>(map.data), map.device_id, map.shape[0],
                        map.strides[0], n_source);
}

// cache_: {id(obj): (weakref to obj, {keys})}. Keyed by identity, not by a WeakKeyDictionary, whose
// lookups compare keys with ==, which tensors answer element-wise. The weakref's callback drops the
// entry when obj dies, before its id can be reused; the identity check below guards the rest.
bool ValidatedMaps::contains(py::handle obj, const TensorView& map, int64_t n_source) const {
  if (!cache_) return false;
  const py::object k = key(obj, map, n_source);
  if (k.is_none()) return false;
  const py::object entry = cache_.attr("get")(py::int_(reinterpret_cast<uintptr_t>(obj.ptr())));
  if (entry.is_none()) return false;
  const py::tuple e = py::reinterpret_borrow<py::tuple>(entry);
  return e[0]().is(obj) && py::reinterpret_borrow<py::set>(e[1]).contains(k);
}

void ValidatedMaps::insert(py::handle obj, const TensorView& map, int64_t n_source) {
  const py::object k = key(obj, map, n_source);
  if (k.is_none()) return;
  if (!cache_) cache_ = py::dict();
  const py::int_ id(reinterpret_cast<uintptr_t>(obj.ptr()));
  const py::object entry = cache_.attr("get")(id);
  if (!entry.is_none()) {
    const py::tuple e = py::reinterpret_borrow<py::tuple>(entry);
    if (e[0]().is(obj)) {
      py::reinterpret_borrow<py::set>(e[1]).add(k);
      return;
    }
  }
  py::dict cache = py::reinterpret_borrow<py::dict>(cache_);
  py::cpp_function drop([cache, id](py::handle) {
    if (cache.contains(id)) PyDict_DelItem(cache.ptr(), id.ptr());
  });
  py::object ref;
  try {
    ref = py::weakref(obj, drop);
  } catch (py::error_already_set&) {  // not weak-referenceable: checked on every call
    return;
  }
  py::set keys;
  keys.add(k);
  cache[id] = py::make_tuple(ref, keys);
}

void MapChecks::add(py::handle obj, const TensorView* map, int64_t n_source, std::string arg, std::string source_desc) {
  if (!map || cache_.contains(obj, *map, n_source)) return;
  pending_.push_back({obj, *map, n_source, std::move(arg), std::move(source_desc)});
}

void MapChecks::run(const std::function<void(const Pending&)>& check) const {
  for (const Pending& p : pending_) check(p);
}

void MapChecks::commit() {
  for (const Pending& p : pending_) cache_.insert(p.obj, p.map, p.n_source);
}

}  // namespace hm
