// CPU reference of the fused GLU: the CUDA kernels' float32 arithmetic, element by element
// (std::tanh / std::exp against CUDA's tanhf / expf: both within a few ulp), then cpu::WriteFp8.
#include <cmath>
#include <vector>

#include "activation/glu.h"
#include "common/fp8_cpu.h"

namespace fr::cpu {
namespace {

float Act(Activation a, float g) {
  if (a == Activation::kSilu) return g * (1.0f / (1.0f + std::exp(-g)));  // g * sigmoid(g)
  const float inner = 0.7978845608028654f * (g + 0.044715f * (g * g * g));  // sqrt(2 / pi)
  return g * (0.5f * (1.0f + std::tanh(inner)));
}

}  // namespace

void GluFp8(const GluParams& p) {
  std::vector<float> y(p.rows * p.cols);
  for (int64_t r = 0; r < p.rows; ++r) {
    for (int64_t c = 0; c < p.cols; ++c) {
      const float g = LoadAsFloat(p.gate, p.dtype, r * p.gate_stride + c);
      const float u = LoadAsFloat(p.up, p.dtype, r * p.up_stride + c);
      y[r * p.cols + c] = Act(p.activation, g) * u;
    }
  }
  WriteFp8(p.out, y.data(), p.rows, p.cols, p.dtype);
}

}  // namespace fr::cpu
