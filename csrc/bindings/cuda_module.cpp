// hetmerge._cuda: the CUDA backend. Same entry points as hetmerge._C (csrc/bindings/module.cpp) plus
// `stream`, the caller's CUDA stream handle (torch.cuda.current_stream().cuda_stream): arguments are
// imported through DLPack, validated by the same common/op_checks functions, CUDA index maps are
// checked on a host copy once per map object (bindings/map_cache.h), then the launchers in
// csrc/cuda run on that stream.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings/dlpack_import.h"
#include "bindings/map_cache.h"
#include "common/op_checks.h"
#include "cuda/cuda_ops.h"

namespace py = pybind11;
using hm::DLPackArgs;
using hm::TensorView;

namespace {

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

void require_cuda(const TensorView& t, const char* fn, const char* arg) {
  if (t.device != hm::Device::cuda)
    hm::value_error(fn, ": ", arg, " is a CPU tensor; the CUDA backend (hetmerge._cuda) only takes CUDA memory");
}

std::string dim_desc(const char* arg, int dim) { return hm::concat(arg, ".shape[", dim, "]"); }

// Maps validated once per object (bindings/map_cache.h). Never destroyed: it holds Python objects,
// which must not be released after the interpreter has shut down.
hm::ValidatedMaps& validated_maps() {
  static auto* cache = new hm::ValidatedMaps();
  return *cache;
}

// Fetches and checks the maps the cache has not seen (each fetch synchronizes the stream).
void check_maps(const hm::MapChecks& maps, const char* fn, cudaStream_t stream) {
  maps.run([&](const hm::MapChecks::Pending& p) {
    hm::gpu::check_device_index_map(p.map, fn, p.arg.c_str(), p.n_source, p.source_desc.c_str(), stream);
  });
}

void permute_pad(py::handle w, py::handle rows, py::handle cols, py::handle out, uintptr_t stream) {
  const char* fn = "permute_pad";
  DLPackArgs args;
  const TensorView vw = args.view(w, fn, "w");
  const TensorView* vr = args.optional_view(rows, fn, "rows");
  const TensorView* vc = args.optional_view(cols, fn, "cols");
  const TensorView vo = args.view(out, fn, "out");
  require_cuda(vw, fn, "w");
  hm::check_permute_pad(vw, vr, vc, vo);
  hm::MapChecks maps(validated_maps());
  maps.add(rows, vr, vw.shape[0], "rows", dim_desc("w", 0));
  if (vw.ndim >= 2) maps.add(cols, vc, vw.shape[1], "cols", dim_desc("w", 1));
  {
    py::gil_scoped_release nogil;
    hm::gpu::DeviceGuard guard(vw.device_id);
    check_maps(maps, fn, as_stream(stream));
    hm::gpu::permute_pad(vw, vr, vc, vo, as_stream(stream));
  }
  maps.commit();
}

void interpolate(py::handle a, py::handle b, const std::vector<double>& lambdas, py::handle rows, py::handle cols,
                 bool fill_base, py::handle out, uintptr_t stream) {
  const char* fn = "interpolate";
  DLPackArgs args;
  const TensorView va = args.view(a, fn, "a"), vb = args.view(b, fn, "b");
  const TensorView* vr = args.optional_view(rows, fn, "rows");
  const TensorView* vc = args.optional_view(cols, fn, "cols");
  const TensorView vo = args.view(out, fn, "out");
  require_cuda(va, fn, "a");
  hm::check_interpolate(va, vb, lambdas, vr, vc, vo);
  hm::MapChecks maps(validated_maps());
  maps.add(rows, vr, vb.shape[0], "rows", dim_desc("b", 0));
  if (va.ndim >= 2) maps.add(cols, vc, vb.shape[1], "cols", dim_desc("b", 1));
  {
    py::gil_scoped_release nogil;
    hm::gpu::DeviceGuard guard(va.device_id);
    check_maps(maps, fn, as_stream(stream));
    hm::gpu::interpolate(va, vb, lambdas, vr, vc, fill_base, vo, as_stream(stream));
  }
  maps.commit();
}

void weighted_sum(const py::sequence& tensors, const std::vector<double>& coeffs, int64_t K, py::handle out,
                  uintptr_t stream) {
  const char* fn = "weighted_sum";
  DLPackArgs args;
  std::vector<TensorView> views;
  for (size_t t = 0; t < tensors.size(); ++t)
    views.push_back(args.view(tensors[t], fn, hm::concat("tensors[", t, "]").c_str()));
  const TensorView vo = args.view(out, fn, "out");
  if (!views.empty()) require_cuda(views[0], fn, "tensors[0]");
  hm::check_weighted_sum(views, coeffs, K, vo);
  py::gil_scoped_release nogil;
  hm::gpu::DeviceGuard guard(views[0].device_id);
  hm::gpu::weighted_sum(views, coeffs, K, vo, as_stream(stream));
}

void cost_matrix(const py::sequence& terms, py::handle out, uintptr_t stream, const std::string& precision) {
  const char* fn = "cost_matrix";
  const hm::CostPrecision prec = hm::gpu::parse_cost_precision(precision);
  DLPackArgs args;
  std::vector<hm::CostTermViews> views = hm::import_cost_terms(args, terms, fn);
  const TensorView vo = args.view(out, fn, "out");
  if (!views.empty()) require_cuda(views[0].a, fn, "terms[0].A");
  hm::check_cost_matrix(views, vo);
  if (prec != hm::CostPrecision::exact && vo.dtype != hm::DType::f32)
    hm::value_error(fn, ": precision='", precision, "' needs float32, float16 or bfloat16 inputs, got ",
                    hm::dtype_name(views[0].a.dtype));
  std::vector<hm::gpu::CostTermInput> inputs;
  for (const auto& v : views) inputs.push_back({v.a, v.b, v.map, v.has_map, v.block});
  hm::MapChecks maps(validated_maps());
  for (size_t t = 0; t < views.size(); ++t)
    if (views[t].has_map)
      maps.add(py::reinterpret_borrow<py::tuple>(terms[t])[2], &views[t].map, views[t].b.shape[1] / views[t].block,
               hm::concat("terms[", t, "].map"), hm::concat("terms[", t, "].B.shape[1] / block"));
  {
    py::gil_scoped_release nogil;
    hm::gpu::DeviceGuard guard(vo.device_id);
    check_maps(maps, fn, as_stream(stream));
    hm::gpu::cost_matrix(inputs, vo, prec, as_stream(stream));
  }
  maps.commit();
}

void linear_assignment(py::handle cost, bool maximize, py::handle row_ind, py::handle col_ind, uintptr_t stream) {
  const char* fn = "linear_assignment";
  DLPackArgs args;
  const TensorView vc = args.view(cost, fn, "cost");
  const TensorView vr = args.view(row_ind, fn, "row_ind"), vi = args.view(col_ind, fn, "col_ind");
  require_cuda(vc, fn, "cost");
  hm::require_same_device(vr, vc, fn, "row_ind", "cost");
  hm::require_same_device(vi, vc, fn, "col_ind", "cost");
  hm::check_linear_assignment(vc, vr, vi);
  py::gil_scoped_release nogil;
  hm::gpu::DeviceGuard guard(vc.device_id);
  hm::gpu::linear_assignment(vc, maximize, vr, vi, as_stream(stream));
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "hetmerge CUDA backend (use hetmerge.ops; entry points expect preallocated outputs and a stream)";
  hm::register_exceptions();
  py::arg out("out"), stream("stream");
  m.def("unavailable_reason", &hm::gpu::unavailable_reason,
        "'' when CUDA tensors can be processed, else why not (no driver, no device, ...).");
  m.def("runtime_version", [] {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  }, "Version of the CUDA runtime linked into this module (e.g. 13000).");
  m.def("permute_pad", &permute_pad, py::arg("w"), py::arg("rows"), py::arg("cols"), out, stream,
        "out[i, j, ...] = w[rows[i], cols[j], ...], 0 where an index is -1. w: [n0, n1, *trailing] or [n0].");
  m.def("interpolate", &interpolate, py::arg("a"), py::arg("b"), py::arg("lambdas"), py::arg("rows"), py::arg("cols"),
        py::arg("fill_base"), out, stream,
        "out[k] = (1 - lambdas[k]) * a + lambdas[k] * permute_pad(b, rows, cols).");
  m.def("weighted_sum", &weighted_sum, py::arg("tensors"), py::arg("coeffs"), py::arg("K"), out, stream,
        "out[k] = sum_t coeffs[k * T + t] * tensors[t].");
  m.def("cost_matrix", &cost_matrix, py::arg("terms"), out, stream, py::arg("precision") = "fp32",
        "C[i, j] = sum over terms (A, B, map, block) of sum_{q: map[q] >= 0, r < block} A[i, q*block+r] * "
        "B[j, map[q]*block+r]. precision: 'fp32' (float32 accumulation, float64 for float64), or for float32/float16/bfloat16 inputs 'tf32', "
        "'bf16', 'fp16' (tensor cores, fp32 accumulation; see docs/cuda.md for their accuracy).");
  m.def("linear_assignment", &linear_assignment, py::arg("cost"), py::arg("maximize"), py::arg("row_ind"),
        py::arg("col_ind"), stream,
        "Exact rectangular linear assignment: the CPU solver on a host copy of cost, indices copied back.");
}
