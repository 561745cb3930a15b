// CPU: quantizes the float32 rows a fused producer computed, through cpu::Quantize.
#include <vector>

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
  std::vector<float> row_scales;
  if (out.scale_in != nullptr) {  // a given scale, spread to one per row
    row_scales.resize(rows);
    const int64_t group = rows / out.scale_count;
    for (int64_t r = 0; r < rows; ++r) row_scales[r] = out.scale_in[r / group];
    p.granularity = Granularity::kRow;
    p.scale_in = row_scales.data();
  } else {
    p.granularity = out.granularity;
    p.scale_out = out.scale_out;
    p.amax_out = out.amax_out;
  }
  Quantize(p);
}

}  // namespace fr::cpu
