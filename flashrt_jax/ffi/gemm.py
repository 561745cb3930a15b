"""Raw FFI call for the FP8 GEMM. Callers validate; this only builds the custom call."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flashrt_jax import ffi as _ffi

_CPU_WORKSPACE_BYTES = 16  # the CPU handler needs none; XLA still wants a buffer


def fp8_gemm(a, b, a_scale, b_scale, bias, out_dtype, fast_accum: bool):
  """a (M, K), b (N, K) FP8; scales () or (M,) and (N,) float32; bias (N,) out_dtype or None -> (M, N)."""
  m, n = a.shape[0], b.shape[0]
  args = (a, b, a_scale, b_scale) + (() if bias is None else (bias,))
  target = "flashrt_fp8_gemm" if bias is None else "flashrt_fp8_gemm_bias"

  def call(workspace_bytes):
    def run(*operands):
      out, _ = jax.ffi.ffi_call(
          target,
          (jax.ShapeDtypeStruct((m, n), out_dtype), jax.ShapeDtypeStruct((workspace_bytes,), jnp.uint8)),
          vmap_method="sequential",
      )(*operands, fast_accum=np.bool_(fast_accum))  # attributes are exact-typed: a numpy bool, not a Python one
      return out
    return run

  return jax.lax.platform_dependent(*args, cpu=call(_CPU_WORKSPACE_BYTES), default=call(_ffi.GEMM_WORKSPACE_BYTES))
