// CUDA kernels of affeq_rt._core_cuda: float64 Chan update of the Gram state and the fused warp top-5 scan.
// The matrix products themselves (float64 Y^T Y, float32 logits) run in cuBLAS through cupy on the Python side.
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>

#include "cuda/launch.h"
#include "topk.h"

namespace affeq_cuda {

namespace {

// S, C: d x d float64 (C = Y^T Y of the shifted block); ybar, delta: [d].
__global__ void chan_update_kernel(double* S, const double* C, const double* ybar, const double* delta,
                                   double m, double f, int64_t d) {
  const int64_t total = d * d;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / d, j = e - i * d;
    S[e] += C[e] - m * ybar[i] * ybar[j] + f * delta[i] * delta[j];
  }
}

// (v, k) beats (w, l) when larger, or equal with a lower class index.
__device__ __forceinline__ bool beats(float v, int k, float w, int l) { return v > w || (v == w && k < l); }

__global__ void topk_kernel(const float* L, int64_t ld, const float* bias, const int64_t* labels,
                            int64_t R, int64_t G, int64_t K, int64_t t0, int64_t n, int64_t row0,
                            int32_t* pred, uint8_t* flags, unsigned long long* hits1,
                            unsigned long long* hits5) {
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= R * G) return;  // whole warps exit together
  const int64_t r = warp / G, h = warp - r * G, t = t0 + h;
  const float* l = L + r * ld + h * K;
  const float* b = bias + t * K;
  const int kk = K < affeq::kTopK ? static_cast<int>(K) : affeq::kTopK;
  float vals[affeq::kTopK];
  int idx[affeq::kTopK];
  int cnt = 0;
  for (int64_t k = lane; k < K; k += 32) affeq::topk_offer(l[k] + b[k], static_cast<int>(k), vals, idx, cnt, kk);
  // Warp merge: kk rounds of "best head of every lane's sorted list", the winner advances.
  int ptr = 0;
  int win[affeq::kTopK];
  for (int s = 0; s < kk; ++s) {
    float v = ptr < cnt ? vals[ptr] : -INFINITY;  // an exhausted lane offers (-inf, INT_MAX)
    int k = ptr < cnt ? idx[ptr] : INT_MAX;
    for (int off = 16; off > 0; off >>= 1) {
      const float v2 = __shfl_xor_sync(0xffffffffu, v, off);
      const int k2 = __shfl_xor_sync(0xffffffffu, k, off);
      if (beats(v2, k2, v, k)) {
        v = v2;
        k = k2;
      }
    }
    win[s] = k;
    if (ptr < cnt && idx[ptr] == k) ++ptr;  // class indices are unique across lanes
  }
  if (lane == 0) {
    const int64_t lab = labels[row0 + r];
    bool in5 = false;
    for (int s = 0; s < kk; ++s) in5 = in5 || (win[s] == lab);
    const bool hit1 = lab >= 0 && win[0] == lab;
    pred[t * n + row0 + r] = win[0];
    flags[t * n + row0 + r] = hit1 ? 1 : 0;
    if (hit1) atomicAdd(hits1 + t, 1ull);
    if (lab >= 0 && in5) atomicAdd(hits5 + t, 1ull);
  }
}

__global__ void pack_bits_kernel(const uint8_t* flags, int64_t T, int64_t n, uint8_t* out) {
  const int64_t nb = (n + 7) / 8;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < T * nb;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = e / nb, j = e - t * nb;
    uint8_t v = 0;
    for (int q = 0; q < 8; ++q) {
      const int64_t i = 8 * j + q;
      if (i < n && flags[t * n + i]) v |= static_cast<uint8_t>(0x80u >> q);
    }
    out[e] = v;
  }
}

inline unsigned grid_for(int64_t work, int threads) {
  int64_t g = (work + threads - 1) / threads;
  if (g > 65535 * 16) g = 65535 * 16;
  return static_cast<unsigned>(g < 1 ? 1 : g);
}

}  // namespace

int chan_update(double* S, const double* C, const double* ybar, const double* delta, double m, double f,
                int64_t d, uintptr_t stream) {
  chan_update_kernel<<<grid_for(d * d, 256), 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      S, C, ybar, delta, m, f, d);
  return static_cast<int>(cudaGetLastError());
}

int topk_scan(const float* L, int64_t ld, const float* bias, const int64_t* labels, int64_t R, int64_t G,
              int64_t K, int64_t t0, int64_t n, int64_t row0, int32_t* pred, uint8_t* flags,
              unsigned long long* hits1, unsigned long long* hits5, uintptr_t stream) {
  const int threads = 256;  // 8 warps per block
  const int64_t warps = R * G;
  const unsigned blocks = static_cast<unsigned>((warps * 32 + threads - 1) / threads);
  if (warps > 0)
    topk_kernel<<<blocks, threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        L, ld, bias, labels, R, G, K, t0, n, row0, pred, flags, hits1, hits5);
  return static_cast<int>(cudaGetLastError());
}

int pack_bits(const uint8_t* flags, int64_t T, int64_t n, uint8_t* out, uintptr_t stream) {
  const int64_t nb = (n + 7) / 8;
  if (T * nb > 0)
    pack_bits_kernel<<<grid_for(T * nb, 256), 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(flags, T, n,
                                                                                                 out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace affeq_cuda
