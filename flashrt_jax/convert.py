"""Convert Flax parameter trees between float kernels and frozen FP8 kernels.

The frozen layout (what `Fp8Dense`, `Fp8DenseGeneral`, `Fp8Einsum` and `Fp8Linear` read with
`frozen=True`) replaces a float `kernel` by two arrays in the same place of the tree:

- `kernel`: float8_e4m3fn, the Flax kernel with its contracted axes moved last, the other axes kept
  in order: `(*free, *contracted)`. For a `Dense` kernel `(K, N)` that is `(N, K)`, the row-major
  "TN" operand the FP8 GEMM reads with no transpose; every layout reshapes to it for free.
- `kernel_scale`: float32, `()` (per tensor) or `free` (one scale per output channel).

So `real_kernel ≈ moveaxis(kernel * scale, contracted back)`, 1 byte per parameter, no float copy.

Which axes a layer contracts is not written in the tree: both functions take it from a predicate
(`Layout`). The default, "all axes but the last", is right for `Dense`/`Linear` (`(K, N)`),
`DenseGeneral` with an int `features`, and einsums whose kernel ends in the only output axis
(`"...d,df->...f"`, `"BTNH,NHD->BTD"`); openpi's `"BTD,NDH->BTNH"` contracts `(1,)`. Layers stacked
by `nn.scan` / `nnx.vmap` have leading stacked axes, quantized one layer at a time (`stacked=1`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from flashrt_jax import _checks
from flashrt_jax.ops.gemm import Fp8Weight

E4M3 = jnp.dtype(jnp.float8_e4m3fn)
GRANULARITIES = ("tensor", "channel")


class Layout(NamedTuple):
  """How a layer reads its kernel.

  Attributes:
    axes: the kernel axes the layer contracts, counted without the stacked axes; None: all but
      the last.
    stacked: leading axes of layers stacked by `nn.scan` / `nnx.vmap`: each index is its own layer
      with its own scale, and keeps its place in front of the frozen layout.
  """

  axes: Sequence[int] | None = None
  stacked: int = 0


Predicate = Callable[[tuple, jax.Array], "bool | Sequence[int] | Layout | None"]


def _contract_axes(ndim: int, axes: Sequence[int] | None = None, *, op: str = "convert") -> tuple[int, ...]:
  """Normalizes contracted kernel axes: sorted, non-negative; None means all axes but the last."""
  if axes is None:
    return tuple(range(ndim - 1))
  norm = tuple(sorted(a % ndim if -ndim <= a < ndim else a for a in axes))
  if not norm or len(set(norm)) != len(norm) or norm[0] < 0 or norm[-1] >= ndim or len(norm) == ndim:
    raise ValueError(f"{op}: contracted axes must be distinct axes of a rank-{ndim} kernel that leave at "
                     f"least one output axis, got {tuple(axes)}")
  return norm


def _frozen_shapes(shape: Sequence[int], axes: Sequence[int], granularity: str) -> tuple[tuple, tuple]:
  """(kernel, kernel_scale) shapes of the frozen layout of a float kernel of `shape`."""
  free = tuple(shape[i] for i in range(len(shape)) if i not in axes)
  data = free + tuple(shape[i] for i in axes)
  return data, (() if granularity == "tensor" else free)


def _check_stacked(op: str, ndim: int, stacked) -> int:
  if isinstance(stacked, bool) or not isinstance(stacked, int) or not 0 <= stacked <= ndim - 2:
    raise ValueError(f"{op}: stacked must be an int in [0, {ndim - 2}] for a rank-{ndim} kernel, got {stacked!r}")
  return stacked


def quantize_kernel(kernel, axes: Sequence[int] | None = None, granularity: str = "tensor", stacked: int = 0):
  """Quantizes one float Flax kernel into the frozen layout.

  Args:
    kernel: (*stacked, ..., N) float Flax kernel, of rank >= 2 without the stacked axes.
    axes: the kernel axes the layer contracts (not counting stacked axes); None: all but the last.
    granularity: "tensor" (one scale per layer) or "channel" (one per output feature).
    stacked: leading axes of stacked layers (`nn.scan`), each quantized on its own.

  Returns:
    (data, scale): data (*stacked, *free, *contracted) float8_e4m3fn; scale (*stacked,) or
    (*stacked, *free) float32.

  >>> data, scale = quantize_kernel(jnp.ones((64, 32)))
  >>> data.shape, data.dtype, scale.shape
  ((32, 64), dtype(float8_e4m3fn), ())
  """
  op = "quantize_kernel"
  _checks.array(op, "kernel", kernel, _checks.FLOAT_DTYPES, min_rank=2)
  _checks.choice(op, "granularity", granularity, GRANULARITIES)
  if _check_stacked(op, kernel.ndim, stacked):
    one = lambda k: quantize_kernel(k, axes, granularity, stacked - 1)
    return jax.vmap(one)(kernel)
  axes = _contract_axes(kernel.ndim, axes, op=op)
  free = tuple(i for i in range(kernel.ndim) if i not in axes)
  data_shape, scale_shape = _frozen_shapes(kernel.shape, axes, granularity)
  n = 1
  for d in data_shape[:len(free)]:
    n *= d
  w = Fp8Weight.from_kernel(jnp.transpose(kernel, free + axes).reshape(n, -1).T, granularity)
  return w.data.reshape(data_shape), w.scale.reshape(scale_shape)


def dequantize_kernel(data, scale, axes: Sequence[int] | None = None, dtype=jnp.float32, stacked: int = 0):
  """Inverse of `quantize_kernel`: the float Flax kernel, in dtype.

  Args:
    data: (*stacked, *free, *contracted) float8_e4m3fn.
    scale: (*stacked,) or (*stacked, *free) float32.
    axes, stacked: as given to `quantize_kernel`.
    dtype: the kernel's dtype.

  Returns:
    The Flax kernel: data's axes moved back to their places, times scale.
  """
  op = "dequantize_kernel"
  _checks.array(op, "data", data, (E4M3,), min_rank=2)
  if _check_stacked(op, data.ndim, stacked):
    if tuple(scale.shape[:1]) != data.shape[:1]:
      raise ValueError(f"{op}: scale must lead with the stacked axes {data.shape[:stacked]}, got {tuple(scale.shape)}")
    return jax.vmap(lambda d, s: dequantize_kernel(d, s, axes, dtype, stacked - 1))(data, scale)
  axes = _contract_axes(data.ndim, axes, op=op)
  n_free = data.ndim - len(axes)
  if tuple(scale.shape) not in ((), data.shape[:n_free]):
    raise ValueError(f"{op}: scale must have shape () or {data.shape[:n_free]} for data {data.shape}, "
                     f"got {tuple(scale.shape)}")
  real = data.astype(jnp.float32) * scale.astype(jnp.float32).reshape(scale.shape + (1,) * len(axes))
  free = tuple(i for i in range(data.ndim) if i not in axes)
  inverse = sorted(range(data.ndim), key=lambda i: (free + axes)[i])
  return jnp.transpose(real, inverse).astype(dtype)


def _layout(predicate, path, array) -> Layout | None:
  """The predicate's answer as a Layout, or None to leave the kernel as it is."""
  answer = True if predicate is None else predicate(path, array)
  if answer is False or answer is None:
    return None
  if answer is True:
    return Layout()
  return answer if isinstance(answer, Layout) else Layout(tuple(answer))


def _map_layers(tree, fn, path=()):
  """Applies fn(path, layer_dict) -> layer_dict to every mapping, bottom up, keeping FrozenDicts."""
  out = {k: _map_layers(v, fn, path + (k,)) if isinstance(v, Mapping) else v for k, v in tree.items()}
  out = fn(path, out)
  return FrozenDict(out) if isinstance(tree, FrozenDict) else out


def quantize_params(params, predicate: Predicate | None = None, granularity: str = "tensor"):
  """Replaces selected float `kernel`s of a Flax parameter tree by frozen FP8 ones.

  Quantizes once, on the device, into the layout frozen flashrt_jax modules read (module doc).

  Args:
    params: nested dicts (or FrozenDicts) of arrays, e.g. `variables["params"]` of a linen model or
      `nnx.state(model).to_pure_dict()`.
    predicate: `predicate(path, kernel)` for every float `kernel` of rank >= 2, path the tuple of
      keys down to it (ending in "kernel"). False/None: keep it; True: quantize with the default
      `Layout()` (contract all axes but the last); a sequence of ints: the contracted axes; a
      `Layout`: contracted axes and stacked axes. None quantizes every kernel with `Layout()`.
    granularity: "tensor" (one scale per layer) or "channel" (one per output feature).

  Returns:
    A new tree: each selected `kernel` is float8_e4m3fn data, with a `kernel_scale` beside it.

  >>> params = {"dense": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros((32,))}}
  >>> q = quantize_params(params)
  >>> q["dense"]["kernel"].shape, q["dense"]["kernel"].dtype, q["dense"]["kernel_scale"].shape
  ((32, 64), dtype(float8_e4m3fn), ())
  """
  op = "quantize_params"
  _checks.choice(op, "granularity", granularity, GRANULARITIES)

  def layer(path, d):
    k = d.get("kernel")
    if k is None or isinstance(k, Mapping) or "kernel_scale" in d:
      return d
    if jnp.dtype(k.dtype) not in _checks.FLOAT_DTYPES or k.ndim < 2:
      return d
    layout = _layout(predicate, path + ("kernel",), k)
    if layout is None:
      return d
    data, scale = quantize_kernel(k, layout.axes, granularity, layout.stacked)
    return {**d, "kernel": data, "kernel_scale": scale}

  return _map_layers(params, layer)


def dequantize_params(params, predicate: Predicate | None = None, dtype=jnp.float32):
  """Turns frozen FP8 `kernel` + `kernel_scale` pairs back into float Flax kernels.

  Args:
    params: a tree from `quantize_params` or from a frozen module's init.
    predicate: `predicate(path, data)` for every frozen kernel, answering as it did for
      `quantize_params` (True or None: `Layout()`; ints or a `Layout`; False: keep it).
    dtype: dtype of the restored kernels.

  Returns:
    A new tree that loads into the non-frozen modules: `kernel` float (Flax shape), no `kernel_scale`.
    Values carry the FP8 rounding error (about 2-3% relative per element for E4M3).
  """
  def layer(path, d):
    k, s = d.get("kernel"), d.get("kernel_scale")
    if s is None or k is None or isinstance(k, Mapping) or jnp.dtype(k.dtype) != E4M3:
      return d
    layout = _layout(predicate, path + ("kernel",), k)
    if layout is None:
      return d
    out = {key: v for key, v in d.items() if key != "kernel_scale"}
    out["kernel"] = dequantize_kernel(k, s, layout.axes, dtype, layout.stacked)
    return out

  return _map_layers(params, layer)
