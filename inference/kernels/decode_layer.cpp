// One decoder layer of a decode step in one call, for the int4 format (inference/fast_llama.py's Q4DecoderLayer calls
// it; inference/integer_kernels.py builds it with the other kernels).
//
// Why: at batch 1 the ~25 small torch ops around the matrix products in every layer (norms, rotary, cache writes,
// residual adds), each a trip through TorchScript's interpreter and torch's dispatcher, took about a sixth of the int4
// step (docs/benchmarks.md: 6.5 against 5.5 ms). Here those are plain loops over each row, and the layer is one
// call. The whole layer is also one parallel region: each thread takes its share of every step (rows for the per-row
// steps, tiles of each projection, row/head pairs of attention), with a barrier where a step needs the others'
// results, instead of a region, allocations and a dispatch for each of the four projections and attention. In one
// process, alternating with the layer of separate calls (docs/benchmarks.md): 1.06-1.14x at batch 1, 1.12x at 4
// rows, 1.04-1.10x at 16.
//
// A row's numbers never depend on its batch or on how the threads split the work: every loop below works on one row
// (or one tile of outputs for every row) at a time in a fixed order, and the products and attention are the kernels
// that already keep that promise.
//
// The steps are those of fast_llama.DecoderLayer.forward: RMS norm, the fused q/k/v projection, rotary embeddings,
// this step's keys and values into the cache, attention, the output projection and residual; then RMS norm, the
// fused gate/up projection, SiLU(gate) * up, the down projection and residual. AVX2 and FMA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
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

// Row r scaled to unit root-mean-square, times the norm's weights (transformers' LlamaRMSNorm).
void rms_norm_row(const float* x, int64_t r, int64_t width, const float* weight, float eps, float* y) {
  const float* row = x + r * width;
  const float inverse = 1.0f / std::sqrt(sum_of_squares(row, width) / width + eps);
  for (int64_t i = 0; i < width; ++i) y[r * width + i] = weight[i] * (row[i] * inverse);
}

// e^x for 8 floats (Cephes' expf, as in avx_mathfun: within 2 ulp); x clamped to where e^x is a finite float.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  // x = n ln 2 + f, |f| <= ln 2 / 2, ln 2 in two parts so that f is exact
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
  // e^f by its polynomial, then times 2^n built in the exponent bits
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(f, f), _mm256_add_ps(f, _mm256_set1_ps(1.0f)));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

// out[i] = SiLU(gate[i]) * up[i] = gate[i] / (1 + e^-gate[i]) * up[i], for i in [begin, end) (multiples of 8).
void silu_times(const float* gate, const float* up, int64_t begin, int64_t end, float* out) {
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  for (int64_t i = begin; i < end; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = exp8(_mm256_xor_ps(g, sign));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
  }
}

// One head rotated by its row's rotary factors: out = x * cos + rotate_half(x) * sin.
inline void rotate(const float* x, const float* cos, const float* sin, int64_t dim, float* out) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    out[i] = x[i] * cos[i] - x[i + half] * sin[i];
    out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
  }
}

// y[r, c] += x[r, c] for columns [begin, end) of every row: the residual.
void add_columns(const float* x, int64_t rows, int64_t width, int64_t begin, int64_t end, float* y) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = begin; c < end; ++c) y[r * width + c] += x[r * width + c];
}

template <typename T>
inline void store(const float* from, int64_t count, T* to) {
  for (int64_t i = 0; i < count; ++i) to[i] = static_cast<T>(from[i]);
}

// Row r's queries and keys rotated; its queries go to `query` [rows, heads * dim], its keys and values to column
// `end` of the cache's buffers [capacity rows, kv_heads, capacity columns, dim]; `key`: room for one head.
template <typename T>
void place_row(const float* qkv, int64_t r, int64_t width, const float* rotary, int64_t heads, int64_t kv_heads,
               int64_t dim, float* query, T* keys, T* values, int64_t capacity, int64_t end, float* key) {
  const float* row = qkv + r * width;
  const float* cos = rotary + r * 2 * dim;
  const float* sin = cos + dim;
  for (int64_t h = 0; h < heads; ++h) rotate(row + h * dim, cos, sin, dim, query + (r * heads + h) * dim);
  for (int64_t h = 0; h < kv_heads; ++h) {
    const int64_t column = ((r * kv_heads + h) * capacity + end) * dim;
    rotate(row + (heads + h) * dim, cos, sin, dim, key);
    store(key, dim, keys + column);
    store(row + (heads + kv_heads + h) * dim, dim, values + column);
  }
}

// [begin, end) of `total` for thread `index` of `team`: contiguous, in thread order, sizes within one of each other.
inline std::pair<int64_t, int64_t> share(int64_t total, int index, int team) {
  return {total * index / team, total * (index + 1) / team};
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
  TORCH_CHECK(dim % 8 == 0, "the head size must be a multiple of 8");
  const int64_t width = hidden.size(1);
  const llm_serving::Matrix qkv_weights = llm_serving::q4_1_matrix(weights[0], weights[1], weights[2]);
  const llm_serving::Matrix out_weights = llm_serving::q4_1_matrix(weights[3], weights[4], weights[5]);
  const llm_serving::Matrix gate_up_weights = llm_serving::q4_1_matrix(weights[6], weights[7], weights[8]);
  const llm_serving::Matrix down_weights = llm_serving::q4_1_matrix(weights[9], weights[10], weights[11]);
  const int64_t inner = down_weights.inputs;
  TORCH_CHECK(qkv_weights.inputs == width && qkv_weights.outputs() == (heads + 2 * kv_heads) * dim,
              "the q/k/v projection does not match the width and heads");
  TORCH_CHECK(out_weights.inputs == heads * dim && out_weights.outputs() == width,
              "the output projection does not match the heads and width");
  TORCH_CHECK(gate_up_weights.inputs == width && gate_up_weights.outputs() == 2 * inner &&
                  down_weights.outputs() == width && inner % llm_serving::kTileOutputs == 0,
              "the feed-forward projections do not match the width");
  const at::Tensor starts_c = starts.contiguous();
  TORCH_CHECK(starts_c.scalar_type() == at::kLong && starts_c.numel() == rows, "starts must be int64 [rows]");
  const int64_t* start_data = starts_c.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(start_data[r] >= 0 && start_data[r] <= end, "a row's start must not be after end");
  }

  const auto floats = hidden.options();
  const at::Tensor normed = at::empty({rows, width}, floats), qkv = at::empty({rows, qkv_weights.outputs()}, floats);
  const at::Tensor query = at::empty({rows, heads * dim}, floats), attended = at::empty({rows, heads * dim}, floats);
  const at::Tensor mixed = at::empty({rows, width}, floats), gate_up = at::empty({rows, 2 * inner}, floats);
  const at::Tensor activated = at::empty({rows, inner}, floats), output = at::empty({rows, width}, floats);
  const float* x = hidden.data_ptr<float>();
  float *normed_data = normed.data_ptr<float>(), *qkv_data = qkv.data_ptr<float>();
  float *query_data = query.data_ptr<float>(), *attended_data = attended.data_ptr<float>();
  float *mixed_data = mixed.data_ptr<float>(), *gate_up_data = gate_up.data_ptr<float>();
  float *activated_data = activated.data_ptr<float>(), *output_data = output.data_ptr<float>();
  const float* rotary_data = rotary.data_ptr<float>();
  const float *attention_weight = attention_norm.data_ptr<float>(), *mlp_weight = mlp_norm.data_ptr<float>();
  const float epsilon = static_cast<float>(eps);
  const int64_t capacity = keys.size(2), qkv_width = qkv_weights.outputs(), half_tiles = gate_up_weights.tiles() / 2;
  // the cache's data, taken before the threads start (nothing in the parallel region may throw)
  const bool half_cache = keys.scalar_type() == at::kHalf;
  c10::Half* half_keys = half_cache ? keys.data_ptr<c10::Half>() : nullptr;
  c10::Half* half_values = half_cache ? values.data_ptr<c10::Half>() : nullptr;
  float* float_keys = half_cache ? nullptr : keys.data_ptr<float>();
  float* float_values = half_cache ? nullptr : values.data_ptr<float>();
  llm_serving::RoundedRows rounded(rows, width), rounded_attended(rows, heads * dim), rounded_mixed(rows, width),
      rounded_activated(rows, inner);

  // one parallel region for the whole layer (see the top of this file); a barrier wherever a step reads what other
  // threads wrote
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int index = omp_get_thread_num(), team = omp_get_num_threads();
    const auto [first_row, last_row] = share(rows, index, team);
    // 1. norm and round each row; project; rotate queries and keys; this step's keys and values into the cache
    for (int64_t r = first_row; r < last_row; ++r) {
      rms_norm_row(x, r, width, attention_weight, epsilon, normed_data);
      llm_serving::round_row_into(normed_data, r, width, rounded);
    }
#pragma omp barrier
    const auto [qkv_begin, qkv_end] = share(qkv_weights.tiles(), index, team);
    llm_serving::q4_1_tiles(qkv_weights, rounded, rows, qkv_begin, qkv_end, qkv_data);
#pragma omp barrier
    std::vector<float> key(dim);
    for (int64_t r = first_row; r < last_row; ++r) {
      if (half_keys != nullptr) {
        place_row(qkv_data, r, qkv_width, rotary_data, heads, kv_heads, dim, query_data, half_keys, half_values,
                  capacity, end, key.data());
      } else {
        place_row(qkv_data, r, qkv_width, rotary_data, heads, kv_heads, dim, query_data, float_keys, float_values,
                  capacity, end, key.data());
      }
    }
#pragma omp barrier
    // 2. attention over each row's own columns, the new one included; the output projection and residual
    const auto [task_begin, task_end] = share(rows * kv_heads, index, team);
    llm_serving::attention_tasks(query_data, keys, values, start_data, heads / kv_heads, end + 1, task_begin, task_end,
                                 attended_data);
#pragma omp barrier
    for (int64_t r = first_row; r < last_row; ++r)
      llm_serving::round_row_into(attended_data, r, heads * dim, rounded_attended);
#pragma omp barrier
    const auto [out_begin, out_end] = share(out_weights.tiles(), index, team);
    llm_serving::q4_1_tiles(out_weights, rounded_attended, rows, out_begin, out_end, mixed_data);
    add_columns(x, rows, width, out_begin * llm_serving::kTileOutputs,
                std::min(out_end * llm_serving::kTileOutputs, width), mixed_data);
#pragma omp barrier
    // 3. the feed-forward block: SiLU(gate) * up (each thread the gate and up columns of its tiles), the down
    // projection and residual
    for (int64_t r = first_row; r < last_row; ++r) {
      rms_norm_row(mixed_data, r, width, mlp_weight, epsilon, normed_data);
      llm_serving::round_row_into(normed_data, r, width, rounded_mixed);
    }
#pragma omp barrier
    const auto [gate_begin, gate_end] = share(half_tiles, index, team);
    llm_serving::q4_1_tiles(gate_up_weights, rounded_mixed, rows, gate_begin, gate_end, gate_up_data);
    llm_serving::q4_1_tiles(gate_up_weights, rounded_mixed, rows, half_tiles + gate_begin, half_tiles + gate_end,
                            gate_up_data);
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = gate_up_data + r * 2 * inner;
      silu_times(row, row + inner, gate_begin * llm_serving::kTileOutputs, gate_end * llm_serving::kTileOutputs,
                 activated_data + r * inner);
    }
#pragma omp barrier
    for (int64_t r = first_row; r < last_row; ++r)
      llm_serving::round_row_into(activated_data, r, inner, rounded_activated);
#pragma omp barrier
    const auto [down_begin, down_end] = share(down_weights.tiles(), index, team);
    llm_serving::q4_1_tiles(down_weights, rounded_activated, rows, down_begin, down_end, output_data);
    add_columns(mixed_data, rows, width, down_begin * llm_serving::kTileOutputs,
                std::min(down_end * llm_serving::kTileOutputs, width), output_data);
  }
  return output;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm_serving, m) {
  m.def(
      "q4_decode_layer(Tensor hidden, Tensor rotary, Tensor attention_norm, Tensor mlp_norm, float eps, "
      "Tensor[] weights, int heads, int kv_heads, Tensor(a!) keys, Tensor(b!) values, Tensor starts, int end) -> "
      "Tensor");
}
TORCH_LIBRARY_IMPL(llm_serving, CPU, m) { m.impl("q4_decode_layer", &q4_decode_layer); }
