// CPU Gram accumulator: float32 blocks shifted by a float32 reference, OpenBLAS ssyrk per thread on its
// share of the rows (OpenMP threads, one BLAS thread each), float64 Chan merge.
#include "gram.h"

#include <algorithm>
#include <cmath>
#include <cblas.h>
#include <stdexcept>

namespace affeq {

namespace {

// Rows per block: large enough that the O(d^2) merge is a few % of the O(m d^2) ssyrk, small enough
// that the buffer stays within ~256 MiB.
int64_t default_block_rows(int64_t d) {
  int64_t m = d >= 1024 ? 8192 : 4096;
  const int64_t cap = (int64_t(256) << 20) / (4 * d);
  return std::max<int64_t>(64, std::min(m, cap));
}

}  // namespace

GramState::GramState(int64_t dim, int64_t block_rows) : d_(dim) {
  if (dim < 1) throw std::invalid_argument("Gram dimension must be >= 1");
  m_ = block_rows > 0 ? block_rows : default_block_rows(dim);
  mean_.assign(d_, 0.0);
  S_.reserve(static_cast<size_t>(d_ * d_));
  S_.zero();
  buf_.reserve(static_cast<size_t>(m_ * d_));  // allocated up front: no first-update stall
  colsum_.assign(d_, 0.0);
  c_.assign(d_, 0.0f);  // sized once: update() holds a pointer into it across flushes
}

int64_t GramState::update(const void* data, int64_t rows, DType dt) {
  if (rows <= 0) return 0;
  const int64_t d = d_;
  int64_t skipped = 0;
  double* cs = colsum_.data();
  const float* c = c_.data();
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = buf_.data() + nbuf_ * d;
    if (dt == DType::F32) {
      const float* src = static_cast<const float*>(data) + r * d;
      if (!all_finite_f32(src, d)) {
        ++skipped;
        continue;
      }
      if (nbuf_ == 0) shifted_ = have_c_;
      if (shifted_) {
        for (int64_t j = 0; j < d; ++j) dst[j] = src[j] - c[j];
      } else {
        std::memcpy(dst, src, sizeof(float) * d);
      }
    } else {
      const uint16_t* src = static_cast<const uint16_t*>(data) + r * d;
      if (!all_finite_f16(src, d)) {
        ++skipped;
        continue;
      }
      if (nbuf_ == 0) shifted_ = have_c_;
      decode_f16(src, dst, d);
      if (shifted_)
        for (int64_t j = 0; j < d; ++j) dst[j] -= c[j];
    }
    // Column sums (of the shifted rows when shifted_) ride along with the copy.
    for (int64_t j = 0; j < d; ++j) cs[j] += dst[j];
    if (++nbuf_ == m_) flush();
  }
  skipped_ += skipped;
  return skipped;
}

void GramState::flush() {
  const int64_t m = nbuf_;
  if (m == 0) return;
  const int64_t d = d_;
  float* Y = buf_.data();
  // Every block is reduced as Y = X - c with a float32 reference c close to the block's rows, so the
  // subtraction is nearly exact and the float32 products stay small. Once a mean is known, c is that
  // running mean rounded to float32 and the rows were shifted while being copied in (update). The first
  // block (no mean yet) is shifted here by its own mean, computed from the float64 column sums.
  std::vector<double> ysum(d, 0.0);
  std::vector<float> c(d);
  if (shifted_) {
    std::copy(c_.begin(), c_.end(), c.begin());
    std::copy(colsum_.begin(), colsum_.end(), ysum.begin());
  } else {
    for (int64_t j = 0; j < d; ++j) c[j] = static_cast<float>(colsum_[j] / static_cast<double>(m));
    for (int64_t r = 0; r < m; ++r) {
      float* row = Y + r * d;
      for (int64_t j = 0; j < d; ++j) {
        row[j] -= c[j];
        ysum[j] += row[j];
      }
    }
  }
  std::fill(colsum_.begin(), colsum_.end(), 0.0);
  // Shifted block second moment in float32 (upper triangle) with single-threaded OpenBLAS calls inside an
  // OpenMP team (see bindings.cpp). Preferred split: each thread runs one ssyrk (the routine NumPy uses for
  // X.T @ X) on its share of the rows into its own buffer; the merge below adds the buffers. When P d x d
  // float buffers would not fit in ~1 GiB, the threads split the triangle into column bands of equal work
  // instead (sgemm above each band's diagonal block, ssyrk on it): no extra memory, ~10-20% slower.
  const int64_t threads = (m * d * d > (int64_t(1) << 24)) ? max_threads() : 1;
  int64_t P = std::min<int64_t>(threads, std::max<int64_t>(1, m / 256));
  P = std::min<int64_t>(P, std::max<int64_t>(1, (int64_t(1) << 30) / (4 * d * d)));
  const bool bands = (P == 1 && threads > 1);
  const int64_t npart = bands ? 1 : P;
  C_.reserve(static_cast<size_t>(npart * d * d));
  float* Cb = C_.data();
  const blasint ld = static_cast<blasint>(d);
  if (!bands) {
#pragma omp parallel for schedule(static, 1) num_threads(static_cast<int>(P)) if (P > 1)
    for (int64_t p = 0; p < P; ++p) {
      const int64_t a = m * p / P, b = m * (p + 1) / P;
      scipy_cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, ld, static_cast<blasint>(b - a), 1.0f,
                        Y + a * d, ld, 0.0f, Cb + p * d * d, ld);
    }
  } else {
    const int64_t B = std::min<int64_t>(d, 4 * threads);
    std::vector<int64_t> edge(B + 1);
    for (int64_t e = 0; e <= B; ++e)
      edge[e] = static_cast<int64_t>(std::llround(static_cast<double>(d) * std::sqrt(double(e) / double(B))));
    const blasint mm = static_cast<blasint>(m);
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t e = B - 1; e >= 0; --e) {
      const int64_t ja = edge[e], w = edge[e + 1] - edge[e];
      if (w <= 0) continue;
      if (ja > 0)
        scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<blasint>(ja),
                          static_cast<blasint>(w), mm, 1.0f, Y, ld, Y + ja, ld, 0.0f, Cb + ja, ld);
      scipy_cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<blasint>(w), mm, 1.0f, Y + ja,
                        ld, 0.0f, Cb + ja * d + ja, ld);
    }
  }
  // Block mean = c + ybar; block scatter = C - m ybar ybar^T.
  std::vector<double> ybar(d), bm(d);
  for (int64_t j = 0; j < d; ++j) {
    ybar[j] = ysum[j] / static_cast<double>(m);
    bm[j] = static_cast<double>(c[j]) + ybar[j];
  }
  const double* yb = ybar.data();
  const double md = static_cast<double>(m);
  const float* C0 = Cb;
  const int64_t dd = d * d;
  if (npart == 1) {
    chan_merge(m, bm.data(), [C0, yb, md, d](int64_t i, int64_t j) {
      return static_cast<double>(C0[i * d + j]) - md * yb[i] * yb[j];
    });
  } else {
    chan_merge(m, bm.data(), [C0, yb, md, d, dd, npart](int64_t i, int64_t j) {
      double v = -md * yb[i] * yb[j];
      for (int64_t p = 0; p < npart; ++p) v += static_cast<double>(C0[p * dd + i * d + j]);
      return v;
    });
  }
  nbuf_ = 0;
  refresh_reference();
}

void GramState::refresh_reference() {
  if (n_ == 0) return;
  for (int64_t j = 0; j < d_; ++j) c_[j] = static_cast<float>(mean_[j]);
  have_c_ = true;
}

template <class F>
void GramState::chan_merge(int64_t m, const double* bm, F get) {
  const int64_t d = d_;
  double* S = S_.data();
  const bool par = d >= 256;
  if (n_ == 0) {
#pragma omp parallel for schedule(dynamic, 16) if (par)
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = i; j < d; ++j) S[i * d + j] = get(i, j);
    std::copy(bm, bm + d, mean_.begin());
    n_ = m;
    return;
  }
  const double N = static_cast<double>(n_) + static_cast<double>(m);
  const double f = static_cast<double>(n_) * static_cast<double>(m) / N;
  std::vector<double> delta(d);
  for (int64_t j = 0; j < d; ++j) delta[j] = bm[j] - mean_[j];
  const double* dl = delta.data();
#pragma omp parallel for schedule(dynamic, 16) if (par)
  for (int64_t i = 0; i < d; ++i) {
    const double fdi = f * dl[i];
    double* Si = S + i * d;
    for (int64_t j = i; j < d; ++j) Si[j] += get(i, j) + fdi * dl[j];
  }
  const double w = static_cast<double>(m) / N;
  for (int64_t j = 0; j < d; ++j) mean_[j] += dl[j] * w;
  n_ += m;
}

const std::vector<double>& GramState::mean() {
  flush();
  return mean_;
}

void GramState::scatter_block(int64_t r0, int64_t r1, int64_t c0, int64_t c1, double* out) {
  if (r0 < 0 || c0 < 0 || r1 > d_ || c1 > d_ || r1 < r0 || c1 < c0)
    throw std::out_of_range("scatter block outside the accumulator");
  flush();
  const int64_t d = d_, w = c1 - c0;
  const double* S = S_.data();
  for (int64_t i = r0; i < r1; ++i) {
    double* o = out + (i - r0) * w;
    for (int64_t j = c0; j < c1; ++j) o[j - c0] = (j >= i) ? S[i * d + j] : S[j * d + i];
  }
}

void GramState::packed_upper(double* out) {
  flush();
  const int64_t d = d_;
  for (int64_t i = 0; i < d; ++i) {
    std::memcpy(out, S_.data() + i * d + i, sizeof(double) * (d - i));
    out += d - i;
  }
}

void GramState::set_state(int64_t n, int64_t skipped, const double* mean, const double* packed) {
  const int64_t d = d_;
  n_ = n;
  skipped_ = skipped;
  nbuf_ = 0;
  std::fill(colsum_.begin(), colsum_.end(), 0.0);
  std::copy(mean, mean + d, mean_.begin());
  for (int64_t i = 0; i < d; ++i) {
    std::memcpy(S_.data() + i * d + i, packed, sizeof(double) * (d - i));
    packed += d - i;
  }
  have_c_ = false;
  refresh_reference();
}

void GramState::merge(GramState& other) {
  if (other.d_ != d_) throw std::invalid_argument("cannot merge Gram states of different widths");
  flush();
  other.flush();
  if (other.n_ > 0) {
    const double* So = other.S_.data();
    const int64_t d = d_;
    chan_merge(other.n_, other.mean_.data(), [So, d](int64_t i, int64_t j) { return So[i * d + j]; });
  }
  skipped_ += other.skipped_;
  refresh_reference();
}

}  // namespace affeq
