"""Fused FP8 producers (rms / residual-rms / layer / ada-rms norm, GLU, each + quantize): against the
pure-JAX reference on fresh random inputs, edge values, gradients, transformations and bad input;
with current, static and delayed scaling.

The kernels sum a row's squares in another order than XLA and use their own tanh / exp / rsqrt, so
y matches the reference to rounding, and q can differ from the reference's q where y / scale falls
within an ulp of a rounding midpoint: there the codes differ by one FP8 step, which must stay rare.
What is exact: q against quantize() of the op's own float32 y (the kernels quantize exactly what
they return), the new residual of residual_rms_norm_fp8, and a given scale passed through. On the
GPU the reference runs on the CPU (`on_cpu`): XLA:GPU's float32 division is not correctly rounded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (AMAX_FLOOR, E4M3, E5M2, FP8_MAX, assert_bits_equal, assert_fp8_equal, flashrt_targets,
                      normal, on_cpu, rel_l2, wide)

import flashrt_jax
from flashrt_jax import reference
from flashrt_jax.ffi import fused as raw

F32, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
# (input dtype, FP8 dtype): float32 inputs give float32 y, which makes q checkable bit for bit.
DTYPES = [pytest.param(F32, E4M3, id="f32-e4m3"), pytest.param(BF16, E4M3, id="bf16-e4m3"),
          pytest.param(BF16, E5M2, id="bf16-e5m2")]
SCALINGS = [("row", "current"), ("tensor", "current"), ("row", "static"), ("tensor", "static"), ("tensor", "delayed")]
SCALING_IDS = [f"{g}-{s}" for g, s in SCALINGS]
NO_TENSOR_STATIC = [SCALINGS[i] for i in (0, 1, 2, 4)]  # for the ops with more cases per scaling
NO_TENSOR_STATIC_IDS = [SCALING_IDS[i] for i in (0, 1, 2, 4)]
# Rows 1, 51, 867; widths 1024 / 2048 (vector paths, one warp and several per row), 1000 (vector
# path in bf16, 250 float32 vectors) and 37 / 1001 (scalar path); a 3-D case.
NORM_SHAPES = [(1, 1024), (51, 2048), (867, 1000), (51, 1001), (2, 3, 37)]


def _ordinal(q):
  """FP8 codes as signed ordinals: neighbours on the FP8 grid differ by 1, and +0 equals -0."""
  b = np.asarray(q).view(np.uint8).astype(np.int32)
  return np.where(b & 0x80, -(b & 0x7F), b & 0x7F)


def assert_q_close(q, s, q_ref, s_ref, what: str):
  """q within one FP8 step of the reference, off by that step rarely; except where both dequantized
  values are negligible next to their row's largest (gelu's tail, 1 + tanh(x) for x << 0, cancels
  to a few float32 ulps whose relative error is large and which e5m2 still resolves)."""
  q, q_ref = np.asarray(q), np.asarray(q_ref)
  assert q.shape == q_ref.shape and q.dtype == q_ref.dtype, f"{what}: {q.shape} {q.dtype} vs {q_ref.shape} {q_ref.dtype}"
  nan, nan_ref = np.isnan(q.astype(np.float32)), np.isnan(q_ref.astype(np.float32))
  assert np.array_equal(nan, nan_ref), f"{what}: NaN positions differ"
  deq = q.astype(np.float32) * np.asarray(s, np.float32)
  deq_ref = q_ref.astype(np.float32) * np.asarray(s_ref, np.float32)
  with np.errstate(invalid="ignore"):
    row_max = np.nanmax(np.abs(deq_ref), axis=-1, keepdims=True)
    negligible = np.abs(deq - deq_ref) <= 1e-6 * row_max
  d = np.where(nan | negligible, 0, np.abs(_ordinal(q) - _ordinal(q_ref)))
  assert d.max(initial=0) <= 1, f"{what}: codes differ by up to {d.max()} steps at {np.argwhere(d > 1)[:4]}"
  # Rare, but not very rare: a bfloat16 x normalized without a weight is x times one float32 factor,
  # and x's 8 bits put many x / amax * fp8_max on exact FP8 midpoints, which an ulp tips either way.
  assert (d > 0).sum() <= max(2, 5e-3 * d.size), f"{what}: {(d > 0).sum()} of {d.size} codes differ by one step"


def assert_y_close(y, y_ref, what: str):
  """Agreement to a few float32 ulps of the row's scale (1 ulp of y's own dtype below float32)."""
  y, y_ref = np.asarray(y, np.float32), np.asarray(jnp.asarray(y_ref).astype(jnp.float32))
  tol = 4e-6 if y.dtype == y_ref.dtype and np.asarray(y).dtype == np.float32 else 0.0
  scale = np.max(np.abs(y_ref), axis=-1, keepdims=True)
  err = np.abs(y - y_ref)
  ok = (err <= tol * scale + 1e-30) | (err <= np.abs(y_ref) * 2.0 ** -7)
  assert ok.all(), f"{what}: y off by up to {err.max():.3g} (rel L2 {rel_l2(y, y_ref):.2e})"


def _static_scale(rng, y_ref, dtype, granularity):
  """A given scale near the current one (x0.5 .. x2), so that some values saturate."""
  y = np.asarray(y_ref, np.float32)
  amax = np.max(np.abs(y), axis=-1, keepdims=True) if granularity == "row" else np.max(np.abs(y))
  s = np.asarray(amax / FP8_MAX[dtype] * rng.uniform(0.5, 2.0, np.shape(amax)), np.float32)
  return jnp.asarray(s)


def given_scale(rng, kw, y0, scaling):
  """kw with the scale of a static / delayed scaling case (y0: the op's values), and that scale."""
  if scaling == "current":
    return kw, None
  scale = _static_scale(rng, y0.astype(jnp.float32), kw["dtype"], kw["granularity"])
  if scaling == "delayed":
    return dict(kw, scale=flashrt_jax.DelayedScaling(jnp.asarray(rng.uniform(0.5, 2.0, 3), F32), scale)), scale
  return dict(kw, scale=scale), scale


def check_delayed(call, kw, out, expect, case):
  """With a DelayedScaling scale: every output but the state is static scaling's with state.scale, and
  the next state records max |y| (to y's rounding against the reference; exactly with float32 y).
  Returns out and expect without the state."""
  state, new, new_ref = kw["scale"], out[-1], expect[-1]
  for a, b in zip(out[:-1], call(**dict(kw, scale=state.scale))):
    (assert_fp8_equal if a.dtype.itemsize == 1 else assert_bits_equal)(a, b, f"{case}: vs static scaling")
  assert_bits_equal(new.amax_history[1:], state.amax_history[:-1], f"{case}: history roll")
  np.testing.assert_allclose(np.asarray(new.amax_history[0]), np.asarray(new_ref.amax_history[0]), rtol=2e-5,
                             err_msg=f"{case}: amax")
  np.testing.assert_allclose(np.asarray(new.scale), np.asarray(new_ref.scale), rtol=2e-5, err_msg=f"{case}: scale")
  y = out[-2]
  if y.dtype == F32:
    assert_bits_equal(new.amax_history[0], np.max(np.abs(np.asarray(y))), f"{case}: amax vs max |y|")
  return out[:-1], expect[:-1]


def check_fused(op, ref, args, kwargs, *, dtype, granularity, scaling, rng, case, has_residual=False):
  """Runs op(*args, **kwargs, with_unquantized=True) against ref on the CPU, the given way of scaling."""
  kw = dict(kwargs, dtype=dtype, granularity=granularity, with_unquantized=True)
  y0 = on_cpu(ref, *args, **dict(kw, granularity="row"))[-1] if scaling != "current" else None
  kw, given = given_scale(rng, kw, y0, scaling)
  out = op(*args, **kw)
  expect = on_cpu(ref, *args, **kw)
  if scaling == "delayed":
    out, expect = check_delayed(lambda **k: op(*args, **k), kw, out, expect, case)
  if has_residual:
    assert_bits_equal(out[0], expect[0], f"{case}: new residual")
    out, expect = out[1:], expect[1:]
  q, s, y = out
  q_ref, s_ref, y_ref = expect
  s_shape = y_ref.shape[:-1] + (1,) if granularity == "row" else ()
  assert q.dtype == dtype and q.shape == y_ref.shape, f"{case}: q is {q.dtype} {q.shape}"
  assert s.dtype == F32 and s.shape == s_shape, f"{case}: scale is {s.dtype} {s.shape}"
  assert y.dtype == y_ref.dtype and y.shape == y_ref.shape, f"{case}: y is {y.dtype} {y.shape}"
  assert_y_close(y, y_ref, case)
  if given is not None:
    assert_bits_equal(s, given, f"{case}: the given scale must come back")
  else:
    np.testing.assert_allclose(np.asarray(s), np.asarray(s_ref), rtol=2e-5, err_msg=f"{case}: scale")  # a few ulps: sum order, rsqrt
  assert_q_close(q, s, q_ref, s_ref, f"{case}: q")
  if y.dtype == F32:  # exact: q is quantize() of the op's own float32 y
    q_own, s_own, *_ = on_cpu(reference.quantize, y, dtype=dtype, granularity=granularity, scale=kw.get("scale"))
    assert_fp8_equal(q, q_own, f"{case}: q vs quantize(y)")
    assert_bits_equal(s, s_own, f"{case}: scale vs quantize(y)")
  return out


def _case(name, x_dtype, dtype, granularity, scaling, shape, platform):
  return f"{name} {jnp.dtype(x_dtype).name}->{jnp.dtype(dtype).name} {granularity} {scaling} {tuple(shape)} on {platform}"


# ---------------------------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("granularity,scaling", SCALINGS, ids=SCALING_IDS)
@pytest.mark.parametrize("x_dtype,dtype", DTYPES)
def test_rms_norm_fp8(platform, rng, x_dtype, dtype, granularity, scaling, shape):
  case = _case("rms_norm_fp8", x_dtype, dtype, granularity, scaling, shape, platform)
  x = wide(rng, shape, x_dtype) if shape[-1] == 1000 else normal(rng, shape, x_dtype)
  weight = normal(rng, shape[-1:], std=0.5)
  check_fused(flashrt_jax.rms_norm_fp8, reference.rms_norm_fp8, (x, weight), {}, dtype=dtype,
              granularity=granularity, scaling=scaling, rng=rng, case=case)


@pytest.mark.parametrize("offset", [1.0, 0.0])
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
def test_rms_norm_fp8_weight_options(platform, rng, with_weight, offset):
  case = f"rms_norm_fp8 weight={with_weight} offset={offset} on {platform}"
  x = normal(rng, (51, 1024), BF16)
  weight = normal(rng, (1024,), BF16) if with_weight else None
  check_fused(flashrt_jax.rms_norm_fp8, reference.rms_norm_fp8, (x, weight), dict(offset=offset, eps=1e-5),
              dtype=E4M3, granularity="row", scaling="current", rng=rng, case=case)


@pytest.mark.parametrize("shape", [(1, 2048), (51, 1024), (867, 2048), (2, 3, 37)], ids=str)
@pytest.mark.parametrize("granularity,scaling", SCALINGS, ids=SCALING_IDS)
@pytest.mark.parametrize("x_dtype,dtype", DTYPES)
def test_residual_rms_norm_fp8(platform, rng, x_dtype, dtype, granularity, scaling, shape):
  case = _case("residual_rms_norm_fp8", x_dtype, dtype, granularity, scaling, shape, platform)
  x, residual = normal(rng, shape, x_dtype), normal(rng, shape, x_dtype, std=4.0)
  weight = normal(rng, shape[-1:], std=0.5)
  check_fused(flashrt_jax.residual_rms_norm_fp8, reference.residual_rms_norm_fp8, (x, residual, weight), {},
              dtype=dtype, granularity=granularity, scaling=scaling, rng=rng, case=case, has_residual=True)


@pytest.mark.parametrize("params", ["gamma-beta", "gamma", "none"])
@pytest.mark.parametrize("shape", [(1, 1024), (51, 2048), (867, 1001)], ids=str)
@pytest.mark.parametrize("granularity,scaling", NO_TENSOR_STATIC, ids=NO_TENSOR_STATIC_IDS)
@pytest.mark.parametrize("x_dtype,dtype", DTYPES[:2])
def test_layer_norm_fp8(platform, rng, x_dtype, dtype, granularity, scaling, shape, params):
  case = _case(f"layer_norm_fp8 {params}", x_dtype, dtype, granularity, scaling, shape, platform)
  x = normal(rng, shape, x_dtype) + 3.0  # an offset mean, which the norm must remove
  gamma = normal(rng, shape[-1:]) if params != "none" else None
  beta = normal(rng, shape[-1:]) if params == "gamma-beta" else None
  check_fused(flashrt_jax.layer_norm_fp8, reference.layer_norm_fp8, (x, gamma, beta), dict(eps=1e-5),
              dtype=dtype, granularity=granularity, scaling=scaling, rng=rng, case=case)


@pytest.mark.parametrize("modulation", ["per-sequence", "per-token"])
@pytest.mark.parametrize("shape", [(3, 17, 1024), (2, 51, 72), (1, 1, 2048), (2, 2, 5, 37)], ids=str)
@pytest.mark.parametrize("granularity,scaling", SCALINGS, ids=SCALING_IDS)
@pytest.mark.parametrize("x_dtype,dtype", DTYPES[:2])
def test_ada_rms_norm_fp8(platform, rng, x_dtype, dtype, granularity, scaling, shape, modulation):
  case = _case(f"ada_rms_norm_fp8 {modulation}", x_dtype, dtype, granularity, scaling, shape, platform)
  x = normal(rng, shape, x_dtype)
  mod_shape = shape if modulation == "per-token" else shape[:-2] + shape[-1:]
  scale_mod, shift_mod = normal(rng, mod_shape, x_dtype, std=0.3), normal(rng, mod_shape, x_dtype, std=0.3)
  check_fused(flashrt_jax.ada_rms_norm_fp8, reference.ada_rms_norm_fp8, (x, scale_mod, shift_mod), {},
              dtype=dtype, granularity=granularity, scaling=scaling, rng=rng, case=case)


@pytest.mark.parametrize("layout", ["split", "merged"])
@pytest.mark.parametrize("activation", ["gelu_tanh", "silu"])
@pytest.mark.parametrize("shape", [(1, 16384), (51, 1024), (867, 2048), (2, 3, 37)], ids=str)
@pytest.mark.parametrize("granularity,scaling", SCALINGS, ids=SCALING_IDS)
@pytest.mark.parametrize("x_dtype,dtype", DTYPES)
def test_glu_fp8(platform, rng, x_dtype, dtype, granularity, scaling, shape, activation, layout):
  case = _case(f"glu_fp8 {activation} {layout}", x_dtype, dtype, granularity, scaling, shape, platform)
  gate, up = normal(rng, shape, x_dtype, std=2.0), normal(rng, shape, x_dtype)
  args = (jnp.concatenate([gate, up], axis=-1), None) if layout == "merged" else (gate, up)
  check_fused(flashrt_jax.glu_fp8, reference.glu_fp8, args, dict(activation=activation), dtype=dtype,
              granularity=granularity, scaling=scaling, rng=rng, case=case)


def test_outputs_without_unquantized(platform, rng):
  x = normal(rng, (51, 1024), BF16)
  w = normal(rng, (1024,))
  for name, out, n in (
      ("rms_norm_fp8", flashrt_jax.rms_norm_fp8(x, w), 2),
      ("residual_rms_norm_fp8", flashrt_jax.residual_rms_norm_fp8(x, x, w), 3),
      ("layer_norm_fp8", flashrt_jax.layer_norm_fp8(x, w, w, granularity="tensor"), 2),
      ("ada_rms_norm_fp8", flashrt_jax.ada_rms_norm_fp8(x, x, x), 2),
      ("glu_fp8", flashrt_jax.glu_fp8(x, x, activation="silu"), 2),
  ):
    assert isinstance(out, tuple) and len(out) == n, f"{name} on {platform}: {len(out)} outputs, expected {n}"
    assert out[-2].dtype == E4M3 and out[-1].dtype == F32, f"{name} on {platform}: (q, scale) at the end"


# ---------------------------------------------------------------------------------------------
# Edge values


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_zero_rows(platform, granularity):
  x = jnp.zeros((51, 1024), BF16)
  for name, (q, s) in (("rms_norm_fp8", flashrt_jax.rms_norm_fp8(x, granularity=granularity)),
                       ("glu_fp8", flashrt_jax.glu_fp8(x, x, granularity=granularity))):
    case = f"{name} all-zero {granularity} on {platform}"
    assert np.all(np.asarray(s) == np.float32(AMAX_FLOOR) / np.float32(448.0)), f"{case}: floor scale"
    assert not np.asarray(q).view(np.uint8).any(), f"{case}: q must be all +0"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_nan_inf_rows(platform, rng, granularity, bad):
  case = f"rms_norm_fp8 {bad} {granularity} on {platform}"
  x = np.array(normal(rng, (51, 1024)))
  x[3, 5] = bad
  q, s = flashrt_jax.rms_norm_fp8(jnp.asarray(x), granularity=granularity)
  q, s = np.asarray(q, np.float32), np.asarray(s)
  assert np.isnan(s.ravel()[3 if granularity == "row" else 0]), f"{case}: the scale must flag the row"
  assert np.isnan(q[3]).all(), f"{case}: the row must be NaN"
  if granularity == "row":
    assert np.isfinite(np.delete(s, 3)).all() and not np.isnan(np.delete(q, 3, axis=0)).any(), \
        f"{case}: other rows must be unaffected"
  q, _ = flashrt_jax.rms_norm_fp8(jnp.asarray(x), scale=jnp.float32(0.01))
  assert np.isnan(np.asarray(q, np.float32)[3]).any(), f"{case}: static q of the row must carry the NaN"


def test_glu_inf_saturates_with_given_scale(platform):
  gate = jnp.asarray(np.array([[np.inf, -np.inf, 1.0, 2.0]], np.float32))
  q, _ = flashrt_jax.glu_fp8(gate, jnp.ones_like(gate), activation="silu", scale=jnp.float32(0.01))
  q = np.asarray(q, np.float32)
  assert q[0, 0] == 448.0, f"glu_fp8 on {platform}: inf must saturate, got {q}"
  assert np.isnan(q[0, 1]), f"glu_fp8 on {platform}: silu(-inf) = -inf * 0 is NaN, got {q}"


# ---------------------------------------------------------------------------------------------
# Gradients: the ops' VJPs are the reference's


def _grad_case(name, rng):
  x = normal(rng, (2, 17, 64))
  w = normal(rng, (64,))
  cases = {
      "rms_norm_fp8": (lambda f, x, w: f(x, w), (x, w)),
      "residual_rms_norm_fp8": (lambda f, x, w: f(x, x * 0.5, w), (x, w)),
      "layer_norm_fp8": (lambda f, x, w: f(x, w, w * 0.1), (x, w)),
      "ada_rms_norm_fp8": (lambda f, x, w: f(x, jnp.broadcast_to(w * 0.1, (2, 64)), jnp.broadcast_to(w, (2, 64))),
                           (x, w)),
      "glu_fp8": (lambda f, x, w: f(x * w), (x, w)),
  }
  return cases[name]


def _grad_loss(out):
  """A loss of every output (q, scale, y, a new residual) but a delayed-scaling state."""
  q, s, y = out[-3:]
  total = jnp.sum(reference.dequantize(q, s, jnp.float32) * 0.7) + jnp.sum(y.astype(jnp.float32) ** 2)
  return total + (jnp.sum(jnp.sin(out[0])) if len(out) == 4 else 0.0)


GRAD_OPS = ["rms_norm_fp8", "residual_rms_norm_fp8", "layer_norm_fp8", "ada_rms_norm_fp8", "glu_fp8"]


@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("name", GRAD_OPS)
def test_grad_matches_reference(platform, rng, name, granularity):
  case = f"grad {name} {granularity} on {platform}"
  call, args = _grad_case(name, rng)

  def grads(fn):
    def loss(*args):
      return _grad_loss(call(lambda *a: fn(*a, granularity=granularity, with_unquantized=True), *args))
    return jax.grad(loss, argnums=(0, 1))(*args)

  ours = grads(getattr(flashrt_jax, name))
  ref = on_cpu(grads, getattr(reference, name))
  for arg, a, b in zip(("x", "w"), ours, ref):
    assert float(jnp.linalg.norm(b)) > 0, f"{case}: reference d{arg} is zero; the case tests nothing"
    assert rel_l2(a, b) <= 1e-4, f"{case}: d{arg} rel L2 {rel_l2(a, b):.2e}"


@pytest.mark.parametrize("name", GRAD_OPS)
def test_grad_with_delayed_state(platform, rng, name):
  """Under jit and grad: the state takes zero gradient, the inputs those of static scaling."""
  case = f"grad {name} delayed on {platform}"
  call, args = _grad_case(name, rng)
  state = flashrt_jax.DelayedScaling(jnp.asarray([2.0, 1.0], F32), jnp.float32(0.02))

  def loss(scale, *args):
    out = call(lambda *a: getattr(flashrt_jax, name)(*a, scale=scale, with_unquantized=True), *args)
    return _grad_loss(out[:-1] if isinstance(scale, flashrt_jax.DelayedScaling) else out)

  dstate, *ours = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(state, *args)
  _, *static = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(state.scale, *args)
  for arg, a, b in zip(("x", "w"), ours, static):
    assert float(jnp.linalg.norm(b)) > 0, f"{case}: static d{arg} is zero; the case tests nothing"
    assert rel_l2(a, b) <= 1e-6, f"{case}: d{arg} rel L2 {rel_l2(a, b):.2e} from static scaling's"
  for field, d in zip(state._fields, dstate):
    assert not np.asarray(d).any(), f"{case}: d{field} must be zero"


# ---------------------------------------------------------------------------------------------
# Transformations


def test_jit_hlo_has_custom_calls(platform, rng):
  x, w = normal(rng, (51, 1024), BF16), normal(rng, (1024,))

  def fn(x, w):
    h, q, s = flashrt_jax.residual_rms_norm_fp8(x, x, w)
    q2, s2 = flashrt_jax.glu_fp8(jnp.concatenate([x, x], -1), granularity="tensor")
    return h, q, s, q2, s2

  targets = flashrt_targets(fn, x, w)
  assert {"flashrt_norm_fp8", "flashrt_glu_fp8"} <= targets, f"on {platform}: compiled HLO has {targets}"
  for a, b in zip(jax.jit(fn)(x, w), fn(x, w)):
    assert_bits_equal(a.astype(F32) if a.dtype.itemsize == 1 else a, b.astype(F32) if b.dtype.itemsize == 1 else b,
                      f"jit vs eager on {platform}")


@pytest.mark.parametrize("granularity,scaling", SCALINGS, ids=SCALING_IDS)
def test_vmap_matches_loop(platform, rng, granularity, scaling):
  case = f"vmap {granularity} {scaling} on {platform}"
  x = normal(rng, (3, 2, 17, 72), BF16)
  mods = normal(rng, (3, 2, 72), BF16, std=0.3)
  w = normal(rng, (3, 72))
  scale = None
  if scaling == "static":
    scale = jnp.full((3,) + ((2, 17, 1) if granularity == "row" else ()), 0.01, F32)
  if scaling == "delayed":
    scale = flashrt_jax.DelayedScaling(jnp.zeros((3, 2), F32), jnp.full((3,), 0.01, F32))

  def one(x, mod, w, s):
    return (flashrt_jax.ada_rms_norm_fp8(x, mod, mod, scale=s, granularity=granularity),
            flashrt_jax.rms_norm_fp8(x, w, scale=s, granularity=granularity),
            flashrt_jax.glu_fp8(x, x * 2, scale=s, granularity=granularity))

  batched = jax.vmap(one)(x, mods, w, scale)
  looped = [one(x[i], mods[i], w[i], jax.tree_util.tree_map(lambda a: a[i], scale)) for i in range(3)]
  for k, name in enumerate(("ada_rms_norm_fp8", "rms_norm_fp8", "glu_fp8")):
    for i in range(3):
      assert_fp8_equal(batched[k][0][i], looped[i][k][0], f"{case}: {name} q[{i}]")
      assert_bits_equal(batched[k][1][i], looped[i][k][1], f"{case}: {name} scale[{i}]")
      if scaling == "delayed":  # one amax per vmapped tensor
        assert_bits_equal(batched[k][2].amax_history[i], looped[i][k][2].amax_history, f"{case}: {name} history[{i}]")


@pytest.mark.parametrize("name", ["rms_norm_fp8", "glu_fp8", "glu_bwd_fp8"])
def test_vmap_delayed_amax_per_tensor(platform, rng, name):
  """Under vmap a given scale makes one call over every row, with one amax per vmapped tensor: each
  is max |y| of its own float32 y, bit for bit, where the tensors' rows share blocks of the kernel."""
  x = normal(rng, (5, 301, 1024)) * jnp.arange(1.0, 6.0)[:, None, None]
  states = flashrt_jax.DelayedScaling(jnp.zeros((5, 2), F32), jnp.full((5,), 0.05, F32))
  ops = {"rms_norm_fp8": lambda x, st: flashrt_jax.rms_norm_fp8(x, x[0], scale=st, with_unquantized=True),
         "glu_fp8": lambda x, st: flashrt_jax.glu_fp8(x, x * 0.5, scale=st, with_unquantized=True),
         "glu_bwd_fp8": lambda x, st: flashrt_jax.glu_bwd_fp8(jnp.concatenate([x, x], -1), x, activation="silu",
                                                              scale=st, with_unquantized=True)}
  *_, y, new = jax.vmap(ops[name])(x, states)
  amax = np.max(np.abs(np.asarray(y)), axis=(1, 2))
  assert len(set(amax.tolist())) == 5, f"{name} on {platform}: the case needs distinct amaxes, got {amax}"
  assert_bits_equal(new.amax_history[:, 0], amax, f"vmap {name} delayed on {platform}: amax per tensor")


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_scan_and_checkpoint(platform, rng, scaling):
  """A layer stack's scan: the residual stream and, with delayed scaling, the state in the carry."""
  case = f"scan {scaling} on {platform}"
  x = normal(rng, (4, 51, 1024), BF16) * jnp.asarray([1.0, 8.0, 0.5, 2.0], BF16)[:, None, None]
  w = normal(rng, (1024,))
  state0 = flashrt_jax.delayed_scaling(2) if scaling == "delayed" else None

  def scan(op, dequantize, x):
    def body(carry, xi):
      residual, state = carry
      out = op(xi, residual, w, scale=state)  # (h, q, scale[, next state])
      return (out[0], None if state is None else out[3]), dequantize(out[1], out[2], jnp.float32).sum()
    return jax.lax.scan(jax.checkpoint(body), (jnp.zeros_like(x[0]), state0), x)

  carry, sums = scan(flashrt_jax.residual_rms_norm_fp8, flashrt_jax.dequantize, x)
  carry_ref, sums_ref = on_cpu(scan, reference.residual_rms_norm_fp8, reference.dequantize, x)
  assert_bits_equal(carry[0], carry_ref[0], f"{case}: residual stream")
  np.testing.assert_allclose(np.asarray(sums), np.asarray(sums_ref), rtol=1e-3, err_msg=case)
  if state0 is not None:
    for a, b in zip(carry[1], carry_ref[1]):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, err_msg=f"{case}: state")
  g = jax.grad(lambda x: scan(flashrt_jax.residual_rms_norm_fp8, flashrt_jax.dequantize, x)[1].sum())(x)
  assert np.isfinite(np.asarray(g, np.float32)).all(), f"scan grad on {platform}"


# ---------------------------------------------------------------------------------------------
# Bad input


def _bad(name, call, error, match):
  return pytest.param(call, error, match, id=name)


def _f(fn, *args, **kw):
  return lambda: fn(*args, **kw)


X, W = jnp.ones((51, 64), BF16), jnp.ones((64,), F32)
X3 = jnp.ones((2, 17, 64), BF16)
STATE = flashrt_jax.delayed_scaling(2)
BAD = [
    _bad("rms-x-int", _f(flashrt_jax.rms_norm_fp8, X.astype(jnp.int32)), TypeError, r"rms_norm_fp8: x must be float32"),
    _bad("rms-x-fp8", _f(flashrt_jax.rms_norm_fp8, X.astype(E4M3)), TypeError, r"rms_norm_fp8: x must be float32"),
    _bad("rms-x-rank0", _f(flashrt_jax.rms_norm_fp8, X[0, 0]), ValueError, r"rms_norm_fp8: x must have rank >= 1"),
    _bad("rms-x-empty", _f(flashrt_jax.rms_norm_fp8, X[:0]), ValueError, r"rms_norm_fp8: x must not be empty"),
    _bad("rms-x-too-wide", _f(flashrt_jax.rms_norm_fp8, jnp.ones((2, 16392), BF16)), ValueError,
         r"rms_norm_fp8: x rows must hold at most 16384"),
    _bad("rms-x-too-wide-unaligned", _f(flashrt_jax.rms_norm_fp8, jnp.ones((2, 8193), BF16)), ValueError,
         r"rms_norm_fp8: x rows must hold at most .*got 8193"),
    _bad("rms-weight-width", _f(flashrt_jax.rms_norm_fp8, X, W[:63]), ValueError,
         r"rms_norm_fp8: weight must have shape \(64,\) .*got \(63,\)"),
    _bad("rms-weight-int", _f(flashrt_jax.rms_norm_fp8, X, W.astype(jnp.int32)), TypeError,
         r"rms_norm_fp8: weight must be float32"),
    _bad("rms-weight-rank2", _f(flashrt_jax.rms_norm_fp8, X, W[None]), ValueError, r"rms_norm_fp8: weight must have shape"),
    _bad("rms-dtype", _f(flashrt_jax.rms_norm_fp8, X, dtype=jnp.bfloat16), ValueError, r"rms_norm_fp8: dtype must be float8"),
    _bad("rms-granularity", _f(flashrt_jax.rms_norm_fp8, X, granularity="block"), ValueError,
         r"rms_norm_fp8: granularity must be one of"),
    _bad("rms-scale-f16", _f(flashrt_jax.rms_norm_fp8, X, scale=jnp.float16(1)), TypeError,
         r"rms_norm_fp8: scale must be float32"),
    _bad("rms-scale-shape", _f(flashrt_jax.rms_norm_fp8, X, scale=jnp.ones((50, 1), F32)), ValueError,
         r"rms_norm_fp8: scale must have shape \(\) or \(51, 1\), got \(50, 1\)"),
    _bad("rms-scale-zero", _f(flashrt_jax.rms_norm_fp8, X, scale=jnp.float32(0)), ValueError,
         r"rms_norm_fp8: scale must be finite and > 0"),
    _bad("rms-eps-str", _f(flashrt_jax.rms_norm_fp8, X, eps="1e-6"), TypeError, r"rms_norm_fp8: eps must be a finite"),
    _bad("rms-eps-negative", _f(flashrt_jax.rms_norm_fp8, X, eps=-1.0), ValueError, r"rms_norm_fp8: eps must be >= 0"),
    _bad("rms-with-unquantized", _f(flashrt_jax.rms_norm_fp8, X, with_unquantized=1), TypeError,
         r"rms_norm_fp8: with_unquantized must be a bool"),
    _bad("residual-dtype", _f(flashrt_jax.residual_rms_norm_fp8, X, X.astype(F32)), TypeError,
         r"residual_rms_norm_fp8: residual must be bfloat16"),
    _bad("residual-shape", _f(flashrt_jax.residual_rms_norm_fp8, X, X[:50]), ValueError,
         r"residual_rms_norm_fp8: residual must have the shape of x \(51, 64\); got \(50, 64\)"),
    _bad("layer-gamma-width", _f(flashrt_jax.layer_norm_fp8, X, W, W[:32]), ValueError,
         r"layer_norm_fp8: beta must have shape \(64,\)"),
    _bad("ada-x-rank1", _f(flashrt_jax.ada_rms_norm_fp8, X[0], X[0], X[0]), ValueError,
         r"ada_rms_norm_fp8: x must have rank >= 2"),
    _bad("ada-mod-shape", _f(flashrt_jax.ada_rms_norm_fp8, X3, X3[:, :1], X3[:, :1]), ValueError,
         r"ada_rms_norm_fp8: scale_mod must have shape \(2, 17, 64\) or \(2, 64\)"),
    _bad("ada-mod-dtype", _f(flashrt_jax.ada_rms_norm_fp8, X3, X3[:, 0].astype(F32), X3[:, 0]), TypeError,
         r"ada_rms_norm_fp8: scale_mod must be bfloat16"),
    _bad("ada-shift-shape", _f(flashrt_jax.ada_rms_norm_fp8, X3, X3[:, 0], X3), ValueError,
         r"ada_rms_norm_fp8: shift_mod must have the shape of scale_mod"),
    _bad("glu-activation", _f(flashrt_jax.glu_fp8, X, X, activation="relu"), ValueError,
         r"glu_fp8: activation must be one of"),
    _bad("glu-up-shape", _f(flashrt_jax.glu_fp8, X, X[:, :32]), ValueError, r"glu_fp8: up must have the shape of gate"),
    _bad("glu-up-dtype", _f(flashrt_jax.glu_fp8, X, X.astype(F32)), TypeError, r"glu_fp8: up must be bfloat16"),
    _bad("glu-merged-odd", _f(flashrt_jax.glu_fp8, X[:, :63]), ValueError, r"glu_fp8: a merged gate .* even last axis"),
    _bad("glu-gate-empty", _f(flashrt_jax.glu_fp8, X[:, :0], X[:, :0]), ValueError, r"glu_fp8: gate must not be empty"),
    _bad("glu-scale-shape", _f(flashrt_jax.glu_fp8, X, scale=jnp.ones((51, 2), F32)), ValueError,
         r"glu_fp8: scale must have shape \(\) or \(51, 1\), got \(51, 2\)"),
    _bad("rms-state-row", _f(flashrt_jax.rms_norm_fp8, X, scale=STATE, granularity="row"), ValueError,
         r"rms_norm_fp8: granularity='row' cannot take a DelayedScaling scale"),
    _bad("residual-state-history-rank", _f(flashrt_jax.residual_rms_norm_fp8, X, X,
                                           scale=STATE._replace(amax_history=jnp.zeros((2, 2), F32))),
         ValueError, r"residual_rms_norm_fp8: scale.amax_history must have rank 1, got shape \(2, 2\)"),
    _bad("layer-state-history-empty", _f(flashrt_jax.layer_norm_fp8, X,
                                         scale=STATE._replace(amax_history=jnp.zeros((0,), F32))),
         ValueError, r"layer_norm_fp8: scale.amax_history must not be empty"),
    _bad("ada-state-scale-bf16", _f(flashrt_jax.ada_rms_norm_fp8, X3, X3, X3,
                                    scale=STATE._replace(scale=jnp.ones((), BF16))),
         TypeError, r"ada_rms_norm_fp8: scale.scale must be float32, got bfloat16"),
    _bad("glu-state-scale-shape", _f(flashrt_jax.glu_fp8, X, scale=STATE._replace(scale=jnp.ones((1,), F32))),
         ValueError, r"glu_fp8: scale.scale must have shape \(\), got \(1,\)"),
]


@pytest.mark.parametrize("call,error,match", BAD)
def test_bad_input_raises(call, error, match):
  with pytest.raises(error, match=match):
    call()


RAW_BAD = [
    pytest.param(lambda: raw.norm_fp8(X, None, W[:32], None, None, None, None, kind="rms", eps=1e-6, offset=1.0,
                                      dtype=E4M3, rowwise=True, with_y=False),
                 r"norm_fp8: weight must be \(n, 64\)", id="norm-weight-width"),
    pytest.param(lambda: raw.norm_fp8(X, None, W.astype(BF16), None, None, None, None, kind="rms", eps=1e-6,
                                      offset=1.0, dtype=E4M3, rowwise=True, with_y=False),
                 r"norm_fp8: weight must be float32", id="norm-weight-bf16"),
    pytest.param(lambda: raw.norm_fp8(X, None, None, None, None, None, jnp.ones((2,), F32), kind="rms", eps=1e-6,
                                      offset=1.0, dtype=E4M3, rowwise=True, with_y=False),
                 r"norm_fp8: scale must hold one value or one per group of rows", id="norm-scale-count"),
    pytest.param(lambda: raw.norm_fp8(X.astype(jnp.int32), None, None, None, None, None, None, kind="rms", eps=1e-6,
                                      offset=1.0, dtype=E4M3, rowwise=True, with_y=False),
                 r"norm_fp8: x must be float32, bfloat16 or float16", id="norm-x-int"),
    pytest.param(lambda: raw.norm_fp8(X, None, None, None, None, None, None, kind="rms", eps=1e-6, offset=1.0,
                                      dtype=BF16, rowwise=True, with_y=False),
                 r"norm_fp8: q must be float8", id="norm-q-bf16"),
    pytest.param(lambda: raw.glu_fp8(X, X[:, :32], None, activation="silu", dtype=E4M3, rowwise=True, with_y=False),
                 r"glu_fp8: up must have shape", id="glu-up-shape"),
    pytest.param(lambda: raw.glu_fp8(jnp.ones((2, 2 * 16392), BF16), None, None, activation="silu", dtype=E4M3,
                                     rowwise=True, with_y=False),
                 r"glu_fp8: gate rows must hold at most 16384", id="glu-too-wide"),
    pytest.param(lambda: jax.ffi.ffi_call("flashrt_glu_fp8", [jax.ShapeDtypeStruct((51, 32), E4M3),
                                                              jax.ShapeDtypeStruct((2,), F32)])(
                     X, jnp.ones((), F32), activation=np.int32(1), merged=np.bool_(True), static_scale=np.bool_(True),
                     with_y=np.bool_(False)),
                 r"glu_fp8: amax result must be float32 with one value per given scale \(1\)", id="glu-static-amax"),
]


@pytest.mark.parametrize("call,match", RAW_BAD)
def test_handler_rejects_inconsistent_call(platform, call, match):
  with pytest.raises(RuntimeError, match=match) as info:  # XlaRuntimeError / JaxRuntimeError
    jax.block_until_ready(call())
  assert "INVALID_ARGUMENT" in str(info.value), f"{info.value}: the handler must return InvalidArgument"


# ---------------------------------------------------------------------------------------------
# glu_bwd_fp8: the fused GLU backward + quantize


def _assert_glu_bwd_close(q, s, y, q_ref, s_ref, y_ref, what: str):
  """The reference's float32 GLU backward is ill-conditioned in gelu's tail (1 + tanh(z) for z << 0
  cancels to a few float32 ulps of 1, and the kernels' tanh and derivative order differ from XLA's in
  those ulps), and E5M2 resolves values down to ~1e-9 of a row's amax: values below 2e-5 of the row's
  largest count as agreeing when they agree to that absolute level."""
  y, y_ref = np.asarray(y, np.float32), np.asarray(jnp.asarray(y_ref).astype(jnp.float32))
  row_max = np.max(np.abs(y_ref), axis=-1, keepdims=True)
  err = np.abs(y - y_ref)
  ok = (err <= 2e-5 * row_max) | (err <= np.abs(y_ref) * 2.0 ** -7)
  assert ok.all(), f"{what}: y off by up to {err.max():.3g} (rel L2 {rel_l2(y, y_ref):.2e})"
  q, q_ref = np.asarray(q), np.asarray(q_ref)
  deq = q.astype(np.float32) * np.asarray(s, np.float32)
  deq_ref = q_ref.astype(np.float32) * np.asarray(s_ref, np.float32)
  negligible = np.abs(deq - deq_ref) <= 2e-5 * row_max
  d = np.where(negligible, 0, np.abs(_ordinal(q) - _ordinal(q_ref)))
  assert d.max(initial=0) <= 1, f"{what}: codes differ by up to {d.max()} steps at {np.argwhere(d > 1)[:4]}"
  assert (d > 0).sum() <= max(2, 5e-3 * d.size), f"{what}: {(d > 0).sum()} of {d.size} codes differ by one step"


def _check_glu_bwd(rng, shape, x_dtype, dtype, granularity, scaling, activation, col_scale, case):
  f = shape[-1]
  gate_up = normal(rng, shape[:-1] + (2 * f,), x_dtype, std=2.0)
  dh = normal(rng, shape, x_dtype)
  kw = dict(activation=activation, dtype=dtype, granularity=granularity, with_unquantized=True, col_scale=col_scale)
  d0 = on_cpu(reference.glu_bwd_fp8, gate_up, dh, **dict(kw, granularity="row"))[-1] if scaling != "current" else None
  kw, given = given_scale(rng, kw, d0, scaling)
  out = flashrt_jax.glu_bwd_fp8(gate_up, dh, **kw)
  expect = on_cpu(reference.glu_bwd_fp8, gate_up, dh, **kw)
  if scaling == "delayed":
    out, expect = check_delayed(lambda **k: flashrt_jax.glu_bwd_fp8(gate_up, dh, **k), kw, out, expect, case)
  (q, s, y), (q_ref, s_ref, y_ref) = out, expect
  s_shape = gate_up.shape[:-1] + (1,) if granularity == "row" else ()
  assert q.dtype == dtype and q.shape == gate_up.shape, f"{case}: q is {q.dtype} {q.shape}"
  assert s.dtype == F32 and s.shape == s_shape, f"{case}: scale is {s.dtype} {s.shape}"
  assert y.dtype == gate_up.dtype and y.shape == gate_up.shape, f"{case}: y is {y.dtype} {y.shape}"
  if given is not None:
    assert_bits_equal(s, given, f"{case}: the given scale must come back")
  else:
    np.testing.assert_allclose(np.asarray(s), np.asarray(s_ref), rtol=2e-5, err_msg=f"{case}: scale")
  _assert_glu_bwd_close(q, s, y, q_ref, s_ref, y_ref, case)
  if y.dtype == F32:  # exact: q is quantize() of the op's own float32 values
    q_own, s_own, *_ = on_cpu(reference.quantize, y, dtype=dtype, granularity=granularity, scale=kw.get("scale"))
    assert_fp8_equal(q, q_own, f"{case}: q vs quantize(y)")
    assert_bits_equal(s, s_own, f"{case}: scale vs quantize(y)")


# (rows..., F): rows 1 and 51; 2F = 64 (one warp), 2048 (several per row), 32768 (a 512-thread block
# per row, for one row); a 3-D case and an F of no whole vectors (the scalar path).
GLU_BWD_SHAPES = [(51, 32), (51, 1024), (1, 16384), (2, 3, 37)]


@pytest.mark.parametrize("activation", ["gelu_tanh", "silu"])
@pytest.mark.parametrize("shape", GLU_BWD_SHAPES, ids=str)
@pytest.mark.parametrize("granularity,scaling", NO_TENSOR_STATIC, ids=NO_TENSOR_STATIC_IDS)
@pytest.mark.parametrize("x_dtype,dtype", [pytest.param(F32, E5M2, id="f32-e5m2"),
                                           pytest.param(BF16, E5M2, id="bf16-e5m2"),
                                           pytest.param(BF16, E4M3, id="bf16-e4m3")])
def test_glu_bwd_fp8(platform, rng, x_dtype, dtype, granularity, scaling, shape, activation):
  case = _case(f"glu_bwd_fp8 {activation}", x_dtype, dtype, granularity, scaling, shape, platform)
  _check_glu_bwd(rng, shape, x_dtype, dtype, granularity, scaling, activation, None, case)


@pytest.mark.parametrize("granularity,scaling", [("row", "current"), ("tensor", "current"), ("row", "static")],
                         ids=["row", "tensor", "static"])
def test_glu_bwd_fp8_col_scale(platform, rng, granularity, scaling):
  case = f"glu_bwd_fp8 col_scale {granularity} {scaling} on {platform}"
  col_scale = jnp.asarray(rng.uniform(0.1, 3.0, (2048,)).astype(np.float32))
  _check_glu_bwd(rng, (51, 1024), BF16, E5M2, granularity, scaling, "gelu_tanh", col_scale, case)


def test_glu_bwd_fp8_vmap_and_defaults(platform, rng):
  gate_up, dh = normal(rng, (3, 17, 128), BF16), normal(rng, (3, 17, 64), BF16)
  col_scale = jnp.asarray(rng.uniform(0.5, 2.0, (128,)).astype(np.float32))
  q, s = flashrt_jax.glu_bwd_fp8(gate_up, dh, activation="silu", col_scale=col_scale)
  assert q.dtype == E5M2 and s.shape == (3, 17, 1), f"on {platform}: defaults give e5m2 per row, got {q.dtype} {s.shape}"
  qv, sv = jax.vmap(lambda g, d: flashrt_jax.glu_bwd_fp8(g, d, activation="silu", col_scale=col_scale))(gate_up, dh)
  assert_fp8_equal(qv, q, f"vmap of glu_bwd_fp8 on {platform}")
  assert_bits_equal(sv, s, f"vmap of glu_bwd_fp8 scales on {platform}")


def test_glu_bwd_fp8_not_differentiable(platform, rng):
  gate_up, dh = normal(rng, (4, 64)), normal(rng, (4, 32))
  loss = lambda g: jnp.sum(flashrt_jax.glu_bwd_fp8(g, dh, activation="gelu_tanh")[0].astype(F32))
  with pytest.raises(TypeError, match="glu_bwd_fp8 is a backward building block and is not differentiable"):
    jax.grad(loss)(gate_up)


GLU_BWD_BAD = [
    _bad("glu-bwd-activation", _f(flashrt_jax.glu_bwd_fp8, X, X[:, :32], activation="relu"), ValueError,
         r"glu_bwd_fp8: activation must be one of"),
    _bad("glu-bwd-odd", _f(flashrt_jax.glu_bwd_fp8, X[:, :63], X[:, :31], activation="silu"), ValueError,
         r"glu_bwd_fp8: gate_up \[gate \| up\] must have an even last axis"),
    _bad("glu-bwd-dh-shape", _f(flashrt_jax.glu_bwd_fp8, X, X, activation="silu"), ValueError,
         r"glu_bwd_fp8: dh must have shape \(51, 32\)"),
    _bad("glu-bwd-dh-dtype", _f(flashrt_jax.glu_bwd_fp8, X, X[:, :32].astype(F32), activation="silu"), TypeError,
         r"glu_bwd_fp8: dh must be bfloat16"),
    _bad("glu-bwd-col-scale", _f(flashrt_jax.glu_bwd_fp8, X, X[:, :32], activation="silu", col_scale=W[:32]),
         ValueError, r"glu_bwd_fp8: col_scale must have shape \(64,\)"),
    _bad("glu-bwd-too-wide", _f(flashrt_jax.glu_bwd_fp8, jnp.ones((2, 2 * 16392), BF16), jnp.ones((2, 16392), BF16),
                                activation="silu"), ValueError, r"glu_bwd_fp8: gate and up rows must hold at most 16384"),
    _bad("glu-bwd-scale-shape", _f(flashrt_jax.glu_bwd_fp8, X, X[:, :32], activation="silu",
                                   scale=jnp.ones((51, 2), F32)), ValueError,
         r"glu_bwd_fp8: scale must have shape \(\) or \(51, 1\), got \(51, 2\)"),
    _bad("glu-bwd-dtype", _f(flashrt_jax.glu_bwd_fp8, X, X[:, :32], activation="silu", dtype=BF16), ValueError,
         r"glu_bwd_fp8: dtype must be"),
    _bad("glu-bwd-state-row", _f(flashrt_jax.glu_bwd_fp8, X, X[:, :32], activation="silu", scale=STATE,
                                 granularity="row"), ValueError,
         r"glu_bwd_fp8: granularity='row' cannot take a DelayedScaling scale"),
]


@pytest.mark.parametrize("call,error,match", GLU_BWD_BAD)
def test_glu_bwd_fp8_bad_input_raises(call, error, match):
  with pytest.raises(error, match=match):
    call()


@pytest.mark.parametrize("call,match", [
    pytest.param(lambda: raw.glu_bwd_fp8(X, X, None, None, activation="silu", dtype=E5M2, rowwise=True, with_y=False),
                 r"glu_bwd_fp8: dh must have gate_up's dtype and shape", id="dh-shape"),
    pytest.param(lambda: raw.glu_bwd_fp8(X, X[:, :32], W[:30], None, activation="silu", dtype=E5M2, rowwise=True,
                                         with_y=False), r"glu_bwd_fp8: col_scale must be float32 with 64", id="col"),
    pytest.param(lambda: raw.glu_bwd_fp8(jnp.ones((2, 2 * 16392), BF16), jnp.ones((2, 16392), BF16), None, None,
                                         activation="silu", dtype=E5M2, rowwise=True, with_y=False),
                 r"glu_bwd_fp8: gate_up gate and up must hold at most 16384", id="too-wide"),
    pytest.param(lambda: raw.glu_bwd_fp8(X, X[:, :32], None, None, activation="silu", dtype=BF16, rowwise=True,
                                         with_y=False), r"glu_bwd_fp8: q must be float8", id="q-bf16"),
])
def test_glu_bwd_handler_rejects_inconsistent_call(platform, call, match):
  with pytest.raises(RuntimeError, match=match) as info:
    jax.block_until_ready(call())
  assert "INVALID_ARGUMENT" in str(info.value), f"{info.value}: the handler must return InvalidArgument"
