"""quantize, quantize_transpose and dequantize: bit for bit against the numpy oracle (ml_dtypes
casts), edge values, gradients against the reference's, and delayed scaling (the amax a given scale's
kernel returns, the state's update rule, a training loop)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (AMAX_FLOOR, E4M3, E5M2, FP8_MAX, assert_bits_equal, assert_fp8_equal, flashrt_targets,
                      normal, np_dequantize, np_quantize, on_cpu, rel_l2, wide)

import flashrt_jax
from flashrt_jax import reference
from flashrt_jax.ffi import quant as raw

FP8 = [pytest.param(E4M3, id="e4m3"), pytest.param(E5M2, id="e5m2")]
X_DTYPES = [pytest.param(jnp.dtype(d), id=n) for d, n in
            ((jnp.float32, "f32"), (jnp.bfloat16, "bf16"), (jnp.float16, "f16"))]
# Rows 1, 51, 867; columns 7 (below one vector, scalar path), 64 and 2048 (vector paths); two 3-D.
SHAPES = [(1, 7), (1, 2048), (51, 64), (51, 7), (867, 2048), (867, 7), (4, 51, 64), (2, 3, 7)]
GRANULARITIES = ["tensor", "row"]


def _case(op, dtype, x_dtype, granularity, shape, platform):
  return f"{op} {jnp.dtype(x_dtype).name}->{jnp.dtype(dtype).name} {granularity} {tuple(shape)} on {platform}"


def _static_scale(rng, x, dtype, granularity):
  """A given scale near the current one (x0.5 .. x2), so that some values saturate."""
  _, s = np_quantize(x, dtype, rowwise=granularity == "row")
  return jnp.asarray((s * rng.uniform(0.5, 2.0, s.shape)).astype(np.float32))


def np_amax(x, rowwise: bool = False):
  """max |x| in float32, of the tensor or per row (..., 1); NaN propagates."""
  return np.max(np.abs(np.asarray(x, np.float32)), axis=-1 if rowwise else None, keepdims=rowwise)


def _state(rng, x, dtype, history_len=4):
  """A delayed-scaling state with a scale near x's current one and a history of past amaxes."""
  scale = _static_scale(rng, x, dtype, "tensor")
  history = rng.uniform(0.5, 2.0, history_len) * float(scale) * FP8_MAX[dtype]
  return flashrt_jax.DelayedScaling(jnp.asarray(history.astype(np.float32)), scale)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("dtype", FP8)
def test_quantize_current_matches_numpy(platform, rng, dtype, x_dtype, granularity, shape):
  case = _case("quantize current", dtype, x_dtype, granularity, shape, platform)
  x = wide(rng, shape, x_dtype)
  q, s = flashrt_jax.quantize(x, dtype=dtype, granularity=granularity)
  q_ref, s_ref = np_quantize(x, dtype, rowwise=granularity == "row")
  assert q.dtype == dtype and q.shape == x.shape, f"{case}: q is {q.dtype} {q.shape}"
  assert s.dtype == jnp.float32 and s.shape == s_ref.shape, f"{case}: scale is {s.dtype} {s.shape}"
  assert_fp8_equal(q, q_ref, f"{case}: q")
  assert_bits_equal(s, s_ref, f"{case}: scale")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("dtype", FP8)
def test_quantize_static_matches_numpy(platform, rng, dtype, x_dtype, granularity, shape):
  case = _case("quantize static", dtype, x_dtype, granularity, shape, platform)
  x = wide(rng, shape, x_dtype)
  scale = _static_scale(rng, x, dtype, granularity)
  q, s = flashrt_jax.quantize(x, dtype=dtype, scale=scale)
  q_ref, _ = np_quantize(x, dtype, scale=scale)
  assert_fp8_equal(q, q_ref, f"{case}: q")
  assert_bits_equal(s, scale, f"{case}: returned scale")
  _, amax = raw.quantize_static(x, scale, dtype)
  assert_bits_equal(amax, np_amax(x, granularity == "row"), f"{case}: amax of the quantize pass")


# Per-row widths that reach each CUDA row kernel: a warp per row (1024), a block per row (4096 and
# the widest register-held 16384), one element per chunk (8191: not whole vectors), and rows wider
# than the registers hold (16400, 8200 unaligned) that are read twice.
ROW_WIDTHS = [1024, 4096, 16384, 8191, 16400, 8200]


@pytest.mark.parametrize("cols", ROW_WIDTHS)
@pytest.mark.parametrize("x_dtype", [pytest.param(jnp.dtype(jnp.bfloat16), id="bf16"),
                                     pytest.param(jnp.dtype(jnp.float32), id="f32")])
def test_quantize_rows_of_every_width_match_numpy(platform, rng, x_dtype, cols):
  case = _case("quantize rows", E4M3, x_dtype, "row", (5, cols), platform)
  x = wide(rng, (5, cols), x_dtype)
  q, s = flashrt_jax.quantize(x, granularity="row")
  q_ref, s_ref = np_quantize(x, E4M3, rowwise=True)
  assert_fp8_equal(q, q_ref, f"{case}: q")
  assert_bits_equal(s, s_ref, f"{case}: scale")
  scale = _static_scale(rng, x, E5M2, "row")
  q, amax = raw.quantize_static(x, scale, E5M2)
  assert_fp8_equal(q, np_quantize(x, E5M2, scale=scale)[0], f"{case}: q with given E5M2 row scales")
  assert_bits_equal(amax, np_amax(x, rowwise=True), f"{case}: amax with given row scales")


@pytest.mark.parametrize("data", ["wide", "normal"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("dtype", FP8)
def test_reference_quantize_matches_numpy(rng, dtype, x_dtype, granularity, data):
  """The spec itself on CPU, eager and jitted: XLA must not reround (f32 -> FP8 through f16) or
  rewrite the divisions (a / const, 1 / (a / b)) behind the reference's back. Normal bf16/f16 data
  meets exact ties: amax / 448 = amax / 7 / 64 is often exact, and x / scale then a midpoint."""
  x = np.asarray((wide if data == "wide" else normal)(rng, (51, 300), x_dtype))
  q_ref, s_ref = np_quantize(x, dtype, rowwise=granularity == "row")
  static = np.asarray(_static_scale(rng, x, dtype, granularity))
  q_static_ref, _ = np_quantize(x, dtype, scale=static)
  fn = lambda x, s: (reference.quantize(x, dtype=dtype, granularity=granularity),
                     reference.quantize(x, dtype=dtype, scale=s))
  for mode, f in (("eager", fn), ("jit", jax.jit(fn))):
    case = _case(f"reference.quantize {mode} {data}", dtype, x_dtype, granularity, x.shape, "cpu")
    (q, s), (q_static, _) = on_cpu(f, x, static)
    assert_fp8_equal(q, q_ref, f"{case}: current q")
    assert_bits_equal(s, s_ref, f"{case}: current scale")
    assert_fp8_equal(q_static, q_static_ref, f"{case}: static q")


# ---------------------------------------------------------------------------------------------
# Edge values


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", FP8)
def test_quantize_all_zero(platform, dtype, granularity):
  case = f"quantize all-zero {dtype.name} {granularity} on {platform}"
  x = jnp.zeros((51, 64), jnp.bfloat16)
  q, s = flashrt_jax.quantize(x, dtype=dtype, granularity=granularity)
  expected = np.float32(AMAX_FLOOR) / np.float32(FP8_MAX[dtype])
  s = np.asarray(s)
  assert np.all(np.isfinite(s)) and np.all(s > 0), f"{case}: scale {s.ravel()[:4]} must be finite and > 0"
  assert np.all(s == expected), f"{case}: scale {s.ravel()[:4]}, expected {expected}"
  assert not np.asarray(q).view(np.uint8).any(), f"{case}: q must be all +0"


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", FP8)
def test_quantize_nan(platform, rng, dtype, granularity):
  case = f"quantize NaN {dtype.name} {granularity} on {platform}"
  x = np.array(normal(rng, (51, 64)))
  x[3, 5] = np.nan
  x = jnp.asarray(x)
  q, s = flashrt_jax.quantize(x, dtype=dtype, granularity=granularity)
  q_ref, s_ref = np_quantize(x, dtype, rowwise=granularity == "row")
  assert np.isnan(np.asarray(q, np.float32)[3, 5]), f"{case}: q at the NaN must be NaN"
  s_nan = np.asarray(s).ravel()[3 if granularity == "row" else 0]
  assert np.isnan(s_nan), f"{case}: current scaling of NaN data must give a NaN scale"
  assert_fp8_equal(q, q_ref, f"{case}: current q")
  assert_bits_equal(s, s_ref, f"{case}: current scale")

  scale = _static_scale(rng, np.nan_to_num(np.asarray(x)), dtype, granularity)
  q, _ = flashrt_jax.quantize(x, dtype=dtype, scale=scale)
  q = np.asarray(q, np.float32)
  assert np.isnan(q[3, 5]) and np.isnan(q).sum() == 1, f"{case}: static q must be NaN at the NaN only"
  assert_fp8_equal(q.astype(dtype), np_quantize(x, dtype, scale=scale)[0], f"{case}: static q")


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["+inf", "-inf"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", FP8)
def test_quantize_inf(platform, rng, dtype, granularity, sign):
  case = f"quantize {sign * np.inf} {dtype.name} {granularity} on {platform}"
  x = np.array(normal(rng, (51, 64)))
  x[3, 5] = sign * np.inf
  x = jnp.asarray(x)
  q, s = flashrt_jax.quantize(x, dtype=dtype, granularity=granularity)
  q_ref, s_ref = np_quantize(x, dtype, rowwise=granularity == "row")
  s_inf = np.asarray(s).ravel()[3 if granularity == "row" else 0]
  assert s_inf == np.inf, f"{case}: current scaling of inf data must give an inf scale, got {s_inf}"
  assert_fp8_equal(q, q_ref, f"{case}: current q")
  assert_bits_equal(s, s_ref, f"{case}: current scale")

  scale = _static_scale(rng, np.where(np.isinf(np.asarray(x)), 0, np.asarray(x)), dtype, granularity)
  q, _ = flashrt_jax.quantize(x, dtype=dtype, scale=scale)
  got = float(np.asarray(q, np.float32)[3, 5])
  want = sign * FP8_MAX[dtype]
  assert got == want, f"{case}: static q at the inf must saturate to {want}, got {got}"
  assert_fp8_equal(q, np_quantize(x, dtype, scale=scale)[0], f"{case}: static q")


@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("dtype", FP8)
def test_quantize_static_saturates(platform, rng, dtype, x_dtype):
  case = f"quantize static saturation {jnp.dtype(x_dtype).name}->{dtype.name} on {platform}"
  x = normal(rng, (51, 300), x_dtype)
  fmax = FP8_MAX[dtype]
  scale = jnp.float32(float(jnp.max(jnp.abs(x.astype(jnp.float32)))) / fmax / 8)
  q, _ = flashrt_jax.quantize(x, dtype=dtype, scale=scale)
  v = np.asarray(x, np.float32) * (np.float32(1) / np.float32(scale))
  over = np.abs(v) >= fmax
  assert over.sum() > 10, f"{case}: the case must saturate some values"
  qf = np.asarray(q, np.float32)
  assert np.array_equal(qf[over], np.sign(v[over]) * fmax), f"{case}: values beyond max must give +-{fmax}"
  assert_fp8_equal(q, np_quantize(x, dtype, scale=scale)[0], f"{case}: q")


# ---------------------------------------------------------------------------------------------
# quantize_transpose and dequantize


@pytest.mark.parametrize("scaling", ["current", "static"])
@pytest.mark.parametrize("k", [7, 64, 200])
@pytest.mark.parametrize("m", [1, 51, 867])
@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("dtype", FP8)
def test_quantize_transpose_matches_numpy(platform, rng, dtype, x_dtype, m, k, scaling):
  case = _case(f"quantize_transpose {scaling}", dtype, x_dtype, "tensor", (m, k), platform)
  x = wide(rng, (m, k), x_dtype)
  scale = _static_scale(rng, x, dtype, "tensor") if scaling == "static" else None
  q, q_t, s = flashrt_jax.quantize_transpose(x, dtype=dtype, scale=scale)
  q_ref, s_ref = np_quantize(x, dtype, scale=scale)
  m_pad = -(-m // 16) * 16
  assert q_t.shape == (k, m_pad) and q_t.dtype == dtype, f"{case}: q_t is {q_t.dtype} {q_t.shape}"
  assert_fp8_equal(q, q_ref, f"{case}: q")
  assert_fp8_equal(np.asarray(q_t)[:, :m], q_ref.T, f"{case}: q_t")
  assert not np.asarray(q_t)[:, m:].view(np.uint8).any(), f"{case}: q_t padding must be zero bytes"
  assert_bits_equal(s, s_ref, f"{case}: scale")


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32, jnp.float16], ids=["bf16", "f32", "f16"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", FP8)
def test_dequantize_matches_numpy(platform, rng, dtype, granularity, out_dtype):
  case = f"dequantize {dtype.name} {granularity} -> {jnp.dtype(out_dtype).name} on {platform}"
  x = normal(rng, (4, 51, 64))
  q, s = np_quantize(x, dtype, rowwise=granularity == "row")
  out = flashrt_jax.dequantize(jnp.asarray(q), jnp.asarray(s), out_dtype)
  assert out.dtype == out_dtype and out.shape == x.shape, f"{case}: got {out.dtype} {out.shape}"
  assert_bits_equal(out, np_dequantize(q, s).astype(jnp.dtype(out_dtype)), f"{case}: values")


# ---------------------------------------------------------------------------------------------
# Gradients: the ops' VJPs are the reference's


def _grads(quantize_fn, x, scale, g, h):
  """Gradients of sum(q * g) + sum(scale * h) with respect to x (and a given scale)."""
  def loss(x, scale):
    q, s = quantize_fn(x, scale)
    return jnp.sum(q.astype(jnp.float32) * g) + jnp.sum(s * h)
  return jax.grad(loss, argnums=(0, 1) if scale is not None else 0)(x, scale)


@pytest.mark.parametrize("scaling", ["current", "static"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", FP8)
def test_quantize_grad_matches_reference(platform, rng, dtype, granularity, scaling):
  case = f"grad quantize {scaling} {dtype.name} {granularity} on {platform}"
  x = normal(rng, (51, 64))
  scale = _static_scale(rng, x, dtype, granularity) if scaling == "static" else None
  g = normal(rng, x.shape, std=1e-3)
  h = normal(rng, (51, 1) if granularity == "row" else ())
  ours = _grads(lambda x, s: flashrt_jax.quantize(x, dtype=dtype, scale=s, granularity=granularity),
                x, scale, g, h)
  ref = _grads(lambda x, s: reference.quantize(x, dtype=dtype, scale=s, granularity=granularity),
               x, scale, g, h)
  for name, a, b in zip(("x", "scale"), jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
    assert float(jnp.linalg.norm(b)) > 0, f"{case}: reference d{name} is zero; the case tests nothing"
    assert rel_l2(a, b) <= 1e-6, f"{case}: d{name} rel L2 {rel_l2(a, b):.2e}"


@pytest.mark.parametrize("scaling", ["current", "static"])
@pytest.mark.parametrize("dtype", FP8)
def test_quantize_transpose_grad_matches_reference(platform, rng, dtype, scaling):
  case = f"grad quantize_transpose {scaling} {dtype.name} on {platform}"
  x = normal(rng, (51, 64))
  scale = _static_scale(rng, x, dtype, "tensor") if scaling == "static" else None
  g, g_t, h = normal(rng, (51, 64), std=1e-3), normal(rng, (64, 64), std=1e-3), normal(rng, ())

  def grads(fn):
    def loss(x, scale):
      q, q_t, s = fn(x, dtype=dtype, scale=scale)
      return jnp.sum(q.astype(jnp.float32) * g) + jnp.sum(q_t.astype(jnp.float32) * g_t) + s * h
    return jax.grad(loss, argnums=(0, 1) if scale is not None else 0)(x, scale)

  ours = grads(flashrt_jax.quantize_transpose)
  ref = grads(reference.quantize_transpose)
  for name, a, b in zip(("x", "scale"), jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
    assert float(jnp.linalg.norm(b)) > 0, f"{case}: reference d{name} is zero; the case tests nothing"
    assert rel_l2(a, b) <= 1e-6, f"{case}: d{name} rel L2 {rel_l2(a, b):.2e}"


# ---------------------------------------------------------------------------------------------
# Delayed scaling


def _assert_states_equal(a, b, what: str):
  assert_bits_equal(a.amax_history, b.amax_history, f"{what}: amax history")
  # The scale divides the history's max by fp8_max, in XLA: not correctly rounded on the GPU.
  np.testing.assert_allclose(np.asarray(a.scale), np.asarray(b.scale), rtol=1e-6, err_msg=f"{what}: scale")


def np_update(history, scale, amax, dtype):
  """The numpy oracle of the update rule: roll the history, the new amax first; the scale from its
  max as current scaling makes it, or the previous one where that max is 0 or not finite."""
  history = np.concatenate([[amax], history[:-1]]).astype(np.float32)
  m = history.max()
  if m > 0 and np.isfinite(m):
    scale = np_quantize(np.array([m], np.float32), dtype)[1]
  return history, np.float32(scale)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("dtype", FP8)
def test_quantize_delayed_matches_reference(platform, rng, dtype, x_dtype, shape):
  """q and scale are static scaling's with state.scale; the next state is the reference's, its amax
  (from the quantize pass) bit for bit."""
  case = _case("quantize delayed", dtype, x_dtype, "tensor", shape, platform)
  x = wide(rng, shape, x_dtype)
  state = _state(rng, x, dtype)
  q, s, new = flashrt_jax.quantize(x, dtype=dtype, scale=state)
  q_static, _ = flashrt_jax.quantize(x, dtype=dtype, scale=state.scale)
  assert_fp8_equal(q, q_static, f"{case}: q vs static scaling")
  assert_bits_equal(s, state.scale, f"{case}: the state's scale must come back")
  assert_bits_equal(new.amax_history[0], np_amax(x), f"{case}: amax")
  _assert_states_equal(new, on_cpu(reference.quantize, x, dtype=dtype, scale=state)[-1], case)
  if len(shape) == 2:
    q, q_t, s, new = flashrt_jax.quantize_transpose(x, dtype=dtype, scale=state)
    assert_fp8_equal(q, q_static, f"{case}: quantize_transpose q vs static scaling")
    assert_fp8_equal(np.asarray(q_t)[:, :shape[0]], np.asarray(q_static).T, f"{case}: quantize_transpose q_t")
    assert_bits_equal(s, state.scale, f"{case}: quantize_transpose scale")
    _assert_states_equal(new, on_cpu(reference.quantize_transpose, x, dtype=dtype, scale=state)[-1],
                         f"{case}: quantize_transpose")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("op", ["quantize", "quantize_transpose"])
def test_quantize_delayed_nan_inf(platform, rng, op, bad):
  """As with current scaling, a NaN gives a NaN amax and an inf an inf one; the scale stays."""
  case = f"{op} delayed with {bad} on {platform}"
  x = np.array(normal(rng, (51, 64)))
  x[3, 5] = bad
  state = _state(rng, np.nan_to_num(x, posinf=0, neginf=0), E4M3)
  *_, new = getattr(flashrt_jax, op)(jnp.asarray(x), scale=state)
  assert_bits_equal(new.amax_history[0], np.float32(abs(bad)), f"{case}: amax")
  assert_bits_equal(new.amax_history[1:], state.amax_history[:-1], f"{case}: history roll")
  assert_bits_equal(new.scale, state.scale, f"{case}: the scale must stay")


@pytest.mark.parametrize("dtype", FP8)
def test_update_delayed_scaling(dtype):
  """The rule on a sequence that rises, falls, holds zeros, NaN and inf, against the numpy oracle."""
  state = flashrt_jax.delayed_scaling(3)
  assert state.amax_history.shape == (3,) and state.amax_history.dtype == jnp.float32, "fresh history"
  assert not np.asarray(state.amax_history).any() and float(state.scale) == 1.0, "fresh state: zeros, scale 1"
  update = jax.jit(lambda st, a: flashrt_jax.update_delayed_scaling(st, a, dtype))
  history, scale = np.zeros(3, np.float32), np.float32(1.0)
  amaxes = [0.0, np.nan, np.inf, 2.0, 8.0, 1.0, 0.5, 0.25, 0.0, 0.0, 0.0, np.nan, 3.0, 3.0, 3.0, np.inf] + [1e-20] * 3
  for i, a in enumerate(amaxes):
    state = on_cpu(update, state, np.float32(a))
    history, scale = np_update(history, scale, np.float32(a), dtype)
    case = f"update_delayed_scaling {dtype.name} step {i} (amax {a})"
    assert_bits_equal(state.amax_history, history, f"{case}: history")
    assert_bits_equal(state.scale, scale, f"{case}: scale")
    if i < 3:
      assert float(state.scale) == 1.0, f"{case}: 0 / NaN / inf in a zero history must keep the scale"
  floor = np.float32(AMAX_FLOOR) / np.float32(FP8_MAX[dtype])
  assert float(state.scale) == floor, "once the inf left the history, a tiny amax gives current scaling's floor"


def test_delayed_scaling_in_scan(platform, rng):
  """A training loop's carry: each step quantizes with the scale of the amaxes of the steps before it,
  so a jump in magnitude saturates once, and the scale stays up until the jump leaves the history."""
  stds = [1.0, 1.0, 16.0, 16.0, 0.25, 0.25, 0.25, 0.25]
  xs = jnp.stack([normal(rng, (51, 64), jnp.bfloat16, std=std) for std in stds])

  def step(state, x):
    q, s, state = flashrt_jax.quantize(x, scale=state)
    return state, (q, s)

  final, (qs, scales) = jax.jit(lambda st, xs: jax.lax.scan(step, st, xs))(flashrt_jax.delayed_scaling(3), xs)
  history, scale = np.zeros(3, np.float32), np.float32(1.0)
  for i, x in enumerate(xs):
    case = f"scan step {i} (std {stds[i]}) on {platform}"
    np.testing.assert_allclose(np.asarray(scales[i]), scale, rtol=1e-6, err_msg=f"{case}: scale")
    assert_fp8_equal(qs[i], np_quantize(x, E4M3, scale=scales[i])[0], f"{case}: q")
    history, scale = np_update(history, scale, np_amax(x), E4M3)
  assert_bits_equal(final.amax_history, history, f"scan on {platform}: final history")
  s = np.asarray(scales)
  assert np.all(s[3:7] > 8 * s[2]) and s[7] < s[6] / 8, \
      f"scan on {platform}: the scale must rise one step after the jump and fall once it leaves the history: {s}"


@pytest.mark.parametrize("op", ["quantize", "quantize_transpose"])
def test_quantize_delayed_grad(platform, rng, op):
  """Under jit and grad: the state takes zero gradient, x the gradient of static scaling."""
  case = f"grad {op} delayed on {platform}"
  x = normal(rng, (51, 64))
  state = _state(rng, x, E4M3)
  g, h = normal(rng, (51, 64), std=1e-3), normal(rng, ())

  n = 3 if op == "quantize_transpose" else 2  # (q[, q_t], scale) come before the state

  def loss(x, scale):
    out = getattr(flashrt_jax, op)(x, scale=scale)
    return jnp.sum(out[0].astype(jnp.float32) * g) + out[n - 1] * h

  dx, dstate = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, state)
  dx_static = jax.jit(jax.grad(loss))(x, state.scale)
  assert float(jnp.linalg.norm(dx_static)) > 0, f"{case}: static dx is zero; the case tests nothing"
  assert_bits_equal(dx, dx_static, f"{case}: dx")
  for name, d in zip(("amax_history", "scale"), dstate):
    assert not np.asarray(d).any(), f"{case}: d{name} must be zero"
  want = {f"flashrt_{op}_static"}
  assert flashrt_targets(loss, x, state) == want, f"{case}: the compiled HLO must run {want} alone"


# ---------------------------------------------------------------------------------------------
# GPU: large shapes


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 2048), (4095, 2047), (2048, 16), (8, 64, 2048)], ids=str)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("dtype", FP8)
def test_quantize_large_gpu(rng, dtype, x_dtype, granularity, shape):
  case = _case("quantize current (GPU, large)", dtype, x_dtype, granularity, shape, "gpu")
  with jax.default_device(jax.devices("gpu")[0]):
    x = wide(rng, shape, x_dtype)
    q, s = flashrt_jax.quantize(x, dtype=dtype, granularity=granularity)
    q_ref, s_ref = np_quantize(x, dtype, rowwise=granularity == "row")
    assert_fp8_equal(q, q_ref, f"{case}: q")
    assert_bits_equal(s, s_ref, f"{case}: scale")
    if len(shape) == 2:
      q, q_t, s = flashrt_jax.quantize_transpose(x, dtype=dtype)
      q_ref, _ = np_quantize(x, dtype)
      assert_fp8_equal(q, q_ref, f"{case}: quantize_transpose q")
      assert_fp8_equal(np.asarray(q_t)[:, :shape[0]], q_ref.T, f"{case}: quantize_transpose q_t")
      assert not np.asarray(q_t)[:, shape[0]:].view(np.uint8).any(), f"{case}: q_t padding must be zero"
