// Batched mapped-classifier evaluation (CPU): tiled sgemm over row tiles and head groups, fused top-5 scan.
#pragma once

#include <cstdint>

#include "common.h"

namespace affeq {

struct EvalArgs {
  const void* X = nullptr;  // n x d, float32 or float16 bits, C order
  DType dtype = DType::F32;
  int64_t n = 0, d = 0;
  const float* W = nullptr;  // T x K x d
  const float* b = nullptr;  // T x K
  int64_t T = 0, K = 0;
  const int64_t* labels = nullptr;  // n; -1 = unknown
  int64_t* top1 = nullptr;          // T
  int64_t* top5 = nullptr;          // T
  int32_t* pred = nullptr;          // T x n
  uint8_t* correct = nullptr;       // T x ceil(n/8), np.packbits order
  int64_t tile_rows = 0;            // 0 = automatic
  bool scan = true;                 // false: only the matrix products (benchmark floor)
};

// Runs the evaluation; throws std::domain_error if X holds NaN or Inf.
void evaluate_cpu(const EvalArgs& a);

}  // namespace affeq
