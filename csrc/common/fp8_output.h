// The FP8 output of a fused producer (a norm or an activation that quantizes what it computes):
// where q, its scale and the optional unquantized values go, and how the scale is chosen.
#pragma once

#include <cstdint>

#include "common/dtypes.h"
#include "quant/quantize.h"

namespace fr {

struct Fp8Output {
  DType q_dtype;            // kE4M3 or kE5M2
  Granularity granularity;  // current scaling: one scale per tensor or per row
  // Given scale (static / delayed scaling): `scale_count` values, rows divisible by it, value i for
  // rows [i * rows / scale_count, (i + 1) * rows / scale_count). nullptr = current scaling.
  const float* scale_in;
  int64_t scale_count;
  void* q;           // (rows, cols) FP8
  float* scale_out;  // current scaling: 1 or `rows` values
  // max |y| of the float32 values quantized (NaN if any is NaN): current scaling, 1 or `rows`
  // values; a given scale, `scale_count` values, each over the rows its scale covers (delayed
  // scaling's history). Per tensor and for a given scale, the CUDA kernels' atomicMax targets.
  float* amax_out;
  void* y;           // optional (rows, cols) in the input dtype: the values before quantization
};

// Widest row the CUDA kernels keep in registers: 16384 elements when rows are whole 16-byte
// vectors, 8192 otherwise. The CPU kernels follow the same limit so that both platforms agree.
constexpr int64_t kMaxRowWidth = 16384;
constexpr int64_t kMaxRowWidthUnaligned = 8192;

inline bool RowFits(DType t, int64_t cols) {
  return cols <= (cols % (16 / ByteWidth(t)) == 0 ? kMaxRowWidth : kMaxRowWidthUnaligned);
}

namespace cpu {
// Quantizes float32 rows y (rows, cols) into `out` (current or given scale) and writes out.y, if
// asked, in y_dtype. The arithmetic is cpu::Quantize's.
void WriteFp8(const Fp8Output& out, const float* y, int64_t rows, int64_t cols, DType y_dtype);
}  // namespace cpu

}  // namespace fr
