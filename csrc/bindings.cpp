// pybind11 entry point of affeq_rt._core: the CPU backend of the Gram accumulator and the evaluator.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cblas.h>
#include <stdexcept>
#include <string>

#include "common.h"
#include "evaluate.h"
#include "gram.h"

namespace py = pybind11;
using affeq::DType;

namespace {

// dtype tag of a float32/float16 array, or a ValueError naming what was given.
DType dtype_of(const py::array& a, const char* what) {
  if (a.dtype().is(py::dtype::of<float>())) return DType::F32;
  if (a.dtype().kind() == 'f' && a.itemsize() == 2) return DType::F16;
  throw py::value_error(std::string(what) + " must be float32 or float16, got " +
                        std::string(py::str(a.dtype())));
}

void require_c_contiguous(const py::array& a, const char* what) {
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(what) + " must be C-contiguous");
}

py::array_t<double> vec_to_array(const std::vector<double>& v) {
  py::array_t<double> out(static_cast<py::ssize_t>(v.size()));
  std::memcpy(out.mutable_data(), v.data(), sizeof(double) * v.size());
  return out;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "affeq-rt compiled core (CPU backend)";
  // This private OpenBLAS copy (NumPy links its own) runs single-threaded inside our OpenMP teams: the
  // core parallelises over row tiles / column bands itself, so no BLAS pool spins against the scans.
  // Threads: OMP_NUM_THREADS.
  scipy_openblas_set_num_threads(1);
  m.attr("__version__") = AFFEQ_VERSION;
  m.def("backend", []() { return "cpu"; }, "Name of this backend.");
  m.def("blas_config", []() { return std::string(scipy_openblas_get_config()); },
        "Build string of the BLAS the core links.");
  m.def("num_threads", []() { return affeq::max_threads(); }, "OpenMP threads used by the scans.");

  py::class_<affeq::GramState>(m, "Gram", "Streaming Gram state: count, float64 mean, float64 scatter.")
      .def(py::init<int64_t, int64_t>(), py::arg("dim"), py::arg("block_rows") = 0)
      .def_property_readonly("dim", &affeq::GramState::dim)
      .def_property_readonly("n", &affeq::GramState::n)
      .def_property_readonly("skipped", &affeq::GramState::skipped)
      .def_property_readonly("block_rows", &affeq::GramState::block_rows)
      .def(
          "update",
          [](affeq::GramState& g, const py::array& X) {
            const DType dt = dtype_of(X, "features");
            require_c_contiguous(X, "features");
            if (X.ndim() != 2 || X.shape(1) != g.dim())
              throw py::value_error("features must have shape [rows, " + std::to_string(g.dim()) + "]");
            const void* p = X.data();
            const int64_t rows = X.shape(0);
            py::gil_scoped_release nogil;
            return g.update(p, rows, dt);
          },
          py::arg("X"), "Add rows; returns how many were skipped for NaN/Inf.")
      .def("flush", [](affeq::GramState& g) {
        py::gil_scoped_release nogil;
        g.flush();
      })
      .def("mean", [](affeq::GramState& g) {
        std::vector<double> v;
        {
          py::gil_scoped_release nogil;
          v = g.mean();
        }
        return vec_to_array(v);
      })
      .def(
          "scatter_block",
          [](affeq::GramState& g, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
            if (r0 < 0 || c0 < 0 || r1 > g.dim() || c1 > g.dim() || r1 < r0 || c1 < c0)
              throw py::index_error("scatter block outside the accumulator");
            py::array_t<double> out({r1 - r0, c1 - c0});
            double* p = out.mutable_data();
            py::gil_scoped_release nogil;
            g.scatter_block(r0, r1, c0, c1, p);
            return out;
          },
          py::arg("r0"), py::arg("r1"), py::arg("c0"), py::arg("c1"))
      .def("packed_upper",
           [](affeq::GramState& g) {
             const int64_t d = g.dim();
             py::array_t<double> out(d * (d + 1) / 2);
             double* p = out.mutable_data();
             py::gil_scoped_release nogil;
             g.packed_upper(p);
             return out;
           })
      .def(
          "set_state",
          [](affeq::GramState& g, int64_t n, int64_t skipped,
             const py::array_t<double, py::array::c_style | py::array::forcecast>& mean,
             const py::array_t<double, py::array::c_style | py::array::forcecast>& packed) {
            const int64_t d = g.dim();
            if (mean.size() != d || packed.size() != d * (d + 1) / 2 || n < 0 || skipped < 0)
              throw py::value_error("state does not match the accumulator width");
            g.set_state(n, skipped, mean.data(), packed.data());
          },
          py::arg("n"), py::arg("skipped"), py::arg("mean"), py::arg("packed"))
      .def(
          "merge",
          [](affeq::GramState& g, affeq::GramState& other) {
            if (other.dim() != g.dim()) throw py::value_error("cannot merge Gram states of different widths");
            py::gil_scoped_release nogil;
            g.merge(other);
          },
          py::arg("other"));

  m.def(
      "evaluate",
      [](const py::array& X, const py::array_t<float, py::array::c_style>& W,
         const py::array_t<float, py::array::c_style>& b, const py::array_t<int64_t, py::array::c_style>& labels,
         int64_t tile_rows, bool scan) {
        const DType dt = dtype_of(X, "features");
        require_c_contiguous(X, "features");
        if (X.ndim() != 2) throw py::value_error("features must be 2-D [n, d]");
        if (W.ndim() != 3 || W.shape(2) != X.shape(1)) throw py::value_error("heads must be [T, K, d]");
        const int64_t n = X.shape(0), d = X.shape(1), T = W.shape(0), K = W.shape(1);
        if (b.ndim() != 2 || b.shape(0) != T || b.shape(1) != K) throw py::value_error("biases must be [T, K]");
        if (labels.ndim() != 1 || labels.shape(0) != n) throw py::value_error("labels must be [n]");
        if (K < 1) throw py::value_error("heads need at least one class");
        py::array_t<int64_t> top1(T), top5(T);
        py::array_t<int32_t> pred({T, n});
        py::array_t<uint8_t> correct({T, (n + 7) / 8});
        affeq::EvalArgs a;
        a.X = X.data();
        a.dtype = dt;
        a.n = n;
        a.d = d;
        a.W = W.data();
        a.b = b.data();
        a.T = T;
        a.K = K;
        a.labels = labels.data();
        a.top1 = top1.mutable_data();
        a.top5 = top5.mutable_data();
        a.pred = pred.mutable_data();
        a.correct = correct.mutable_data();
        a.tile_rows = tile_rows;
        a.scan = scan;
        {
          py::gil_scoped_release nogil;
          affeq::evaluate_cpu(a);
        }
        return py::make_tuple(top1, top5, pred, correct);
      },
      py::arg("X"), py::arg("W"), py::arg("b"), py::arg("labels"), py::arg("tile_rows") = 0,
      py::arg("scan") = true,
      "Top-1/top-5 counts, argmax and packed top-1 bits of every head; scan=False times the products only.");
}
