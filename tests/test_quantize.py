"""quantize, quantize_transpose and dequantize: bit for bit against the numpy oracle (ml_dtypes
casts), edge values, and gradients against the reference's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (AMAX_FLOOR, E4M3, E5M2, FP8_MAX, assert_bits_equal, assert_fp8_equal, normal,
                      np_dequantize, np_quantize, on_cpu, rel_l2, wide)

import flashrt_jax
from flashrt_jax import reference

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
  q, _ = flashrt_jax.quantize(x, dtype=E5M2, scale=scale)
  assert_fp8_equal(q, np_quantize(x, E5M2, scale=scale)[0], f"{case}: q with given E5M2 row scales")


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
