// y = x W^T for the int4 weight format (inference/int4_kernel.py builds and loads this at start-up).
//
// W: 4-bit levels in groups of 32 inputs, each group with a float16 scale and low end (GGUF's Q4_1, the bundled
// SmolLM2's own format). x: float32, rounded per row to 16-bit integers (one scale per row, its largest |value| onto
// 32767), which keeps the model's greedy answers (docs/benchmarks.md). The products are integers: `vpmaddwd`
// multiplies 16 pairs of 16-bit values and adds each pair, twice as many multiply-adds per instruction as a float
// FMA, and a group's 32 products sum exactly in 32 bits (|x| <= 32767, level <= 15).
//
// Why a row's numbers never depend on its batch: a group's integer sum is exact in any order, and each output's
// float work (per group: `y = fma(scale, sum, y)`, `y = fma(low, row_sum, y)`; at the end `y *= row_scale`) runs in
// the same order whatever the row blocking, tiling or thread split. So one row alone and in a batch of 32 get the
// same bits, and the kernel may block rows however is fastest at each batch size.
//
// Layout (inference/int4_kernel.py packs it): the outputs go in vectors of 8; for each vector and each 4 inputs k..k+3
// 16 bytes, byte p holding in its low nibble the level of (output p/2, input k + p%2) and in its high nibble that of
// (output p/2, input k + 2 + p%2). Widening the 16 bytes to 16-bit lanes gives, after a mask and a shift, the two
// `vpmaddwd` operands for inputs (k, k+1) and (k+2, k+3). AVX2 only (no AVX-512, no VNNI): a free Space's CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kVector = 8;   // outputs per vector (one AVX2 register of int32 / float)
constexpr int64_t kGroup = 32;   // inputs per group
constexpr float kLevels = 32767.0f;

// Rows [rows, k] rounded to int16 with one scale per row; each group's sum of the rounded values (as float).
struct RoundedRows {
  std::vector<int16_t> values;
  std::vector<float> group_sums;
  std::vector<float> scales;
};

RoundedRows round_rows(const float* x, int64_t rows, int64_t k) {
  const int64_t groups = k / kGroup;
  RoundedRows out{std::vector<int16_t>(rows * k), std::vector<float>(rows * groups), std::vector<float>(rows)};
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * k;
    float largest = 0.0f;
    for (int64_t i = 0; i < k; ++i) largest = std::max(largest, std::fabs(row[i]));
    const float scale = largest > 0.0f ? largest / kLevels : 1.0f;
    const float inverse = 1.0f / scale;
    out.scales[r] = scale;
    for (int64_t g = 0; g < groups; ++g) {
      int32_t sum = 0;
      for (int64_t i = g * kGroup; i < (g + 1) * kGroup; ++i) {
        const int32_t level = static_cast<int32_t>(std::nearbyint(std::clamp(row[i] * inverse, -kLevels, kLevels)));
        out.values[r * k + i] = static_cast<int16_t>(level);
        sum += level;
      }
      out.group_sums[r * groups + g] = static_cast<float>(sum);
    }
  }
  return out;
}

// A group's integer sums into a row's float sums (kept in `y`), in the one order every path uses: the group's scale
// times its products, plus its low end times the row's sum of the group's inputs.
inline void add_group(__m256i exact, __m256 scale, __m256 low, float group_sum, float* out) {
  __m256 sum = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(exact), _mm256_loadu_ps(out));
  sum = _mm256_fmadd_ps(low, _mm256_set1_ps(group_sum), sum);
  _mm256_storeu_ps(out, sum);
}

inline __m256 half_vector(const uint16_t* values) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(values)));
}

// Weights of one vector for inputs (k, k+1) and (k+2, k+3): the 16 bytes widened, then the low and high nibbles.
inline void decode(const uint8_t* bytes, __m256i& near, __m256i& far) {
  const __m256i widened = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  near = _mm256_and_si256(widened, _mm256_set1_epi16(0x0F));
  far = _mm256_srli_epi16(widened, 4);
}

inline __m256i pair_at(const int16_t* x) {  // inputs x[0], x[1] in every 32-bit lane
  int32_t pair;
  std::memcpy(&pair, x, 4);
  return _mm256_set1_epi32(pair);
}

// ROWS rows x VECTORS vectors of outputs, every group, decoding the weights in registers as they stream by; the
// float sums live in `y` (in L1), so the registers hold the groups' exact integer sums.
template <int ROWS, int VECTORS>
inline void stream_block(const uint8_t* const* weights, const uint16_t* const* scales, const uint16_t* const* lows,
                         const int16_t* x, const float* group_sums, int64_t k, int64_t groups, float* y, int64_t n) {
  for (int64_t g = 0; g < groups; ++g) {
    // 1. the group's exact integer products: 8 steps of 4 inputs
    __m256i exact[ROWS][VECTORS];
    for (int r = 0; r < ROWS; ++r)
      for (int v = 0; v < VECTORS; ++v) exact[r][v] = _mm256_setzero_si256();
    for (int64_t step = 0; step < kGroup / 4; ++step) {
      const int64_t input = g * kGroup + step * 4;
      __m256i pairs[ROWS][2];
      for (int r = 0; r < ROWS; ++r) {
        pairs[r][0] = pair_at(x + r * k + input);
        pairs[r][1] = pair_at(x + r * k + input + 2);
      }
      for (int v = 0; v < VECTORS; ++v) {
        __m256i near, far;
        decode(weights[v] + input * 4, near, far);
        for (int r = 0; r < ROWS; ++r) {
          exact[r][v] = _mm256_add_epi32(exact[r][v], _mm256_madd_epi16(pairs[r][0], near));
          exact[r][v] = _mm256_add_epi32(exact[r][v], _mm256_madd_epi16(pairs[r][1], far));
        }
      }
    }
    // 2. into the float sums
    for (int v = 0; v < VECTORS; ++v) {
      const __m256 scale = half_vector(scales[v] + g * kVector), low = half_vector(lows[v] + g * kVector);
      for (int r = 0; r < ROWS; ++r)
        add_group(exact[r][v], scale, low, group_sums[r * groups + g], y + r * n + v * kVector);
    }
  }
}

// Outputs per tile, the unit threads split: 4 vectors (32 outputs). Decoding a group once into L1 for all rows and
// applying it to 4 rows x 3 vectors at a time measured 1.1x slower at 16 and 64 rows than this (bench_int4_kernel.py).
constexpr int64_t kTile = 4;

template <int VECTORS>
void stream_tile(const uint8_t* const* weights, const uint16_t* const* scales, const uint16_t* const* lows,
                 const RoundedRows& rounded, int64_t rows, int64_t k, float* y, int64_t n) {
  const int64_t groups = k / kGroup;
  int64_t r = 0;
  // two rows share each decoded weight vector; more would not fit AVX2's 16 registers
  for (; r + 2 <= rows; r += 2)
    stream_block<2, VECTORS>(weights, scales, lows, rounded.values.data() + r * k,
                             rounded.group_sums.data() + r * groups, k, groups, y + r * n, n);
  if (r < rows)
    stream_block<1, VECTORS>(weights, scales, lows, rounded.values.data() + r * k,
                             rounded.group_sums.data() + r * groups, k, groups, y + r * n, n);
}

// x [rows, in] float32; packed [out / 8, in / 4, 16] uint8; scales, lows [out / 8, in / 32, 8] float16.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& lows) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [rows, in]");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(2) == 16,
              "packed must be uint8 [out / 8, in / 4, 16]");
  const int64_t rows = x.size(0), k = x.size(1), vectors = packed.size(0);
  TORCH_CHECK(k % kGroup == 0 && packed.size(1) * 4 == k, "x has ", k, " inputs; the weights take ",
              packed.size(1) * 4);
  const int64_t n = vectors * kVector, groups = k / kGroup;
  TORCH_CHECK(scales.scalar_type() == at::kHalf && lows.scalar_type() == at::kHalf, "scales must be float16");
  TORCH_CHECK(scales.is_contiguous() && lows.is_contiguous() && packed.is_contiguous(), "weights not contiguous");
  const at::Tensor xc = x.contiguous();
  const RoundedRows rounded = round_rows(xc.data_ptr<float>(), rows, k);
  at::Tensor y = at::empty({rows, n}, x.options());
  const uint8_t* packed_data = packed.data_ptr<uint8_t>();
  const uint16_t* scale_data = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const uint16_t* low_data = reinterpret_cast<const uint16_t*>(lows.data_ptr<at::Half>());
  float* y_data = y.data_ptr<float>();
  // the float sums start at zero and gather every group's share in `y`
  y.zero_();
  const int64_t tiles = (vectors + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first = t * kTile, count = std::min(kTile, vectors - first);
      const uint8_t* weights[kTile];
      const uint16_t* tile_scales[kTile];
      const uint16_t* tile_lows[kTile];
      for (int64_t v = 0; v < count; ++v) {
        weights[v] = packed_data + (first + v) * (k / 4) * 16;
        tile_scales[v] = scale_data + (first + v) * groups * kVector;
        tile_lows[v] = low_data + (first + v) * groups * kVector;
      }
      float* out = y_data + first * kVector;
      switch (count) {
        case 4: stream_tile<4>(weights, tile_scales, tile_lows, rounded, rows, k, out, n); break;
        case 3: stream_tile<3>(weights, tile_scales, tile_lows, rounded, rows, k, out, n); break;
        case 2: stream_tile<2>(weights, tile_scales, tile_lows, rounded, rows, k, out, n); break;
        default: stream_tile<1>(weights, tile_scales, tile_lows, rounded, rows, k, out, n); break;
      }
    }
  });
  // the row scale last, one multiply per output, as for every batch
  return y.mul_(at::from_blob(const_cast<float*>(rounded.scales.data()), {rows, 1}, x.options()));
}

}  // namespace

TORCH_LIBRARY(llm_serving, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales, Tensor lows) -> Tensor");
}
TORCH_LIBRARY_IMPL(llm_serving, CPU, m) { m.impl("int4_linear", &int4_linear); }
