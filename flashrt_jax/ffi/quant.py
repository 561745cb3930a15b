"""Raw FFI calls for FP8 quantization. Callers validate; these only build the custom calls."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def padded_rows(rows: int) -> int:
  """Rows of a transposed FP8 operand, rounded up to 16 so it can be a cuBLASLt K dimension."""
  return -(-rows // 16) * 16


def _scale_shape(x, rowwise: bool):
  return x.shape[:-1] + (1,) if rowwise else ()


def quantize_current(x, dtype, rowwise: bool):
  """x (..., K) -> q (..., K) dtype, scale and amax: () or (..., 1) float32."""
  s = jax.ShapeDtypeStruct(_scale_shape(x, rowwise), jnp.float32)
  # Rows are independent, so a vmapped row-wise call is one call over more rows; a per-tensor
  # scale is per vmapped tensor, so that one runs per batch element.
  call = jax.ffi.ffi_call(
      "flashrt_quantize_current", (jax.ShapeDtypeStruct(x.shape, dtype), s, s),
      vmap_method="broadcast_all" if rowwise else "sequential")
  return call(x)


def quantize_static(x, scale, dtype):
  """x (..., K), scale () or (..., 1) float32 -> q (..., K) dtype and the amax of x, shaped like scale
  (of the tensor, or per row)."""
  rowwise = scale.ndim > 0
  results = (jax.ShapeDtypeStruct(x.shape, dtype), jax.ShapeDtypeStruct(scale.shape, jnp.float32))
  call = jax.ffi.ffi_call("flashrt_quantize_static", results,
                          vmap_method="broadcast_all" if rowwise else "sequential")
  return call(x, scale)


def quantize_transpose_current(x, dtype):
  """x (M, K) -> q (M, K), q_t (K, M padded to 16, zeros), scale (), amax ()."""
  m, k = x.shape
  s = jax.ShapeDtypeStruct((), jnp.float32)
  call = jax.ffi.ffi_call(
      "flashrt_quantize_transpose_current",
      (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((k, padded_rows(m)), dtype), s, s),
      vmap_method="sequential")
  return call(x)


def quantize_transpose_static(x, scale, dtype):
  """x (M, K), scale () -> q (M, K), q_t (K, M padded to 16, zeros), amax ()."""
  m, k = x.shape
  call = jax.ffi.ffi_call(
      "flashrt_quantize_transpose_static",
      (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((k, padded_rows(m)), dtype),
       jax.ShapeDtypeStruct((), jnp.float32)),
      vmap_method="sequential")
  return call(x, scale)


