// CPU evaluation of stacked folded heads. OpenMP threads take row tiles; each runs a single-threaded sgemm
// of its tile against a group of heads into its own buffer, then the fused bias + top-5 + label scan.
// Never holds more than threads x tile x group x K logits. Single-threaded BLAS inside the OpenMP team
// (set once at import, see bindings.cpp) keeps OpenBLAS's spinning worker pool out of the scans' way.
#include "evaluate.h"

#include <algorithm>
#include <atomic>
#include <cblas.h>
#include <stdexcept>
#include <vector>

#include "topk.h"

namespace affeq {

namespace {

constexpr int64_t kLogitBudget = int64_t(16) << 20;  // bytes of logits per thread (soft)

// Scan one row of K logits (+bias) into its top-kk list; a chunk of 16 is skipped when none of it beats
// the current k-th value (the common case once the list is full), which keeps the scan near memory speed.
inline void scan_row(const float* l, const float* bias, int64_t K, int kk, float* vals, int* idx) {
  int cnt = 0;
  int64_t k = 0;
  for (; k < K && cnt < kk; ++k) topk_offer(l[k] + bias[k], static_cast<int>(k), vals, idx, cnt, kk);
  constexpr int64_t V = 16;
  for (; k + V <= K; k += V) {
    const float thr = vals[kk - 1];
    int any = 0;
    for (int64_t j = 0; j < V; ++j) any |= static_cast<int>(l[k + j] + bias[k + j] > thr);
    if (any)
      for (int64_t j = 0; j < V; ++j)
        topk_offer(l[k + j] + bias[k + j], static_cast<int>(k + j), vals, idx, cnt, kk);
  }
  for (; k < K; ++k) topk_offer(l[k] + bias[k], static_cast<int>(k), vals, idx, cnt, kk);
}

}  // namespace

void evaluate_cpu(const EvalArgs& a) {
  const int64_t n = a.n, d = a.d, T = a.T, K = a.K;
  const int64_t nbytes = (n + 7) / 8;
  const int kk = static_cast<int>(std::min<int64_t>(kTopK, K));
  std::fill(a.top1, a.top1 + T, int64_t(0));
  std::fill(a.top5, a.top5 + T, int64_t(0));
  std::fill(a.correct, a.correct + T * nbytes, uint8_t(0));
  if (n == 0 || T == 0) return;

  // Row tile (a multiple of 8, so packed bytes never straddle tiles) and heads per sgemm. Every sgemm
  // call re-packs its slice of W, a cost that only a tall tile amortises (packing ~8 bytes per weight vs
  // 2R flops): R = 2048 keeps it near 2%. Small n gets smaller tiles so that every thread has work.
  const int64_t nth = max_threads();
  int64_t R = a.tile_rows > 0 ? a.tile_rows : std::min<int64_t>(2048, (n + 2 * nth - 1) / (2 * nth));
  R = std::max<int64_t>(8, (R + 7) / 8 * 8);
  const int64_t G = std::clamp<int64_t>(kLogitBudget / (R * K * 4), 1, T);
  const int64_t ntiles = (n + R - 1) / R;
  std::atomic<bool> bad{false};
  std::vector<int64_t> c1(T, 0), c5(T, 0);

#pragma omp parallel
  {
    std::vector<float> L(static_cast<size_t>(R * G * K));
    std::vector<float> xbuf(a.dtype == DType::F16 ? static_cast<size_t>(R * d) : 0);
    std::vector<int64_t> my1(T, 0), my5(T, 0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t tile = 0; tile < ntiles; ++tile) {
      if (bad.load(std::memory_order_relaxed)) continue;
      const int64_t row0 = tile * R, r = std::min(R, n - row0);
      const float* Xt;
      bool ok = true;
      if (a.dtype == DType::F32) {
        Xt = static_cast<const float*>(a.X) + row0 * d;
        ok = all_finite_f32(Xt, r * d);
      } else {
        const uint16_t* src = static_cast<const uint16_t*>(a.X) + row0 * d;
        ok = all_finite_f16(src, r * d);
        decode_f16(src, xbuf.data(), r * d);
        Xt = xbuf.data();
      }
      if (!ok) {
        bad.store(true);
        continue;
      }
      for (int64_t t0 = 0; t0 < T; t0 += G) {
        const int64_t g = std::min(G, T - t0);
        const int64_t ld = g * K;
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(r),
                          static_cast<blasint>(ld), static_cast<blasint>(d), 1.0f, Xt,
                          static_cast<blasint>(d), a.W + t0 * K * d, static_cast<blasint>(d), 0.0f,
                          L.data(), static_cast<blasint>(ld));
        if (!a.scan) continue;
        for (int64_t h = 0; h < g; ++h) {
          const int64_t t = t0 + h;
          uint8_t* out = a.correct + t * nbytes + row0 / 8;  // bytes of this tile only
          for (int64_t i = 0; i < r; ++i) {
            float vals[kTopK];
            int idx[kTopK];
            scan_row(L.data() + i * ld + h * K, a.b + t * K, K, kk, vals, idx);
            const int64_t lab = a.labels[row0 + i];
            a.pred[t * n + row0 + i] = idx[0];
            if (lab < 0) continue;
            bool in5 = false;
            for (int j = 0; j < kk; ++j) in5 = in5 || (idx[j] == lab);
            if (idx[0] == lab) {
              ++my1[t];
              out[i >> 3] |= static_cast<uint8_t>(0x80u >> (i & 7));
            }
            my5[t] += in5;
          }
        }
      }
    }
#pragma omp critical
    for (int64_t t = 0; t < T; ++t) {
      c1[t] += my1[t];
      c5[t] += my5[t];
    }
  }
  if (bad.load()) throw std::domain_error("features contain NaN or Inf");
  std::copy(c1.begin(), c1.end(), a.top1);
  std::copy(c5.begin(), c5.end(), a.top5);
}

}  // namespace affeq
