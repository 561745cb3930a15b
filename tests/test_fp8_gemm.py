"""fp8_gemm against reference.fp8_gemm on the same quantized inputs (and, reported, against float64
products of the dequantized inputs), over odd M, FP8 format pairs, scale shapes, bias, 3-D inputs
and fast accumulation; its gradient against the reference's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import E4M3, E5M2, normal, np_dequantize, rel_l2

import flashrt_jax
from flashrt_jax import reference

PAIRS = [pytest.param((E4M3, E4M3), id="e4m3xe4m3"), pytest.param((E5M2, E4M3), id="e5m2xe4m3"),
         pytest.param((E4M3, E5M2), id="e4m3xe5m2")]
BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
OUT_DTYPES = [pytest.param(BF16, id="bf16"), pytest.param(F32, id="f32")]
# fp32 output: the CPU kernel accumulates in fp32 exactly as the reference does. Hopper's FP8 tensor
# cores keep about 14 mantissa bits in the accumulator between promotions to fp32, even without
# fast accumulation: rel L2 1.0-1.4e-4 measured on the H100 for K from 64 to 2048.
TOL = {"cpu": {BF16: 1e-2, F32: 1e-5}, "gpu": {BF16: 1e-2, F32: 5e-4}}
# Against float64 products of the same FP8 values only output rounding and accumulation remain, so a
# loose bound suffices; the value is reported, not tuned.
TOL_F64 = {"cpu": {BF16: 2e-2, F32: 1e-4}, "gpu": {BF16: 2e-2, F32: 1e-3}}


def _operands(rng, m, k, n, a_dtype, b_dtype, vector_scales=False, batch=()):
  """Quantized a (*batch, m, k) and b (n, k): current scaling, per row when vector_scales."""
  gran = "row" if vector_scales else "tensor"
  a, sa = flashrt_jax.quantize(normal(rng, batch + (m, k)), dtype=a_dtype, granularity=gran)
  b, sb = flashrt_jax.quantize(normal(rng, (n, k)), dtype=b_dtype, granularity=gran)
  return a, sa, b, sb.reshape(-1) if vector_scales else sb


def _f64_product(a, sa, b, sb, bias=None):
  """(a * sa) @ (b * sb)^T [+ bias] in float64 from the dequantized FP8 operands."""
  sb = np.asarray(sb)
  a64 = np_dequantize(a, sa).astype(np.float64)
  b64 = np_dequantize(b, sb[:, None] if sb.ndim else sb).astype(np.float64)
  out = np.einsum("...k,nk->...n", a64, b64)
  return out if bias is None else out + np.asarray(bias, np.float64)


def _check(platform, case, out, a, sa, b, sb, out_dtype, bias=None, record=None, f64=None):
  ref = reference.fp8_gemm(a, sa, b, sb, out_dtype=out_dtype, bias=bias)
  assert out.dtype == out_dtype and out.shape == ref.shape, f"{case}: got {out.dtype} {out.shape}, want {ref.shape}"
  err, tol = rel_l2(out, ref), TOL[platform][out_dtype]
  assert err <= tol, f"{case}: rel L2 vs reference {err:.2e} > {tol}"
  f64 = _f64_product(a, sa, b, sb, bias) if f64 is None else f64
  err64, tol64 = rel_l2(out, f64), TOL_F64[platform][out_dtype]
  if record is not None:
    record("rel_l2_vs_float64", err64)
  assert err64 <= tol64, f"{case}: rel L2 vs float64 {err64:.2e} > {tol64}"


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("k,n", [(64, 32), (512, 256)], ids=["k64n32", "k512n256"])
@pytest.mark.parametrize("m", [1, 51, 867])
def test_fp8_gemm_matches_reference(platform, rng, record_property, m, k, n, pair, out_dtype):
  case = f"fp8_gemm m={m} k={k} n={n} {pair[0].name}x{pair[1].name} -> {out_dtype.name} on {platform}"
  a, sa, b, sb = _operands(rng, m, k, n, *pair)
  # fp32 output is checked without Hopper's fast accumulation mode (promotion to fp32 every few K steps).
  out = flashrt_jax.fp8_gemm(a, sa, b, sb, out_dtype=out_dtype, fast_accum=out_dtype != jnp.float32)
  _check(platform, case, out, a, sa, b, sb, out_dtype, record=record_property)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("m", [1, 51, 867])
def test_fp8_gemm_vector_scales(platform, rng, record_property, m, pair, out_dtype):
  """a_scale (M, 1) per row of a and b_scale (N,) per row of b (cuBLASLt's outer-vector mode)."""
  case = f"fp8_gemm vector scales m={m} {pair[0].name}x{pair[1].name} -> {out_dtype.name} on {platform}"
  a, sa, b, sb = _operands(rng, m, 256, 128, *pair, vector_scales=True)
  assert sa.shape == (m, 1) and sb.shape == (128,), f"{case}: scales {sa.shape} {sb.shape}"
  out = flashrt_jax.fp8_gemm(a, sa, b, sb, out_dtype=out_dtype, fast_accum=out_dtype != jnp.float32)
  _check(platform, case, out, a, sa, b, sb, out_dtype, record=record_property)


@pytest.mark.parametrize("vector", ["a", "b"])
def test_fp8_gemm_one_vector_scale(platform, rng, vector):
  """One operand scaled per row, the other per tensor: the tensor scale is broadcast to a vector."""
  case = f"fp8_gemm vector scale on {vector} only, on {platform}"
  a, sa, b, sb = _operands(rng, 51, 128, 64, E4M3, E4M3, vector_scales=True)
  if vector == "a":
    sb = jnp.max(sb)
  else:
    sa = jnp.max(sa)
  for out_dtype in (BF16, F32):
    out = flashrt_jax.fp8_gemm(a, sa, b, sb, out_dtype=out_dtype, fast_accum=False)
    _check(platform, f"{case} -> {out_dtype.name}", out, a, sa, b, sb, out_dtype)


@pytest.mark.parametrize("bias_dtype", [jnp.bfloat16, jnp.float32], ids=["bias_bf16", "bias_f32"])
@pytest.mark.parametrize("vector_scales", [False, True], ids=["tensor", "vector"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("m", [1, 51, 867])
def test_fp8_gemm_bias(platform, rng, record_property, m, out_dtype, vector_scales, bias_dtype):
  case = (f"fp8_gemm bias {jnp.dtype(bias_dtype).name} m={m} -> {out_dtype.name} "
          f"{'vector' if vector_scales else 'tensor'} scales on {platform}")
  a, sa, b, sb = _operands(rng, m, 128, 64, E4M3, E4M3, vector_scales=vector_scales)
  bias = normal(rng, (64,), bias_dtype)
  out = flashrt_jax.fp8_gemm(a, sa, b, sb, out_dtype=out_dtype, bias=bias, fast_accum=out_dtype != jnp.float32)
  _check(platform, case, out, a, sa, b, sb, out_dtype, bias=bias, record=record_property)


@pytest.mark.parametrize("vector_scales", [False, True], ids=["tensor", "vector"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_fp8_gemm_3d(platform, rng, out_dtype, vector_scales):
  """a (B, T, K): leading axes flatten into M; a_scale () or (B, T, 1)."""
  case = f"fp8_gemm 3-D a (3, 17, 64) -> {out_dtype.name} {'vector' if vector_scales else 'tensor'} on {platform}"
  a, sa, b, sb = _operands(rng, 17, 64, 48, E4M3, E4M3, vector_scales=vector_scales, batch=(3,))
  out = flashrt_jax.fp8_gemm(a, sa, b, sb, out_dtype=out_dtype, fast_accum=False)
  assert out.shape == (3, 17, 48), f"{case}: shape {out.shape}"
  _check(platform, case, out, a, sa, b, sb, out_dtype)


@pytest.mark.parametrize("fast_accum", [True, False], ids=["fast", "exact"])
@pytest.mark.parametrize("pair", PAIRS)
def test_fp8_gemm_fast_accum(platform, rng, record_property, pair, fast_accum):
  case = f"fp8_gemm fast_accum={fast_accum} {pair[0].name}x{pair[1].name} on {platform}"
  a, sa, b, sb = _operands(rng, 867, 512, 128, *pair)
  out = flashrt_jax.fp8_gemm(a, sa, b, sb, fast_accum=fast_accum)
  _check(platform, case, out, a, sa, b, sb, BF16, record=record_property)


@pytest.mark.parametrize("vector_scales", [False, True], ids=["tensor", "vector"])
@pytest.mark.parametrize("pair", PAIRS)
def test_fp8_gemm_grad_matches_reference(platform, rng, pair, vector_scales):
  case = f"grad fp8_gemm {pair[0].name}x{pair[1].name} {'vector' if vector_scales else 'tensor'} on {platform}"
  a, sa, b, sb = _operands(rng, 51, 64, 32, *pair, vector_scales=vector_scales)
  bias = normal(rng, (32,))
  g = normal(rng, (51, 32))

  def grads(fn):
    def loss(a, sa, b, sb, bias):
      return jnp.sum(fn(a, sa, b, sb, out_dtype=jnp.float32, bias=bias) * g)
    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(a, sa, b, sb, bias)

  ours = grads(lambda *args, **kw: flashrt_jax.fp8_gemm(*args, **kw, fast_accum=False))
  ref = grads(reference.fp8_gemm)
  for name, x, y in zip(("a", "a_scale", "b", "b_scale", "bias"), ours, ref):
    assert x.dtype == y.dtype and x.shape == y.shape, f"{case}: d{name} {x.dtype} {x.shape} vs {y.dtype} {y.shape}"
    assert float(jnp.linalg.norm(y.astype(jnp.float32))) > 0, f"{case}: reference d{name} is zero"
    assert rel_l2(x, y) <= 1e-5, f"{case}: d{name} rel L2 {rel_l2(x, y):.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("vector_scales", [False, True], ids=["tensor", "vector"])
@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("m,k,n", [(4096, 2048, 2048), (4095, 1024, 2048), (1, 2048, 2048)], ids=str)
def test_fp8_gemm_large_gpu(rng, record_property, m, k, n, pair, vector_scales):
  case = f"fp8_gemm (GPU, large) m={m} k={k} n={n} {pair[0].name}x{pair[1].name} vector={vector_scales}"
  with jax.default_device(jax.devices("gpu")[0]):
    a, sa, b, sb = _operands(rng, m, k, n, *pair, vector_scales=vector_scales)
    bias = normal(rng, (n,), jnp.bfloat16)
    f64 = _f64_product(a, sa, b, sb, bias)
    for out_dtype, fast in ((BF16, True), (F32, False)):
      out = flashrt_jax.fp8_gemm(a, sa, b, sb, out_dtype=out_dtype, bias=bias, fast_accum=fast)
      _check("gpu", f"{case} -> {out_dtype.name}", out, a, sa, b, sb, out_dtype, bias=bias,
             record=record_property, f64=f64)
