"""The FFI layer: the API version check at import and the registration of every compiled target."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import pytest

import flashrt_jax
from flashrt_jax import _cpu
from flashrt_jax import ffi as fr_ffi


def _module(version):
  return types.SimpleNamespace(__name__="flashrt_jax._fake", ffi_api_version=version)


@pytest.mark.parametrize("compiled,runtime", [((0, 3), (0, 3)), ((0, 1), (0, 3)), ((2, 0), (2, 7))],
                         ids=["same", "older-minor", "older-minor-major2"])
def test_check_version_accepts_same_or_older_minor(compiled, runtime):
  fr_ffi._check_version(_module(compiled), runtime)


@pytest.mark.parametrize("compiled,runtime", [((0, 4), (0, 3)), ((1, 0), (0, 3)), ((0, 3), (1, 3))],
                         ids=["newer-minor", "newer-major", "older-major"])
def test_check_version_rejects_newer_minor_or_other_major(compiled, runtime):
  case = f"_check_version compiled {compiled} vs runtime {runtime}"
  with pytest.raises(ImportError, match="Rebuild flashrt_jax against this jaxlib") as info:
    fr_ffi._check_version(_module(compiled), runtime)
  message = str(info.value)
  for part in ("flashrt_jax._fake", "{}.{}".format(*compiled), "{}.{}".format(*runtime), jax.__version__,
               "pip install --no-build-isolation"):
    assert part in message, f"{case}: the ImportError must mention {part!r}: {message}"


def test_loaded_modules_match_runtime():
  runtime = fr_ffi._runtime_ffi_api_version()
  assert fr_ffi.FFI_API_VERSION == tuple(_cpu.ffi_api_version), "FFI_API_VERSION must be the _cpu module's"
  for platform, module in fr_ffi._MODULES.items():
    fr_ffi._check_version(module, runtime)
    assert tuple(module.ffi_api_version)[0] == runtime[0], f"{platform} module built for FFI {module.ffi_api_version}"
  assert fr_ffi.GEMM_WORKSPACE_BYTES == _cpu.gemm_workspace_bytes > 0, "GEMM workspace size must come from _cpu"


def test_cpu_and_cuda_register_the_same_targets():
  names = set(_cpu.registrations())
  assert names and all(n.startswith("flashrt_") for n in names), f"targets must carry the flashrt_ prefix: {names}"
  if flashrt_jax.cuda_available():
    cuda = set(fr_ffi._MODULES["CUDA"].registrations())
    assert cuda == names, f"CUDA targets {sorted(cuda)} differ from CPU targets {sorted(names)}"


def test_load_registers_every_target_on_every_platform(monkeypatch):
  registered = []
  monkeypatch.setattr(jax.ffi, "register_ffi_target",
                      lambda name, capsule, platform: registered.append((name, platform)))
  modules, version, _ = fr_ffi._load()
  expected = {(name, platform) for platform, module in modules.items() for name in module.registrations()}
  assert len(registered) == len(expected) and set(registered) == expected, \
      f"_load registered {sorted(registered)}, want {sorted(expected)}"
  assert version == tuple(_cpu.ffi_api_version), "_load must report the _cpu module's FFI API version"


def _compiles(name, platform):
  """Whether XLA finds a handler for `name` when compiling for `platform` (the handler is not run)."""
  x = jax.device_put(jnp.ones((4, 16), jnp.float32), jax.devices(platform)[0])
  call = jax.jit(lambda x: jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((4, 16), jnp.float32))(x))
  try:
    call.lower(x).compile()
  except Exception as e:  # XlaRuntimeError on jaxlib 0.5, JaxRuntimeError later
    if "flashrt_" in str(e) and ("No FFI handler" in str(e) or "No registered implementation" in str(e)):
      return False
    raise
  return True


@pytest.mark.parametrize("name", sorted(_cpu.registrations()))
def test_target_is_registered_with_xla(platform, name):
  assert _compiles(name, platform), f"{name} has no handler registered for {platform}"


def test_unknown_target_is_not_registered(platform):
  assert not _compiles("flashrt_no_such_target", platform), "the registration check must be able to fail"
