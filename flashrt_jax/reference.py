"""Pure-JAX definitions of every flashrt_jax op: the specification and the test oracle.

The CPU and CUDA handlers compute the same functions; quantization matches bit for bit, GEMMs to
fp32 accumulation order.

Quantization here is exact where XLA's float32 division is correctly rounded, as on CPU. XLA:GPU
lowers float32 division to PTX `div.full` (up to 2 ulp off), so the reference evaluated on a GPU can
miss the kernels' scale by an ulp and round exact ties the other way; evaluate it on CPU to check
bits (the tests do).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

FP8_MAX = {jnp.dtype(jnp.float8_e4m3fn): 448.0, jnp.dtype(jnp.float8_e5m2): 57344.0}
AMAX_FLOOR = 1e-12  # an all-zero tensor gets scale AMAX_FLOOR / fp8_max instead of 0


def fp8_max(dtype) -> float:
  return FP8_MAX[jnp.dtype(dtype)]


def amax(x, granularity: str = "tensor"):
  """max |x| over the tensor () or over each row of the last axis (..., 1); NaN propagates."""
  ax = jnp.abs(x.astype(jnp.float32))
  return jnp.max(ax) if granularity == "tensor" else jnp.max(ax, axis=-1, keepdims=True)


def scale_from_amax(amax_value, dtype):
  """Current scaling: max(amax, AMAX_FLOOR) / fp8_max, with NaN and inf amax kept as they are."""
  floored = jnp.where(amax_value > AMAX_FLOOR, amax_value,
                      jnp.where(jnp.isnan(amax_value), amax_value, jnp.float32(AMAX_FLOOR)))
  # XLA rewrites a / constant into a * (1 / constant), which is off by an ulp from the correctly
  # rounded quotient the kernels compute. `floored` is never negative, so this divisor is always
  # fp8_max, but XLA cannot fold it into a constant.
  divisor = jnp.where(floored < 0, floored, jnp.float32(fp8_max(dtype)))
  return floored / divisor


def _opaque(v):
  """v itself, behind a select that XLA cannot resolve at compile time. XLA rewrites 1 / (a / b)
  into b / a, which rounds differently from the kernels' 1 / scale of a stored scale."""
  return jnp.where(v < 0, -jnp.abs(v), v)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _round_to_fp8_grid(v, dtype):
  """Rounds float32 v (|v| <= fp8_max) to the nearest value of `dtype`, ties to even, in exact steps;
  the derivative is 1 (straight through), as for a cast.

  Equal to `v.astype(dtype)` where XLA converts correctly; some XLA versions (jaxlib 0.5) convert
  float32 to FP8 through float16, which rounds twice and misses by one step near ties.
  """
  info = jnp.finfo(dtype)
  _, e = jnp.frexp(v)  # |v| = f * 2^e with f in [0.5, 1)
  step_exp = jnp.maximum(e - 1, info.minexp) - info.nmant  # exponent of the grid spacing at v
  pow2 = lambda e: jax.lax.bitcast_convert_type((e + 127).astype(jnp.int32) << 23, jnp.float32)
  return jnp.round(v * pow2(-step_exp)) * pow2(step_exp)  # products with powers of two are exact


@_round_to_fp8_grid.defjvp
def _round_to_fp8_grid_jvp(dtype, primals, tangents):
  return _round_to_fp8_grid(primals[0], dtype), tangents[0]


def quantize_with_scale(x, scale, dtype):
  """q = saturate(round_nearest_even(x * (1 / scale))) in float32 arithmetic."""
  inv = jnp.float32(1.0) / _opaque(scale.astype(jnp.float32))
  m = fp8_max(dtype)
  v = jnp.clip(x.astype(jnp.float32) * inv, -m, m)
  return _round_to_fp8_grid(v, dtype).astype(dtype)  # exact in dtype: the cast cannot round again


class DelayedScaling(NamedTuple):
  """Delayed scaling (Transformer Engine's recipe), a pytree carried from step to step: an op given
  it as `scale` quantizes per tensor with `scale` and returns the next state, which records this
  tensor's amax. Not differentiable."""
  amax_history: jax.Array  # (history_len,) float32, newest first
  scale: jax.Array  # () float32


def delayed_scaling(history_len: int = 16) -> DelayedScaling:
  """A fresh state: scale 1, an all-zero amax history of `history_len` entries."""
  if isinstance(history_len, bool) or not isinstance(history_len, int) or history_len < 1:
    raise ValueError(f"delayed_scaling: history_len must be an int >= 1, got {history_len!r}")
  return DelayedScaling(jnp.zeros((history_len,), jnp.float32), jnp.ones((), jnp.float32))


def update_delayed_scaling(state: DelayedScaling, amax_value, dtype) -> DelayedScaling:
  """The next state after quantizing a tensor of amax `amax_value` () to `dtype`: the history rolls by
  one with amax_value first, and the scale becomes scale_from_amax(max(history)), or stays as it was
  where that max is 0 or not finite (a NaN or inf amax holds the scale until it leaves the history)."""
  history = jnp.concatenate([jnp.reshape(amax_value, (1,)).astype(jnp.float32), state.amax_history[:-1]])
  m = jnp.max(history)
  scale = jnp.where((m > 0) & jnp.isfinite(m), scale_from_amax(m, dtype), state.scale)
  return DelayedScaling(history, scale)


def quantize(x, *, dtype=jnp.float8_e4m3fn, scale=None, granularity: str = "tensor"):
  """x (..., K) float -> (q (..., K) dtype, scale () or (..., 1) float32); scale=None: current scaling.
  With a DelayedScaling `scale`: (q, scale (), next state)."""
  if isinstance(scale, DelayedScaling):
    q, s = quantize(x, dtype=dtype, scale=scale.scale)
    return q, s, update_delayed_scaling(scale, amax(x), dtype)
  if scale is None:
    scale = scale_from_amax(amax(x, granularity), dtype)
  return quantize_with_scale(x, scale, dtype), scale


def quantize_transpose(x, *, dtype=jnp.float8_e4m3fn, scale=None):
  """x (M, K) -> (q (M, K), q_t (K, M rounded up to 16) zero padded, scale ()[, next state])."""
  q, *rest = quantize(x, dtype=dtype, scale=scale)
  m = x.shape[0]
  pad = -(-m // 16) * 16 - m
  q_t = jnp.pad(q.T.astype(jnp.float32), ((0, 0), (0, pad))).astype(dtype)
  return (q, q_t, *rest)


def dequantize(q, scale, dtype=jnp.bfloat16):
  """q (..., K) FP8, scale () or (..., 1) float32 -> q * scale in dtype."""
  return (q.astype(jnp.float32) * scale).astype(dtype)


def fp8_gemm(a, a_scale, b, b_scale, *, out_dtype=jnp.bfloat16, bias=None):
  """(a (..., K) * a_scale) @ (b (N, K) * b_scale)^T [+ bias], fp32 accumulation.

  a_scale: () or (..., 1) (per row of a); b_scale: () or (N,) (per row of b).
  """
  acc = jnp.einsum("...k,nk->...n", a.astype(jnp.float32), b.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  out = acc * a_scale * b_scale
  if bias is not None:
    out = out + bias.astype(jnp.float32)
  return out.astype(out_dtype)


def fp8_dense(x, kernel, bias=None, *, granularity: str = "tensor", out_dtype=None):
  """The FP8 layer's forward numerics: y = quantize(x) @ quantize(kernel) [+ bias].

  x (..., K) float; kernel (K, N) float, quantized per tensor; bias (N,) or None.
  """
  out_dtype = out_dtype or x.dtype
  xq, sx = quantize(x, granularity=granularity)
  wq, sw = quantize(kernel)
  return fp8_gemm(xq, sx, wq.T, sw, out_dtype=out_dtype, bias=bias)


def fp8_dense_frozen(x, w_data, w_scale, bias=None, *, granularity: str = "row", out_dtype=None):
  """Forward numerics with a frozen FP8 weight: w_data (N, K) float8_e4m3fn, w_scale () or (N,)."""
  out_dtype = out_dtype or x.dtype
  xq, sx = quantize(x, granularity=granularity)
  return fp8_gemm(xq, sx, w_data, w_scale, out_dtype=out_dtype, bias=bias)


# ---------------------------------------------------------------------------------------------
# Attention


def attention_visible(batch: int, tq: int, tk: int, *, q_block_ids=None, k_block_ids=None, k_valid=None,
                      q_valid=None):
  """(batch, tq, tk) bool: query i sees key j iff q_valid[i] and k_valid[j] and
  k_block_ids[j] <= q_block_ids[i]."""
  vis = jnp.ones((batch, tq, tk), bool)
  if q_block_ids is not None:
    vis = vis & (k_block_ids[:, None, :] <= q_block_ids[:, :, None])
  if k_valid is not None:
    vis = vis & (k_valid[:, None, :] != 0)
  if q_valid is not None:
    vis = vis & (q_valid[:, :, None] != 0)
  return vis


def attention(q, k, v, *, q_block_ids=None, k_block_ids=None, k_valid=None, q_valid=None, prefix_kv=None,
              softmax_scale=None, softcap=None, return_lse: bool = False):
  """softmax(softcap(scale * q k^T) | visible) v in float32: the definition of flashrt attention.

  q (B, Tq, Hq, D); k, v (B, Tk, Hkv, D) with Hq a multiple of Hkv (query head h uses KV head
  h // (Hq // Hkv)); prefix_kv (k_p, v_p) each (B, Tp, Hkv, D) is prepended to the key axis.
  Masks span the whole key axis: q_block_ids (B, Tq), k_block_ids (B, Tp + Tk), k_valid (B, Tp + Tk);
  q_valid (B, Tq): an invalid query sees no key.
  softmax_scale None: 1 / sqrt(D); softcap None: off, else logits = softcap * tanh(logits / softcap).
  A query with no visible key gets o = 0 and lse = -inf, and passes no gradient.

  Returns o (B, Tq, Hq, D) in q's dtype, and lse (B, Hq, Tq) float32 with return_lse.
  """
  f32 = lambda x: x.astype(jnp.float32)
  if prefix_kv is not None:
    k = jnp.concatenate([prefix_kv[0], k], axis=1)
    v = jnp.concatenate([prefix_kv[1], v], axis=1)
  b, tq, hq, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  scale = d ** -0.5 if softmax_scale is None else softmax_scale
  hi = jax.lax.Precision.HIGHEST
  s = jnp.einsum("bqhgd,bkhd->bhgqk", f32(q).reshape(b, tq, hkv, g, d), f32(k), precision=hi) * scale
  if softcap is not None:
    s = softcap * jnp.tanh(s / softcap)
  vis = attention_visible(b, tq, tk, q_block_ids=q_block_ids, k_block_ids=k_block_ids, k_valid=k_valid,
                          q_valid=q_valid)
  s = jnp.where(vis[:, None, None], s, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)  # exactly 0 where masked
  l = jnp.sum(p, axis=-1, keepdims=True)
  nonempty = l > 0
  o = jnp.einsum("bhgqk,bkhd->bqhgd", p / jnp.where(nonempty, l, 1.0), f32(v), precision=hi)
  o = o.reshape(b, tq, hq, d).astype(q.dtype)
  if not return_lse:
    return o
  lse = jnp.where(nonempty, jnp.log(jnp.where(nonempty, l, 1.0)) + m, -jnp.inf)
  return o, lse.reshape(b, hq, tq)

# Fused FP8 producers: a norm or a gated activation in float32, then quantize. The kernels compute
# the same float32 operations in this order, except that their row sums run in another order and
# tanh / exp / rsqrt may differ in the last ulp, so y agrees to rounding and q to one FP8 step at
# rare ties; q is bit-exact against quantize() of the kernels' own float32 y.


def _as_f32(x):
  """x in float32, rounded to x's own dtype first: under jit XLA may keep an upstream bfloat16 /
  float16 result in float32 (excess precision), which the kernels never see."""
  info = jnp.finfo(x.dtype)
  return jax.lax.reduce_precision(x.astype(jnp.float32), exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _fp8_output(y, dtype, scale, granularity, with_unquantized, y_dtype):
  """(q, scale[, y in y_dtype][, next state of a DelayedScaling scale])."""
  q, s, *state = quantize(y, dtype=dtype, scale=scale, granularity=granularity)
  return (q, s) + ((y.astype(y_dtype),) if with_unquantized else ()) + tuple(state)


def rms_norm(x, weight=None, *, eps=1e-6, offset=1.0):
  """x (..., W) -> float32 x * rsqrt(mean(x^2) + eps) [* (offset + weight)], weight (W,)."""
  xf = _as_f32(x)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + jnp.float32(eps))
  if weight is not None:
    y = y * (jnp.float32(offset) + weight.astype(jnp.float32))
  return y


def layer_norm(x, gamma=None, beta=None, *, eps=1e-6):
  """x (..., W) -> float32 (x - mean) * rsqrt(var + eps) [* gamma] [+ beta], two-pass variance."""
  xf = _as_f32(x)
  d = xf - jnp.mean(xf, axis=-1, keepdims=True)
  y = d * jax.lax.rsqrt(jnp.mean(d * d, axis=-1, keepdims=True) + jnp.float32(eps))
  if gamma is not None:
    y = y * gamma.astype(jnp.float32)
  if beta is not None:
    y = y + beta.astype(jnp.float32)
  return y


def ada_rms_norm(x, scale_mod, shift_mod, *, eps=1e-6):
  """x (..., T, W); scale_mod, shift_mod x-shaped or (..., W) (one per token axis) ->
  float32 rms_norm(x) * (1 + scale_mod) + shift_mod."""
  if scale_mod.ndim == x.ndim - 1:
    scale_mod, shift_mod = scale_mod[..., None, :], shift_mod[..., None, :]
  y = rms_norm(x, eps=eps)
  return y * (jnp.float32(1.0) + _as_f32(scale_mod)) + _as_f32(shift_mod)


def glu(gate, up=None, *, activation: str = "gelu_tanh"):
  """float32 act(gate) * up; with up=None, gate is [gate | up] (..., 2F). act: "gelu_tanh" or "silu"."""
  if up is None:
    f = gate.shape[-1] // 2
    gate, up = gate[..., :f], gate[..., f:]
  g = _as_f32(gate)
  if activation == "silu":
    a = g * jax.nn.sigmoid(g)
  else:  # jax.nn.gelu(approximate=True), spelled out in the kernels' order
    a = g * (0.5 * (1.0 + jnp.tanh(0.7978845608028654 * (g + 0.044715 * (g * g * g)))))
  return a * _as_f32(up)


def rms_norm_fp8(x, weight=None, *, eps=1e-6, offset=1.0, scale=None, granularity="row",
                 dtype=jnp.float8_e4m3fn, with_unquantized=False):
  """(q, scale[, y][, next state]) of rms_norm(x, weight); y in x.dtype; the next state with a
  DelayedScaling scale (then per tensor, whatever granularity says), as for every fused producer."""
  y = rms_norm(x, weight, eps=eps, offset=offset)
  return _fp8_output(y, dtype, scale, granularity, with_unquantized, x.dtype)


def residual_rms_norm_fp8(x, residual, weight=None, *, eps=1e-6, offset=1.0, scale=None, granularity="row",
                          dtype=jnp.float8_e4m3fn, with_unquantized=False):
  """(h, q, scale[, y]) with h = x + residual in x.dtype, normalized from that rounded h."""
  h = (x + residual).astype(x.dtype)
  return (h,) + rms_norm_fp8(h, weight, eps=eps, offset=offset, scale=scale, granularity=granularity,
                             dtype=dtype, with_unquantized=with_unquantized)


def layer_norm_fp8(x, gamma=None, beta=None, *, eps=1e-6, scale=None, granularity="row",
                   dtype=jnp.float8_e4m3fn, with_unquantized=False):
  """(q, scale[, y]) of layer_norm(x, gamma, beta); y in x.dtype."""
  y = layer_norm(x, gamma, beta, eps=eps)
  return _fp8_output(y, dtype, scale, granularity, with_unquantized, x.dtype)


def ada_rms_norm_fp8(x, scale_mod, shift_mod, *, eps=1e-6, scale=None, granularity="row",
                     dtype=jnp.float8_e4m3fn, with_unquantized=False):
  """(q, scale[, y]) of ada_rms_norm(x, scale_mod, shift_mod); y in x.dtype."""
  y = ada_rms_norm(x, scale_mod, shift_mod, eps=eps)
  return _fp8_output(y, dtype, scale, granularity, with_unquantized, x.dtype)


def glu_fp8(gate, up=None, *, activation="gelu_tanh", scale=None, granularity="row", dtype=jnp.float8_e4m3fn,
            with_unquantized=False):
  """(q, scale[, y]) of glu(gate, up); y in gate.dtype."""
  y = glu(gate, up, activation=activation)
  return _fp8_output(y, dtype, scale, granularity, with_unquantized, gate.dtype)


def glu_bwd(gate_up, dh, *, activation: str = "gelu_tanh"):
  """float32 [dgate | dup] (..., 2F): the VJP of glu(gate_up) (merged) at cotangent dh (..., F)."""
  _, vjp = jax.vjp(lambda gu: glu(gu, None, activation=activation), _as_f32(gate_up))
  return vjp(_as_f32(dh))[0]


def glu_bwd_fp8(gate_up, dh, *, activation="gelu_tanh", col_scale=None, scale=None, granularity="row",
                dtype=jnp.float8_e5m2, with_unquantized=False):
  """(q, scale[, y]) of glu_bwd(gate_up, dh) * col_scale (float32 (2F,) or None); y in gate_up.dtype."""
  d = glu_bwd(gate_up, dh, activation=activation)
  if col_scale is not None:
    d = d * col_scale.astype(jnp.float32)
  return _fp8_output(d, dtype, scale, granularity, with_unquantized, gate_up.dtype)
