// Streaming Gram accumulator (CPU): count, float64 mean and float64 centred scatter, merged per block (Chan).
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace affeq {

// Rows are buffered into a float32 block; each full block is shifted by its own mean rounded to float32
// (the subtraction is then nearly exact), reduced with OpenBLAS ssyrk, and merged into the float64 state
// with Chan's parallel update. Rows holding NaN or Inf are dropped and counted.
class GramState {
 public:
  explicit GramState(int64_t dim, int64_t block_rows = 0);

  int64_t dim() const { return d_; }
  int64_t block_rows() const { return m_; }
  int64_t n() const { return n_ + nbuf_; }
  int64_t skipped() const { return skipped_; }

  // Add `rows` rows of width dim (float32 or float16 bits, C order). Returns the rows skipped in this call.
  int64_t update(const void* data, int64_t rows, DType dt);
  // Reduce the buffered rows into the float64 state.
  void flush();
  // Mean (after flush); length dim.
  const std::vector<double>& mean();
  // Copy of the centred-scatter block [r0,r1) x [c0,c1) into out (row-major, (r1-r0) x (c1-c0)).
  void scatter_block(int64_t r0, int64_t r1, int64_t c0, int64_t c1, double* out);
  // Upper triangle of the scatter, packed row by row: dim*(dim+1)/2 values.
  void packed_upper(double* out);
  // Replace the state (count, skipped, mean, packed upper scatter); the buffer is emptied.
  void set_state(int64_t n, int64_t skipped, const double* mean, const double* packed);
  // Add another state of the same width (both are flushed first).
  void merge(GramState& other);

 private:
  // Chan merge of a block with count m, mean bm and scatter given by `get(i, j)` (upper triangle).
  template <class F>
  void chan_merge(int64_t m, const double* bm, F get);

  // Sets the shift reference c_ to the running mean rounded to float32 (buffer must be empty).
  void refresh_reference();

  int64_t d_;
  int64_t m_;
  int64_t n_ = 0;      // rows reduced into mean_/S_
  int64_t nbuf_ = 0;   // rows waiting in buf_
  int64_t skipped_ = 0;
  std::vector<double> mean_;
  BigArray<double> S_;  // d x d, row-major, upper triangle (j >= i) valid
  BigArray<float> buf_;
  std::vector<double> colsum_;  // float64 column sums of the buffered rows (after the shift if shifted_)
  std::vector<float> c_;        // float32 shift reference: the running mean once one exists
  bool have_c_ = false;         // c_ is valid
  bool shifted_ = false;        // the buffered rows were stored as x - c_
  BigArray<float> C_;   // ssyrk output(s), d x d upper, one per row share
};

}  // namespace affeq
