"""flashrt_jax.convert: float Flax parameter trees <-> the frozen FP8 layout the modules read."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal, rel_l2
from flax import nnx
from flax.core import FrozenDict

from flashrt_jax import reference
from flashrt_jax.convert import Layout, dequantize_kernel, dequantize_params, quantize_kernel, quantize_params
from flashrt_jax.linen import Fp8Dense, Fp8DenseGeneral, Fp8Einsum
from flashrt_jax.nnx import Fp8Linear
from flashrt_jax.ops.gemm import Fp8Recipe, Fp8Weight

RECIPE = Fp8Recipe(min_rows=0)
E4M3 = jnp.dtype(jnp.float8_e4m3fn)


def numpy_init(std):
  """A Flax initializer drawing from numpy, seeded by the shape (jax.random compiles per shape)."""
  return lambda key, shape, dtype=jnp.float32: normal(np.random.default_rng(sum(shape)), shape, dtype, std)


INITS = dict(kernel_init=numpy_init(0.1), bias_init=numpy_init(0.5))


def as_f32(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), tree)


class Block(nn.Module):
  """A float or frozen block: Dense layers plus an openpi-style attention projection."""

  frozen: bool = False

  @nn.compact
  def __call__(self, x):
    h = Fp8Dense(64, recipe=RECIPE, frozen=self.frozen, name="up", **INITS)(x)
    q = Fp8Einsum((2, 64, 16), "BTD,NDH->BTNH", recipe=RECIPE, frozen=self.frozen, name="q", **INITS)(h)
    return Fp8Dense(48, recipe=RECIPE, frozen=self.frozen, name="down", **INITS)(q.reshape(x.shape[:-1] + (32,)))


def einsum_layout(path, kernel):
  """Contracted kernel axes of the Block's layers: D (axis 1) for the einsum, the default elsewhere."""
  return (1,) if path[-2] == "q" else True


@pytest.mark.parametrize("shape,axes", [((64, 48), None), ((2, 64, 16), (1,)), ((4, 16, 2, 16), (0, 1)),
                                        ((2, 32, 48), (-3, -2))], ids=["dense", "q_einsum", "general", "attn_out"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_kernel_round_trip(rng, shape, axes, granularity):
  kernel = normal(rng, shape)
  data, scale = quantize_kernel(kernel, axes, granularity)
  norm = tuple(sorted(a % len(shape) for a in axes)) if axes else tuple(range(len(shape) - 1))
  free = tuple(shape[i] for i in range(len(shape)) if i not in norm)
  assert data.dtype == E4M3 and data.shape == free + tuple(shape[i] for i in norm)
  assert scale.dtype == jnp.float32 and scale.shape == (() if granularity == "tensor" else free)
  back = dequantize_kernel(data, scale, axes)
  assert back.shape == kernel.shape and rel_l2(back, kernel) <= 4e-2, f"round trip {shape} {granularity}"
  w = Fp8Weight(data.reshape(int(np.prod(free)), -1), scale.reshape(-1) if scale.ndim else scale)
  k2 = jnp.transpose(kernel, norm + tuple(i for i in range(len(shape)) if i not in norm))
  want = Fp8Weight.from_kernel(k2.reshape(w.data.shape[1], -1), granularity)
  np.testing.assert_array_equal(np.asarray(w.data, np.float32), np.asarray(want.data, np.float32))


def test_quantize_params_loads_into_frozen_modules(rng):
  x = normal(rng, (3, 17, 32))
  float_params = Block().init(jax.random.key(0), x)["params"]
  frozen = quantize_params(float_params, einsum_layout)
  assert frozen["q"]["kernel"].shape == (2, 16, 64) and frozen["up"]["kernel"].shape == (64, 32)
  for layer in frozen.values():
    assert layer["kernel"].dtype == E4M3 and layer["kernel"].nbytes == layer["kernel"].size
  assert jax.tree_util.tree_structure(frozen) == jax.tree_util.tree_structure(
      Block(frozen=True).init(jax.random.key(0), x)["params"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, as_f32(frozen),
                         as_f32(Block(frozen=True).init(jax.random.key(0), x)["params"]))
  y = Block(frozen=True).apply({"params": frozen}, x)
  assert rel_l2(y, Block().apply({"params": float_params}, x)) <= 6e-2
  up = frozen["up"]
  ref = jax.jit(reference.fp8_dense_frozen)(x, up["kernel"], up["kernel_scale"], up["bias"])
  assert rel_l2(Fp8Dense(64, recipe=RECIPE, frozen=True).apply({"params": up}, x), ref) <= 1e-2


def test_round_trip_loads_into_float_modules(rng):
  x = normal(rng, (3, 17, 32))
  float_params = Block().init(jax.random.key(0), x)["params"]
  back = dequantize_params(quantize_params(float_params, einsum_layout), einsum_layout)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(float_params)
  for path in ("up", "q", "down"):
    assert back[path]["kernel"].shape == float_params[path]["kernel"].shape
    assert back[path]["kernel"].dtype == jnp.float32
    assert rel_l2(back[path]["kernel"], float_params[path]["kernel"]) <= 4e-2, path
    np.testing.assert_array_equal(back[path]["bias"], float_params[path]["bias"])
  assert rel_l2(Block().apply({"params": back}, x), Block().apply({"params": float_params}, x)) <= 6e-2


def test_channel_granularity_and_selection(rng):
  x = normal(rng, (51, 64))
  params = {"a": nn.Dense(48, **INITS).init(jax.random.key(0), x)["params"],
            "b": nn.Dense(32, **INITS).init(jax.random.key(1), x)["params"]}
  q = quantize_params(params, lambda path, kernel: path[0] == "a", granularity="channel")
  assert q["a"]["kernel_scale"].shape == (48,)
  assert q["b"]["kernel"] is params["b"]["kernel"] and "kernel_scale" not in q["b"]
  layer = Fp8Dense(48, recipe=RECIPE, frozen=True, weight_granularity="channel")
  ref = jax.jit(reference.fp8_dense_frozen)(x, q["a"]["kernel"], q["a"]["kernel_scale"], q["a"]["bias"])
  assert rel_l2(layer.apply({"params": q["a"]}, x), ref) <= 1e-2
  again = quantize_params(q)  # frozen kernels are left alone; the float one is now quantized
  assert again["a"]["kernel"] is q["a"]["kernel"] and again["b"]["kernel"].dtype == E4M3


def test_dense_general_and_containers(rng):
  x = normal(rng, (5, 4, 16))
  params = FrozenDict(nn.DenseGeneral((2, 16), axis=(-2, -1), **INITS).init(jax.random.key(0), x))
  layout = lambda path, kernel: (0, 1)
  q = quantize_params(params, layout)
  assert isinstance(q, FrozenDict) and q["params"]["kernel"].shape == (2, 16, 4, 16)
  y = Fp8DenseGeneral((2, 16), axis=(-2, -1), recipe=RECIPE, frozen=True).apply(q, x)
  assert rel_l2(y, nn.DenseGeneral((2, 16), axis=(-2, -1)).apply(params, x)) <= 6e-2
  back = dequantize_params(q, layout)
  assert back["params"]["kernel"].shape == (4, 16, 2, 16)


class ScannedLayer(nn.Module):
  frozen: bool = False

  @nn.compact
  def __call__(self, x, _):
    return Fp8Einsum((2, 64, 32), "btd,ndh->btnh", recipe=RECIPE, frozen=self.frozen, **INITS)(x).reshape(x.shape), None


class Stack(nn.Module):
  """Three layers under nn.scan, as openpi stacks Gemma's: every param gains a leading layer axis."""

  frozen: bool = False

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(ScannedLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return scan(self.frozen, name="layers")(x, None)[0]


def test_scan_stacked_layers(rng):
  x = normal(rng, (2, 9, 64))
  float_params = Stack().init(jax.random.key(0), x)["params"]
  layout = lambda path, kernel: Layout(axes=(1,), stacked=1)
  frozen = quantize_params(float_params, layout)
  kernel = frozen["layers"]["Fp8Einsum_0"]
  assert kernel["kernel"].shape == (3, 2, 32, 64) and kernel["kernel_scale"].shape == (3,)
  jax.tree_util.tree_map(np.testing.assert_array_equal, as_f32(frozen),
                         as_f32(Stack(frozen=True).init(jax.random.key(0), x)["params"]))
  y = Stack(frozen=True).apply({"params": frozen}, x)
  assert rel_l2(y, Stack().apply({"params": float_params}, x)) <= 6e-2
  back = dequantize_params(frozen, layout)
  assert rel_l2(back["layers"]["Fp8Einsum_0"]["kernel"], float_params["layers"]["Fp8Einsum_0"]["kernel"]) <= 4e-2


def test_nnx_state_round_trip(rng):
  x = normal(rng, (51, 64))
  float_layer = nnx.Linear(64, 48, **INITS, rngs=nnx.Rngs(0))
  state = nnx.state(float_layer)
  pure = nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()  # flax >= 0.11
  frozen = Fp8Linear(64, 48, recipe=RECIPE, frozen=True, rngs=nnx.Rngs(1))
  state = nnx.state(frozen)
  q = quantize_params(pure)
  if hasattr(nnx, "replace_by_pure_dict"):  # flax >= 0.11
    nnx.replace_by_pure_dict(state, q)
  else:
    state.replace_by_pure_dict(q)
  nnx.update(frozen, state)
  assert rel_l2(frozen(x), float_layer(x)) <= 6e-2


def test_errors(rng):
  kernel = normal(rng, (64, 48))
  with pytest.raises(ValueError, match="granularity"):
    quantize_params({"kernel": kernel}, granularity="row")
  with pytest.raises(ValueError, match="contracted axes"):
    quantize_params({"kernel": kernel}, lambda path, k: (0, 1))
  with pytest.raises(ValueError, match="contracted axes"):
    quantize_kernel(kernel, (2,))
  with pytest.raises(ValueError, match="stacked"):
    quantize_kernel(kernel, stacked=1)
  with pytest.raises(TypeError, match="kernel"):
    quantize_kernel(jnp.ones((64, 48), jnp.int32))
  data, _ = quantize_kernel(kernel)
  with pytest.raises(ValueError, match="scale"):
    dequantize_kernel(data, jnp.ones((64,)))
  with pytest.raises(TypeError, match="data"):
    dequantize_kernel(kernel, jnp.ones(()))
