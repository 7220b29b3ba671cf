// One decoder layer of a decode step in one call, for the int4 format (inference/fast_llama.py's Q4DecoderLayer calls
// it; inference/integer_kernels.py builds it with the other kernels).
//
// Why: at batch 1 the ~25 small torch ops around the matrix products in every layer (norms, rotary, cache writes,
// residual adds), each a trip through TorchScript's interpreter and torch's dispatcher, took about a sixth of the int4
// step (docs/benchmarks.md: 6.5 against 5.5 ms). Here those are plain loops over each row, and the layer is one
// call.
//
// A row's numbers never depend on its batch: every loop below works on one row at a time in a fixed order, and the
// products and attention are the kernels that already keep that promise.
//
// The steps are those of fast_llama.DecoderLayer.forward: RMS norm, the fused q/k/v projection, rotary embeddings,
// this step's keys and values into the cache, attention, the output projection and residual; then RMS norm, the
// fused gate/up projection, SiLU(gate) * up, the down projection and residual. AVX2 and FMA.
#include <ATen/ATen.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels.h"

namespace {

// The sum of squares of a row, in eight running sums (one per lane) added in a fixed order at the end.
float sum_of_squares(const float* x, int64_t width) {
  __m256 sums = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= width; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    sums = _mm256_fmadd_ps(v, v, sums);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sums);
  float total = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; i < width; ++i) total += x[i] * x[i];
  return total;
}

// Each row scaled to unit root-mean-square, times the norm's weights (transformers' LlamaRMSNorm).
at::Tensor rms_norm(const at::Tensor& hidden, const at::Tensor& weight, double eps) {
  const int64_t rows = hidden.size(0), width = hidden.size(1);
  at::Tensor out = at::empty_like(hidden);
  const float* x = hidden.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* y = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * width;
    const float inverse = 1.0f / std::sqrt(sum_of_squares(row, width) / width + static_cast<float>(eps));
    for (int64_t i = 0; i < width; ++i) y[r * width + i] = w[i] * (row[i] * inverse);
  }
  return out;
}

// One head rotated by its row's rotary factors: out = x * cos + rotate_half(x) * sin.
inline void rotate(const float* x, const float* cos, const float* sin, int64_t dim, float* out) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    out[i] = x[i] * cos[i] - x[i + half] * sin[i];
    out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
  }
}

template <typename T>
inline void store(const float* from, int64_t count, T* to) {
  for (int64_t i = 0; i < count; ++i) to[i] = static_cast<T>(from[i]);
}

// Rotates queries and keys; the queries go to `query` [rows, heads * dim], this step's keys and values to column
// `end` of the cache's buffers [capacity rows, kv_heads, capacity columns, dim].
template <typename T>
void place(const at::Tensor& qkv, const at::Tensor& rotary, int64_t heads, int64_t kv_heads, int64_t dim,
           const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values, int64_t end) {
  const int64_t rows = qkv.size(0), width = qkv.size(1), capacity = keys.size(2);
  const float* projected = qkv.data_ptr<float>();
  const float* factors = rotary.data_ptr<float>();
  float* query_data = query.data_ptr<float>();
  T* key_data = keys.data_ptr<T>();
  T* value_data = values.data_ptr<T>();
  std::vector<float> key(dim);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = projected + r * width;
    const float* cos = factors + r * 2 * dim;
    const float* sin = cos + dim;
    for (int64_t h = 0; h < heads; ++h) rotate(row + h * dim, cos, sin, dim, query_data + (r * heads + h) * dim);
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t column = ((r * kv_heads + h) * capacity + end) * dim;
      rotate(row + (heads + h) * dim, cos, sin, dim, key.data());
      store(key.data(), dim, key_data + column);
      store(row + (heads + kv_heads + h) * dim, dim, value_data + column);
    }
  }
}

// hidden [rows, width] float32; rotary [rows, 2, dim]: each row's cos and sin at its position; weights: the packed
// weights, scales and low ends (quantization.Q4Linear) of the q/k/v, output, gate/up and down projections, in that
// order; keys, values: this layer's cache buffers (float16 or float32); starts [rows]: each row's first real column;
// end: the column this step writes. Returns the layer's output [rows, width].
at::Tensor q4_decode_layer(const at::Tensor& hidden, const at::Tensor& rotary, const at::Tensor& attention_norm,
                           const at::Tensor& mlp_norm, double eps, at::TensorList weights, int64_t heads,
                           int64_t kv_heads, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& starts,
                           int64_t end) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.scalar_type() == at::kFloat && hidden.is_contiguous(),
              "hidden must be contiguous float32 [rows, width]");
  TORCH_CHECK(weights.size() == 12, "weights must be the 3 tensors of each of the 4 projections");
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "heads must be a multiple of kv_heads");
  const int64_t rows = hidden.size(0), dim = keys.size(3);
  TORCH_CHECK(rotary.dim() == 3 && rotary.size(0) == rows && rotary.size(1) == 2 && rotary.size(2) == dim &&
                  rotary.scalar_type() == at::kFloat && rotary.is_contiguous(),
              "rotary must be contiguous float32 [rows, 2, head dim]");
  // checked before this step's keys and values are written into them
  TORCH_CHECK(keys.dim() == 4 && keys.size(0) >= rows && keys.size(1) == kv_heads && end >= 0 && end < keys.size(2),
              "the cache's buffers do not hold these rows, heads or column");
  TORCH_CHECK(values.sizes() == keys.sizes() && values.scalar_type() == keys.scalar_type() && keys.is_contiguous() &&
                  values.is_contiguous(),
              "keys and values must be contiguous buffers of one shape and dtype");
  TORCH_CHECK(keys.scalar_type() == at::kHalf || keys.scalar_type() == at::kFloat, "keys must be float16 or float32");
  TORCH_CHECK(attention_norm.is_contiguous() && mlp_norm.is_contiguous() &&
                  attention_norm.numel() == hidden.size(1) && mlp_norm.numel() == hidden.size(1),
              "the norms' weights must be contiguous [width]");
  // 1. project; rotate queries and keys; this step's keys and values go straight into the cache
  const at::Tensor qkv = llm_serving::q4_1_linear(rms_norm(hidden, attention_norm, eps), weights[0], weights[1],
                                                  weights[2]);
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * dim, "the q/k/v projection does not match the heads");
  at::Tensor query = at::empty({rows, kv_heads, heads / kv_heads, dim}, hidden.options());
  if (keys.scalar_type() == at::kHalf) {
    place<c10::Half>(qkv, rotary, heads, kv_heads, dim, query, keys, values, end);
  } else {
    place<float>(qkv, rotary, heads, kv_heads, dim, query, keys, values, end);
  }
  // 2. attention over each row's own columns, the new one included; the output projection and residual
  const at::Tensor attended = llm_serving::decode_attention(query, keys, values, starts, end + 1);
  const at::Tensor mixed = llm_serving::q4_1_linear(attended, weights[3], weights[4], weights[5]).add_(hidden);
  // 3. the feed-forward block: SiLU(gate) * up, the down projection and residual
  const at::Tensor gate_up = llm_serving::q4_1_linear(rms_norm(mixed, mlp_norm, eps), weights[6], weights[7],
                                                      weights[8]);
  const int64_t inner = gate_up.size(1) / 2;
  const at::Tensor activated = at::silu(gate_up.narrow(1, 0, inner)).mul_(gate_up.narrow(1, inner, inner));
  return llm_serving::q4_1_linear(activated, weights[9], weights[10], weights[11]).add_(mixed);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm_serving, m) {
  m.def(
      "q4_decode_layer(Tensor hidden, Tensor rotary, Tensor attention_norm, Tensor mlp_norm, float eps, "
      "Tensor[] weights, int heads, int kv_heads, Tensor(a!) keys, Tensor(b!) values, Tensor starts, int end) -> "
      "Tensor");
}
TORCH_LIBRARY_IMPL(llm_serving, CPU, m) { m.impl("q4_decode_layer", &q4_decode_layer); }
