// Decoding and checking of what the fused FP8 producers (norm.cc, activation.cc) share: the given
// scale argument, and the results q, scale, amax and y.
#pragma once

#include <string>

#include "common/fp8_output.h"
#include "jax_ffi/checks.h"

namespace fr::jax_ffi {

inline ffi::Error CheckRows(const char* op, DType t, int64_t rows, int64_t cols, const char* arg) {
  if (rows * cols == 0) return BadArg(op, arg, "must be a non-empty array");
  if (!RowFits(t, cols))
    return BadArg(op, arg, "rows must hold at most " + std::to_string(kMaxRowWidth) + " elements (" +
                               std::to_string(kMaxRowWidthUnaligned) + " where a row is not a whole number of "
                               "16-byte vectors), got " + std::to_string(cols));
  return ffi::Error::Success();
}

// A given scale: float32, one value or one per group of rows.
inline ffi::Error DecodeGivenScale(const char* op, const ffi::AnyBuffer& s, int64_t rows, Fp8Output* out) {
  if (s.element_type() != ffi::DataType::F32) return BadArg(op, "scale", "must be float32");
  const int64_t n = s.element_count();
  if (n == 0 || rows % n != 0)
    return BadArg(op, "scale", "must hold one value or one per group of rows (" + std::to_string(rows) +
                                   " rows), got " + std::to_string(n));
  out->scale_in = static_cast<const float*>(s.untyped_data());
  out->scale_count = n;
  return ffi::Error::Success();
}

// Results after q (and after any op-specific ones, from index `next` of `rets`): scale and amax for
// current scaling, or amax alone for a given scale (decoded first, by DecodeGivenScale: one amax per
// scale value), then y when asked for.
inline ffi::Error DecodeOutputs(const char* op, const ffi::AnyBuffer& q, ffi::RemainingRets rets, size_t next,
                                bool static_scale, bool with_y, DType y_dtype, int64_t rows, int64_t cols,
                                Fp8Output* out) {
  if (!ToDType(q.element_type(), &out->q_dtype) || !IsFp8(out->q_dtype))
    return BadArg(op, "q", "must be float8_e4m3fn or float8_e5m2");
  if (static_cast<int64_t>(q.element_count()) != rows * cols)
    return BadArg(op, "q", "must hold " + std::to_string(rows) + " x " + std::to_string(cols) + " elements, got " +
                               std::to_string(q.element_count()));
  out->q = q.untyped_data();
  const size_t expected = next + (static_scale ? 1 : 2) + (with_y ? 1 : 0);
  if (rets.size() != expected)
    return BadArg(op, "results", "must be " + std::to_string(expected + 1) + " buffers, got " +
                                     std::to_string(rets.size() + 1));
  if (static_scale) {
    auto amax = rets.get<ffi::AnyBuffer>(next);
    if (!amax.has_value() || (*amax)->element_type() != ffi::DataType::F32 ||
        static_cast<int64_t>((*amax)->element_count()) != out->scale_count)
      return BadArg(op, "amax", "result must be float32 with one value per given scale (" +
                                    std::to_string(out->scale_count) + ")");
    out->amax_out = static_cast<float*>((*amax)->untyped_data());
    next += 1;
  } else {
    auto scale = rets.get<ffi::AnyBuffer>(next);
    auto amax = rets.get<ffi::AnyBuffer>(next + 1);
    if (!scale.has_value() || !amax.has_value()) return BadArg(op, "scale", "result could not be decoded");
    const int64_t n = (*scale)->element_count();
    if ((*scale)->element_type() != ffi::DataType::F32 || (*amax)->element_type() != ffi::DataType::F32 ||
        (*amax)->element_count() != static_cast<size_t>(n) || (n != 1 && n != rows))
      return BadArg(op, "scale", "and amax results must be float32 with 1 value or one per row (" +
                                     std::to_string(rows) + ")");
    out->granularity = n == 1 ? Granularity::kTensor : Granularity::kRow;
    out->scale_out = static_cast<float*>((*scale)->untyped_data());
    out->amax_out = static_cast<float*>((*amax)->untyped_data());
    next += 2;
  }
  if (with_y) {
    auto y = rets.get<ffi::AnyBuffer>(next);
    DType t;
    if (!y.has_value() || !ToDType((*y)->element_type(), &t) || t != y_dtype ||
        static_cast<int64_t>((*y)->element_count()) != rows * cols)
      return BadArg(op, "y", "result must have the input's dtype and " + std::to_string(rows) + " x " +
                                 std::to_string(cols) + " elements");
    out->y = (*y)->untyped_data();
  }
  return ffi::Error::Success();
}

}  // namespace fr::jax_ffi
