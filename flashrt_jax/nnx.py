"""Flax nnx layers on the FP8 GEMM: `Fp8Linear` and `Fp8Einsum`, mirroring `nnx.Linear` / `nnx.Einsum`.

Trainable layers hold `kernel` and `bias` as `nnx.Param` with nnx's shapes and initial values, so
linen and nnx checkpoints load unchanged. Frozen layers (`frozen=True`) hold `kernel` (float8_e4m3fn,
the frozen layout of `flashrt_jax.convert`) and `kernel_scale` (float32) as `FrozenFp8` variables:
not `nnx.Param`, so `nnx.grad`, `nnx.Optimizer` and `nnx.state(model, nnx.Param)` leave them out and
their gradient is never computed. For the drop-in into a stock layer use
`nnx.Linear(..., dot_general=flashrt_jax.linen.fp8_dot_general)`.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from flashrt_jax import _checks
from flashrt_jax.convert import GRANULARITIES, quantize_kernel
from flashrt_jax.linen import _check_kernel, _contract, _einsum, _einsum_plan, _Frozen, _kernel_axes, _promote
from flashrt_jax.ops.gemm import Fp8Recipe

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()


class FrozenFp8(nnx.Variable):
  """A frozen FP8 kernel (float8_e4m3fn) or its float32 scale. Not an `nnx.Param`: filters and
  transforms that select `nnx.Param` (nnx.grad, nnx.Optimizer) skip it."""


def _set_kernel(mdl, kernel, axes, frozen: bool, granularity: str):
  if not frozen:
    mdl.kernel = nnx.Param(kernel)
    return
  _checks.choice(type(mdl).__name__, "weight_granularity", granularity, GRANULARITIES)
  data, scale = quantize_kernel(kernel, axes, granularity)
  mdl.kernel, mdl.kernel_scale = FrozenFp8(data), FrozenFp8(scale)


def _get_kernel(mdl):
  if not mdl.frozen:
    kernel = mdl.kernel[...]
  else:
    kernel = _Frozen(mdl.kernel[...], mdl.kernel_scale[...])
  _check_kernel(type(mdl).__name__, kernel, mdl.frozen, kernel.data.shape if mdl.frozen else None)
  return kernel


class Fp8Linear(nnx.Module):
  """`nnx.Linear` with an FP8 GEMM: y = x @ kernel + bias over the last axis.

  Args:
    in_features: K. out_features: N.
    use_bias: whether to add a bias (N,) (default: True).
    dtype: the computation dtype (default: infer from inputs and params).
    param_dtype: the dtype passed to the initializers (default: float32).
    precision: accepted for `nnx.Linear` compatibility; the FP8 GEMM has one precision.
    kernel_init: initializer of the (K, N) kernel. bias_init: initializer of the bias.
    recipe: `Fp8Recipe`; None: the default.
    frozen: hold the kernel as FP8 `FrozenFp8` variables: `kernel` (N, K) float8_e4m3fn and
      `kernel_scale`; its gradient is never computed.
    weight_granularity: how a frozen kernel is quantized: "tensor" or "channel".
    rngs: `nnx.Rngs` (the same keys as `nnx.Linear` draws).

  Inputs (..., K) give (..., N) in the computation dtype.

  >>> layer = Fp8Linear(64, 32, rngs=nnx.Rngs(0))
  >>> layer(jnp.ones((4, 64))).shape
  (4, 32)
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, dtype: Any = None,
               param_dtype: Any = jnp.float32, precision: Any = None, kernel_init: Any = default_kernel_init,
               bias_init: Any = default_bias_init, recipe: Fp8Recipe | None = None, frozen: bool = False,
               weight_granularity: str = "tensor", rngs: nnx.Rngs):
    kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
    _set_kernel(self, kernel, (0,), frozen, weight_granularity)
    self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None
    self.in_features, self.out_features, self.use_bias = in_features, out_features, use_bias
    self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
    self.recipe, self.frozen, self.weight_granularity = recipe, frozen, weight_granularity

  def __call__(self, inputs):
    """inputs (..., in_features) float -> (..., out_features)."""
    if inputs.ndim < 1 or inputs.shape[-1] != self.in_features:
      raise ValueError(f"Fp8Linear: inputs must have shape (..., {self.in_features}), got {inputs.shape}")
    bias = None if self.bias is None else self.bias[...]
    inputs, kernel, bias = _promote(inputs, _get_kernel(self), bias, self.dtype, self.param_dtype)
    return _contract("Fp8Linear", inputs, (inputs.ndim - 1,), kernel, (0,), bias, self.recipe)


class Fp8Einsum(nnx.Module):
  """`nnx.Einsum` with an FP8 GEMM: einsum(einsum_str, inputs, kernel) + bias.

  Matmul-shaped equations run as one `fp8_dense` call and others fall back to `jnp.einsum`, as in
  `flashrt_jax.linen.Fp8Einsum`.

  Args:
    einsum_str: the equation "inputs,kernel->out"; `__call__` may override it with one that
      contracts the same kernel axes.
    kernel_shape: the kernel shape.
    bias_shape: the bias shape (None: no bias); its size must equal the product of the kernel
      dims of the output's kernel letters.
    dtype, param_dtype, precision, kernel_init, bias_init: as in `nnx.Einsum`; precision only
      applies to the fallback.
    recipe, frozen, weight_granularity: as in `Fp8Linear`. The frozen kernel is the kernel with
      its contracted axes moved last, e.g. (N, H, D) for `"BTD,NDH->BTNH"`.
    rngs: `nnx.Rngs`.

  >>> layer = Fp8Einsum("BTD,NDH->BTNH", (2, 64, 16), (2, 16), rngs=nnx.Rngs(0))
  >>> layer(jnp.ones((1, 5, 64))).shape
  (1, 5, 2, 16)
  """

  def __init__(self, einsum_str: str, kernel_shape, bias_shape=None, *, dtype: Any = None,
               param_dtype: Any = jnp.float32, precision: Any = None, kernel_init: Any = default_kernel_init,
               bias_init: Any = default_bias_init, recipe: Fp8Recipe | None = None, frozen: bool = False,
               weight_granularity: str = "tensor", rngs: nnx.Rngs):
    self.einsum_str = einsum_str.replace(" ", "")
    self.k_axes = _kernel_axes("Fp8Einsum", self.einsum_str)
    kernel = kernel_init(rngs.params(), tuple(kernel_shape), param_dtype)
    _set_kernel(self, kernel, self.k_axes, frozen, weight_granularity)
    bias_shape = None if bias_shape is None else tuple(bias_shape)
    self.bias = None if bias_shape is None else nnx.Param(bias_init(rngs.params(), bias_shape, param_dtype))
    self.kernel_shape, self.bias_shape = tuple(kernel_shape), bias_shape
    self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
    self.recipe, self.frozen, self.weight_granularity = recipe, frozen, weight_granularity

  def __call__(self, inputs, einsum_str: str | None = None):
    """inputs float -> the einsum's output."""
    op = "Fp8Einsum"
    plan = _einsum_plan(op, einsum_str or self.einsum_str, inputs.ndim, self.kernel_shape)
    if self.frozen and plan.k_axes != self.k_axes:
      raise ValueError(f"{op}: einsum_str {einsum_str!r} contracts kernel axes {plan.k_axes}, but the frozen "
                       f"kernel was stored for {self.einsum_str!r} (axes {self.k_axes})")
    bias = None if self.bias is None else self.bias[...]
    inputs, kernel, bias = _promote(inputs, _get_kernel(self), bias, self.dtype, self.param_dtype)
    return _einsum(op, plan, inputs, kernel, bias, self.recipe, self.precision)
