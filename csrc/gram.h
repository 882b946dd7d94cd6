// CPU kernels of the streaming Gram accumulator. The state machine (buffering, blocks, Chan merges) lives
// once, in the Python driver affeq_rt/core/gram.py; these are the two heavy steps it calls per block.
#pragma once

#include <cstdint>

#include "common.h"

namespace affeq {

// Copy finite rows of X[start:rows] (width d, float32 or float16 bits, C order) into the float64 block
// buffer buf[nbuf:cap] as x - ref, adding each copied row to colsum (float64 [d]). Stops when the buffer
// is full or X is exhausted. Rows holding NaN or Inf are skipped. Returns the next unread row of X;
// *skipped receives the rows skipped on the way.
int64_t gram_ingest(double* buf, int64_t cap, int64_t nbuf, int64_t d, const void* X, int64_t rows,
                    int64_t start, DType dt, const double* ref, double* colsum, int64_t* skipped);

// Chan merge of one shifted block into the float64 scatter (upper triangle of the d x d row-major S):
//   S += Y^T Y - m ybar ybar^T + f delta delta^T
// where Y is the block (m x d float64, C order, rows shifted by a reference), ybar its column means,
// delta = block mean - running mean and f = n m / (n + m). Y^T Y runs in OpenBLAS dsyrk/dgemm accumulating
// straight into S (beta = 1), split into column bands of equal work over the OpenMP threads.
void gram_syrk_update(double* S, const double* Y, int64_t m, int64_t d, const double* ybar,
                      const double* delta, double f);

}  // namespace affeq
