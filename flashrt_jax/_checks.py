"""Trace-time input checks shared by the public ops: each error names the op, the argument, and the
expected versus the given shape, dtype or value."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


def _names(dtypes) -> str:
  return " or ".join(str(d) for d in dtypes)


def array(op: str, name: str, x, dtypes, *, min_rank: int = 1, rank: int | None = None):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{op}: {name} must be an array, got {type(x).__name__}")
  if jnp.dtype(x.dtype) not in dtypes:
    raise TypeError(f"{op}: {name} must be {_names(dtypes)}, got {x.dtype}")
  if rank is not None and x.ndim != rank:
    raise ValueError(f"{op}: {name} must have rank {rank}, got shape {x.shape}")
  if x.ndim < min_rank:
    raise ValueError(f"{op}: {name} must have rank >= {min_rank}, got shape {x.shape}")
  if x.size == 0:
    raise ValueError(f"{op}: {name} must not be empty, got shape {x.shape}")


def scale(op: str, name: str, s, shapes: tuple[tuple[int, ...], ...]):
  """A float32 scale of one of `shapes`; when its value is known at trace time, finite and > 0."""
  if not hasattr(s, "shape") or not hasattr(s, "dtype"):
    raise TypeError(f"{op}: {name} must be a float32 array, got {type(s).__name__}")
  if jnp.dtype(s.dtype) != jnp.float32:
    raise TypeError(f"{op}: {name} must be float32, got {s.dtype}")
  if tuple(s.shape) not in shapes:
    raise ValueError(f"{op}: {name} must have shape {' or '.join(map(str, shapes))}, got {tuple(s.shape)}")
  if not isinstance(s, jax.core.Tracer):
    v = np.asarray(s)
    if not np.all(np.isfinite(v)) or np.any(v <= 0):
      raise ValueError(f"{op}: {name} must be finite and > 0, got {v if v.size <= 8 else v.ravel()[:8]}")


def delayed_scaling(op: str, name: str, state, granularity):
  """A DelayedScaling `state`: its history a non-empty 1-D float32 array, its scale a valid () scale;
  per tensor, so no granularity="row"."""
  array(op, f"{name}.amax_history", state.amax_history, (jnp.dtype(jnp.float32),), rank=1)
  scale(op, f"{name}.scale", state.scale, ((),))
  if granularity == "row":
    raise ValueError(f"{op}: granularity='row' cannot take a DelayedScaling {name}: delayed scaling is per tensor")


def dtype(op: str, name: str, value, allowed) -> np.dtype:
  """`value` as a dtype, one of `allowed`; anything else (None, an unknown name) is a ValueError."""
  try:
    d = None if value is None else jnp.dtype(value)
  except (TypeError, ValueError):
    d = None
  if d is None or d not in allowed:
    raise ValueError(f"{op}: {name} must be {_names(allowed)}, got {value!r}")
  return d


def boolean(op: str, name: str, value) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{op}: {name} must be a bool, got {value!r}")
  return bool(value)


def choice(op: str, name: str, value, allowed):
  if value not in allowed:
    raise ValueError(f"{op}: {name} must be one of {allowed}, got {value!r}")
