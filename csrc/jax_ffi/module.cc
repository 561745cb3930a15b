// The Python module (flashrt_jax._cpu or flashrt_jax._cuda, from the same source): the table of FFI
// targets for its platform and the FFI API version it was compiled against.
#include <nanobind/nanobind.h>

#include <type_traits>

#include "attention/attention.h"
#include "gemm/fp8_gemm.h"
#include "jax_ffi/checks.h"

namespace nb = nanobind;

#define FLASHRT_DECLARE(name) extern "C" XLA_FFI_Error* FLASHRT_HANDLER_NAME(name)(XLA_FFI_CallFrame*);
FLASHRT_DECLARE(QuantizeCurrent)
FLASHRT_DECLARE(QuantizeStatic)
FLASHRT_DECLARE(QuantizeTransposeCurrent)
FLASHRT_DECLARE(QuantizeTransposeStatic)
FLASHRT_DECLARE(Fp8Gemm)
FLASHRT_DECLARE(Fp8GemmBias)
FLASHRT_DECLARE(AttentionFwd)
FLASHRT_DECLARE(AttentionBwd)
FLASHRT_DECLARE(NormFp8)
FLASHRT_DECLARE(GluFp8)
FLASHRT_DECLARE(GluBwdFp8)

namespace {

template <typename F>
nb::capsule Capsule(F* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, F, XLA_FFI_CallFrame*>, "not an XLA FFI handler");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(FLASHRT_MODULE_NAME, m) {
  m.def("registrations", []() {
    nb::dict targets;
    targets["flashrt_quantize_current"] = Capsule(FLASHRT_HANDLER_NAME(QuantizeCurrent));
    targets["flashrt_quantize_static"] = Capsule(FLASHRT_HANDLER_NAME(QuantizeStatic));
    targets["flashrt_quantize_transpose_current"] = Capsule(FLASHRT_HANDLER_NAME(QuantizeTransposeCurrent));
    targets["flashrt_quantize_transpose_static"] = Capsule(FLASHRT_HANDLER_NAME(QuantizeTransposeStatic));
    targets["flashrt_fp8_gemm"] = Capsule(FLASHRT_HANDLER_NAME(Fp8Gemm));
    targets["flashrt_fp8_gemm_bias"] = Capsule(FLASHRT_HANDLER_NAME(Fp8GemmBias));
    targets["flashrt_attention_fwd"] = Capsule(FLASHRT_HANDLER_NAME(AttentionFwd));
    targets["flashrt_attention_bwd"] = Capsule(FLASHRT_HANDLER_NAME(AttentionBwd));
    targets["flashrt_norm_fp8"] = Capsule(FLASHRT_HANDLER_NAME(NormFp8));
    targets["flashrt_glu_fp8"] = Capsule(FLASHRT_HANDLER_NAME(GluFp8));
    targets["flashrt_glu_bwd_fp8"] = Capsule(FLASHRT_HANDLER_NAME(GluBwdFp8));
    return targets;
  });
  m.attr("ffi_api_version") = nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  m.attr("gemm_workspace_bytes") = fr::kGemmWorkspaceBytes;
  // Bytes of the workspace result of flashrt_attention_bwd for the CUDA kernels (attention.h).
  m.def("attention_bwd_workspace_bytes", &fr::AttentionBackwardWorkspaceBytes, nb::arg("batch"), nb::arg("tq"),
        nb::arg("tk"), nb::arg("hq"), nb::arg("hkv"), nb::arg("head_dim"));
}
