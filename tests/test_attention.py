"""attention against reference.attention (float32 einsums) on fresh random inputs: no mask, causal,
pi0.5's block-causal mask with padding inside the prefix (padded keys, and padded queries too as in
openpi), invalid queries under each mask, padding alone and combined, long and odd sequence lengths,
queries fewer than keys, GQA ratios, head dims (padded ones too), a cached prefix as a second key
source, soft-capping and rows that see no key; gradients against jax.grad of the reference;
determinism; transformations; openpi's mask convention; bad input.

On CPU the sizes stay small (B=1, 2 query heads, head_dim 64 for the long sequences): the CPU
kernels are plain loops. On GPU the same cases run at pi0.5's head layout (8 query heads, 1 KV head,
head_dim 256).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_bits_equal, flashrt_targets, normal, rel_l2

import flashrt_jax
from flashrt_jax import reference
from flashrt_jax.ffi import attention as raw

BF16, F16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)
# bf16 output against the float32 reference on the same (rounded) inputs: output rounding and, on
# GPU, bf16 probabilities in the P @ V product.
TOL = 1e-2
GRAD_TOL = 2e-2
SUFFIX = 50  # pi0.5: 50 action tokens after the prefix


def _heads(platform):
  """(B, Hq, Hkv, D) for the long-sequence cases."""
  return (2, 8, 1, 256) if platform == "gpu" else (1, 2, 1, 64)


def _qkv(rng, b, tq, tk, hq, hkv, d, dtype=BF16, tp=0, q_std=1.0):
  q = normal(rng, (b, tq, hq, d), dtype, std=q_std)
  k, v = normal(rng, (b, tk, hkv, d), dtype), normal(rng, (b, tk, hkv, d), dtype)
  prefix = (normal(rng, (b, tp, hkv, d), dtype), normal(rng, (b, tp, hkv, d), dtype)) if tp else None
  return q, k, v, prefix


def _f32(tree):
  return jax.tree_util.tree_map(lambda a: a.astype(F32), tree)


def _ref(q, k, v, prefix=None, return_lse=False, **kw):
  """reference.attention on the float32 values of the inputs (jitted: eager op-by-op is slow)."""
  fn = lambda q, k, v, p, kw: reference.attention(q, k, v, prefix_kv=p, return_lse=return_lse, **kw)
  return jax.jit(fn)(*_f32((q, k, v)), _f32(prefix), kw)


def _pi05_layout(b, t):
  """Block ids and validity of a pi0.5 training sequence of t tokens: the prefix (one bidirectional
  block, three image views and a prompt) then SUFFIX tokens in two blocks (1 + the rest); the second
  image view is padding (a missing camera) and the prompt ends in a few padding tokens, differently
  per batch element."""
  suffix = SUFFIX if t >= 4 * SUFFIX else max(2, t // 4)
  prefix = t - suffix
  ids = np.zeros((b, t), np.int32)
  ids[:, prefix] = 1
  ids[:, prefix + 1:] = 2
  valid = np.ones((b, t), bool)
  view = prefix * 256 // 968  # one camera view: 256 of the 968 prefix tokens
  valid[:, view:2 * view] = False
  for i in range(b):
    valid[i, prefix - 3 - 5 * i:prefix] = False
  return ids, valid


def _masks(kind, b, tq, tk):
  """(kwargs of flashrt_jax.attention, kwargs of reference.attention) for one mask kind."""
  pos = lambda n, start=0: jnp.broadcast_to(jnp.arange(start, start + n, dtype=jnp.int32), (b, n))
  causal_ref = {"q_block_ids": pos(tq, tk - tq), "k_block_ids": pos(tk)}
  padding = np.ones((b, tk), bool)
  padding[:, tk // 3:tk // 3 + tk // 5] = False
  padding[b - 1, tk - 7:] = False
  padding = jnp.asarray(padding)
  if kind == "none":
    return {}, {}
  if kind == "causal":
    return {"mask": "causal"}, causal_ref
  if kind == "padding":
    return {"k_valid": padding}, {"k_valid": padding}
  if kind == "causal+padding":
    return {"mask": "causal", "k_valid": padding}, dict(causal_ref, k_valid=padding)
  ids, valid = map(jnp.asarray, _pi05_layout(b, tk))
  if kind == "pi05":  # self-attention
    return ({"block_ids": ids, "k_valid": valid},
            {"q_block_ids": ids, "k_block_ids": ids, "k_valid": valid})
  if kind == "pi05+qpad":  # openpi's mask: padded tokens neither see nor are seen
    return ({"block_ids": ids, "k_valid": valid, "q_valid": valid},
            {"q_block_ids": ids, "k_block_ids": ids, "k_valid": valid, "q_valid": valid})
  if kind == "pi05-suffix":  # the last tq tokens attend to the whole sequence
    return ({"q_block_ids": ids[:, tk - tq:], "k_block_ids": ids, "k_valid": valid},
            {"q_block_ids": ids[:, tk - tq:], "k_block_ids": ids, "k_valid": valid})
  raise ValueError(kind)


def _check_lse(lse, ref_lse, case):
  lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
  assert lse.shape == ref_lse.shape and lse.dtype == np.float32, f"{case}: lse {lse.shape} {lse.dtype}"
  empty = np.isneginf(ref_lse)
  assert np.array_equal(np.isneginf(lse), empty), f"{case}: lse -inf rows differ"
  np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=0, atol=2e-2, err_msg=f"{case}: lse")


def _check(o, ref, case, dtype=BF16):
  assert o.dtype == dtype and o.shape == ref.shape, f"{case}: got {o.dtype} {o.shape}, want {ref.shape}"
  assert not np.isnan(np.asarray(o.astype(F32))).any(), f"{case}: NaN in the output"
  err = rel_l2(o, ref)
  assert err <= TOL, f"{case}: rel L2 vs reference {err:.2e} > {TOL}"


def _grads(fn, args, ct):
  """Gradients of sum(fn(*args) * ct) with respect to every argument (jitted)."""
  loss = lambda ct, *a: jnp.sum(fn(*a).astype(F32) * ct.astype(F32))
  return jax.jit(jax.grad(loss, argnums=tuple(range(1, len(args) + 1))))(ct, *args)


def _check_grads(got, want, case):
  for name, g, w in zip(("dq", "dk", "dv", "dk_prefix", "dv_prefix"), jax.tree_util.tree_leaves(got),
                        jax.tree_util.tree_leaves(want)):
    assert g.shape == w.shape, f"{case}: {name} shape {g.shape} vs {w.shape}"
    assert not np.isnan(np.asarray(g.astype(F32))).any(), f"{case}: NaN in {name}"
    err = rel_l2(g, w)
    assert err <= GRAD_TOL, f"{case}: {name} rel L2 vs reference {err:.2e} > {GRAD_TOL}"


# ---------------------------------------------------------------------------------------------
# Forward against the reference


SEQ_CASES = [
    pytest.param(867, 867, "none", id="none-867"),
    pytest.param(1018, 1018, "causal", id="causal-1018"),
    pytest.param(1018, 1018, "pi05", id="pi05-1018"),
    pytest.param(1018, 1018, "pi05+qpad", id="pi05+qpad-1018"),
    pytest.param(867, 867, "padding", id="padding-867"),
    pytest.param(867, 867, "causal+padding", id="causal+padding-867"),
    pytest.param(51, 1018, "pi05-suffix", id="pi05-suffix-51x1018"),
    pytest.param(51, 1018, "causal+padding", id="causal+padding-51x1018"),
    pytest.param(1, 1018, "causal", id="causal-1x1018"),
]


@pytest.mark.parametrize("tq,tk,kind", SEQ_CASES)
def test_attention_matches_reference(platform, rng, tq, tk, kind):
  b, hq, hkv, d = _heads(platform)
  case = f"attention {kind} tq={tq} tk={tk} B={b} Hq={hq} Hkv={hkv} D={d} on {platform}"
  q, k, v, _ = _qkv(rng, b, tq, tk, hq, hkv, d)
  kw, ref_kw = _masks(kind, b, tq, tk)
  o, lse = flashrt_jax.attention(q, k, v, return_lse=True, **kw)
  ref_o, ref_lse = _ref(q, k, v, return_lse=True, **ref_kw)
  _check(o, ref_o, case)
  _check_lse(lse, ref_lse, case)


@pytest.mark.parametrize("d", [64, 72, 128, 256])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 1)], ids=["mha", "gqa2", "mqa8"])
def test_attention_heads_and_head_dims(platform, rng, hq, hkv, d):
  """GQA ratios 1/2/8 and head dims, 72 (SigLIP) zero-padded to 128; odd lengths 51 x 99."""
  case = f"attention Hq={hq} Hkv={hkv} D={d} on {platform}"
  q, k, v, _ = _qkv(rng, 2, 51, 99, hq, hkv, d)
  kw, ref_kw = _masks("causal+padding", 2, 51, 99)
  o, lse = flashrt_jax.attention(q, k, v, return_lse=True, **kw)
  ref_o, ref_lse = _ref(q, k, v, return_lse=True, **ref_kw)
  _check(o, ref_o, case)
  _check_lse(lse, ref_lse, case)


def test_attention_float16(platform, rng):
  q, k, v, _ = _qkv(rng, 2, 51, 77, 4, 2, 64, dtype=F16)
  _check(flashrt_jax.attention(q, k, v, mask="causal"), _ref(q, k, v, **_masks("causal", 2, 51, 77)[1]),
         f"attention float16 on {platform}", dtype=F16)


def test_attention_custom_scale_and_small_head_dim(platform, rng):
  """head_dim 40 pads to 64; the default scale is 1/sqrt(40), an explicit one is used as given."""
  q, k, v, _ = _qkv(rng, 1, 33, 33, 2, 1, 40)
  _check(flashrt_jax.attention(q, k, v), _ref(q, k, v), f"attention D=40 on {platform}")
  _check(flashrt_jax.attention(q, k, v, softmax_scale=0.3), _ref(q, k, v, softmax_scale=0.3),
         f"attention D=40 scale 0.3 on {platform}")


def test_attention_softcap(platform, rng):
  """Logits around +-30 capped at 5: without the cap the result would be far off."""
  q, k, v, _ = _qkv(rng, 2, 51, 99, 4, 2, 64, q_std=4.0)
  kw, ref_kw = _masks("causal+padding", 2, 51, 99)
  o = flashrt_jax.attention(q, k, v, softcap=5.0, **kw)
  _check(o, _ref(q, k, v, softcap=5.0, **ref_kw), f"attention softcap on {platform}")
  assert rel_l2(o, _ref(q, k, v, **ref_kw)) > 0.1, "the soft-cap made no difference"
  ct = normal(rng, q.shape, BF16)
  got = _grads(lambda q, k, v: flashrt_jax.attention(q, k, v, softcap=5.0, **kw), (q, k, v), ct)
  want = _grads(lambda q, k, v: reference.attention(q, k, v, softcap=5.0, **ref_kw), _f32((q, k, v)), ct)
  _check_grads(got, want, f"attention softcap grads on {platform}")


def test_attention_prefix_kv(platform, rng):
  """A cached prefix as the first key source equals attention over the concatenated keys, and its
  gradient is the prefix slice of the concatenated one."""
  b, hq, hkv, d = (2, 8, 1, 256) if platform == "gpu" else (2, 4, 2, 64)
  tp, tk, tq = 140, SUFFIX, SUFFIX  # decode-like: the suffix sees the prefix and itself
  q, k, v, prefix = _qkv(rng, b, tq, tk, hq, hkv, d, tp=tp)
  ids, valid = map(jnp.asarray, _pi05_layout(b, tp + tk))
  kw = {"q_block_ids": ids[:, tp:], "k_block_ids": ids, "k_valid": valid}
  o = flashrt_jax.attention(q, k, v, prefix_kv=prefix, **kw)
  _check(o, _ref(q, k, v, prefix, **kw), f"attention prefix_kv on {platform}")
  k_cat, v_cat = jnp.concatenate([prefix[0], k], 1), jnp.concatenate([prefix[1], v], 1)
  o_cat = flashrt_jax.attention(q, k_cat, v_cat, **kw)
  assert rel_l2(o, o_cat) <= TOL, f"prefix_kv vs concatenated keys: rel L2 {rel_l2(o, o_cat):.2e}"
  if platform == "cpu":  # the CPU kernel walks the joint key axis in one order
    assert_bits_equal(o, o_cat, "prefix_kv vs concatenated keys on cpu")
  ct = normal(rng, q.shape, BF16)
  fn = lambda q, k, v, kp, vp: flashrt_jax.attention(q, k, v, prefix_kv=(kp, vp), **kw)
  got = _grads(fn, (q, k, v) + prefix, ct)
  want = _grads(lambda q, k, v, kp, vp: reference.attention(q, k, v, prefix_kv=(kp, vp), **kw),
                _f32((q, k, v) + prefix), ct)
  _check_grads(got, want, f"attention prefix_kv grads on {platform}")


@pytest.mark.parametrize("b,tq,tp", [(1, 1018, 0), (1, 200, 140), (8, 200, 140)],
                         ids=["key-splits", "key-splits+prefix", "prefix"])
def test_attention_many_rows(platform, rng, b, tq, tp):
  """The 128-row forward kernel (more than 1024 folded rows): with few row tiles its key splits merge
  in a cluster; with a prefix, one key tile spans both key sources (loaded apart from the others)."""
  hq, hkv, d = (8, 1, 256) if platform == "gpu" else (2, 1, 64)
  if platform == "cpu":
    tq, tp = tq // 8, tp // 8
  case = f"attention many rows B={b} tq={tq} tp={tp} on {platform}"
  q, k, v, prefix = _qkv(rng, b, tq, tq, hq, hkv, d, tp=tp)
  ids, valid = map(jnp.asarray, _pi05_layout(b, tp + tq))
  kw = {"q_block_ids": ids[:, tp:], "k_block_ids": ids, "k_valid": valid, "q_valid": valid[:, tp:]}
  if tp:
    kw["prefix_kv"] = prefix
  fn = lambda q, k, v: flashrt_jax.attention(q, k, v, **kw)
  ref = lambda q, k, v: reference.attention(q, k, v, **kw)
  o, lse = flashrt_jax.attention(q, k, v, return_lse=True, **kw)
  ref_o, ref_lse = reference.attention(q, k, v, return_lse=True, **kw)
  _check(o, ref_o, case)
  _check_lse(lse, ref_lse, case)
  ct = normal(rng, q.shape, BF16)
  _check_grads(_grads(fn, (q, k, v), ct), _grads(ref, _f32((q, k, v)), ct), f"{case} grads")


def test_attention_rows_without_keys(platform, rng):
  """Batch element 0 has no valid key at all, and in element 1 the first queries' block precedes
  every key's: those rows give o = 0, lse = -inf and zero gradients, nothing is NaN."""
  b, tq, tk = 2, 40, 40
  q, k, v, _ = _qkv(rng, b, tq, tk, 4, 2, 64)
  valid = jnp.asarray(np.stack([np.zeros(tk, bool), np.ones(tk, bool)]))
  k_ids = jnp.ones((b, tk), jnp.int32)
  q_ids = jnp.asarray(np.where(np.arange(tq) < 5, 0, 1)[None].repeat(b, 0).astype(np.int32))
  kw = {"q_block_ids": q_ids, "k_block_ids": k_ids, "k_valid": valid}
  o, lse = flashrt_jax.attention(q, k, v, return_lse=True, **kw)
  o32, lse = np.asarray(o.astype(F32)), np.asarray(lse)
  assert not np.isnan(o32).any() and not np.isnan(lse).any(), "NaN in o or lse"
  assert (o32[0] == 0).all() and (o32[1, :5] == 0).all(), "rows without keys are not zero"
  assert np.isneginf(lse[0]).all() and np.isneginf(lse[1, :, :5]).all(), "lse of rows without keys is not -inf"
  _check(o, _ref(q, k, v, **kw), f"attention empty rows on {platform}")
  ct = normal(rng, q.shape, BF16)
  dq, dk, dv = _grads(lambda q, k, v: flashrt_jax.attention(q, k, v, **kw), (q, k, v), ct)
  for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
    assert not np.isnan(np.asarray(g.astype(F32))).any(), f"NaN in {name}"
  assert (np.asarray(dq[0]) == 0).all() and (np.asarray(dq[1, :5]) == 0).all(), "dq of empty rows not zero"
  assert (np.asarray(dk[0]) == 0).all() and (np.asarray(dv[0]) == 0).all(), "dk/dv of invalid keys not zero"
  want = _grads(lambda q, k, v: reference.attention(q, k, v, **kw), _f32((q, k, v)), ct)
  _check_grads((dq, dk, dv), want, f"attention empty rows grads on {platform}")


def _query_validity(b, t):
  """(b, t) bool: element 0 has isolated invalid queries and a run of 40 (on GPU with 8 query heads
  per KV head, tokens 32..47 of it fill a whole 128-row query tile), element 1 has no valid query,
  the others end in padding."""
  valid = np.ones((b, t), bool)
  valid[0, [0, 7, t // 2 + 10, t - 1]] = False
  valid[0, 20:60] = False
  valid[1] = False
  valid[2:, t - 20:] = False
  valid[2:, 10] = False
  return valid


@pytest.mark.parametrize("kind", ["none", "causal", "pi05", "pi05-suffix"])
def test_attention_invalid_queries(platform, rng, kind):
  """Invalid queries see no key: o = 0 and lse = -inf exactly, dq = 0 exactly and nothing flows to
  dk / dv from their rows (changing their cotangent leaves dk / dv bit for bit); the valid rows and
  all gradients match the reference, nothing is NaN."""
  b, hq, hkv, d = (3, 8, 1, 256) if platform == "gpu" else (3, 4, 1, 64)
  tk = 100
  tq = 30 if kind == "pi05-suffix" else tk
  case = f"attention invalid queries {kind} tq={tq} tk={tk} on {platform}"
  q, k, v, _ = _qkv(rng, b, tq, tk, hq, hkv, d)
  qv = _query_validity(b, tq)
  kw, ref_kw = _masks(kind, b, tq, tk)
  kw, ref_kw = dict(kw, q_valid=jnp.asarray(qv)), dict(ref_kw, q_valid=jnp.asarray(qv))
  o, lse = flashrt_jax.attention(q, k, v, return_lse=True, **kw)
  o32, lse32 = np.asarray(o.astype(F32)), np.asarray(lse)
  assert not np.isnan(o32).any() and not np.isnan(lse32).any(), f"{case}: NaN in o or lse"
  assert (o32[~qv] == 0).all(), f"{case}: o of invalid queries is not zero"
  assert np.isneginf(lse32.transpose(0, 2, 1)[~qv]).all(), f"{case}: lse of invalid queries is not -inf"
  ref_o, ref_lse = _ref(q, k, v, return_lse=True, **ref_kw)
  _check(o, ref_o, case)
  _check_lse(lse, ref_lse, case)

  fn = lambda q, k, v: flashrt_jax.attention(q, k, v, **kw)
  ct = normal(rng, q.shape, BF16)
  dq, dk, dv = _grads(fn, (q, k, v), ct)
  assert (np.asarray(dq.astype(F32))[~qv] == 0).all(), f"{case}: dq of invalid queries is not zero"
  want = _grads(lambda q, k, v: reference.attention(q, k, v, **ref_kw), _f32((q, k, v)), ct)
  _check_grads((dq, dk, dv), want, case)
  ct_other = jnp.where(jnp.asarray(qv)[:, :, None, None], ct, 100 * normal(rng, q.shape, BF16))
  _, dk_other, dv_other = _grads(fn, (q, k, v), ct_other)
  assert_bits_equal(dk, dk_other, f"{case}: dk depends on the cotangent of invalid queries")
  assert_bits_equal(dv, dv_other, f"{case}: dv depends on the cotangent of invalid queries")


# ---------------------------------------------------------------------------------------------
# Gradients


GRAD_CASES = [
    pytest.param("pi05", 200, 200, 4, 1, 64, id="pi05-200-mqa4"),
    # On GPU at 1018 tokens the padded camera view (tokens 256..511) is folded rows 2048..4095: whole
    # query tiles of padding, which skip every key tile.
    pytest.param("pi05+qpad", 200, 200, 8, 1, 64, id="pi05+qpad-200-mqa8"),
    pytest.param("causal+padding", 51, 99, 4, 2, 72, id="causal+padding-51x99-gqa2-d72"),
    pytest.param("none", 33, 77, 2, 2, 128, id="none-33x77-d128"),
    pytest.param("pi05-suffix", 51, 1018, 8, 1, 256, id="pi05-suffix-51x1018-mqa8-d256"),
]


@pytest.mark.parametrize("kind,tq,tk,hq,hkv,d", GRAD_CASES)
def test_attention_grads_match_reference(platform, rng, kind, tq, tk, hq, hkv, d):
  b = 2 if platform == "gpu" else 1
  if platform == "gpu" and kind in ("pi05", "pi05+qpad"):
    tq = tk = 1018
  case = f"attention grads {kind} tq={tq} tk={tk} Hq={hq} Hkv={hkv} D={d} on {platform}"
  q, k, v, _ = _qkv(rng, b, tq, tk, hq, hkv, d)
  kw, ref_kw = _masks(kind, b, tq, tk)
  ct = normal(rng, q.shape, BF16)
  got = _grads(lambda q, k, v: flashrt_jax.attention(q, k, v, **kw), (q, k, v), ct)
  want = _grads(lambda q, k, v: reference.attention(q, k, v, **ref_kw), _f32((q, k, v)), ct)
  for g, x in zip(got, (q, k, v)):
    assert g.dtype == x.dtype, f"{case}: gradient dtype {g.dtype}, want {x.dtype}"
  _check_grads(got, want, case)


def test_attention_deterministic(platform, rng):
  """Two runs of the forward and backward give the same bits."""
  b, hq, hkv, d = _heads(platform)
  q, k, v, _ = _qkv(rng, b, 200, 200, hq, hkv, d)
  kw, _ = _masks("pi05", b, 200, 200)
  ct = normal(rng, q.shape, BF16)
  step = jax.jit(lambda q, k, v: (flashrt_jax.attention(q, k, v, **kw),
                                  _grads(lambda q, k, v: flashrt_jax.attention(q, k, v, **kw), (q, k, v), ct)))
  first, second = step(q, k, v), step(q, k, v)
  for i, (x, y) in enumerate(zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second))):
    assert_bits_equal(x, y, f"attention run-to-run (leaf {i}) on {platform}")


# ---------------------------------------------------------------------------------------------
# Transformations


def _small(rng, b=2, tq=24, tk=40, hq=4, hkv=2, d=64, tp=0):
  return _qkv(rng, b, tq, tk, hq, hkv, d, tp=tp)


def test_attention_jit_matches_eager(platform, rng):
  q, k, v, _ = _small(rng)
  fn = lambda q, k, v: flashrt_jax.attention(q, k, v, mask="causal", return_lse=True)
  for x, y in zip(fn(q, k, v), jax.jit(fn)(q, k, v)):
    assert_bits_equal(x, y, f"attention jit vs eager on {platform}")


def test_attention_vmap(platform, rng):
  """vmap over an extra leading axis (q, k, v and the masks batched; and k, v shared) equals a loop."""
  n, b, t = 3, 2, 40
  q = normal(rng, (n, b, t, 4, 64), BF16)
  k, v = normal(rng, (n, b, t, 2, 64), BF16), normal(rng, (n, b, t, 2, 64), BF16)
  ids = jnp.asarray(np.stack([_pi05_layout(b, t)[0] + i for i in range(n)]))
  valid = jnp.asarray(np.stack([np.roll(_pi05_layout(b, t)[1], i, axis=1) for i in range(n)]))
  fn = lambda q, k, v, ids, valid: flashrt_jax.attention(q, k, v, block_ids=ids, k_valid=valid)
  tol = 0.0 if platform == "cpu" else TOL  # the GPU kernels may split keys differently per batch size
  out = jax.vmap(fn)(q, k, v, ids, valid)
  for i in range(n):
    err = rel_l2(out[i], fn(q[i], k[i], v[i], ids[i], valid[i]))
    assert err <= tol, f"vmap slice {i}: rel L2 {err:.2e}"
  shared = jax.vmap(fn, in_axes=(0, None, None, None, None))(q, k[0], v[0], ids[0], valid[0])
  for i in range(n):
    assert rel_l2(shared[i], fn(q[i], k[0], v[0], ids[0], valid[0])) <= tol, f"vmap shared kv slice {i}"
  ct = normal(rng, q.shape, BF16)
  loss = lambda q, k, v: jnp.sum(jax.vmap(fn)(q, k, v, ids, valid).astype(F32) * ct.astype(F32))
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for i in range(n):
    one = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, ids[i], valid[i]).astype(F32) * ct[i].astype(F32)),
                   argnums=(0, 1, 2))(q[i], k[i], v[i])
    for g, w in zip(grads, one):
      assert rel_l2(g[i], w) <= tol, f"vmap grad slice {i}: rel L2 {rel_l2(g[i], w):.2e}"


def test_attention_scan_and_remat(platform, rng):
  """Attention layers in a lax.scan, with and without jax.checkpoint, under grad and jit."""
  q, k, v, prefix = _small(rng, tp=16)
  ws = normal(rng, (3, 64, 64), F32, std=0.1)

  def loss(ws, q, remat):
    def layer(x, w):
      f = lambda x: flashrt_jax.attention(x, k, v, prefix_kv=prefix, mask="causal")
      f = jax.checkpoint(f) if remat else f
      return (f(x).astype(F32) @ w).astype(BF16), None
    x, _ = jax.lax.scan(layer, q, ws)
    return jnp.sum(jnp.square(x.astype(F32)))

  plain = jax.jit(jax.grad(lambda ws, q: loss(ws, q, False), argnums=(0, 1)))(ws, q)
  remat = jax.jit(jax.grad(lambda ws, q: loss(ws, q, True), argnums=(0, 1)))(ws, q)
  for i, (x, y) in enumerate(zip(plain, remat)):
    assert not np.isnan(np.asarray(x.astype(F32))).any(), f"NaN in scan grad {i}"
    if platform == "cpu":
      assert_bits_equal(x, y, f"scan grad {i}: remat vs plain")
    else:
      assert rel_l2(x, y) <= 1e-3, f"scan grad {i}: remat vs plain rel L2 {rel_l2(x, y):.2e}"


def test_attention_hlo_has_custom_calls(platform, rng):
  q, k, v, _ = _small(rng)
  fn = jax.grad(lambda q, k, v: jnp.sum(flashrt_jax.attention(q, k, v, mask="causal").astype(F32)),
                argnums=(0, 1, 2))
  targets = flashrt_targets(fn, q, k, v)
  assert {"flashrt_attention_fwd", "flashrt_attention_bwd"} <= targets, f"compiled HLO has {targets}"


# ---------------------------------------------------------------------------------------------
# openpi's mask convention


def _openpi_make_attn_mask(input_mask, ar_mask):
  """openpi's make_attn_mask, from its definition."""
  ar_mask = jnp.broadcast_to(ar_mask, input_mask.shape)
  cumsum = jnp.cumsum(ar_mask, axis=1)
  attn = cumsum[:, None, :] <= cumsum[:, :, None]
  valid = input_mask[:, None, :] * input_mask[:, :, None]
  return jnp.logical_and(attn, valid)


def _openpi_attention(q, k, v, attn_mask):
  """openpi's einsum attention in float32 (gemma.py): masked logits set to big_neg."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  q = _f32(q).reshape(b, t, hkv, hq // hkv, d) * d ** -0.5
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, _f32(k), precision=jax.lax.Precision.HIGHEST)
  logits = jnp.where(attn_mask[:, None, None, :, :], logits, -2.3819763e38)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, _f32(v), precision=jax.lax.Precision.HIGHEST)
  return out.reshape(b, t, hq, d)


def _openpi_masks(rng, b, t):
  input_mask = rng.random((b, t)) > 0.2
  input_mask[:, 0] = True
  ar_mask = rng.random((b, t)) > 0.8
  return jnp.asarray(input_mask), jnp.asarray(ar_mask)


@pytest.mark.parametrize("ar_rank", [1, 2])
def test_make_attention_mask_ids_matches_openpi(rng, ar_rank):
  b, t = 3, 37
  input_mask, ar_mask = _openpi_masks(rng, b, t)
  if ar_rank == 1:
    ar_mask = ar_mask[0]
  ids, valid = flashrt_jax.make_attention_mask_ids(input_mask, ar_mask)
  assert ids.dtype == jnp.int32 and ids.shape == (b, t) and valid.shape == (b, t)
  ours = reference.attention_visible(b, t, t, q_block_ids=ids, k_block_ids=ids, k_valid=valid, q_valid=valid)
  want = _openpi_make_attn_mask(input_mask, ar_mask)
  assert np.array_equal(np.asarray(ours), np.asarray(want)), "mask from block ids differs from make_attn_mask"


@pytest.mark.parametrize("invalid_queries", ["zero", "mean_v"])
def test_openpi_attention_matches_einsum(platform, rng, invalid_queries):
  b, t = 2, 45
  q, k, v, _ = _qkv(rng, b, t, t, 4, 1, 64)
  input_mask, ar_mask = _openpi_masks(rng, b, t)
  o = flashrt_jax.openpi_attention(q, k, v, input_mask=input_mask, ar_mask=ar_mask, invalid_queries=invalid_queries)
  want = _openpi_attention(q, k, v, _openpi_make_attn_mask(input_mask, ar_mask))
  rows = np.asarray(input_mask)
  if invalid_queries == "zero":
    assert (np.asarray(o.astype(F32))[~rows] == 0).all(), "invalid query rows are not zero"
    want = jnp.where(input_mask[:, :, None, None], want, 0.0)
  _check(o, want, f"openpi_attention {invalid_queries} on {platform}")


# ---------------------------------------------------------------------------------------------
# Bad input


def _bad_cases():
  def inputs():
    r = np.random.default_rng(0)
    q, k, v, _ = _qkv(r, 2, 8, 8, 4, 2, 64)
    return q, k, v

  def call(**kw):
    def run():
      q, k, v = inputs()
      args = {"q": q, "k": k, "v": v}
      for name in ("q", "k", "v"):
        if name in kw:
          args[name] = kw.pop(name)(args[name])
      return flashrt_jax.attention(args["q"], args["k"], args["v"], **kw)
    return run

  ids = jnp.zeros((2, 8), jnp.int32)
  kv = jnp.zeros((2, 5, 2, 64), BF16)
  C = lambda name, run, err, match: pytest.param(run, err, match, id=name)
  return [
      C("q-f32", call(q=lambda x: x.astype(F32)), TypeError, r"attention: q must be bfloat16 or float16"),
      C("q-notarray", call(q=lambda x: [1.0]), TypeError, r"attention: q must be an array"),
      C("k-dtype", call(k=lambda x: x.astype(F16)), TypeError, r"attention: k must have the dtype of q"),
      C("q-rank3", call(q=lambda x: x[0]), ValueError, r"attention: q must have shape \(B, Tq, Hq, D\)"),
      C("k-rank3", call(k=lambda x: x[0]), ValueError, r"attention: k must have shape"),
      C("k-head-dim", call(k=lambda x: x[..., :32]), ValueError, r"attention: k must have shape \(2, \?, \?, 64\)"),
      C("k-batch", call(k=lambda x: x[:1]), ValueError, r"attention: k must have shape \(2, "),
      C("v-shape", call(v=lambda x: x[:, :5]), ValueError, r"attention: v must have shape \(2, 8, 2, 64\)"),
      C("heads", call(k=lambda x: jnp.concatenate([x, x[:, :, :1]], 2), v=lambda x: jnp.concatenate([x, x[:, :, :1]], 2)),
        ValueError, r"attention: the KV heads of k \(3\) must divide the query heads of q \(4\)"),
      C("head-dim-300", call(q=lambda x: jnp.zeros((2, 8, 4, 300), BF16), k=lambda x: jnp.zeros((2, 8, 2, 300), BF16),
                             v=lambda x: jnp.zeros((2, 8, 2, 300), BF16)),
        ValueError, r"attention: head_dim \(the last axis of q\) must be <= 256, got 300"),
      C("empty", call(q=lambda x: x[:, :0]), ValueError, r"attention: q must not be empty"),
      C("mask-name", call(mask="bidirectional"), ValueError, r"attention: mask must be one of"),
      C("causal+ids", call(mask="causal", block_ids=ids), ValueError, r"attention: mask='causal' cannot be combined"),
      C("ids-and-qk-ids", call(block_ids=ids, q_block_ids=ids, k_block_ids=ids), ValueError,
        r"attention: give block_ids or q_block_ids/k_block_ids"),
      C("q-ids-alone", call(q_block_ids=ids), ValueError, r"attention: q_block_ids and k_block_ids must be given together"),
      C("ids-shape", call(block_ids=ids[:, :7]), ValueError, r"attention: block_ids must have shape \(2, 8\)"),
      C("ids-float", call(block_ids=ids.astype(F32)), TypeError, r"attention: block_ids must be an integer array"),
      C("k-ids-shape", call(q_block_ids=ids, k_block_ids=ids[:, :6]), ValueError,
        r"attention: k_block_ids must have shape \(2, 8\)"),
      C("valid-shape", call(k_valid=jnp.ones((2, 9), bool)), ValueError, r"attention: k_valid must have shape \(2, 8\)"),
      C("valid-prefix-shape", call(prefix_kv=(kv, kv), k_valid=jnp.ones((2, 8), bool)), ValueError,
        r"attention: k_valid must have shape \(2, 13\)"),
      C("valid-float", call(k_valid=jnp.ones((2, 8), F32)), TypeError, r"attention: k_valid must be bool or an integer"),
      C("q-valid-shape", call(q_valid=jnp.ones((2, 9), bool)), ValueError, r"attention: q_valid must have shape \(2, 8\)"),
      C("q-valid-prefix-shape", call(prefix_kv=(kv, kv), q_valid=jnp.ones((2, 13), bool)), ValueError,
        r"attention: q_valid must have shape \(2, 8\)"),
      C("q-valid-float", call(q_valid=jnp.ones((2, 8), F32)), TypeError, r"attention: q_valid must be bool or an integer"),
      C("block-ids-cross", call(q=lambda x: x[:, :3], block_ids=ids), ValueError,
        r"attention: block_ids needs as many queries as keys"),
      C("prefix-not-pair", call(prefix_kv=kv), TypeError, r"attention: prefix_kv must be a pair"),
      C("prefix-heads", call(prefix_kv=(kv[:, :, :1], kv[:, :, :1])), ValueError, r"attention: prefix_kv\[0\] must have shape"),
      C("prefix-dtype", call(prefix_kv=(kv.astype(F16), kv)), TypeError, r"attention: prefix_kv\[0\] must have the dtype"),
      C("prefix-v-len", call(prefix_kv=(kv, kv[:, :4])), ValueError, r"attention: prefix_kv\[1\] must have shape \(2, 5, 2, 64\)"),
      C("softcap-zero", call(softcap=0.0), ValueError, r"attention: softcap must be finite and > 0"),
      C("softcap-array", call(softcap=jnp.float32(1.0)), TypeError, r"attention: softcap must be a Python or numpy number"),
      C("scale-nan", call(softmax_scale=float("nan")), ValueError, r"attention: softmax_scale must be finite"),
  ]


@pytest.mark.parametrize("run,error,match", _bad_cases())
def test_attention_bad_input(run, error, match):
  with pytest.raises(error, match=match):
    run()


def test_openpi_attention_bad_input(rng):
  q, k, v, _ = _qkv(rng, 2, 8, 8, 4, 2, 64)
  ok = jnp.ones((2, 8), bool)
  with pytest.raises(ValueError, match=r"openpi_attention: invalid_queries must be"):
    flashrt_jax.openpi_attention(q, k, v, input_mask=ok, ar_mask=ok, invalid_queries="nan")
  with pytest.raises(ValueError, match=r"make_attention_mask_ids: ar_mask must have shape"):
    flashrt_jax.openpi_attention(q, k, v, input_mask=ok, ar_mask=ok[:, :5])


def _raw_fwd(q, k, v, *, k2=None, q_block=None, has_block=False, has_valid=False):
  b, _, hkv, d = k.shape
  k2 = jnp.zeros((b, 0, hkv, d), k.dtype) if k2 is None else k2
  empty = jnp.zeros((b, 0), jnp.int32)
  return raw.attention_fwd(q, k, v, k2, k2, empty if q_block is None else q_block, empty, empty,
                           softmax_scale=0.125, softcap=0.0, has_block_mask=has_block, has_valid_mask=has_valid)


@pytest.mark.parametrize("what,match", [
    ("head_dim", r"attention_fwd: q head_dim must be 64, 128 or 256"),
    ("mask-missing", r"attention_fwd: q_block must have shape \(2, 8\), got \(2, 0\)"),
    ("mask-unflagged", r"attention_fwd: q_block must be empty when its has_\* attribute is false"),
    ("k2-heads", r"attention_fwd: k2 must have shape \(2, T, 2, 64\)"),
])
def test_attention_handler_rejects_bad_operands(platform, rng, what, match):
  """The C++ handler re-checks what reaches it and returns an error instead of crashing."""
  d = 72 if what == "head_dim" else 64
  q, k, v, _ = _qkv(rng, 2, 8, 8, 4, 2, d)
  kw = {}
  if what == "mask-missing":
    kw = {"has_block": True}
  elif what == "mask-unflagged":
    kw = {"q_block": jnp.zeros((2, 8), jnp.int32)}
  elif what == "k2-heads":
    kw = {"k2": jnp.zeros((2, 3, 1, 64), BF16)}
  with pytest.raises(Exception, match=match):
    jax.block_until_ready(_raw_fwd(q, k, v, **kw))
