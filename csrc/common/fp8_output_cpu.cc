// CPU: quantizes the float32 rows a fused producer computed, through cpu::Quantize.
#include "common/fp8_cpu.h"
#include "common/fp8_output.h"

namespace fr::cpu {

void WriteFp8(const Fp8Output& out, const float* y, int64_t rows, int64_t cols, DType y_dtype) {
  if (out.y != nullptr)
    for (int64_t i = 0; i < rows * cols; ++i) StoreFromFloat(out.y, y_dtype, i, y[i]);
  QuantizeParams p{};
  p.x = y;
  p.x_dtype = DType::kF32;
  p.rows = rows;
  p.cols = cols;
  p.q_dtype = out.q_dtype;
  p.q = out.q;
  if (out.scale_in == nullptr) {
    p.granularity = out.granularity;
    p.scale_out = out.scale_out;
    p.amax_out = out.amax_out;
    Quantize(p);
    return;
  }
  // A given scale per group of rows: each group is a tensor of its own, with its own amax.
  const int64_t group = rows / out.scale_count;
  p.granularity = Granularity::kTensor;
  p.rows = group;
  for (int64_t g = 0; g < out.scale_count; ++g) {
    p.x = y + g * group * cols;
    p.q = static_cast<uint8_t*>(out.q) + g * group * cols;
    p.scale_in = out.scale_in + g;
    p.amax_out = out.amax_out + g;
    Quantize(p);
  }
}

}  // namespace fr::cpu
