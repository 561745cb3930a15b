"""FP8 quantization ops: fused amax + quantize (current scaling), static scaling, and a transposing
form that writes both layouts in one pass. Their backward runs the reference's VJP in XLA."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flashrt_jax import _checks, reference
from flashrt_jax.ffi import quant as raw

GRANULARITIES = ("tensor", "row")


def _quantize_impl(x, scale, dtype, granularity):
  if scale is None:
    q, s, _ = raw.quantize_current(x, dtype, granularity == "row")
    return q, s
  return raw.quantize_static(x, scale, dtype), scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _quantize(x, scale, dtype, granularity):
  return _quantize_impl(x, scale, dtype, granularity)


def _quantize_fwd(x, scale, dtype, granularity):
  return _quantize_impl(x, scale, dtype, granularity), (x, scale)


def _quantize_bwd(dtype, granularity, res, ct):
  fn = lambda x, s: reference.quantize(x, dtype=dtype, scale=s, granularity=granularity)
  return jax.vjp(fn, *res)[1](ct)


_quantize.defvjp(_quantize_fwd, _quantize_bwd)


def quantize(x, *, dtype=jnp.float8_e4m3fn, scale=None, granularity: str = "tensor"):
  """Quantizes x to FP8: q = saturate(round_nearest_even(x * (1 / scale))).

  Args:
    x: (..., K) float32, bfloat16 or float16.
    dtype: jnp.float8_e4m3fn (max 448) or jnp.float8_e5m2 (max 57344).
    scale: None for current scaling (amax of x on the device, fused with the quantize pass, no host
      sync); else a float32 scale, () or (..., 1) for one per row: static or delayed scaling.
    granularity: "tensor" (one scale) or "row" (one per row of the last axis, (..., 1)) for current
      scaling; a given scale's shape sets it.

  Returns:
    (q (..., K) dtype, scale float32) with x ≈ q.astype(f32) * scale. Current scaling uses
    scale = max(amax, 1e-12) / fp8_max, so all-zero input gives zeros and a tiny positive scale.
    NaN in x gives NaN in q; with current scaling inf (or NaN) in x makes the scale inf (or NaN),
    which flags the overflow; with a given scale, +-inf saturates to +-fp8_max.
  """
  op = "quantize"
  _checks.array(op, "x", x, _checks.FLOAT_DTYPES)
  dtype = _checks.dtype(op, "dtype", dtype, _checks.FP8_DTYPES)
  _checks.choice(op, "granularity", granularity, GRANULARITIES)
  if scale is not None:
    _checks.scale(op, "scale", scale, ((), x.shape[:-1] + (1,)))
    granularity = "row" if scale.ndim else "tensor"
  return _quantize(x, scale, dtype, granularity)


def _quantize_t_impl(x, scale, dtype):
  if scale is None:
    q, q_t, s, _ = raw.quantize_transpose_current(x, dtype)
    return q, q_t, s
  q, q_t = raw.quantize_transpose_static(x, scale, dtype)
  return q, q_t, scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _quantize_t(x, scale, dtype):
  return _quantize_t_impl(x, scale, dtype)


def _quantize_t_fwd(x, scale, dtype):
  return _quantize_t_impl(x, scale, dtype), (x, scale)


def _quantize_t_bwd(dtype, res, ct):
  fn = lambda x, s: reference.quantize_transpose(x, dtype=dtype, scale=s)
  return jax.vjp(fn, *res)[1](ct)


_quantize_t.defvjp(_quantize_t_fwd, _quantize_t_bwd)


def quantize_transpose(x, *, dtype=jnp.float8_e4m3fn, scale=None):
  """Quantizes x (M, K) per tensor and writes both layouts in one pass.

  Args:
    x: (M, K) float32, bfloat16 or float16.
    dtype: jnp.float8_e4m3fn or jnp.float8_e5m2.
    scale: None (current scaling) or a () float32 scale.

  Returns:
    (q (M, K), q_t (K, M_pad), scale ()), where M_pad is M rounded up to a multiple of 16 and
    q_t[:, M:] is zero, so q_t can be the K-contiguous operand of an FP8 GEMM that reduces over M.
  """
  op = "quantize_transpose"
  _checks.array(op, "x", x, _checks.FLOAT_DTYPES, rank=2)
  dtype = _checks.dtype(op, "dtype", dtype, _checks.FP8_DTYPES)
  if scale is not None:
    _checks.scale(op, "scale", scale, ((),))
  return _quantize_t(x, scale, dtype)


def dequantize(q, scale, dtype=jnp.bfloat16):
  """q (..., K) FP8 and scale () or (..., 1) float32 -> q * scale as dtype (float32, bfloat16 or float16).

  A plain XLA elementwise expression, so XLA fuses it into whatever consumes it.
  """
  op = "dequantize"
  _checks.array(op, "q", q, _checks.FP8_DTYPES)
  _checks.scale(op, "scale", scale, ((), q.shape[:-1] + (1,)))
  dtype = _checks.dtype(op, "dtype", dtype, _checks.FLOAT_DTYPES)
  return reference.dequantize(q, scale, dtype)
