"""Flash attention as a differentiable JAX op, and the openpi (pi0 / pi0.5) mask convention.

`attention` runs the fused kernels of csrc/attention (fp32 softmax, never materialising the
(Tq, Tk) logits) forward and backward. Every mask is expressed as block ids and validity:

  query i sees key j  iff  q_valid[i]  and  k_valid[j]  and  k_block_ids[j] <= q_block_ids[i]

which covers causal attention (ids = positions), pi0's block-causal prefix/suffix masks, and padding
anywhere in the sequence, of keys and of queries. The kernels take block ids and key validity only;
query validity becomes a block id below every key's. `make_attention_mask_ids` converts openpi's
(input_mask, ar_mask) pair and `openpi_attention` is a drop-in for openpi's einsum attention.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from flashrt_jax.ffi import attention as raw

ATTENTION_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
KERNEL_HEAD_DIMS = (64, 128, 256)  # other head dims up to 256 are zero-padded to the next of these
MAX_HEAD_DIM = KERNEL_HEAD_DIMS[-1]


def kernel_head_dim(head_dim: int) -> int:
  """The head dim the kernels run for `head_dim`: the smallest of KERNEL_HEAD_DIMS >= it."""
  return next(d for d in KERNEL_HEAD_DIMS if d >= head_dim)


# ---------------------------------------------------------------------------------------------
# The differentiable core: kernel head dims, both key sources, masks as int32 (empty when absent).


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _flash(q, k1, v1, k2, v2, q_block, k_block, k_valid, softmax_scale, softcap, has_block, has_valid):
  return raw.attention_fwd(q, k1, v1, k2, v2, q_block, k_block, k_valid, softmax_scale=softmax_scale,
                           softcap=softcap, has_block_mask=has_block, has_valid_mask=has_valid)


def _flash_fwd(q, k1, v1, k2, v2, q_block, k_block, k_valid, softmax_scale, softcap, has_block, has_valid):
  o, lse = _flash(q, k1, v1, k2, v2, q_block, k_block, k_valid, softmax_scale, softcap, has_block, has_valid)
  return (o, lse), (q, k1, v1, k2, v2, q_block, k_block, k_valid, o, lse)


def _flash_bwd(softmax_scale, softcap, has_block, has_valid, res, cts):
  d_o, _ = cts  # lse leaves `attention` behind stop_gradient: its cotangent is zero
  grads = raw.attention_bwd(*res, d_o.astype(res[0].dtype), softmax_scale=softmax_scale, softcap=softcap,
                            has_block_mask=has_block, has_valid_mask=has_valid)
  return tuple(grads) + (None, None, None)  # the masks get no gradient


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------------
# Input checks


def _array(op, name, x):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{op}: {name} must be an array, got {type(x).__name__}")


def _float_operand(op, name, x, shape, dtype):
  """A bfloat16/float16 operand of dtype `dtype` (None: any of them) and shape `shape` (None entries free)."""
  _array(op, name, x)
  if jnp.dtype(x.dtype) not in ATTENTION_DTYPES:
    raise TypeError(f"{op}: {name} must be bfloat16 or float16, got {x.dtype}")
  if dtype is not None and jnp.dtype(x.dtype) != dtype:
    raise TypeError(f"{op}: {name} must have the dtype of q ({dtype}), got {x.dtype}")
  if x.ndim != len(shape) or any(w is not None and g != w for g, w in zip(x.shape, shape)):
    want = "(" + ", ".join("?" if w is None else str(w) for w in shape) + ")"
    raise ValueError(f"{op}: {name} must have shape {want}, got {tuple(x.shape)}")
  if x.size == 0:
    raise ValueError(f"{op}: {name} must not be empty, got shape {tuple(x.shape)}")


def _mask_operand(op, name, x, shape, allow_bool):
  """An integer (or, for validity masks, bool) array of exactly `shape`, as int32."""
  _array(op, name, x)
  dt = jnp.dtype(x.dtype)
  if not (jnp.issubdtype(dt, jnp.integer) or (allow_bool and dt == jnp.bool_)):
    raise TypeError(f"{op}: {name} must be {'bool or ' if allow_bool else ''}an integer array, got {x.dtype}")
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
  return (x != 0).astype(jnp.int32) if allow_bool else x.astype(jnp.int32)


def _static_float(op, name, value, positive):
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise TypeError(f"{op}: {name} must be a Python or numpy number (a static value), got {type(value).__name__}")
  v = float(value)
  if not math.isfinite(v) or (positive and v <= 0):
    raise ValueError(f"{op}: {name} must be finite{' and > 0' if positive else ''}, got {value!r}")
  return v


# ---------------------------------------------------------------------------------------------
# attention


def attention(q, k, v, *, mask=None, block_ids=None, q_block_ids=None, k_block_ids=None, k_valid=None,
              q_valid=None, prefix_kv=None, softmax_scale=None, softcap=None, return_lse: bool = False):
  """Flash attention: softmax(softcap(softmax_scale * q k^T), visible keys) v, fp32 softmax.

  Args:
    q: (B, Tq, Hq, D) bfloat16 or float16, D <= 256 (64, 128 and 256 run natively; other head dims
      are zero-padded to the next of these, which leaves the logits unchanged).
    k, v: (B, Tk, Hkv, D) of q's dtype; Hq must be a multiple of Hkv (grouped-query / multi-query
      attention: query head h reads KV head h // (Hq // Hkv)).
    mask: None or "causal". Causal aligns the queries with the end of the key axis (Tk_total = Tp + Tk
      keys): query i sits at position Tk_total - Tq + i and sees keys j <= that position::

        keys    0 1 2 3 4 5          (Tk_total = 6, Tq = 2)
        query 0 x x x x x .
        query 1 x x x x x x

      It is implemented as block ids = positions, so it cannot be combined with block ids; it can with
      k_valid and q_valid.
    block_ids: (B, T) integer, self-attention shorthand for q_block_ids = k_block_ids = block_ids
      (needs Tq == Tk_total).
    q_block_ids, k_block_ids: (B, Tq) and (B, Tk_total) integer, given together: query i sees key j
      only if k_block_ids[j] <= q_block_ids[i] (pi0's block-causal mask: the prefix one block, the
      suffix one or more later blocks).
    k_valid: (B, Tk_total) bool or integer (nonzero: valid): invalid keys are seen by no query.
    q_valid: (B, Tq) bool or integer (nonzero: valid): invalid queries (padding) see no key: o = 0,
      lse = -inf, and they pass no gradient (dq = 0 on their rows, nothing to dk / dv). They cost
      nothing where they fill whole query tiles (128 folded rows, 128 / (Hq / Hkv) queries): those
      tiles skip every key tile, forward and backward. Works with every mask. Block id -2**31 is
      reserved for them: with q_valid, given block ids are clamped to >= -2**31 + 1.
    prefix_kv: optional (k_prefix, v_prefix), each (B, Tp, Hkv, D): keys prepended to (k, v) without
      concatenating them (a cached prefix); the masks span the whole key axis [prefix; k].
    softmax_scale: Python float; None: 1 / sqrt(D) of the given (unpadded) D.
    softcap: None (off) or a float > 0: logits = softcap * tanh(logits / softcap) (Gemma 2).
    return_lse: also return the log-sum-exp of the visible logits. It carries no gradient.

  A query that sees no key at all gets o = 0 (lse = -inf) and passes no gradient.

  Differentiable in q, k, v and prefix_kv (the backward is the fused kernel too); the masks get no
  gradient. Works under jit, grad, vmap (vmapped axes are folded into the kernel's batch), scan and
  remat.

  Returns:
    o (B, Tq, Hq, D) in q's dtype; with return_lse also lse (B, Hq, Tq) float32.
  """
  op = "attention"
  _array(op, "q", q)
  if q.ndim != 4:
    raise ValueError(f"{op}: q must have shape (B, Tq, Hq, D), got {tuple(getattr(q, 'shape', ()))}")
  _float_operand(op, "q", q, (None,) * 4, None)
  dtype = jnp.dtype(q.dtype)
  b, tq, hq, d = q.shape
  if d > MAX_HEAD_DIM:
    raise ValueError(f"{op}: head_dim (the last axis of q) must be <= {MAX_HEAD_DIM}, got {d}")
  _float_operand(op, "k", k, (b, None, None, d), dtype)
  tk, hkv = k.shape[1], k.shape[2]
  if hq % hkv:
    raise ValueError(f"{op}: the KV heads of k ({hkv}) must divide the query heads of q ({hq})")
  _float_operand(op, "v", v, (b, tk, hkv, d), dtype)
  tp = 0
  if prefix_kv is not None:
    if not isinstance(prefix_kv, (tuple, list)) or len(prefix_kv) != 2:
      raise TypeError(f"{op}: prefix_kv must be a pair (k_prefix, v_prefix), got {type(prefix_kv).__name__}")
    _float_operand(op, "prefix_kv[0]", prefix_kv[0], (b, None, hkv, d), dtype)
    tp = prefix_kv[0].shape[1]
    _float_operand(op, "prefix_kv[1]", prefix_kv[1], (b, tp, hkv, d), dtype)
  tk_total = tp + tk

  _choice = (None, "causal")
  if mask not in _choice:
    raise ValueError(f"{op}: mask must be one of {_choice}, got {mask!r}")
  if (q_block_ids is None) != (k_block_ids is None):
    raise ValueError(f"{op}: q_block_ids and k_block_ids must be given together")
  if block_ids is not None:
    if q_block_ids is not None:
      raise ValueError(f"{op}: give block_ids or q_block_ids/k_block_ids, not both")
    if tq != tk_total:
      raise ValueError(f"{op}: block_ids needs as many queries as keys (Tq = {tq}, Tk_total = {tk_total}); "
                       "use q_block_ids and k_block_ids")
    q_block_ids = k_block_ids = block_ids
  if mask == "causal":
    if q_block_ids is not None:
      raise ValueError(f"{op}: mask='causal' cannot be combined with block ids (express it in the block ids)")
    q_block = jnp.broadcast_to(jnp.arange(tk_total - tq, tk_total, dtype=jnp.int32), (b, tq))
    k_block = jnp.broadcast_to(jnp.arange(tk_total, dtype=jnp.int32), (b, tk_total))
  elif q_block_ids is not None:
    name = "block_ids" if block_ids is not None else "q_block_ids"
    q_block = _mask_operand(op, name, q_block_ids, (b, tq), False)
    k_block = _mask_operand(op, "block_ids" if block_ids is not None else "k_block_ids", k_block_ids,
                            (b, tk_total), False)
  else:
    q_block = k_block = None
  valid = None if k_valid is None else _mask_operand(op, "k_valid", k_valid, (b, tk_total), True)
  if q_valid is not None:
    q_ok = _mask_operand(op, "q_valid", q_valid, (b, tq), True) != 0
    # An invalid query gets the lowest block id, below every key's: it sees nothing, and a query tile
    # made only of such rows lists no key tile in the kernels.
    lowest = np.int32(np.iinfo(np.int32).min)
    if q_block is None:
      q_block, k_block = jnp.zeros((b, tq), jnp.int32), jnp.zeros((b, tk_total), jnp.int32)
    q_block = jnp.where(q_ok, jnp.maximum(q_block, lowest + 1), lowest)
    k_block = jnp.maximum(k_block, lowest + 1)

  scale = d ** -0.5 if softmax_scale is None else _static_float(op, "softmax_scale", softmax_scale, False)
  cap = 0.0 if softcap is None else _static_float(op, "softcap", softcap, True)
  return_lse = bool(return_lse)

  dk = kernel_head_dim(d)
  pad = (lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, dk - d)))) if dk != d else (lambda x: x)
  empty_mask = jnp.zeros((b, 0), jnp.int32)
  if prefix_kv is None:
    sources = (pad(k), pad(v), jnp.zeros((b, 0, hkv, dk), dtype), jnp.zeros((b, 0, hkv, dk), dtype))
  else:
    sources = (pad(prefix_kv[0]), pad(prefix_kv[1]), pad(k), pad(v))
  o, lse = _flash(pad(q), *sources,
                  empty_mask if q_block is None else q_block,
                  empty_mask if k_block is None else k_block,
                  empty_mask if valid is None else valid,
                  scale, cap, q_block is not None, valid is not None)
  o = o[..., :d] if dk != d else o
  return (o, jax.lax.stop_gradient(lse)) if return_lse else o


# ---------------------------------------------------------------------------------------------
# openpi's mask convention


def make_attention_mask_ids(input_mask, ar_mask):
  """openpi's (input_mask, ar_mask) as (block_ids, k_valid) for `attention`.

  openpi's `make_attn_mask(input_mask, mask_ar)` lets token i see token j iff
  cumsum(ar_mask)[j] <= cumsum(ar_mask)[i] and input_mask[i] and input_mask[j]: a token with
  ar_mask true starts a new block that earlier tokens cannot see. Here block_ids = cumsum(ar_mask)
  and valid = input_mask, passed as both k_valid and q_valid, give exactly that mask: padded tokens
  neither see nor are seen.

  Args:
    input_mask: (B, T) bool, true for real tokens.
    ar_mask: (B, T) or (T,) bool or integer.

  Returns:
    block_ids (B, T) int32 and valid (B, T) bool (for k_valid and q_valid).
  """
  op = "make_attention_mask_ids"
  _array(op, "input_mask", input_mask)
  _array(op, "ar_mask", ar_mask)
  if input_mask.ndim != 2:
    raise ValueError(f"{op}: input_mask must have shape (B, T), got {tuple(input_mask.shape)}")
  if tuple(ar_mask.shape) not in (tuple(input_mask.shape), input_mask.shape[1:]):
    raise ValueError(f"{op}: ar_mask must have shape {tuple(input_mask.shape)} or {input_mask.shape[1:]}, "
                     f"got {tuple(ar_mask.shape)}")
  ar = jnp.broadcast_to(jnp.asarray(ar_mask).astype(jnp.int32), input_mask.shape)
  return jnp.cumsum(ar, axis=1, dtype=jnp.int32), jnp.asarray(input_mask).astype(bool)


def openpi_attention(q, k, v, *, input_mask, ar_mask, softmax_scale=None, softcap=None,
                     invalid_queries: str = "zero"):
  """Self-attention under openpi's mask: a drop-in for `softmax(where(make_attn_mask(input_mask,
  ar_mask), q k^T * scale, big_neg)) v` with q (B, T, Hq, D), k, v (B, T, Hkv, D).

  The mask is openpi's: padded tokens neither see nor are seen (k_valid = q_valid = input_mask), so
  padded query rows cost the kernels nothing where they fill whole query tiles. Valid query rows
  give openpi's result. On invalid (padding) query rows openpi's softmax over all-equal `big_neg`
  logits returns the plain mean of v over all T keys, which is not meaningful (openpi's losses
  ignore those tokens); `invalid_queries` chooses what they hold:

    "zero" (default): o = 0, the kernel's own output for a query that sees no key (no gradient
      flows from those rows).
    "mean_v": openpi's exact values there: the mean of v over all keys of the query's KV head
      (gradient flows to v through the mean, as in openpi).

  Returns o (B, T, Hq, D) in q's dtype.
  """
  op = "openpi_attention"
  if invalid_queries not in ("zero", "mean_v"):
    raise ValueError(f"{op}: invalid_queries must be 'zero' or 'mean_v', got {invalid_queries!r}")
  block_ids, valid = make_attention_mask_ids(input_mask, ar_mask)
  o = attention(q, k, v, block_ids=block_ids, k_valid=valid, q_valid=valid, softmax_scale=softmax_scale,
                softcap=softcap)
  if invalid_queries == "zero":
    return o
  hq = q.shape[2]
  mean = jnp.mean(v.astype(jnp.float32), axis=1)  # (B, Hkv, D)
  fill = jnp.repeat(mean, hq // v.shape[2], axis=1)[:, None].astype(o.dtype)  # (B, 1, Hq, D)
  return jnp.where(valid[:, :, None, None], o, fill)
