// FFI handlers for the FP8 GEMM: out (..., N) = (a (..., K) * a_scale) @ (b (N, K) * b_scale)^T [+ bias].
#include "gemm/fp8_gemm.h"
#include "jax_ffi/checks.h"

namespace fr::jax_ffi {
namespace {

constexpr const char* kOp = "fp8_gemm";

ffi::Error Fp8GemmImpl(Stream stream, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer a_scale,
                       ffi::AnyBuffer b_scale, const ffi::AnyBuffer* bias, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::AnyBuffer> workspace, bool fast_accum) {
  Fp8GemmParams p{};
  if (!ToDType(a.element_type(), &p.a_dtype) || !IsFp8(p.a_dtype))
    return BadArg(kOp, "a", "must be float8_e4m3fn or float8_e5m2");
  if (!ToDType(b.element_type(), &p.b_dtype) || !IsFp8(p.b_dtype))
    return BadArg(kOp, "b", "must be float8_e4m3fn or float8_e5m2");
  if (p.a_dtype == DType::kE5M2 && p.b_dtype == DType::kE5M2)
    return BadArg(kOp, "a", "and b cannot both be float8_e5m2 (unsupported by FP8 tensor cores)");
  if (!ToDType(out->element_type(), &p.out_dtype) || (p.out_dtype != DType::kBF16 && p.out_dtype != DType::kF32))
    return BadArg(kOp, "out", "must be bfloat16 or float32");
  std::tie(p.m, p.k) = AsMatrix(a.dimensions());
  auto b_dims = b.dimensions();
  if (a.dimensions().size() < 1 || b_dims.size() != 2 || b_dims[1] != p.k)
    return BadShape(kOp, "b", "(N, " + std::to_string(p.k) + ")", b_dims);
  p.n = b_dims[0];
  if (p.m * p.k * p.n == 0) return BadArg(kOp, "a", "and b must be non-empty");
  if (out->element_count() != p.m * p.n)
    return BadArg(kOp, "out", "must hold " + std::to_string(p.m * p.n) + " values");
  if (a_scale.element_type() != ffi::DataType::F32 || b_scale.element_type() != ffi::DataType::F32)
    return BadArg(kOp, "a_scale", "and b_scale must be float32");
  if (a_scale.element_count() == 1 && b_scale.element_count() == 1) {
    p.vector_scales = false;
  } else if (a_scale.element_count() == p.m && b_scale.element_count() == p.n) {
    p.vector_scales = true;
  } else {
    return BadArg(kOp, "a_scale", "and b_scale must both be scalars or hold M = " + std::to_string(p.m) +
                                      " and N = " + std::to_string(p.n) + " values");
  }
  if (bias != nullptr) {
    if (bias->element_type() != out->element_type() || bias->element_count() != p.n)
      return BadArg(kOp, "bias", "must be (N,) = (" + std::to_string(p.n) + ",) of the output dtype");
    p.bias = bias->untyped_data();
  }
  p.a = a.untyped_data();
  p.b = b.untyped_data();
  p.a_scale = static_cast<const float*>(a_scale.untyped_data());
  p.b_scale = static_cast<const float*>(b_scale.untyped_data());
  p.out = out->untyped_data();
  p.workspace = workspace->untyped_data();
  p.workspace_bytes = workspace->size_bytes();
  p.fast_accum = fast_accum;
#ifdef FLASHRT_CUDA
  if (p.k % 16 != 0 || p.n % 16 != 0)
    return BadArg(kOp, "b", "must have N and K divisible by 16 for cuBLASLt FP8");
  if (std::string err = cuda::Fp8Gemm(p, stream); !err.empty()) return ffi::Error::Internal("fp8_gemm: " + err);
  return CudaError(kOp, cudaGetLastError());
#else
  cpu::Fp8Gemm(p);
  return ffi::Error::Success();
#endif
}

ffi::Error Fp8GemmNoBias(Stream stream, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer a_scale,
                         ffi::AnyBuffer b_scale, ffi::Result<ffi::AnyBuffer> out,
                         ffi::Result<ffi::AnyBuffer> workspace, bool fast_accum) {
  return Fp8GemmImpl(stream, a, b, a_scale, b_scale, nullptr, out, workspace, fast_accum);
}

ffi::Error Fp8GemmWithBias(Stream stream, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer a_scale,
                           ffi::AnyBuffer b_scale, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> out,
                           ffi::Result<ffi::AnyBuffer> workspace, bool fast_accum) {
  return Fp8GemmImpl(stream, a, b, a_scale, b_scale, &bias, out, workspace, fast_accum);
}

}  // namespace

FLASHRT_DEFINE_HANDLER(Fp8Gemm, Fp8GemmNoBias,
                       .Arg<ffi::AnyBuffer>()  // a (..., K) f8e4m3fn / f8e5m2
                       .Arg<ffi::AnyBuffer>()  // b (N, K) f8e4m3fn / f8e5m2, contiguous along K
                       .Arg<ffi::AnyBuffer>()  // a_scale () or (M,) f32
                       .Arg<ffi::AnyBuffer>()  // b_scale () or (N,) f32
                       .Ret<ffi::AnyBuffer>()  // out (..., N) bf16 / f32
                       .Ret<ffi::AnyBuffer>()  // workspace (u8)
                       .Attr<bool>("fast_accum"));

FLASHRT_DEFINE_HANDLER(Fp8GemmBias, Fp8GemmWithBias,
                       .Arg<ffi::AnyBuffer>()  // a (..., K)
                       .Arg<ffi::AnyBuffer>()  // b (N, K)
                       .Arg<ffi::AnyBuffer>()  // a_scale () or (M,) f32
                       .Arg<ffi::AnyBuffer>()  // b_scale () or (N,) f32
                       .Arg<ffi::AnyBuffer>()  // bias (N,) of the output dtype
                       .Ret<ffi::AnyBuffer>()  // out (..., N)
                       .Ret<ffi::AnyBuffer>()  // workspace (u8)
                       .Attr<bool>("fast_accum"));

}  // namespace fr::jax_ffi
