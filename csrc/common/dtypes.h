// Element types and FP8 formats shared by the CPU and CUDA kernels. No JAX types here.
#pragma once

#include <cstdint>

namespace fr {

enum class DType : int32_t { kF32, kBF16, kF16, kE4M3, kE5M2 };

// Largest finite magnitude of each FP8 format.
constexpr float kE4M3Max = 448.0f;
constexpr float kE5M2Max = 57344.0f;

inline bool IsFp8(DType t) { return t == DType::kE4M3 || t == DType::kE5M2; }
inline float Fp8Max(DType t) { return t == DType::kE4M3 ? kE4M3Max : kE5M2Max; }
inline int ByteWidth(DType t) {
  switch (t) {
    case DType::kF32: return 4;
    case DType::kBF16:
    case DType::kF16: return 2;
    default: return 1;
  }
}

// Per-tensor current scaling: scale = max(amax, kAmaxFloor) / fp8_max. The floor keeps an
// all-zero tensor at a finite, positive scale; NaN and inf amax pass through unchanged.
constexpr float kAmaxFloor = 1e-12f;

}  // namespace fr
