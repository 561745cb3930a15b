// Fused normalization + FP8 quantization: RMSNorm (with an optional residual add before it),
// LayerNorm and pi0.5's adaptive RMSNorm, each quantizing its output row by row (or per tensor)
// in the pass that produces it.
//
//   h = x (+ residual, rounded to x's dtype: the new residual stream)
//   n = (h - mean(h)) * rsqrt(mean((h - mean(h))^2) + eps)   LayerNorm
//   n = h * rsqrt(mean(h^2) + eps)                             RMSNorm
//   y = n [* (offset + weight)] [+ bias] [* (1 + scale_mod) + shift_mod], in float32
//   q = quantize(y)
#pragma once

#include <cstdint>

#include "common/fp8_output.h"

namespace fr {

enum class NormKind : int32_t { kRms = 0, kLayer = 1 };

struct NormParams {
  const void* x;  // (rows, cols), f32 / bf16 / f16
  DType x_dtype;
  int64_t rows, cols;
  NormKind kind;
  float eps;
  const void* residual;  // optional, x's dtype and shape
  void* residual_out;    // h, required with residual
  // Optional per-column parameters, float32 (param_rows, cols); row r uses parameter row
  // r / (rows / param_rows), so one row serves all (the usual case) and more serve groups of rows.
  const float* weight;
  int64_t weight_rows;
  float offset;  // y *= offset + weight
  const float* bias;
  int64_t bias_rows;
  // Optional adaptive modulation, x's dtype, (mod_rows, cols), broadcast like the parameters.
  const void* scale_mod;
  const void* shift_mod;
  int64_t mod_rows;
  Fp8Output out;
};

namespace cpu {
void NormFp8(const NormParams& p);
}  // namespace cpu

}  // namespace fr

#if defined(FLASHRT_CUDA) || defined(__CUDACC__)
#include <cuda_runtime.h>
namespace fr::cuda {
cudaError_t NormFp8(const NormParams& p, cudaStream_t stream);
}  // namespace fr::cuda
#endif
