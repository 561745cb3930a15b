"""Bad input: every public op rejects wrong dtypes, ranks, shapes, scales, empty arrays and bad option
values at trace time with a TypeError/ValueError naming the op and the argument; the C++ handlers
re-check what reaches them and return an error instead of crashing."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal

from flashrt_jax import (DelayedScaling, Fp8Recipe, Fp8Weight, delayed_scaling, dequantize, fp8_dense, fp8_gemm,
                         quantize, quantize_transpose)
from flashrt_jax.ffi import gemm as raw_gemm
from flashrt_jax.ffi import quant as raw_quant

E4M3, E5M2 = jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2)
BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)


@dataclasses.dataclass
class Inputs:
  """Valid inputs of every op; each case breaks one thing."""
  x: jax.Array        # (51, 64) bf16
  q: jax.Array        # (51, 64) e4m3, with scale s ()
  s: jax.Array
  s_row: jax.Array    # (51, 1)
  b: jax.Array        # (32, 64) e4m3, with scale sb ()
  sb: jax.Array
  w: jax.Array        # (64, 32) f32 kernel
  fw: Fp8Weight       # the same kernel, frozen
  bias: jax.Array     # (32,) f32


@pytest.fixture
def inp(rng):
  x = normal(rng, (51, 64), BF16)
  q, s = quantize(x)
  _, s_row = quantize(x, granularity="row")
  b, sb = quantize(normal(rng, (32, 64)))
  w = normal(rng, (64, 32), std=0.125)
  return Inputs(x, q, s, s_row, b, sb, w, Fp8Weight.from_kernel(w), normal(rng, (32,)))


def case(name, call, error, match):
  return pytest.param(call, error, match, id=name)


def bad_scales(op, arg, call):
  """A scale that is no array, of a wrong dtype, zero, negative, NaN or inf: `call(inputs, scale)`."""
  return [
      case(f"{op}-{arg}-pyfloat", lambda i: call(i, 0.5), TypeError, rf"{op}: {arg} must be a float32 array"),
      case(f"{op}-{arg}-bf16", lambda i: call(i, jnp.bfloat16(0.5)), TypeError, rf"{op}: {arg} must be float32"),
      case(f"{op}-{arg}-f64", lambda i: call(i, np.float64(0.5)), TypeError, rf"{op}: {arg} must be float32"),
  ] + [
      case(f"{op}-{arg}-{v}", lambda i, v=v: call(i, jnp.float32(v)), ValueError,
           rf"{op}: {arg} must be finite and > 0") for v in (0.0, -1.0, np.nan, np.inf)
  ]


def bad_states(op, call):
  """A DelayedScaling `scale` with a bad history or scale: `call(inputs, state)`."""
  state = delayed_scaling(4)
  return [
      case(f"{op}-state-history-list", lambda i: call(i, state._replace(amax_history=[0.0])), TypeError,
           rf"{op}: scale.amax_history must be an array, got list"),
      case(f"{op}-state-history-bf16", lambda i: call(i, state._replace(amax_history=jnp.zeros((4,), BF16))),
           TypeError, rf"{op}: scale.amax_history must be float32, got bfloat16"),
      case(f"{op}-state-history-rank2", lambda i: call(i, state._replace(amax_history=jnp.zeros((4, 1), F32))),
           ValueError, rf"{op}: scale.amax_history must have rank 1, got shape \(4, 1\)"),
      case(f"{op}-state-history-empty", lambda i: call(i, state._replace(amax_history=jnp.zeros((0,), F32))),
           ValueError, rf"{op}: scale.amax_history must not be empty"),
      case(f"{op}-state-scale-shape", lambda i: call(i, state._replace(scale=jnp.ones((1,), F32))), ValueError,
           rf"{op}: scale.scale must have shape \(\), got \(1,\)"),
      case(f"{op}-state-scale-f16", lambda i: call(i, state._replace(scale=jnp.float16(1))), TypeError,
           rf"{op}: scale.scale must be float32, got float16"),
      case(f"{op}-state-scale-zero", lambda i: call(i, state._replace(scale=jnp.float32(0))), ValueError,
           rf"{op}: scale.scale must be finite and > 0"),
  ]


QUANTIZE = [
    case("quantize-x-int32", lambda i: quantize(i.x.astype(jnp.int32)), TypeError, r"quantize: x must be float32"),
    case("quantize-x-fp8", lambda i: quantize(i.q), TypeError, r"quantize: x must be float32"),
    case("quantize-x-list", lambda i: quantize([[1.0, 2.0]]), TypeError, r"quantize: x must be an array"),
    case("quantize-x-rank0", lambda i: quantize(i.x[0, 0]), ValueError, r"quantize: x must have rank >= 1"),
    case("quantize-x-empty-rows", lambda i: quantize(i.x[:0]), ValueError, r"quantize: x must not be empty"),
    case("quantize-x-empty-cols", lambda i: quantize(i.x[:, :0]), ValueError, r"quantize: x must not be empty"),
    case("quantize-dtype-int8", lambda i: quantize(i.x, dtype=jnp.int8), ValueError, r"quantize: dtype must be float8"),
    case("quantize-dtype-name", lambda i: quantize(i.x, dtype="fp8"), ValueError, r"quantize: dtype must be float8"),
    case("quantize-dtype-bf16", lambda i: quantize(i.x, dtype=jnp.bfloat16), ValueError, r"quantize: dtype"),
    case("quantize-granularity", lambda i: quantize(i.x, granularity="channel"), ValueError,
         r"quantize: granularity must be one of"),
    case("quantize-scale-shape", lambda i: quantize(i.x, scale=jnp.ones((2,), F32)), ValueError,
         r"quantize: scale must have shape"),
    case("quantize-scale-rows", lambda i: quantize(i.x, scale=i.s_row[:50]), ValueError,
         r"quantize: scale must have shape \(\) or \(51, 1\), got \(50, 1\)"),
    case("quantize-scale-row-zero", lambda i: quantize(i.x, scale=i.s_row.at[7].set(0.0)), ValueError,
         r"quantize: scale must be finite and > 0"),
    *bad_scales("quantize", "scale", lambda i, s: quantize(i.x, scale=s)),
    *bad_states("quantize", lambda i, s: quantize(i.x, scale=s)),
    case("quantize-state-row", lambda i: quantize(i.x, scale=delayed_scaling(), granularity="row"), ValueError,
         r"quantize: granularity='row' cannot take a DelayedScaling scale: delayed scaling is per tensor"),
    case("delayed_scaling-zero", lambda i: delayed_scaling(0), ValueError,
         r"delayed_scaling: history_len must be an int >= 1, got 0"),
    case("delayed_scaling-float", lambda i: delayed_scaling(4.0), ValueError,
         r"delayed_scaling: history_len must be an int >= 1, got 4.0"),
    case("quantize-state-as-tuple", lambda i: quantize(i.x, scale=tuple(DelayedScaling(i.s[None], i.s))),
         TypeError, r"quantize: scale must be a float32 array, got tuple"),
]

QUANTIZE_TRANSPOSE = [
    case("quantize_transpose-x-int8", lambda i: quantize_transpose(i.x.astype(jnp.int8)), TypeError,
         r"quantize_transpose: x must be float32"),
    case("quantize_transpose-x-rank3", lambda i: quantize_transpose(i.x[None]), ValueError,
         r"quantize_transpose: x must have rank 2"),
    case("quantize_transpose-x-rank1", lambda i: quantize_transpose(i.x[0]), ValueError,
         r"quantize_transpose: x must have rank 2"),
    case("quantize_transpose-x-empty", lambda i: quantize_transpose(i.x[:0]), ValueError,
         r"quantize_transpose: x must not be empty"),
    case("quantize_transpose-dtype", lambda i: quantize_transpose(i.x, dtype=jnp.float16), ValueError,
         r"quantize_transpose: dtype must be float8"),
    case("quantize_transpose-scale-row", lambda i: quantize_transpose(i.x, scale=i.s_row), ValueError,
         r"quantize_transpose: scale must have shape \(\)"),
    *bad_scales("quantize_transpose", "scale", lambda i, s: quantize_transpose(i.x, scale=s)),
    *bad_states("quantize_transpose", lambda i, s: quantize_transpose(i.x, scale=s)),
]

DEQUANTIZE = [
    case("dequantize-q-bf16", lambda i: dequantize(i.x, i.s), TypeError, r"dequantize: q must be float8"),
    case("dequantize-q-rank0", lambda i: dequantize(i.q[0, 0], i.s), ValueError, r"dequantize: q must have rank >= 1"),
    case("dequantize-q-empty", lambda i: dequantize(i.q[:0], i.s), ValueError, r"dequantize: q must not be empty"),
    case("dequantize-scale-shape", lambda i: dequantize(i.q, i.s_row[:50]), ValueError,
         r"dequantize: scale must have shape"),
    case("dequantize-dtype-int8", lambda i: dequantize(i.q, i.s, jnp.int8), ValueError,
         r"dequantize: dtype must be float32"),
    case("dequantize-dtype-name", lambda i: dequantize(i.q, i.s, "half-ish"), ValueError, r"dequantize: dtype"),
    *bad_scales("dequantize", "scale", lambda i, s: dequantize(i.q, s)),
]

FP8_GEMM = [
    case("fp8_gemm-a-bf16", lambda i: fp8_gemm(i.x, i.s, i.b, i.sb), TypeError, r"fp8_gemm: a must be float8"),
    case("fp8_gemm-b-bf16", lambda i: fp8_gemm(i.q, i.s, i.b.astype(BF16), i.sb), TypeError,
         r"fp8_gemm: b must be float8"),
    case("fp8_gemm-both-e5m2", lambda i: fp8_gemm(i.q.astype(E5M2), i.s, i.b.astype(E5M2), i.sb), TypeError,
         r"fp8_gemm: a and b cannot both be float8_e5m2"),
    case("fp8_gemm-a-rank0", lambda i: fp8_gemm(i.q[0, 0], i.s, i.b, i.sb), ValueError,
         r"fp8_gemm: a must have rank >= 1"),
    case("fp8_gemm-b-rank3", lambda i: fp8_gemm(i.q, i.s, i.b[None], i.sb), ValueError,
         r"fp8_gemm: b must have rank 2"),
    case("fp8_gemm-b-rank1", lambda i: fp8_gemm(i.q, i.s, i.b[0], i.sb), ValueError, r"fp8_gemm: b must have rank 2"),
    case("fp8_gemm-mismatched-k", lambda i: fp8_gemm(i.q, i.s, i.b[:, :48], i.sb), ValueError,
         r"fp8_gemm: b must have shape \(N, 64\) to match a \(51, 64\); got \(32, 48\)"),
    case("fp8_gemm-k-unaligned", lambda i: fp8_gemm(i.q[:, :40], i.s, i.b[:, :40], i.sb), ValueError,
         r"fp8_gemm: K and N must be multiples of 16 .*got K=40, N=32"),
    case("fp8_gemm-n-unaligned", lambda i: fp8_gemm(i.q, i.s, i.b[:24], i.sb), ValueError,
         r"fp8_gemm: K and N must be multiples of 16 .*got K=64, N=24"),
    case("fp8_gemm-a-empty", lambda i: fp8_gemm(i.q[:0], i.s, i.b, i.sb), ValueError, r"fp8_gemm: a must not be empty"),
    case("fp8_gemm-b-empty", lambda i: fp8_gemm(i.q, i.s, i.b[:0], i.sb), ValueError, r"fp8_gemm: b must not be empty"),
    case("fp8_gemm-a_scale-shape", lambda i: fp8_gemm(i.q, i.s_row[:, 0], i.b, i.sb), ValueError,
         r"fp8_gemm: a_scale must have shape \(\) or \(51, 1\)"),
    case("fp8_gemm-b_scale-shape", lambda i: fp8_gemm(i.q, i.s, i.b, jnp.ones((32, 1), F32)), ValueError,
         r"fp8_gemm: b_scale must have shape \(\) or \(32,\)"),
    case("fp8_gemm-out_dtype-f16", lambda i: fp8_gemm(i.q, i.s, i.b, i.sb, out_dtype=jnp.float16), ValueError,
         r"fp8_gemm: out_dtype must be bfloat16 or float32"),
    case("fp8_gemm-out_dtype-name", lambda i: fp8_gemm(i.q, i.s, i.b, i.sb, out_dtype="bf16ish"), ValueError,
         r"fp8_gemm: out_dtype must be bfloat16 or float32"),
    case("fp8_gemm-bias-shape", lambda i: fp8_gemm(i.q, i.s, i.b, i.sb, bias=i.bias[:31]), ValueError,
         r"fp8_gemm: bias must have shape \(32,\)"),
    case("fp8_gemm-bias-rank", lambda i: fp8_gemm(i.q, i.s, i.b, i.sb, bias=i.bias[None]), ValueError,
         r"fp8_gemm: bias must have rank 1"),
    case("fp8_gemm-bias-int", lambda i: fp8_gemm(i.q, i.s, i.b, i.sb, bias=i.bias.astype(jnp.int32)), TypeError,
         r"fp8_gemm: bias must be float32"),
    case("fp8_gemm-fast_accum", lambda i: fp8_gemm(i.q, i.s, i.b, i.sb, fast_accum="yes"), TypeError,
         r"fp8_gemm: fast_accum must be a bool"),
    *bad_scales("fp8_gemm", "a_scale", lambda i, s: fp8_gemm(i.q, s, i.b, i.sb)),
    *bad_scales("fp8_gemm", "b_scale", lambda i, s: fp8_gemm(i.q, i.s, i.b, s)),
]

FP8_DENSE = [
    case("fp8_dense-x-int", lambda i: fp8_dense(i.x.astype(jnp.int32), i.w), TypeError,
         r"fp8_dense: x must be float32"),
    case("fp8_dense-x-fp8", lambda i: fp8_dense(i.q, i.w), TypeError, r"fp8_dense: x must be float32"),
    case("fp8_dense-x-rank0", lambda i: fp8_dense(i.x[0, 0], i.w), ValueError, r"fp8_dense: x must have rank >= 1"),
    case("fp8_dense-x-empty", lambda i: fp8_dense(i.x[:0], i.w), ValueError, r"fp8_dense: x must not be empty"),
    case("fp8_dense-kernel-int", lambda i: fp8_dense(i.x, i.w.astype(jnp.int8)), TypeError,
         r"fp8_dense: kernel must be float32"),
    case("fp8_dense-kernel-fp8-array", lambda i: fp8_dense(i.x, i.w.astype(E4M3)), TypeError,
         r"fp8_dense: kernel must be float32"),
    case("fp8_dense-kernel-rank3", lambda i: fp8_dense(i.x, i.w[None]), ValueError,
         r"fp8_dense: kernel must have rank 2"),
    case("fp8_dense-kernel-empty", lambda i: fp8_dense(i.x, i.w[:, :0]), ValueError,
         r"fp8_dense: kernel must not be empty"),
    case("fp8_dense-mismatched-k", lambda i: fp8_dense(i.x, i.w[:48]), ValueError,
         r"fp8_dense: kernel must have shape \(64, N\) to match x \(51, 64\); got \(48, 32\)"),
    case("fp8_dense-frozen-mismatched-k", lambda i: fp8_dense(i.x, Fp8Weight(i.fw.data[:, :48], i.fw.scale)),
         ValueError, r"fp8_dense: kernel must have shape \(64, N\)"),
    case("fp8_dense-frozen-data-bf16", lambda i: fp8_dense(i.x, Fp8Weight(i.fw.data.astype(BF16), i.fw.scale)),
         TypeError, r"fp8_dense: kernel.data must be float8_e4m3fn"),
    case("fp8_dense-frozen-data-e5m2", lambda i: fp8_dense(i.x, Fp8Weight(i.fw.data.astype(E5M2), i.fw.scale)),
         TypeError, r"fp8_dense: kernel.data must be float8_e4m3fn"),
    case("fp8_dense-frozen-data-rank1", lambda i: fp8_dense(i.x, Fp8Weight(i.fw.data[0], i.fw.scale)), ValueError,
         r"fp8_dense: kernel.data must have rank 2"),
    case("fp8_dense-frozen-scale-shape", lambda i: fp8_dense(i.x, Fp8Weight(i.fw.data, jnp.ones((31,), F32))),
         ValueError, r"fp8_dense: kernel.scale must have shape \(\) or \(32,\)"),
    *bad_scales("fp8_dense", "kernel.scale", lambda i, s: fp8_dense(i.x, Fp8Weight(i.fw.data, s))),
    case("fp8_dense-bias-shape", lambda i: fp8_dense(i.x, i.w, i.bias[:31]), ValueError,
         r"fp8_dense: bias must have shape \(32,\)"),
    case("fp8_dense-bias-int", lambda i: fp8_dense(i.x, i.w, i.bias.astype(jnp.int32)), TypeError,
         r"fp8_dense: bias must be float32"),
    case("fp8_dense-recipe-str", lambda i: fp8_dense(i.x, i.w, recipe="current"), TypeError,
         r"fp8_dense: recipe must be an Fp8Recipe"),
    case("fp8_dense-row-trainable", lambda i: fp8_dense(i.x, i.w, recipe=Fp8Recipe(granularity="row")), ValueError,
         r"fp8_dense: recipe.granularity='row' needs a frozen Fp8Weight"),
    case("Fp8Recipe-granularity", lambda i: Fp8Recipe(granularity="channel"), ValueError,
         r"Fp8Recipe: granularity must be one of"),
    case("Fp8Recipe-backward", lambda i: Fp8Recipe(backward="fp16"), ValueError, r"Fp8Recipe: backward must be one of"),
    case("Fp8Recipe-min_rows-negative", lambda i: Fp8Recipe(min_rows=-1), ValueError,
         r"Fp8Recipe: min_rows must be None or an int >= 0"),
    case("Fp8Recipe-min_rows-float", lambda i: Fp8Recipe(min_rows=2.5), ValueError,
         r"Fp8Recipe: min_rows must be None or an int >= 0"),
    case("Fp8Recipe-fast_accum", lambda i: Fp8Recipe(fast_accum="no"), TypeError,
         r"Fp8Recipe: fast_accum must be a bool"),
]

FROM_KERNEL = [
    case("from_kernel-int", lambda i: Fp8Weight.from_kernel(i.w.astype(jnp.int32)), TypeError,
         r"Fp8Weight\.from_kernel: kernel must be float32"),
    case("from_kernel-fp8", lambda i: Fp8Weight.from_kernel(i.w.astype(E4M3)), TypeError,
         r"Fp8Weight\.from_kernel: kernel must be float32"),
    case("from_kernel-rank1", lambda i: Fp8Weight.from_kernel(i.w[0]), ValueError,
         r"Fp8Weight\.from_kernel: kernel must have rank 2"),
    case("from_kernel-rank3", lambda i: Fp8Weight.from_kernel(i.w[None]), ValueError,
         r"Fp8Weight\.from_kernel: kernel must have rank 2"),
    case("from_kernel-empty", lambda i: Fp8Weight.from_kernel(i.w[:0]), ValueError,
         r"Fp8Weight\.from_kernel: kernel must not be empty"),
    case("from_kernel-granularity", lambda i: Fp8Weight.from_kernel(i.w, "row"), ValueError,
         r"Fp8Weight\.from_kernel: granularity must be one of"),
]

CASES = QUANTIZE + QUANTIZE_TRANSPOSE + DEQUANTIZE + FP8_GEMM + FP8_DENSE + FROM_KERNEL


@pytest.mark.parametrize("call,error,match", CASES)
def test_bad_input_raises(inp, call, error, match):
  with pytest.raises(error, match=match):
    call(inp)


@pytest.mark.parametrize("call,error,match", [c for c in CASES if "must be finite" not in c.values[2]])
def test_bad_input_raises_under_jit(inp, call, error, match):
  """The same checks run at trace time inside jit (except those of scale values, unknown there)."""
  with pytest.raises(error, match=match):
    jax.jit(lambda: call(inp))()


# ---------------------------------------------------------------------------------------------
# The C++ handlers re-check what the raw calls hand them


def _x(shape=(51, 64), dtype=F32):
  return jnp.asarray(np.random.default_rng(0).standard_normal(shape).astype(np.float32)).astype(dtype)


def _gemm(a, b, a_scale=(), b_scale=(), bias=None, out_dtype=BF16, scale_dtype=F32):
  """The raw FP8 GEMM call on random operands of the given shapes and dtypes: a and b are (shape, dtype)."""
  return raw_gemm.fp8_gemm(_x(*a), _x(*b), jnp.ones(a_scale, scale_dtype), jnp.ones(b_scale, F32),
                           bias, jnp.dtype(out_dtype), True)


RAW_CASES = [
    pytest.param(lambda: raw_quant.quantize_static(_x(), jnp.ones((50, 1), F32), E4M3),
                 r"quantize: scale must hold 1 value or one per row \(51\), got 50", id="quantize_static-scale-rows"),
    pytest.param(lambda: raw_quant.quantize_static(_x(), jnp.ones((), jnp.float16), E4M3),
                 r"quantize: scale must be float32", id="quantize_static-scale-f16"),
    pytest.param(lambda: jax.ffi.ffi_call("flashrt_quantize_static", (jax.ShapeDtypeStruct((51, 64), E4M3),
                                                                      jax.ShapeDtypeStruct((51, 1), F32)))(
                     _x(), jnp.ones((), F32)),
                 r"quantize: amax result must be float32 shaped like scale", id="quantize_static-amax-shape"),
    pytest.param(lambda: raw_quant.quantize_current(_x().astype(jnp.int32), E4M3, False),
                 r"quantize: x must be float32, bfloat16 or float16", id="quantize_current-x-int32"),
    pytest.param(lambda: raw_quant.quantize_current(_x(), BF16, False),
                 r"quantize: q must be float8_e4m3fn or float8_e5m2", id="quantize_current-q-bf16"),
    pytest.param(lambda: raw_quant.quantize_current(_x((0, 64)), E4M3, False),
                 r"quantize: x must be a non-empty array", id="quantize_current-x-empty"),
    pytest.param(lambda: raw_quant.quantize_transpose_static(_x(), jnp.ones((51, 1), F32), E4M3),
                 r"quantize_transpose: scale must be per tensor", id="quantize_transpose_static-scale-row"),
    pytest.param(lambda: _gemm(((51, 64), E4M3), ((32, 48), E4M3)),
                 r"fp8_gemm: b must have shape \(N, 64\), got \(32, 48\)", id="fp8_gemm-mismatched-k"),
    pytest.param(lambda: _gemm(((51, 64), E4M3), ((32, 64), E4M3), a_scale=(51,)),
                 r"fp8_gemm: a_scale and b_scale must both be scalars or hold M = 51 and N = 32",
                 id="fp8_gemm-scale-sizes"),
    pytest.param(lambda: _gemm(((51, 64), E4M3), ((32, 64), E4M3), scale_dtype=BF16),
                 r"fp8_gemm: a_scale and b_scale must be float32", id="fp8_gemm-scale-bf16"),
    pytest.param(lambda: _gemm(((51, 64), E5M2), ((32, 64), E5M2)),
                 r"fp8_gemm: a and b cannot both be float8_e5m2", id="fp8_gemm-both-e5m2"),
    pytest.param(lambda: _gemm(((51, 64), F32), ((32, 64), E4M3)),
                 r"fp8_gemm: a must be float8_e4m3fn or float8_e5m2", id="fp8_gemm-a-f32"),
    pytest.param(lambda: _gemm(((51, 64), E4M3), ((32, 64), E4M3), out_dtype=jnp.float16),
                 r"fp8_gemm: out must be bfloat16 or float32", id="fp8_gemm-out-f16"),
    pytest.param(lambda: _gemm(((51, 64), E4M3), ((32, 64), E4M3), bias=_x((32,))),
                 r"fp8_gemm: bias must be \(N,\) = \(32,\) of the output dtype", id="fp8_gemm-bias-dtype"),
    pytest.param(lambda: _gemm(((51, 64), E4M3), ((32, 64), E4M3), bias=_x((31,), BF16)),
                 r"fp8_gemm: bias must be \(N,\) = \(32,\)", id="fp8_gemm-bias-size"),
]


@pytest.mark.parametrize("call,match", RAW_CASES)
def test_handler_rejects_inconsistent_call(platform, call, match):
  with pytest.raises(RuntimeError, match=match) as info:  # XlaRuntimeError / JaxRuntimeError
    jax.block_until_ready(call())
  assert "INVALID_ARGUMENT" in str(info.value), f"{info.value}: the handler must return InvalidArgument"
