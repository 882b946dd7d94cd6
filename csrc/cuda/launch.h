// Host launchers of the CUDA kernels of affeq_rt._core_cuda; all pointers are device pointers, work is
// queued on the given stream (cupy's current stream on the Python side). Return a cudaError_t as int.
#pragma once

#include <cstdint>

namespace affeq_cuda {

// S[i,j] += C[i,j] - m*ybar[i]*ybar[j] + f*delta[i]*delta[j] over the full d x d float64 matrix S
// (C: float64 d x d, the shifted block's Y^T Y).
int chan_update(double* S, const double* C, const double* ybar, const double* delta, double m, double f,
                int64_t d, uintptr_t stream);

// One warp per (row, head): top-5 of L[r, h*K:(h+1)*K] + bias[(t0+h)*K:], ties to the lowest class.
// Writes pred[(t0+h)*n + row0 + r], flags[(t0+h)*n + row0 + r] (top-1 hit) and adds to hits1/hits5[t0+h].
int topk_scan(const float* L, int64_t ld, const float* bias, const int64_t* labels, int64_t R, int64_t G,
              int64_t K, int64_t t0, int64_t n, int64_t row0, int32_t* pred, uint8_t* flags,
              unsigned long long* hits1, unsigned long long* hits5, uintptr_t stream);

// out[t, j] = bits flags[t, 8j..8j+7] packed most significant first (np.packbits order).
int pack_bits(const uint8_t* flags, int64_t T, int64_t n, uint8_t* out, uintptr_t stream);

}  // namespace affeq_cuda
