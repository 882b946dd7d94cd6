// pybind11 entry point of affeq_rt._core_cuda: raw-device-pointer launchers driven from cupy in core.py.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cuda/launch.h"

namespace py = pybind11;

namespace {

void check(int err, const char* what) {
  if (err != 0)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(static_cast<cudaError_t>(err)));
}

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

PYBIND11_MODULE(_core_cuda, m) {
  m.doc() = "affeq-rt compiled core (CUDA kernels; GEMMs run in cuBLAS via cupy)";
  m.def("backend", []() { return "cuda"; });
  m.def(
      "probe",
      []() -> py::tuple {
        int c = 0;
        const cudaError_t e = cudaGetDeviceCount(&c);
        if (e != cudaSuccess) {
          cudaGetLastError();
          return py::make_tuple(0, std::string(cudaGetErrorString(e)));
        }
        int rt = 0, drv = 0;
        cudaRuntimeGetVersion(&rt);
        cudaDriverGetVersion(&drv);
        return py::make_tuple(c, "runtime " + std::to_string(rt) + ", driver " + std::to_string(drv));
      },
      "(device count, runtime/driver versions or the CUDA error that hid the devices).");
  m.def(
      "chan_update",
      [](uintptr_t S, uintptr_t C, uintptr_t ybar, uintptr_t delta, double mrows, double f, int64_t d,
         uintptr_t stream) {
        check(affeq_cuda::chan_update(ptr<double>(S), ptr<const float>(C), ptr<const double>(ybar),
                                      ptr<const double>(delta), mrows, f, d, stream),
              "chan_update");
      },
      py::arg("S"), py::arg("C"), py::arg("ybar"), py::arg("delta"), py::arg("m"), py::arg("f"), py::arg("d"),
      py::arg("stream"));
  m.def(
      "topk_scan",
      [](uintptr_t L, int64_t ld, uintptr_t bias, uintptr_t labels, int64_t R, int64_t G, int64_t K,
         int64_t t0, int64_t n, int64_t row0, uintptr_t pred, uintptr_t flags, uintptr_t hits1,
         uintptr_t hits5, uintptr_t stream) {
        check(affeq_cuda::topk_scan(ptr<const float>(L), ld, ptr<const float>(bias), ptr<const int64_t>(labels),
                                    R, G, K, t0, n, row0, ptr<int32_t>(pred), ptr<uint8_t>(flags),
                                    ptr<unsigned long long>(hits1), ptr<unsigned long long>(hits5), stream),
              "topk_scan");
      },
      py::arg("L"), py::arg("ld"), py::arg("bias"), py::arg("labels"), py::arg("R"), py::arg("G"),
      py::arg("K"), py::arg("t0"), py::arg("n"), py::arg("row0"), py::arg("pred"), py::arg("flags"),
      py::arg("hits1"), py::arg("hits5"), py::arg("stream"));
  m.def(
      "pack_bits",
      [](uintptr_t flags, int64_t T, int64_t n, uintptr_t out, uintptr_t stream) {
        check(affeq_cuda::pack_bits(ptr<const uint8_t>(flags), T, n, ptr<uint8_t>(out), stream), "pack_bits");
      },
      py::arg("flags"), py::arg("T"), py::arg("n"), py::arg("out"), py::arg("stream"));
}
