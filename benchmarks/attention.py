"""flashrt_jax.attention against jax.nn.dot_product_attention (cuDNN and XLA) on pi0 / pi0.5 shapes.

Cases (--cases, comma-separated names):
  pi05_train_b32   training, B=32, T=1018 (prefix 968 + suffix 50), Hq 8, Hkv 1, D 256, pi0.5's mask
                   as openpi's make_attn_mask builds it: the prefix one bidirectional block with one
                   camera view (256 tokens) as padding inside it, the suffix two more blocks (1 + 49
                   tokens); padded tokens neither see nor are seen (flashrt: k_valid and q_valid)
  pi05_train_b4    the same at B=4
  pi05_train_b32_kpad  pi05_train_b32 with key padding only (k_valid): padded queries attend to the
                   valid keys, the mask earlier runs measured
  causal_b8_t4096  generic causal, B=8, T=4096, Hq = Hkv = 16, D 128
  pi05_prefix_b1   inference prefix pass, B=1, T=968, one bidirectional block
  pi05_decode_b1   inference flow step: 50 suffix queries vs 968 cached prefix keys (prefix_kv) + their
                   own 50, B=1

Sections (--sections): fwd, bwd (forward + backward). Inference cases run fwd only.

Variants: flashrt (the real mask); cudnn (the nearest mask it supports natively: none for the
bidirectional / block-causal cases, is_causal for causal: it does less or other work than asked);
cudnn+mask and cudnn+bias (the real mask as a boolean mask / an additive bias, where cuDNN takes it,
else "unsupported"); xla+mask (implementation="xla" with the real boolean mask). The baselines of the
decode case attend to the concatenation of the cached prefix and the new keys, built inside the
timed function as a JAX user's KV cache would.

TFLOP/s count the visible (query, key) pairs only: 4 * D * Hq * pairs for the forward, 3.5x that
for forward + backward (the backward's five matmuls); the dense count (all Tq * Tk pairs) is in the
JSON too. The floor is max(FLOPs / 989 TFLOP/s BF16 dense, bytes / 3.0 TB/s) with the bytes of
q, k, v, o (and do, dq, dk, dv). Peak extra memory is XLA's temp allocation of the compiled program
(compiled.memory_analysis()); the flashrt rows check that it stays within 1.25x (+16 MiB) of what
flashrt should need (workspaces; for the backward also the residuals o and lse), i.e. that it holds
no (Tq, Tk) buffer, and the run exits nonzero otherwise.

Usage: python benchmarks/attention.py [--sections fwd,bwd] [--cases a,b] [--smoke] [--out DIR]
Writes benchmarks/results/<gpu>/attention.{json,md,png} (--smoke: tiny shapes on any device, to /tmp).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import flashrt_jax as fr  # noqa: E402
from flashrt_jax.ffi import attention as raw  # noqa: E402
from flashrt_jax.ops.attention import kernel_head_dim  # noqa: E402

BF16 = jnp.bfloat16
PEAK_FLOPS = 989e12  # H100 SXM BF16 dense
PEAK_BYTES = 3.0e12  # measured device-to-device copy (DESIGN.md)

CASES = {
    "pi05_train_b32": dict(train=True, b=32, tq=1018, tp=0, tk=1018, hq=8, hkv=1, d=256, mask="pi05"),
    "pi05_train_b4": dict(train=True, b=4, tq=1018, tp=0, tk=1018, hq=8, hkv=1, d=256, mask="pi05"),
    "pi05_train_b32_kpad": dict(train=True, b=32, tq=1018, tp=0, tk=1018, hq=8, hkv=1, d=256, mask="pi05_kpad"),
    "causal_b8_t4096": dict(train=True, b=8, tq=4096, tp=0, tk=4096, hq=16, hkv=16, d=128, mask="causal"),
    "pi05_prefix_b1": dict(train=False, b=1, tq=968, tp=0, tk=968, hq=8, hkv=1, d=256, mask="none"),
    "pi05_decode_b1": dict(train=False, b=1, tq=50, tp=968, tk=50, hq=8, hkv=1, d=256, mask="suffix"),
}
SMOKE = {
    "pi05_train_b32": dict(b=2, tq=130, tk=130), "pi05_train_b4": dict(b=1, tq=130, tk=130),
    "pi05_train_b32_kpad": dict(b=2, tq=130, tk=130),
    "causal_b8_t4096": dict(b=1, tq=256, tk=256, hq=2, hkv=2, d=64), "pi05_prefix_b1": dict(tq=97, tk=97, d=64),
    "pi05_decode_b1": dict(tq=10, tp=90, tk=10, d=64),
}


# --- masks -------------------------------------------------------------------------------------

def pi05_layout(b, t, suffix=50):
  """Block ids and validity of a pi0.5 sequence: prefix block 0 (second camera view padded), the
  suffix in blocks 1 (first token) and 2."""
  suffix = min(suffix, t // 4)
  prefix = t - suffix
  ids = np.zeros((b, t), np.int32)
  ids[:, prefix] = 1
  ids[:, prefix + 1:] = 2
  valid = np.ones((b, t), bool)
  view = prefix * 256 // 968
  valid[:, view:2 * view] = False
  return ids, valid


def case_masks(c):
  """(kwargs of fr.attention, boolean mask (B, Tq, Tk_total), nearest cuDNN kwargs)."""
  b, tq, tkt = c["b"], c["tq"], c["tp"] + c["tk"]
  if c["mask"] == "none":
    return {}, np.ones((b, tq, tkt), bool), {}
  if c["mask"] == "causal":
    pos = np.arange(tkt)
    return {"mask": "causal"}, np.broadcast_to(pos[None, :] <= pos[tkt - tq:, None], (b, tq, tkt)), {"is_causal": True}
  ids, valid = pi05_layout(b, tkt, 50 if c["mask"] in ("pi05", "pi05_kpad") else c["tq"])
  if c["mask"] == "suffix":  # decode: the cached prefix is fully valid
    valid[:] = True
  q_ids = ids[:, tkt - tq:]
  dense = (ids[:, None, :] <= q_ids[:, :, None]) & valid[:, None, :]
  kw = {"q_block_ids": jnp.asarray(q_ids), "k_block_ids": jnp.asarray(ids), "k_valid": jnp.asarray(valid)}
  if c["mask"] == "pi05":  # openpi's make_attn_mask: padded queries see nothing either
    dense &= valid[:, :, None]
    kw["q_valid"] = jnp.asarray(valid)
  return kw, dense, {}


# --- variants ----------------------------------------------------------------------------------

def variants(c, kw, nearest):
  """name -> f(q, k, v, kp, vp, mask, bias) -> o. kp/vp: the cached prefix or None."""
  def cat(kp, k):
    return k if kp is None else jnp.concatenate([kp, k], axis=1)

  def dpa(impl, use_mask=False, use_bias=False, near=False):
    def f(q, k, v, kp, vp, mask, bias):
      return jax.nn.dot_product_attention(q, cat(kp, k), cat(vp, v), bias=bias if use_bias else None,
                                          mask=mask if use_mask else None, implementation=impl,
                                          **(nearest if near else {}))
    return f

  def flashrt(q, k, v, kp, vp, mask, bias):
    return fr.attention(q, k, v, prefix_kv=None if kp is None else (kp, vp), **kw)

  return {"flashrt": flashrt, "cudnn": dpa("cudnn", near=True), "cudnn+mask": dpa("cudnn", use_mask=True),
          "cudnn+bias": dpa("cudnn", use_bias=True), "xla+mask": dpa("xla", use_mask=True)}


def make_sets(c, dense, n):
  b, tq, tp, tk, hq, hkv, d = (c[x] for x in ("b", "tq", "tp", "tk", "hq", "hkv", "d"))
  mask = jnp.asarray(dense[:, None])  # (B, 1, Tq, Tk_total), broadcast over heads
  bias = jnp.where(mask, 0.0, -1e9).astype(BF16)
  sets = []
  for i in range(n):
    ks = jax.random.split(jax.random.key(i), 6)
    r = lambda j, shape: common.random_normal(ks[j], shape, BF16)
    kp, vp = (r(3, (b, tp, hkv, d)), r(4, (b, tp, hkv, d))) if tp else (None, None)
    sets.append((r(0, (b, tq, hq, d)), r(1, (b, tk, hkv, d)), r(2, (b, tk, hkv, d)), kp, vp, mask, bias,
                 r(5, (b, tq, hq, d))))
  return sets


def forward(f):
  return lambda q, k, v, kp, vp, mask, bias, do: f(q, k, v, kp, vp, mask, bias)


def forward_backward(f):
  """The output and the input gradients: without the output XLA would drop forward work (its
  attention's P·V) that a training step does."""
  def run(q, k, v, kp, vp, mask, bias, do):
    if kp is None:
      out, pullback = jax.vjp(lambda q, k, v: f(q, k, v, None, None, mask, bias), q, k, v)
    else:
      out, pullback = jax.vjp(lambda q, k, v, kp, vp: f(q, k, v, kp, vp, mask, bias), q, k, v, kp, vp)
    return out, pullback(do)
  return run


CHAIN_UNROLL = 10  # calls per loop iteration: XLA's while loop costs ~10 us an iteration on the H100


def time_chained(fn, s, iters):
  """Device seconds per call: `iters` calls in one jitted fori_loop, each call's output feeding the
  next call's queries (as flow steps do), so that nothing is hoisted and no dispatch is timed. The
  loop is unrolled CHAIN_UNROLL times so that its own overhead does not count as the op's."""
  def loop(q, *rest):
    return jax.lax.fori_loop(0, iters, lambda i, q: fn(q, *rest).astype(q.dtype), q, unroll=CHAIN_UNROLL)
  run = jax.jit(loop)
  jax.block_until_ready(run(*s))
  samples = []
  for _ in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(run(*s))
    samples.append((time.perf_counter() - t0) / iters)
  return float(np.median(samples))


def temp_bytes(fn, s):
  try:
    m = jax.jit(fn).lower(*s).compile().memory_analysis()
    return None if m is None else int(m.temp_size_in_bytes)
  except Exception:  # noqa: BLE001 (not every backend reports it)
    return None


def short_error(e: Exception) -> str:
  return f"unsupported ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"


# --- one case ----------------------------------------------------------------------------------

def bench_case(name, c, section, smoke):
  b, tq, tp, tk, hq, hkv, d = (c[x] for x in ("b", "tq", "tp", "tk", "hq", "hkv", "d"))
  tkt = tp + tk
  kw, dense, nearest = case_masks(c)
  pairs, dense_pairs = int(dense.sum()), b * tq * tkt
  mult = 1.0 if section == "fwd" else 3.5
  flops, flops_dense = mult * 4 * d * hq * pairs, mult * 4 * d * hq * dense_pairs
  io = 2 * (2 * b * tq * hq * d + 2 * b * tkt * hkv * d)  # q, o, k, v in bf16
  io *= 1 if section == "fwd" else 2  # + do, dq, dk, dv
  floor_s = max(flops / PEAK_FLOPS, io / PEAK_BYTES)
  n_sets = common.copies_for(io, 8)
  sets = make_sets(c, dense, n_sets)
  wrap = forward if section == "fwd" else forward_backward
  row = {"case": name, "shape": dict(c), "visible_pairs": pairs, "dense_pairs": dense_pairs,
         "flops": flops, "flops_dense": flops_dense, "floor_us": floor_s * 1e6, "us": {}, "tflops": {},
         "tflops_dense": {}, "temp_bytes": {}, "errors": {}}
  t2_bytes = b * hq * tq * tkt * 2  # one bf16 (Tq, Tk) tensor, for comparison
  # What flashrt's program should allocate besides its inputs and outputs: for the backward its
  # workspace and the residuals o and lse. A (Tq, Tk) buffer would show up above this bound.
  if section == "fwd":
    expected = 0
  else:
    ws = 16 if jax.devices()[0].platform == "cpu" else raw.bwd_workspace_bytes(b, tq, tkt, hq, hkv, kernel_head_dim(d))
    expected = ws + 2 * b * tq * hq * d + 4 * b * hq * tq
  bound = int(1.25 * expected) + (16 << 20)
  row["t2_bytes"], row["expected_temp_bytes"], row["temp_bound_bytes"] = t2_bytes, expected, bound
  for vname, f in variants(c, kw, nearest).items():
    fn = wrap(f)
    try:
      if not c["train"] and not smoke:
        s = time_chained(lambda q, *rest: fn(q, *rest), sets[0], 200 if tq <= 64 else 50)
      else:
        s = common.time_op(fn, sets, target_s=0.005 if smoke else 0.05)
    except Exception as e:  # noqa: BLE001 (record what the backend rejects)
      row["errors"][vname] = short_error(e)
      print(f"{section} {name} {vname}: {row['errors'][vname]}", flush=True)
      continue
    row["us"][vname] = s * 1e6
    row["tflops"][vname] = flops / s / 1e12
    row["tflops_dense"][vname] = flops_dense / s / 1e12
    row["temp_bytes"][vname] = temp_bytes(fn, sets[0])
  base = row["us"].get("flashrt")
  if base:
    row["floor_fraction"] = floor_s * 1e6 / base
    tb = row["temp_bytes"].get("flashrt")
    row["no_t2_buffer"] = None if tb is None else bool(tb <= bound)
  print(f"{section} {name}: " + ", ".join(
      f"{v} {u:.1f}us ({row['tflops'][v]:.0f} TFLOP/s{'' if not base else f', flashrt {u / base:.2f}x'})"
      for v, u in row["us"].items()), flush=True)
  return row


# --- report ------------------------------------------------------------------------------------

NAMES = ["flashrt", "cudnn", "cudnn+mask", "cudnn+bias", "xla+mask"]


def write_report(results, out_dir):
  md = [f"# Attention benchmarks ({common.device_name()}, jax {jax.__version__})\n\n",
        "Median time per call, Python dispatch excluded (training cases: benchmarks/common.py; inference "
        f"cases: device time per call inside a jitted fori_loop of chained calls, unrolled {CHAIN_UNROLL}x). "
        "TFLOP/s count the *visible* (query, key) pairs only; speed-up = variant time / flashrt time. `cudnn` runs the nearest mask cuDNN "
        "supports natively (none for block-causal / bidirectional, is_causal for causal), not the real one. "
        "floor = max(FLOPs / 989 TFLOP/s, bytes / 3.0 TB/s). temp MiB: XLA's temp allocation of the compiled "
        "program (flashrt: checked to hold no (Tq, Tk) buffer).\n"]
  for section, title in (("fwd", "Forward"), ("bwd", "Forward + backward")):
    rows = [results[section][k] for k in results.get(section, {})]
    if not rows:
      continue
    md.append(f"\n## {title}\n\n")
    table = []
    for r in rows:
      cells = [r["case"]]
      for v in NAMES:
        if v in r["us"]:
          ratio = r["us"][v] / r["us"]["flashrt"] if "flashrt" in r["us"] else float("nan")
          cells.append(f"{r['us'][v]:.1f} µs, {r['tflops'][v]:.0f} TF/s ({ratio:.2f}×)")
        else:
          cells.append(r["errors"].get(v, "-")[:60])
      cells.append(f"{r['floor_us']:.1f} µs ({100 * r.get('floor_fraction', float('nan')):.0f}%)")
      tb = r["temp_bytes"]
      cells.append(" / ".join(f"{(tb.get(v) or 0) / 2**20:.0f}" for v in ("flashrt", "xla+mask")))
      cells.append({True: "yes", False: "NO", None: "n/a"}[r.get("no_t2_buffer")])
      table.append(cells)
    md.append(common.md_table(["case"] + NAMES + ["floor (flashrt % of it)", "temp MiB flashrt / xla",
                                                  "flashrt no T² buffer"], table))
  common.write_results("attention", results, "".join(md), out_dir)
  plot(results, out_dir)


def plot(results, out_dir):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  secs = [s for s in ("fwd", "bwd") if results.get(s)]
  if not secs:
    return
  fig, axes = plt.subplots(len(secs), 1, figsize=(12, 4 * len(secs)), squeeze=False)
  for ax, sec in zip(axes[:, 0], secs):
    rows = list(results[sec].values())
    width = 0.8 / len(NAMES)
    for i, v in enumerate(NAMES):
      ys = [r["us"][v] / r["us"]["flashrt"] if v in r["us"] and "flashrt" in r["us"] else 0 for r in rows]
      ax.bar(np.arange(len(rows)) + i * width, ys, width, label=v)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(rows)) + 0.4, [r["case"] for r in rows], fontsize=8)
    ax.set_ylabel("time / flashrt time")
    ax.set_title(f"{'forward' if sec == 'fwd' else 'forward + backward'} ({common.device_name()})")
    ax.legend(fontsize=7, ncol=5)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "attention.png"), dpi=110)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sections", default="fwd,bwd")
  p.add_argument("--cases", default=",".join(CASES))
  p.add_argument("--smoke", action="store_true", help="tiny shapes, any device (CPU included)")
  p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<gpu>)")
  args = p.parse_args()
  names = [n for n in args.cases.split(",") if n]
  unknown = [n for n in names if n not in CASES]
  if unknown:
    p.error(f"unknown cases {unknown}; choose from {list(CASES)}")
  out_dir = args.out or ("/tmp/flashrt_attention_smoke" if args.smoke else common.results_dir())
  os.makedirs(out_dir, exist_ok=True)
  results = common.read_results("attention", out_dir)  # cases run separately (device-time limits) merge
  failed = []
  for section in args.sections.split(","):
    for name in names:
      c = dict(CASES[name], **(SMOKE[name] if args.smoke else {}))
      if section == "bwd" and not c["train"]:
        continue
      row = bench_case(name, c, section, args.smoke)
      results.setdefault(section, {})[name] = row
      if row.get("no_t2_buffer") is False:
        failed.append(f"{section} {name}")
      write_report(results, out_dir)
  print(f"wrote {out_dir}/attention.{{json,md,png}}")
  if failed:
    raise SystemExit(f"flashrt temp memory exceeds its bound (a (Tq, Tk) buffer?) in: {failed}")


if __name__ == "__main__":
  main()
