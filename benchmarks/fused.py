"""Fused FP8 producers (norm / GLU + current-scaling quantize) and the FP8 FFN block, against the
device-to-device copy bandwidth and what XLA makes of the same math in jnp, in one process.

Sections (each timed side by side in this one process):
  copy       device-to-device copy bandwidth: y = -x on a 30976x2048 bf16 buffer (one read, one write),
             timed like everything else; the producers' bandwidth is reported as a fraction of it
  producers  rms_norm_fp8, residual_rms_norm_fp8, layer_norm_fp8, ada_rms_norm_fp8 (rows x width) and
             glu_fp8 (merged [gate | up] input), row and tensor current scaling: time, bytes floor
             (bytes read + written once), GB/s, fraction of copy bandwidth, speed-up over the pure-JAX
             composition (norm + amax + quantize in jnp, compiled and fused by XLA)
  ffn        the pre-norm GEGLU FeedForward (Gemma / openpi) with frozen FP8 weights: fp8_glu_ffn vs
             the XLA BF16 block (same math in bf16 jnp with dots) and the unfused FP8 chain (XLA norm,
             fp8_dense, XLA GLU, fp8_dense); forward, and forward + backward (dx, d norm_weight)

Usage: python benchmarks/fused.py [--sections copy,producers,ffn] [--shapes ...] [--smoke] [--out DIR]
Writes benchmarks/results/<gpu>/fused.{json,md,png} (rewritten after every measurement).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import flashrt_jax as fr  # noqa: E402
from flashrt_jax.ops import fused as producers  # noqa: E402
from flashrt_jax.ops.fused_dense import fp8_gate_up_weight, fp8_glu_ffn  # noqa: E402

BF16, F32, E4M3 = jnp.bfloat16, jnp.float32, jnp.float8_e4m3fn
EPS = 1e-6
COPY_SHAPE = (30976, 2048)
NORM_SHAPES = [(30976, 2048), (3872, 2048), (1600, 1024), (968, 2048), (50, 1024)]
GLU_SHAPES = [(30976, 16384), (1600, 4096)]  # rows x F: the merged input is rows x 2F
FFN_SHAPES = [(30976, 2048, 16384), (1600, 1024, 4096)]  # (B*T, D, F): gemma_2b at B=32, the action expert
SMOKE = {"copy": (64, 256), "norm": [(50, 128)], "glu": [(50, 128)], "ffn": [(50, 64, 128)]}
NORM_OPS = ("rms_norm_fp8", "residual_rms_norm_fp8", "layer_norm_fp8", "ada_rms_norm_fp8")
TARGETS = {"copy_fraction": 0.8, "residual_speedup": 2.0, "ffn_fwd": 1.6, "ffn_fwd_bwd": 1.4}


# --- the pure-JAX compositions (what XLA fuses of the same math) --------------------------------

def jnp_quantize(y, granularity):
  """Current scaling in jnp: amax, scale = amax / 448, q = clip(y / scale) cast to E4M3."""
  ay = jnp.abs(y)
  amax = jnp.max(ay, axis=-1, keepdims=True) if granularity == "row" else jnp.max(ay)
  scale = jnp.maximum(amax, 1e-12) / 448.0
  return jnp.clip(y / scale, -448.0, 448.0).astype(E4M3), scale


def jnp_rms(x, w, offset=1.0):
  xf = x.astype(F32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + EPS)
  return y if w is None else y * (offset + w.astype(F32))


def jnp_layer_norm(x, gamma, beta):
  xf = x.astype(F32)
  mu = jnp.mean(xf, -1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mu), -1, keepdims=True)
  return (xf - mu) * jax.lax.rsqrt(var + EPS) * gamma.astype(F32) + beta.astype(F32)


def jnp_glu(gu):
  f = gu.shape[-1] // 2
  g = gu[..., :f].astype(F32)
  return jax.nn.gelu(g, approximate=True) * gu[..., f:].astype(F32)


def producer_variants(op, granularity):
  """op -> (flashrt fn, pure-JAX fn); both take the op's input set."""
  g = granularity
  if op == "rms_norm_fp8":
    return (lambda x, w: producers.rms_norm_fp8(x, w, eps=EPS, granularity=g),
            lambda x, w: jnp_quantize(jnp_rms(x, w), g))
  if op == "residual_rms_norm_fp8":
    def xla(x, r, w):
      h = (x.astype(F32) + r.astype(F32)).astype(x.dtype)
      return (h,) + jnp_quantize(jnp_rms(h, w), g)
    return lambda x, r, w: producers.residual_rms_norm_fp8(x, r, w, eps=EPS, granularity=g), xla
  if op == "layer_norm_fp8":
    return (lambda x, gm, bt: producers.layer_norm_fp8(x, gm, bt, eps=EPS, granularity=g),
            lambda x, gm, bt: jnp_quantize(jnp_layer_norm(x, gm, bt), g))
  if op == "ada_rms_norm_fp8":
    return (lambda x, sm, sh: producers.ada_rms_norm_fp8(x, sm, sh, eps=EPS, granularity=g),
            lambda x, sm, sh: jnp_quantize(jnp_rms(x, None) * (1.0 + sm[:, None].astype(F32)) + sh[:, None].astype(F32), g))
  if op == "glu_fp8":
    return (lambda gu: producers.glu_fp8(gu, None, activation="gelu_tanh", granularity=g),
            lambda gu: jnp_quantize(jnp_glu(gu), g))
  raise ValueError(op)


def _batch(rows):
  """Samples in a batch of `rows` tokens (pi0.5: 968-token prefixes, 50-token suffixes)."""
  for t in (968, 50):
    if rows % t == 0:
      return rows // t
  return 1


def producer_inputs(op, rows, width, seed):
  """(input set, bytes floor): each input and output touched once; scales 4 bytes per row."""
  ks = jax.random.split(jax.random.key(seed), 4)
  x = common.random_normal(ks[0], (rows, width), BF16)
  vec = lambda k: common.random_normal(k, (width,), F32, 0.3)
  out = rows * width + 4 * rows  # FP8 data + row scales
  if op == "rms_norm_fp8":
    return (x, vec(ks[1])), 2 * rows * width + 4 * width + out
  if op == "residual_rms_norm_fp8":
    r = common.random_normal(ks[1], (rows, width), BF16, 4.0)
    return (x, r, vec(ks[2])), 3 * 2 * rows * width + 4 * width + out  # x, r in; h out
  if op == "layer_norm_fp8":
    return (x, vec(ks[1]), vec(ks[2])), 2 * rows * width + 8 * width + out
  if op == "ada_rms_norm_fp8":
    b = _batch(rows)
    x3 = x.reshape(b, rows // b, width)
    sm = common.random_normal(ks[1], (b, width), BF16, 0.3)  # one modulation per sequence
    sh = common.random_normal(ks[2], (b, width), BF16, 0.3)
    return (x3, sm, sh), 2 * rows * width + 2 * 2 * b * width + out
  if op == "glu_fp8":
    gu = common.random_normal(ks[0], (rows, 2 * width), BF16)
    return (gu,), 2 * rows * 2 * width + out
  raise ValueError(op)


# --- sections ----------------------------------------------------------------------------------

def _sets(make, bytes_per_set, timing, max_copies=16):
  """Input sets to rotate through (past L2); one under --smoke, where only running matters."""
  n = 1 if timing.get("target_s") == 0.0 else common.copies_for(bytes_per_set, max_copies)
  return [make(i) for i in range(n)]


def bench_copy(shape, timing):
  def one(i):
    return (common.random_normal(jax.random.key(i), shape, BF16),)
  nbytes = 2 * 2 * shape[0] * shape[1]
  sets = _sets(one, nbytes // 2, timing)
  s = common.time_op(lambda x: -x, sets, **timing)
  out = {"shape": list(shape), "us": s * 1e6, "bytes": nbytes, "gbps": nbytes / s / 1e9}
  print(f"copy {shape[0]}x{shape[1]} bf16: {out['us']:.1f} us, {out['gbps']:.0f} GB/s", flush=True)
  return out


def bench_producers(norm_shapes, glu_shapes, copy_gbps, timing, save, only=None, granularities=("row", "tensor")):
  rows_out = []
  cases = [(op, sh) for op in NORM_OPS for sh in norm_shapes] + [("glu_fp8", sh) for sh in glu_shapes]
  for op, (rows, width) in cases:
    if only and op not in only:
      continue
    _, nbytes = producer_inputs(op, rows, width, 0)
    sets = _sets(lambda i: producer_inputs(op, rows, width, i)[0], nbytes, timing)
    for granularity in granularities:
      ours, xla = producer_variants(op, granularity)
      t_ours, t_xla = common.time_op(ours, sets, **timing), common.time_op(xla, sets, **timing)
      gbps = nbytes / t_ours / 1e9
      r = {"op": op, "shape": [rows, width], "granularity": granularity, "bytes": nbytes,
           "us": {"flashrt": t_ours * 1e6, "xla": t_xla * 1e6}, "gbps": gbps,
           "xla_gbps": nbytes / t_xla / 1e9, "copy_fraction": gbps / copy_gbps if copy_gbps else None,
           "speedup": t_xla / t_ours}
      rows_out.append(r)
      print(f"{op} {rows}x{width} {granularity}: {t_ours * 1e6:.1f} us ({gbps:.0f} GB/s"
            + (f", {r['copy_fraction']:.0%} of copy" if copy_gbps else "")
            + f"), xla {t_xla * 1e6:.1f} us -> {r['speedup']:.2f}x", flush=True)
      save(rows_out)
  return rows_out


def xla_bf16_ffn(x, nw, wg, wd):
  """openpi's FeedForward (bf16 dots, gelu in bf16) with Gemma's pre-norm (float32, cast back) and
  the residual: what an openpi model runs today."""
  h = jnp_rms(x, nw).astype(BF16)
  gate = jnp.dot(h, wg[0])
  up = jnp.dot(h, wg[1])
  a = jax.nn.gelu(gate, approximate=True) * up
  return jnp.dot(a, wd) + x


def unfused_fp8_ffn(x, nw, wg8, wd8):
  """The same block from the unfused ops: XLA norm, fp8_dense (quantize + GEMM), XLA GLU, fp8_dense."""
  recipe = fr.Fp8Recipe(min_rows=0, granularity="row")
  h = jnp_rms(x, nw).astype(BF16)
  gu = fr.fp8_dense(h, wg8, recipe=recipe)
  a = jnp_glu(gu).astype(BF16)
  return (fr.fp8_dense(a, wd8, recipe=recipe).astype(F32) + x.astype(F32)).astype(BF16)


def ffn_variants(backward: bool):
  """name -> fn(x, nw, wg_bf16, wd_bf16, wg8, wd8, ct)."""
  fused = lambda x, nw, wg8, wd8: fp8_glu_ffn(x, nw, wg8, wd8, eps=EPS)
  fused_remat = lambda x, nw, wg8, wd8: fp8_glu_ffn(x, nw, wg8, wd8, eps=EPS, remat_gate_up=True)
  fused_bf16_bwd = lambda x, nw, wg8, wd8: fp8_glu_ffn(x, nw, wg8, wd8, eps=EPS, recipe=fr.Fp8Recipe(backward="bf16"))
  if not backward:
    return {
        "flashrt fp8_glu_ffn": lambda x, nw, wg, wd, wg8, wd8, ct: fused(x, nw, wg8, wd8),
        "unfused fp8 chain": lambda x, nw, wg, wd, wg8, wd8, ct: unfused_fp8_ffn(x, nw, wg8, wd8),
        "xla bf16": lambda x, nw, wg, wd, wg8, wd8, ct: xla_bf16_ffn(x, nw, wg, wd),
    }

  def grad(f, fp8: bool):  # frozen weights: gradients of x and the norm weight only
    def run(x, nw, wg, wd, wg8, wd8, ct):
      w1, w2 = (wg8, wd8) if fp8 else (wg, wd)
      out, pullback = jax.vjp(lambda x, nw: f(x, nw, w1, w2), x, nw)
      return out, pullback(ct)  # the output too: without it XLA would drop forward work
    return run

  return {
      "flashrt fp8_glu_ffn": grad(fused, True),
      "flashrt remat_gate_up": grad(fused_remat, True),
      "flashrt bf16 backward": grad(fused_bf16_bwd, True),
      "unfused fp8 chain": grad(unfused_fp8_ffn, True),
      "xla bf16": grad(xla_bf16_ffn, False),
  }


def ffn_inputs(m, d, f, seed):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = common.random_normal(ks[0], (m, d), BF16)
  nw = common.random_normal(ks[1], (d,), F32, 0.3)
  wg = common.random_normal(ks[2], (2, d, f), BF16, d ** -0.5)
  wd = common.random_normal(ks[3], (f, d), BF16, f ** -0.5)
  ct = common.random_normal(ks[4], (m, d), BF16)
  return x, nw, wg, wd, fp8_gate_up_weight(wg), fr.Fp8Weight.from_kernel(wd, "channel"), ct


def bench_ffn(shapes, timing, save):
  rows = []
  for m, d, f in shapes:
    per_set = 2 * (3 * m * d + 3 * d * f) + 3 * d * f  # activations, bf16 and FP8 weights
    sets = _sets(lambda i: ffn_inputs(m, d, f, i), per_set, timing, 4)
    r = {"shape": [m, d, f], "us": {}}
    rows.append(r)
    for phase, backward in (("fwd", False), ("fwd+bwd", True)):
      t = {name: common.time_op(fn, sets, **timing) * 1e6 for name, fn in ffn_variants(backward).items()}
      r["us"][phase] = t
      print(f"ffn {phase} {m}x{d}x{f}: " + ", ".join(f"{n} {v:.0f} us ({t['xla bf16'] / v:.2f}x)" for n, v in t.items()),
            flush=True)
      save(rows)
  return rows


# --- report --------------------------------------------------------------------------------------

def targets_table(results):
  rows = []
  prods = results.get("producers", [])
  big = [p for p in prods if p["shape"][0] >= 30976 and p.get("copy_fraction") is not None]
  if big:
    worst = min(big, key=lambda p: p["copy_fraction"])
    rows.append([f"fused op >= {TARGETS['copy_fraction']:.0%} of copy BW at large shapes",
                 f"min {worst['copy_fraction']:.0%} ({worst['op']} {worst['granularity']})",
                 "yes" if worst["copy_fraction"] >= TARGETS["copy_fraction"] else "no"])
  res = [p for p in prods if p["op"] == "residual_rms_norm_fp8" and p["shape"] == [30976, 2048]]
  for p in res:
    rows.append([f"residual+RMSNorm+quantize ({p['granularity']}) >= {TARGETS['residual_speedup']}x XLA at 30976x2048",
                 f"{p['speedup']:.2f}x", "yes" if p["speedup"] >= TARGETS["residual_speedup"] else "no"])
  for r in results.get("ffn", []):
    for phase, key in (("fwd", "ffn_fwd"), ("fwd+bwd", "ffn_fwd_bwd")):
      t = r["us"].get(phase)
      if t:
        s = t["xla bf16"] / t["flashrt fp8_glu_ffn"]
        rows.append([f"FFN {phase} (frozen) {'x'.join(map(str, r['shape']))} >= {TARGETS[key]}x BF16",
                     f"{s:.2f}x", "yes" if s >= TARGETS[key] else "no"])
  return rows


def write_report(results, out_dir):
  md = [f"# Fused FP8 producers and the FP8 FFN block ({common.device_name()}, jax {jax.__version__})\n",
        "Times are medians per call with Python dispatch excluded (benchmarks/common.py: inputs passed as "
        "jit arguments, rotated past L2, warmed up). Bytes floor = bytes read + written once.\n"]
  md.append(common.targets_md(targets_table(results)))
  if "copy" in results:
    c = results["copy"]
    md.append(f"\n## Copy bandwidth\n\n`-x` on {c['shape'][0]}×{c['shape'][1]} bf16: {c['us']:.1f} µs, "
              f"{c['gbps']:.0f} GB/s (read + write).\n")
  if results.get("producers"):
    md.append("\n## Producers (bf16 in, E4M3 + float32 scales out)\n")
    md.append(common.md_table(
        ["op", "rows×width", "scaling", "MB floor", "flashrt µs", "GB/s", "of copy", "XLA µs", "speed-up"],
        [[p["op"], "×".join(map(str, p["shape"])), p["granularity"], p["bytes"] / 1e6, p["us"]["flashrt"], p["gbps"],
          "-" if p["copy_fraction"] is None else f"{p['copy_fraction']:.0%}", p["us"]["xla"], f"{p['speedup']:.2f}×"]
         for p in results["producers"]]))
    md.append("\nglu_fp8 rows are rows × F: the merged input is rows × 2F.\n")
  if results.get("ffn"):
    md.append("\n## FFN block, frozen FP8 weights: µs (speed-up over XLA BF16)\n")
    for phase in ("fwd", "fwd+bwd"):
      rs = [r for r in results["ffn"] if phase in r["us"]]
      if not rs:
        continue
      names = list(rs[0]["us"][phase])
      md.append(f"\n{phase}:\n\n")
      md.append(common.md_table(["B·T×D×F"] + names, [["×".join(map(str, r["shape"]))] + [
          f"{r['us'][phase][n]:.0f} ({r['us'][phase]['xla bf16'] / r['us'][phase][n]:.2f}×)" for n in names] for r in rs]))
  common.write_results("fused", results, "".join(md), out_dir)
  plot(results, out_dir)


def plot(results, out_dir):
  try:
    import matplotlib
  except ImportError:
    return
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  prods, ffn = results.get("producers", []), results.get("ffn", [])
  if not prods and not ffn:
    return
  fig, axes = plt.subplots(2, 1, figsize=(14, 9), squeeze=False)
  ax = axes[0, 0]
  if prods:
    labels = [f"{p['op'].replace('_fp8', '')}\n{'×'.join(map(str, p['shape']))} {p['granularity'][0]}" for p in prods]
    xs = np.arange(len(prods))
    ax.bar(xs - 0.2, [p["speedup"] for p in prods], 0.4, label="speed-up over XLA")
    if prods[0].get("copy_fraction") is not None:
      ax.bar(xs + 0.2, [p["copy_fraction"] for p in prods], 0.4, label="fraction of copy BW")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(xs, labels, rotation=90, fontsize=6)
    ax.set_title(f"fused producers ({common.device_name()})")
    ax.legend(fontsize=7)
  ax = axes[1, 0]
  if ffn:
    bars = [(f"{'×'.join(map(str, r['shape']))} {ph}", n, r["us"][ph]["xla bf16"] / r["us"][ph][n])
            for r in ffn for ph in r["us"] for n in r["us"][ph] if n != "xla bf16"]
    groups = list(dict.fromkeys(b[0] for b in bars))
    names = list(dict.fromkeys(b[1] for b in bars))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
      vals = [next((b[2] for b in bars if b[0] == g and b[1] == n), 0.0) for g in groups]
      ax.bar(np.arange(len(groups)) + i * width, vals, width, label=n)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(groups)) + 0.4, groups, fontsize=8)
    ax.set_ylabel("speed-up over XLA BF16")
    ax.set_title("FFN block, frozen FP8 weights")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "fused.png"), dpi=110)
  plt.close(fig)


def _parse_shapes(text, n):
  shapes = [tuple(int(v) for v in sh.split(",")) for sh in text.split(";")]
  if any(len(s) != n for s in shapes):
    raise SystemExit(f"shapes must have {n} comma-separated sizes each, got {text!r}")
  return shapes


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sections", default="copy,producers,ffn")
  p.add_argument("--shapes", default=None, help="norm shapes rows,width;rows,width (replaces the default list)")
  p.add_argument("--glu-shapes", default=None, help="glu_fp8 shapes rows,F;rows,F")
  p.add_argument("--ffn-shapes", default=None, help="FFN shapes BT,D,F;BT,D,F")
  p.add_argument("--ops", default=None, help="producer ops to run (default all): rms_norm_fp8,glu_fp8,...")
  p.add_argument("--smoke", action="store_true",
                 help="tiny shapes, one input set, one iteration, row scaling only: checks that it runs (CPU too)")
  p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<gpu>)")
  args = p.parse_args(argv)
  sections = args.sections.split(",")
  unknown = set(sections) - {"copy", "producers", "ffn"}
  if unknown:
    raise SystemExit(f"unknown sections {sorted(unknown)}")
  copy_shape, norm, glu, ffn = COPY_SHAPE, NORM_SHAPES, GLU_SHAPES, FFN_SHAPES
  timing = {}
  if args.smoke:
    copy_shape, norm, glu, ffn = SMOKE["copy"], SMOKE["norm"], SMOKE["glu"], SMOKE["ffn"]
    timing = {"repeats": 1, "target_s": 0.0}
  norm = _parse_shapes(args.shapes, 2) if args.shapes else norm
  glu = _parse_shapes(args.glu_shapes, 2) if args.glu_shapes else glu
  ffn = _parse_shapes(args.ffn_shapes, 3) if args.ffn_shapes else ffn
  out_dir = args.out or common.results_dir()
  os.makedirs(out_dir, exist_ok=True)
  results = common.read_results("fused", out_dir)  # sections run separately (device-time limits) merge

  def saver(section):  # rewrite the report after every measurement: a run cut short keeps its rows
    def save(rows):
      results[section] = rows
      write_report(results, out_dir)
    return save

  if "copy" in sections:
    results["copy"] = bench_copy(copy_shape, timing)
    write_report(results, out_dir)
  copy_gbps = results.get("copy", {}).get("gbps")
  if "producers" in sections:
    only = set(args.ops.split(",")) if args.ops else None
    bench_producers(norm, glu, copy_gbps, timing, saver("producers"), only,
                    ("row",) if args.smoke else ("row", "tensor"))
  if "ffn" in sections:
    bench_ffn(ffn, timing, saver("ffn"))
  write_report(results, out_dir)


if __name__ == "__main__":
  main()
