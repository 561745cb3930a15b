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

// act(g) and act'(g): glu_bwd.cu's ActGrad, operation for operation.
void ActGrad(Activation a, float g, float& act, float& grad) {
  if (a == Activation::kSilu) {
    const float s = 1.0f / (1.0f + std::exp(-g));
    act = g * s;
    grad = s * (1.0f + g * (1.0f - s));
    return;
  }
  const float g2 = g * g;
  const float t = std::tanh(0.7978845608028654f * (g + 0.044715f * (g2 * g)));
  const float p = 0.5f * (1.0f + t);
  act = g * p;
  const float sech2 = (1.0f - t) * (1.0f + t);
  const float dinner = 0.7978845608028654f * (1.0f + 0.134145f * g2);
  grad = p + g * ((0.5f * sech2) * dinner);
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

void GluBwdFp8(const GluBwdParams& p) {
  const int64_t out_cols = 2 * p.cols;
  std::vector<float> d(p.rows * out_cols);
  for (int64_t r = 0; r < p.rows; ++r) {
    float* dr = d.data() + r * out_cols;
    for (int64_t c = 0; c < p.cols; ++c) {
      const float g = LoadAsFloat(p.gate, p.dtype, r * p.gate_stride + c);
      const float u = LoadAsFloat(p.up, p.dtype, r * p.up_stride + c);
      const float dy = LoadAsFloat(p.dh, p.dtype, r * p.dh_stride + c);
      float act, grad;
      ActGrad(p.activation, g, act, grad);
      dr[c] = (dy * u) * grad;
      dr[p.cols + c] = dy * act;
      if (p.col_scale != nullptr) {
        const float* cs = p.col_scale + r / (p.rows / p.col_scale_count) * out_cols;
        dr[c] *= cs[c];
        dr[p.cols + c] *= cs[p.cols + c];
      }
    }
  }
  WriteFp8(p.out, d.data(), p.rows, out_cols, p.dtype);
}

}  // namespace fr::cpu
