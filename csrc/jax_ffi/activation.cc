// FFI handler of the fused GLU + FP8 quantization (glu_fp8). gate is either its own array (then up
// follows it) or one merged array (..., 2F) = [gate | up]; the scale granularity comes from the
// scale result's size.
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
                       .RemainingRets()             // scale, amax (current scaling); y when with_y
                       .Attr<int32_t>("activation") // Activation
                       .Attr<bool>("merged")
                       .Attr<bool>("static_scale")
                       .Attr<bool>("with_y"));

}  // namespace fr::jax_ffi
