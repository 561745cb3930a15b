// FFI handlers for FP8 quantization. The FP8 format comes from the q result's dtype and the
// granularity from the scale's size (1: per tensor; one per row of x viewed as (rows, last dim)).
#include "jax_ffi/checks.h"
#include "quant/quantize.h"

namespace fr::jax_ffi {
namespace {

ffi::Error RunQuantize(Stream stream, const QuantizeParams& p) {
#ifdef FLASHRT_CUDA
  return CudaError("quantize", cuda::Quantize(p, stream));
#else
  cpu::Quantize(p);
  return ffi::Error::Success();
#endif
}

// Fills the parts of QuantizeParams common to every variant and checks them.
ffi::Error Prepare(const char* op, const ffi::AnyBuffer& x, const ffi::AnyBuffer& q, int64_t n_scales,
                   QuantizeParams* p) {
  if (!ToDType(x.element_type(), &p->x_dtype) || IsFp8(p->x_dtype))
    return BadArg(op, "x", "must be float32, bfloat16 or float16");
  if (!ToDType(q.element_type(), &p->q_dtype) || !IsFp8(p->q_dtype))
    return BadArg(op, "q", "must be float8_e4m3fn or float8_e5m2");
  std::tie(p->rows, p->cols) = AsMatrix(x.dimensions());
  if (x.dimensions().size() == 0 || p->rows * p->cols == 0) return BadArg(op, "x", "must be a non-empty array");
  if (q.element_count() != x.element_count()) return BadShape(op, "q", DimsString(x.dimensions()), q.dimensions());
  if (n_scales == 1) {
    p->granularity = Granularity::kTensor;
  } else if (n_scales == p->rows) {
    p->granularity = Granularity::kRow;
  } else {
    return BadArg(op, "scale", "must hold 1 value or one per row (" + std::to_string(p->rows) + "), got " +
                                   std::to_string(n_scales));
  }
  p->x = x.untyped_data();
  p->q = q.untyped_data();
  return ffi::Error::Success();
}

ffi::Error CheckScale(const char* op, const ffi::AnyBuffer& s, const char* arg) {
  if (s.element_type() != ffi::DataType::F32) return BadArg(op, arg, "must be float32");
  return ffi::Error::Success();
}

// A given scale's amax result: float32, one value per scale value.
ffi::Error SetGivenScale(const char* op, const ffi::AnyBuffer& scale, const ffi::AnyBuffer& amax, QuantizeParams* p) {
  if (auto e = CheckScale(op, scale, "scale"); e.failure()) return e;
  if (amax.element_type() != ffi::DataType::F32 || amax.element_count() != scale.element_count())
    return BadArg(op, "amax", "result must be float32 shaped like scale");
  p->scale_in = static_cast<const float*>(scale.untyped_data());
  p->amax_out = static_cast<float*>(amax.untyped_data());
  return ffi::Error::Success();
}

ffi::Error CheckTransposed(const char* op, const QuantizeParams& p, const ffi::AnyBuffer& q_t) {
  if (p.granularity != Granularity::kTensor) return BadArg(op, "scale", "must be per tensor for a transposed output");
  auto dims = q_t.dimensions();
  DType q_t_dtype;
  if (!ToDType(q_t.element_type(), &q_t_dtype) || q_t_dtype != p.q_dtype)
    return BadArg(op, "q_t", "must have the dtype of q");
  if (dims.size() != 2 || dims[0] != p.cols || dims[1] < p.rows)
    return BadShape(op, "q_t", "(" + std::to_string(p.cols) + ", >= " + std::to_string(p.rows) + ")", dims);
  return ffi::Error::Success();
}

ffi::Error QuantizeCurrentImpl(Stream stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                               ffi::Result<ffi::AnyBuffer> scale, ffi::Result<ffi::AnyBuffer> amax) {
  QuantizeParams p{};
  if (auto e = Prepare("quantize", x, *q, scale->element_count(), &p); e.failure()) return e;
  if (auto e = CheckScale("quantize", *scale, "scale"); e.failure()) return e;
  if (amax->element_count() != scale->element_count()) return BadArg("quantize", "amax", "must match scale");
  p.scale_out = static_cast<float*>(scale->untyped_data());
  p.amax_out = static_cast<float*>(amax->untyped_data());
  return RunQuantize(stream, p);
}

ffi::Error QuantizeStaticImpl(Stream stream, ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::Result<ffi::AnyBuffer> q,
                              ffi::Result<ffi::AnyBuffer> amax) {
  QuantizeParams p{};
  if (auto e = Prepare("quantize", x, *q, scale.element_count(), &p); e.failure()) return e;
  if (auto e = SetGivenScale("quantize", scale, *amax, &p); e.failure()) return e;
  return RunQuantize(stream, p);
}

ffi::Error QuantizeTransposeCurrentImpl(Stream stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                                        ffi::Result<ffi::AnyBuffer> q_t, ffi::Result<ffi::AnyBuffer> scale,
                                        ffi::Result<ffi::AnyBuffer> amax) {
  QuantizeParams p{};
  if (auto e = Prepare("quantize_transpose", x, *q, scale->element_count(), &p); e.failure()) return e;
  if (auto e = CheckTransposed("quantize_transpose", p, *q_t); e.failure()) return e;
  if (auto e = CheckScale("quantize_transpose", *scale, "scale"); e.failure()) return e;
  p.q_t = q_t->untyped_data();
  p.rows_padded = q_t->dimensions()[1];
  p.scale_out = static_cast<float*>(scale->untyped_data());
  p.amax_out = static_cast<float*>(amax->untyped_data());
  return RunQuantize(stream, p);
}

ffi::Error QuantizeTransposeStaticImpl(Stream stream, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                                       ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::AnyBuffer> q_t,
                                       ffi::Result<ffi::AnyBuffer> amax) {
  QuantizeParams p{};
  if (auto e = Prepare("quantize_transpose", x, *q, scale.element_count(), &p); e.failure()) return e;
  if (auto e = CheckTransposed("quantize_transpose", p, *q_t); e.failure()) return e;
  if (auto e = SetGivenScale("quantize_transpose", scale, *amax, &p); e.failure()) return e;
  p.q_t = q_t->untyped_data();
  p.rows_padded = q_t->dimensions()[1];
  return RunQuantize(stream, p);
}

}  // namespace

FLASHRT_DEFINE_HANDLER(QuantizeCurrent, QuantizeCurrentImpl,
                       .Arg<ffi::AnyBuffer>()    // x (..., K) f32 / bf16 / f16
                       .Ret<ffi::AnyBuffer>()    // q (..., K) f8e4m3fn / f8e5m2
                       .Ret<ffi::AnyBuffer>()    // scale () or (..., 1) f32
                       .Ret<ffi::AnyBuffer>());  // amax, shaped like scale

FLASHRT_DEFINE_HANDLER(QuantizeStatic, QuantizeStaticImpl,
                       .Arg<ffi::AnyBuffer>()    // x (..., K)
                       .Arg<ffi::AnyBuffer>()    // scale () or (..., 1) f32
                       .Ret<ffi::AnyBuffer>()    // q (..., K)
                       .Ret<ffi::AnyBuffer>());  // amax of x, shaped like scale

FLASHRT_DEFINE_HANDLER(QuantizeTransposeCurrent, QuantizeTransposeCurrentImpl,
                       .Arg<ffi::AnyBuffer>()    // x (M, K)
                       .Ret<ffi::AnyBuffer>()    // q (M, K)
                       .Ret<ffi::AnyBuffer>()    // q_t (K, M rounded up to 16), zero padded
                       .Ret<ffi::AnyBuffer>()    // scale () f32
                       .Ret<ffi::AnyBuffer>());  // amax () f32

FLASHRT_DEFINE_HANDLER(QuantizeTransposeStatic, QuantizeTransposeStaticImpl,
                       .Arg<ffi::AnyBuffer>()    // x (M, K)
                       .Arg<ffi::AnyBuffer>()    // scale () f32
                       .Ret<ffi::AnyBuffer>()    // q (M, K)
                       .Ret<ffi::AnyBuffer>()    // q_t (K, M rounded up to 16)
                       .Ret<ffi::AnyBuffer>());  // amax () f32

}  // namespace fr::jax_ffi
