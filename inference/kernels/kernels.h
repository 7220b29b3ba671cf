// What one kernel file calls in another (all are built into one library by inference/integer_kernels.py).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace llm_serving {

// The integer kernels' layout (integer_linear.cpp): outputs per vector (one AVX2 register), inputs per group (one
// scale each), outputs per tile (the unit a matrix's work splits into).
constexpr int64_t kVectorOutputs = 8;
constexpr int64_t kGroupInputs = 32;
constexpr int64_t kTileOutputs = 32;

// Rows [rows, k] rounded to int16 with one scale per row; each group's sum of the rounded values (as float).
struct RoundedRows {
  RoundedRows(int64_t rows, int64_t k) : values(rows * k), group_sums(rows * (k / kGroupInputs)), scales(rows) {}
  std::vector<int16_t> values;
  std::vector<float> group_sums;
  std::vector<float> scales;
};

// A weight matrix's data (Q4_1 or Q8_0), checked (q4_1_matrix); `inputs` a multiple of kGroupInputs.
struct Matrix {
  const uint8_t* packed;
  const uint16_t* scales;  // float16 bits
  const uint16_t* lows;
  int64_t inputs;
  int64_t vectors;
  int64_t outputs() const { return vectors * kVectorOutputs; }
  int64_t tiles() const { return (outputs() + kTileOutputs - 1) / kTileOutputs; }
};

Matrix q4_1_matrix(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& lows);

// Row r of x [rows, k] rounded into `out` (RoundedRows(rows, k)), on the calling thread.
void round_row_into(const float* x, int64_t r, int64_t k, RoundedRows& out);

// Tiles [begin, end) of y = x W^T into y [rows, matrix.outputs()], on the calling thread: the pieces the q4_1_linear
// op splits across threads, for a caller that splits the work itself.
void q4_1_tiles(const Matrix& matrix, const RoundedRows& rounded, int64_t rows, int64_t begin, int64_t end, float* y);

// Tasks [begin, stop) of decode_attention (decode_attention.cpp) (a task: one row's one key/value head; query [rows, kv_heads, groups, dim],
// contiguous, checked by the caller) into out, on the calling thread.
void attention_tasks(const float* query, const at::Tensor& keys, const at::Tensor& values, const int64_t* starts,
                     int64_t groups, int64_t end, int64_t begin, int64_t stop, float* out);

}  // namespace llm_serving
