"""Host overhead of flashrt custom calls under XLA command buffers (CUDA graphs).

Per-op wall time of a jitted program of 8 calls whose outputs are either returned from the program
(new output buffers every call) or consumed inside it (a slice summed, as a layer's output is used
inside a model), for XLA BF16, fp8_dense on an FP8 activation and a frozen per-token fp8_dense.
(XLA may narrow its own dot to the summed slice; a custom call always runs whole.)
The XLA flags are read from the environment; results/h100/command_buffers.log holds the run of

    for f in "" "--xla_gpu_enable_command_buffer=" \
             "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUDNN" "--xla_gpu_graph_min_graph_size=1000"; do
      XLA_FLAGS="$f" python benchmarks/command_buffers.py
    done
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import flashrt_jax as fr  # noqa: E402

ALWAYS = fr.Fp8Recipe(min_rows=0)


def wall(fn, sets, consume):
  """Median wall µs per op over 5 samples of 50 back-to-back dispatches."""
  if consume:
    many = jax.jit(lambda s: sum(jnp.sum(fn(*a)[:1].astype(jnp.float32)) for a in s))
  else:
    many = jax.jit(lambda s: [fn(*a) for a in s])
  jax.block_until_ready(many(sets))
  jax.block_until_ready(many(sets))
  res = []
  for _ in range(5):
    t0 = time.perf_counter()
    out = [many(sets) for _ in range(50)]
    jax.block_until_ready(out)
    res.append((time.perf_counter() - t0) / (50 * len(sets)) * 1e6)
  return statistics.median(res)


def main():
  tag = os.environ.get("XLA_FLAGS", "default")
  for m, k, n in [(200, 4096, 1024), (968, 2048, 2048)]:
    sets = [(common.random_normal(jax.random.key(i), (m, k), jnp.bfloat16),
             common.random_normal(jax.random.key(100 + i), (k, n), jnp.bfloat16, 0.02)) for i in range(8)]
    frozen = [(x, fr.Fp8Weight.from_kernel(w)) for x, w in sets]
    fp8_input = [(fr.Fp8Activation(*fr.quantize(x, granularity="row")), w) for x, w in frozen]
    for name, fn, s in [("xla bf16", lambda x, w: x @ w, sets),
                        ("fp8 input", lambda x, w: fr.fp8_dense(x, w), fp8_input),
                        ("frozen row", lambda x, w: fr.fp8_dense(x, w, recipe=ALWAYS), frozen)]:
      print(f"{tag:60s} {m}x{k}x{n} {name:12s} returned {wall(fn, s, False):6.1f} us  "
            f"consumed {wall(fn, s, True):6.1f} us", flush=True)


if __name__ == "__main__":
  main()
