"""Differentiable fused blocks: an FP8 producer (RMSNorm, residual + RMSNorm, GLU) feeding the FP8 GEMM.

Each composite is one `jax.custom_vjp`. Its forward runs the fused producer kernel of
`flashrt_jax.ops.fused`, which writes the FP8 activation and its per-row scales in one pass, and hands
them straight to the cuBLASLt FP8 GEMM (the row scales enter through its outer-vector scale mode): the
activation is never re-quantized and its BF16 form is never written.

The backward passes are mostly XLA compositions: the GEMM's input gradient (and the weight gradient
of a trainable kernel) by the same FP8 (E5M2 dy, current scaling) or BF16 GEMMs as `fp8_dense`
(`recipe.backward`), then the norm / GLU backward as plain XLA elementwise and reduction code in
float32 on recomputed values (the norm's 1 / rms and the activation are cheap to recompute from the
saved inputs). The exception is fp8_glu_ffn with recipe.backward="fp8": its GLU backward is one fused
kernel (`glu_bwd_fp8`) that also quantizes d[gate | up] for the gate|up FP8 dx GEMM (per-row E5M2).
Quantization counts as the identity (straight-through). A frozen `Fp8Weight` gets
no gradient and its weight gradient is never computed.

Recipe fields for the composites: `granularity` is the producers' scaling ("row", the default
whatever the kernel: one scale per token; or "tensor"); `backward` and `fast_accum` as in `fp8_dense`;
`min_rows` does not apply (a composite always takes the FP8 path, so K and N must be multiples of 16).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flashrt_jax import _checks, reference
from flashrt_jax.ops import fused as producers
from flashrt_jax.ops.gemm import (BF16, F32, OUT_DTYPES, Fp8Recipe, Fp8Weight, _gemm_2d, _kernel_out_dtype, _rows,
                                  act_gemm_bwd, act_gemm_fwd, check_bias, check_kernel, kernel_operand)

ACTIVATIONS = ("gelu_tanh", "silu")


# ---------------------------------------------------------------------------------------------
# Float math of the producers (flashrt_jax.reference), for the backward passes (jax.vjp of these)


def _rms_norm_f32(x, weight, eps, offset):
  return reference.rms_norm(x, weight, eps=eps, offset=offset)


def _glu_f32(gate, up, activation):
  return reference.glu(gate, up, activation=activation)


def _glu_merged_f32(gu, activation):
  return reference.glu(gu, None, activation=activation)


# ---------------------------------------------------------------------------------------------
# Shared pieces


class _Cfg(NamedTuple):
  """Static configuration of one composite call (hashable: a nondiff argument)."""

  recipe: Fp8Recipe
  granularity: str
  out_dtype: jnp.dtype      # the GEMM's output dtype
  dtypes: tuple             # dtypes of the differentiable inputs, for their cotangents
  eps: float = 0.0
  offset: float = 0.0
  activation: str = "gelu_tanh"
  residual: bool = False
  remat_gate_up: bool = False


def _recipe(op, recipe):
  recipe = Fp8Recipe() if recipe is None else recipe
  if not isinstance(recipe, Fp8Recipe):
    raise TypeError(f"{op}: recipe must be an Fp8Recipe or None, got {recipe!r}")
  return recipe, recipe.granularity or "row"


def _out_dtype(x):
  d = jnp.dtype(x.dtype)
  return d if d in OUT_DTYPES else BF16


def _dtype_of(a):
  return None if a is None else jnp.dtype(a.dtype)


def _kernel_grad(dw, kernel_dtype):
  return (None, None) if kernel_dtype is None else dw.astype(kernel_dtype)


def _bias_grad(dy, bias_dtype):
  return None if bias_dtype is None else dy.astype(F32).sum(0).astype(bias_dtype)


def _gemm_bwd(res, dy, cfg, kernel_dtype, da_dtype):
  dw_dtype = None if kernel_dtype is None else _kernel_out_dtype(kernel_dtype)
  # A frozen weight's per-channel scales are folded into dy in dy's dtype (bf16 for bf16 models): at
  # gemma_2b's gate|up GEMM that is a 2 GiB pass instead of 4 GiB in float32.
  return act_gemm_bwd(res, dy, cfg.recipe.backward, da_dtype, dw_dtype, fold_dtype=dy.dtype)


def _float_param(op, name, v):
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    raise TypeError(f"{op}: {name} must be a Python float, got {v!r}")
  return float(v)


def _check_norm_weight(op, norm_weight, k):
  _checks.array(op, "norm_weight", norm_weight, _checks.FLOAT_DTYPES, rank=1)
  if norm_weight.shape != (k,):
    raise ValueError(f"{op}: norm_weight must have shape ({k},) to match x's last axis, got {norm_weight.shape}")


def _kernel_dtype(kernel):
  return None if isinstance(kernel, Fp8Weight) else jnp.dtype(kernel.dtype)


# ---------------------------------------------------------------------------------------------
# rms_norm_dense


def _rms_norm_dense_fwd(x, nw, kernel, bias, cfg):
  q, s = producers.rms_norm_fp8(x, nw, eps=cfg.eps, offset=cfg.offset, granularity=cfg.granularity)
  y, res = act_gemm_fwd(q, s, kernel, bias, cfg.out_dtype, cfg.recipe.fast_accum)
  return y, (x, nw, res)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _rms_norm_dense(x, nw, kernel, bias, cfg):
  return _rms_norm_dense_fwd(x, nw, kernel, bias, cfg)[0]


def _rms_norm_dense_bwd(cfg, saved, dy):
  x, nw, res = saved
  x_dtype, nw_dtype, kernel_dtype, bias_dtype = cfg.dtypes
  dh, dw = _gemm_bwd(res, dy, cfg, kernel_dtype, cfg.out_dtype)
  _, vjp = jax.vjp(lambda x, w: _rms_norm_f32(x, w, cfg.eps, cfg.offset), x, nw)
  dx, dnw = vjp(dh.astype(F32))
  return dx.astype(x_dtype), dnw.astype(nw_dtype), _kernel_grad(dw, kernel_dtype), _bias_grad(dy, bias_dtype)


_rms_norm_dense.defvjp(_rms_norm_dense_fwd, _rms_norm_dense_bwd)


def rms_norm_dense(x, norm_weight, kernel, bias=None, *, eps: float = 1e-6, offset: float = 1.0,
                   recipe: Fp8Recipe | None = None):
  """y = rms_norm(x) @ kernel [+ bias]: the fused RMSNorm + FP8 quantize kernel, then the FP8 GEMM.

  rms_norm(x) = x * rsqrt(mean(x^2) + eps) * (offset + norm_weight) (offset 1.0: Gemma's (1 + w)).

  Args:
    x: (..., K) bfloat16, float32 or float16; leading axes are flattened into M.
    norm_weight: (K,) float.
    kernel: a trainable (K, N) float kernel (quantized per tensor on each call) or a frozen `Fp8Weight`.
    bias: optional (N,) float.
    eps, offset: Python floats.
    recipe: `Fp8Recipe` (see the module docstring for which fields apply).

  Returns:
    (..., N) in x's dtype.

  Backward (an XLA composition): dh = dy @ kernel^T by the FP8 (E5M2 dy) or BF16 GEMM, dW (trainable)
  from the saved FP8 activation, then the RMSNorm backward in float32 XLA on x (1 / rms recomputed);
  saved: x, norm_weight and, for a trainable kernel, the FP8 activation (1 byte per element).
  """
  op = "rms_norm_dense"
  recipe, granularity = _recipe(op, recipe)
  _checks.array(op, "x", x, _checks.FLOAT_DTYPES)
  k = x.shape[-1]
  _check_norm_weight(op, norm_weight, k)
  _, n = check_kernel(op, kernel, k)
  check_bias(op, bias, n)
  cfg = _Cfg(recipe, granularity, _out_dtype(x),
             (jnp.dtype(x.dtype), jnp.dtype(norm_weight.dtype), _kernel_dtype(kernel), _dtype_of(bias)),
             eps=_float_param(op, "eps", eps), offset=_float_param(op, "offset", offset))
  y = _rms_norm_dense(x.reshape(_rows(x), k), norm_weight, kernel_operand(kernel), bias, cfg)
  return y.astype(x.dtype).reshape(x.shape[:-1] + (n,))


# ---------------------------------------------------------------------------------------------
# residual_rms_norm_dense


def _res_norm_dense_fwd(x, r, nw, kernel, bias, cfg):
  h, q, s = producers.residual_rms_norm_fp8(x, r, nw, eps=cfg.eps, offset=cfg.offset, granularity=cfg.granularity)
  y, res = act_gemm_fwd(q, s, kernel, bias, cfg.out_dtype, cfg.recipe.fast_accum)
  return (y, h), (h, nw, res)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _res_norm_dense(x, r, nw, kernel, bias, cfg):
  return _res_norm_dense_fwd(x, r, nw, kernel, bias, cfg)[0]


def _res_norm_dense_bwd(cfg, saved, cts):
  dy, dh_out = cts
  h, nw, res = saved
  x_dtype, r_dtype, nw_dtype, kernel_dtype, bias_dtype = cfg.dtypes
  dn, dw = _gemm_bwd(res, dy, cfg, kernel_dtype, cfg.out_dtype)
  _, vjp = jax.vjp(lambda h, w: _rms_norm_f32(h, w, cfg.eps, cfg.offset), h, nw)
  dh, dnw = vjp(dn.astype(F32))
  dh = dh + dh_out.astype(F32)  # h = x + residual (rounded to x's dtype: straight through)
  return (dh.astype(x_dtype), dh.astype(r_dtype), dnw.astype(nw_dtype), _kernel_grad(dw, kernel_dtype),
          _bias_grad(dy, bias_dtype))


_res_norm_dense.defvjp(_res_norm_dense_fwd, _res_norm_dense_bwd)


def residual_rms_norm_dense(x, residual, norm_weight, kernel, bias=None, *, eps: float = 1e-6,
                            offset: float = 1.0, recipe: Fp8Recipe | None = None):
  """h = x + residual (rounded to x's dtype); y = rms_norm(h) @ kernel [+ bias]. Returns (y, h).

  One fused kernel writes h and the FP8 normed activation with its row scales; the FP8 GEMM reads them.

  Args:
    x: (..., K) bfloat16, float32 or float16 (e.g. the attention output); leading axes are M.
    residual: the residual stream, x's shape, any float dtype.
    norm_weight, kernel, bias, eps, offset, recipe: as in `rms_norm_dense`.

  Returns:
    (y (..., N) in x's dtype, new residual h (..., K) in x's dtype).

  Backward (an XLA composition): as `rms_norm_dense` on h, plus h's own cotangent; x and residual
  both get dh. Saved: h (the output itself), norm_weight, and the FP8 activation for a trainable kernel.
  """
  op = "residual_rms_norm_dense"
  recipe, granularity = _recipe(op, recipe)
  _checks.array(op, "x", x, _checks.FLOAT_DTYPES)
  _checks.array(op, "residual", residual, _checks.FLOAT_DTYPES)
  if residual.shape != x.shape:
    raise ValueError(f"{op}: residual must have x's shape {x.shape}, got {residual.shape}")
  k = x.shape[-1]
  _check_norm_weight(op, norm_weight, k)
  _, n = check_kernel(op, kernel, k)
  check_bias(op, bias, n)
  cfg = _Cfg(recipe, granularity, _out_dtype(x),
             (jnp.dtype(x.dtype), jnp.dtype(residual.dtype), jnp.dtype(norm_weight.dtype), _kernel_dtype(kernel),
              _dtype_of(bias)),
             eps=_float_param(op, "eps", eps), offset=_float_param(op, "offset", offset))
  m = _rows(x)
  y, h = _res_norm_dense(x.reshape(m, k), residual.reshape(m, k), norm_weight, kernel_operand(kernel), bias, cfg)
  return y.astype(x.dtype).reshape(x.shape[:-1] + (n,)), h.reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# glu_dense


def _glu_dense_fwd(gate, up, kernel, bias, cfg):
  q, s = producers.glu_fp8(gate, up, activation=cfg.activation, granularity=cfg.granularity)
  y, res = act_gemm_fwd(q, s, kernel, bias, cfg.out_dtype, cfg.recipe.fast_accum)
  return y, (gate, up, res)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _glu_dense(gate, up, kernel, bias, cfg):
  return _glu_dense_fwd(gate, up, kernel, bias, cfg)[0]


def _glu_dense_bwd(cfg, saved, dy):
  gate, up, res = saved
  gate_dtype, up_dtype, kernel_dtype, bias_dtype = cfg.dtypes
  da, dw = _gemm_bwd(res, dy, cfg, kernel_dtype, cfg.out_dtype)
  if up is None:
    dgate, = jax.vjp(lambda g: _glu_merged_f32(g, cfg.activation), gate)[1](da.astype(F32))
    dup = None
  else:
    dgate, dup = jax.vjp(lambda g, u: _glu_f32(g, u, cfg.activation), gate, up)[1](da.astype(F32))
    dup = dup.astype(up_dtype)
  return dgate.astype(gate_dtype), dup, _kernel_grad(dw, kernel_dtype), _bias_grad(dy, bias_dtype)


_glu_dense.defvjp(_glu_dense_fwd, _glu_dense_bwd)


def glu_dense(gate, up, kernel, bias=None, *, activation: str = "gelu_tanh", recipe: Fp8Recipe | None = None):
  """y = (act(gate) * up) @ kernel [+ bias]: the fused GLU + FP8 quantize kernel, then the FP8 GEMM.

  Args:
    gate: (..., F) bfloat16, float32 or float16; or, with up=None, the merged (..., 2F) buffer
      [gate | up] (gate in the first F columns), as one GEMM against a merged gate|up weight writes it.
    up: (..., F) float like gate, or None.
    kernel: a trainable (F, N) float kernel or a frozen `Fp8Weight`.
    bias: optional (N,) float.
    activation: "gelu_tanh" (Gemma's GEGLU, `jax.nn.gelu(approximate=True)`) or "silu" (SwiGLU).
    recipe: `Fp8Recipe` (see the module docstring).

  Returns:
    (..., N) in gate's dtype.

  Backward (an XLA composition): da = dy @ kernel^T by FP8 or BF16 GEMM, dW (trainable) from the
  saved FP8 activation, then d gate = da * up * act'(gate), d up = da * act(gate) in float32 XLA on
  the saved gate and up (act recomputed).
  """
  op = "glu_dense"
  recipe, granularity = _recipe(op, recipe)
  _checks.choice(op, "activation", activation, ACTIVATIONS)
  _checks.array(op, "gate", gate, _checks.FLOAT_DTYPES)
  if up is None:
    if gate.shape[-1] % 2:
      raise ValueError(f"{op}: a merged [gate | up] input needs an even last axis, got shape {gate.shape}")
    f = gate.shape[-1] // 2
  else:
    _checks.array(op, "up", up, _checks.FLOAT_DTYPES)
    if up.shape != gate.shape:
      raise ValueError(f"{op}: up must have gate's shape {gate.shape}, got {up.shape}")
    f = gate.shape[-1]
  _, n = check_kernel(op, kernel, f)
  check_bias(op, bias, n)
  cfg = _Cfg(recipe, granularity, _out_dtype(gate),
             (jnp.dtype(gate.dtype), _dtype_of(up), _kernel_dtype(kernel), _dtype_of(bias)), activation=activation)
  m, w = _rows(gate), gate.shape[-1]
  y = _glu_dense(gate.reshape(m, w), None if up is None else up.reshape(m, w), kernel_operand(kernel), bias, cfg)
  return y.astype(gate.dtype).reshape(gate.shape[:-1] + (n,))


# ---------------------------------------------------------------------------------------------
# fp8_glu_ffn: the Gemma / openpi FeedForward with its pre-norm


def _ffn_fwd(x, nw, kg, kd, cfg):
  fast = cfg.recipe.fast_accum
  hq, hs = producers.rms_norm_fp8(x, nw, eps=cfg.eps, offset=cfg.offset, granularity=cfg.granularity)
  gu, res_g = act_gemm_fwd(hq, hs, kg, None, cfg.out_dtype, fast)                       # (M, 2F)
  aq, as_ = producers.glu_fp8(gu, None, activation=cfg.activation, granularity=cfg.granularity)
  y, res_d = act_gemm_fwd(aq, as_, kd, None, cfg.out_dtype, fast)                       # (M, D)
  if cfg.residual:
    y = (y.astype(F32) + x.astype(F32)).astype(cfg.out_dtype)
  # gate|up: save the (M, 2F) GEMM output, or only the FP8 normed input (M x D bytes) to recompute it.
  keep = (hq, hs) if cfg.remat_gate_up else gu
  return y, (x, nw, keep, res_g, res_d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ffn(x, nw, kg, kd, cfg):
  return _ffn_fwd(x, nw, kg, kd, cfg)[0]


def _ffn_bwd(cfg, saved, dy):
  x, nw, keep, res_g, res_d = saved
  x_dtype, nw_dtype, kg_dtype, kd_dtype = cfg.dtypes
  da, dwd = _gemm_bwd(res_d, dy, cfg, kd_dtype, cfg.out_dtype)                          # (M, F)
  if cfg.remat_gate_up:
    gu, _ = act_gemm_fwd(*keep, (res_g[0], res_g[1]) if len(res_g) == 2 else _trainable_nk(res_g), None,
                         cfg.out_dtype, cfg.recipe.fast_accum)
  else:
    gu = keep
  if cfg.recipe.backward == "fp8":
    dh, dwg = _glu_gate_up_bwd_fp8(res_g, gu, da, cfg, kg_dtype)                     # (M, D)
  else:
    dgu, = jax.vjp(lambda g: _glu_merged_f32(g, cfg.activation), gu)[1](da.astype(F32))
    dh, dwg = _gemm_bwd(res_g, dgu.astype(cfg.out_dtype), cfg, kg_dtype, cfg.out_dtype)  # (M, D)
  _, vjp = jax.vjp(lambda x, w: _rms_norm_f32(x, w, cfg.eps, cfg.offset), x, nw)
  dx, dnw = vjp(dh.astype(F32))
  if cfg.residual:
    dx = dx + dy.astype(F32)
  return dx.astype(x_dtype), dnw.astype(nw_dtype), _kernel_grad(dwg, kg_dtype), _kernel_grad(dwd, kd_dtype)


def _glu_gate_up_bwd_fp8(res_g, gu, da, cfg, kg_dtype):
  """(dh, dW_gate_up) from the GLU's input gu = [gate | up] (M, 2F) and its output's gradient da (M, F):
  one fused kernel (glu_bwd_fp8) computes d[gate | up] in float32 and quantizes it to E5M2 with per-row
  scales, which go straight into the gate|up GEMM's FP8 input-gradient GEMM (E5M2 x E4M3, the row
  scales in cuBLASLt's outer-vector epilogue). A frozen weight's per-channel scales lie along that
  GEMM's reduction axis: the kernel multiplies them in before quantizing. A trainable weight also
  needs dW = h^T d[gate | up]: the kernel writes d[gate | up] unquantized (gu's dtype) in the same
  pass, and dW takes act_gemm_bwd's FP8 path on it (h's row scales folded in, per-tensor E5M2)."""
  one = jnp.ones((), F32)
  if len(res_g) == 2:  # frozen (w_data (2F, D), w_scale () or (2F,)): no weight gradient
    w_data, w_scale = res_g
    q, s = producers.glu_bwd_fp8(gu, da, activation=cfg.activation, col_scale=w_scale if w_scale.ndim else None)
    # The one FP8 copy is (2F, D); dx needs (D, 2F): XLA transposes it, as in gemm._frozen_dx.
    dh = _gemm_2d(q, w_data.T, s, one if w_scale.ndim else w_scale, None, cfg.out_dtype, False)
    return dh, None
  _, _, wq, sw = res_g  # trainable: wq (D, 2F) float8_e4m3fn, sw () per tensor
  q, s, dgu = producers.glu_bwd_fp8(gu, da, activation=cfg.activation, with_unquantized=True)
  dh = _gemm_2d(q, wq, s, sw, None, cfg.out_dtype, False)                              # (M, 2F) . (D, 2F)^T
  _, dw = act_gemm_bwd(res_g, dgu, "fp8", None, _kernel_out_dtype(kg_dtype), need_da=False, fold_dtype=dgu.dtype)
  return dh, dw


def _trainable_nk(res):
  """A trainable kernel's residual (a, sa, wq (K, N), sw) as the frozen (N, K) operand of a GEMM."""
  _, _, wq, sw = res
  return wq.T, sw


_ffn.defvjp(_ffn_fwd, _ffn_bwd)


def fp8_gate_up_weight(w_gating, granularity: str = "channel") -> Fp8Weight:
  """openpi's gating weight (2, D, F) (`gating_einsum`: gate = x @ w[0], up = x @ w[1]) as one frozen
  merged `Fp8Weight`: data (2F, D) float8_e4m3fn = [w[0]^T ; w[1]^T], quantized once, scale (2F,)
  per output channel ("channel", default) or () ("tensor"). One GEMM against it writes [gate | up]."""
  op = "fp8_gate_up_weight"
  _checks.array(op, "w_gating", w_gating, _checks.FLOAT_DTYPES, rank=3)
  if w_gating.shape[0] != 2:
    raise ValueError(f"{op}: w_gating must have shape (2, D, F), got {w_gating.shape}")
  return Fp8Weight.from_kernel(_merge_gating(w_gating), granularity)


def _merge_gating(w_gating):
  """(2, D, F) -> the (D, 2F) kernel [w[0] | w[1]]."""
  return jnp.concatenate([w_gating[0], w_gating[1]], axis=1)


def fp8_glu_ffn(x, norm_weight, w_gating, w_down, *, eps: float = 1e-6, offset: float = 1.0,
                activation: str = "gelu_tanh", residual: bool = True, recipe: Fp8Recipe | None = None,
                remat_gate_up: bool = False):
  """The Gemma / openpi FeedForward block with its pre-norm, in FP8:

    h = rms_norm(x) (fused with its FP8 quantize, row scales) -> [gate | up] = h @ W_gu (ONE FP8 GEMM,
    N = 2F) -> a = act(gate) * up (fused with its FP8 quantize) -> out = a @ W_down (FP8 GEMM)
    -> out + x when residual.

  Args:
    x: (..., D) bfloat16, float32 or float16.
    norm_weight: (D,) float (Gemma's RMSNorm scale; offset 1.0 gives its (1 + w)).
    w_gating: openpi's trainable (2, D, F) float gating weight, or a frozen merged `Fp8Weight` with
      data (2F, D) (build it with `fp8_gate_up_weight`).
    w_down: a trainable (F, D) float kernel, or a frozen `Fp8Weight` with data (D, F)
      (`Fp8Weight.from_kernel(w_down, "channel")`).
    eps, offset: the RMSNorm's.
    activation: "gelu_tanh" (Gemma) or "silu".
    residual: add x to the output.
    recipe: `Fp8Recipe` (see the module docstring).
    remat_gate_up: recompute the (M, 2F) gate|up GEMM output in the backward from the saved FP8 normed
      input (M x D bytes) instead of keeping it (M x 2F x 2 bytes: 2 GiB at 30976 x 16384 per layer).
      Default False: keep it (the backward is one FP8 GEMM cheaper); under `jax.checkpoint` of the
      whole layer it only lives during that layer's backward anyway.

  Returns:
    (..., D) in x's dtype.

  Backward: dy -> da (M, F) by the down GEMM's FP8 (E5M2 dy) or BF16 dx GEMM; then, with
  recipe.backward="fp8", one fused kernel (`glu_bwd_fp8`) reads the saved (or recomputed) gate|up
  buffer and da and writes d[gate | up] as E5M2 with per-row scales (a frozen weight's per-channel
  scales multiplied in), which the gate|up GEMM's FP8 dx GEMM reads as is -> dh (M, D); with "bf16",
  the GLU backward in float32 XLA and the BF16 dx GEMM. Then the RMSNorm backward in float32 XLA on x
  (1 / rms recomputed); + dy when residual.
  Trainable kernels get dW from their saved FP8 activations; frozen ones get none. Saved: x,
  norm_weight, the gate|up buffer (or the FP8 normed input), the FP8 GLU output and FP8 normed input
  for trainable kernels, and each trainable kernel's FP8 copy.
  """
  op = "fp8_glu_ffn"
  recipe, granularity = _recipe(op, recipe)
  _checks.choice(op, "activation", activation, ACTIVATIONS)
  _checks.boolean(op, "residual", residual)
  _checks.boolean(op, "remat_gate_up", remat_gate_up)
  _checks.array(op, "x", x, _checks.FLOAT_DTYPES)
  d = x.shape[-1]
  _check_norm_weight(op, norm_weight, d)
  if isinstance(w_gating, Fp8Weight):
    kg = w_gating
  else:
    _checks.array(op, "w_gating", w_gating, _checks.FLOAT_DTYPES, rank=3)
    if w_gating.shape[0] != 2 or w_gating.shape[1] != d:
      raise ValueError(f"{op}: w_gating must have shape (2, {d}, F) to match x {x.shape}, got {w_gating.shape}")
    kg = _merge_gating(w_gating)  # outside the custom_vjp: autodiff maps dW (D, 2F) back to (2, D, F)
  _, n2 = check_kernel(op, kg, d, "w_gating")
  if n2 % 2:
    raise ValueError(f"{op}: the merged gate|up weight needs an even N = 2F, got {n2}")
  _, n_out = check_kernel(op, w_down, n2 // 2, "w_down")
  if n_out != d:
    raise ValueError(f"{op}: w_down must have shape ({n2 // 2}, {d}) to map back to x's width, got "
                     f"{tuple(w_down.shape)}")
  cfg = _Cfg(recipe, granularity, _out_dtype(x),
             (jnp.dtype(x.dtype), jnp.dtype(norm_weight.dtype), _kernel_dtype(kg), _kernel_dtype(w_down)),
             eps=_float_param(op, "eps", eps), offset=_float_param(op, "offset", offset), activation=activation,
             residual=bool(residual), remat_gate_up=bool(remat_gate_up))
  y = _ffn(x.reshape(_rows(x), d), norm_weight, kernel_operand(kg), kernel_operand(w_down), cfg)
  return y.astype(x.dtype).reshape(x.shape)


__all__ = ["fp8_gate_up_weight", "fp8_glu_ffn", "glu_dense", "residual_rms_norm_dense", "rms_norm_dense"]
