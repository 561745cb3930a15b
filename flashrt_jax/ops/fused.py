"""Fused FP8 producers: RMSNorm (plain, with a residual add, Gemma's `(1 + w)`), LayerNorm, pi0.5's
adaptive RMSNorm and gated activations (GEGLU / SwiGLU), each quantizing what it computes to FP8 in
the same pass, so the next FP8 GEMM reads 1-byte activations and no bf16 copy round-trips HBM.

Scaling: `scale=None` is current scaling, `granularity="row"` (the default: one scale per token,
(..., 1), made in the same pass, the layout cuBLASLt's outer-vector FP8 GEMM consumes) or "tensor"
(one scale (), its amax reduced on the device: an amax pass and a quantize pass, no host sync). A
given float32 `scale`, () or (..., 1), is static scaling. A `DelayedScaling` state (see
`flashrt_jax.delayed_scaling`) is delayed scaling: per tensor with state.scale, the amax of y reduced
in the same pass, and the next state returned as the last output. Scales and rounding are
`quantize`'s: scale = max(amax, 1e-12) / fp8_max, q = saturate(round_nearest_even(y * (1 / scale))).

Values: y is computed in float32 from the inputs (any of float32 / bfloat16 / float16) and parameters
(cast to float32). NaN in y gives NaN in q; with current scaling a NaN or inf anywhere in a row
(tensor) makes that row's (the tensor's) scale NaN or inf, which flags the overflow, and a norm's
inf input makes its whole row NaN; with a given scale, +-inf saturates to +-fp8_max. An all-zero row
gives y = 0, q = +0 and the floor scale 1e-12 / fp8_max.

Gradients: these are forward building blocks. Each op's VJP is the VJP of its pure-JAX reference
(flashrt_jax.reference) with respect to the float inputs, parameters and a given scale, with q's
rounding passed straight through, as for `quantize`: gradients flow through `dequantize(q, scale)`,
through y and through the new residual.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flashrt_jax import _checks, reference
from flashrt_jax.ffi import fused as raw
from flashrt_jax.ops.quant import scale_argument, with_next_state

GRANULARITIES = ("row", "tensor")
ACTIVATIONS = tuple(raw.ACTIVATIONS)
MAX_WIDTH, MAX_WIDTH_UNALIGNED = 16384, 8192  # csrc/common/fp8_output.h: rows live in registers


class _Config(NamedTuple):  # the static part of a call
  op: str
  eps: float
  offset: float
  activation: str
  dtype: jnp.dtype
  granularity: str
  with_y: bool


def _reference(cfg: _Config):
  """The reference of cfg.op over (first, second, weight, bias, scale_mod, shift_mod, scale)."""
  common = dict(dtype=cfg.dtype, granularity=cfg.granularity, with_unquantized=cfg.with_y)

  def fn(a, b, weight, bias, scale_mod, shift_mod, scale):
    if cfg.op == "rms_norm_fp8":
      return reference.rms_norm_fp8(a, weight, eps=cfg.eps, offset=cfg.offset, scale=scale, **common)
    if cfg.op == "residual_rms_norm_fp8":
      return reference.residual_rms_norm_fp8(a, b, weight, eps=cfg.eps, offset=cfg.offset, scale=scale, **common)
    if cfg.op == "layer_norm_fp8":
      return reference.layer_norm_fp8(a, weight, bias, eps=cfg.eps, scale=scale, **common)
    if cfg.op == "ada_rms_norm_fp8":
      return reference.ada_rms_norm_fp8(a, scale_mod, shift_mod, eps=cfg.eps, scale=scale, **common)
    return reference.glu_fp8(a, b, activation=cfg.activation, scale=scale, **common)
  return fn


def _outputs(outs, scale):
  """The kernel's [q, scale, amax, y?] (current scaling) or [q, amax, y?] (a given scale) as
  (q, scale[, y], amax)."""
  if scale is None:
    q, scale, amax, *y = outs
  else:
    q, amax, *y = outs
  return (q, scale, *y, amax)


def _impl(a, b, weight, bias, scale_mod, shift_mod, scale, cfg: _Config):
  rowwise = cfg.granularity == "row"
  f32 = lambda p: None if p is None else p.astype(jnp.float32)
  if cfg.op == "glu_fp8":
    outs = raw.glu_fp8(a, b, scale, activation=cfg.activation, dtype=cfg.dtype, rowwise=rowwise, with_y=cfg.with_y)
    new_residual = None
  else:
    # Per-column operands go in as (n, W) with n dividing the rows: the kernel maps row r to
    # operand row r // (rows / n), so (W,) serves every row and (..., W) modulation each sequence.
    outs = raw.norm_fp8(a, b, f32(weight), f32(bias), scale_mod, shift_mod, scale,
                        kind="layer" if cfg.op == "layer_norm_fp8" else "rms", eps=cfg.eps, offset=cfg.offset,
                        dtype=cfg.dtype, rowwise=rowwise, with_y=cfg.with_y)
    new_residual = outs.pop(1) if b is not None else None
  out = _outputs(outs, scale)
  return out if new_residual is None else (new_residual,) + out


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _fused(a, b, weight, bias, scale_mod, shift_mod, scale, cfg):
  return _impl(a, b, weight, bias, scale_mod, shift_mod, scale, cfg)


def _fused_fwd(a, b, weight, bias, scale_mod, shift_mod, scale, cfg):
  return _impl(a, b, weight, bias, scale_mod, shift_mod, scale, cfg), (a, b, weight, bias, scale_mod, shift_mod,
                                                                        scale)


def _fused_bwd(cfg, res, ct):
  return jax.vjp(_reference(cfg), *res)[1](ct[:-1])  # the amax only feeds a delayed-scaling state


_fused.defvjp(_fused_fwd, _fused_bwd)


# ---------------------------------------------------------------------------------------------
# Checks


def _check_width(op: str, name: str, x, width: int):
  vec = 16 // jnp.dtype(x.dtype).itemsize
  limit = MAX_WIDTH if width % vec == 0 else MAX_WIDTH_UNALIGNED
  if width > limit:
    raise ValueError(f"{op}: {name} rows must hold at most {MAX_WIDTH} elements ({MAX_WIDTH_UNALIGNED} where a row "
                     f"is not a whole number of 16-byte vectors, {vec} elements of {jnp.dtype(x.dtype).name}), "
                     f"got {width}")


def _check_param(op: str, name: str, p, width: int):
  if p is None:
    return
  _checks.array(op, name, p, _checks.FLOAT_DTYPES)
  if tuple(p.shape) != (width,):
    raise ValueError(f"{op}: {name} must have shape ({width},) to match the last axis of the input; got {p.shape}")


def _check_like(op: str, name: str, p, x, x_name: str):
  _checks.array(op, name, p, (jnp.dtype(x.dtype),))
  if p.shape != x.shape:
    raise ValueError(f"{op}: {name} must have the shape of {x_name} {x.shape}; got {p.shape}")


def _config(op, x, out_shape, *, scale, granularity, dtype, with_unquantized, eps=0.0, offset=0.0,
            activation="") -> tuple[_Config, object, object]:
  """(config, scale array or None, DelayedScaling or None)."""
  dtype = _checks.dtype(op, "dtype", dtype, _checks.FP8_DTYPES)
  if granularity is not None:  # None: "row", or what a given scale sets
    _checks.choice(op, "granularity", granularity, GRANULARITIES)
  with_y = _checks.boolean(op, "with_unquantized", with_unquantized)
  for name, v in (("eps", eps), ("offset", offset)):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      raise TypeError(f"{op}: {name} must be a finite Python number, got {v!r}")
  if eps < 0:
    raise ValueError(f"{op}: eps must be >= 0, got {eps}")
  scale, state, granularity = scale_argument(op, scale, granularity, out_shape[:-1] + (1,))
  return _Config(op, float(eps), float(offset), activation, dtype, granularity or "row", with_y), scale, state


def _check_x(op: str, name: str, x, min_rank: int = 1):
  _checks.array(op, name, x, _checks.FLOAT_DTYPES, min_rank=min_rank)
  _check_width(op, name, x, x.shape[-1])


# ---------------------------------------------------------------------------------------------
# Public ops


def rms_norm_fp8(x, weight=None, *, eps=1e-6, offset=1.0, scale=None, granularity=None, dtype=jnp.float8_e4m3fn,
                 with_unquantized=False):
  """RMSNorm + FP8 quantization in one pass: y = x * rsqrt(mean(x^2, -1) + eps) * (offset + weight).

  Args:
    x: (..., W) float32, bfloat16 or float16; W <= 16384 (8192 if a row is not whole 16-byte vectors).
    weight: (W,) float (cast to float32), or None for y = the normalized x. offset=1.0 is Gemma's
      `(1 + w)`; offset=0.0 a plain scale.
    eps: added to the mean square. offset: added to the weight.
    scale: None (current scaling), a given float32 scale () or (..., 1), or a DelayedScaling state
      (per tensor with state.scale).
    granularity: "row" (one scale per row, (..., 1)) or "tensor" (one, ()), for current scaling;
      None (the default): "row", or what a given scale sets. "row" cannot take a DelayedScaling.
    dtype: jnp.float8_e4m3fn or jnp.float8_e5m2.
    with_unquantized: also return y in x.dtype, written in the same pass.

  Returns:
    (q (..., W) dtype, scale float32) or (q, scale, y) with y ≈ dequantize(q, scale); y is
    computed in float32 (see the module docstring for NaN / inf / zero rows). With a DelayedScaling,
    the next state (recording max |y|) follows last: (q, scale (), next_state) or
    (q, scale, y, next_state); so for every op here.
  """
  op = "rms_norm_fp8"
  _check_x(op, "x", x)
  _check_param(op, "weight", weight, x.shape[-1])
  cfg, scale, state = _config(op, x, x.shape, scale=scale, granularity=granularity, dtype=dtype,
                              with_unquantized=with_unquantized, eps=eps, offset=offset)
  return with_next_state(_fused(x, None, weight, None, None, None, scale, cfg), state, cfg.dtype)


def residual_rms_norm_fp8(x, residual, weight=None, *, eps=1e-6, offset=1.0, scale=None, granularity=None,
                          dtype=jnp.float8_e4m3fn, with_unquantized=False):
  """Residual add + RMSNorm + FP8 quantization in one pass: h = x + residual, rounded to x.dtype (the
  new residual stream), then rms_norm_fp8(h, ...) computed from that rounded h.

  Args:
    x, residual: (..., W) of one dtype (float32, bfloat16 or float16).
    weight, eps, offset, scale, granularity, dtype, with_unquantized: as for rms_norm_fp8.

  Returns:
    (new_residual (..., W) x.dtype, q, scale) or (new_residual, q, scale, y); with a DelayedScaling,
    then next_state.
  """
  op = "residual_rms_norm_fp8"
  _check_x(op, "x", x)
  _check_like(op, "residual", residual, x, "x")
  _check_param(op, "weight", weight, x.shape[-1])
  cfg, scale, state = _config(op, x, x.shape, scale=scale, granularity=granularity, dtype=dtype,
                              with_unquantized=with_unquantized, eps=eps, offset=offset)
  return with_next_state(_fused(x, residual, weight, None, None, None, scale, cfg), state, cfg.dtype)


def layer_norm_fp8(x, gamma=None, beta=None, *, eps=1e-6, scale=None, granularity=None, dtype=jnp.float8_e4m3fn,
                   with_unquantized=False):
  """LayerNorm + FP8 quantization in one pass: y = (x - mean) * rsqrt(var + eps) * gamma + beta, with
  the variance taken around the mean (two passes over the row in registers).

  Args:
    x: (..., W) float32, bfloat16 or float16. gamma, beta: (W,) float or None.
    eps, scale, granularity, dtype, with_unquantized: as for rms_norm_fp8.

  Returns:
    (q (..., W), scale) or (q, scale, y); with a DelayedScaling, then next_state.
  """
  op = "layer_norm_fp8"
  _check_x(op, "x", x)
  _check_param(op, "gamma", gamma, x.shape[-1])
  _check_param(op, "beta", beta, x.shape[-1])
  cfg, scale, state = _config(op, x, x.shape, scale=scale, granularity=granularity, dtype=dtype,
                              with_unquantized=with_unquantized, eps=eps)
  return with_next_state(_fused(x, None, gamma, beta, None, None, scale, cfg), state, cfg.dtype)


def ada_rms_norm_fp8(x, scale_mod, shift_mod, *, eps=1e-6, scale=None, granularity=None, dtype=jnp.float8_e4m3fn,
                     with_unquantized=False):
  """pi0.5's adaptive RMSNorm + FP8 quantization: y = rmsnorm(x) * (1 + scale_mod) + shift_mod (no
  learned weight).

  Args:
    x: (..., T, W) float32, bfloat16 or float16.
    scale_mod, shift_mod: x.dtype, both x's shape (per token) or (..., W) (one vector per sequence,
      broadcast over the token axis T).
    eps, scale, granularity, dtype, with_unquantized: as for rms_norm_fp8.

  Returns:
    (q (..., T, W), scale) or (q, scale, y); with a DelayedScaling, then next_state.
  """
  op = "ada_rms_norm_fp8"
  _check_x(op, "x", x, min_rank=2)
  per_seq = x.shape[:-2] + x.shape[-1:]
  _checks.array(op, "scale_mod", scale_mod, (jnp.dtype(x.dtype),))
  if scale_mod.shape not in (x.shape, per_seq):
    raise ValueError(f"{op}: scale_mod must have shape {x.shape} or {per_seq} to match x {x.shape}; "
                     f"got {scale_mod.shape}")
  _check_like(op, "shift_mod", shift_mod, scale_mod, "scale_mod")
  cfg, scale, state = _config(op, x, x.shape, scale=scale, granularity=granularity, dtype=dtype,
                              with_unquantized=with_unquantized, eps=eps)
  return with_next_state(_fused(x, None, None, None, scale_mod, shift_mod, scale, cfg), state, cfg.dtype)


def glu_fp8(gate, up=None, *, activation="gelu_tanh", scale=None, granularity=None, dtype=jnp.float8_e4m3fn,
            with_unquantized=False):
  """Gated linear unit + FP8 quantization in one pass: y = act(gate) * up in float32.

  Args:
    gate: (..., F) float32, bfloat16 or float16; or, with up=None, the merged (..., 2F) = [gate | up]
      that one GEMM with N = 2F writes. F <= 16384 (8192 if a row is not whole 16-byte vectors).
    up: (..., F) like gate, or None.
    activation: "gelu_tanh" (jax.nn.gelu(approximate=True), Gemma's GEGLU) or "silu" (SwiGLU).
    scale, granularity, dtype, with_unquantized: as for rms_norm_fp8.

  Returns:
    (q (..., F), scale) or (q, scale, y (..., F) gate.dtype); with a DelayedScaling, then next_state.
  """
  op = "glu_fp8"
  _checks.array(op, "gate", gate, _checks.FLOAT_DTYPES)
  _checks.choice(op, "activation", activation, ACTIVATIONS)
  if up is None:
    if gate.shape[-1] % 2:
      raise ValueError(f"{op}: a merged gate [gate | up] must have an even last axis, got shape {gate.shape}")
    out_shape = gate.shape[:-1] + (gate.shape[-1] // 2,)
  else:
    _check_like(op, "up", up, gate, "gate")
    out_shape = gate.shape
  _check_width(op, "gate", gate, out_shape[-1])
  cfg, scale, state = _config(op, gate, out_shape, scale=scale, granularity=granularity, dtype=dtype,
                              with_unquantized=with_unquantized, activation=activation)
  return with_next_state(_fused(gate, up, None, None, None, None, scale, cfg), state, cfg.dtype)


@jax.custom_jvp
def _not_differentiable(x):
  return x


@_not_differentiable.defjvp
def _not_differentiable_jvp(primals, tangents):
  raise TypeError("glu_bwd_fp8 is a backward building block and is not differentiable (its FP8 output "
                  "has no gradient); differentiate glu_fp8 / glu_dense / fp8_glu_ffn instead")


def glu_bwd_fp8(gate_up, dh, *, activation, col_scale=None, scale=None, granularity=None, dtype=jnp.float8_e5m2,
                with_unquantized=False):
  """Backward of the merged GLU + FP8 quantization in one pass, for an FP8 FFN's backward: from
  [gate | up] and dh = dL/d(act(gate) * up), in float32,

    dgate = (dh * up) * act'(gate),   dup = dh * act(gate),

  times col_scale when given, quantized to FP8 as d[gate | up] (..., 2F), ready for the gate|up GEMM's
  input-gradient FP8 GEMM (E5M2 by default, per-row scales by default).

  Args:
    gate_up: (..., 2F) float32, bfloat16 or float16: the merged [gate | up] the forward GEMM wrote.
      F <= 16384 (8192 if F is not a whole number of 16-byte vectors).
    dh: (..., F) of gate_up's dtype and leading shape.
    activation: "gelu_tanh" or "silu", as in glu_fp8 (act' is its exact derivative).
    col_scale: optional (2F,) float factors (cast to float32) multiplied into d[gate | up] before the
      quantization: the per-channel scales of a frozen gate|up weight, which lie along the next
      GEMM's reduction axis and so cannot go into its epilogue.
    scale, granularity, with_unquantized: as for rms_norm_fp8 (y: d[gate | up] * col_scale in
      gate_up's dtype).
    dtype: jnp.float8_e5m2 (default, gradients) or jnp.float8_e4m3fn.

  Returns:
    (q (..., 2F), scale) or (q, scale, y); with a DelayedScaling, then next_state.

  Not differentiable: differentiating through it raises a TypeError (it is the VJP of glu_fp8's
  reference; its own FP8 output has no gradient).
  """
  op = "glu_bwd_fp8"
  _checks.array(op, "gate_up", gate_up, _checks.FLOAT_DTYPES)
  _checks.choice(op, "activation", activation, ACTIVATIONS)
  if gate_up.shape[-1] % 2:
    raise ValueError(f"{op}: gate_up [gate | up] must have an even last axis, got shape {gate_up.shape}")
  f = gate_up.shape[-1] // 2
  _check_width(op, "gate and up", gate_up, f)
  dh_shape = gate_up.shape[:-1] + (f,)
  _checks.array(op, "dh", dh, (jnp.dtype(gate_up.dtype),))
  if dh.shape != dh_shape:
    raise ValueError(f"{op}: dh must have shape {dh_shape} (gate_up's with the last axis halved); got {dh.shape}")
  if col_scale is not None:
    _checks.array(op, "col_scale", col_scale, _checks.FLOAT_DTYPES, rank=1)
    if col_scale.shape != (2 * f,):
      raise ValueError(f"{op}: col_scale must have shape ({2 * f},) to match gate_up's last axis; got "
                       f"{col_scale.shape}")
    col_scale = col_scale.astype(jnp.float32)
  cfg, scale, state = _config(op, gate_up, gate_up.shape, scale=scale, granularity=granularity, dtype=dtype,
                              with_unquantized=with_unquantized)
  gate_up, dh = _not_differentiable(gate_up), _not_differentiable(dh)
  if col_scale is not None:
    col_scale = _not_differentiable(col_scale)
  outs = raw.glu_bwd_fp8(gate_up, dh, col_scale, scale, activation=activation, dtype=cfg.dtype,
                         rowwise=cfg.granularity == "row", with_y=cfg.with_y)
  # A given scale passes through: no gradient through it either (stop_gradient(None) is None).
  return with_next_state(_outputs(outs, jax.lax.stop_gradient(scale)), state, cfg.dtype)
