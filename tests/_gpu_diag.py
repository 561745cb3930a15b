import os, re, sys, zlib; sys.path.insert(0, "tests")
import jax, jax.numpy as jnp, numpy as np
from conftest import normal, rel_l2, np_quantize, fp8_mismatch, E4M3
import flashrt_jax as fr
from flashrt_jax import Fp8Weight, reference
BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
gpu, cpu = jax.devices("gpu")[0], jax.devices("cpu")[0]
with jax.default_device(gpu):
  rng = np.random.default_rng(zlib.crc32(b"tests/test_fp8_dense.py::test_fp8_dense_frozen_forward[gpu-1-k256n128-tensor-tensor]"))
  m, k, n = 1, 256, 128
  x, kernel, bias = normal(rng, (m, k), BF16), normal(rng, (k, n), std=k ** -0.5), normal(rng, (n,))
  w = Fp8Weight.from_kernel(kernel, "tensor")
  qn, sn = np_quantize(x, E4M3)
  for name, f in (("eager", reference.quantize), ("jit", jax.jit(reference.quantize))):
    q, s = f(x)
    print(name, "ref quantize scale", np.asarray(s), sn, "q:", fp8_mismatch(q, qn) or "equal")
  q, s = fr.quantize(x)
  print("fr quantize", np.asarray(s), fp8_mismatch(q, qn) or "equal")
  ref = reference.fp8_dense_frozen(x, w.data, w.scale, bias)
  ref_cpu = reference.fp8_dense_frozen(*jax.device_put((x, w.data, w.scale, bias), cpu))
  y = fr.fp8_dense(x, w, bias, recipe=fr.Fp8Recipe(min_rows=0))
  print("dense vs ref gpu", rel_l2(y, ref), "vs ref cpu", rel_l2(y, ref_cpu), "ref gpu vs cpu", rel_l2(ref, ref_cpu))
  r2 = reference.fp8_gemm(q, s, w.data, w.scale, out_dtype=BF16, bias=bias)
  print("ref gemm on fr-quantized", rel_l2(y, r2), rel_l2(ref, r2))
  for xx in (x, x.astype(F32)):
    a = reference.amax(xx); print("amax", np.asarray(a), np.max(np.abs(np.asarray(xx, np.float32))), xx.dtype)
    print("scale_from_amax", np.asarray(reference.scale_from_amax(a, E4M3)), np.asarray(jax.jit(reference.scale_from_amax, static_argnums=1)(a, E4M3)))
