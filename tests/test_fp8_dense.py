"""fp8_dense: forward against reference.fp8_dense / fp8_dense_frozen, the custom VJP against an
FP8-emulating reference backward (tight) and against full-precision jax.grad (loose, reported),
frozen weights, the min_rows routing and the fallback for K or N not multiples of 16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import E5M2, flashrt_targets, normal, on_cpu, rel_l2

import flashrt_jax
from flashrt_jax import Fp8Recipe, Fp8Weight, reference

F32, BF16, F16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)
X_DTYPES = [pytest.param(BF16, id="bf16"), pytest.param(F32, id="f32"), pytest.param(F16, id="f16")]
KN = pytest.mark.parametrize("k,n", [(64, 32), (256, 128)], ids=["k64n32", "k256n128"])
MS = pytest.mark.parametrize("m", [1, 51, 867])
FP8_PATH = Fp8Recipe(min_rows=0)
TOL = 1e-2          # against the FP8-emulating reference
TOL_FULL = 0.1      # against full precision: E4M3 operands and an E5M2 gradient


def _np(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def _deq(q, s):
  return _np(q) * _np(s)


def _full_precision(x, kernel, bias):
  y = jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return y if bias is None else y + bias.astype(jnp.float32)


def _grads(fn, x, kernel, bias, g):
  """Gradients of sum(fn(x, kernel, bias) * g) for x, kernel and bias."""
  loss = lambda x, kernel, bias: jnp.sum(fn(x, kernel, bias).astype(jnp.float32) * g)
  return jax.grad(loss, argnums=(0, 1, 2))(x, kernel, bias)


def _emulated_trainable_grads(x, kernel, dy, backward):
  """The FP8 backward written out: dy to E5M2 per tensor (current scaling), dx = deq(dyq) @ deq(wq)^T,
  dW = deq(xq)^T @ deq(dyq); backward="bf16" uses BF16 dy and BF16 dequantized residuals."""
  xq, sx = reference.quantize(x)
  wq, sw = reference.quantize(kernel)
  if backward == "fp8":
    g = _deq(*reference.quantize(dy, dtype=E5M2))
    x_res, w_res = _deq(xq, sx), _deq(wq, sw)
  else:
    g = _np(dy.astype(BF16))
    x_res = _np(reference.dequantize(xq, sx, BF16))
    w_res = _np(reference.dequantize(wq, sw, BF16))
  return g @ w_res.T, x_res.T @ g


def _emulated_frozen_dx(w, dy, backward):
  """dx for a frozen (N, K) weight: dy quantized to E5M2 per row; per-channel scales are folded into
  dy before that quantization."""
  scale = np.asarray(w.scale)
  if backward == "bf16":
    return _np(dy.astype(BF16)) @ _np(reference.dequantize(w.data, w.scale[:, None] if scale.ndim else w.scale, BF16))
  if scale.ndim:
    gq, sg = reference.quantize(dy.astype(jnp.float32) * w.scale, dtype=E5M2, granularity="row")
    return _deq(gq, sg) @ _np(w.data)
  gq, sg = reference.quantize(dy, dtype=E5M2, granularity="row")
  return _deq(gq, sg) @ (_np(w.data) * scale)


# ---------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("x_dtype", X_DTYPES)
@KN
@MS
def test_fp8_dense_trainable_forward(platform, rng, record_property, m, k, n, x_dtype, use_bias):
  case = f"fp8_dense trainable m={m} k={k} n={n} x={x_dtype.name} bias={use_bias} on {platform}"
  x, kernel = normal(rng, (m, k), x_dtype), normal(rng, (k, n), std=k ** -0.5)
  bias = normal(rng, (n,)) if use_bias else None
  y = flashrt_jax.fp8_dense(x, kernel, bias, recipe=FP8_PATH)
  assert y.dtype == x_dtype and y.shape == (m, n), f"{case}: got {y.dtype} {y.shape}"
  err = rel_l2(y, on_cpu(reference.fp8_dense, x, kernel, bias))
  assert err <= TOL, f"{case}: rel L2 vs reference.fp8_dense {err:.2e}"
  err_full = rel_l2(y, _full_precision(x, kernel, bias))
  record_property("rel_l2_vs_full_precision", err_full)
  assert err_full <= TOL_FULL, f"{case}: rel L2 vs full precision {err_full:.2e}"


@pytest.mark.parametrize("act_granularity", ["tensor", "row"])
@pytest.mark.parametrize("w_granularity", ["tensor", "channel"])
@KN
@MS
def test_fp8_dense_frozen_forward(platform, rng, record_property, m, k, n, w_granularity, act_granularity):
  case = f"fp8_dense frozen m={m} k={k} n={n} weight={w_granularity} act={act_granularity} on {platform}"
  x, kernel, bias = normal(rng, (m, k), BF16), normal(rng, (k, n), std=k ** -0.5), normal(rng, (n,))
  w = Fp8Weight.from_kernel(kernel, w_granularity)
  assert w.shape == (k, n) and w.data.shape == (n, k), f"{case}: Fp8Weight shape {w.shape}, data {w.data.shape}"
  assert w.scale.shape == ((n,) if w_granularity == "channel" else ()), f"{case}: scale {w.scale.shape}"
  y = flashrt_jax.fp8_dense(x, w, bias, recipe=Fp8Recipe(granularity=act_granularity, min_rows=0))
  ref = on_cpu(reference.fp8_dense_frozen, x, w.data, w.scale, bias, granularity=act_granularity)
  assert y.dtype == BF16 and y.shape == (m, n), f"{case}: got {y.dtype} {y.shape}"
  assert rel_l2(y, ref) <= TOL, f"{case}: rel L2 vs reference.fp8_dense_frozen {rel_l2(y, ref):.2e}"
  err_full = rel_l2(y, _full_precision(x, kernel, bias))
  record_property("rel_l2_vs_full_precision", err_full)
  assert err_full <= TOL_FULL, f"{case}: rel L2 vs full precision {err_full:.2e}"


def test_fp8_weight_dequantize(platform, rng):
  case = f"Fp8Weight.dequantize on {platform}"
  kernel = normal(rng, (64, 48))
  for granularity in ("tensor", "channel"):
    w = Fp8Weight.from_kernel(kernel, granularity)
    back = w.dequantize()
    assert back.shape == (64, 48) and back.dtype == F32, f"{case} {granularity}: {back.dtype} {back.shape}"
    assert rel_l2(back, kernel) <= 0.05, f"{case} {granularity}: rel L2 {rel_l2(back, kernel):.2e}"


def test_fp8_dense_3d(platform, rng):
  case = f"fp8_dense 3-D x (2, 35, 64) on {platform}"
  x, kernel, bias = normal(rng, (2, 35, 64), BF16), normal(rng, (64, 32), std=0.125), normal(rng, (32,))
  y = flashrt_jax.fp8_dense(x, kernel, bias, recipe=FP8_PATH)
  assert y.shape == (2, 35, 32), f"{case}: shape {y.shape}"
  ref = on_cpu(reference.fp8_dense, x.reshape(70, 64), kernel, bias).reshape(2, 35, 32)
  assert rel_l2(y, ref) <= TOL, f"{case}: rel L2 {rel_l2(y, ref):.2e}"
  dx = jax.grad(lambda x: jnp.sum(flashrt_jax.fp8_dense(x, kernel, bias, recipe=FP8_PATH).astype(F32)))(x)
  full = jax.grad(lambda x: jnp.sum(_full_precision(x, kernel, bias)))(x)
  assert dx.shape == x.shape and rel_l2(dx, full) <= TOL_FULL, f"{case}: dx rel L2 {rel_l2(dx, full):.2e}"


# ---------------------------------------------------------------------------------------------
# Backward


@pytest.mark.parametrize("backward", ["fp8", "bf16"])
@pytest.mark.parametrize("x_dtype", X_DTYPES[:2])
@MS
def test_fp8_dense_trainable_grads(platform, rng, record_property, m, x_dtype, backward):
  k, n = 128, 64
  case = f"grad fp8_dense trainable m={m} x={x_dtype.name} backward={backward} on {platform}"
  x, kernel, bias = normal(rng, (m, k), x_dtype), normal(rng, (k, n), std=k ** -0.5), normal(rng, (n,))
  g = normal(rng, (m, n))
  recipe = Fp8Recipe(backward=backward, min_rows=0)
  dx, dw, db = _grads(lambda x, w, b: flashrt_jax.fp8_dense(x, w, b, recipe=recipe), x, kernel, bias, g)
  assert dx.dtype == x_dtype and dw.dtype == F32 and db.dtype == F32, f"{case}: {dx.dtype} {dw.dtype} {db.dtype}"
  dy = g.astype(x_dtype)
  dx_ref, dw_ref = on_cpu(_emulated_trainable_grads, x, kernel, dy, backward)
  assert rel_l2(dx, dx_ref) <= TOL, f"{case}: dx rel L2 vs emulated FP8 backward {rel_l2(dx, dx_ref):.2e}"
  assert rel_l2(dw, dw_ref) <= TOL, f"{case}: dW rel L2 vs emulated FP8 backward {rel_l2(dw, dw_ref):.2e}"
  db_ref = _np(dy).sum(0)
  assert rel_l2(db, db_ref) <= 1e-6, f"{case}: db rel L2 vs dy summed {rel_l2(db, db_ref):.2e}"

  full = _grads(_full_precision, x, kernel, bias, g)
  for name, ours, ref in (("dx", dx, full[0]), ("dW", dw, full[1])):
    err = rel_l2(ours, ref)
    record_property(f"{name}_rel_l2_vs_full_precision", err)
    assert err <= TOL_FULL, f"{case}: {name} rel L2 vs full-precision jax.grad {err:.2e}"


@pytest.mark.parametrize("kernel_dtype", [BF16, F16], ids=["bf16", "f16"])
@pytest.mark.parametrize("x_dtype", X_DTYPES)
def test_fp8_dense_trainable_dtypes(platform, rng, x_dtype, kernel_dtype):
  """Gradients come back in the dtypes of x and of the kernel, whatever those are."""
  case = f"grad fp8_dense x={x_dtype.name} kernel={kernel_dtype.name} on {platform}"
  x, kernel = normal(rng, (300, 64), x_dtype), normal(rng, (64, 32), kernel_dtype, std=0.125)
  bias, g = normal(rng, (32,), BF16), normal(rng, (300, 32))
  dense = lambda x, w, b: flashrt_jax.fp8_dense(x, w, b, recipe=FP8_PATH)
  y = dense(x, kernel, bias)
  assert y.dtype == x_dtype, f"{case}: y dtype {y.dtype}"
  assert rel_l2(y, on_cpu(reference.fp8_dense, x, kernel, bias)) <= TOL, f"{case}: forward rel L2"
  grads = _grads(dense, x, kernel, bias, g)
  full = _grads(_full_precision, x, kernel, bias, g)
  for name, ours, ref, dtype in zip(("dx", "dW", "db"), grads, full, (x_dtype, kernel_dtype, BF16)):
    assert ours.dtype == dtype, f"{case}: {name} dtype {ours.dtype}, want {dtype}"
    assert rel_l2(ours, ref) <= TOL_FULL, f"{case}: {name} rel L2 vs full precision {rel_l2(ours, ref):.2e}"


@pytest.mark.parametrize("backward", ["fp8", "bf16"])
@pytest.mark.parametrize("w_granularity", ["tensor", "channel"])
@MS
def test_fp8_dense_frozen_grads(platform, rng, record_property, m, w_granularity, backward):
  k, n = 128, 64
  case = f"grad fp8_dense frozen m={m} weight={w_granularity} backward={backward} on {platform}"
  x, kernel, bias = normal(rng, (m, k), BF16), normal(rng, (k, n), std=k ** -0.5), normal(rng, (n,))
  # Channels of very different magnitudes make the per-channel scales matter.
  kernel = kernel * jnp.exp(jnp.linspace(-2.0, 2.0, n))
  w = Fp8Weight.from_kernel(kernel, w_granularity)
  g = normal(rng, (m, n))
  recipe = Fp8Recipe(backward=backward, min_rows=0)
  dx, dw, db = _grads(lambda x, w, b: flashrt_jax.fp8_dense(x, w, b, recipe=recipe), x, w, bias, g)
  dy = g.astype(BF16)
  dx_ref = on_cpu(_emulated_frozen_dx, w, dy, backward)
  assert dx.dtype == BF16, f"{case}: dx dtype {dx.dtype}"
  assert rel_l2(dx, dx_ref) <= TOL, f"{case}: dx rel L2 vs emulated backward {rel_l2(dx, dx_ref):.2e}"
  for leaf in jax.tree_util.tree_leaves(dw):
    assert not np.asarray(leaf, np.float32).any(), f"{case}: the frozen weight's gradient must be zero"
  assert rel_l2(db, _np(dy).sum(0)) <= 1e-6, f"{case}: db must be dy summed, rel L2 {rel_l2(db, _np(dy).sum(0)):.2e}"
  full = jax.grad(lambda x: jnp.sum(_full_precision(x, w.dequantize(), bias) * g))(x)
  err = rel_l2(dx, full)
  record_property("dx_rel_l2_vs_full_precision", err)
  assert err <= TOL_FULL, f"{case}: dx rel L2 vs full-precision jax.grad {err:.2e}"


# ---------------------------------------------------------------------------------------------
# Routing: small M and unaligned K or N take XLA's dot


MIN_ROWS = 256


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("m", [51, MIN_ROWS - 1, MIN_ROWS, 867])
def test_fp8_dense_min_rows_routing(platform, rng, m, frozen):
  case = f"fp8_dense routing m={m} (min_rows={MIN_ROWS}) frozen={frozen} on {platform}"
  x, kernel = normal(rng, (m, 64), BF16), normal(rng, (64, 32), std=0.125)
  w = Fp8Weight.from_kernel(kernel) if frozen else kernel
  fwd = lambda x, w: flashrt_jax.fp8_dense(x, w, recipe=Fp8Recipe(min_rows=MIN_ROWS))
  bwd = jax.grad(lambda x, w: jnp.sum(fwd(x, w).astype(F32)))
  fp8 = m >= MIN_ROWS
  for name, f in (("forward", fwd), ("grad", bwd)):
    targets = flashrt_targets(f, x, w, compiled=False)
    if fp8:
      assert "flashrt_fp8_gemm" in targets, f"{case}: {name} must call the FP8 GEMM, HLO has {targets}"
    else:
      assert not targets, f"{case}: {name} must stay in XLA, HLO has {targets}"
  y = fwd(x, w)
  if frozen:  # the default recipe scales a frozen layer's activations per token
    ref = on_cpu(reference.fp8_dense_frozen, x, w.data, w.scale, granularity="row")
  else:
    ref = on_cpu(reference.fp8_dense, x, kernel)
  if not fp8:
    ref = _full_precision(x, w.dequantize() if frozen else kernel, None)
  assert y.dtype == BF16 and rel_l2(y, ref) <= TOL, f"{case}: rel L2 {rel_l2(y, ref):.2e}"


# (M, K, N) -> (FP8 for a frozen weight, FP8 for a trainable one) under the default recipe: shapes
# where the H100 run in benchmarks/results/h100/gemm.md decided clearly (a frozen layer's FP8 path
# against its XLA route, which dequantizes the weight; a trainable one's against XLA's BF16 dot).
MEASURED_ROUTES = {
    (200, 4096, 1024): (False, False),
    (1600, 1024, 4096): (True, False),
    (968, 2048, 2048): (True, False),
    (3872, 2048, 2048): (True, False),
    (30976, 2048, 512): (False, False),
    (968, 2048, 16384): (True, False),
    (3872, 16384, 2048): (True, False),
    (3872, 2048, 16384): (True, True),
    (30976, 2048, 2048): (True, True),
    (30976, 16384, 2048): (True, True),
}


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("shape", list(MEASURED_ROUTES), ids=lambda s: "x".join(map(str, s)))
def test_fp8_dense_default_routing(shape, frozen):
  m, k, n = shape
  want = MEASURED_ROUTES[shape][0 if frozen else 1]
  assert flashrt_jax.takes_fp8_path(m, k, n, frozen) == want, f"takes_fp8_path{shape} frozen={frozen}"
  x = jax.ShapeDtypeStruct((m, k), BF16)  # lowered only: nothing this large runs on CPU
  if frozen:
    w = Fp8Weight(jax.ShapeDtypeStruct((n, k), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((), F32))
  else:
    w = jax.ShapeDtypeStruct((k, n), F32)
  hlo = jax.jit(flashrt_jax.fp8_dense).lower(x, w).as_text()
  assert ("flashrt_fp8_gemm" in hlo) == want, f"fp8_dense{shape} frozen={frozen}: FP8 path expected {want}"


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("k,n", [(72, 64), (64, 40), (7, 5)], ids=["k72n64", "k64n40", "k7n5"])
def test_fp8_dense_unaligned_falls_back(platform, rng, k, n, frozen):
  case = f"fp8_dense unaligned k={k} n={n} frozen={frozen} on {platform}"
  x, kernel, bias = normal(rng, (300, k), BF16), normal(rng, (k, n), std=k ** -0.5), normal(rng, (n,))
  w = Fp8Weight.from_kernel(kernel) if frozen else kernel
  dense = lambda x, w, b: flashrt_jax.fp8_dense(x, w, b, recipe=FP8_PATH)
  assert not flashrt_targets(dense, x, w, bias, compiled=False), f"{case}: must not call flashrt"
  kernel_used = w.dequantize() if frozen else kernel
  y = dense(x, w, bias)
  assert y.dtype == BF16 and y.shape == (300, n), f"{case}: got {y.dtype} {y.shape}"
  assert rel_l2(y, _full_precision(x, kernel_used, bias)) <= TOL, f"{case}: forward rel L2"
  g = normal(rng, (300, n))
  dx, dw, db = _grads(dense, x, w, bias, g)
  dx_ref, dw_ref, db_ref = _grads(_full_precision, x, kernel_used, bias, g)
  assert rel_l2(dx, dx_ref) <= TOL, f"{case}: dx rel L2 {rel_l2(dx, dx_ref):.2e}"
  assert rel_l2(db, db_ref) <= TOL, f"{case}: db rel L2 {rel_l2(db, db_ref):.2e}"
  if frozen:
    assert not any(np.asarray(l, np.float32).any() for l in jax.tree_util.tree_leaves(dw)), f"{case}: dW must be 0"
  else:
    assert rel_l2(dw, dw_ref) <= TOL, f"{case}: dW rel L2 {rel_l2(dw, dw_ref):.2e}"


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("lead,k,n", [((5,), 64, 48), ((51,), 256, 128), ((300,), 64, 32), ((2, 3), 64, 48)], ids=str)
def test_frozen_xla_route_both_forms(platform, rng, lead, k, n, granularity):
  """A frozen weight routed to XLA: the form that converts the FP8 data inside the dot (few rows)
  and the dequantized copy (many rows) give the dequantized weight's product, bias and dx."""
  case = f"frozen XLA route lead={lead} k={k} n={n} {granularity} on {platform}"
  x, bias = normal(rng, lead + (k,), BF16), normal(rng, (n,))
  w = Fp8Weight.from_kernel(normal(rng, (k, n), std=k ** -0.5), granularity)
  rows = int(np.prod(lead))
  converts = flashrt_jax.ops.gemm.frozen_xla_converts(rows, k)
  assert converts == (3 * rows < 2 * k), case
  xla_only = Fp8Recipe(min_rows=1 << 62)
  dense = lambda x, w, b: flashrt_jax.fp8_dense(x, w, b, recipe=xla_only)
  assert not flashrt_targets(dense, x, w, bias, compiled=False), f"{case}: must not call flashrt"
  kernel = w.dequantize()
  y = jax.jit(dense)(x, w, bias)
  assert y.dtype == BF16 and y.shape == lead + (n,), f"{case}: got {y.dtype} {y.shape}"
  assert rel_l2(y, _full_precision(x, kernel, bias)) <= TOL, f"{case}: forward rel L2"
  g = normal(rng, lead + (n,))
  dx, _, db = _grads(dense, x, w, bias, g)
  dx_ref, _, db_ref = _grads(_full_precision, x, kernel, bias, g)
  assert dx.dtype == BF16 and rel_l2(dx, dx_ref) <= TOL, f"{case}: dx rel L2 {rel_l2(dx, dx_ref):.2e}"
  assert rel_l2(db, db_ref) <= TOL, f"{case}: db rel L2 {rel_l2(db, db_ref):.2e}"


def test_trainable_xla_route_is_xlas_own_dot():
  """Routed to XLA, a trainable BF16 layer lowers to exactly the program of jnp.dot: at those shapes
  its benchmark times differ from XLA BF16's by noise alone."""
  x, w = jax.ShapeDtypeStruct((200, 1024), BF16), jax.ShapeDtypeStruct((1024, 4096), BF16)
  assert not flashrt_jax.takes_fp8_path(200, 1024, 4096, frozen=False)
  ours = jax.jit(lambda x, w: flashrt_jax.fp8_dense(x, w)).lower(x, w).as_text()
  assert ours == jax.jit(lambda x, w: jnp.dot(x, w)).lower(x, w).as_text()


# ---------------------------------------------------------------------------------------------
# GPU: large shapes


@pytest.mark.gpu
@pytest.mark.parametrize("backward", ["fp8", "bf16"])
@pytest.mark.parametrize("m,k,n", [(4096, 2048, 2048), (4095, 1024, 2048), (1600, 1024, 4096)], ids=str)
def test_fp8_dense_large_gpu(rng, record_property, m, k, n, backward):
  case = f"fp8_dense (GPU, large) m={m} k={k} n={n} backward={backward}"
  with jax.default_device(jax.devices("gpu")[0]):
    x, kernel, bias = normal(rng, (m, k), BF16), normal(rng, (k, n), std=k ** -0.5), normal(rng, (n,))
    g = normal(rng, (m, n))
    recipe = Fp8Recipe(backward=backward, min_rows=0)
    dense = jax.jit(lambda x, w, b: flashrt_jax.fp8_dense(x, w, b, recipe=recipe))
    y = dense(x, kernel, bias)
    assert rel_l2(y, on_cpu(reference.fp8_dense, x, kernel, bias)) <= TOL, f"{case}: forward rel L2"
    dx, dw, _ = jax.jit(lambda *a: _grads(dense, *a, g))(x, kernel, bias)
    dx_ref, dw_ref = on_cpu(_emulated_trainable_grads, x, kernel, g.astype(BF16), backward)
    assert rel_l2(dx, dx_ref) <= TOL, f"{case}: dx rel L2 vs emulated {rel_l2(dx, dx_ref):.2e}"
    assert rel_l2(dw, dw_ref) <= TOL, f"{case}: dW rel L2 vs emulated {rel_l2(dw, dw_ref):.2e}"
    w = Fp8Weight.from_kernel(kernel, "channel")
    y = jax.jit(lambda x, w, b: flashrt_jax.fp8_dense(x, w, b, recipe=Fp8Recipe(granularity="row", min_rows=0)))(
        x, w, bias)
    ref = on_cpu(reference.fp8_dense_frozen, x, w.data, w.scale, bias, granularity="row")
    assert rel_l2(y, ref) <= TOL, f"{case}: frozen forward rel L2 {rel_l2(y, ref):.2e}"
