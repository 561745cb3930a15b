"""Loads the compiled modules, checks their FFI API version and registers every target.

`flashrt_jax._cpu` (always built) holds the C++ reference handlers and `flashrt_jax._cuda` (built when
nvcc and cuBLASLt were found) the CUDA ones; each target is registered under one name for both
platforms, so a jitted function lowers to the same custom call on CPU and GPU.
"""

from __future__ import annotations

import ctypes
import glob
import importlib
import importlib.util
import os
import re

import jax

__all__ = ["cuda_available", "FFI_API_VERSION"]


def _runtime_ffi_api_version() -> tuple[int, int]:
  header = os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")
  with open(header) as f:
    text = f.read()
  major = re.search(r"#define XLA_FFI_API_MAJOR (\d+)", text)
  minor = re.search(r"#define XLA_FFI_API_MINOR (\d+)", text)
  return int(major.group(1)), int(minor.group(1))


def _check_version(module, runtime: tuple[int, int]) -> None:
  compiled = tuple(module.ffi_api_version)
  # XLA runs handlers built against an older minor version of its FFI, never a newer one.
  if compiled[0] != runtime[0] or compiled[1] > runtime[1]:
    raise ImportError(
        f"{module.__name__} was compiled against XLA FFI API {compiled[0]}.{compiled[1]}, but the installed "
        f"jaxlib {jax.__version__} provides {runtime[0]}.{runtime[1]}. Rebuild flashrt_jax against this jaxlib: "
        "pip install --no-build-isolation --force-reinstall --no-deps .")


def _preload_cublaslt() -> None:
  """Loads libcublasLt from the nvidia-cublas wheel so that `_cuda` links against it."""
  try:
    import nvidia
  except ImportError:
    return  # rely on the system library path
  for root in nvidia.__path__:
    for pattern in ("cu13/lib/libcublasLt.so.*", "cublas/lib/libcublasLt.so.*"):
      for path in sorted(glob.glob(os.path.join(root, pattern))):
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        return


def _load():
  runtime = _runtime_ffi_api_version()
  cpu = importlib.import_module("flashrt_jax._cpu")
  _check_version(cpu, runtime)
  modules = {"cpu": cpu}
  if importlib.util.find_spec("flashrt_jax._cuda") is not None:
    _preload_cublaslt()
    cuda = importlib.import_module("flashrt_jax._cuda")
    _check_version(cuda, runtime)
    modules["CUDA"] = cuda
  for platform, module in modules.items():
    for name, capsule in module.registrations().items():
      jax.ffi.register_ffi_target(name, capsule, platform=platform)
  return modules, tuple(cpu.ffi_api_version), int(cpu.gemm_workspace_bytes)


_MODULES, FFI_API_VERSION, GEMM_WORKSPACE_BYTES = _load()


def cuda_available() -> bool:
  """True when the CUDA handlers were built and registered (a GPU may still be absent)."""
  return "CUDA" in _MODULES
