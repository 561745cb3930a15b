// CPU reference of the fused norms: float32 arithmetic in the CUDA kernels' order per element
// (their sums run in a different order, so results agree to rounding), then cpu::WriteFp8.
#include <cmath>
#include <vector>

#include "common/fp8_cpu.h"
#include "norm/norm.h"

namespace fr::cpu {

void NormFp8(const NormParams& p) {
  const int64_t rows = p.rows, cols = p.cols;
  std::vector<float> y(rows * cols), h(cols);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      float v = LoadAsFloat(p.x, p.x_dtype, base + c);
      if (p.residual != nullptr) {  // the sum is rounded to x's dtype, and the norm reads it back
        StoreFromFloat(p.residual_out, p.x_dtype, base + c, v + LoadAsFloat(p.residual, p.x_dtype, base + c));
        v = LoadAsFloat(p.residual_out, p.x_dtype, base + c);
      }
      h[c] = v;
    }
    float mean = 0.0f;
    if (p.kind == NormKind::kLayer) {
      float sum = 0.0f;
      for (int64_t c = 0; c < cols; ++c) sum += h[c];
      mean = sum / static_cast<float>(cols);
    }
    float ss = 0.0f;
    for (int64_t c = 0; c < cols; ++c) {
      const float d = h[c] - mean;
      ss += d * d;
    }
    const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(cols) + p.eps);
    const float* w = p.weight ? p.weight + r / (rows / p.weight_rows) * cols : nullptr;
    const float* b = p.bias ? p.bias + r / (rows / p.bias_rows) * cols : nullptr;
    const int64_t mod_base = p.scale_mod ? r / (rows / p.mod_rows) * cols : 0;
    for (int64_t c = 0; c < cols; ++c) {
      float v = (h[c] - mean) * rstd;
      if (w) v = v * (p.offset + w[c]);
      if (b) v = v + b[c];
      if (p.scale_mod) {
        v = v * (1.0f + LoadAsFloat(p.scale_mod, p.x_dtype, mod_base + c)) +
            LoadAsFloat(p.shift_mod, p.x_dtype, mod_base + c);
      }
      y[base + c] = v;
    }
  }
  WriteFp8(p.out, y.data(), rows, cols, p.x_dtype);
}

}  // namespace fr::cpu
