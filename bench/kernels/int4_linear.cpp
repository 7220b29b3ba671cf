// An experiment for issue 11 (bench/bench_int4_kernel.py), not used by the server: y = x W^T with W in 4-bit groups
// of 32 inputs, each group with a scale and a low end (GGUF Q4_1, the bundled SmolLM2's own format), x and y float32.
// AVX2 + FMA only. A tile of 16 outputs is decoded once per group and applied to up to 4 rows at a time; each output
// is computed by one thread in a fixed order, so a row's numbers do not depend on the other rows of its batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kLanes = 16;  // outputs per tile: two AVX2 registers
constexpr int64_t kGroup = 32;  // inputs per group

// One tile of 16 outputs for ROWS rows. w: the tile's bytes [groups][16][16]; scales, lows: [groups][16].
template <int ROWS>
inline void tile_rows(const uint8_t* w, const float* scales, const float* lows, const float* x, int64_t k,
                      const float* xsum, int64_t groups, float* y, int64_t n) {
  __m256 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i low_nibble = _mm256_set1_epi32(15);
  for (int64_t g = 0; g < groups; ++g) {
    __m256 lo[ROWS][2], hi[ROWS][2];
    for (int r = 0; r < ROWS; ++r) lo[r][0] = lo[r][1] = hi[r][0] = hi[r][1] = _mm256_setzero_ps();
    const uint8_t* wg = w + g * kLanes * 16;
    const float* xg = x + g * kGroup;
    for (int j = 0; j < 16; ++j) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + j * kLanes));
      const __m256i b0 = _mm256_cvtepu8_epi32(bytes);
      const __m256i b1 = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
      const __m256 q0 = _mm256_cvtepi32_ps(_mm256_and_si256(b0, low_nibble));
      const __m256 q1 = _mm256_cvtepi32_ps(_mm256_and_si256(b1, low_nibble));
      const __m256 p0 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));
      const __m256 p1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
      for (int r = 0; r < ROWS; ++r) {
        const __m256 xa = _mm256_broadcast_ss(xg + r * k + j);
        const __m256 xb = _mm256_broadcast_ss(xg + r * k + 16 + j);
        lo[r][0] = _mm256_fmadd_ps(q0, xa, lo[r][0]);
        lo[r][1] = _mm256_fmadd_ps(q1, xa, lo[r][1]);
        hi[r][0] = _mm256_fmadd_ps(p0, xb, hi[r][0]);
        hi[r][1] = _mm256_fmadd_ps(p1, xb, hi[r][1]);
      }
    }
    const __m256 s0 = _mm256_loadu_ps(scales + g * kLanes), s1 = _mm256_loadu_ps(scales + g * kLanes + 8);
    const __m256 l0 = _mm256_loadu_ps(lows + g * kLanes), l1 = _mm256_loadu_ps(lows + g * kLanes + 8);
    for (int r = 0; r < ROWS; ++r) {
      const __m256 xs = _mm256_broadcast_ss(xsum + r * groups + g);
      acc[r][0] = _mm256_fmadd_ps(s0, _mm256_add_ps(lo[r][0], hi[r][0]), acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(s1, _mm256_add_ps(lo[r][1], hi[r][1]), acc[r][1]);
      acc[r][0] = _mm256_fmadd_ps(l0, xs, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(l1, xs, acc[r][1]);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    _mm256_storeu_ps(y + r * n, acc[r][0]);
    _mm256_storeu_ps(y + r * n + 8, acc[r][1]);
  }
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& lows) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [rows, in]");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kByte && packed.size(2) == 16 &&
              packed.size(3) == kLanes, "packed must be uint8 [tiles, groups, 16, 16]");
  const int64_t rows = x.size(0), k = x.size(1), tiles = packed.size(0), groups = packed.size(1);
  TORCH_CHECK(k == groups * kGroup, "x has ", k, " inputs; the weights take ", groups * kGroup);
  const int64_t n = tiles * kLanes;
  const at::Tensor xc = x.contiguous();
  const at::Tensor xsum = xc.view({rows, groups, kGroup}).sum(-1).contiguous();
  at::Tensor y = at::empty({rows, n}, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* xs = xsum.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* lp = lows.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* w = wp + t * groups * 16 * kLanes;
      const float* s = sp + t * groups * kLanes;
      const float* l = lp + t * groups * kLanes;
      for (int64_t r = 0; r < rows;) {
        const int64_t left = rows - r;
        const float* xr = xp + r * k;
        const float* xsr = xs + r * groups;
        float* yr = yp + r * n + t * kLanes;
        if (left >= 4) { tile_rows<4>(w, s, l, xr, k, xsr, groups, yr, n); r += 4; }
        else if (left >= 2) { tile_rows<2>(w, s, l, xr, k, xsr, groups, yr, n); r += 2; }
        else { tile_rows<1>(w, s, l, xr, k, xsr, groups, yr, n); r += 1; }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(llm_kernels, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales, Tensor lows) -> Tensor");
}
TORCH_LIBRARY_IMPL(llm_kernels, CPU, m) {
  m.impl("int4_linear", &int4_linear);
}
