// Host-side float <-> FP8 conversion: round to nearest even, bit-identical to ml_dtypes for
// finite inputs within range (callers clip to +-max first) and NaN for NaN.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/dtypes.h"

namespace fr {

template <int kExpBits, int kManBits>
struct Fp8Codec {
  static constexpr int kBias = (1 << (kExpBits - 1)) - 1;
  static constexpr int kMinExp = 1 - kBias;  // exponent of the smallest normal

  static uint8_t Encode(float v) {
    if (std::isnan(v)) return kExpBits == 4 ? 0x7F : 0x7E;
    uint8_t sign = std::signbit(v) ? 0x80 : 0x00;
    float a = std::fabs(v);
    if (a == 0.0f) return sign;
    int e;
    std::frexp(a, &e);  // a = f * 2^e with f in [0.5, 1)
    int exp = std::max(e - 1, kMinExp);
    // Quantum of the target grid at this exponent; ldexp by powers of two is exact.
    float r = std::ldexp(std::nearbyint(std::ldexp(a, kManBits - exp)), exp - kManBits);
    if (r == 0.0f) return sign;
    std::frexp(r, &e);
    int re = e - 1;
    uint32_t field, mant;
    if (re < kMinExp) {  // subnormal
      field = 0;
      mant = static_cast<uint32_t>(std::ldexp(r, kManBits - kMinExp));
    } else {
      field = static_cast<uint32_t>(re + kBias);
      mant = static_cast<uint32_t>(std::ldexp(r, kManBits - re)) - (1u << kManBits);
    }
    return sign | static_cast<uint8_t>((field << kManBits) | mant);
  }

  static float Decode(uint8_t bits) {
    float sign = (bits & 0x80) ? -1.0f : 1.0f;
    int field = (bits >> kManBits) & ((1 << kExpBits) - 1);
    int mant = bits & ((1 << kManBits) - 1);
    if (kExpBits == 4 && field == 0xF && mant == 0x7) return NAN;  // e4m3fn: only S.1111.111
    if (kExpBits == 5 && field == 0x1F) return mant ? NAN : sign * INFINITY;
    if (field == 0) return sign * std::ldexp(static_cast<float>(mant), kMinExp - kManBits);
    return sign * std::ldexp(static_cast<float>(mant + (1 << kManBits)), field - kBias - kManBits);
  }
};

using E4M3Codec = Fp8Codec<4, 3>;
using E5M2Codec = Fp8Codec<5, 2>;

// 256-entry decode table for one format.
inline const std::array<float, 256>& Fp8DecodeTable(DType t) {
  static const auto make = [](bool e4m3) {
    std::array<float, 256> table{};
    for (int i = 0; i < 256; ++i)
      table[i] = e4m3 ? E4M3Codec::Decode(i) : E5M2Codec::Decode(i);
    return table;
  };
  static const std::array<float, 256> e4m3 = make(true), e5m2 = make(false);
  return t == DType::kE4M3 ? e4m3 : e5m2;
}

inline float Bf16ToFloat(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t FloatToBf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::isnan(f)) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

inline float HalfToFloat(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}

inline uint16_t FloatToHalf(float f) {  // the compiler's conversion rounds to nearest even
  _Float16 v = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}

// Reads element i of a float buffer of type t as f32.
inline float LoadAsFloat(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kF32: return static_cast<const float*>(p)[i];
    case DType::kBF16: return Bf16ToFloat(static_cast<const uint16_t*>(p)[i]);
    case DType::kF16: return HalfToFloat(static_cast<const uint16_t*>(p)[i]);
    default: return Fp8DecodeTable(t)[static_cast<const uint8_t*>(p)[i]];
  }
}

inline void StoreFromFloat(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kF32: static_cast<float*>(p)[i] = v; break;
    case DType::kBF16: static_cast<uint16_t*>(p)[i] = FloatToBf16(v); break;
    case DType::kF16: static_cast<uint16_t*>(p)[i] = FloatToHalf(v); break;
    case DType::kE4M3: static_cast<uint8_t*>(p)[i] = E4M3Codec::Encode(v); break;
    case DType::kE5M2: static_cast<uint8_t*>(p)[i] = E5M2Codec::Encode(v); break;
  }
}

}  // namespace fr
