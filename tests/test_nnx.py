"""flashrt_jax.nnx: Fp8Linear and Fp8Einsum against the reference (≤ 1e-2) and nnx's float layers
(≤ 6e-2), weight transfer from linen, and `nnx.Linear(dot_general=...)`, on CPU."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flashrt_targets, normal, rel_l2
from flax import nnx

from flashrt_jax import reference
from flashrt_jax import linen as fl
from flashrt_jax.convert import dequantize_kernel, quantize_kernel
from flashrt_jax.nnx import Fp8Einsum, Fp8Linear, FrozenFp8
from flashrt_jax.ops.gemm import Fp8Recipe

RECIPE = Fp8Recipe(min_rows=0, granularity="tensor")  # FP8 custom call at every size, per-tensor scales
E4M3 = jnp.dtype(jnp.float8_e4m3fn)


def numpy_init(std):
  """A Flax initializer drawing from numpy, seeded by the shape (jax.random compiles per shape)."""
  return lambda key, shape, dtype=jnp.float32: normal(np.random.default_rng(sum(shape)), shape, dtype, std)


INITS = dict(kernel_init=numpy_init(0.1), bias_init=numpy_init(0.5))


@jax.jit
def fake_quant(a):
  """What the FP8 GEMM sees of a float tensor: per-tensor E4M3 quantize + dequantize."""
  q, s = reference.quantize(a)
  return reference.dequantize(q, s, jnp.float32)


einsum = jax.jit(lambda eq, x, k: jnp.einsum(eq, x, k, precision=jax.lax.Precision.HIGHEST), static_argnums=0)


def load(model, pure_dict):
  """Puts a linen-style {'kernel': ..., 'bias': ...} dict into an nnx layer."""
  state = nnx.state(model)
  if hasattr(nnx, "replace_by_pure_dict"):  # flax >= 0.11
    nnx.replace_by_pure_dict(state, pure_dict)
  else:
    state.replace_by_pure_dict(pure_dict)
  nnx.update(model, state)
  return model


def fp8_ran(model, x) -> bool:
  graphdef, state = nnx.split(model)
  return bool(flashrt_targets(lambda s, x: nnx.merge(graphdef, s)(x), state, x, compiled=False))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("m", [1, 51, 867])
def test_linear_matches_reference(rng, m, dtype):
  k, n = 128, 48
  x = normal(rng, (m, k), dtype)
  layer = Fp8Linear(k, n, param_dtype=dtype, recipe=RECIPE, **INITS, rngs=nnx.Rngs(0))
  y = layer(x)
  assert y.shape == (m, n) and y.dtype == dtype
  ref = jax.jit(reference.fp8_dense)(x, layer.kernel[...], layer.bias[...])
  assert rel_l2(y, ref) <= 1e-2, f"Fp8Linear m={m}"
  assert rel_l2(y, nnx.Linear(k, n, param_dtype=dtype, **INITS, rngs=nnx.Rngs(0))(x)) <= 6e-2, f"vs nnx.Linear m={m}"


def test_init_equals_nnx():
  pairs = [(Fp8Linear(64, 32, rngs=nnx.Rngs(0)), nnx.Linear(64, 32, rngs=nnx.Rngs(0))),
           (Fp8Einsum("btd,ndh->btnh", (2, 64, 16), (2, 16), rngs=nnx.Rngs(0)),
            nnx.Einsum("btd,ndh->btnh", (2, 64, 16), (2, 16), rngs=nnx.Rngs(0)))]
  for ours, theirs in pairs:
    a, b = nnx.state(ours, nnx.Param), nnx.state(theirs, nnx.Param)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("m,granularity", [(1, "tensor"), (51, "channel"), (867, "tensor")])
def test_frozen_linear(rng, m, granularity):
  k, n = 128, 48
  x = normal(rng, (m, k))
  layer = Fp8Linear(k, n, recipe=RECIPE, frozen=True, weight_granularity=granularity, **INITS, rngs=nnx.Rngs(0))
  assert isinstance(layer.kernel, FrozenFp8) and isinstance(layer.kernel_scale, FrozenFp8)
  data, scale = layer.kernel[...], layer.kernel_scale[...]
  assert data.dtype == E4M3 and data.shape == (n, k) and data.nbytes == k * n
  assert scale.shape == (() if granularity == "tensor" else (n,))
  float_kernel = nnx.Linear(k, n, **INITS, rngs=nnx.Rngs(0)).kernel[...]
  want = quantize_kernel(float_kernel, None, granularity)
  np.testing.assert_array_equal(np.asarray(data, np.float32), np.asarray(want[0], np.float32))
  y = layer(x)
  ref = jax.jit(functools.partial(reference.fp8_dense_frozen, granularity=RECIPE.granularity))(x, data, scale, layer.bias[...])
  assert rel_l2(y, ref) <= 1e-2, f"frozen Fp8Linear m={m} {granularity}"
  assert list(nnx.state(layer, nnx.Param).keys()) == ["bias"]


def test_frozen_gradients(rng):
  m, k, n = 51, 64, 32
  x, dy = normal(rng, (m, k)), normal(rng, (m, n))
  layer = Fp8Linear(k, n, recipe=RECIPE, frozen=True, **INITS, rngs=nnx.Rngs(0))
  grads = nnx.grad(lambda model: jnp.sum(model(x) * dy))(layer)
  assert list(grads.keys()) == ["bias"], "nnx.grad must skip the frozen FP8 kernel"
  (grad_bias,) = jax.tree_util.tree_leaves(grads)
  np.testing.assert_allclose(grad_bias, dy.sum(0), rtol=1e-5, atol=1e-4)
  gx = jax.grad(lambda x: jnp.sum(layer(x) * dy))(x)
  w = dequantize_kernel(layer.kernel[...], layer.kernel_scale[...])
  assert rel_l2(gx, dy @ w.T) <= 1e-1, "frozen dx (E5M2 backward)"


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_linen_to_nnx_transfer(rng, frozen):
  x = normal(rng, (51, 64))
  dense = fl.Fp8Dense(48, recipe=RECIPE, frozen=frozen, **INITS)
  params = dense.init(jax.random.key(0), x)["params"]
  linear = load(Fp8Linear(64, 48, recipe=RECIPE, frozen=frozen, rngs=nnx.Rngs(1)), params)
  np.testing.assert_array_equal(linear(x), dense.apply({"params": params}, x))
  einsum_layer = fl.Fp8Einsum((2, 64, 16), "BTD,NDH->BTNH", recipe=RECIPE, frozen=frozen, **INITS)
  xe = x[None]
  params = einsum_layer.init(jax.random.key(0), xe)["params"]
  ours = load(Fp8Einsum("BTD,NDH->BTNH", (2, 64, 16), (2, 16), recipe=RECIPE, frozen=frozen, rngs=nnx.Rngs(1)),
              params)
  np.testing.assert_array_equal(ours(xe), einsum_layer.apply({"params": params}, xe))


EINSUMS = [
    ("BTD,NDH->BTNH", (2, 64, 16), (2, 16), (1, 51, 64), True),
    ("BTNH,NHD->BTD", (2, 32, 48), (48,), (1, 51, 2, 32), True),
    ("...d,df->...f", (64, 32), (32,), (3, 5, 64), True),
    ("bd,bdf->bf", (3, 64, 32), (3, 32), (3, 64), False),
]


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("eq,shape,bias_shape,x_shape,fp8", EINSUMS, ids=[e[0] for e in EINSUMS])
def test_einsum(rng, eq, shape, bias_shape, x_shape, fp8, frozen):
  x = normal(rng, x_shape)
  layer = Fp8Einsum(eq, shape, bias_shape, recipe=RECIPE, frozen=frozen, **INITS, rngs=nnx.Rngs(0))
  theirs = nnx.Einsum(eq, shape, bias_shape, **INITS, rngs=nnx.Rngs(0))
  y = layer(x)
  assert rel_l2(y, theirs(x)) <= 6e-2, f"vs nnx.Einsum {eq} frozen={frozen}"
  if not fp8:
    return
  rhs, out = eq.split(",")[1].split("->")[0], eq.split("->")[1].replace("...", "")
  if frozen:
    kernel = dequantize_kernel(layer.kernel[...], layer.kernel_scale[...],
                               tuple(i for i, c in enumerate(rhs) if c not in out))
  else:
    kernel = fake_quant(layer.kernel[...])
  bias = layer.bias[...].reshape([shape[rhs.index(c)] if c in rhs else 1 for c in out])
  assert rel_l2(y, einsum(eq, fake_quant(x), kernel) + bias) <= 1e-2, f"Fp8Einsum {eq} frozen={frozen}"
  assert fp8_ran(layer, x), f"{eq} did not run the FP8 GEMM"


def test_linear_dot_general_drop_in_and_jit(rng):
  x = normal(rng, (51, 64))
  ours = Fp8Linear(64, 32, recipe=RECIPE, **INITS, rngs=nnx.Rngs(0))
  drop_in = nnx.Linear(64, 32, dot_general=fl.Fp8DotGeneral(RECIPE), **INITS, rngs=nnx.Rngs(0))
  assert rel_l2(drop_in(x), ours(x)) <= 1e-6
  assert fp8_ran(drop_in, x) and fp8_ran(ours, x)
  np.testing.assert_array_equal(nnx.jit(lambda model, x: model(x))(ours, x), ours(x))


def test_errors():
  layer = Fp8Linear(64, 32, **INITS, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\(\.\.\., 64\)"):
    layer(jnp.ones((4, 48)))
  with pytest.raises(ValueError, match="weight_granularity"):
    Fp8Linear(64, 32, frozen=True, weight_granularity="row", **INITS, rngs=nnx.Rngs(0))
  frozen = Fp8Linear(64, 64, frozen=True, **INITS, rngs=nnx.Rngs(0))
  frozen.kernel = FrozenFp8(jnp.ones((64, 64)))
  with pytest.raises(TypeError, match="quantize_params"):
    frozen(jnp.ones((4, 64)))
  eq = Fp8Einsum("btd,ndh->btnh", (2, 64, 16), frozen=True, **INITS, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="frozen kernel was stored"):
    eq(jnp.ones((1, 3, 16)), "btd,nhd->btnh")
  with pytest.raises(ValueError, match="->"):
    Fp8Einsum("btd,ndh", (2, 64, 16), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="contracted"):
    Fp8Einsum("btd,ndh->btnh", (2, 64, 16), **INITS, rngs=nnx.Rngs(0))(jnp.ones((1, 3, 32)))
