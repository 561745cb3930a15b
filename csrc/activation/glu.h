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

// Backward of the merged GLU + FP8 quantization: from [gate | up] (rows, 2F) and dh = dL/dy
// (rows, F), in float32: dgate = (dh * up) * act'(gate), dup = dh * act(gate), each times an optional
// per-column factor col_scale (2F float32: the per-channel weight scales of the GEMM that reads the
// result, which lie along its reduction axis); out is [dgate | dup] (rows, 2F) quantized, out.y
// those values in dtype.
struct GluBwdParams {
  const void* gate;  // rows of `cols` elements, `gate_stride` elements apart
  const void* up;
  const void* dh;    // rows of `cols` elements, `dh_stride` apart
  int64_t gate_stride, up_stride, dh_stride;
  // 2 * cols values or nullptr; or `col_scale_count` rows of them (rows divisible by it), row i for
  // rows [i * rows / col_scale_count, (i + 1) * rows / col_scale_count) (vmap's broadcast batch axes)
  const float* col_scale;
  int64_t col_scale_count;
  DType dtype;  // of gate, up, dh and out.y: f32 / bf16 / f16
  int64_t rows, cols;  // cols = F; the output rows hold 2F
  Activation activation;
  Fp8Output out;  // (rows, 2 * cols)
};

namespace cpu {
void GluFp8(const GluParams& p);
void GluBwdFp8(const GluBwdParams& p);
}  // namespace cpu

}  // namespace fr

#if defined(FLASHRT_CUDA) || defined(__CUDACC__)
#include <cuda_runtime.h>
namespace fr::cuda {
cudaError_t GluFp8(const GluParams& p, cudaStream_t stream);
cudaError_t GluBwdFp8(const GluBwdParams& p, cudaStream_t stream);
}  // namespace fr::cuda
#endif
