// FP8 quantization: q = saturate(round_nearest_even(x * (1 / scale))), with the scale either given
// (static / delayed scaling) or computed from this tensor's amax on the device (current scaling).
#pragma once

#include <cstdint>

#include "common/dtypes.h"

namespace fr {

enum class Granularity : int32_t { kTensor = 0, kRow = 1 };

struct QuantizeParams {
  const void* x;  // (rows, cols), f32 / bf16 / f16
  DType x_dtype;
  int64_t rows, cols;
  DType q_dtype;  // kE4M3 or kE5M2
  Granularity granularity;
  const float* scale_in;  // given scale: 1 value (tensor) or `rows` values; nullptr = current scaling
  void* q;                // (rows, cols)
  void* q_t;              // optional (cols, rows_padded), zero in the padding columns; tensor only
  int64_t rows_padded;
  float* scale_out;  // current scaling: 1 or `rows` values
  float* amax_out;   // max |x| (NaN if any x is NaN), one per scale (given or computed)
};

namespace cpu {
void Quantize(const QuantizeParams& p);
}  // namespace cpu

}  // namespace fr

#if defined(FLASHRT_CUDA) || defined(__CUDACC__)
#include <cuda_runtime.h>
namespace fr::cuda {
cudaError_t Quantize(const QuantizeParams& p, cudaStream_t stream);
}  // namespace fr::cuda
#endif
