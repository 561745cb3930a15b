"""Per-kernel device time of fp8_dense against XLA's BF16 dot, from a jax.profiler trace.

    python benchmarks/profile_kernels.py [M,K,N ...]
    python benchmarks/profile_kernels.py decode   # pi0.5 action-expert attention against a cached prefix
    python benchmarks/profile_kernels.py train    # pi0.5 training attention (B 32), forward + backward

For each shape prints wall time per call (common.time_op: thunk overhead included) next to the
summed GPU kernel time per call, and the kernels that make it up: it tells launch- or host-bound
shapes from device-bound ones, and which kernel to work on.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import flashrt_jax as fr  # noqa: E402

ALWAYS_FP8 = fr.Fp8Recipe(min_rows=0)
FROZEN_TENSOR = fr.Fp8Recipe(min_rows=0, granularity="tensor")


def profile(fn, sets, tag, top=8):
  many = jax.jit(lambda s: [fn(*a) for a in s])
  jax.block_until_ready(many(sets))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      out = [many(sets) for _ in range(3)]
      jax.block_until_ready(out)
    events = json.load(gzip.open(sorted(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True))[-1]))["traceEvents"]
  names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  total, count = collections.defaultdict(float), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "/device:GPU" in names.get(e["pid"], ""):
      total[e["name"][:70]] += e["dur"]
      count[e["name"][:70]] += 1
  calls = 3 * len(sets)
  wall = common.time_op(fn, sets) * 1e6
  print(f"== {tag}: wall {wall:.1f} us/call, GPU kernels {sum(total.values()) / calls:.1f} us/call")
  for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
    print(f"   {us / calls:8.2f} us  x{count[name] / calls:.0f}  {name}")


def decode():
  """One flow step's attention at B = 1: 50 action queries x 8 heads against a cached 968-token
  prefix (one KV head, D 256) plus their own 50 keys, block-causal as in pi0.5."""
  b, tp, t, hq, d = 1, 968, 50, 8, 256
  key = lambda i: jax.random.key(i)
  sets = []
  for i in range(8):
    q = common.random_normal(key(10 * i), (b, t, hq, d), jnp.bfloat16)
    k, v = (common.random_normal(key(10 * i + j), (b, t, 1, d), jnp.bfloat16) for j in (1, 2))
    kp, vp = (common.random_normal(key(10 * i + j), (b, tp, 1, d), jnp.bfloat16) for j in (3, 4))
    sets.append((q, k, v, kp, vp))
  q_ids = jnp.ones((b, t), jnp.int32)
  k_ids = jnp.concatenate([jnp.zeros((b, tp), jnp.int32), jnp.ones((b, t), jnp.int32)], axis=1)
  fn = lambda q, k, v, kp, vp: fr.attention(q, k, v, prefix_kv=(kp, vp), q_block_ids=q_ids, k_block_ids=k_ids)
  profile(fn, sets, "flashrt attention decode 50 queries x 8 heads vs 968 + 50 keys, D 256")


def train():
  """pi0.5 training attention as in benchmarks/attention.py's pi05_train_b32: forward + backward."""
  import attention as bench  # benchmarks/attention.py

  c = bench.CASES["pi05_train_b32"]
  kw, _, _ = bench.case_masks(c)
  sets = [(q, k, v, do) for q, k, v, _, _, _, _, do in bench.make_sets(c, np.zeros((1, 1, 1), bool), 2)]
  fn = lambda q, k, v, do: jax.vjp(lambda q, k, v: fr.attention(q, k, v, **kw), q, k, v)[1](do)
  profile(fn, sets, "flashrt attention pi0.5 B 32 T 1018 8:1 D 256, forward + backward")


def main():
  if sys.argv[1:] == ["decode"]:
    return decode()
  if sys.argv[1:] == ["train"]:
    return train()
  shapes = [tuple(int(v) for v in s.split(",")) for s in sys.argv[1:]] or [(50, 1024, 4096), (968, 2048, 2048),
                                                                          (30976, 2048, 2048)]
  for m, k, n in shapes:
    sets = [(common.random_normal(jax.random.key(i), (m, k), jnp.bfloat16),
             common.random_normal(jax.random.key(100 + i), (k, n), jnp.bfloat16, 0.02))
            for i in range(common.copies_for(2 * (m * k + k * n + m * n), 8))]
    frozen = [(x, fr.Fp8Weight.from_kernel(w)) for x, w in sets]
    fp8_input = [(fr.Fp8Activation(*fr.quantize(x, granularity="row")), w) for x, w in frozen]
    profile(lambda x, w: x @ w, sets, f"xla bf16 {m}x{k}x{n}")
    profile(lambda x, w: fr.fp8_dense(x, w, recipe=ALWAYS_FP8), frozen, f"fp8 frozen (per token) {m}x{k}x{n}")
    profile(lambda x, w: fr.fp8_dense(x, w, recipe=FROZEN_TENSOR), frozen, f"fp8 frozen (per tensor) {m}x{k}x{n}")
    profile(lambda x, w: fr.fp8_dense(x, w), fp8_input, f"fp8 frozen, FP8 input (per token) {m}x{k}x{n}")
    profile(lambda x, w: fr.fp8_dense(x, w, recipe=ALWAYS_FP8), sets, f"fp8 trainable {m}x{k}x{n}")


if __name__ == "__main__":
  main()
