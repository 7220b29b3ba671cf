// y = x W^T for weights stored as GGUF stores them, 4-bit Q4_1 and 8-bit Q8_0 (inference/integer_kernels.py builds
// and loads this at start-up; quantization.py packs the weights).
//
// W: levels in groups of 32 inputs, each group with a float16 scale; Q4_1's levels are 0..15 from a float16 low end
// (the bundled SmolLM2's layers), Q8_0's -127..127 around zero (its LM head). x: float32, rounded per row to 16-bit
// integers (one scale per row, its largest |value| onto 32767), which keeps the model's greedy answers
// (docs/benchmarks.md). The products are integers: `vpmaddwd` multiplies 16 pairs of 16-bit values and adds each
// pair, and a group's 32 products sum exactly in 32 bits (|x| <= 32767, |level| <= 127: at most 1.4e8).
//
// Why a row's numbers never depend on its batch: a group's integer sum is exact in any order, and each output's
// float work (per group: `y = fma(scale, sum, y)`, then for Q4_1 `y = fma(low, row_sum, y)`; at the end
// `y *= row_scale`) runs in the same order whatever the row blocking, tiling or thread split. So one row alone and in
// a batch of 32 get the same bits, and the kernel may block rows however is fastest at each batch size.
//
// Layout: the outputs go in vectors of 8; for each vector and each 4 inputs k..k+3 the two `vpmaddwd` operands for
// inputs (k, k+1) and (k+2, k+3), 16-bit lane p holding output p/2's level for input k + p%2 (resp. k + 2 + p%2).
// Q4_1 keeps both in 16 bytes, byte p's low nibble for the first and high nibble for the second (widened, masked,
// shifted); Q8_0 in 32 bytes, the first operand's 16 then the second's (widened with sign). Q8_0 keeps each vector's
// steps in a row ([out / 8, in / 4, 32], the scales [out / 8, in / 32, 8]); Q4_1 is tiled: the vectors of a tile
// (4, the unit threads split; fewer in the last) side by side at each step, [tiles, in / 4, 4, 16], so one tile's
// step is one 64-byte cache line and a thread reads its tiles as one stream (the scales and low ends likewise,
// [tiles, in / 32, 4, 8]): at one row the kernel waits on memory, and short streams of each vector alone kept the
// hardware's prefetchers from running ahead. AVX2 only (no AVX-512, no VNNI): a free Space's CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace {

constexpr int64_t kVector = llm_serving::kVectorOutputs;  // one AVX2 register of int32 / float
constexpr int64_t kGroup = llm_serving::kGroupInputs;
constexpr float kLevels = 32767.0f;
constexpr int64_t kRowsPerThread = 32;  // rows to round before a second thread is worth waking

using llm_serving::RoundedRows;

// The largest |value| of a row; a NaN is passed over, as std::max(largest, NaN) passes it over.
float largest_magnitude(const float* row, int64_t k) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 largest = _mm256_setzero_ps();
  // max_ps returns its second operand where either is NaN: the running maximum
  for (int64_t i = 0; i < k; i += kVector)
    largest = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(row + i)), largest);
  alignas(32) float lanes[kVector];
  _mm256_store_ps(lanes, largest);
  return *std::max_element(lanes, lanes + kVector);
}

// One row rounded onto -32767..32767 by `inverse` (as std::nearbyint rounds: to nearest, ties to even), and each
// group's sum of its levels.
void round_row(const float* row, int64_t k, float inverse, int16_t* values, float* group_sums) {
  const __m256 scale = _mm256_set1_ps(inverse), low = _mm256_set1_ps(-kLevels), high = _mm256_set1_ps(kLevels);
  for (int64_t g = 0; g < k / kGroup; ++g) {
    __m256i sum = _mm256_setzero_si256();
    for (int64_t i = g * kGroup; i < (g + 1) * kGroup; i += kVector) {
      const __m256 clamped = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(row + i), scale), low), high);
      const __m256i levels = _mm256_cvtps_epi32(clamped);  // the default rounding: to nearest, ties to even
      sum = _mm256_add_epi32(sum, levels);
      const __m128i narrow = _mm_packs_epi32(_mm256_castsi256_si128(levels), _mm256_extracti128_si256(levels, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(values + i), narrow);
    }
    alignas(32) int32_t lanes[kVector];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sum);
    int32_t total = 0;
    for (int32_t lane : lanes) total += lane;
    group_sums[g] = static_cast<float>(total);
  }
}

// Row r of x rounded into `out` (sized for its rows).
void round_one_row(const float* x, int64_t r, int64_t k, RoundedRows& out) {
  const int64_t groups = k / kGroup;
  const float* row = x + r * k;
  const float largest = largest_magnitude(row, k);
  const float scale = largest > 0.0f ? largest / kLevels : 1.0f;
  out.scales[r] = scale;
  round_row(row, k, 1.0f / scale, out.values.data() + r * k, out.group_sums.data() + r * groups);
}

RoundedRows round_rows(const float* x, int64_t rows, int64_t k) {
  RoundedRows out(rows, k);
  // rows are independent; a prefill's hundreds of them split across threads, a decode step's few stay on one
  at::parallel_for(0, rows, kRowsPerThread, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) round_one_row(x, r, k, out);
  });
  return out;
}

// A group's integer sums into a row's float sums (kept in `y`), in the one order every row block uses: the group's
// scale times its products, plus (Q4_1) its low end times the row's sum of the group's inputs.
template <typename Format>
inline void add_group(__m256i exact, __m256 scale, __m256 low, float group_sum, float* out) {
  __m256 sum = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(exact), _mm256_loadu_ps(out));
  if constexpr (Format::kHasLow) sum = _mm256_fmadd_ps(low, _mm256_set1_ps(group_sum), sum);
  _mm256_storeu_ps(out, sum);
}

inline __m256 half_vector(const uint16_t* values) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(values)));
}

// The two weight operands of one vector for inputs (k, k+1) and (k+2, k+3), from that step's bytes.
struct Q4_1 {
  static constexpr int64_t kStepBytes = 16;
  static constexpr bool kHasLow = true;
  static constexpr bool kTiled = true;
  static inline void decode(const uint8_t* bytes, __m256i& near, __m256i& far) {
    const __m256i widened = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    near = _mm256_and_si256(widened, _mm256_set1_epi16(0x0F));
    far = _mm256_srli_epi16(widened, 4);
  }
};

struct Q8_0 {
  static constexpr int64_t kStepBytes = 32;
  static constexpr bool kHasLow = false;
  static constexpr bool kTiled = false;
  static inline void decode(const uint8_t* bytes, __m256i& near, __m256i& far) {
    near = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    far = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16)));
  }
};

inline __m256i pair_at(const int16_t* x) {  // inputs x[0], x[1] in every 32-bit lane
  int32_t pair;
  std::memcpy(&pair, x, 4);
  return _mm256_set1_epi32(pair);
}

// ROWS rows x VECTORS vectors of outputs, every group, decoding the weights in registers as they stream by; the
// float sums live in `y` (in L1), so the registers hold the groups' exact integer sums.
template <typename Format, int ROWS, int VECTORS>
inline void stream_block(const uint8_t* const* weights, const uint16_t* const* scales, const uint16_t* const* lows,
                         const int16_t* x, const float* group_sums, int64_t k, int64_t groups, float* y, int64_t n) {
  // a tiled layout keeps a tile's vectors side by side at every step (and group), else each vector's steps in a row
  constexpr int64_t step_stride = Format::kTiled ? VECTORS * Format::kStepBytes : Format::kStepBytes;
  constexpr int64_t group_stride = Format::kTiled ? VECTORS * kVector : kVector;
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
        Format::decode(weights[v] + (input / 4) * step_stride, near, far);
        for (int r = 0; r < ROWS; ++r) {
          exact[r][v] = _mm256_add_epi32(exact[r][v], _mm256_madd_epi16(pairs[r][0], near));
          exact[r][v] = _mm256_add_epi32(exact[r][v], _mm256_madd_epi16(pairs[r][1], far));
        }
      }
    }
    // 2. into the float sums
    for (int v = 0; v < VECTORS; ++v) {
      const __m256 scale = half_vector(scales[v] + g * group_stride);
      const __m256 low = Format::kHasLow ? half_vector(lows[v] + g * group_stride) : _mm256_setzero_ps();
      for (int r = 0; r < ROWS; ++r)
        add_group<Format>(exact[r][v], scale, low, group_sums[r * groups + g], y + r * n + v * kVector);
    }
  }
}

// Outputs per tile, the unit threads split: 4 vectors (32 outputs). Decoding a group once into L1 for all rows and
// applying it to 4 rows x 3 vectors at a time measured 1.1x slower at 16 and 64 rows than this, and 8 vectors for a
// lone row 1.09x slower at one row.
constexpr int64_t kTile = 4;
static_assert(kTile * kVector == llm_serving::kTileOutputs);

template <typename Format, int VECTORS>
void stream_tile(const uint8_t* const* weights, const uint16_t* const* scales, const uint16_t* const* lows,
                 const RoundedRows& rounded, int64_t rows, int64_t k, float* y, int64_t n) {
  const int64_t groups = k / kGroup;
  int64_t r = 0;
  // two rows share each decoded weight vector; more would not fit AVX2's 16 registers
  for (; r + 2 <= rows; r += 2)
    stream_block<Format, 2, VECTORS>(weights, scales, lows, rounded.values.data() + r * k,
                                     rounded.group_sums.data() + r * groups, k, groups, y + r * n, n);
  if (r < rows)
    stream_block<Format, 1, VECTORS>(weights, scales, lows, rounded.values.data() + r * k,
                                     rounded.group_sums.data() + r * groups, k, groups, y + r * n, n);
}

const uint16_t* half_data(const at::Tensor& values) {
  return reinterpret_cast<const uint16_t*>(values.data_ptr<at::Half>());
}

using llm_serving::Matrix;

// Tiles [begin, end) of y = x W^T, complete: each tile's columns of every row start at zero, gather every group's
// share and end times their row's scale (one multiply per output, as for every batch and split).
template <typename Format>
void run_tiles(const Matrix& matrix, const RoundedRows& rounded, int64_t rows, int64_t begin, int64_t end, float* y) {
  const int64_t k = matrix.inputs, vectors = matrix.vectors, groups = k / kGroup, n = vectors * kVector;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t first = t * kTile, count = std::min(kTile, vectors - first);
    const uint8_t* weights[kTile];
    const uint16_t* tile_scales[kTile];
    const uint16_t* tile_lows[kTile];
    for (int64_t v = 0; v < count; ++v) {
      // where vector v's first step and group are: every tile before this one is full
      const int64_t step_at = Format::kTiled ? first * (k / 4) + v : (first + v) * (k / 4);
      const int64_t group_at = Format::kTiled ? first * groups + v : (first + v) * groups;
      weights[v] = matrix.packed + step_at * Format::kStepBytes;
      tile_scales[v] = matrix.scales + group_at * kVector;
      tile_lows[v] = matrix.lows != nullptr ? matrix.lows + group_at * kVector : nullptr;
    }
    float* out = y + first * kVector;
    const int64_t width = count * kVector;
    for (int64_t r = 0; r < rows; ++r) std::fill_n(out + r * n, width, 0.0f);
    switch (count) {
      case 4: stream_tile<Format, 4>(weights, tile_scales, tile_lows, rounded, rows, k, out, n); break;
      case 3: stream_tile<Format, 3>(weights, tile_scales, tile_lows, rounded, rows, k, out, n); break;
      case 2: stream_tile<Format, 2>(weights, tile_scales, tile_lows, rounded, rows, k, out, n); break;
      default: stream_tile<Format, 1>(weights, tile_scales, tile_lows, rounded, rows, k, out, n); break;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float scale = rounded.scales[r];
      for (int64_t i = 0; i < width; ++i) out[r * n + i] *= scale;
    }
  }
}

// packed [out / 8, in / 4, Format::kStepBytes] uint8; scales (and for Q4_1 lows) [out / 8, in / 32, 8] float16; for
// Q4_1 in the tiled order (above) within those shapes. Checked here, before any kernel reads them.
template <typename Format>
Matrix checked_matrix(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor* lows) {
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(2) == Format::kStepBytes &&
                  packed.is_contiguous(),
              "packed must be contiguous uint8 [out / 8, in / 4, ", Format::kStepBytes, "]");
  const int64_t k = packed.size(1) * 4, vectors = packed.size(0);
  TORCH_CHECK(k % kGroup == 0, "the weights' inputs must be a multiple of ", kGroup);
  for (const at::Tensor* t : {&scales, lows}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous(), "scales must be contiguous float16");
    TORCH_CHECK(t->numel() == vectors * (k / kGroup) * kVector, "scales must be [out / 8, in / 32, 8]");
  }
  return Matrix{packed.data_ptr<uint8_t>(), half_data(scales), lows != nullptr ? half_data(*lows) : nullptr, k,
                vectors};
}

// x [rows, in] float32 times the weights (checked_matrix).
template <typename Format>
at::Tensor integer_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                          const at::Tensor* lows) {
  const Matrix matrix = checked_matrix<Format>(packed, scales, lows);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [rows, in]");
  const int64_t rows = x.size(0), k = x.size(1);
  TORCH_CHECK(k == matrix.inputs, "x has ", k, " inputs; the weights take ", matrix.inputs);
  const at::Tensor xc = x.contiguous();
  const RoundedRows rounded = round_rows(xc.data_ptr<float>(), rows, k);
  at::Tensor y = at::empty({rows, matrix.outputs()}, x.options());
  float* y_data = y.data_ptr<float>();
  at::parallel_for(0, matrix.tiles(), 1, [&](int64_t begin, int64_t end) {
    run_tiles<Format>(matrix, rounded, rows, begin, end, y_data);
  });
  return y;
}

at::Tensor q4_1_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& lows) {
  return integer_linear<Q4_1>(x, packed, scales, &lows);
}

at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  return integer_linear<Q8_0>(x, packed, scales, nullptr);
}

}  // namespace

namespace llm_serving {

Matrix q4_1_matrix(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& lows) {
  return checked_matrix<Q4_1>(packed, scales, &lows);
}

void round_row_into(const float* x, int64_t r, int64_t k, RoundedRows& out) { round_one_row(x, r, k, out); }

void q4_1_tiles(const Matrix& matrix, const RoundedRows& rounded, int64_t rows, int64_t begin, int64_t end, float* y) {
  run_tiles<Q4_1>(matrix, rounded, rows, begin, end, y);
}

}  // namespace llm_serving

TORCH_LIBRARY(llm_serving, m) {
  m.def("q4_1_linear(Tensor x, Tensor packed, Tensor scales, Tensor lows) -> Tensor");
  m.def("q8_0_linear(Tensor x, Tensor packed, Tensor scales) -> Tensor");
}
TORCH_LIBRARY_IMPL(llm_serving, CPU, m) {
  m.impl("q4_1_linear", &q4_1_linear);
  m.impl("q8_0_linear", &q8_0_linear);
}
