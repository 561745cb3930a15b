"""FP8 GEMM and the differentiable FP8 dense layer op.

`fp8_gemm` is the raw cuBLASLt FP8 GEMM as a JAX op. `fp8_dense` is the layer: it quantizes the
activation (and a trainable weight) on the fly, runs the GEMM, and in its backward computes dx and
dW with FP8 (E5M2 gradient) or BF16 GEMMs. A frozen weight (`Fp8Weight`) stays 1 byte per parameter
and its gradient is never computed. An activation that a fused producer (RMSNorm, GLU, ...) already
quantized (`Fp8Activation`) goes straight into the GEMM.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from flashrt_jax import _checks, reference
from flashrt_jax.ffi import gemm as raw_gemm
from flashrt_jax.ffi import quant as raw_quant
from flashrt_jax.ops.quant import quantize

E4M3 = jnp.dtype(jnp.float8_e4m3fn)
E5M2 = jnp.dtype(jnp.float8_e5m2)
BF16 = jnp.dtype(jnp.bfloat16)
F32 = jnp.dtype(jnp.float32)
OUT_DTYPES = (BF16, F32)

# When fp8_dense takes the FP8 path by default (Fp8Recipe.min_rows=None): a cost model with constants
# measured on the H100 (benchmarks/results/h100/gemm.md). FP8 saves GEMM time in proportion to M*K*N
# (raw TFLOP/s of the two GEMMs) and pays memory passes and launches: a trainable layer quantizes the
# activation per tensor (amax, then quantize: 5 bytes per element of x) and its weight (5 bytes per
# parameter) on every call; a frozen layer quantizes the activation per row in one pass (3 bytes per
# element), while its XLA route would dequantize the FP8 weight (3 bytes per parameter).
BF16_FLOPS, FP8_FLOPS = 730e12, 1400e12  # dense GEMM FLOP/s at the large pi0.5 shapes
HBM_BYTES_PER_S = 2.8e12                 # device-to-device copy bandwidth
LAUNCH_S = {"frozen": 6e-6, "trainable": 10e-6}  # the FP8 path's extra kernels and custom calls


def _rows(x) -> int:
  """M: the product of x's leading axes."""
  return math.prod(x.shape[:-1])


def takes_fp8_path(m: int, k: int, n: int, frozen: bool, min_rows: int | None = None) -> bool:
  """Whether fp8_dense runs the FP8 GEMM for x (M, K) @ kernel (K, N), or XLA's dot.

  K and N must be multiples of 16 (cuBLASLt's FP8 alignment). With min_rows=None, FP8 where the
  GEMM time it saves exceeds the quantize passes and launches it adds (the cost model above); an
  int min_rows replaces that by M >= min_rows (0: always FP8).
  """
  if k % 16 or n % 16:
    return False
  if min_rows is not None:
    return m >= min_rows
  saved = 2 * m * k * n * (1 / BF16_FLOPS - 1 / FP8_FLOPS)
  if frozen:
    added = 3 * (m * k - k * n) / HBM_BYTES_PER_S + LAUNCH_S["frozen"]
  else:
    added = 5 * (m * k + k * n) / HBM_BYTES_PER_S + LAUNCH_S["trainable"]
  return saved > added


def _gemm_2d(a, b, a_scale, b_scale, bias, out_dtype, fast_accum):
  """a (M, K), b (N, K) FP8 -> (M, N); scales of any shape holding 1, M or N values."""
  m, n = a.shape[0], b.shape[0]
  a_scale, b_scale = a_scale.reshape(-1), b_scale.reshape(-1)
  if a_scale.size > 1 or b_scale.size > 1:  # cuBLASLt's outer-vector mode wants both as vectors
    a_scale, b_scale = jnp.broadcast_to(a_scale, (m,)), jnp.broadcast_to(b_scale, (n,))
  if bias is not None and out_dtype != BF16:  # cuBLASLt's FP8 bias epilogue is bf16 only
    out = raw_gemm.fp8_gemm(a, b, a_scale, b_scale, None, out_dtype, fast_accum)
    return out + bias.astype(out_dtype)
  bias = None if bias is None else bias.astype(out_dtype)
  return raw_gemm.fp8_gemm(a, b, a_scale, b_scale, bias, out_dtype, fast_accum)


# ---------------------------------------------------------------------------------------------
# fp8_gemm


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _fp8_gemm(a, a_scale, b, b_scale, bias, out_dtype, fast_accum):
  out = _gemm_2d(a.reshape(-1, a.shape[-1]), b, a_scale, b_scale, bias, out_dtype, fast_accum)
  return out.reshape(a.shape[:-1] + (b.shape[0],))


def _fp8_gemm_fwd(a, a_scale, b, b_scale, bias, out_dtype, fast_accum):
  return _fp8_gemm(a, a_scale, b, b_scale, bias, out_dtype, fast_accum), (a, a_scale, b, b_scale, bias)


def _fp8_gemm_bwd(out_dtype, fast_accum, res, ct):
  fn = lambda a, sa, b, sb, bias: reference.fp8_gemm(a, sa, b, sb, out_dtype=out_dtype, bias=bias)
  return jax.vjp(fn, *res)[1](ct)


_fp8_gemm.defvjp(_fp8_gemm_fwd, _fp8_gemm_bwd)


def fp8_gemm(a, a_scale, b, b_scale, *, out_dtype=jnp.bfloat16, bias=None, fast_accum: bool = True):
  """out = (a * a_scale) @ (b * b_scale)^T [+ bias]: cuBLASLt FP8 GEMM, fp32 accumulation.

  Args:
    a: (..., K) float8_e4m3fn or float8_e5m2; leading axes are flattened into M.
    a_scale: () float32, or (..., 1) for one scale per row of a (per token).
    b: (N, K) float8_e4m3fn or float8_e5m2, contiguous along K (the Hopper "TN" layout: a Flax
      kernel (K, N) enters as its transpose). a and b may not both be float8_e5m2.
    b_scale: () float32, or (N,) for one per row of b (per output channel).
    out_dtype: jnp.bfloat16 or jnp.float32.
    bias: optional (N,) float, added in the GEMM's epilogue.
    fast_accum: Hopper's faster FP8 accumulation mode (cuBLASLt FAST_ACCUM).

  K and N must be multiples of 16 (cuBLASLt FP8 alignment). Differentiable: the backward runs the
  reference's VJP in XLA (cotangents of the FP8 operands come back in their FP8 dtype); for a
  trainable layer use `fp8_dense`.

  Returns:
    (..., N) out_dtype.
  """
  op = "fp8_gemm"
  _checks.array(op, "a", a, _checks.FP8_DTYPES)
  _checks.array(op, "b", b, _checks.FP8_DTYPES, rank=2)
  if b.shape[1] != a.shape[-1]:
    raise ValueError(f"{op}: b must have shape (N, {a.shape[-1]}) to match a {a.shape}; got {b.shape}")
  if jnp.dtype(a.dtype) == E5M2 and jnp.dtype(b.dtype) == E5M2:
    raise TypeError(f"{op}: a and b cannot both be float8_e5m2 (FP8 tensor cores take E4M3 x E5M2 at most)")
  k, n = b.shape[1], b.shape[0]
  if k % 16 or n % 16:
    raise ValueError(f"{op}: K and N must be multiples of 16 for cuBLASLt FP8, got K={k}, N={n}")
  _checks.scale(op, "a_scale", a_scale, ((), a.shape[:-1] + (1,)))
  _checks.scale(op, "b_scale", b_scale, ((), (n,)))
  out_dtype = _checks.dtype(op, "out_dtype", out_dtype, OUT_DTYPES)
  fast_accum = _checks.boolean(op, "fast_accum", fast_accum)
  if bias is not None:
    _checks.array(op, "bias", bias, _checks.FLOAT_DTYPES, rank=1)
    if bias.shape != (n,):
      raise ValueError(f"{op}: bias must have shape ({n},), got {bias.shape}")
  return _fp8_gemm(a, a_scale, b, b_scale, bias, out_dtype, fast_accum)


# ---------------------------------------------------------------------------------------------
# Frozen FP8 weights


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Fp8Weight:
  """A frozen weight quantized once: `data` (N, K) float8_e4m3fn, contiguous along K as the forward
  FP8 GEMM wants it, and `scale` () float32 (per tensor) or (N,) (per output channel).

  It stands for the Flax kernel `data.T * scale` of shape (K, N): 1 byte per parameter, no BF16 copy.
  """

  data: jax.Array
  scale: jax.Array

  @property
  def shape(self) -> tuple[int, int]:
    """The (K, N) shape of the kernel this weight stands for."""
    return (self.data.shape[1], self.data.shape[0])

  @classmethod
  def from_kernel(cls, kernel, granularity: str = "tensor") -> "Fp8Weight":
    """Quantizes a (K, N) float kernel; granularity "tensor" or "channel" (one scale per N)."""
    _checks.array("Fp8Weight.from_kernel", "kernel", kernel, _checks.FLOAT_DTYPES, rank=2)
    _checks.choice("Fp8Weight.from_kernel", "granularity", granularity, ("tensor", "channel"))
    data, scale = quantize(kernel.T, granularity="row" if granularity == "channel" else "tensor")
    return cls(data, scale.reshape(-1) if granularity == "channel" else scale)

  def dequantize(self, dtype=jnp.float32):
    """The (K, N) kernel in dtype."""
    scale = self.scale[:, None] if self.scale.ndim else self.scale
    return (self.data.astype(jnp.float32) * scale).T.astype(dtype)

  def tree_flatten(self):
    return (self.data, self.scale), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Fp8Activation:
  """An activation already quantized to FP8, as the fused producers (`rms_norm_fp8`, `glu_fp8`, ...)
  return it: `data` (..., K) float8_e4m3fn (or float8_e5m2) and `scale` () float32 (per tensor) or
  (..., 1) (per row), with x ≈ data * scale.

  `fp8_dense(Fp8Activation(q, s), kernel)` feeds it straight into the FP8 GEMM (no quantize pass).
  It is not differentiable: its gradient is zero.
  """

  data: jax.Array
  scale: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.data.shape)

  def dequantize(self, dtype=jnp.bfloat16):
    """data * scale in dtype."""
    return reference.dequantize(self.data, self.scale, dtype)

  def tree_flatten(self):
    return (self.data, self.scale), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children)


# ---------------------------------------------------------------------------------------------
# fp8_dense


@dataclasses.dataclass(frozen=True)
class Fp8Recipe:
  """How `fp8_dense` quantizes and which GEMMs it runs. Hashable: it is a static argument.

  Attributes:
    granularity: activation scales of the forward GEMM: "tensor" (an amax pass, then the quantize
      pass) or "row" (one scale per token in a single pass, applied in cuBLASLt's epilogue through its
      outer-vector scale mode; frozen weights only, since a weight gradient reduces over tokens).
      None (default) picks "row" for a frozen weight and "tensor" for a trainable one: on the H100,
      per-token scaling is as accurate and faster (benchmarks/results/h100/gemm.md).
    backward: "fp8" (dy quantized to E5M2 with current scaling, FP8 GEMMs for dx and dW; a frozen
      weight's dx scales dy per token in one pass, a trainable one per tensor since its dW reduces
      over tokens) or "bf16" (XLA BF16 GEMMs on the dequantized residuals).
    fast_accum: use Hopper's fast FP8 accumulation in the forward GEMM (the backward never does).
    min_rows: None (default): take the FP8 path where it was measured faster than XLA's BF16 dot
      on the H100 (see `takes_fp8_path`); an int: FP8 from this many rows (M = prod of x's leading
      axes) on, whatever K and N; 0 always takes the FP8 path.
  """

  granularity: str | None = None
  backward: str = "fp8"
  fast_accum: bool = True
  min_rows: int | None = None

  def __post_init__(self):
    op = "Fp8Recipe"
    _checks.choice(op, "granularity", self.granularity, (None, "tensor", "row"))
    _checks.choice(op, "backward", self.backward, ("fp8", "bf16"))
    _checks.boolean(op, "fast_accum", self.fast_accum)
    if self.min_rows is not None and (not isinstance(self.min_rows, int) or isinstance(self.min_rows, bool)
                                      or self.min_rows < 0):
      raise ValueError(f"{op}: min_rows must be None or an int >= 0, got {self.min_rows!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _dense_trainable(x, kernel, bias, recipe, dtypes):
  xq, sx, _ = raw_quant.quantize_current(x, E4M3, False)
  # Only the (N, K) layout is needed without a backward; the transposing kernel writes it in one pass.
  _, wq_t, sw, _ = raw_quant.quantize_transpose_current(kernel, E4M3)
  return _gemm_2d(xq, wq_t, sx, sw, bias, dtypes[2], recipe.fast_accum)


def _dense_trainable_fwd(x, kernel, bias, recipe, dtypes):
  out_dtype = dtypes[2]
  xq, xq_t, sx, _ = raw_quant.quantize_transpose_current(x, E4M3)
  wq, wq_t, sw, _ = raw_quant.quantize_transpose_current(kernel, E4M3)
  y = _gemm_2d(xq, wq_t, sx, sw, bias, out_dtype, recipe.fast_accum)
  return y, (xq_t, sx, wq, sw, bias)


def _dense_trainable_bwd(recipe, dtypes, res, dy):
  x_dtype, kernel_dtype, _ = dtypes
  xq_t, sx, wq, sw, bias = res
  m = dy.shape[0]
  dx_out = x_dtype if x_dtype in OUT_DTYPES else BF16
  dw_out = kernel_dtype if kernel_dtype in OUT_DTYPES else F32
  if recipe.backward == "fp8":
    dyq, dyq_t, sdy, _ = raw_quant.quantize_transpose_current(dy, E5M2)
    dx = _gemm_2d(dyq, wq, sdy, sw, None, dx_out, False)            # (M, N) . (K, N)^T
    dw = _gemm_2d(xq_t, dyq_t, sx, sdy, None, dw_out, False)        # (K, M) . (N, M)^T
  else:
    dyb = dy.astype(BF16)
    w = reference.dequantize(wq, sw, BF16)                           # (K, N)
    x_t = reference.dequantize(xq_t[:, :m], sx, BF16)                # (K, M)
    dx = jnp.dot(dyb, w.T, preferred_element_type=F32)
    dw = jnp.dot(x_t, dyb, preferred_element_type=F32)
  db = None if bias is None else dy.astype(F32).sum(0).astype(bias.dtype)
  return dx.astype(x_dtype), dw.astype(kernel_dtype), db


_dense_trainable.defvjp(_dense_trainable_fwd, _dense_trainable_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _dense_frozen(x, w_data, w_scale, bias, recipe, dtypes):
  xq, sx, _ = raw_quant.quantize_current(x, E4M3, recipe.granularity == "row")
  return _gemm_2d(xq, w_data, sx, w_scale, bias, dtypes[2], recipe.fast_accum)


def _dense_frozen_fwd(x, w_data, w_scale, bias, recipe, dtypes):
  return _dense_frozen(x, w_data, w_scale, bias, recipe, dtypes), (w_data, w_scale, bias)


def _frozen_dx(dy, w_data, w_scale, backward, out_dtype, fold_dtype=F32):
  """dx = dy @ (w_data * w_scale) for a frozen (N, K) weight: an FP8 GEMM on dy quantized to E5M2
  with one current scale per row (a single pass; the row scales are dx's row scales, applied in the
  GEMM's epilogue), or XLA's BF16 dot on the dequantized weight (backward="bf16"). fold_dtype: the
  dtype of dy * per-channel scale before its E5M2 quantization (dy's own dtype halves that pass's
  bytes; E5M2 rounds it much more coarsely anyway)."""
  if backward == "fp8":
    one = jnp.ones((), F32)
    if w_scale.ndim:  # per-channel scales lie along dx's reduction axis: fold them into dy first
      g, g_scale = (dy.astype(F32) * w_scale).astype(fold_dtype), one
    else:
      g, g_scale = dy, w_scale
    gq, sg, _ = raw_quant.quantize_current(g, E5M2, True)
    # The one FP8 copy is (N, K); dx needs (K, N): XLA transposes it (1 byte per parameter each way).
    return _gemm_2d(gq, w_data.T, sg, g_scale, None, out_dtype, False)
  w = reference.dequantize(w_data, w_scale[:, None] if w_scale.ndim else w_scale, BF16)  # (N, K)
  return jnp.dot(dy.astype(BF16), w, preferred_element_type=F32).astype(out_dtype)


def _dense_frozen_bwd(recipe, dtypes, res, dy):
  x_dtype = dtypes[0]
  w_data, w_scale, bias = res
  dx_out = x_dtype if x_dtype in OUT_DTYPES else BF16
  dx = _frozen_dx(dy, w_data, w_scale, recipe.backward, dx_out if recipe.backward == "fp8" else F32)
  db = None if bias is None else dy.astype(F32).sum(0).astype(bias.dtype)
  return dx.astype(x_dtype), None, None, db


_dense_frozen.defvjp(_dense_frozen_fwd, _dense_frozen_bwd)


def frozen_xla_dot(x, w: Fp8Weight, converted: bool):
  """x (..., K) @ w's kernel (K, N) by XLA's dot, in one of two forms (timed side by side in
  benchmarks/gemm.py, section xla_route):

  converted: the FP8 data enters the dot as x's dtype (which holds every E4M3 value exactly) in its
    stored (N, K) layout, where XLA can fuse the convert into its GEMM; no dequantized copy is
    written. The scale multiplies the float32 product, which is returned.
  otherwise: a dequantized (K, N) copy in x's dtype, then the dot; x's dtype is returned.
  """
  if converted:
    return jax.lax.dot_general(x, w.data.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=F32) * w.scale
  return jnp.dot(x, w.dequantize(x.dtype))


def frozen_xla_converts(m: int, k: int) -> bool:
  """Whether the XLA route of a frozen (K, N) weight converts inside the dot for M rows. The
  converted form saves the dequantized copy (3 bytes per weight) but makes a float32 product: it won
  with few rows (M = 50, 200; 968×2048) and lost with many (1600×1024, 30976×2048) on the H100, and
  3M < 2K separates the 8 measured shapes (gemm.md, "A frozen layer routed to XLA")."""
  return 3 * m < 2 * k


def _dense_xla(x, kernel, bias):
  """The small-shape route: XLA's dot in x's dtype (BF16 for BF16 activations)."""
  if isinstance(kernel, Fp8Weight):
    w = jax.lax.stop_gradient(kernel)
    y = frozen_xla_dot(x, w, frozen_xla_converts(_rows(x), w.data.shape[1]))
  else:
    y = jnp.dot(x, kernel.astype(x.dtype))  # what a BF16 layer runs: x's dtype out (cuBLAS accumulates in float32)
  if bias is None:
    return y.astype(x.dtype)
  return (y.astype(F32) + bias.astype(F32)).astype(x.dtype)  # db summed in float32


# ---------------------------------------------------------------------------------------------
# The GEMM stage on an FP8 activation: shared by fp8_dense(Fp8Activation, ...) and the fused
# composites of flashrt_jax.ops.fused_dense (norm / GLU producer -> FP8 GEMM).


def _pad_t(a):
  """a (M, K) FP8 -> a^T (K, M rounded up to 16), zero padded: the K-contiguous operand of a GEMM
  that reduces over M. An XLA transpose, 1 byte per element each way."""
  m = a.shape[0]
  pad = raw_quant.padded_rows(m) - m
  return jax.lax.pad(a.T, jnp.zeros((), a.dtype), ((0, 0, 0), (0, pad, 0)))


def act_gemm_fwd(a, sa, kernel, bias, out_dtype, fast_accum: bool):
  """y = (a * sa) @ kernel [+ bias] for an FP8 activation a (M, K), sa () or (M, 1) float32.

  kernel: a trainable float (K, N) kernel, quantized per tensor here (current scaling), or a frozen
  (w_data (N, K) float8_e4m3fn, w_scale () or (N,)) pair. Returns (y (M, N) out_dtype, residuals for
  `act_gemm_bwd`): a trainable kernel keeps a, sa and its FP8 copy (K, N); a frozen one keeps itself.
  """
  if isinstance(kernel, tuple):
    w_data, w_scale = kernel
    return _gemm_2d(a, w_data, sa, w_scale, bias, out_dtype, fast_accum), (w_data, w_scale)
  wq, wq_t, sw, _ = raw_quant.quantize_transpose_current(kernel, E4M3)
  return _gemm_2d(a, wq_t, sa, sw, bias, out_dtype, fast_accum), (a, sa, wq, sw)


def act_gemm_bwd(res, dy, backward: str, da_dtype, dw_dtype, need_da: bool = True, fold_dtype=F32):
  """Gradients of `act_gemm_fwd` for dy (M, N): (da, dW).

  da: the gradient of the dequantized activation (M, K) in da_dtype (None unless need_da). dW: the
  (K, N) kernel's in dw_dtype, None for a frozen kernel. fold_dtype: see `_frozen_dx`. backward="fp8": dy quantized to E5M2 per
  tensor (current scaling) and FP8 GEMMs; a per-row activation scale lies along dW's reduction axis,
  so it is folded into dy (g = dy * sa, quantized separately) and the GEMM reads the FP8 activation
  data transposed as is. backward="bf16": XLA BF16 dots on the dequantized residuals.
  """
  if len(res) == 2:  # frozen
    w_data, w_scale = res
    return (_frozen_dx(dy, w_data, w_scale, backward, da_dtype, fold_dtype) if need_da else None), None
  a, sa, wq, sw = res
  da = None
  if backward == "fp8":
    g_dtype = E5M2 if jnp.dtype(a.dtype) == E4M3 else E4M3  # the GEMM takes at most one E5M2 operand
    if sa.ndim:
      if need_da:
        dyq, sdy, _ = raw_quant.quantize_current(dy, E5M2, False)
        da = _gemm_2d(dyq, wq, sdy, sw, None, da_dtype, False)          # (M, N) . (K, N)^T
      g = (dy.astype(F32) * sa).astype(dy.dtype)
      _, gq_t, sg, _ = raw_quant.quantize_transpose_current(g, g_dtype)
      dw = _gemm_2d(_pad_t(a), gq_t, jnp.ones((), F32), sg, None, dw_dtype, False)  # (K, M) . (N, M)^T
    else:
      dyq, dyq_t, sdy, _ = raw_quant.quantize_transpose_current(dy, g_dtype)
      if need_da:
        da = _gemm_2d(dyq, wq, sdy, sw, None, da_dtype, False)
      dw = _gemm_2d(_pad_t(a), dyq_t, sa, sdy, None, dw_dtype, False)
  else:
    dyb = dy.astype(BF16)
    if need_da:
      w = reference.dequantize(wq, sw, BF16)                                     # (K, N)
      da = jnp.dot(dyb, w.T, preferred_element_type=F32).astype(da_dtype)
    x = reference.dequantize(a, sa, BF16)                                        # (M, K)
    dw = jnp.dot(x.T, dyb, preferred_element_type=F32).astype(dw_dtype)
  return da, dw


def _kernel_out_dtype(kernel_dtype):
  return kernel_dtype if kernel_dtype in OUT_DTYPES else F32


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _act_dense(a, sa, kernel, bias, recipe, dtypes):
  return act_gemm_fwd(a, sa, kernel, bias, dtypes[0], recipe.fast_accum)[0]


def _act_dense_fwd(a, sa, kernel, bias, recipe, dtypes):
  y, res = act_gemm_fwd(a, sa, kernel, bias, dtypes[0], recipe.fast_accum)
  return y, (() if isinstance(kernel, tuple) else res)  # frozen: nothing to keep but dy itself


def _act_dense_bwd(recipe, dtypes, res, dy):
  _, kernel_dtype, bias_dtype = dtypes
  db = None if bias_dtype is None else dy.astype(F32).sum(0).astype(bias_dtype)
  if not res:  # frozen: the FP8 activation and the weight get no gradient
    return None, None, (None, None), db
  _, dw = act_gemm_bwd(res, dy, recipe.backward, None, _kernel_out_dtype(kernel_dtype), need_da=False)
  return None, None, dw.astype(kernel_dtype), db


_act_dense.defvjp(_act_dense_fwd, _act_dense_bwd)


def check_kernel(op: str, kernel, k: int, name: str = "kernel"):
  """Validates a trainable (K, N) float kernel or a frozen Fp8Weight against the activation width
  k, for the FP8 GEMM (K and N multiples of 16); returns (frozen, N)."""
  frozen = isinstance(kernel, Fp8Weight)
  if frozen:
    _checks.array(op, f"{name}.data", kernel.data, (E4M3,), rank=2)
    _checks.scale(op, f"{name}.scale", kernel.scale, ((), (kernel.data.shape[0],)))
  else:
    _checks.array(op, name, kernel, _checks.FLOAT_DTYPES, rank=2)
  kk, n = kernel.shape
  if kk != k:
    raise ValueError(f"{op}: {name} must have shape ({k}, N) to match the activation width {k}; got "
                     f"{tuple(kernel.shape)}" + (" (an Fp8Weight's shape is data.T's)" if frozen else ""))
  if k % 16 or n % 16:
    raise ValueError(f"{op}: the FP8 GEMM needs K and N multiples of 16 (cuBLASLt FP8 alignment), got "
                     f"K={k}, N={n}")
  return frozen, n


def check_bias(op: str, bias, n: int):
  if bias is not None:
    _checks.array(op, "bias", bias, _checks.FLOAT_DTYPES, rank=1)
    if bias.shape != (n,):
      raise ValueError(f"{op}: bias must have shape ({n},), got {bias.shape}")


def kernel_operand(kernel):
  """What act_gemm_fwd takes: the float kernel, or a frozen weight's (data, scale)."""
  return (kernel.data, kernel.scale) if isinstance(kernel, Fp8Weight) else kernel


def _fp8_act_dense(op, x, kernel, bias, recipe):
  """fp8_dense on an Fp8Activation: always the FP8 GEMM, output bfloat16."""
  _checks.array(op, "x.data", x.data, _checks.FP8_DTYPES)
  _checks.scale(op, "x.scale", x.scale, ((), x.data.shape[:-1] + (1,)))
  k = x.data.shape[-1]
  _, n = check_kernel(op, kernel, k)
  check_bias(op, bias, n)
  lead = x.data.shape[:-1]
  m = _rows(x.data)
  a = x.data.reshape(m, k)
  sa = x.scale.reshape(m, 1) if x.scale.ndim else x.scale
  dtypes = (BF16, None if isinstance(kernel, Fp8Weight) else jnp.dtype(kernel.dtype),
            None if bias is None else jnp.dtype(bias.dtype))
  y = _act_dense(a, sa, kernel_operand(kernel), bias, recipe, dtypes)
  return y.reshape(lead + (n,))


def fp8_dense(x, kernel, bias=None, *, recipe: Fp8Recipe | None = None):
  """y = x @ kernel [+ bias] with an FP8 GEMM: the differentiable layer op.

  Args:
    x: (..., K) bfloat16, float32 or float16 activations; leading axes are flattened into M. Or an
      `Fp8Activation` (already quantized, e.g. by a fused norm): it goes straight into the FP8 GEMM
      (no quantize pass, no routing: always the FP8 path; K and N must be multiples of 16), the
      output is bfloat16 and the activation gets no gradient. A trainable kernel still gets dW (FP8
      GEMM on the FP8 activation data transposed, or a BF16 dot on it dequantized, per
      recipe.backward); recipe.granularity does not apply (the activation's scale is given).
    kernel: either a trainable (K, N) float kernel (the Flax layout), quantized per tensor on each
      call (backward gives dx and dW), or a frozen `Fp8Weight` (backward gives dx only; its
      gradient is None and never computed).
    bias: optional (N,) float; its gradient is dy summed over M.
    recipe: `Fp8Recipe`; default: current scaling (per token for a frozen weight, per tensor for a
      trainable one), FP8 backward, FP8 only where the cost model of `takes_fp8_path` says it pays.

  Returns:
    (..., N) in x's dtype.

  Shapes where FP8 does not pay (see `takes_fp8_path` and `recipe.min_rows`) and K or N not multiples
  of 16 (cuBLASLt FP8 alignment) take the XLA path (`x @ kernel` in x's dtype) instead; for a frozen
  weight, XLA's dot on the FP8 data converted inside it or on a dequantized copy (`frozen_xla_dot`).
  """
  op = "fp8_dense"
  recipe = Fp8Recipe() if recipe is None else recipe
  if not isinstance(recipe, Fp8Recipe):  # its fields are checked when it is built
    raise TypeError(f"{op}: recipe must be an Fp8Recipe or None, got {recipe!r}")
  if isinstance(x, Fp8Activation):
    return _fp8_act_dense(op, x, kernel, bias, recipe)
  _checks.array(op, "x", x, _checks.FLOAT_DTYPES)
  frozen = isinstance(kernel, Fp8Weight)
  if recipe.granularity is None:
    recipe = dataclasses.replace(recipe, granularity="row" if frozen else "tensor")
  if frozen:
    _checks.array(op, "kernel.data", kernel.data, (E4M3,), rank=2)
    _checks.scale(op, "kernel.scale", kernel.scale, ((), (kernel.data.shape[0],)))
  else:
    _checks.array(op, "kernel", kernel, _checks.FLOAT_DTYPES, rank=2)
    if recipe.granularity == "row":
      raise ValueError(f"{op}: recipe.granularity='row' needs a frozen Fp8Weight kernel (the weight "
                       "gradient of a trainable kernel reduces over tokens); use 'tensor'")
  k, n = kernel.shape
  if x.shape[-1] != k:
    raise ValueError(f"{op}: kernel must have shape ({x.shape[-1]}, N) to match x {x.shape}; got {kernel.shape}")
  if bias is not None:
    _checks.array(op, "bias", bias, _checks.FLOAT_DTYPES, rank=1)
    if bias.shape != (n,):
      raise ValueError(f"{op}: bias must have shape ({n},), got {bias.shape}")
  m = _rows(x)
  if not takes_fp8_path(m, k, n, frozen, recipe.min_rows):
    return _dense_xla(x, kernel, bias)
  x_dtype = jnp.dtype(x.dtype)
  out_dtype = x_dtype if x_dtype in OUT_DTYPES else BF16
  x2 = x.reshape(m, k)
  if frozen:
    y = _dense_frozen(x2, kernel.data, kernel.scale, bias, recipe, (x_dtype, E4M3, out_dtype))
  else:
    y = _dense_trainable(x2, kernel, bias, recipe, (x_dtype, jnp.dtype(kernel.dtype), out_dtype))
  return y.astype(x_dtype).reshape(x.shape[:-1] + (n,))
