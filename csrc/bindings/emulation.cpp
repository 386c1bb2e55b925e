#include "bindings/emulation.h"

#include <pybind11/stl.h>

#include "bindings/dlpack_import.h"
#include "bindings/map_cache.h"
#include "common/op_checks.h"
#include "emulation/emulated.h"

namespace py = pybind11;

namespace hm {
namespace {

void require_cpu(const TensorView& t, const char* fn, const char* arg) {
  if (t.device != Device::cpu) value_error(fn, ": ", arg, " must be a CPU tensor (emulated launches run on the CPU)");
}

emulated::Plan permute_pad(py::handle w, py::handle rows, py::handle cols, py::handle out, int64_t grid_cap) {
  const char* fn = "permute_pad";
  DLPackArgs args;
  const TensorView vw = args.view(w, fn, "w");
  const TensorView* vr = args.optional_view(rows, fn, "rows");
  const TensorView* vc = args.optional_view(cols, fn, "cols");
  const TensorView vo = args.view(out, fn, "out");
  require_cpu(vw, fn, "w");
  check_permute_pad(vw, vr, vc, vo);
  py::gil_scoped_release nogil;
  return emulated::permute_pad(vw, vr, vc, vo, grid_cap);
}

emulated::Plan interpolate(py::handle a, py::handle b, const std::vector<double>& lambdas, py::handle rows,
                           py::handle cols, bool fill_base, py::handle out, int64_t grid_cap) {
  const char* fn = "interpolate";
  DLPackArgs args;
  const TensorView va = args.view(a, fn, "a"), vb = args.view(b, fn, "b");
  const TensorView* vr = args.optional_view(rows, fn, "rows");
  const TensorView* vc = args.optional_view(cols, fn, "cols");
  const TensorView vo = args.view(out, fn, "out");
  require_cpu(va, fn, "a");
  check_interpolate(va, vb, lambdas, vr, vc, vo);
  py::gil_scoped_release nogil;
  return emulated::interpolate(va, vb, lambdas, vr, vc, fill_base, vo, grid_cap);
}

emulated::Plan weighted_sum(const py::sequence& tensors, const std::vector<double>& coeffs, int64_t K, py::handle out,
                            int64_t grid_cap) {
  const char* fn = "weighted_sum";
  DLPackArgs args;
  std::vector<TensorView> views;
  for (size_t t = 0; t < tensors.size(); ++t) views.push_back(args.view(tensors[t], fn, concat("tensors[", t, "]").c_str()));
  const TensorView vo = args.view(out, fn, "out");
  if (!views.empty()) require_cpu(views[0], fn, "tensors[0]");
  check_weighted_sum(views, coeffs, K, vo);
  py::gil_scoped_release nogil;
  return emulated::weighted_sum(views, coeffs, K, vo, grid_cap);
}

emulated::Plan cost_matrix(const py::sequence& terms, py::handle out, const std::string& precision) {
  const char* fn = "cost_matrix";
  const CostPrecision prec = gpu::parse_cost_precision(precision);
  DLPackArgs args;
  std::vector<CostTermViews> views = import_cost_terms(args, terms, fn);
  const TensorView vo = args.view(out, fn, "out");
  if (!views.empty()) require_cpu(views[0].a, fn, "terms[0].A");
  check_cost_matrix(views, vo);
  std::vector<gpu::CostTermInput> inputs;
  for (const auto& v : views) inputs.push_back({v.a, v.b, v.map, v.has_map, v.block});
  py::gil_scoped_release nogil;
  return emulated::cost_matrix(inputs, vo, prec);
}

// The CUDA module's per-call map validation (cuda_module.cpp) with the device fetch emulated:
// maps: [(map, n_source)]; returns, per map, whether it was fetched and checked (False: cached).
std::vector<bool> map_checks(const py::list& maps) {
  static auto* cache = new ValidatedMaps();  // one per process, like the CUDA module's
  const char* fn = "map_checks";
  DLPackArgs args;
  MapChecks checks(*cache);
  std::vector<TensorView> views;
  views.reserve(maps.size());
  for (size_t i = 0; i < maps.size(); ++i) {
    py::tuple item = maps[i];
    views.push_back(args.view(item[0], fn, concat("maps[", i, "]").c_str()));
    require_cpu(views.back(), fn, "map");
  }
  for (size_t i = 0; i < maps.size(); ++i) {
    py::tuple item = maps[i];
    checks.add(item[0], &views[i], item[1].cast<int64_t>(), concat("maps[", i, "]"), "n_source");
  }
  std::vector<bool> checked(maps.size(), false);
  {
    py::gil_scoped_release nogil;
    checks.run([&](const MapChecks::Pending& p) {
      require_ndim(p.map, fn, p.arg.c_str(), 1);
      require_dtype(p.map, fn, p.arg.c_str(), DType::i64);
      std::vector<int64_t> host = emulated::fetch_index_map(p.map);
      TensorView h = p.map;
      h.data = host.data();
      h.strides[0] = 1;
      check_index_map(h, fn, p.arg.c_str(), p.n_source, p.source_desc.c_str());
    });
  }
  checks.commit();
  for (const MapChecks::Pending& p : checks.pending())
    for (size_t i = 0; i < views.size(); ++i)
      if (p.arg == concat("maps[", i, "]")) checked[i] = true;
  return checked;
}

}  // namespace

void register_emulation(pybind11::module_& m) {
  m.doc() = "CUDA kernel bodies run on the CPU under an emulated launch (for tests). Same arguments as the "
            "CPU entry points; each returns the launch plan (vector paths taken, grid, launches).";
  py::arg out("out");
  m.def("permute_pad", &permute_pad, py::arg("w"), py::arg("rows"), py::arg("cols"), out, py::arg("grid_cap") = 0);
  m.def("interpolate", &interpolate, py::arg("a"), py::arg("b"), py::arg("lambdas"), py::arg("rows"), py::arg("cols"),
        py::arg("fill_base"), out, py::arg("grid_cap") = 0);
  m.def("weighted_sum", &weighted_sum, py::arg("tensors"), py::arg("coeffs"), py::arg("K"), out,
        py::arg("grid_cap") = 0);
  m.def("cost_matrix", &cost_matrix, py::arg("terms"), out, py::arg("precision") = "fp32");
  m.def("fetch_index_map", [](py::handle map) {
    DLPackArgs args;
    const TensorView v = args.view(map, "fetch_index_map", "map");
    require_cpu(v, "fetch_index_map", "map");
    require_dtype(v, "fetch_index_map", "map", DType::i64);
    require_ndim(v, "fetch_index_map", "map", 1);
    return emulated::fetch_index_map(v);
  }, py::arg("map"), "The CUDA backend's host copy of an index map (any stride), run on CPU memory.");
  m.def("map_checks", &map_checks, py::arg("maps"),
        "The CUDA module's once-per-object map validation on CPU maps: [(map, n_source)] -> [checked].");
  m.def("tile_shapes", [] {
    return std::map<std::string, std::vector<int>>{
        {"fp32", {SimtTile<float>::BM, SimtTile<float>::BN, SimtTile<float>::BK}},
        {"fp64", {SimtTile<double>::BM, SimtTile<double>::BN, SimtTile<double>::BK}},
        {"tf32", {MmaTile<CostPrecision::tf32>::BM, MmaTile<CostPrecision::tf32>::BN, MmaTile<CostPrecision::tf32>::BK}},
        {"bf16", {MmaTile<CostPrecision::bf16>::BM, MmaTile<CostPrecision::bf16>::BN, MmaTile<CostPrecision::bf16>::BK}},
        {"fp16", {MmaTile<CostPrecision::fp16>::BM, MmaTile<CostPrecision::fp16>::BN, MmaTile<CostPrecision::fp16>::BK}},
    };
  }, "cost_matrix tile shapes (BM, BN, BK) per precision, to size ragged-edge tests.");
  m.def("limits", [] {
    return std::map<std::string, int>{{"lambdas_per_launch", kMaxLambdasPerLaunch},
                                      {"tensors_per_launch", kMaxTensorsPerLaunch},
                                      {"coeffs_per_launch", kMaxCoeffsPerLaunch},
                                      {"cost_terms_per_launch", kMaxCostTermsPerLaunch}};
  }, "Per-launch capacities of the kernel parameter structs (beyond them, launches are split).");
}

}  // namespace hm
