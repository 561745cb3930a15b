// FP8 GEMM in the Hopper "TN" form: out (m, n) = (a (m, k) * a_scale) @ (b (n, k) * b_scale)^T [+ bias],
// both operands row-major and contiguous along k, fp32 accumulation.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/dtypes.h"

namespace fr {

struct Fp8GemmParams {
  const void* a;  // (m, k), kE4M3 or kE5M2
  DType a_dtype;
  const void* b;  // (n, k), kE4M3 or kE5M2 (not both kE5M2)
  DType b_dtype;
  const float* a_scale;  // 1 value, or m values with vector_scales
  const float* b_scale;  // 1 value, or n values with vector_scales
  bool vector_scales;    // per-row of a and per-row of b (cuBLASLt's outer-vector mode)
  const void* bias;      // optional (n), of out_dtype
  void* out;             // (m, n)
  DType out_dtype;       // kBF16 or kF32
  int64_t m, n, k;
  void* workspace;
  size_t workspace_bytes;
  bool fast_accum;  // Hopper's faster FP8 accumulation (partial sums kept in fewer bits)
};

// Workspace the CUDA GEMM asks for; cuBLASLt recommends 32 MiB on Hopper.
constexpr size_t kGemmWorkspaceBytes = 32u << 20;

namespace cpu {
void Fp8Gemm(const Fp8GemmParams& p);
}  // namespace cpu

}  // namespace fr

#if defined(FLASHRT_CUDA) || defined(__CUDACC__)
#include <cuda_runtime.h>

#include <string>
namespace fr::cuda {
// Returns an empty string on success, else what failed.
std::string Fp8Gemm(const Fp8GemmParams& p, cudaStream_t stream);
}  // namespace fr::cuda
#endif
