"""The main job: train a small Flax MLP whose matmuls run as flashrt_jax FP8 GEMMs, then freeze its
weights to FP8 (1 byte per parameter) and serve it, on CPU or GPU.

    python training/train_fp8_mlp.py [--steps 150] [--width 128] [--batch 256]

Prints the loss curve, the FP8 model's error against the same model in float32, the frozen
model's weight bytes, and whether the compiled step really calls the flashrt custom calls.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import flashrt_jax as fr
from flashrt_jax.linen import Fp8Dense

# The demo's matrices are small; min_rows=0 keeps every matmul on the FP8 path to show it working.
RECIPE = fr.Fp8Recipe(min_rows=0)


class Mlp(nn.Module):
  width: int
  frozen: bool = False
  fp8: bool = True

  @nn.compact
  def __call__(self, x):
    dense = (lambda n, name: Fp8Dense(n, recipe=RECIPE, frozen=self.frozen, dtype=jnp.bfloat16, name=name)) \
        if self.fp8 else (lambda n, name: nn.Dense(n, dtype=jnp.bfloat16, name=name))
    h = nn.gelu(dense(self.width * 4, "up")(x))
    return dense(self.width, "down")(h).astype(jnp.float32)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--batch", type=int, default=256)
  args = p.parse_args()
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, CUDA handlers: {fr.cuda_available()}")

  # A fixed random teacher maps x to y; the FP8 student learns it.
  rng = np.random.default_rng(0)
  teacher = rng.normal(size=(args.width, args.width)).astype(np.float32) / np.sqrt(args.width)
  def batch(i):
    x = np.random.default_rng(i).normal(size=(args.batch, args.width)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(np.tanh(x @ teacher))

  model = Mlp(args.width)
  params = model.init(jax.random.key(0), batch(0)[0])
  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((model.apply(p, x) - y) ** 2))(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  hlo = step.lower(params, state, *batch(0)).compile().as_text()
  targets = sorted({t for t in ("flashrt_quantize_current", "flashrt_quantize_transpose_current", "flashrt_fp8_gemm",
                                "flashrt_fp8_gemm_bias") if f'"{t}"' in hlo})
  print(f"custom calls in the compiled train step: {targets}")
  t0 = time.perf_counter()
  for i in range(args.steps):
    params, state, loss = step(params, state, *batch(i + 1))
    if i % max(1, args.steps // 8) == 0 or i == args.steps - 1:
      print(f"step {i:4d}  loss {float(loss):.5f}")
  print(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s")

  # Serve: quantize the trained kernels once; the frozen model holds FP8 kernels only.
  x, y = batch(10_000)
  frozen_params = fr.quantize_params(params)
  frozen = Mlp(args.width, frozen=True)
  y_fp8 = jax.jit(frozen.apply)(frozen_params, x)
  y_f32 = Mlp(args.width, fp8=False).apply(params, x)
  kernel_bytes = sum(v.nbytes for path, v in jax.tree_util.tree_leaves_with_path(frozen_params)
                     if jax.tree_util.keystr(path).endswith("['kernel']"))
  n_weights = sum(v.size for path, v in jax.tree_util.tree_leaves_with_path(params)
                  if jax.tree_util.keystr(path).endswith("['kernel']"))
  rel = float(jnp.linalg.norm(y_fp8 - y_f32) / jnp.linalg.norm(y_f32))
  print(f"frozen FP8 model: {kernel_bytes / n_weights:.2f} bytes per weight; "
        f"error vs the same weights in float: {rel:.3f}; held-out loss {float(jnp.mean((y_fp8 - y) ** 2)):.5f}")
  if not targets or float(loss) > 0.5 * float(jnp.mean(y ** 2)):
    raise SystemExit("FP8 training did not run or did not learn")


if __name__ == "__main__":
  main()
