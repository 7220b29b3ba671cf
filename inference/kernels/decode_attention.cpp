// Attention for one decode step of a batch whose rows have different lengths (inference/fast_llama.py calls it;
// inference/integer_kernels.py builds it with the integer kernels).
//
// Each row's one new query attends over its own keys only, columns [start of that row, end) of the cache's buffers:
// no padding enters its sums, so a row's numbers are the same alone and in any batch (the sums run in one fixed
// order per row, whatever the other rows). torch's matrix products would need one call per run of rows of one
// length (a dozen small calls per layer at 16 ragged rows, mostly dispatch); this is one call per layer, and it reads
// keys and values stored in float16 as well as float32 (float16 halves the cache's memory).
//
// Per row and key/value head: scores of each query head of the group against every key (float32 FMA), the softmax
// (max subtracted, exp, sum), then the values weighted by the scores and divided by their sum. AVX2 and F16C.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "kernels.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;  // head dimensions per pass: four AVX2 registers of floats
constexpr int64_t kLanes = 8;   // one register; head sizes must be a multiple of it

inline __m256 load8(const float* values) { return _mm256_loadu_ps(values); }

inline __m256 load8(const at::Half* values) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(values)));
}

inline float horizontal_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

// q . k over `dim` floats, in four independent sums (one per 8 of every 32 dimensions) added at the end.
template <typename T>
inline float dot(const float* q, const T* k, int64_t dim) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t d = 0;
  for (; d + kBlock <= dim; d += kBlock) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), load8(k + d + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 16), load8(k + d + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 24), load8(k + d + 24), a3);
  }
  for (; d < dim; d += kLanes) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), a0);
  return horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

// out[0:8] = sum over j of p[j] * values[j * dim : j * dim + 8], scaled by `inverse`.
template <typename T>
inline void weighted_sum8(const float* p, const T* values, int64_t columns, int64_t dim, __m256 inverse, float* out) {
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < columns; ++j) sum = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), load8(values + j * dim), sum);
  _mm256_storeu_ps(out, _mm256_mul_ps(sum, inverse));
}

// One row's query heads of one key/value head: query [groups, dim] over keys and values [columns, dim].
template <typename T>
void attend(const float* query, const T* keys, const T* values, int64_t columns, int64_t groups, int64_t dim,
            float* scores, float* out) {
  for (int64_t g = 0; g < groups; ++g) {
    const float* q = query + g * dim;
    // 1. scores, and their largest (subtracted before exp, as softmax does, so exp never overflows)
    float largest = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < columns; ++j) {
      scores[j] = dot(q, keys + j * dim, dim);
      largest = std::max(largest, scores[j]);
    }
    // 2. unnormalized probabilities and their sum
    float total = 0.0f;
    for (int64_t j = 0; j < columns; ++j) {
      scores[j] = std::exp(scores[j] - largest);
      total += scores[j];
    }
    // 3. the values weighted by them, 32 dimensions at a time (then 8), divided by the sum once at the end
    const __m256 inverse = _mm256_set1_ps(1.0f / total);
    int64_t d = 0;
    for (; d + kBlock <= dim; d += kBlock) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t j = 0; j < columns; ++j) {
        const __m256 p = _mm256_set1_ps(scores[j]);
        const T* v = values + j * dim + d;
        a0 = _mm256_fmadd_ps(p, load8(v), a0);
        a1 = _mm256_fmadd_ps(p, load8(v + 8), a1);
        a2 = _mm256_fmadd_ps(p, load8(v + 16), a2);
        a3 = _mm256_fmadd_ps(p, load8(v + 24), a3);
      }
      float* o = out + g * dim + d;
      _mm256_storeu_ps(o, _mm256_mul_ps(a0, inverse));
      _mm256_storeu_ps(o + 8, _mm256_mul_ps(a1, inverse));
      _mm256_storeu_ps(o + 16, _mm256_mul_ps(a2, inverse));
      _mm256_storeu_ps(o + 24, _mm256_mul_ps(a3, inverse));
    }
    for (; d < dim; d += kLanes) weighted_sum8(scores, values + d, columns, dim, inverse, out + g * dim + d);
  }
}

// Tasks [begin, stop) (task: one row's one key/value head) of query [rows, kv_heads, groups, dim] into out.
template <typename T>
void attend_tasks(const float* query, const at::Tensor& keys, const at::Tensor& values, const int64_t* starts,
                  int64_t groups, int64_t end, int64_t begin, int64_t stop, float* out) {
  const int64_t kv_heads = keys.size(1), capacity = keys.size(2), dim = keys.size(3);
  const T* key_data = keys.data_ptr<T>();
  const T* value_data = values.data_ptr<T>();
  std::vector<float> scores;
  for (int64_t task = begin; task < stop; ++task) {
    const int64_t row = task / kv_heads, head = task % kv_heads, first = starts[row];
    scores.resize(end - first);
    const int64_t offset = ((row * kv_heads + head) * capacity + first) * dim;
    const int64_t at = (row * kv_heads + head) * groups * dim;
    attend(query + at, key_data + offset, value_data + offset, end - first, groups, dim, scores.data(), out + at);
  }
}

}  // namespace

namespace llm_serving {

void attention_tasks(const float* query, const at::Tensor& keys, const at::Tensor& values, const int64_t* starts,
                     int64_t groups, int64_t end, int64_t begin, int64_t stop, float* out) {
  if (keys.scalar_type() == at::kHalf) {
    attend_tasks<at::Half>(query, keys, values, starts, groups, end, begin, stop, out);
  } else {
    attend_tasks<float>(query, keys, values, starts, groups, end, begin, stop, out);
  }
}

}  // namespace llm_serving

namespace {

// query [rows, kv_heads, groups, dim] float32; keys and values: the cache's buffers [capacity rows, kv_heads,
// capacity columns, dim], float32 or float16; starts [rows] int64: each row's first real column; end: one past the
// newest column. Returns [rows, kv_heads * groups * dim] float32, heads in the query's order.
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& starts, int64_t end) {
  TORCH_CHECK(query.dim() == 4 && query.scalar_type() == at::kFloat, "query must be float32 [rows, kv heads, groups, dim]");
  TORCH_CHECK(keys.dim() == 4 && keys.sizes() == values.sizes() && keys.scalar_type() == values.scalar_type(),
              "keys and values must be buffers of one shape and dtype");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "keys and values must be contiguous buffers");
  TORCH_CHECK(keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kHalf, "keys must be float32 or float16");
  const int64_t rows = query.size(0), dim = query.size(3);
  TORCH_CHECK(keys.size(0) >= rows && keys.size(1) == query.size(1) && keys.size(3) == dim,
              "the buffers do not match the query's rows, heads or head size");
  TORCH_CHECK(dim % kLanes == 0, "the head size must be a multiple of ", kLanes);
  TORCH_CHECK(end >= 1 && end <= keys.size(2), "end is outside the buffers");
  TORCH_CHECK(starts.dim() == 1 && starts.size(0) == rows && starts.scalar_type() == at::kLong,
              "starts must be int64 [rows]");
  const at::Tensor query_c = query.contiguous(), starts_c = starts.contiguous();
  const int64_t* start_data = starts_c.data_ptr<int64_t>();
  for (int64_t row = 0; row < rows; ++row) {
    TORCH_CHECK(start_data[row] >= 0 && start_data[row] < end, "a row's start must be before end");
  }
  at::Tensor out = at::empty({rows, query.size(1) * query.size(2) * dim}, query.options());
  const float* query_data = query_c.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const int64_t groups = query.size(2);
  at::parallel_for(0, rows * query.size(1), 1, [&](int64_t begin, int64_t stop) {
    llm_serving::attention_tasks(query_data, keys, values, start_data, groups, end, begin, stop, out_data);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm_serving, m) {
  m.def("decode_attention(Tensor query, Tensor keys, Tensor values, Tensor starts, int end) -> Tensor");
}
TORCH_LIBRARY_IMPL(llm_serving, CPU, m) { m.impl("decode_attention", &decode_attention); }
