"""Raw FFI calls of flash attention (csrc/jax_ffi/attention.cc). Callers validate and pad; these only
build the custom calls.

Operands are always the eight arrays q, k, v, k2, v2, q_block, k_block, k_valid: an absent second key
source is (B, 0, Hkv, D) and an absent mask a zero-size int32 array, with the attributes
has_block_mask / has_valid_mask saying which masks are present.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flashrt_jax import ffi as _ffi

_CPU_WORKSPACE_BYTES = 16  # the CPU handlers need none; XLA still wants a buffer


def bwd_workspace_bytes(batch: int, tq: int, tk: int, hq: int, hkv: int, head_dim: int) -> int:
  """Scratch bytes of the CUDA backward, from attention.h through the compiled module."""
  return int(_ffi._MODULES["cpu"].attention_bwd_workspace_bytes(batch, tq, tk, hq, hkv, head_dim))


def _attrs(softmax_scale, softcap, has_block_mask, has_valid_mask):
  # Attributes are exact-typed: float32 and numpy bools (a Python float would be f64).
  return dict(softmax_scale=np.float32(softmax_scale), softcap=np.float32(softcap),
              has_block_mask=np.bool_(has_block_mask), has_valid_mask=np.bool_(has_valid_mask))


def attention_fwd(q, k, v, k2, v2, q_block, k_block, k_valid, *, softmax_scale: float, softcap: float,
                  has_block_mask: bool, has_valid_mask: bool):
  """q (B, Tq, Hq, D); k, v (B, Tk1, Hkv, D); k2, v2 (B, Tk2, Hkv, D); masks int32 (B, Tq) / (B, Tk)
  or empty -> o (B, Tq, Hq, D), lse (B, Hq, Tq) float32."""
  b, tq, hq, _ = q.shape
  results = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, tq), jnp.float32))
  # vmapped axes become leading batch axes, which the handler folds into its batch.
  call = jax.ffi.ffi_call("flashrt_attention_fwd", results, vmap_method="broadcast_all")
  return tuple(call(q, k, v, k2, v2, q_block, k_block, k_valid,
                    **_attrs(softmax_scale, softcap, has_block_mask, has_valid_mask)))


def attention_bwd(q, k, v, k2, v2, q_block, k_block, k_valid, o, lse, d_o, *, softmax_scale: float,
                  softcap: float, has_block_mask: bool, has_valid_mask: bool):
  """The forward's operands plus o, lse and the output cotangent d_o -> dq, dk, dv, dk2, dv2.

  The CUDA kernels' scratch is a last, dropped uint8 result; vmapped axes become leading batch axes,
  which the handler folds into its batch (the workspace, sized per call, then covers them)."""
  b, tq, hq, d = q.shape
  tk, hkv = k.shape[1] + k2.shape[1], k.shape[2]
  results = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, k2, v2))
  attrs = _attrs(softmax_scale, softcap, has_block_mask, has_valid_mask)

  def with_workspace(nbytes):
    def run(*ops):
      out = jax.ffi.ffi_call("flashrt_attention_bwd", results + (jax.ShapeDtypeStruct((nbytes,), jnp.uint8),),
                             vmap_method="broadcast_all")(*ops, **attrs)
      return tuple(out[:-1])
    return run

  cuda_bytes = max(_CPU_WORKSPACE_BYTES, bwd_workspace_bytes(b, tq, tk, hq, hkv, d))
  return jax.lax.platform_dependent(q, k, v, k2, v2, q_block, k_block, k_valid, o, lse, d_o,
                                    cpu=with_workspace(_CPU_WORKSPACE_BYTES), default=with_workspace(cuda_bytes))
