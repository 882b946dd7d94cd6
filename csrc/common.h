// Shared helpers of the compiled core: dtype tags, float16 decoding, finiteness tests, OpenMP shims.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace affeq {

// Element type of a feature matrix handed to the core.
enum class DType : int { F32 = 0, F16 = 1 };

// IEEE binary16 bits -> float (exact; handles subnormals, Inf, NaN).
inline float half_bits_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t f;
  if (exp == 0) {
    if (mant == 0) {
      f = sign;
    } else {  // subnormal: renormalise
      int e = 127 - 15 + 1;
      while (!(mant & 0x400u)) {
        mant <<= 1;
        --e;
      }
      mant &= 0x3FFu;
      f = sign | (static_cast<uint32_t>(e) << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    f = sign | 0x7F800000u | (mant << 13);
  } else {
    f = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &f, 4);
  return out;
}

// 65536-entry lookup table binary16 -> float, built once (thread-safe static init).
inline const float* half_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t i = 0; i < 65536; ++i) t[i] = half_bits_to_float(static_cast<uint16_t>(i));
    return t;
  }();
  return table.data();
}

// True when every float32 in [p, p+len) is finite (vectorisable bit test, no early exit).
inline bool all_finite_f32(const float* p, int64_t len) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(p);
  uint32_t bad = 0;
  for (int64_t i = 0; i < len; ++i) bad |= static_cast<uint32_t>((u[i] & 0x7F800000u) == 0x7F800000u);
  return bad == 0;
}

// True when every binary16 in [p, p+len) is finite.
inline bool all_finite_f16(const uint16_t* p, int64_t len) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < len; ++i) bad |= static_cast<uint32_t>((p[i] & 0x7C00u) == 0x7C00u);
  return bad == 0;
}

// Decode len binary16 values into float32 through the lookup table.
inline void decode_f16(const uint16_t* src, float* dst, int64_t len) {
  const float* t = half_table();
  for (int64_t i = 0; i < len; ++i) dst[i] = t[src[i]];
}

// Uninitialised, 2 MiB-aligned array that asks Linux for transparent huge pages: first-touch page faults
// of a 100+ MiB block buffer cost more than the arithmetic on it when they come 4 KiB at a time.
template <class T>
class BigArray {
 public:
  BigArray() = default;
  BigArray(const BigArray&) = delete;
  BigArray& operator=(const BigArray&) = delete;
  ~BigArray() { std::free(p_); }
  // Make room for n elements (contents unspecified); keeps the old block when it is large enough.
  void reserve(size_t n) {
    if (n <= n_) return;
    std::free(p_);
    p_ = nullptr;
    n_ = 0;
    const size_t align = size_t(2) << 20;
    const size_t bytes = ((n * sizeof(T) + align - 1) / align) * align;
    void* q = nullptr;
    if (posix_memalign(&q, align, bytes) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(q, bytes, MADV_HUGEPAGE);
#endif
    p_ = static_cast<T*>(q);
    n_ = n;
  }
  void zero() { std::memset(static_cast<void*>(p_), 0, n_ * sizeof(T)); }
  T* data() { return p_; }
  const T* data() const { return p_; }
  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace affeq
