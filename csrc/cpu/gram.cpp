// CPU Gram kernels: row ingestion (finite test, float16 decode, float64 shift) and the float64 block update
// (rank-2 Chan correction, then OpenBLAS dsyrk/dgemm column bands accumulating into the scatter).
#include "gram.h"

#include <algorithm>
#include <cblas.h>
#include <cmath>
#include <vector>

namespace affeq {

int64_t gram_ingest(double* buf, int64_t cap, int64_t nbuf, int64_t d, const void* X, int64_t rows,
                    int64_t start, DType dt, const double* ref, double* colsum, int64_t* skipped) {
  int64_t r = start, skip = 0;
  std::vector<float> tmp(dt == DType::F16 ? d : 0);
  for (; r < rows && nbuf < cap; ++r) {
    const float* src;
    if (dt == DType::F32) {
      src = static_cast<const float*>(X) + r * d;
      if (!all_finite_f32(src, d)) {
        ++skip;
        continue;
      }
    } else {
      const uint16_t* h = static_cast<const uint16_t*>(X) + r * d;
      if (!all_finite_f16(h, d)) {
        ++skip;
        continue;
      }
      decode_f16(h, tmp.data(), d);
      src = tmp.data();
    }
    // float32 -> float64 is exact; x - ref then carries one float64 rounding (relative eps64).
    double* dst = buf + nbuf * d;
    for (int64_t j = 0; j < d; ++j) {
      const double y = static_cast<double>(src[j]) - ref[j];
      dst[j] = y;
      colsum[j] += y;
    }
    ++nbuf;
  }
  *skipped = skip;
  return r;
}

void gram_syrk_update(double* S, const double* Y, int64_t m, int64_t d, const double* ybar,
                      const double* delta, double f) {
  // Rank-2 part first (upper triangle): the block's own mean and the Chan cross term.
  const double md = static_cast<double>(m);
  const bool par = d >= 256;
#pragma omp parallel for schedule(dynamic, 16) if (par)
  for (int64_t i = 0; i < d; ++i) {
    const double a = -md * ybar[i], b = f * delta[i];
    double* Si = S + i * d;
    for (int64_t j = i; j < d; ++j) Si[j] += a * ybar[j] + b * delta[j];
  }
  if (m == 0) return;
  // Y^T Y into the upper triangle, beta = 1. Single-threaded OpenBLAS calls inside an OpenMP team (see
  // bindings.cpp): the triangle is cut into B column bands of equal area (edges at d*sqrt(e/B)); band
  // [ja, ja+w) needs a dgemm for the rows above its diagonal block and a dsyrk for the block itself.
  const int threads = (m * d * d > (int64_t(1) << 22)) ? max_threads() : 1;
  const blasint ld = static_cast<blasint>(d), mm = static_cast<blasint>(m);
  if (threads <= 1) {
    scipy_cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, ld, mm, 1.0, Y, ld, 1.0, S, ld);
    return;
  }
  const int64_t B = std::min<int64_t>(d, 4 * threads);
  std::vector<int64_t> edge(B + 1);
  for (int64_t e = 0; e <= B; ++e)
    edge[e] = static_cast<int64_t>(std::llround(static_cast<double>(d) * std::sqrt(double(e) / double(B))));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t e = B - 1; e >= 0; --e) {
    const int64_t ja = edge[e], w = edge[e + 1] - edge[e];
    if (w <= 0) continue;
    if (ja > 0)
      scipy_cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<blasint>(ja),
                        static_cast<blasint>(w), mm, 1.0, Y, ld, Y + ja, ld, 1.0, S + ja, ld);
    scipy_cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<blasint>(w), mm, 1.0, Y + ja, ld,
                      1.0, S + ja * d + ja, ld);
  }
}

}  // namespace affeq
