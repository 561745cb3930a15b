// FFI handler of the fused norms + FP8 quantization (rms_norm_fp8, residual_rms_norm_fp8,
// layer_norm_fp8, ada_rms_norm_fp8 are one target). Optional operands follow x in a fixed order,
// present as the boolean attributes say; the scale granularity comes from the scale result's size.
#include "jax_ffi/fp8_output.h"
#include "norm/norm.h"

namespace fr::jax_ffi {
namespace {

constexpr const char* kOp = "norm_fp8";

// A per-column operand (weight, bias: float32; modulations: x's dtype) of (n, cols) with rows a
// multiple of n; returns n.
ffi::Error DecodeColumns(const ffi::AnyBuffer& b, const char* arg, bool want_f32, DType x_dtype, int64_t rows,
                         int64_t cols, int64_t* n_rows) {
  DType t;
  if (!ToDType(b.element_type(), &t) || (want_f32 ? t != DType::kF32 : t != x_dtype))
    return BadArg(kOp, arg, want_f32 ? "must be float32" : "must have x's dtype");
  const int64_t n = static_cast<int64_t>(b.element_count());
  if (n == 0 || n % cols != 0 || rows % (n / cols) != 0)
    return BadArg(kOp, arg, "must be (n, " + std::to_string(cols) + ") with n dividing the " + std::to_string(rows) +
                                " rows of x, got " + DimsString(b.dimensions()));
  *n_rows = n / cols;
  return ffi::Error::Success();
}

ffi::Error NormFp8Impl(Stream stream, ffi::AnyBuffer x, ffi::RemainingArgs args, ffi::Result<ffi::AnyBuffer> q,
                       ffi::RemainingRets rets, int32_t kind, float eps, float offset, bool has_residual,
                       bool has_weight, bool has_bias, bool has_mod, bool static_scale, bool with_y) {
  NormParams p{};
  if (!ToDType(x.element_type(), &p.x_dtype) || IsFp8(p.x_dtype))
    return BadArg(kOp, "x", "must be float32, bfloat16 or float16");
  if (x.dimensions().size() == 0) return BadArg(kOp, "x", "must have rank >= 1");
  std::tie(p.rows, p.cols) = AsMatrix(x.dimensions());
  if (auto e = CheckRows(kOp, p.x_dtype, p.rows, p.cols, "x"); e.failure()) return e;
  if (kind != static_cast<int32_t>(NormKind::kRms) && kind != static_cast<int32_t>(NormKind::kLayer))
    return BadArg(kOp, "kind", "must be 0 (RMSNorm) or 1 (LayerNorm), got " + std::to_string(kind));
  p.kind = static_cast<NormKind>(kind);
  p.eps = eps;
  p.offset = offset;
  p.x = x.untyped_data();
  const size_t n_args = has_residual + has_weight + has_bias + 2 * has_mod + static_scale;
  if (args.size() != n_args)
    return BadArg(kOp, "operands", "must be " + std::to_string(n_args + 1) + " arrays, got " +
                                       std::to_string(args.size() + 1));
  size_t next = 0;
  auto arg = [&]() { return args.get<ffi::AnyBuffer>(next++); };
  if (has_residual) {
    auto r = arg();
    if (!r.has_value() || r->element_type() != x.element_type() || r->element_count() != x.element_count())
      return BadArg(kOp, "residual", "must have x's dtype and shape");
    p.residual = r->untyped_data();
  }
  if (has_weight) {
    auto w = arg();
    if (!w.has_value()) return BadArg(kOp, "weight", "could not be decoded");
    if (auto e = DecodeColumns(*w, "weight", true, p.x_dtype, p.rows, p.cols, &p.weight_rows); e.failure()) return e;
    p.weight = static_cast<const float*>(w->untyped_data());
  }
  if (has_bias) {
    auto b = arg();
    if (!b.has_value()) return BadArg(kOp, "bias", "could not be decoded");
    if (auto e = DecodeColumns(*b, "bias", true, p.x_dtype, p.rows, p.cols, &p.bias_rows); e.failure()) return e;
    p.bias = static_cast<const float*>(b->untyped_data());
  }
  if (has_mod) {
    auto sm = arg();
    auto sh = arg();
    if (!sm.has_value() || !sh.has_value()) return BadArg(kOp, "scale_mod", "could not be decoded");
    int64_t shift_rows;
    if (auto e = DecodeColumns(*sm, "scale_mod", false, p.x_dtype, p.rows, p.cols, &p.mod_rows); e.failure()) return e;
    if (auto e = DecodeColumns(*sh, "shift_mod", false, p.x_dtype, p.rows, p.cols, &shift_rows); e.failure()) return e;
    if (shift_rows != p.mod_rows) return BadArg(kOp, "shift_mod", "must have scale_mod's shape");
    p.scale_mod = sm->untyped_data();
    p.shift_mod = sh->untyped_data();
  }
  if (static_scale) {
    auto s = arg();
    if (!s.has_value()) return BadArg(kOp, "scale", "could not be decoded");
    if (auto e = DecodeGivenScale(kOp, *s, p.rows, &p.out); e.failure()) return e;
  }
  size_t next_ret = 0;
  if (has_residual) {
    if (rets.size() < 1) return BadArg(kOp, "residual_out", "result is missing");
    auto r = rets.get<ffi::AnyBuffer>(next_ret++);
    if (!r.has_value() || (*r)->element_type() != x.element_type() || (*r)->element_count() != x.element_count())
      return BadArg(kOp, "residual_out", "result must have x's dtype and shape");
    p.residual_out = (*r)->untyped_data();
  }
  if (auto e = DecodeOutputs(kOp, *q, rets, next_ret, static_scale, with_y, p.x_dtype, p.rows, p.cols, &p.out);
      e.failure())
    return e;
#ifdef FLASHRT_CUDA
  return CudaError(kOp, cuda::NormFp8(p, stream));
#else
  cpu::NormFp8(p);
  return ffi::Error::Success();
#endif
}

}  // namespace

FLASHRT_DEFINE_HANDLER(NormFp8, NormFp8Impl,
                       .Arg<ffi::AnyBuffer>()     // x (..., W) f32 / bf16 / f16
                       .RemainingArgs()           // residual, weight, bias, scale_mod, shift_mod, scale: as flagged
                       .Ret<ffi::AnyBuffer>()     // q (..., W) f8e4m3fn / f8e5m2
                       .RemainingRets()           // residual_out; scale, amax (current) / amax (given); y: as flagged
                       .Attr<int32_t>("kind")     // NormKind
                       .Attr<float>("eps")
                       .Attr<float>("offset")     // y *= offset + weight
                       .Attr<bool>("has_residual")
                       .Attr<bool>("has_weight")
                       .Attr<bool>("has_bias")
                       .Attr<bool>("has_mod")
                       .Attr<bool>("static_scale")
                       .Attr<bool>("with_y"));

}  // namespace fr::jax_ffi
