// CPU reference quantization: the same arithmetic as the CUDA kernels, element by element.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/fp8_cpu.h"
#include "quant/quantize.h"

namespace fr::cpu {
namespace {

// NaN-propagating max of |x| (std::fmax would drop NaN).
float AbsMax(const QuantizeParams& p, int64_t begin, int64_t end) {
  float amax = 0.0f;
  for (int64_t i = begin; i < end; ++i) {
    float a = std::fabs(LoadAsFloat(p.x, p.x_dtype, i));
    if (!(a <= amax)) amax = a;  // true for a > amax and for NaN
    if (std::isnan(amax)) break;
  }
  return amax;
}

float ScaleFromAmax(float amax, DType q_dtype) {
  float floored = amax > kAmaxFloor ? amax : (std::isnan(amax) ? amax : kAmaxFloor);
  return floored / Fp8Max(q_dtype);
}

}  // namespace

void Quantize(const QuantizeParams& p) {
  const float fmax = Fp8Max(p.q_dtype);
  const int64_t n_scales = p.granularity == Granularity::kRow ? p.rows : 1;
  std::vector<float> inv(n_scales);
  for (int64_t s = 0; s < n_scales; ++s) {
    const int64_t begin = p.granularity == Granularity::kRow ? s * p.cols : 0;
    const int64_t end = p.granularity == Granularity::kRow ? begin + p.cols : p.rows * p.cols;
    const float amax = AbsMax(p, begin, end);
    p.amax_out[s] = amax;
    float scale;
    if (p.scale_in != nullptr) {
      scale = p.scale_in[s];
    } else {
      scale = ScaleFromAmax(amax, p.q_dtype);
      p.scale_out[s] = scale;
    }
    inv[s] = 1.0f / scale;
  }
  for (int64_t r = 0; r < p.rows; ++r) {
    const float inv_r = inv[p.granularity == Granularity::kRow ? r : 0];
    for (int64_t c = 0; c < p.cols; ++c) {
      float v = LoadAsFloat(p.x, p.x_dtype, r * p.cols + c) * inv_r;
      v = std::isnan(v) ? v : std::min(std::max(v, -fmax), fmax);
      StoreFromFloat(p.q, p.q_dtype, r * p.cols + c, v);
      if (p.q_t != nullptr)
        static_cast<uint8_t*>(p.q_t)[c * p.rows_padded + r] = static_cast<const uint8_t*>(p.q)[r * p.cols + c];
    }
  }
  if (p.q_t != nullptr) {
    for (int64_t c = 0; c < p.cols; ++c)
      for (int64_t r = p.rows; r < p.rows_padded; ++r) static_cast<uint8_t*>(p.q_t)[c * p.rows_padded + r] = 0;
  }
}

}  // namespace fr::cpu
