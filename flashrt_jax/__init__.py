"""flashrt_jax: FP8 GEMM, fused FP8 quantization and attention CUDA kernels for JAX.

Every op is an XLA FFI custom call registered for CPU (C++ reference kernels) and CUDA, wrapped with
`jax.custom_vjp`, so it works under jit, grad, vmap, scan and remat.
"""

from flashrt_jax import reference
from flashrt_jax.ffi import cuda_available
from flashrt_jax.ops.attention import attention, make_attention_mask_ids, openpi_attention
from flashrt_jax.ops.gemm import Fp8Activation, Fp8Recipe, Fp8Weight, fp8_dense, fp8_gemm, takes_fp8_path
from flashrt_jax.ops.quant import dequantize, quantize, quantize_transpose
from flashrt_jax.reference import DelayedScaling, delayed_scaling, update_delayed_scaling
from flashrt_jax.ops.fused import (ada_rms_norm_fp8, glu_bwd_fp8, glu_fp8, layer_norm_fp8, residual_rms_norm_fp8,
                                   rms_norm_fp8)
from flashrt_jax.ops.fused_dense import (fp8_gate_up_weight, fp8_glu_ffn, glu_dense, residual_rms_norm_dense,
                                         rms_norm_dense)
from flashrt_jax import convert, linen, nnx  # noqa: E402  (they build on the ops above)
from flashrt_jax.convert import Layout, dequantize_params, quantize_params
from flashrt_jax.linen import Fp8DotGeneral, fp8_dot_general

__version__ = "0.1.0"

__all__ = [
    "Fp8DotGeneral",
    "Layout",
    "convert",
    "dequantize_params",
    "fp8_dot_general",
    "linen",
    "nnx",
    "quantize_params",
    "Fp8Activation",
    "Fp8Recipe",
    "Fp8Weight",
    "attention",
    "cuda_available",
    "dequantize",
    "fp8_dense",
    "fp8_gemm",
    "make_attention_mask_ids",
    "openpi_attention",
    "quantize",
    "quantize_transpose",
    "DelayedScaling",
    "delayed_scaling",
    "update_delayed_scaling",
    "ada_rms_norm_fp8",
    "glu_bwd_fp8",
    "glu_fp8",
    "layer_norm_fp8",
    "residual_rms_norm_fp8",
    "rms_norm_fp8",
    "fp8_gate_up_weight",
    "fp8_glu_ffn",
    "glu_dense",
    "residual_rms_norm_dense",
    "rms_norm_dense",
    "reference",
    "takes_fp8_path",
]
