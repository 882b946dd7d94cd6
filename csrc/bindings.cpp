// pybind11 entry point of affeq_rt._core: the CPU kernels of the Gram accumulator and the evaluator.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cblas.h>
#include <cmath>
#include <stdexcept>
#include <string>

#include "common.h"
#include "evaluate.h"
#include "gram.h"

namespace py = pybind11;
using affeq::DType;

namespace {

// Whether a's dtype is T in native byte order. Compares by value (NumPy's EquivTypes), not by
// identity: an equal dtype instance (e.g. one unpickled from another process) is accepted.
template <typename T>
bool native_dtype(const py::array& a) {
  return py::array_t<T>::check_(a);
}

// dtype tag of a float32/float16 array, or a ValueError naming what was given.
DType dtype_of(const py::array& a, const char* what) {
  if (native_dtype<float>(a)) return DType::F32;
  if (a.dtype().kind() == 'f' && a.itemsize() == 2) return DType::F16;
  throw py::value_error(std::string(what) + " must be float32 or float16, got " +
                        std::string(py::str(a.dtype())));
}

void require_c_contiguous(const py::array& a, const char* what) {
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(what) + " must be C-contiguous");
}

// Data pointer of a C-contiguous float64 array of ndim dims (dim0/dim1 = -1: any size), writable when
// asked; a ValueError naming the argument otherwise. Never copies: outputs must be the caller's memory.
const double* f64_buffer(const py::array& a, const char* what, int ndim, int64_t dim0, int64_t dim1,
                         bool writable) {
  if (!native_dtype<double>(a))
    throw py::value_error(std::string(what) + " must be float64, got " + std::string(py::str(a.dtype())));
  require_c_contiguous(a, what);
  if (a.ndim() != ndim) throw py::value_error(std::string(what) + " must be " + std::to_string(ndim) + "-D");
  if (dim0 >= 0 && a.shape(0) != dim0)
    throw py::value_error(std::string(what) + " has " + std::to_string(a.shape(0)) + " rows, expected " +
                          std::to_string(dim0));
  if (ndim > 1 && dim1 >= 0 && a.shape(1) != dim1)
    throw py::value_error(std::string(what) + " has " + std::to_string(a.shape(1)) + " columns, expected " +
                          std::to_string(dim1));
  if (writable && !a.writeable()) throw py::value_error(std::string(what) + " must be writable");
  return static_cast<const double*>(a.data());
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

  // Gram kernels (the state machine is the Python driver in affeq_rt/core/gram.py). Every argument is
  // checked here: a wrong shape, dtype or layout is a ValueError, never a stray write.
  m.def(
      "gram_ingest",
      [](const py::array& buf, int64_t nbuf, const py::array& X, int64_t start, const py::array& ref,
         const py::array& colsum) {
        const double* bp = f64_buffer(buf, "buf", 2, -1, -1, true);
        const int64_t cap = buf.shape(0), d = buf.shape(1);
        const DType dt = dtype_of(X, "features");
        require_c_contiguous(X, "features");
        if (X.ndim() != 2 || X.shape(1) != d)
          throw py::value_error("features must have shape [rows, " + std::to_string(d) + "]");
        const double* rp = f64_buffer(ref, "ref", 1, d, -1, false);
        const double* cp = f64_buffer(colsum, "colsum", 1, d, -1, true);
        const int64_t rows = X.shape(0);
        if (nbuf < 0 || nbuf > cap) throw py::value_error("nbuf outside 0..buffer rows");
        if (start < 0 || start > rows) throw py::value_error("start outside 0..rows");
        const void* xp = X.data();
        int64_t skipped = 0, stop = 0;
        {
          py::gil_scoped_release nogil;
          stop = affeq::gram_ingest(const_cast<double*>(bp), cap, nbuf, d, xp, rows, start, dt, rp,
                                    const_cast<double*>(cp), &skipped);
        }
        return py::make_tuple(stop, skipped);
      },
      py::arg("buf"), py::arg("nbuf"), py::arg("X"), py::arg("start"), py::arg("ref"), py::arg("colsum"),
      "Copy finite rows X[start:] into buf[nbuf:] as float64 x - ref (colsum += rows); returns (stop, skipped).");
  m.def(
      "gram_syrk_update",
      [](const py::array& S, const py::array& Y, const py::array& ybar, const py::array& delta, double f) {
        const double* sp = f64_buffer(S, "S", 2, -1, -1, true);
        const int64_t d = S.shape(0);
        if (S.shape(1) != d) throw py::value_error("S must be square [d, d]");
        const double* yp = f64_buffer(Y, "Y", 2, -1, d, false);
        const double* bp = f64_buffer(ybar, "ybar", 1, d, -1, false);
        const double* dp = f64_buffer(delta, "delta", 1, d, -1, false);
        if (!std::isfinite(f) || f < 0) throw py::value_error("f must be a finite non-negative number");
        const int64_t m = Y.shape(0);
        py::gil_scoped_release nogil;
        affeq::gram_syrk_update(const_cast<double*>(sp), yp, m, d, bp, dp, f);
      },
      py::arg("S"), py::arg("Y"), py::arg("ybar"), py::arg("delta"), py::arg("f"),
      "S (upper) += Y^T Y - m ybar ybar^T + f delta delta^T, float64, Y = the shifted block [m, d].");

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
