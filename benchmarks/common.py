"""Timing and result files shared by the benchmarks.

Timing excludes Python dispatch: one jitted program applies the op to R distinct input sets (so
nothing is hoisted or cached across repetitions, and small problems rotate through more than L2's
50 MB), it is dispatched back to back several times, and the median over repeats of wall time per op
is reported. Inputs are random, never zeros, and passed as arguments (closed-over arrays would be
constant-folded).

Each call donates the previous call's outputs, so the outputs keep their device addresses from call
to call, as a layer's output inside a jitted model does. Otherwise XLA re-records the custom calls of
its command buffer (CUDA graph) on every call that writes new program outputs: measured on the H100
that adds 30-45 us of host time per flashrt call, which the steady state of a model never pays.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax
import numpy as np

L2_BYTES = 50 << 20


def copies_for(bytes_per_set: int, max_copies: int = 16) -> int:
  """Input sets to rotate through so that they do not all fit in L2 (at least 2)."""
  return int(max(2, min(max_copies, -(-4 * L2_BYTES // max(bytes_per_set, 1)))))


def time_op(fn, input_sets, *, repeats: int = 3, target_s: float = 0.02) -> float:
  """Median seconds per call of fn(*inputs) over the rotated input sets."""
  many = jax.jit(lambda sets, _previous: [fn(*s) for s in sets], donate_argnums=1)
  shapes = jax.eval_shape(lambda sets: [fn(*s) for s in sets], input_sets)
  out = jax.tree.map(lambda a: jax.numpy.zeros(a.shape, a.dtype), shapes)
  out = jax.block_until_ready(many(input_sets, out))  # compile + warm up
  t0 = time.perf_counter()
  out = jax.block_until_ready(many(input_sets, out))
  once = time.perf_counter() - t0
  calls = max(1, int(target_s / max(once, 1e-6)))
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = many(input_sets, out)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / (calls * len(input_sets)))
  return statistics.median(samples)


def device_name() -> str:
  d = jax.devices()[0]
  return d.device_kind if d.platform != "cpu" else f"cpu-{platform.machine()}"


def results_dir(gpu_tag: str | None = None) -> str:
  tag = gpu_tag or ("h100" if "H100" in device_name() else device_name().lower().replace(" ", "_"))
  path = os.path.join(os.path.dirname(__file__), "results", tag)
  os.makedirs(path, exist_ok=True)
  return path


def read_results(name: str, out_dir: str) -> dict:
  """Sections of an earlier run on the same device, so that sections run separately merge."""
  path = os.path.join(out_dir, f"{name}.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    old = json.load(f)
  if old.get("device") != device_name():
    return {}
  return {k: v for k, v in old.items() if k not in ("device", "jax", "time", "xla_flags")}


def write_results(name: str, payload: dict, markdown: str, out_dir: str) -> None:
  payload = {"device": device_name(), "jax": jax.__version__, "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "xla_flags": os.environ.get("XLA_FLAGS", ""), **payload}
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(payload, f, indent=1, default=float)
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write(markdown)


def random_normal(key, shape, dtype, scale=1.0):
  return (jax.random.normal(key, shape, jax.numpy.float32) * scale).astype(dtype)


def md_table(header: list[str], rows: list[list]) -> str:
  fmt = lambda v: f"{v:.3g}" if isinstance(v, (float, np.floating)) else str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def targets_md(rows: list[list], measured: str = "measured") -> str:
  """A "Targets" section of [target, measured, met] rows; empty without rows."""
  return "\n## Targets\n" + md_table(["target", measured, "met"], rows) if rows else ""
