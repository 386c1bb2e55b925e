// hetmerge._C: the CPU backend. Each binding imports its arguments through DLPack, validates them
// with common/op_checks, releases the GIL and runs the CPU loop. Python wrappers: hetmerge/ops.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings/dlpack_import.h"
#include "bindings/emulation.h"
#include "common/op_checks.h"
#include "common/parallel.h"
#include "cpu/cpu_ops.h"

namespace py = pybind11;
using hm::DLPackArgs;
using hm::TensorView;

namespace {

void require_cpu(const TensorView& t, const char* fn, const char* arg) {
  if (t.device != hm::Device::cpu)
    hm::value_error(fn, ": ", arg, " is a CUDA tensor; the CPU backend (hetmerge._C) only takes CPU memory");
}

void permute_pad(py::handle w, py::handle rows, py::handle cols, py::handle out) {
  const char* fn = "permute_pad";
  DLPackArgs args;
  const TensorView vw = args.view(w, fn, "w");
  const TensorView* vr = args.optional_view(rows, fn, "rows");
  const TensorView* vc = args.optional_view(cols, fn, "cols");
  const TensorView vo = args.view(out, fn, "out");
  require_cpu(vw, fn, "w");
  hm::check_permute_pad(vw, vr, vc, vo);
  py::gil_scoped_release nogil;
  hm::cpu::permute_pad(vw, vr, vc, vo);
}

void interpolate(py::handle a, py::handle b, const std::vector<double>& lambdas, py::handle rows, py::handle cols,
                 bool fill_base, py::handle out) {
  const char* fn = "interpolate";
  DLPackArgs args;
  const TensorView va = args.view(a, fn, "a"), vb = args.view(b, fn, "b");
  const TensorView* vr = args.optional_view(rows, fn, "rows");
  const TensorView* vc = args.optional_view(cols, fn, "cols");
  const TensorView vo = args.view(out, fn, "out");
  require_cpu(va, fn, "a");
  hm::check_interpolate(va, vb, lambdas, vr, vc, vo);
  py::gil_scoped_release nogil;
  hm::cpu::interpolate(va, vb, lambdas, vr, vc, fill_base, vo);
}

void weighted_sum(const py::sequence& tensors, const std::vector<double>& coeffs, int64_t K, py::handle out) {
  const char* fn = "weighted_sum";
  DLPackArgs args;
  std::vector<TensorView> views;
  for (size_t t = 0; t < tensors.size(); ++t)
    views.push_back(args.view(tensors[t], fn, hm::concat("tensors[", t, "]").c_str()));
  const TensorView vo = args.view(out, fn, "out");
  if (!views.empty()) require_cpu(views[0], fn, "tensors[0]");
  hm::check_weighted_sum(views, coeffs, K, vo);
  py::gil_scoped_release nogil;
  hm::cpu::weighted_sum(views, coeffs, K, vo);
}

void cost_matrix(const py::sequence& terms, py::handle out) {
  const char* fn = "cost_matrix";
  DLPackArgs args;
  std::vector<hm::CostTermViews> views = hm::import_cost_terms(args, terms, fn);
  const TensorView vo = args.view(out, fn, "out");
  if (!views.empty()) require_cpu(views[0].a, fn, "terms[0].A");
  hm::check_cost_matrix(views, vo);
  std::vector<hm::cpu::CostTerm> cpu_terms;
  for (const auto& v : views) cpu_terms.push_back({v.a, v.b, v.map, v.has_map, v.block});
  py::gil_scoped_release nogil;
  hm::cpu::cost_matrix(cpu_terms, vo);
}

// linear_assignment and its batched form: the same arguments, checks and release of the GIL.
template <typename Check, typename Solve>
void assignment_entry(const char* fn, py::handle cost, bool maximize, py::handle row_ind, py::handle col_ind,
                      Check check, Solve solve) {
  DLPackArgs args;
  const TensorView vc = args.view(cost, fn, "cost");
  const TensorView vr = args.view(row_ind, fn, "row_ind"), vi = args.view(col_ind, fn, "col_ind");
  require_cpu(vc, fn, "cost");
  require_cpu(vr, fn, "row_ind");
  require_cpu(vi, fn, "col_ind");
  check(vc, vr, vi);
  py::gil_scoped_release nogil;
  solve(vc, maximize, vr, vi);
}

void linear_assignment(py::handle cost, bool maximize, py::handle row_ind, py::handle col_ind) {
  assignment_entry("linear_assignment", cost, maximize, row_ind, col_ind, hm::check_linear_assignment,
                   hm::cpu::linear_assignment);
}

void linear_assignment_batched(py::handle cost, bool maximize, py::handle row_ind, py::handle col_ind) {
  assignment_entry("linear_assignment_batched", cost, maximize, row_ind, col_ind,
                   hm::check_linear_assignment_batched, hm::cpu::linear_assignment_batched);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "hetmerge CPU backend (use hetmerge.ops; these entry points expect preallocated outputs)";
  hm::register_exceptions();
  py::arg out("out");
  m.def("permute_pad", &permute_pad, py::arg("w"), py::arg("rows"), py::arg("cols"), out,
        "out[i, j, ...] = w[rows[i], cols[j], ...], 0 where an index is -1. w: [n0, n1, *trailing] or [n0].");
  m.def("interpolate", &interpolate, py::arg("a"), py::arg("b"), py::arg("lambdas"), py::arg("rows"), py::arg("cols"),
        py::arg("fill_base"), out, "out[k] = (1 - lambdas[k]) * a + lambdas[k] * permute_pad(b, rows, cols).");
  m.def("weighted_sum", &weighted_sum, py::arg("tensors"), py::arg("coeffs"), py::arg("K"), out,
        "out[k] = sum_t coeffs[k * T + t] * tensors[t].");
  m.def("cost_matrix", &cost_matrix, py::arg("terms"), out,
        "C[i, j] = sum over terms (A, B, map, block) of sum_{q: map[q] >= 0, r < block} A[i, q*block+r] * B[j, map[q]*block+r].");
  m.def("linear_assignment", &linear_assignment, py::arg("cost"), py::arg("maximize"), py::arg("row_ind"),
        py::arg("col_ind"), "Exact rectangular linear assignment (scipy.optimize.linear_sum_assignment's contract).");
  m.def("linear_assignment_batched", &linear_assignment_batched, py::arg("cost"), py::arg("maximize"),
        py::arg("row_ind"), py::arg("col_ind"), "linear_assignment of every matrix of cost [B, n_rows, n_cols].");
  m.def("set_num_threads", &hm::set_num_threads, py::arg("n"), "Threads used by the CPU kernels.");
  m.def("get_num_threads", &hm::get_num_threads);
  m.def("build_info", [] {
    py::dict info;
    info["cuda_module"] = bool(HETMERGE_BUILT_CUDA_MODULE);  // the same build also produced hetmerge._cuda
    info["cuda_architectures"] = std::string(HETMERGE_CUDA_ARCHS);  // CMAKE_CUDA_ARCHITECTURES, comma-separated
    info["x86_simd"] = bool(HETMERGE_X86_SIMD);  // AVX2/FMA/F16C kernels compiled in (runtime-dispatched)
    return info;
  }, "What this build was configured with (CMake): whether it built the CUDA module and for which "
     "architectures, and whether the x86 SIMD kernels are compiled in.");
  auto emulated = m.def_submodule("emulated");
  hm::register_emulation(emulated);
}
