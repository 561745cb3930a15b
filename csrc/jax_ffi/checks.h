// Shared pieces of the FFI handlers: dtype mapping, error messages, and the one place where the CPU
// and CUDA builds of a handler differ (the CUDA one binds XLA's stream and is command-buffer safe).
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "common/dtypes.h"
#ifdef FLASHRT_CUDA
#include <cuda_runtime.h>
#endif
#include "xla/ffi/api/ffi.h"

namespace fr::jax_ffi {

namespace ffi = xla::ffi;

inline bool ToDType(ffi::DataType t, DType* out) {
  switch (t) {
    case ffi::DataType::F32: *out = DType::kF32; return true;
    case ffi::DataType::BF16: *out = DType::kBF16; return true;
    case ffi::DataType::F16: *out = DType::kF16; return true;
    case ffi::DataType::F8E4M3FN: *out = DType::kE4M3; return true;
    case ffi::DataType::F8E5M2: *out = DType::kE5M2; return true;
    default: return false;
  }
}

template <typename Dims>
std::string DimsString(const Dims& dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + (dims.size() == 1 ? ",)" : ")");
}

inline ffi::Error BadArg(const char* op, const char* arg, const std::string& what) {
  return ffi::Error::InvalidArgument(std::string(op) + ": " + arg + " " + what);
}

template <typename Dims>
ffi::Error BadShape(const char* op, const char* arg, const std::string& expected, const Dims& got) {
  return BadArg(op, arg, "must have shape " + expected + ", got " + DimsString(got));
}

// Product of all dimensions but the last (rows) and the last (cols) of an array viewed as a matrix.
template <typename Dims>
std::pair<int64_t, int64_t> AsMatrix(const Dims& dims) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
  return {rows, dims.size() ? dims[dims.size() - 1] : 1};
}

#ifdef FLASHRT_CUDA
using Stream = cudaStream_t;

inline ffi::Error CudaError(const char* op, cudaError_t err) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(op) + ": CUDA error: " + cudaGetErrorString(err));
}

// Handler symbols carry the platform in their name: both modules live in one process.
#define FLASHRT_HANDLER_NAME(name) name##Cuda
#define FLASHRT_DEFINE_HANDLER(name, impl, binding)                                                      \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(FLASHRT_HANDLER_NAME(name), impl, ::xla::ffi::Ffi::Bind().Ctx<::xla::ffi::PlatformStream<cudaStream_t>>() \
                                                  binding,                                               \
                                {::xla::ffi::Traits::kCmdBufferCompatible})
#else
struct Stream {};  // the CPU handlers run synchronously on XLA's thread

// Adapts `ffi::Error impl(Stream, Args...)` to the stream-less CPU binding.
template <typename F, F f>
struct WithoutStream;
template <typename... Args, ffi::Error (*f)(Stream, Args...)>
struct WithoutStream<ffi::Error (*)(Stream, Args...), f> {
  static ffi::Error Call(Args... args) { return f(Stream{}, std::move(args)...); }
};

#define FLASHRT_HANDLER_NAME(name) name##Cpu
#define FLASHRT_DEFINE_HANDLER(name, impl, binding) \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(FLASHRT_HANDLER_NAME(name), (::fr::jax_ffi::WithoutStream<decltype(&impl), &impl>::Call), \
                                ::xla::ffi::Ffi::Bind() binding)
#endif

}  // namespace fr::jax_ffi
