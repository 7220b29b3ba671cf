// What one kernel file calls in another (all are built into one library by inference/integer_kernels.py).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace llm_serving {

// y = x W^T, W in 4-bit Q4_1 groups (integer_linear.cpp).
at::Tensor q4_1_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& lows);

// Each row's query over its own columns of the cache (decode_attention.cpp).
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& starts, int64_t end);

}  // namespace llm_serving
