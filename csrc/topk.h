// Top-k (k <= 5) insertion used by the CPU scan and the CUDA warp scan; ties keep the lowest class index.
#pragma once

#if defined(__CUDACC__)
#define AFFEQ_HD __host__ __device__ __forceinline__
#else
#define AFFEQ_HD inline
#endif

namespace affeq {

constexpr int kTopK = 5;

// Offer candidate (v, k) to the list vals/idx of length cnt (sorted by value descending, then index
// ascending), capacity kk. Candidates must arrive in increasing class index k, so an equal value never
// displaces an earlier one: that is what makes ties resolve to the lowest class index.
AFFEQ_HD void topk_offer(float v, int k, float* vals, int* idx, int& cnt, int kk) {
  int p;
  if (cnt < kk) {
    p = cnt++;
  } else if (v > vals[kk - 1]) {
    p = kk - 1;
  } else {
    return;
  }
  while (p > 0 && vals[p - 1] < v) {
    vals[p] = vals[p - 1];
    idx[p] = idx[p - 1];
    --p;
  }
  vals[p] = v;
  idx[p] = k;
}

}  // namespace affeq
