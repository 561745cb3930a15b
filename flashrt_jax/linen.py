"""Flax linen layers on the FP8 GEMM: `Fp8Dense`, `Fp8DenseGeneral`, `Fp8Einsum`, `fp8_dot_general`,
and the fused FP8 feed-forward block `Fp8GluFfn` (openpi's FeedForward parameters).

The layers take the attributes of `nn.Dense` / `nn.DenseGeneral` / `nn.Einsum` (`dtype` is the
computation dtype, promoted as Flax does) plus `recipe` (an `Fp8Recipe`) and `frozen`. They reshape
their contraction to one 2-D matmul and run `fp8_dense`.

Parameters. Trainable (`frozen=False`): `kernel` and `bias` with Flax's names, shapes and initial
values, so Flax and openpi checkpoints load unchanged. Frozen (`frozen=True`): `kernel` is
float8_e4m3fn in the frozen layout `(*free, *contracted)` ((N, K) for a Dense) and `kernel_scale`
float32 `()` or `(*free,)`, both in the `params` collection (see `flashrt_jax.convert`, which builds
them from float trees). The frozen kernel is 1 byte per parameter, has no float copy, and its
gradient is never computed (`jax.grad` gives zeros for it).
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen import initializers
from flax.linen.dtypes import promote_dtype

from flashrt_jax import _checks
from flashrt_jax.convert import GRANULARITIES, _contract_axes, _frozen_shapes, dequantize_kernel, quantize_kernel
from flashrt_jax.ops.fused_dense import fp8_gate_up_weight, fp8_glu_ffn
from flashrt_jax.ops.gemm import Fp8Recipe, Fp8Weight, fp8_dense

E4M3 = jnp.dtype(jnp.float8_e4m3fn)
F32 = jnp.dtype(jnp.float32)
default_kernel_init = initializers.lecun_normal()


class _Frozen(NamedTuple):
  """A frozen kernel as stored: data (*free, *contracted) float8_e4m3fn, scale () or (*free,)."""

  data: jax.Array
  scale: jax.Array


def _identity(perm) -> bool:
  return tuple(perm) == tuple(range(len(perm)))


def _promote(x, kernel, bias, dtype, param_dtype):
  """Flax's promote_dtype; a frozen kernel counts as param_dtype (the dtype it was made from)."""
  if isinstance(kernel, _Frozen):
    x, bias, _ = promote_dtype(x, bias, jnp.zeros((), param_dtype), dtype=dtype)
    return x, kernel, bias
  return promote_dtype(x, kernel, bias, dtype=dtype)


def _contract(op, x, x_axes, kernel, k_axes, bias, recipe):
  """lax.dot_general(x, kernel, ((x_axes, k_axes), ((), ()))) [+ bias] as one `fp8_dense` call.

  x: any rank; x_axes[i] pairs with k_axes[i]. kernel: a float kernel, or `_Frozen` with k_axes
  its contracted axes in the Flax kernel. bias: None or (N,) in the kernel's free-axes order.
  Returns (*x free axes, *kernel free axes) in x's dtype.
  """
  k_shape = kernel.data.shape[-len(k_axes):] if isinstance(kernel, _Frozen) else tuple(
      kernel.shape[a] for a in k_axes)
  x_shape = tuple(x.shape[a] for a in x_axes)
  if x_shape != tuple(k_shape):
    raise ValueError(f"{op}: inputs {x.shape} have sizes {x_shape} on the contracted axes {tuple(x_axes)}, "
                     f"but the kernel contracts sizes {tuple(k_shape)}")
  x_free = [a for a in range(x.ndim) if a not in x_axes]
  if not _identity(x_free + list(x_axes)):
    x = jnp.transpose(x, x_free + list(x_axes))
  lead, k = x.shape[:len(x_free)], int(np.prod(x_shape))
  if isinstance(kernel, _Frozen):
    n_shape = kernel.data.shape[:kernel.data.ndim - len(k_axes)]
    scale = kernel.scale.reshape(-1) if kernel.scale.ndim else kernel.scale
    w = Fp8Weight(kernel.data.reshape(int(np.prod(n_shape)), k), scale)
  else:
    k_free = [a for a in range(kernel.ndim) if a not in k_axes]
    n_shape = tuple(kernel.shape[a] for a in k_free)
    if not _identity(list(k_axes) + k_free):
      kernel = jnp.transpose(kernel, list(k_axes) + k_free)
    w = kernel.reshape(k, int(np.prod(n_shape)))
  y = fp8_dense(x.reshape(lead + (k,)), w, bias, recipe=recipe)
  return y.reshape(lead + tuple(n_shape))


# ---------------------------------------------------------------------------------------------
# dot_general drop-in


def fp8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *,
                    recipe: Fp8Recipe | None = None, **kwargs):
  """`lax.dot_general` that runs plain matmul contractions as an FP8 GEMM (`fp8_dense`).

  A drop-in for `nn.Dense(dot_general=fp8_dot_general)`, `nn.DenseGeneral(dot_general=...)` and
  `nnx.Linear(dot_general=fp8_dot_general)`. Contractions without batch dimensions of float
  operands (float32, bfloat16, float16) that leave an output axis on rhs go to `fp8_dense`, the rhs
  acting as a trainable kernel quantized per tensor on each call; everything else, and any call
  with extra non-None arguments (e.g. `out_sharding`), goes to `lax.dot_general` unchanged.

  Args:
    lhs: (..., K...) activations. rhs: the kernel, (K..., N...) in any axis order.
    dimension_numbers: `((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))`.
    precision: passed to `lax.dot_general` only (the FP8 GEMM has one precision).
    preferred_element_type: dtype of the result, if given.
    recipe: `Fp8Recipe`; bind it with `functools.partial` or use `Fp8DotGeneral(recipe)`.

  Returns:
    (*lhs free axes, *rhs free axes), as `lax.dot_general` orders them; lhs's dtype unless
    preferred_element_type is given.

  >>> layer = nn.Dense(32, dot_general=fp8_dot_general)
  >>> x = jnp.ones((4, 64), jnp.bfloat16)
  >>> layer.apply(layer.init(jax.random.key(0), x), x).shape
  (4, 32)
  """
  (lc, rc), (lb, rb) = dimension_numbers
  extra = {k: v for k, v in kwargs.items() if v is not None}
  dtypes_ok = all(hasattr(a, "dtype") and jnp.dtype(a.dtype) in _checks.FLOAT_DTYPES for a in (lhs, rhs))
  if lb or rb or extra or not dtypes_ok or not rc or len(rc) >= jnp.ndim(rhs):
    if preferred_element_type is not None:
      extra["preferred_element_type"] = preferred_element_type
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **extra)
  y = _contract("fp8_dot_general", lhs, tuple(lc), rhs, tuple(rc), None, recipe)
  return y if preferred_element_type is None else y.astype(preferred_element_type)


@dataclasses.dataclass(frozen=True)
class Fp8DotGeneral:
  """`fp8_dot_general` with a bound recipe: `nn.Dense(dot_general=Fp8DotGeneral(recipe))`.

  Also a `dot_general_cls`: `nn.Dense(dot_general_cls=Fp8DotGeneral)` (default recipe).

  Attributes:
    recipe: the `Fp8Recipe` of every FP8 call; None: the default.

  >>> dot = Fp8DotGeneral(Fp8Recipe(min_rows=0))
  >>> dot(jnp.ones((3, 64)), jnp.ones((64, 16)), (((1,), (0,)), ((), ()))).shape
  (3, 16)
  """

  recipe: Fp8Recipe | None = None

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    return fp8_dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                           recipe=self.recipe, **kwargs)


# ---------------------------------------------------------------------------------------------
# Parameters


def _check_kernel(op: str, kernel, frozen: bool, data_shape=None):
  """Clear errors for a checkpoint of the other kind (float into frozen or FP8 into trainable)."""
  if frozen:
    if jnp.dtype(kernel.data.dtype) != E4M3:
      raise TypeError(f"{op}(frozen=True): param 'kernel' must be float8_e4m3fn of shape {data_shape} (the "
                      f"frozen layout), got {kernel.data.dtype} {kernel.data.shape}; convert float checkpoints "
                      "with flashrt_jax.convert.quantize_params")
    if jnp.dtype(kernel.scale.dtype) != F32:
      raise TypeError(f"{op}(frozen=True): param 'kernel_scale' must be float32, got {kernel.scale.dtype}")
  elif jnp.dtype(kernel.dtype) == E4M3:
    raise TypeError(f"{op}: param 'kernel' is float8_e4m3fn {kernel.shape}, a frozen kernel; set frozen=True "
                    "or convert it with flashrt_jax.convert.dequantize_params")


def _kernel_param(mdl, shape, axes, init):
  """Declares the kernel of `mdl` (Flax shape `shape`, contracted axes `axes`): a float array, or
  `_Frozen` read from params 'kernel' + 'kernel_scale' (quantized from `init` at init time)."""
  op = type(mdl).__name__
  if not mdl.frozen:
    kernel = mdl.param("kernel", init, shape, mdl.param_dtype)
    _check_kernel(op, kernel, False)
    return kernel
  _checks.choice(op, "weight_granularity", mdl.weight_granularity, GRANULARITIES)
  axes = _contract_axes(len(shape), axes, op=op)
  data_shape, scale_shape = _frozen_shapes(shape, axes, mdl.weight_granularity)
  if mdl.is_initializing() and not mdl.has_variable("params", "kernel"):
    # The kernel draws the rng the float layer would and the scale draws none, so a frozen
    # init equals quantize_params of the float layer's init, bias included.
    quantized = []

    def init_data(rng):
      quantized.append(quantize_kernel(nn.meta.unbox(init(rng, shape, mdl.param_dtype)), axes,
                                       mdl.weight_granularity))
      return quantized[0][0]

    data = mdl.param("kernel", init_data)
    mdl.put_variable("params", "kernel_scale", quantized[0][1])
  else:
    data = mdl.param("kernel", lambda _: jnp.zeros(data_shape, E4M3))  # shapes checked by Flax
  kernel = _Frozen(data, mdl.param("kernel_scale", lambda _: jnp.ones(scale_shape, F32)))
  _check_kernel(op, kernel, True, data_shape)
  return kernel


def _canonicalize_tuple(x):
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


# ---------------------------------------------------------------------------------------------
# Layers


class Fp8Dense(nn.Module):
  """`nn.Dense` with an FP8 GEMM: y = x @ kernel + bias over the last axis.

  Attributes:
    features: N, the number of output features.
    use_bias: whether to add a bias (N,) (default: True).
    dtype: the computation dtype (default: infer from inputs and params). The FP8 GEMM takes
      float32, bfloat16 or float16 inputs.
    param_dtype: the dtype passed to the initializers (default: float32).
    precision: accepted for `nn.Dense` compatibility; the FP8 GEMM has one precision.
    kernel_init: initializer of the (K, N) kernel. bias_init: initializer of the bias.
    recipe: `Fp8Recipe` (scaling, backward, `min_rows` below which XLA's dot runs); None: default.
    frozen: store the kernel as FP8 (params 'kernel' (N, K) float8_e4m3fn, 'kernel_scale'); its
      gradient is never computed.
    weight_granularity: how a frozen kernel is quantized at init: "tensor" or "channel".

  Inputs (..., K) give (..., N) in the computation dtype.

  >>> layer = Fp8Dense(features=32)
  >>> params = layer.init(jax.random.key(0), jnp.ones((4, 64)))
  >>> jax.tree_util.tree_map(jnp.shape, params)
  {'params': {'bias': (32,), 'kernel': (64, 32)}}
  """

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = default_kernel_init
  bias_init: Any = initializers.zeros_init()
  recipe: Fp8Recipe | None = None
  frozen: bool = False
  weight_granularity: str = "tensor"

  @nn.compact
  def __call__(self, inputs):
    """inputs (..., K) float -> (..., N)."""
    kernel = _kernel_param(self, (jnp.shape(inputs)[-1], self.features), (0,), self.kernel_init)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    inputs, kernel, bias = _promote(inputs, kernel, bias, self.dtype, self.param_dtype)
    return _contract("Fp8Dense", inputs, (inputs.ndim - 1,), kernel, (0,), bias, self.recipe)


class Fp8DenseGeneral(nn.Module):
  """`nn.DenseGeneral` with an FP8 GEMM: contracts `axis` of the inputs with a kernel
  (*batch, *in, *features), as one (M, K) x (K, N) matmul per batch index.

  Attributes:
    features: int or tuple, the output feature shape.
    axis: int or tuple, the input axes to contract (default: -1).
    batch_dims: leading input axes, each with its own kernel (run as a vmap of the FP8 GEMM).
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as in `nn.DenseGeneral`
      (precision is not used by the FP8 GEMM).
    recipe, frozen, weight_granularity: as in `Fp8Dense`. The frozen kernel is
      (*batch, *features, *in) float8_e4m3fn.

  Returns (*batch, *other input axes, *features).

  >>> layer = Fp8DenseGeneral(features=(2, 16), axis=(-2, -1))
  >>> params = layer.init(jax.random.key(0), jnp.ones((8, 4, 16)))
  >>> jax.tree_util.tree_map(jnp.shape, params)
  {'params': {'bias': (2, 16), 'kernel': (4, 16, 2, 16)}}
  """

  features: int | tuple[int, ...]
  axis: int | tuple[int, ...] = -1
  batch_dims: tuple[int, ...] = ()
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = default_kernel_init
  bias_init: Any = initializers.zeros_init()
  precision: Any = None
  recipe: Fp8Recipe | None = None
  frozen: bool = False
  weight_granularity: str = "tensor"

  @nn.compact
  def __call__(self, inputs):
    """inputs float -> (*batch, *other input axes, *features)."""
    op = "Fp8DenseGeneral"
    features = _canonicalize_tuple(self.features)
    ndim = inputs.ndim
    batch_dims = tuple(sorted(d % ndim for d in _canonicalize_tuple(self.batch_dims)))
    if batch_dims != tuple(range(len(batch_dims))):
      raise ValueError(f"{op}: batch_dims {self.batch_dims} must be consecutive leading dimensions starting from 0")
    axis = tuple(a % ndim if -ndim <= a < ndim else a for a in _canonicalize_tuple(self.axis))
    nb, na = len(batch_dims), len(axis)
    if len(set(axis)) != na or any(not nb <= a < ndim for a in axis):
      raise ValueError(f"{op}: axis {self.axis} must be distinct axes of the inputs {inputs.shape} outside "
                       f"batch_dims {self.batch_dims}")
    batch_shape = inputs.shape[:nb]

    def kernel_init(rng, shape, dtype):
      flat = (int(np.prod(shape[:nb + na])), int(np.prod(shape[nb + na:])))
      kernel = self.kernel_init(rng, flat, dtype)
      if isinstance(kernel, nn.meta.AxisMetadata):
        return nn.meta.replace_boxed(kernel, jnp.reshape(kernel.unbox(), shape))
      return jnp.reshape(kernel, shape)

    def bias_init(rng, shape, dtype):
      bias = self.bias_init(rng, (int(np.prod(shape)),), dtype)
      if isinstance(bias, nn.meta.AxisMetadata):
        return nn.meta.replace_boxed(bias, jnp.reshape(bias.unbox(), shape))
      return jnp.reshape(bias, shape)

    kernel_shape = batch_shape + tuple(inputs.shape[a] for a in axis) + features
    kernel = _kernel_param(self, kernel_shape, tuple(range(nb, nb + na)), kernel_init)
    bias = self.param("bias", bias_init, batch_shape + features, self.param_dtype) if self.use_bias else None
    inputs, kernel, bias = _promote(inputs, kernel, bias, self.dtype, self.param_dtype)
    if bias is not None:
      bias = bias.reshape(batch_shape + (-1,))

    local_axes = tuple(a - nb for a in axis)
    fn = lambda x, k, b: _contract(op, x, local_axes, k, tuple(range(na)), b, self.recipe)
    k_axes = _Frozen(0, 0 if kernel.scale.ndim else None) if isinstance(kernel, _Frozen) else 0
    for _ in range(nb):
      fn = jax.vmap(fn, in_axes=(0, k_axes, None if bias is None else 0))
    return fn(inputs, kernel, bias)


@dataclasses.dataclass(frozen=True)
class _EinsumPlan:
  """How an einsum "lhs,rhs->out" (x, kernel) runs; static, from the equation and the shapes."""

  equation: str
  k_axes: tuple[int, ...]           # contracted kernel axes (kernel letters absent from out)
  bias_shape: tuple[int, ...]       # Flax's bias shape: kernel dims of out's kernel letters, out order
  bias_broadcast: tuple[int, ...]   # bias reshaped to broadcast against the output
  matmul: bool                      # the einsum is one matmul of x with the kernel
  x_axes: tuple[int, ...] = ()      # x axes paired with k_axes
  bias_perm: tuple[int, ...] = ()   # bias_shape order -> kernel free-axes order
  out_perm: tuple[int, ...] = ()    # (x free axes, kernel free axes) -> out order


def _split_equation(op: str, equation: str):
  eq = equation.replace(" ", "")
  if "->" not in eq:
    raise ValueError(f'{op}: `einsum_str` equation must be explicit and include "->", got {equation!r}')
  if eq.count(",") != 1:
    raise ValueError(f"{op}: `einsum_str` equation must have exactly two operands and therefore exactly "
                     f"one comma, got {equation!r}")
  ins, out = eq.split("->")
  lhs, rhs = ins.split(",")
  if "..." in rhs:
    raise ValueError(f"{op}: the kernel subscripts of `einsum_str` cannot hold '...', got {equation!r}")
  return eq, lhs, rhs, out


def _kernel_axes(op: str, equation: str) -> tuple[int, ...]:
  """The kernel axes an einsum contracts: those whose letter is absent from the output."""
  _, _, rhs, out = _split_equation(op, equation)
  return tuple(i for i, c in enumerate(rhs) if c not in out)


def _einsum_plan(op: str, equation: str, x_ndim: int, k_shape) -> _EinsumPlan:
  eq, lhs, rhs, out = _split_equation(op, equation)
  if "..." in lhs:
    fill = "".join(c for c in string.ascii_letters if c not in eq)[:max(x_ndim - len(lhs) + 3, 0)]
    lhs, out = lhs.replace("...", fill), out.replace("...", fill)
  if len(lhs) != x_ndim or "..." in out:
    raise ValueError(f"{op}: `einsum_str` {equation!r} does not match inputs of rank {x_ndim}")
  if len(rhs) != len(k_shape):
    raise ValueError(f"{op}: `einsum_str` {equation!r} names {len(rhs)} kernel axes, the kernel shape is {k_shape}")
  k_axes = tuple(i for i, c in enumerate(rhs) if c not in out)
  bias_letters = [c for c in out if c in rhs]
  plan = dict(equation=eq, k_axes=k_axes, bias_shape=tuple(k_shape[rhs.index(c)] for c in bias_letters),
              bias_broadcast=tuple(k_shape[rhs.index(c)] if c in rhs else 1 for c in out))
  free = [c for c in rhs if c in out]
  matmul = (all(len(set(s)) == len(s) for s in (lhs, rhs, out)) and k_axes and free
            and all(rhs[i] in lhs for i in k_axes) and not any(c in lhs for c in free)
            and all(c in rhs or c in out for c in lhs) and set(out) <= set(lhs) | set(rhs))
  if not matmul:
    return _EinsumPlan(matmul=False, **plan)
  dot_letters = [c for c in lhs if c not in rhs] + free
  return _EinsumPlan(matmul=True, x_axes=tuple(lhs.index(rhs[i]) for i in k_axes),
                     bias_perm=tuple(bias_letters.index(c) for c in free),
                     out_perm=tuple(dot_letters.index(c) for c in out), **plan)


def _einsum(op, plan: _EinsumPlan, x, kernel, bias, recipe, precision):
  """The einsum of x with a float or `_Frozen` kernel [+ bias (any shape of plan.bias_shape's size)]."""
  if plan.matmul:
    if bias is not None:
      bias = jnp.transpose(jnp.reshape(bias, plan.bias_shape), plan.bias_perm).reshape(-1)
    y = _contract(op, x, plan.x_axes, kernel, plan.k_axes, bias, recipe)
    return y if _identity(plan.out_perm) else jnp.transpose(y, plan.out_perm)
  if isinstance(kernel, _Frozen):  # not a matmul: dequantize (1 byte/param stays resident)
    kernel = dequantize_kernel(*jax.lax.stop_gradient(kernel), plan.k_axes, x.dtype)
  y = jnp.einsum(plan.equation, x, kernel, precision=precision)
  return y if bias is None else y + jnp.reshape(bias, plan.bias_broadcast)


class Fp8Einsum(nn.Module):
  """`nn.Einsum` with an FP8 GEMM: einsum(einsum_str, inputs, kernel) + bias.

  Equations that are one matmul of the inputs with the kernel after transposes and reshapes run
  as one `fp8_dense` call: every kernel letter is either contracted with the inputs or an output
  feature, and no input letter is summed away alone. This covers `"...d,df->...f"` and openpi's
  `"BTD,NDH->BTNH"`, `"BSD,2KDH->2BSKH"`, `"BTNH,NHD->BTD"`. Other equations (batch letters shared
  by inputs, kernel and output, repeated letters) fall back to `jnp.einsum` in the computation
  dtype, dequantizing a frozen kernel first.

  Attributes:
    shape: the kernel shape.
    einsum_str: the equation "inputs,kernel->out" (or pass it to `__call__`; exactly one of both).
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as in `nn.Einsum`; the bias
      shape is Flax's (the kernel dims of the output's kernel letters). precision only applies to
      the fallback.
    recipe, frozen, weight_granularity: as in `Fp8Dense`. The frozen kernel is the kernel with its
      contracted axes moved last, e.g. (N, H, D) for `"BTD,NDH->BTNH"`.

  >>> layer = Fp8Einsum((2, 64, 16), "BTD,NDH->BTNH")
  >>> params = layer.init(jax.random.key(0), jnp.ones((1, 5, 64)))
  >>> jax.tree_util.tree_map(jnp.shape, params)
  {'params': {'bias': (2, 16), 'kernel': (2, 64, 16)}}
  """

  shape: tuple[int, ...]
  einsum_str: str | None = None
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = default_kernel_init
  bias_init: Any = initializers.zeros_init()
  recipe: Fp8Recipe | None = None
  frozen: bool = False
  weight_granularity: str = "tensor"

  @nn.compact
  def __call__(self, inputs, einsum_str: str | None = None):
    """inputs float, einsum_str overriding the attribute -> the einsum's output."""
    einsum_str = nn.merge_param("einsum_str", self.einsum_str, einsum_str)
    plan = _einsum_plan("Fp8Einsum", einsum_str, inputs.ndim, tuple(self.shape))
    kernel = _kernel_param(self, tuple(self.shape), plan.k_axes, self.kernel_init)
    bias = self.param("bias", self.bias_init, plan.bias_shape, self.param_dtype) if self.use_bias else None
    inputs, kernel, bias = _promote(inputs, kernel, bias, self.dtype, self.param_dtype)
    return _einsum("Fp8Einsum", plan, inputs, kernel, bias, self.recipe, self.precision)


# ---------------------------------------------------------------------------------------------
# The fused FP8 GEGLU feed-forward block (openpi's FeedForward, with its pre-norm)


def _ffn_lecun_init():
  """openpi FeedForward's gating_einsum initializer: lecun_normal over (2, D, F) with axis 0 a batch axis."""
  return initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))


def freeze_ffn_params(params, granularity: str = "channel"):
  """openpi FeedForward params {'gating_einsum': (2, D, F), 'linear': (F, D)} (floats) -> the frozen
  params of `Fp8GluFfn(frozen=True)`: 'gating_einsum' (2F, D) float8_e4m3fn = [w[0]^T ; w[1]^T] with
  'gating_einsum_scale', and 'linear' (D, F) float8_e4m3fn with 'linear_scale'; quantized once,
  per output channel by default (or "tensor")."""
  wg = fp8_gate_up_weight(jnp.asarray(params["gating_einsum"]), granularity)
  wd = Fp8Weight.from_kernel(jnp.asarray(params["linear"]), granularity)
  return {"gating_einsum": wg.data, "gating_einsum_scale": wg.scale, "linear": wd.data, "linear_scale": wd.scale}


class Fp8GluFfn(nn.Module):
  """openpi's `FeedForward` (Gemma's GEGLU MLP) fused with its pre-norm, on `fp8_glu_ffn`:
  out = (act(h @ w[0]) * (h @ w[1])) @ linear [+ x], h = x * rsqrt(mean(x^2) + eps) * (1 + norm_scale).

  Parameters have openpi's names, so its checkpoints load: trainable (`frozen=False`): 'gating_einsum'
  (2, D, F) and 'linear' (F, D), floats. Frozen (`frozen=True`): 'gating_einsum' (2F, D) and 'linear'
  (D, F) float8_e4m3fn with 'gating_einsum_scale' and 'linear_scale' (build them from a float
  checkpoint with `freeze_ffn_params`); their gradient is never computed. The RMSNorm's scale lives
  in openpi's sibling module ('pre_ffw_norm'), so it comes in as a call argument.

  Attributes:
    features: D, the model width. hidden_dim: F.
    frozen: FP8 weights (see above).
    activation: "gelu_tanh" (Gemma) or "silu".
    eps: the RMSNorm's epsilon.
    residual: add x to the output (openpi's Block adds it itself: default False).
    recipe: `Fp8Recipe`; None: default (row scaling, FP8 backward).
    remat_gate_up: see `fp8_glu_ffn`.
    param_dtype: the dtype of float params (default float32); the computation runs in x's dtype.
    weight_granularity: how frozen weights are quantized at init: "channel" or "tensor".

  >>> ffn = Fp8GluFfn(features=64, hidden_dim=128)
  >>> x = jnp.ones((2, 8, 64), jnp.bfloat16)
  >>> params = ffn.init(jax.random.key(0), x, jnp.zeros((64,)))
  >>> jax.tree_util.tree_map(jnp.shape, params)
  {'params': {'gating_einsum': (2, 64, 128), 'linear': (128, 64)}}
  """

  features: int
  hidden_dim: int
  frozen: bool = False
  activation: str = "gelu_tanh"
  eps: float = 1e-6
  residual: bool = False
  recipe: Fp8Recipe | None = None
  remat_gate_up: bool = False
  param_dtype: Any = jnp.float32
  weight_granularity: str = "channel"

  @nn.compact
  def __call__(self, x, norm_scale):
    """x (..., D) float, norm_scale (D,) float (openpi's pre_ffw_norm 'scale') -> (..., D) in x's dtype."""
    op = "Fp8GluFfn"
    d, f = self.features, self.hidden_dim
    if jnp.shape(x)[-1] != d:
      raise ValueError(f"{op}: inputs must have last axis features={d}, got shape {jnp.shape(x)}")
    g_shape, l_shape = (2, d, f), (f, d)
    if not self.frozen:
      wg = self.param("gating_einsum", _ffn_lecun_init(), g_shape, self.param_dtype).astype(x.dtype)
      wd = self.param("linear", default_kernel_init, l_shape, self.param_dtype).astype(x.dtype)
    else:
      _checks.choice(op, "weight_granularity", self.weight_granularity, GRANULARITIES)
      if self.is_initializing() and not self.has_variable("params", "gating_einsum"):
        floats = {"gating_einsum": _ffn_lecun_init()(self.make_rng("params"), g_shape, self.param_dtype),
                  "linear": default_kernel_init(self.make_rng("params"), l_shape, self.param_dtype)}
        for name, value in freeze_ffn_params(floats, self.weight_granularity).items():
          self.put_variable("params", name, value)
      per_channel = self.weight_granularity == "channel"
      wg = Fp8Weight(self.param("gating_einsum", lambda _: jnp.zeros((2 * f, d), E4M3)),
                     self.param("gating_einsum_scale", lambda _: jnp.ones((2 * f,) if per_channel else (), F32)))
      wd = Fp8Weight(self.param("linear", lambda _: jnp.zeros((d, f), E4M3)),
                     self.param("linear_scale", lambda _: jnp.ones((d,) if per_channel else (), F32)))
      for name, w in (("gating_einsum", wg), ("linear", wd)):
        if jnp.dtype(w.data.dtype) != E4M3:
          raise TypeError(f"{op}(frozen=True): param '{name}' must be float8_e4m3fn, got {w.data.dtype} "
                          f"{w.data.shape}; convert openpi checkpoints with flashrt_jax.linen.freeze_ffn_params")
    return fp8_glu_ffn(x, norm_scale, wg, wd, eps=self.eps, activation=self.activation, residual=self.residual,
                       recipe=self.recipe, remat_gate_up=self.remat_gate_up)
