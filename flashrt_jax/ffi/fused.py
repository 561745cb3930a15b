"""Raw FFI calls of the fused FP8 producers (norms and GLU + quantize). Callers validate; these only
build the custom calls.

Optional operands follow the first one in a fixed order, flagged by boolean attributes; the results
are q, then the op's own (new residual), then
  - current scaling: scale and amax, () or (..., 1) (per row);
  - a given scale (static_scale): amax alone, shaped like the scale, each value over the rows its
    scale value covers (one per vmapped tensor under vmap: a delayed-scaling state's history entry);
then y when asked. amax is max |y| of the float32 values quantized, NaN if any is NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NORM_KINDS = {"rms": 0, "layer": 1}
ACTIVATIONS = {"gelu_tanh": 0, "silu": 1}


def _vmap_method(scale, rowwise: bool) -> str:
  # Rows are independent and per-column operands / given scales may carry leading batch axes (the
  # kernels broadcast them over groups of rows), so a vmapped call is one call over more rows.
  # A per-tensor current scale is per vmapped tensor: that one runs per batch element.
  return "broadcast_all" if scale is not None or rowwise else "sequential"


def _scaling_results(x_shape, scale, rowwise: bool):
  if scale is not None:
    return [jax.ShapeDtypeStruct(scale.shape, jnp.float32)]
  s = jax.ShapeDtypeStruct(x_shape[:-1] + (1,) if rowwise else (), jnp.float32)
  return [s, s]


def norm_fp8(x, residual, weight, bias, scale_mod, shift_mod, scale, *, kind: str, eps: float,
             offset: float, dtype, rowwise: bool, with_y: bool):
  """x (..., W); residual like x or None; weight, bias (..., W) float32 or None; scale_mod and
  shift_mod (..., W) of x's dtype or None, broadcast over groups of rows; scale () / (..., 1) float32
  or None (current scaling, per row if rowwise).

  Returns [q, residual_out?, scale?, amax, y?] as a list.
  """
  present = dict(residual=residual, weight=weight, bias=bias, scale_mod=scale_mod, shift_mod=shift_mod,
                 scale=scale)
  operands = [x] + [a for a in present.values() if a is not None]
  results = [jax.ShapeDtypeStruct(x.shape, dtype)]
  if residual is not None:
    results.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
  results += _scaling_results(x.shape, scale, rowwise)
  if with_y:
    results.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
  call = jax.ffi.ffi_call("flashrt_norm_fp8", results, vmap_method=_vmap_method(scale, rowwise))
  # Attributes are exact-typed: float32 and int32 numpy scalars, numpy bools.
  return list(call(*operands, kind=np.int32(NORM_KINDS[kind]), eps=np.float32(eps), offset=np.float32(offset),
                   has_residual=np.bool_(residual is not None), has_weight=np.bool_(weight is not None),
                   has_bias=np.bool_(bias is not None), has_mod=np.bool_(scale_mod is not None),
                   static_scale=np.bool_(scale is not None), with_y=np.bool_(with_y)))


def glu_fp8(gate, up, scale, *, activation: str, dtype, rowwise: bool, with_y: bool):
  """gate (..., F) and up (..., F), or up None and gate (..., 2F) = [gate | up]; scale as for
  norm_fp8. Returns [q (..., F), scale?, amax, y?] as a list."""
  out_shape = gate.shape[:-1] + ((gate.shape[-1] // 2,) if up is None else (gate.shape[-1],))
  operands = [gate] + [a for a in (up, scale) if a is not None]
  results = [jax.ShapeDtypeStruct(out_shape, dtype)]
  results += _scaling_results(out_shape, scale, rowwise)
  if with_y:
    results.append(jax.ShapeDtypeStruct(out_shape, gate.dtype))
  call = jax.ffi.ffi_call("flashrt_glu_fp8", results, vmap_method=_vmap_method(scale, rowwise))
  return list(call(*operands, activation=np.int32(ACTIVATIONS[activation]), merged=np.bool_(up is None),
                   static_scale=np.bool_(scale is not None), with_y=np.bool_(with_y)))


def glu_bwd_fp8(gate_up, dh, col_scale, scale, *, activation: str, dtype, rowwise: bool, with_y: bool):
  """gate_up (..., 2F) = [gate | up], dh (..., F) of its dtype, col_scale (2F,) float32 or None, scale
  as for norm_fp8. Returns [q (..., 2F), scale?, amax, y?] as a list."""
  operands = [gate_up, dh] + [a for a in (col_scale, scale) if a is not None]
  results = [jax.ShapeDtypeStruct(gate_up.shape, dtype)]
  results += _scaling_results(gate_up.shape, scale, rowwise)
  if with_y:
    results.append(jax.ShapeDtypeStruct(gate_up.shape, gate_up.dtype))
  call = jax.ffi.ffi_call("flashrt_glu_bwd_fp8", results, vmap_method=_vmap_method(scale, rowwise))
  return list(call(*operands, activation=np.int32(ACTIVATIONS[activation]),
                   has_col_scale=np.bool_(col_scale is not None), static_scale=np.bool_(scale is not None),
                   with_y=np.bool_(with_y)))
