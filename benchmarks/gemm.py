"""FP8 GEMM and fp8_dense against what a JAX user has today, on the pi0.5 shapes of DESIGN.md.

Sections (each timed side by side in this one process):
  raw       fp8_gemm vs XLA's native FP8 dot (weight (N, K) and (K, N)) and XLA BF16 jnp.dot
  forward   fp8_dense vs XLA BF16, Flax's FP8 layer (nn.Fp8DirectDotGeneralOp) and a pure-JAX FP8 layer
  backward  the layer's VJP (dx, or dx and dW) without its primal output: XLA drops the forward GEMM
            and keeps the passes that make the residuals. The report adds forward and backward rows
            into forward + backward.
  crossover fp8_dense vs XLA BF16 over small M: where the FP8 path starts to pay
  xla_route a frozen layer routed to XLA (fp8_dense's route vs a dequantized copy then the dot)
  accuracy  forward error vs float32 for fast_accum on/off and per-tensor vs per-row scaling
  memory    device bytes held by a frozen FP8 weight, per parameter

Usage: python benchmarks/gemm.py [--sections raw,forward,...] [--quick]
Writes benchmarks/results/<gpu>/gemm.{json,md,png}.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import flashrt_jax as fr  # noqa: E402
from flashrt_jax.ops.gemm import frozen_xla_converts, frozen_xla_dot  # noqa: E402

BF16, E4M3 = jnp.bfloat16, jnp.float8_e4m3fn
NK = (((1,), (1,)), ((), ()))  # contract x's K with a (N, K) weight's K
KN = (((1,), (0,)), ((), ()))
ALWAYS_FP8 = fr.Fp8Recipe(min_rows=0)  # the FP8 path at every shape; scales per tensor (trainable), per row (frozen)
FROZEN_TENSOR = fr.Fp8Recipe(min_rows=0, granularity="tensor")

# (M, K, N): pi0.5 backbone at B=32 (M=30976) and B=4 (3872), action expert (1600, 200), inference.
TRAIN_SHAPES = [(m, k, n) for m in (30976, 3872) for k, n in ((2048, 2048), (2048, 512), (2048, 16384), (16384, 2048))]
TRAIN_SHAPES += [(m, k, n) for m in (1600, 200) for k, n in ((1024, 4096), (4096, 1024))]
TRAIN_SHAPES += [(8192, 8192, 8192)]
INFER_SHAPES = [(968, 2048, 2048), (968, 2048, 16384), (968, 16384, 2048), (50, 1024, 4096), (50, 4096, 1024)]
RAW_SHAPES = [(30976, 2048, 16384), (30976, 16384, 2048), (3872, 2048, 16384), (8192, 8192, 8192)]


# --- the layers under comparison -----------------------------------------------------------

def xla_bf16(x, w):
  return jnp.dot(x, w)


def pure_jax_fp8(x, wq_nk, sw, rowwise=False):
  """The best pure-JAX FP8 layer: weight stored (N, K) FP8, activation current-scaled with jnp ops."""
  xf = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) if rowwise else jnp.max(jnp.abs(xf))
  sx = jnp.maximum(amax, 1e-12) / 448.0
  xq = jnp.clip(xf / sx, -448, 448).astype(E4M3)
  y = jax.lax.dot_general(xq, wq_nk, NK, preferred_element_type=jnp.float32)
  return (y * (sx * sw)).astype(BF16)  # per-token scales cannot enter XLA's GEMM: rescale after


def flax_fp8_layer(n):
  import flax.linen as nn
  op = getattr(nn, "Fp8DirectDotGeneralOp", None)
  if op is None:
    return None
  return nn.Dense(n, use_bias=False, dtype=BF16, param_dtype=BF16, dot_general_cls=op)


def make_inputs(m, k, n, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = common.random_normal(kx, (m, k), BF16)
  w = common.random_normal(kw, (k, n), BF16, 0.02)
  return x, w


def rotated(sets_fn, bytes_per_set, max_copies=16):
  return [sets_fn(i) for i in range(common.copies_for(bytes_per_set, max_copies))]


# --- sections ----------------------------------------------------------------------------------

def bench_raw(shapes, save):
  rows = []
  for m, k, n in shapes:
    def one(i):
      x, w = make_inputs(m, k, n, i)
      aq, sa = fr.quantize(x)
      bq, sb = fr.quantize(w.T)
      return aq, sa, bq, sb, bq.T
    sets = rotated(one, m * k + k * n + 2 * m * n, 4)
    t = {
        "flashrt fp8_gemm": common.time_op(lambda aq, sa, bq, sb, bkn: fr.fp8_gemm(aq, sa, bq, sb), sets),
        "xla fp8 (N,K)": common.time_op(
            lambda aq, sa, bq, sb, bkn: (jax.lax.dot_general(aq, bq, NK, preferred_element_type=BF16)
                                         * (sa * sb).astype(BF16)), sets),
        "xla fp8 (K,N)": common.time_op(
            lambda aq, sa, bq, sb, bkn: (jax.lax.dot_general(aq, jax.lax.optimization_barrier(bkn), KN,
                                                             preferred_element_type=BF16)
                                         * (sa * sb).astype(BF16)), sets),
    }
    bf_sets = rotated(lambda i: make_inputs(m, k, n, i), 2 * (m * k + k * n + m * n), 4)
    t["xla bf16"] = common.time_op(xla_bf16, bf_sets)
    flops = 2 * m * k * n
    rows.append({"shape": [m, k, n], "us": {v: s * 1e6 for v, s in t.items()},
                 "tflops": {v: flops / s / 1e12 for v, s in t.items()}})
    print(f"raw {m}x{k}x{n}: " + ", ".join(f"{v} {flops / s / 1e12:.0f}" for v, s in t.items()) + " TFLOP/s",
          flush=True)
    save(rows)
  return rows


def _layer_variants(m, k, n, backward: bool):
  """name -> (fn, input-set builder, flops)."""
  fwd_flops, dx_dw_flops, dx_flops = 2 * m * k * n, 4 * m * k * n, 2 * m * k * n  # backward: dx (+ dW) GEMMs only
  layer = flax_fp8_layer(n)

  # Input set i is built once per shape and shared by the variants (building it dominated run time).
  @functools.cache
  def dense_sets(i):
    ct = common.random_normal(jax.random.key(100 + i), (m, n), BF16) if backward else None
    return (*make_inputs(m, k, n, i), ct)

  @functools.cache
  def frozen_sets(i):
    x, w, ct = dense_sets(i)
    return x, fr.Fp8Weight.from_kernel(w), ct

  def flax_sets(i):
    x, w, ct = dense_sets(i)
    params = jax.jit(layer.init)(jax.random.key(i), x)
    params["params"]["kernel"] = w
    return x, params, ct

  def fp8_input_sets(i):  # the activation as a fused producer (rms_norm_fp8, glu_fp8) hands it over
    x, w, ct = frozen_sets(i)
    return fr.Fp8Activation(*fr.quantize(x, granularity="row")), w, ct

  v = {}
  if not backward:
    v["flashrt trainable"] = (lambda x, w, ct: fr.fp8_dense(x, w, recipe=ALWAYS_FP8), dense_sets, fwd_flops)
    v["flashrt trainable routed"] = (lambda x, w, ct: fr.fp8_dense(x, w), dense_sets, fwd_flops)
    v["flashrt frozen tensor"] = (lambda x, w, ct: fr.fp8_dense(x, w, recipe=FROZEN_TENSOR), frozen_sets, fwd_flops)
    v["flashrt frozen row"] = (lambda x, w, ct: fr.fp8_dense(x, w, recipe=ALWAYS_FP8), frozen_sets, fwd_flops)
    v["flashrt frozen routed"] = (lambda x, w, ct: fr.fp8_dense(x, w), frozen_sets, fwd_flops)
    v["flashrt frozen fp8 input"] = (lambda x, w, ct: fr.fp8_dense(x, w), fp8_input_sets, fwd_flops)
    v["xla bf16"] = (lambda x, w, ct: xla_bf16(x, w), dense_sets, fwd_flops)
    v["pure-jax fp8 frozen"] = (lambda x, w, ct: pure_jax_fp8(x, w.data, w.scale), frozen_sets, fwd_flops)
    v["pure-jax fp8 frozen row"] = (lambda x, w, ct: pure_jax_fp8(x, w.data, w.scale, True), frozen_sets, fwd_flops)
    if layer is not None:
      v["flax fp8 layer"] = (lambda x, p, ct: layer.apply(p, x), flax_sets, fwd_flops)
  else:
    def grads(f, wrt_weight: bool):
      if wrt_weight:
        return lambda x, w, ct: jax.vjp(f, x, w)[1](ct)
      return lambda x, w, ct: jax.vjp(lambda x_: f(x_, w), x)[1](ct)
    v["flashrt trainable dx+dW"] = (grads(lambda x, w: fr.fp8_dense(x, w, recipe=ALWAYS_FP8), True), dense_sets, dx_dw_flops)
    v["flashrt frozen tensor dx"] = (grads(lambda x, w: fr.fp8_dense(x, w, recipe=FROZEN_TENSOR), False), frozen_sets,
                                     dx_flops)
    v["flashrt frozen row dx"] = (grads(lambda x, w: fr.fp8_dense(x, w, recipe=ALWAYS_FP8), False), frozen_sets, dx_flops)
    v["xla bf16 dx+dW"] = (grads(xla_bf16, True), dense_sets, dx_dw_flops)
    v["xla bf16 dx"] = (grads(xla_bf16, False), dense_sets, dx_flops)
    v["pure-jax fp8 frozen dx"] = (grads(lambda x, w: pure_jax_fp8(x, w.data, w.scale), False), frozen_sets, dx_flops)
    if layer is not None:
      v["flax fp8 layer dx+dW"] = (grads(lambda x, p: layer.apply(p, x), True), flax_sets, dx_dw_flops)
  return v


def bench_layers(shapes, backward: bool, save):
  rows = []
  for m, k, n in shapes:
    bytes_per_set = 2 * (m * k + k * n + 2 * m * n)
    t, tflops = {}, {}
    for name, (fn, sets_fn, flops) in _layer_variants(m, k, n, backward).items():
      s = common.time_op(fn, rotated(sets_fn, bytes_per_set, 8))
      t[name], tflops[name] = s * 1e6, flops / s / 1e12
    rows.append({"shape": [m, k, n], "us": t, "tflops": tflops})
    base = backward_base if backward else (lambda v: "xla bf16")
    print(f"{'bwd' if backward else 'fwd'} {m}x{k}x{n}: "
          + ", ".join(f"{v} {t[base(v)] / s:.2f}x" for v, s in t.items()), flush=True)
    save(rows)
  return rows


def bench_crossover(ms, kns, save):
  rows = []
  for k, n in kns:
    for m in ms:
      bytes_per_set = 2 * (m * k + k * n + m * n)
      def dense_sets(i):
        return make_inputs(m, k, n, i)
      def frozen_sets(i):
        x, w = make_inputs(m, k, n, i)
        return x, fr.Fp8Weight.from_kernel(w)
      t = {"xla bf16": common.time_op(xla_bf16, rotated(dense_sets, bytes_per_set)),
           "fp8 trainable": common.time_op(lambda x, w: fr.fp8_dense(x, w, recipe=ALWAYS_FP8),
                                           rotated(dense_sets, bytes_per_set)),
           "fp8 frozen": common.time_op(lambda x, w: fr.fp8_dense(x, w, recipe=ALWAYS_FP8),
                                        rotated(frozen_sets, bytes_per_set))}
      rows.append({"m": m, "k": k, "n": n, "us": {v: s * 1e6 for v, s in t.items()}})
      print(f"crossover {m}x{k}x{n}: " + ", ".join(f"{v} {s * 1e6:.1f}us" for v, s in t.items()), flush=True)
      save(rows)
  return rows


XLA_ROUTE_SHAPES = [(200, 1024, 4096), (200, 4096, 1024), (50, 1024, 4096), (50, 4096, 1024), (3872, 2048, 512),
                    (30976, 2048, 512), (968, 2048, 2048), (1600, 1024, 4096)]


def bench_xla_route(shapes, save):
  """A frozen layer routed to XLA, in the two forms fp8_dense chooses between (frozen_xla_dot), next
  to the FP8 path and XLA BF16."""
  rows = []
  for m, k, n in shapes:
    bytes_per_set = 2 * (m * k + k * n + m * n)
    dense = rotated(lambda i: make_inputs(m, k, n, i), bytes_per_set)
    frozen = [(x, fr.Fp8Weight.from_kernel(w)) for x, w in dense]
    variants = {"xla bf16": (xla_bf16, dense),
                "convert in dot": (lambda x, w: frozen_xla_dot(x, w, True).astype(x.dtype), frozen),
                "dequantize then dot": (lambda x, w: frozen_xla_dot(x, w, False), frozen),
                "fp8_dense fp8 path": (lambda x, w: fr.fp8_dense(x, w, recipe=ALWAYS_FP8), frozen)}
    t = {v: common.time_op(fn, sets) * 1e6 for v, (fn, sets) in variants.items()}
    rows.append({"shape": [m, k, n], "us": t})
    print(f"xla route {m}x{k}x{n}: " + ", ".join(f"{v} {u:.1f}us" for v, u in t.items()), flush=True)
    save(rows)
  return rows


def crossover_rows(rows, variant):
  """Smallest M from which the FP8 variant is at least as fast as BF16 at every larger M and (K, N)."""
  ms = sorted({r["m"] for r in rows})
  ok = {m: all(r["us"][variant] <= r["us"]["xla bf16"] for r in rows if r["m"] == m) for m in ms}
  best = None
  for m in reversed(ms):
    if not ok[m]:
      break
    best = m
  return best


def bench_accuracy(m=3872, k=2048, n=2048):
  x, w = make_inputs(m, k, n, 7)
  exact = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  rel = lambda y: float(jnp.linalg.norm(y.astype(jnp.float32) - exact) / jnp.linalg.norm(exact))
  out = {"shape": [m, k, n], "xla bf16": rel(jnp.dot(x, w))}
  for fast in (True, False):
    out[f"trainable tensor fast_accum={fast}"] = rel(fr.fp8_dense(x, w, recipe=fr.Fp8Recipe(min_rows=0, fast_accum=fast)))
    for g in ("tensor", "row"):
      for wg in ("tensor", "channel"):
        wf = fr.Fp8Weight.from_kernel(w, granularity=wg)
        y = fr.fp8_dense(x, wf, recipe=fr.Fp8Recipe(min_rows=0, fast_accum=fast, granularity=g))
        out[f"frozen x:{g} w:{wg} fast_accum={fast}"] = rel(y)
  for name, val in out.items():
    if name != "shape":
      print(f"accuracy {name}: rel err {val:.2e}", flush=True)
  return out


def bench_memory(k=16384, n=2048):
  dev = jax.devices()[0]
  stats = lambda: dev.memory_stats()["bytes_in_use"]
  base = stats()
  w = common.random_normal(jax.random.key(0), (k, n), BF16)
  jax.block_until_ready(w)
  with_kernel = stats()
  wf = jax.block_until_ready(fr.Fp8Weight.from_kernel(w))
  del w
  frozen = stats() - base
  out = {"params": k * n, "bf16 kernel bytes/param": (with_kernel - base) / (k * n),
         "frozen Fp8Weight bytes/param": frozen / (k * n)}
  print(f"memory: {out}", flush=True)
  del wf
  return out


TARGET_SHAPES = ([30976, 2048, 16384], [30976, 16384, 2048], [3872, 2048, 16384])


def backward_base(variant):
  """The XLA BF16 row a backward variant is compared with: the one computing the same gradients."""
  return "xla bf16 dx" if variant.endswith(" dx") else "xla bf16 dx+dW"


# forward + backward = a forward column plus the backward column of the same layer.
TRAIN_STEP_PAIRS = {
    "flashrt frozen row (dx)": ("flashrt frozen row", "flashrt frozen row dx"),
    "flashrt frozen tensor (dx)": ("flashrt frozen tensor", "flashrt frozen tensor dx"),
    "xla bf16 (dx)": ("xla bf16", "xla bf16 dx"),
    "flashrt trainable (dx+dW)": ("flashrt trainable", "flashrt trainable dx+dW"),
    "flax fp8 layer (dx+dW)": ("flax fp8 layer", "flax fp8 layer dx+dW"),
    "xla bf16 (dx+dW)": ("xla bf16", "xla bf16 dx+dW"),
}


def train_step_rows(results):
  """Forward + backward µs per shape measured in both sections: {"shape", "us": {pair name: µs}}."""
  fwd = {tuple(r["shape"]): r["us"] for r in results.get("forward", [])}
  rows = []
  for r in results.get("backward", []):
    f = fwd.get(tuple(r["shape"]))
    if f is not None:
      rows.append({"shape": r["shape"], "us": {name: f[a] + r["us"][b] for name, (a, b) in TRAIN_STEP_PAIRS.items()
                                               if a in f and b in r["us"]}})
  return rows


def train_step_base(name):
  return "xla bf16 (dx)" if name.endswith("(dx)") else "xla bf16 (dx+dW)"


def targets(results, steps):
  """[target, measured (worst case and where), met] for the targets of the FP8 GEMM issue; steps:
  train_step_rows(results)."""
  rows = []
  shape = lambda r: "×".join(map(str, r["shape"]))

  def worst(section, ratio, keep=lambda r: True):
    vals = [(ratio(r), shape(r)) for r in (steps if section == "train_step" else results.get(section, [])) if keep(r)]
    return min(vals) if vals else None

  def add(name, goal, found):
    if found is not None:
      rows.append([name, f"{found[0]:.3f} ({found[1]})", "yes" if found[0] >= goal else "no"])

  raw = lambda a, b: lambda r: r["tflops"][a] / r["tflops"][b]
  add("raw fp8_gemm >= 0.97x XLA FP8 dot, weight (N, K)", 0.97, worst("raw", raw("flashrt fp8_gemm", "xla fp8 (N,K)")))
  found = worst("raw", lambda r: r["tflops"]["flashrt fp8_gemm"] / 1100, lambda r: r["shape"] in TARGET_SHAPES[:2])
  if found is not None:
    rows.append(["raw fp8_gemm >= 1100 TFLOP/s at 30976×2048×16384, 30976×16384×2048",
                 f"{found[0] * 1100:.0f} TFLOP/s ({found[1]})", "yes" if found[0] >= 1 else "no"])
  fwd = lambda a, b: lambda r: r["us"][b] / r["us"][a]
  fp8_shapes = lambda frozen: lambda r: fr.takes_fp8_path(*r["shape"], frozen=frozen)
  for variant, frozen in (("flashrt frozen row", True), ("flashrt trainable", False)):
    add(f"{variant} forward >= 1.05x Flax FP8 layer (shapes routed to FP8)", 1.05,
        worst("forward", fwd(variant, "flax fp8 layer"), fp8_shapes(frozen)))
  for variant, pure in (("flashrt frozen tensor", "pure-jax fp8 frozen"), ("flashrt frozen row", "pure-jax fp8 frozen row")):
    add(f"{variant} forward >= 1.05x {pure} (shapes routed to FP8)", 1.05,
        worst("forward", fwd(variant, pure), fp8_shapes(True)))
  for variant in ("flashrt frozen row", "flashrt trainable", "flashrt frozen fp8 input"):
    add(f"{variant} forward >= 1.7x XLA BF16 at the three large shapes", 1.7,
        worst("forward", fwd(variant, "xla bf16"), lambda r: r["shape"] in TARGET_SHAPES))
  for variant in ("flashrt frozen row (dx)", "flashrt frozen tensor (dx)"):
    add(f"{variant} forward + backward >= 1.5x XLA BF16 forward + dx at the three large shapes", 1.5,
        worst("train_step", fwd(variant, "xla bf16 (dx)"), lambda r: r["shape"] in TARGET_SHAPES))
  for variant, frozen in (("flashrt trainable routed", False), ("flashrt frozen routed", True)):
    add(f"{variant} (default recipe) forward >= 1.0x XLA BF16, shapes routed to FP8", 1.0,
        worst("forward", fwd(variant, "xla bf16"), fp8_shapes(frozen)))
    if frozen and "xla_route" in results:
      continue  # measured below on the route's current forms
    # Routed to XLA, a trainable layer runs XLA's own dot: the same program, so its ratio is noise.
    add(f"{variant} (default recipe) forward >= 1.0x XLA BF16, shapes routed to XLA"
        + ("" if frozen else " (the same program as XLA BF16)"), 1.0,
        worst("forward", fwd(variant, "xla bf16"), lambda r, f=frozen: not fr.takes_fp8_path(*r["shape"], frozen=f)))
  routed_form = lambda r: "convert in dot" if frozen_xla_converts(r["shape"][0], r["shape"][1]) else "dequantize then dot"
  add("flashrt frozen routed (default recipe) forward >= 1.0x XLA BF16, shapes routed to XLA (section xla_route)", 1.0,
      worst("xla_route", lambda r: r["us"]["xla bf16"] / r["us"][routed_form(r)],
            lambda r: not fr.takes_fp8_path(*r["shape"], frozen=True)))
  if "memory" in results:
    b = results["memory"]["frozen Fp8Weight bytes/param"]
    rows.append(["frozen Fp8Weight holds 1 byte per weight (device memory stats)", f"{b:.4f}",
                 "yes" if b < 1.01 else "no"])
  return rows


def write_report(results, out_dir):
  md = [f"# FP8 GEMM benchmarks ({common.device_name()}, jax {jax.__version__})\n",
        "Times are medians per call with Python dispatch excluded (benchmarks/common.py). "
        "Speed-up = XLA BF16 time / variant time. `routed`: the default recipe, which sends shapes where "
        "FP8 does not pay to XLA's dot (`takes_fp8_path`); the other flashrt columns take the FP8 path "
        "at every shape. `fp8 input`: the activation arrives quantized per row, as the fused producers "
        "(rms_norm_fp8, glu_fp8) hand it over.\n"]
  steps = train_step_rows(results)
  md.append(common.targets_md(targets(results, steps), "measured (worst shape)"))
  if "raw" in results:
    md.append("\n## Raw GEMM (TFLOP/s)\n")
    names = list(results["raw"][0]["tflops"])
    md.append(common.md_table(["M×K×N"] + names + ["fp8_gemm / xla fp8 (N,K)"],
                              [["×".join(map(str, r["shape"]))] + [r["tflops"][v] for v in names]
                               + [r["tflops"]["flashrt fp8_gemm"] / r["tflops"]["xla fp8 (N,K)"]] for r in results["raw"]]))
  for sec in ("forward", "backward"):
    if sec in results:
      names = list(results[sec][0]["us"])
      base = (lambda v: "xla bf16") if sec == "forward" else backward_base
      what = ("Forward: µs (speed-up over xla bf16)" if sec == "forward" else
              "Backward: µs (speed-up over the XLA BF16 column computing the same gradients: dx+dW or dx)")
      md.append(f"\n## {what}\n")
      if sec == "backward":
        md.append("The layer's VJP given dy, without its primal output: XLA drops the forward GEMM and keeps "
                  "the passes that make the residuals (a trainable layer's transposing quantizes).\n\n")
      md.append(common.md_table(["M×K×N"] + names, [["×".join(map(str, r["shape"]))] + [
          f"{r['us'][v]:.0f} ({r['us'][base(v)] / r['us'][v]:.2f}×)" for v in names] for r in results[sec]]))
      if sec == "forward" and "xla_route" in results:
        md.append("\nA frozen layer routed to XLA is timed in both of its forms in the section "
                  "\"A frozen layer routed to XLA\" below.\n")
  if steps:
    names = list(steps[0]["us"])
    md.append("\n## Forward + backward: µs, the forward column plus the backward column of the same layer "
              "(speed-up over XLA BF16 with the same gradients)\n")
    md.append(common.md_table(["M×K×N"] + names, [["×".join(map(str, r["shape"]))] + [
        f"{r['us'][v]:.0f} ({r['us'][train_step_base(v)] / r['us'][v]:.2f}×)" for v in names] for r in steps]))
  if "crossover" in results:
    md.append("\n## Crossover: fp8_dense vs XLA BF16 forward at small M (µs)\n")
    md.append(common.md_table(["M", "K", "N", "xla bf16", "fp8 trainable", "fp8 frozen"],
                              [[r["m"], r["k"], r["n"]] + [r["us"][v] for v in ("xla bf16", "fp8 trainable", "fp8 frozen")]
                               for r in results["crossover"]]))
    md.append(f"\nSmallest M from which FP8 is never slower: trainable {results['crossover_m']['fp8 trainable']}, "
              f"frozen {results['crossover_m']['fp8 frozen']}.\n")
  if "xla_route" in results:
    md.append("\n## A frozen layer routed to XLA: µs (speed-up over xla bf16)\n"
              "`convert in dot`: the FP8 data converted inside XLA's dot, the scale applied to the float32 "
              "product; `dequantize then dot`: a dequantized BF16 copy of the weight, then the dot. The last "
              "column is the form fp8_dense's XLA route takes (`frozen_xla_converts`).\n\n")
    names = list(results["xla_route"][0]["us"])
    md.append(common.md_table(["M×K×N"] + names + ["fp8_dense's XLA route"], [["×".join(map(str, r["shape"]))] + [
        f"{r['us'][v]:.1f} ({r['us']['xla bf16'] / r['us'][v]:.2f}×)" for v in names]
        + ["convert in dot" if frozen_xla_converts(r["shape"][0], r["shape"][1]) else "dequantize then dot"]
        for r in results["xla_route"]]))
  if "accuracy" in results:
    md.append("\n## Forward accuracy: ‖y − y_fp32‖ / ‖y_fp32‖\n")
    md.append(common.md_table(["variant", "rel error"], [[k, v] for k, v in results["accuracy"].items() if k != "shape"]))
  if "memory" in results:
    md.append("\n## Resident bytes per parameter (device memory stats)\n")
    md.append(common.md_table(["what", "value"], [[k, v] for k, v in results["memory"].items()]))
  common.write_results("gemm", results, "".join(md), out_dir)
  plot(results, out_dir)


def plot(results, out_dir):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  secs = [s for s in ("forward", "backward") if s in results]
  if not secs:
    return
  fig, axes = plt.subplots(len(secs), 1, figsize=(14, 4.5 * len(secs)), squeeze=False)
  for ax, sec in zip(axes[:, 0], secs):
    base = (lambda v: "xla bf16") if sec == "forward" else backward_base
    rows = results[sec]
    names = list(rows[0]["us"])
    width = 0.8 / len(names)
    for i, v in enumerate(names):
      ax.bar(np.arange(len(rows)) + i * width, [r["us"][base(v)] / r["us"][v] for r in rows], width, label=v)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(rows)) + 0.4, ["×".join(map(str, r["shape"])) for r in rows], rotation=30, fontsize=7)
    ax.set_ylabel("speed-up over XLA BF16 (same gradients)")
    ax.set_title(f"{sec} ({common.device_name()})")
    ax.legend(fontsize=7, ncol=3)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "gemm.png"), dpi=110)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sections", default="raw,forward,backward,crossover,xla_route,accuracy,memory")
  p.add_argument("--quick", action="store_true", help="a few shapes only")
  p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<gpu>)")
  p.add_argument("--shapes", default=None, help="forward/backward shapes instead of the default list: M,K,N;M,K,N")
  p.add_argument("--ms", default=None, help="crossover rows instead of the default list: 16,50,...")
  p.add_argument("--kns", default=None, help="crossover K,N pairs instead of the default list: K,N;K,N")
  args = p.parse_args()
  sections = args.sections.split(",")
  train = TRAIN_SHAPES[:1] + TRAIN_SHAPES[-1:] if args.quick else TRAIN_SHAPES
  infer = INFER_SHAPES[-2:] if args.quick else INFER_SHAPES
  out_dir = args.out or common.results_dir()
  os.makedirs(out_dir, exist_ok=True)
  if args.shapes:
    train = infer = [tuple(int(v) for v in sh.split(",")) for sh in args.shapes.split(";")]
    infer = []
  results = common.read_results("gemm", out_dir)  # sections run separately (device-time limits) merge

  def saver(section):  # rewrite the report after every shape, so a run cut short keeps what it measured
    earlier = results.get(section, []) if section in ("raw", "forward", "backward") else []

    def save(rows):
      if earlier:  # a run over some shapes replaces those rows of an earlier run and keeps the rest
        order = [tuple(sh) for sh in (RAW_SHAPES if section == "raw" else TRAIN_SHAPES + INFER_SHAPES)]
        by_shape = {tuple(r["shape"]): r for r in earlier + rows}
        rows = sorted(by_shape.values(), key=lambda r: order.index(tuple(r["shape"])) if tuple(r["shape"]) in order
                      else len(order))
      results[section] = rows
      if section == "crossover":
        results["crossover_m"] = {v: crossover_rows(rows, v) for v in ("fp8 trainable", "fp8 frozen")}
      write_report(results, out_dir)
    return save

  if "raw" in sections:
    bench_raw(RAW_SHAPES[:1] if args.quick else RAW_SHAPES, saver("raw"))
  if "forward" in sections:
    bench_layers(train + infer, False, saver("forward"))
  if "backward" in sections:
    bench_layers(train, True, saver("backward"))
  if "crossover" in sections:
    ms = (16, 64, 256, 1024) if args.quick else (16, 50, 128, 256, 512, 968, 1600)
    kns = ((2048, 2048),) if args.quick else ((1024, 4096), (4096, 1024), (2048, 2048), (2048, 16384), (16384, 2048))
    ms = tuple(int(v) for v in args.ms.split(",")) if args.ms else ms
    kns = tuple(tuple(int(v) for v in kn.split(",")) for kn in args.kns.split(";")) if args.kns else kns
    bench_crossover(ms, kns, saver("crossover"))
  if "xla_route" in sections:
    results["xla_route"] = bench_xla_route(XLA_ROUTE_SHAPES, lambda rows: None)
    write_report(results, out_dir)
  if "accuracy" in sections:
    results["accuracy"] = bench_accuracy()
  if "memory" in sections:
    results["memory"] = bench_memory()
  write_report(results, out_dir)


if __name__ == "__main__":
  main()
