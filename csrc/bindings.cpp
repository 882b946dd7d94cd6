// pybind11 entry point of affeq_rt._core: the CPU backend of the Gram accumulator and the evaluator.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "affeq-rt compiled core (CPU backend)";
  m.attr("__version__") = AFFEQ_VERSION;
  m.def("backend", []() { return "cpu"; }, "Name of this backend.");
}
