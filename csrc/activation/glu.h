// Fused gated linear unit + FP8 quantization: y = act(gate) * up in float32, q = quantize(y), in
// the pass that computes y. gate and up are two arrays, or the halves of one row [gate | up] as a
// GEMM with N = 2F writes them (then gate_stride = up_stride = 2F and up = gate + F).
#pragma once

#include <cstdint>

#include "common/fp8_output.h"

namespace fr {

enum class Activation : int32_t { kGeluTanh = 0, kSilu = 1 };

struct GluParams {
  const void* gate;  // rows of `cols` elements, `gate_stride` elements apart
  const void* up;
  int64_t gate_stride, up_stride;
  DType dtype;  // of gate, up and out.y: f32 / bf16 / f16
  int64_t rows, cols;
  Activation activation;
  Fp8Output out;  // (rows, cols)
};

namespace cpu {
void GluFp8(const GluParams& p);
}  // namespace cpu

}  // namespace fr

#if defined(FLASHRT_CUDA) || defined(__CUDACC__)
#include <cuda_runtime.h>
namespace fr::cuda {
cudaError_t GluFp8(const GluParams& p, cudaStream_t stream);
}  // namespace fr::cuda
#endif
