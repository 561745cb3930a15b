"""FP8 quantization ops: fused amax + quantize (current scaling), static and delayed scaling, and a
transposing form that writes both layouts in one pass. Their backward runs the reference's VJP in XLA.

Delayed scaling: an op given a `DelayedScaling` state as its `scale` quantizes per tensor with
state.scale, and the kernel reduces the amax of what it quantizes in the same pass; the op returns the
next state (`reference.update_delayed_scaling`) as its last output."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flashrt_jax import _checks, reference
from flashrt_jax.ffi import quant as raw
from flashrt_jax.reference import DelayedScaling

GRANULARITIES = ("tensor", "row")


def scale_argument(op: str, scale, granularity, row_scale_shape=None):
  """An op's `scale` as (scale array or None, DelayedScaling or None, granularity): a given array
  sets the granularity by its shape (() or row_scale_shape); a state is per tensor and takes no
  gradient."""
  if isinstance(scale, DelayedScaling):
    _checks.delayed_scaling(op, "scale", scale, granularity)
    state = jax.tree_util.tree_map(jax.lax.stop_gradient, scale)
    return state.scale, state, "tensor"
  if scale is not None:
    _checks.scale(op, "scale", scale, ((),) if row_scale_shape is None else ((), row_scale_shape))
    granularity = "row" if scale.ndim else "tensor"
  return scale, None, granularity


def with_next_state(out, state, dtype):
  """An op's outputs less the amax its kernel returns last; with a state, then the next state."""
  *out, amax = out
  if state is None:
    return tuple(out)
  return (*out, reference.update_delayed_scaling(state, jax.lax.stop_gradient(amax), dtype))


def _quantize_impl(x, scale, dtype, granularity):
  if scale is None:
    return raw.quantize_current(x, dtype, granularity == "row")
  q, amax = raw.quantize_static(x, scale, dtype)
  return q, scale, amax


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _quantize(x, scale, dtype, granularity):
  return _quantize_impl(x, scale, dtype, granularity)


def _quantize_fwd(x, scale, dtype, granularity):
  return _quantize_impl(x, scale, dtype, granularity), (x, scale)


def _quantize_bwd(dtype, granularity, res, ct):
  fn = lambda x, s: reference.quantize(x, dtype=dtype, scale=s, granularity=granularity)
  return jax.vjp(fn, *res)[1](ct[:2])  # the amax only feeds a delayed-scaling state


_quantize.defvjp(_quantize_fwd, _quantize_bwd)


def quantize(x, *, dtype=jnp.float8_e4m3fn, scale=None, granularity: str = "tensor"):
  """Quantizes x to FP8: q = saturate(round_nearest_even(x * (1 / scale))).

  Args:
    x: (..., K) float32, bfloat16 or float16.
    dtype: jnp.float8_e4m3fn (max 448) or jnp.float8_e5m2 (max 57344).
    scale: None for current scaling (amax of x on the device, fused with the quantize pass, no host
      sync); a float32 scale, () or (..., 1) for one per row (static scaling); or a DelayedScaling
      state (`delayed_scaling()`): quantizes per tensor with state.scale.
    granularity: "tensor" (one scale) or "row" (one per row of the last axis, (..., 1)) for current
      scaling; a given scale's shape sets it; "row" cannot take a DelayedScaling.

  Returns:
    (q (..., K) dtype, scale float32) with x ≈ q.astype(f32) * scale; with a DelayedScaling,
    (q, scale (), next_state), next_state recording max |x| (reduced in the quantize pass; NaN if x
    holds a NaN, inf if an inf). Current scaling uses scale = max(amax, 1e-12) / fp8_max, so
    all-zero input gives zeros and a tiny positive scale. NaN in x gives NaN in q; with current
    scaling inf (or NaN) in x makes the scale inf (or NaN), which flags the overflow; with a given
    scale, +-inf saturates to +-fp8_max.
  """
  op = "quantize"
  _checks.array(op, "x", x, _checks.FLOAT_DTYPES)
  dtype = _checks.dtype(op, "dtype", dtype, _checks.FP8_DTYPES)
  _checks.choice(op, "granularity", granularity, GRANULARITIES)
  scale, state, granularity = scale_argument(op, scale, granularity, x.shape[:-1] + (1,))
  return with_next_state(_quantize(x, scale, dtype, granularity), state, dtype)


def _quantize_t_impl(x, scale, dtype):
  if scale is None:
    return raw.quantize_transpose_current(x, dtype)
  q, q_t, amax = raw.quantize_transpose_static(x, scale, dtype)
  return q, q_t, scale, amax


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _quantize_t(x, scale, dtype):
  return _quantize_t_impl(x, scale, dtype)


def _quantize_t_fwd(x, scale, dtype):
  return _quantize_t_impl(x, scale, dtype), (x, scale)


def _quantize_t_bwd(dtype, res, ct):
  fn = lambda x, s: reference.quantize_transpose(x, dtype=dtype, scale=s)
  return jax.vjp(fn, *res)[1](ct[:3])


_quantize_t.defvjp(_quantize_t_fwd, _quantize_t_bwd)


def quantize_transpose(x, *, dtype=jnp.float8_e4m3fn, scale=None):
  """Quantizes x (M, K) per tensor and writes both layouts in one pass.

  Args:
    x: (M, K) float32, bfloat16 or float16.
    dtype: jnp.float8_e4m3fn or jnp.float8_e5m2.
    scale: None (current scaling), a () float32 scale or a DelayedScaling state, as for quantize.

  Returns:
    (q (M, K), q_t (K, M_pad), scale ()), where M_pad is M rounded up to a multiple of 16 and
    q_t[:, M:] is zero, so q_t can be the K-contiguous operand of an FP8 GEMM that reduces over M;
    with a DelayedScaling, (q, q_t, scale, next_state).
  """
  op = "quantize_transpose"
  _checks.array(op, "x", x, _checks.FLOAT_DTYPES, rank=2)
  dtype = _checks.dtype(op, "dtype", dtype, _checks.FP8_DTYPES)
  scale, state, _ = scale_argument(op, scale, "tensor")
  return with_next_state(_quantize_t(x, scale, dtype), state, dtype)


def dequantize(q, scale, dtype=jnp.bfloat16):
  """q (..., K) FP8 and scale () or (..., 1) float32 -> q * scale as dtype (float32, bfloat16 or float16).

  A plain XLA elementwise expression, so XLA fuses it into whatever consumes it.
  """
  op = "dequantize"
  _checks.array(op, "q", q, _checks.FP8_DTYPES)
  _checks.scale(op, "scale", scale, ((), q.shape[:-1] + (1,)))
  dtype = _checks.dtype(op, "dtype", dtype, _checks.FLOAT_DTYPES)
  return reference.dequantize(q, scale, dtype)
