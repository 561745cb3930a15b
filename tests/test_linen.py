"""flashrt_jax.linen: Fp8Dense, Fp8DenseGeneral, Fp8Einsum and fp8_dot_general against the reference
(same quantized inputs, ≤ 1e-2) and against Flax's float layers (≤ 6e-2), on CPU."""

import functools
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flashrt_targets, normal, rel_l2

from flashrt_jax import reference
from flashrt_jax.convert import dequantize_kernel
from flashrt_jax.linen import Fp8Dense, Fp8DenseGeneral, Fp8DotGeneral, Fp8Einsum, fp8_dot_general
from flashrt_jax.ops.gemm import Fp8Recipe

RECIPE = Fp8Recipe(min_rows=0, granularity="tensor")  # FP8 custom call at every size, per-tensor scales
E4M3 = jnp.dtype(jnp.float8_e4m3fn)


def numpy_init(std):
  """A Flax initializer drawing from numpy, seeded by the shape: jax.random would compile a
  sampler for every shape, which dominates the run time of these tests on CPU."""
  return lambda key, shape, dtype=jnp.float32: normal(np.random.default_rng(sum(shape)), shape, dtype, std)


INITS = dict(kernel_init=numpy_init(0.1), bias_init=numpy_init(0.5))


def fp8_ran(layer, params, x) -> bool:
  return bool(flashrt_targets(layer.apply, params, x, compiled=False))


@jax.jit
def fake_quant(a):
  """What the FP8 GEMM sees of a float tensor: per-tensor E4M3 quantize + dequantize, in float32.
  Per-tensor scales do not depend on layout, so an einsum of fake-quantized operands is the
  reference of every FP8 layer (`reference.fp8_dense` for the 2-D case)."""
  q, s = reference.quantize(a)
  return reference.dequantize(q, s, jnp.float32)


einsum = jax.jit(lambda eq, x, k: jnp.einsum(eq, x, k, precision=jax.lax.Precision.HIGHEST), static_argnums=0)
ref_dense = jax.jit(reference.fp8_dense)
ref_dense_frozen = jax.jit(functools.partial(reference.fp8_dense_frozen, granularity=RECIPE.granularity))


# ---------------------------------------------------------------------------------------------
# Fp8Dense


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("m", [1, 51, 867])
def test_dense_matches_reference(rng, m, dtype):
  k, n = 128, 48
  x = normal(rng, (m, k), dtype)
  layer = Fp8Dense(n, param_dtype=dtype, recipe=RECIPE, **INITS)
  params = layer.init(jax.random.key(1), x)
  y = layer.apply(params, x)
  assert y.shape == (m, n) and y.dtype == dtype
  p = params["params"]
  assert rel_l2(y, ref_dense(x, p["kernel"], p["bias"])) <= 1e-2, f"Fp8Dense m={m} k={k} n={n}"
  assert rel_l2(y, nn.Dense(n, param_dtype=dtype).apply(params, x)) <= 6e-2, f"vs nn.Dense m={m}"


@pytest.mark.parametrize("m,granularity", [(1, "tensor"), (51, "channel"), (867, "tensor"), (867, "channel")])
def test_dense_frozen_matches_reference(rng, m, granularity):
  k, n = 128, 48
  x = normal(rng, (3, m, k))
  layer = Fp8Dense(n, recipe=RECIPE, frozen=True, weight_granularity=granularity, **INITS)
  p = layer.init(jax.random.key(1), x)["params"]
  y = layer.apply({"params": p}, x)
  ref = ref_dense_frozen(x, p["kernel"], p["kernel_scale"], p["bias"])
  assert rel_l2(y, ref) <= 1e-2, f"frozen Fp8Dense m={m} {granularity}"
  dense = nn.Dense(n, **INITS)
  assert rel_l2(y, dense.apply(dense.init(jax.random.key(1), x), x)) <= 6e-2, "frozen init vs nn.Dense"


def test_frozen_params_are_one_byte_per_weight():
  k, n = 128, 48
  p = Fp8Dense(n, frozen=True, **INITS).init(jax.random.key(0), jnp.ones((2, k)))["params"]
  assert set(p) == {"kernel", "kernel_scale", "bias"}
  assert p["kernel"].dtype == E4M3 and p["kernel"].shape == (n, k) and p["kernel"].nbytes == k * n
  assert p["kernel_scale"].shape == () and p["kernel_scale"].dtype == jnp.float32


def test_frozen_gradients(rng):
  m, k, n = 51, 64, 32
  x, dy = normal(rng, (m, k)), normal(rng, (m, n))
  layer = Fp8Dense(n, recipe=RECIPE, frozen=True, **INITS)
  params = layer.init(jax.random.key(1), x)
  grad_p, grad_x = jax.grad(lambda p, x: jnp.sum(layer.apply(p, x) * dy), argnums=(0, 1))(params, x)
  grad_p, p = grad_p["params"], params["params"]
  assert not np.any(np.asarray(grad_p["kernel"], np.float32)), "a frozen kernel has no gradient"
  assert float(grad_p["kernel_scale"]) == 0.0
  np.testing.assert_allclose(grad_p["bias"], dy.sum(0), rtol=1e-5, atol=1e-4)
  w = dequantize_kernel(p["kernel"], p["kernel_scale"])
  assert rel_l2(grad_x, dy @ w.T) <= 1e-1, "frozen dx (E5M2 backward)"


def test_trainable_gradients_match_dense(rng):
  m, k, n = 51, 64, 32
  x = normal(rng, (m, k))
  params = Fp8Dense(n, **INITS).init(jax.random.key(1), x)
  loss = lambda layer: lambda p, x: jnp.sum(layer.apply(p, x) ** 2)
  ours = jax.grad(loss(Fp8Dense(n, recipe=RECIPE)), argnums=(0, 1))(params, x)
  want = jax.grad(loss(nn.Dense(n)), argnums=(0, 1))(params, x)
  for name in ("kernel", "bias"):
    assert rel_l2(ours[0]["params"][name], want[0]["params"][name]) <= 1e-1, f"Fp8Dense grad {name}"
  assert rel_l2(ours[1], want[1]) <= 1e-1, "Fp8Dense grad x"


def test_params_and_init_equal_flax():
  key, x = jax.random.key(3), jnp.ones((5, 4, 16))
  pairs = [(Fp8Dense(32), nn.Dense(32)),
           (Fp8DenseGeneral((2, 16), axis=(-2, -1)), nn.DenseGeneral((2, 16), axis=(-2, -1))),
           (Fp8DenseGeneral(16, batch_dims=(0,)), nn.DenseGeneral(16, batch_dims=(0,))),
           (Fp8Einsum((16, 2, 32), "abc,cde->abde"), nn.Einsum((16, 2, 32), "abc,cde->abde"))]
  for ours, theirs in pairs:
    a, b = ours.init(key, x), theirs.init(key, x)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b), type(ours).__name__
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_loads_dense_checkpoint(rng):
  x = normal(rng, (51, 64))
  dense = nn.Dense(48, **INITS)
  params = dense.init(jax.random.key(1), x)
  y = Fp8Dense(48, recipe=RECIPE).apply(params, x)
  p = params["params"]
  assert rel_l2(y, ref_dense(x, p["kernel"], p["bias"])) <= 1e-2
  assert rel_l2(y, dense.apply(params, x)) <= 6e-2


def test_jit_and_custom_call_in_hlo(rng):
  x = normal(rng, (51, 64), jnp.bfloat16)
  for layer, xi in [(Fp8Dense(32, recipe=RECIPE, **INITS), x),
                    (Fp8Dense(32, recipe=RECIPE, frozen=True, **INITS), x),
                    (Fp8Einsum((64, 2, 16), "btd,dnh->btnh", recipe=RECIPE, **INITS), x[None])]:
    params = jax.jit(layer.init)(jax.random.key(0), xi)
    assert fp8_ran(layer, params, xi), type(layer).__name__
    np.testing.assert_array_equal(jax.jit(layer.apply)(params, xi), layer.apply(params, xi))
  small = Fp8Dense(32, **INITS)  # default recipe: a problem this small runs XLA's dot
  assert not fp8_ran(small, small.init(jax.random.key(0), x), x)


# ---------------------------------------------------------------------------------------------
# Fp8DenseGeneral and Fp8Einsum


DENSE_GENERAL = [  # (kwargs, x shape, contracted kernel axes, the same contraction as an einsum)
    (dict(features=(2, 16), axis=(-2, -1)), (51, 4, 16), (0, 1), "mab,abcd->mcd"),
    (dict(features=32, axis=1), (3, 64, 17), (0,), "adb,dc->abc"),
    (dict(features=48, batch_dims=(0,)), (2, 51, 64), (1,), "bmd,bdn->bmn"),
]


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("kwargs,shape,k_axes,eq", DENSE_GENERAL, ids=["axes2", "middle", "batch"])
def test_dense_general(rng, kwargs, shape, k_axes, eq, frozen):
  x = normal(rng, shape)
  flax_layer = nn.DenseGeneral(**kwargs, **INITS)
  float_params = flax_layer.init(jax.random.key(1), x)
  layer = Fp8DenseGeneral(**kwargs, recipe=RECIPE, frozen=frozen, **INITS)
  params = layer.init(jax.random.key(1), x) if frozen else float_params
  y = layer.apply(params, x)
  p = params["params"]
  batched = "batch_dims" in kwargs
  quant = jax.vmap(fake_quant) if batched else fake_quant  # batch_dims: one scale per batch index
  kernel = dequantize_kernel(p["kernel"], p["kernel_scale"], k_axes) if frozen else quant(p["kernel"])
  ref = einsum(eq, quant(x), kernel) + (p["bias"][:, None] if batched else p["bias"])
  assert rel_l2(y, ref) <= 1e-2, f"Fp8DenseGeneral {kwargs} frozen={frozen}"
  assert rel_l2(y, flax_layer.apply(float_params, x)) <= 6e-2, f"vs nn.DenseGeneral {kwargs} frozen={frozen}"


EINSUMS = [  # openpi's attention projections, a plain "...d,df", a fallback with a batch letter
    ("BTD,NDH->BTNH", (2, 64, 16), (1, 51, 64), True),
    ("BSD,2KDH->2BSKH", (2, 1, 64, 32), (3, 17, 64), True),
    ("BTNH,NHD->BTD", (2, 32, 48), (1, 51, 2, 32), True),
    ("...d,df->...f", (64, 32), (3, 5, 64), True),
    ("bd,bdf->bf", (3, 64, 32), (3, 64), False),
]


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("eq,shape,x_shape,fp8", EINSUMS, ids=[e[0] for e in EINSUMS])
def test_einsum(rng, eq, shape, x_shape, fp8, frozen):
  x = normal(rng, x_shape)
  flax_layer = nn.Einsum(shape, eq, **INITS)
  float_params = flax_layer.init(jax.random.key(1), x)
  layer = Fp8Einsum(shape, eq, recipe=RECIPE, frozen=frozen, **INITS)
  params = layer.init(jax.random.key(1), x) if frozen else float_params
  y = layer.apply(params, x)
  p = params["params"]
  rhs, out = eq.split(",")[1].split("->")[0], eq.split("->")[1].replace("...", "")
  bias = p["bias"].reshape([shape[rhs.index(c)] if c in rhs else 1 for c in out])
  k_axes = tuple(i for i, c in enumerate(rhs) if c not in out)
  kernel = dequantize_kernel(p["kernel"], p["kernel_scale"], k_axes) if frozen else p["kernel"]
  if fp8:
    ref = einsum(eq, fake_quant(x), kernel if frozen else fake_quant(kernel)) + bias
    assert rel_l2(y, ref) <= 1e-2, f"Fp8Einsum {eq} frozen={frozen}"
    assert fp8_ran(layer, params, x), f"{eq} did not run the FP8 GEMM"
  else:
    np.testing.assert_allclose(y, einsum(eq, x, kernel) + bias, rtol=1e-5, atol=1e-5)
  assert rel_l2(y, flax_layer.apply(float_params, x)) <= 6e-2, f"vs nn.Einsum {eq} frozen={frozen}"


# ---------------------------------------------------------------------------------------------
# fp8_dot_general


def test_dot_general_drop_in(rng):
  x = normal(rng, (51, 64))
  params = nn.Dense(32, **INITS).init(jax.random.key(1), x)
  drop_in = nn.Dense(32, dot_general=Fp8DotGeneral(RECIPE))
  assert rel_l2(drop_in.apply(params, x), Fp8Dense(32, recipe=RECIPE).apply(params, x)) <= 1e-6
  assert fp8_ran(drop_in, params, x)
  by_cls = nn.Dense(32, dot_general_cls=functools.partial(Fp8DotGeneral, RECIPE))
  assert fp8_ran(by_cls, params, normal(rng, (867, 64)))
  default_cls = nn.Dense(32, dot_general_cls=Fp8DotGeneral)  # default recipe: this small a GEMM stays in XLA
  assert not fp8_ran(default_cls, params, normal(rng, (867, 64)))
  general = nn.DenseGeneral((2, 16), axis=(-2, -1), dot_general=Fp8DotGeneral(RECIPE))
  xg = normal(rng, (51, 4, 16))
  pg = general.init(jax.random.key(1), xg)
  want = Fp8DenseGeneral((2, 16), axis=(-2, -1), recipe=RECIPE).apply(pg, xg)
  assert rel_l2(general.apply(pg, xg), want) <= 1e-6


def test_dot_general_other_contractions_use_lax(rng):
  a, b = normal(rng, (3, 5, 64)), normal(rng, (3, 64, 16))
  dims = (((2,), (1,)), ((0,), (0,)))
  np.testing.assert_array_equal(fp8_dot_general(a, b, dims), jax.lax.dot_general(a, b, dims))
  ai, bi = jnp.ones((4, 16), jnp.int32), jnp.ones((16, 16), jnp.int32)
  np.testing.assert_array_equal(fp8_dot_general(ai, bi, (((1,), (0,)), ((), ()))), 16 * jnp.ones((4, 16)))
  y = fp8_dot_general(normal(rng, (4, 64)), normal(rng, (64, 16)), (((1,), (0,)), ((), ())),
                      preferred_element_type=jnp.bfloat16, recipe=RECIPE)
  assert y.dtype == jnp.bfloat16 and y.shape == (4, 16)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_errors():
  x, key = jnp.ones((4, 64)), jax.random.key(0)
  dense = Fp8Dense(64, **INITS)
  float_params = dense.init(key, x)
  frozen_params = Fp8Dense(64, frozen=True, **INITS).init(key, x)
  with pytest.raises(Exception, match="kernel"):  # Flax's ScopeParamShapeError names the param
    dense.apply(float_params, jnp.ones((4, 48)))
  with pytest.raises(TypeError, match="quantize_params"):
    Fp8Dense(64, frozen=True).apply({"params": {**float_params["params"], "kernel_scale": jnp.ones(())}}, x)
  with pytest.raises(TypeError, match="dequantize_params"):
    dense.apply({"params": {k: v for k, v in frozen_params["params"].items() if k != "kernel_scale"}}, x)
  with pytest.raises(Exception, match="kernel_scale"):
    Fp8Dense(64, frozen=True, weight_granularity="channel").apply(frozen_params, x)
  with pytest.raises(ValueError, match="weight_granularity"):
    Fp8Dense(64, frozen=True, weight_granularity="row").init(key, x)
  with pytest.raises(ValueError, match="batch_dims"):
    Fp8DenseGeneral(16, batch_dims=(1,)).init(key, jnp.ones((2, 3, 16)))
  with pytest.raises(ValueError, match="axis"):
    Fp8DenseGeneral(16, axis=(0, 0)).init(key, jnp.ones((2, 3, 16)))
  with pytest.raises(ValueError, match="->"):
    Fp8Einsum((64, 16), "bd,df").init(key, x)
  with pytest.raises(ValueError, match="kernel shape"):
    Fp8Einsum((2, 64, 16), "bd,df->bf").init(key, x)
  with pytest.raises(ValueError, match="contracted"):
    Fp8Einsum((32, 16), "bd,df->bf", **INITS).init(key, x)
  with pytest.raises(ValueError, match="rank"):
    Fp8Einsum((64, 16), "btd,df->btf").init(key, x)
