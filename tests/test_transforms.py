"""The ops under JAX transformations: jit, grad, vmap, lax.scan, jax.checkpoint and donation; the
compiled HLO holds the flashrt custom calls; on GPU a jitted train step runs in a CUDA graph."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import E4M3, E5M2, assert_bits_equal, assert_fp8_equal, flashrt_targets, normal, rel_l2

import flashrt_jax
from flashrt_jax import Fp8Recipe, Fp8Weight

F32, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
FP8_PATH = Fp8Recipe(min_rows=0)


def _assert_trees_equal(a, b, what, float_tol=0.0):
  """FP8 leaves bit for bit; other leaves bit for bit too, or within float_tol (rel L2)."""
  for i, (x, y) in enumerate(zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))):
    if jnp.dtype(x.dtype) in (E4M3, E5M2):
      assert_fp8_equal(x, y, f"{what} (leaf {i})")
    elif float_tol:
      assert x.dtype == y.dtype and rel_l2(x, y) <= float_tol, f"{what} (leaf {i}): rel L2 {rel_l2(x, y):.2e}"
    else:
      assert_bits_equal(x, y, f"{what} (leaf {i})")


def _train_loss(x, w, b, recipe=FP8_PATH):
  return jnp.mean(jnp.square(flashrt_jax.fp8_dense(x, w, b, recipe=recipe).astype(F32)))


def _ops(rng):
  """(name, function, args) for every public op."""
  x = normal(rng, (51, 64), BF16)
  w, b = normal(rng, (64, 32), std=0.125), normal(rng, (32,))
  aq, sa = flashrt_jax.quantize(normal(rng, (51, 64)))
  bq, sb = flashrt_jax.quantize(normal(rng, (32, 64)), granularity="row")
  return [
      ("quantize tensor", lambda x: flashrt_jax.quantize(x), (x,)),
      ("quantize row e5m2", lambda x: flashrt_jax.quantize(x, dtype=E5M2, granularity="row"), (x,)),
      ("quantize static", lambda x, s: flashrt_jax.quantize(x, scale=s), (x, jnp.float32(0.01))),
      ("quantize_transpose", lambda x: flashrt_jax.quantize_transpose(x), (x,)),
      ("dequantize", lambda q, s: flashrt_jax.dequantize(q, s), (aq, sa)),
      ("fp8_gemm", lambda a, sa, b, sb: flashrt_jax.fp8_gemm(a, sa, b, sb), (aq, sa, bq, sb.reshape(-1))),
      ("fp8_dense", lambda x, w, b: flashrt_jax.fp8_dense(x, w, b, recipe=FP8_PATH), (x, w, b)),
      ("fp8_dense frozen", lambda x, w, b: flashrt_jax.fp8_dense(x, w, b, recipe=FP8_PATH),
       (x, Fp8Weight.from_kernel(w, "channel"), b)),
  ]


def test_jit_matches_eager(platform, rng):
  for name, fn, args in _ops(rng):
    _assert_trees_equal(jax.jit(fn)(*args), fn(*args), f"jit vs eager: {name} on {platform}")


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_jit_grad_matches_eager_grad(platform, rng, frozen):
  case = f"jit(grad(fp8_dense)) vs grad, frozen={frozen}, on {platform}"
  x, w, b = normal(rng, (300, 64), BF16), normal(rng, (64, 32), std=0.125), normal(rng, (32,))
  w = Fp8Weight.from_kernel(w) if frozen else w
  grad = jax.grad(_train_loss, argnums=(0, 1, 2))
  # XLA:GPU fuses and orders the float reductions (bias gradient, loss) differently inside one jitted
  # program than op by op: seen on the H100, 1.5e-4.
  _assert_trees_equal(jax.jit(grad)(x, w, b), grad(x, w, b), case, float_tol=1e-5 if platform == "cpu" else 1e-3)


# ---------------------------------------------------------------------------------------------
# vmap


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_vmap_quantize_row_is_row_quantize(platform, rng, dtype):
  """Rows are independent: vmapped row-wise quantization equals row-wise quantization of the batch."""
  case = f"vmap quantize row {dtype.name} on {platform}"
  x = normal(rng, (3, 51, 64), BF16)
  q, s = jax.vmap(lambda x: flashrt_jax.quantize(x, dtype=dtype, granularity="row"))(x)
  q_all, s_all = flashrt_jax.quantize(x, dtype=dtype, granularity="row")
  assert s.shape == (3, 51, 1), f"{case}: scale shape {s.shape}"
  assert_fp8_equal(q, q_all, f"{case}: q")
  assert_bits_equal(s, s_all, f"{case}: scale")


@pytest.mark.parametrize("scaling", ["current", "static", "static shared"])
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_vmap_quantize_tensor_is_per_example(platform, rng, dtype, scaling):
  """Per-tensor scaling under vmap is per example: one scale per batch element."""
  case = f"vmap quantize tensor {scaling} {dtype.name} on {platform}"
  x = normal(rng, (3, 51, 64)) * jnp.array([1e-2, 1.0, 1e2])[:, None, None]
  if scaling == "current":
    fn, args, axes = (lambda x: flashrt_jax.quantize(x, dtype=dtype)), (x,), (0,)
  elif scaling == "static":
    scales = jnp.array([1e-4, 1e-2, 1.0], jnp.float32)
    fn, args, axes = (lambda x, s: flashrt_jax.quantize(x, dtype=dtype, scale=s)), (x, scales), (0, 0)
  else:
    fn, args, axes = (lambda x, s: flashrt_jax.quantize(x, dtype=dtype, scale=s)), (x, jnp.float32(0.01)), (0, None)
  q, s = jax.vmap(fn, in_axes=axes)(*args)
  assert q.shape == x.shape and s.shape == (3,), f"{case}: q {q.shape}, scale {s.shape}"
  for i in range(3):
    qi, si = fn(*(a[i] if ax == 0 else a for a, ax in zip(args, axes)))
    assert_fp8_equal(q[i], qi, f"{case}: q of example {i}")
    assert_bits_equal(s[i], si, f"{case}: scale of example {i}")


def test_vmap_quantize_transpose_is_per_example(platform, rng):
  case = f"vmap quantize_transpose on {platform}"
  x = normal(rng, (2, 51, 64), BF16) * jnp.array([1e-2, 1e2], BF16)[:, None, None]
  q, q_t, s = jax.vmap(flashrt_jax.quantize_transpose)(x)
  assert q_t.shape == (2, 64, 64) and s.shape == (2,), f"{case}: q_t {q_t.shape}, scale {s.shape}"
  for i in range(2):
    _assert_trees_equal((q[i], q_t[i], s[i]), flashrt_jax.quantize_transpose(x[i]), f"{case}: example {i}")


def test_vmap_fp8_gemm_and_dense(platform, rng):
  case = f"vmap fp8_gemm / fp8_dense on {platform}"
  x = normal(rng, (3, 51, 64), BF16)
  a, sa = jax.vmap(flashrt_jax.quantize)(x)
  b, sb = flashrt_jax.quantize(normal(rng, (32, 64)))
  out = jax.vmap(flashrt_jax.fp8_gemm, in_axes=(0, 0, None, None))(a, sa, b, sb)
  for i in range(3):
    assert_bits_equal(out[i], flashrt_jax.fp8_gemm(a[i], sa[i], b, sb), f"{case}: fp8_gemm example {i}")

  w, bias = normal(rng, (64, 32), std=0.125), normal(rng, (32,))
  dense = lambda x: flashrt_jax.fp8_dense(x, w, bias, recipe=FP8_PATH)
  y = jax.vmap(dense)(x)
  for i in range(3):
    assert_bits_equal(y[i], dense(x[i]), f"{case}: fp8_dense example {i}")
  per_example = jax.grad(lambda w, x: jnp.sum(flashrt_jax.fp8_dense(x, w, recipe=FP8_PATH).astype(F32)))
  dw = jax.vmap(per_example, in_axes=(None, 0))(w, x)
  for i in range(3):
    assert rel_l2(dw[i], per_example(w, x[i])) <= 1e-6, f"{case}: per-example dW {i}"


# ---------------------------------------------------------------------------------------------
# scan, checkpoint, donation


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_scan_over_layers_matches_loop(platform, rng, frozen):
  case = f"lax.scan of fp8_dense over 4 layers, frozen={frozen}, on {platform}"
  layers, m, d = 4, 300, 64
  x = normal(rng, (m, d), BF16)
  kernels, biases = normal(rng, (layers, d, d), std=d ** -0.5), normal(rng, (layers, d), std=0.1)
  if frozen:
    kernels = jax.vmap(Fp8Weight.from_kernel)(kernels)
  layer = lambda h, w, b: jnp.tanh(flashrt_jax.fp8_dense(h, w, b, recipe=FP8_PATH))

  def scanned(x, kernels, biases):
    return jax.lax.scan(lambda h, p: (layer(h, *p), None), x, (kernels, biases))[0]

  def looped(x, kernels, biases):
    for i in range(layers):
      x = layer(x, jax.tree_util.tree_map(lambda a: a[i], kernels), biases[i])
    return x

  assert "flashrt_fp8_gemm_bias" in flashrt_targets(scanned, x, kernels, biases), f"{case}: no FP8 GEMM in HLO"
  y_scan, y_loop = jax.jit(scanned)(x, kernels, biases), jax.jit(looped)(x, kernels, biases)
  assert rel_l2(y_scan, y_loop) <= 1e-3, f"{case}: forward rel L2 {rel_l2(y_scan, y_loop):.2e}"
  loss = lambda f: lambda *a: jnp.sum(f(*a).astype(F32))
  argnums = (0, 2) if frozen else (0, 1, 2)
  g_scan = jax.jit(jax.grad(loss(scanned), argnums))(x, kernels, biases)
  g_loop = jax.jit(jax.grad(loss(looped), argnums))(x, kernels, biases)
  names = ("dx", "dbiases") if frozen else ("dx", "dkernels", "dbiases")
  for name, a, b in zip(names, g_scan, g_loop):
    assert rel_l2(a, b) <= 1e-2, f"{case}: {name} rel L2 {rel_l2(a, b):.2e}"


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_checkpoint_matches_plain_grad(platform, rng, frozen):
  case = f"jax.checkpoint(fp8_dense) grad, frozen={frozen}, on {platform}"
  x, w, b = normal(rng, (300, 64), BF16), normal(rng, (64, 64), std=0.125), normal(rng, (64,))
  w = Fp8Weight.from_kernel(w) if frozen else w
  two_layers = lambda x, w, b: _train_loss(jnp.tanh(flashrt_jax.fp8_dense(x, w, b, recipe=FP8_PATH)), w, b)
  grad = jax.jit(jax.grad(two_layers, argnums=(0, 1, 2)))
  grad_remat = jax.jit(jax.grad(jax.checkpoint(two_layers), argnums=(0, 1, 2)))
  assert "flashrt_fp8_gemm_bias" in flashrt_targets(grad_remat, x, w, b), f"{case}: no FP8 GEMM in HLO"
  for i, (a, r) in enumerate(zip(jax.tree_util.tree_leaves(grad_remat(x, w, b)),
                                 jax.tree_util.tree_leaves(grad(x, w, b)))):
    assert rel_l2(a, r) <= 1e-6, f"{case}: gradient leaf {i} rel L2 {rel_l2(a, r):.2e}"


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
def test_donation_keeps_results(platform, rng):
  case = f"donate_argnums train step on {platform}"
  x, w, b = normal(rng, (300, 64), BF16), normal(rng, (64, 32), std=0.125), normal(rng, (32,))

  def step(w, b, x):
    loss, (dw, db) = jax.value_and_grad(_train_loss, argnums=(1, 2))(x, w, b)
    return loss, w - 0.1 * dw, b - 0.1 * db

  expected = jax.jit(step)(w, b, x)
  donating = jax.jit(step, donate_argnums=(0, 1))
  w2, b2 = jnp.array(w), jnp.array(b)
  got = donating(w2, b2, x)
  _assert_trees_equal(got, expected, f"{case}: first step")
  again = donating(got[1], got[2], x)
  _assert_trees_equal(again, jax.jit(step)(*expected[1:], x), f"{case}: second step on donated outputs")


# ---------------------------------------------------------------------------------------------
# The FP8 path really runs: the compiled HLO holds the flashrt custom calls


def test_compiled_hlo_has_flashrt_calls(platform, rng):
  x, w, b = normal(rng, (300, 64), BF16), normal(rng, (64, 32), std=0.125), normal(rng, (32,))
  expected = {
      "quantize tensor": {"flashrt_quantize_current"},
      "quantize row e5m2": {"flashrt_quantize_current"},
      "quantize static": {"flashrt_quantize_static"},
      "quantize_transpose": {"flashrt_quantize_transpose_current"},
      "dequantize": set(),
      "fp8_gemm": {"flashrt_fp8_gemm"},
      "fp8_dense": {"flashrt_quantize_current", "flashrt_quantize_transpose_current", "flashrt_fp8_gemm_bias"},
      "fp8_dense frozen": {"flashrt_quantize_current", "flashrt_fp8_gemm_bias"},
  }
  for name, fn, args in _ops(rng):
    targets = flashrt_targets(fn, *args)
    assert targets == expected[name], f"compiled HLO of {name} on {platform}: {targets}, want {expected[name]}"
  train = jax.grad(_train_loss, argnums=(0, 1, 2))
  targets = flashrt_targets(train, x, w, b)
  want = {"flashrt_quantize_transpose_current", "flashrt_fp8_gemm", "flashrt_fp8_gemm_bias"}
  assert targets == want, f"compiled HLO of the fp8_dense train step on {platform}: {targets}, want {want}"


# ---------------------------------------------------------------------------------------------
# GPU: a train step captured in a CUDA graph (command buffer) gives the results of plain launches

_GRAPH_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import flashrt_jax
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1024, 512)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((512, 1024)) / 23, jnp.float32)
    b = jnp.asarray(rng.standard_normal(1024) / 10, jnp.float32)
    w2 = jnp.asarray(rng.standard_normal((1024, 512)) / 32, jnp.float32)
    frozen = flashrt_jax.Fp8Weight.from_kernel(w2, "channel")
    recipe = flashrt_jax.Fp8Recipe(min_rows=0)

    def loss(w, b, x):
      h = jax.nn.gelu(flashrt_jax.fp8_dense(x, w, b, recipe=recipe))
      return jnp.mean(jnp.square(flashrt_jax.fp8_dense(h, frozen, recipe=recipe).astype(jnp.float32)))

    @jax.jit
    def step(w, b, x):
      l, (dw, db) = jax.value_and_grad(loss, argnums=(0, 1))(w, b, x)
      return l, w - 0.1 * dw, b - 0.1 * db

    compiled = step.lower(w, b, x).compile()
    losses = []
    for _ in range(3):
      l, w, b = compiled(w, b, x)
      losses.append(float(l))
    np.savez(sys.argv[1], w=np.asarray(w), b=np.asarray(b), losses=np.asarray(losses))
    print(json.dumps({"hlo": compiled.as_text()}))
""")

_GRAPH_FLAGS = "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
_NO_GRAPH_FLAGS = "--xla_gpu_enable_command_buffer="


def _run_step(tmp_path, name, xla_flags, script=_GRAPH_SCRIPT):
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cuda")
  root = os.path.dirname(os.path.dirname(os.path.abspath(flashrt_jax.__file__)))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  out = tmp_path / f"{name}.npz"
  proc = subprocess.run([sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, f"{name} with XLA_FLAGS={xla_flags!r} failed:\n{proc.stderr[-4000:]}"
  hlo = json.loads(proc.stdout.strip().splitlines()[-1])["hlo"]
  return dict(np.load(out)), hlo


def _command_buffer_bodies(hlo: str) -> list[str]:
  """Bodies of the computations XLA's command-buffer scheduling outlined (HLO-level scheduling)."""
  return [m.group(1) for m in re.finditer(r"\n%?command_buffer[^\n]*\{\n(.*?)\n\}", hlo, re.S)]


@pytest.mark.gpu
def test_train_step_in_cuda_graph_matches_plain_launches(tmp_path):
  graph, hlo = _run_step(tmp_path, "graph", _GRAPH_FLAGS)
  plain, _ = _run_step(tmp_path, "plain", _NO_GRAPH_FLAGS)
  for key in ("losses", "w", "b"):
    err = rel_l2(graph[key], plain[key])
    assert err <= 1e-6, f"fp8_dense train step in a CUDA graph vs plain launches: {key} rel L2 {err:.2e}"
  assert np.all(np.diff(graph["losses"]) < 0), f"fp8_dense train step: loss must fall, got {graph['losses']}"
  bodies = _command_buffer_bodies(hlo)
  if bodies:  # XLA versions that schedule command buffers in HLO show what they captured
    assert any("flashrt_" in body for body in bodies), "no flashrt custom call inside a command_buffer computation"


# A pi0.5 decode step (50 action queries x 8 heads against a cached 968-token prefix plus their own
# keys): the forward splits the keys over a thread-block cluster; chained so later calls read earlier
# outputs.
_DECODE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import flashrt_jax
    rng = np.random.default_rng(0)
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    q, k, v = arr(1, 50, 8, 256), arr(1, 50, 1, 256), arr(1, 50, 1, 256)
    kp, vp = arr(1, 968, 1, 256), arr(1, 968, 1, 256)
    q_ids = jnp.ones((1, 50), jnp.int32)
    k_ids = jnp.concatenate([jnp.zeros((1, 968), jnp.int32), q_ids], axis=1)

    @jax.jit
    def steps(q, k, v, kp, vp):
      outs = []
      for _ in range(4):
        q = flashrt_jax.attention(q, k, v, prefix_kv=(kp, vp), q_block_ids=q_ids, k_block_ids=k_ids)
        outs.append(q)
      return jnp.stack(outs)

    compiled = steps.lower(q, k, v, kp, vp).compile()
    o = np.asarray(compiled(q, k, v, kp, vp).astype(jnp.float32))
    np.savez(sys.argv[1], o=o)
    print(json.dumps({"hlo": compiled.as_text()}))
""")


@pytest.mark.gpu
def test_decode_attention_in_cuda_graph_matches_plain_launches(tmp_path):
  graph, hlo = _run_step(tmp_path, "decode_graph", _GRAPH_FLAGS, _DECODE_SCRIPT)
  plain, _ = _run_step(tmp_path, "decode_plain", _NO_GRAPH_FLAGS, _DECODE_SCRIPT)
  assert np.all(np.isfinite(plain["o"])) and np.abs(plain["o"]).max() > 0, "decode attention gave no output"
  np.testing.assert_array_equal(graph["o"], plain["o"], "decode attention in a CUDA graph vs plain launches")
  bodies = _command_buffer_bodies(hlo)
  if bodies:
    assert any("flashrt_attention_fwd" in body for body in bodies), "attention not captured in a command buffer"
