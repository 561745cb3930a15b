// CPU reference FP8 GEMM: decode both operands to f32, then fp32 dot products along k.
#include <vector>

#include "common/fp8_cpu.h"
#include "gemm/fp8_gemm.h"

namespace fr::cpu {

void Fp8Gemm(const Fp8GemmParams& p) {
  const auto& a_table = Fp8DecodeTable(p.a_dtype);
  const auto& b_table = Fp8DecodeTable(p.b_dtype);
  const auto* a = static_cast<const uint8_t*>(p.a);
  const auto* b = static_cast<const uint8_t*>(p.b);
  std::vector<float> bf(p.n * p.k);
  for (int64_t i = 0; i < p.n * p.k; ++i) bf[i] = b_table[b[i]];
  std::vector<float> arow(p.k);
  for (int64_t i = 0; i < p.m; ++i) {
    for (int64_t l = 0; l < p.k; ++l) arow[l] = a_table[a[i * p.k + l]];
    const float sa = p.a_scale[p.vector_scales ? i : 0];
    for (int64_t j = 0; j < p.n; ++j) {
      const float* brow = bf.data() + j * p.k;
      float acc[8] = {};  // independent partial sums let the compiler vectorize
      int64_t l = 0;
      for (; l + 8 <= p.k; l += 8)
        for (int u = 0; u < 8; ++u) acc[u] += arow[l + u] * brow[l + u];
      float sum = 0.0f;
      for (int u = 0; u < 8; ++u) sum += acc[u];
      for (; l < p.k; ++l) sum += arow[l] * brow[l];
      float v = sum * sa * p.b_scale[p.vector_scales ? j : 0];
      if (p.bias != nullptr) v += LoadAsFloat(p.bias, p.out_dtype, j);
      StoreFromFloat(p.out, p.out_dtype, i * p.n + j, v);
    }
  }
}

}  // namespace fr::cpu
