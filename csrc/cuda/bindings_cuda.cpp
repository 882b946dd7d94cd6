// pybind11 entry point of affeq_rt._core_cuda: checked launchers of the CUDA kernels. Device arrays arrive
// through __cuda_array_interface__ (cupy, numba, torch): shape, dtype, contiguity and writability of every
// argument are checked first (ValueError/TypeError, before any CUDA call), then that each pointer lies in
// device memory of the current device. GEMMs run in cuBLAS through cupy on the Python side.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/launch.h"

namespace py = pybind11;

namespace {

void check(int err, const char* what) {
  if (err != 0)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(static_cast<cudaError_t>(err)));
}

// One device array described by __cuda_array_interface__ (version 2 or 3).
struct DevArray {
  std::string name;
  void* ptr = nullptr;
  std::vector<int64_t> shape;
  int64_t size() const {
    int64_t s = 1;
    for (int64_t v : shape) s *= v;
    return s;
  }
  int64_t dim(size_t i) const { return shape.at(i); }
};

// Parse and check: typestr (byte order ignored only where it is native/irrelevant), ndim, C-contiguity,
// no mask, writable when asked. `dims` = expected sizes, -1 = any.
DevArray device_array(const py::handle& obj, const char* name, const char* type, size_t itemsize,
                      std::vector<int64_t> dims, bool writable) {
  if (!py::hasattr(obj, "__cuda_array_interface__"))
    throw py::type_error(std::string(name) + " must be a CUDA device array (__cuda_array_interface__), got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  py::dict cai = obj.attr("__cuda_array_interface__");
  DevArray a;
  a.name = name;
  const std::string ts = py::str(cai["typestr"]);
  const bool native = !ts.empty() && (ts[0] == '<' || ts[0] == '|' || ts[0] == '=');
  if (!native || ts.substr(1) != type)
    throw py::type_error(std::string(name) + " must have dtype " + type + ", got " + ts);
  py::tuple shape = cai["shape"];
  for (auto v : shape) a.shape.push_back(v.cast<int64_t>());
  if (a.shape.size() != dims.size())
    throw py::value_error(std::string(name) + " must be " + std::to_string(dims.size()) + "-D, got " +
                          std::to_string(a.shape.size()) + "-D");
  for (size_t i = 0; i < dims.size(); ++i) {
    if (a.shape[i] < 0) throw py::value_error(std::string(name) + " has a negative size");
    if (dims[i] >= 0 && a.shape[i] != dims[i])
      throw py::value_error(std::string(name) + " has size " + std::to_string(a.shape[i]) + " in dimension " +
                            std::to_string(i) + ", expected " + std::to_string(dims[i]));
  }
  if (cai.contains("strides") && !cai["strides"].is_none()) {
    py::tuple st = cai["strides"];
    int64_t expect = static_cast<int64_t>(itemsize);
    for (size_t i = a.shape.size(); i-- > 0;) {
      if (a.shape[i] > 1 && st[i].cast<int64_t>() != expect)
        throw py::value_error(std::string(name) + " must be C-contiguous");
      expect *= a.shape[i];
    }
  }
  if (cai.contains("mask") && !cai["mask"].is_none())
    throw py::value_error(std::string(name) + " must not be a masked array");
  py::tuple data = cai["data"];
  a.ptr = reinterpret_cast<void*>(data[0].cast<uintptr_t>());
  if (writable && data[1].cast<bool>()) throw py::value_error(std::string(name) + " is read-only");
  if (a.ptr == nullptr && a.size() > 0) throw py::value_error(std::string(name) + " has a null pointer");
  return a;
}

// Every pointer must be device (or managed) memory of the current device. Runs after all shape checks.
void require_on_device(std::initializer_list<const DevArray*> arrays) {
  int dev = -1;
  const cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw py::value_error(std::string("no current CUDA device: ") + cudaGetErrorString(e));
  }
  for (const DevArray* a : arrays) {
    if (a->size() == 0) continue;
    cudaPointerAttributes attr{};
    const cudaError_t pe = cudaPointerGetAttributes(&attr, a->ptr);
    if (pe != cudaSuccess) {
      cudaGetLastError();
      throw py::value_error(a->name + " is not CUDA memory: " + cudaGetErrorString(pe));
    }
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
      throw py::value_error(a->name + " is not in device memory");
    if (attr.device != dev)
      throw py::value_error(a->name + " lives on device " + std::to_string(attr.device) + ", the current device is " +
                            std::to_string(dev));
  }
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
      [](const py::object& S, const py::object& C, const py::object& ybar, const py::object& delta, double mrows,
         double f, uintptr_t stream) {
        const DevArray s = device_array(S, "S", "f8", 8, {-1, -1}, true);
        const int64_t d = s.dim(0);
        if (s.dim(1) != d) throw py::value_error("S must be square [d, d]");
        const DevArray c = device_array(C, "C", "f8", 8, {d, d}, false);
        const DevArray yb = device_array(ybar, "ybar", "f8", 8, {d}, false);
        const DevArray dl = device_array(delta, "delta", "f8", 8, {d}, false);
        if (!(mrows >= 0) || !(f >= 0)) throw py::value_error("m and f must be non-negative");
        require_on_device({&s, &c, &yb, &dl});
        check(affeq_cuda::chan_update(static_cast<double*>(s.ptr), static_cast<const double*>(c.ptr),
                                      static_cast<const double*>(yb.ptr), static_cast<const double*>(dl.ptr), mrows,
                                      f, d, stream),
              "chan_update");
      },
      py::arg("S"), py::arg("C"), py::arg("ybar"), py::arg("delta"), py::arg("m"), py::arg("f"), py::arg("stream"),
      "S += C - m ybar ybar^T + f delta delta^T (float64 [d, d]) on the given stream.");
  m.def(
      "topk_scan",
      [](const py::object& L, const py::object& bias, const py::object& labels, int64_t t0, int64_t row0,
         const py::object& pred, const py::object& flags, const py::object& hits1, const py::object& hits5,
         uintptr_t stream) {
        const DevArray b = device_array(bias, "bias", "f4", 4, {-1, -1}, false);
        const int64_t T = b.dim(0), K = b.dim(1);
        if (K < 1) throw py::value_error("bias must have at least one class");
        const DevArray l = device_array(L, "L", "f4", 4, {-1, -1}, false);
        const int64_t R = l.dim(0);
        if (l.dim(1) % K != 0) throw py::value_error("L must be [R, G*K] for the K classes of bias");
        const int64_t G = l.dim(1) / K;
        if (t0 < 0 || t0 + G > T) throw py::value_error("heads t0..t0+G outside the T heads of bias");
        const DevArray lab = device_array(labels, "labels", "i8", 8, {-1}, false);
        const int64_t n = lab.dim(0);
        if (row0 < 0 || row0 + R > n) throw py::value_error("rows row0..row0+R outside the n labels");
        const DevArray p = device_array(pred, "pred", "i4", 4, {T, n}, true);
        const DevArray fl = device_array(flags, "flags", "u1", 1, {T, n}, true);
        const DevArray h1 = device_array(hits1, "hits1", "u8", 8, {T}, true);
        const DevArray h5 = device_array(hits5, "hits5", "u8", 8, {T}, true);
        require_on_device({&l, &b, &lab, &p, &fl, &h1, &h5});
        check(affeq_cuda::topk_scan(static_cast<const float*>(l.ptr), G * K, static_cast<const float*>(b.ptr),
                                    static_cast<const int64_t*>(lab.ptr), R, G, K, t0, n, row0,
                                    static_cast<int32_t*>(p.ptr), static_cast<uint8_t*>(fl.ptr),
                                    static_cast<unsigned long long*>(h1.ptr), static_cast<unsigned long long*>(h5.ptr),
                                    stream),
              "topk_scan");
      },
      py::arg("L"), py::arg("bias"), py::arg("labels"), py::arg("t0"), py::arg("row0"), py::arg("pred"),
      py::arg("flags"), py::arg("hits1"), py::arg("hits5"), py::arg("stream"),
      "Top-5 of logits L[R, G*K] + bias[t0:t0+G] per (row, head); writes pred/flags rows row0.., adds hits.");
  m.def(
      "pack_bits",
      [](const py::object& flags, const py::object& out, uintptr_t stream) {
        const DevArray fl = device_array(flags, "flags", "u1", 1, {-1, -1}, false);
        const int64_t T = fl.dim(0), n = fl.dim(1);
        const DevArray o = device_array(out, "out", "u1", 1, {T, (n + 7) / 8}, true);
        require_on_device({&fl, &o});
        check(affeq_cuda::pack_bits(static_cast<const uint8_t*>(fl.ptr), T, n, static_cast<uint8_t*>(o.ptr), stream),
              "pack_bits");
      },
      py::arg("flags"), py::arg("out"), py::arg("stream"), "out[T, ceil(n/8)] = np.packbits(flags[T, n], axis=1).");
}
