"""Shared test fixtures and helpers: the per-platform fixture, GPU skipping, a seeded generator per
test, the numpy quantization oracle, error metrics and bitwise FP8 comparison.

Helpers are imported by the test modules with `from conftest import ...` (pytest puts tests/ on
sys.path because it has no __init__.py).
"""

from __future__ import annotations

import functools
import re
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

E4M3 = jnp.dtype(jnp.float8_e4m3fn)
E5M2 = jnp.dtype(jnp.float8_e5m2)
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
ML_DTYPES = {E4M3: ml_dtypes.float8_e4m3fn, E5M2: ml_dtypes.float8_e5m2}
AMAX_FLOOR = np.float32(1e-12)


@functools.lru_cache(maxsize=None)
def gpu_available() -> bool:
  try:
    return len(jax.devices("gpu")) > 0
  except RuntimeError:
    return False


def pytest_runtest_setup(item):
  if item.get_closest_marker("gpu") is not None and not gpu_available():
    pytest.skip("needs a CUDA GPU: jax.devices('gpu') found none")


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def platform(request):
  """Runs the test once per platform: the device is the default for new arrays and computations,
  and `put` commits inputs to it."""
  with jax.default_device(jax.devices(request.param)[0]):
    yield request.param


def put(platform: str, tree):
  """Commits every array of `tree` to the first device of `platform`."""
  return jax.device_put(tree, jax.devices(platform)[0])


def on_cpu(fn, *args, **kwargs):
  """fn(*args, **kwargs) evaluated on the CPU. The reference's quantization is bit-exact only where
  XLA divides float32 correctly rounded, which XLA:GPU does not (it lowers to div.full)."""
  cpu = jax.devices("cpu")[0]
  move = lambda a: jax.device_put(a, cpu) if isinstance(a, (jax.Array, np.ndarray)) else a
  with jax.default_device(cpu):
    return fn(*jax.tree_util.tree_map(move, args), **kwargs)


@pytest.fixture
def rng(request):
  """A numpy generator seeded from the test id: fresh, different data per test and reproducible."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def normal(rng, shape, dtype=jnp.float32, std: float = 1.0):
  """Standard normal data (scaled by std) cast to dtype, as a jax array on the default device."""
  return jnp.asarray((rng.standard_normal(shape) * std).astype(np.float32)).astype(dtype)


def wide(rng, shape, dtype=jnp.float32):
  """Normal data times exp(U(-6, 6)): magnitudes over ~5 decades, so quantization meets subnormal
  FP8 values, exact ties and values that round to zero."""
  x = rng.standard_normal(shape) * np.exp(rng.uniform(-6.0, 6.0, shape))
  return jnp.asarray(x.astype(np.float32)).astype(dtype)


def np_quantize(x, dtype, scale=None, rowwise: bool = False):
  """The numpy oracle of FP8 quantization, independent of JAX's converts:
  scale = max(amax, 1e-12) / fp8_max in float32 (NaN and inf kept), q = ml_dtypes cast of
  clip(x * (1 / scale), -max, max). Returns (q as ml_dtypes FP8, scale as float32)."""
  dtype = jnp.dtype(dtype)
  fmax = np.float32(FP8_MAX[dtype])
  xf = np.asarray(x).astype(np.float32)
  if scale is None:
    amax = np.max(np.abs(xf), axis=-1, keepdims=True) if rowwise else np.max(np.abs(xf))
    amax = np.asarray(amax, np.float32)
    floored = np.where(np.isnan(amax) | (amax > AMAX_FLOOR), amax, AMAX_FLOOR).astype(np.float32)
    scale = (floored / fmax).astype(np.float32)
  scale = np.asarray(scale, np.float32)
  inv = (np.float32(1.0) / scale).astype(np.float32)
  with np.errstate(invalid="ignore"):
    q = np.clip(xf * inv, -fmax, fmax).astype(ML_DTYPES[dtype])
  return q, scale


def np_dequantize(q, scale):
  return np.asarray(q).astype(np.float32) * np.asarray(scale, np.float32)


def rel_l2(out, ref) -> float:
  """||out - ref|| / ||ref|| in float64."""
  out = np.asarray(jnp.asarray(out).astype(jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref).astype(jnp.float32), np.float64)
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def fp8_mismatch(a, b) -> str:
  """'' when two FP8 arrays are bitwise equal, with every NaN pattern counted as equal to every
  other; else a description of the first differences."""
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape or a.dtype != b.dtype:
    return f"shape/dtype {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
  a_nan, b_nan = np.isnan(a.astype(np.float32)), np.isnan(b.astype(np.float32))
  bad = (a_nan != b_nan) | (~a_nan & ~b_nan & (a.view(np.uint8) != b.view(np.uint8)))
  if not bad.any():
    return ""
  idx = np.argwhere(bad)[:4]
  pairs = ", ".join(f"{tuple(int(j) for j in i)}: {a[tuple(i)]} vs {b[tuple(i)]}" for i in idx)
  return f"{int(bad.sum())} of {bad.size} differ ({pairs})"


def assert_fp8_equal(a, b, what: str):
  diff = fp8_mismatch(a, b)
  assert not diff, f"{what}: {diff}"


def assert_bits_equal(a, b, what: str):
  """Bitwise equality of float arrays of one dtype (NaN patterns equal)."""
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
  a_nan, b_nan = np.isnan(a.astype(np.float32)), np.isnan(b.astype(np.float32))
  width = {1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
  bad = (a_nan != b_nan) | (~a_nan & (a.view(width) != b.view(width)))
  assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.size} differ, first at {np.argwhere(bad)[0]}"


_TARGET = re.compile(r'custom_call_target="(flashrt_[a-z0-9_]+)"')


def flashrt_targets(fn, *args, compiled: bool = True) -> set[str]:
  """The flashrt_ custom-call targets in the (compiled, else lowered) HLO of jit(fn)(*args)."""
  lowered = jax.jit(fn).lower(*args)
  text = lowered.compile().as_text() if compiled else lowered.as_text(dialect="hlo")
  return set(_TARGET.findall(text))
