// FFI handlers of the fused GLU + FP8 quantization (glu_fp8) and of its backward (glu_bwd_fp8,
// below). gate is either its own array (then up follows it) or one merged array (..., 2F) =
// [gate | up]; the scale granularity comes from the scale result's size.
#include <algorithm>
#include <vector>

#include "activation/glu.h"
#include "jax_ffi/fp8_output.h"

namespace fr::jax_ffi {
namespace {

constexpr const char* kOp = "glu_fp8";

ffi::Error GluFp8Impl(Stream stream, ffi::AnyBuffer gate, ffi::RemainingArgs args, ffi::Result<ffi::AnyBuffer> q,
                      ffi::RemainingRets rets, int32_t activation, bool merged, bool static_scale, bool with_y) {
  GluParams p{};
  if (!ToDType(gate.element_type(), &p.dtype) || IsFp8(p.dtype))
    return BadArg(kOp, "gate", "must be float32, bfloat16 or float16");
  if (gate.dimensions().size() == 0) return BadArg(kOp, "gate", "must have rank >= 1");
  if (activation != static_cast<int32_t>(Activation::kGeluTanh) && activation != static_cast<int32_t>(Activation::kSilu))
    return BadArg(kOp, "activation", "must be 0 (gelu_tanh) or 1 (silu), got " + std::to_string(activation));
  p.activation = static_cast<Activation>(activation);
  int64_t width;
  std::tie(p.rows, width) = AsMatrix(gate.dimensions());
  if (merged && width % 2 != 0) return BadArg(kOp, "gate", "merged [gate | up] must have an even last dimension");
  p.cols = merged ? width / 2 : width;
  if (auto e = CheckRows(kOp, p.dtype, p.rows, p.cols, "gate"); e.failure()) return e;
  const size_t n_args = (merged ? 0 : 1) + (static_scale ? 1 : 0);
  if (args.size() != n_args)
    return BadArg(kOp, "operands", "must be " + std::to_string(n_args + 1) + " arrays, got " +
                                       std::to_string(args.size() + 1));
  p.gate = gate.untyped_data();
  p.gate_stride = p.up_stride = width;
  if (merged) {
    p.up = static_cast<const char*>(p.gate) + p.cols * ByteWidth(p.dtype);
  } else {
    auto up = args.get<ffi::AnyBuffer>(0);
    if (!up.has_value() || up->element_type() != gate.element_type() || !(up->dimensions() == gate.dimensions()))
      return BadShape(kOp, "up", DimsString(gate.dimensions()) + " like gate", up.has_value() ? up->dimensions() : gate.dimensions());
    p.up = up->untyped_data();
  }
  if (static_scale) {
    auto s = args.get<ffi::AnyBuffer>(n_args - 1);
    if (!s.has_value()) return BadArg(kOp, "scale", "could not be decoded");
    if (auto e = DecodeGivenScale(kOp, *s, p.rows, &p.out); e.failure()) return e;
  }
  if (auto e = DecodeOutputs(kOp, *q, rets, 0, static_scale, with_y, p.dtype, p.rows, p.cols, &p.out); e.failure())
    return e;
#ifdef FLASHRT_CUDA
  return CudaError(kOp, cuda::GluFp8(p, stream));
#else
  cpu::GluFp8(p);
  return ffi::Error::Success();
#endif
}

}  // namespace

FLASHRT_DEFINE_HANDLER(GluFp8, GluFp8Impl,
                       .Arg<ffi::AnyBuffer>()       // gate (..., F), or [gate | up] (..., 2F) when merged
                       .RemainingArgs()             // up (..., F) unless merged; scale when static_scale
                       .Ret<ffi::AnyBuffer>()       // q (..., F) f8e4m3fn / f8e5m2
                       .RemainingRets()             // scale, amax (current) / amax (given scale); y when with_y
                       .Attr<int32_t>("activation") // Activation
                       .Attr<bool>("merged")
                       .Attr<bool>("static_scale")
                       .Attr<bool>("with_y"));

}  // namespace fr::jax_ffi

// FFI handler of the fused GLU backward + FP8 quantization (glu_bwd_fp8): [gate | up] (..., 2F) and
// dh (..., F) -> q (..., 2F) = quantize([dgate | dup] * col_scale); the scale granularity comes from
// the scale result's size.
namespace fr::jax_ffi {
namespace {

constexpr const char* kBwdOp = "glu_bwd_fp8";

ffi::Error GluBwdFp8Impl(Stream stream, ffi::AnyBuffer gate_up, ffi::AnyBuffer dh, ffi::RemainingArgs args,
                         ffi::Result<ffi::AnyBuffer> q, ffi::RemainingRets rets, int32_t activation,
                         bool has_col_scale, bool static_scale, bool with_y) {
  GluBwdParams p{};
  if (!ToDType(gate_up.element_type(), &p.dtype) || IsFp8(p.dtype))
    return BadArg(kBwdOp, "gate_up", "must be float32, bfloat16 or float16");
  if (gate_up.dimensions().size() == 0) return BadArg(kBwdOp, "gate_up", "must have rank >= 1");
  if (activation != static_cast<int32_t>(Activation::kGeluTanh) && activation != static_cast<int32_t>(Activation::kSilu))
    return BadArg(kBwdOp, "activation", "must be 0 (gelu_tanh) or 1 (silu), got " + std::to_string(activation));
  p.activation = static_cast<Activation>(activation);
  int64_t width;
  std::tie(p.rows, width) = AsMatrix(gate_up.dimensions());
  if (width % 2 != 0) return BadArg(kBwdOp, "gate_up", "[gate | up] must have an even last dimension");
  p.cols = width / 2;
  if (p.rows * p.cols == 0) return BadArg(kBwdOp, "gate_up", "must be a non-empty array");
  if (!RowFits(p.dtype, p.cols))
    return BadArg(kBwdOp, "gate_up", "gate and up must hold at most " + std::to_string(kMaxRowWidth) +
                                          " elements a row (" + std::to_string(kMaxRowWidthUnaligned) +
                                          " where that is not a whole number of 16-byte vectors), got " +
                                          std::to_string(p.cols));
  auto dims = gate_up.dimensions();
  std::vector<int64_t> dh_dims(dims.begin(), dims.end());
  dh_dims.back() = p.cols;
  if (dh.element_type() != gate_up.element_type() || dh.dimensions().size() != dh_dims.size() ||
      !std::equal(dh_dims.begin(), dh_dims.end(), dh.dimensions().begin()))
    return BadArg(kBwdOp, "dh", "must have gate_up's dtype and shape with the last dimension halved");
  const size_t n_args = (has_col_scale ? 1 : 0) + (static_scale ? 1 : 0);
  if (args.size() != n_args)
    return BadArg(kBwdOp, "operands", "must be " + std::to_string(n_args + 2) + " arrays, got " +
                                          std::to_string(args.size() + 2));
  p.gate = gate_up.untyped_data();
  p.up = static_cast<const char*>(p.gate) + p.cols * ByteWidth(p.dtype);
  p.dh = dh.untyped_data();
  p.gate_stride = p.up_stride = width;
  p.dh_stride = p.cols;
  if (has_col_scale) {
    auto cs = args.get<ffi::AnyBuffer>(0);
    const int64_t n = cs.has_value() ? static_cast<int64_t>(cs->element_count()) : 0;
    if (!cs.has_value() || cs->element_type() != ffi::DataType::F32 || n == 0 || n % width != 0 ||
        p.rows % (n / width) != 0)
      return BadArg(kBwdOp, "col_scale", "must be float32 with " + std::to_string(width) +
                                             " values, or that many for each of a number of groups of rows "
                                             "dividing " + std::to_string(p.rows) + ", got " + std::to_string(n));
    p.col_scale = static_cast<const float*>(cs->untyped_data());
    p.col_scale_count = n / width;
  }
  if (static_scale) {
    auto s = args.get<ffi::AnyBuffer>(n_args - 1);
    if (!s.has_value()) return BadArg(kBwdOp, "scale", "could not be decoded");
    if (auto e = DecodeGivenScale(kBwdOp, *s, p.rows, &p.out); e.failure()) return e;
  }
  if (auto e = DecodeOutputs(kBwdOp, *q, rets, 0, static_scale, with_y, p.dtype, p.rows, width, &p.out);
      e.failure())
    return e;
#ifdef FLASHRT_CUDA
  return CudaError(kBwdOp, cuda::GluBwdFp8(p, stream));
#else
  cpu::GluBwdFp8(p);
  return ffi::Error::Success();
#endif
}

}  // namespace

FLASHRT_DEFINE_HANDLER(GluBwdFp8, GluBwdFp8Impl,
                       .Arg<ffi::AnyBuffer>()          // [gate | up] (..., 2F)
                       .Arg<ffi::AnyBuffer>()          // dh (..., F)
                       .RemainingArgs()                // col_scale (2F,) when has_col_scale; scale when static_scale
                       .Ret<ffi::AnyBuffer>()          // q (..., 2F) f8e5m2 / f8e4m3fn
                       .RemainingRets()                // scale, amax (current) / amax (given scale); y when with_y
                       .Attr<int32_t>("activation")    // Activation
                       .Attr<bool>("has_col_scale")
                       .Attr<bool>("static_scale")
                       .Attr<bool>("with_y"));

}  // namespace fr::jax_ffi
