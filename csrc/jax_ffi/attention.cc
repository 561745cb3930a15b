// FFI handlers for flash attention (attention/attention.h). Layouts (..., T, H, D): the leading axes
// (at least one, batch; more under vmap) are flattened into the kernel's batch.
//
// Every call passes all eight operands: an absent second key source is (..., 0, hkv, head_dim) and
// an absent mask is a zero-size int32 array; the attributes has_block_mask / has_valid_mask say
// which masks are present (and are checked against the operands' sizes).
#include <cmath>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "jax_ffi/checks.h"

namespace fr::jax_ffi {
namespace {

constexpr const char* kFwd = "attention_fwd";
constexpr const char* kBwd = "attention_bwd";

using Shape = std::vector<int64_t>;

// "(lead..., a, b, c)" with symbolic or numeric trailing entries, for error messages.
std::string ShapeText(const Shape& lead, const std::vector<std::string>& tail) {
  std::string s = "(";
  for (int64_t d : lead) s += std::to_string(d) + ", ";
  for (size_t i = 0; i < tail.size(); ++i) s += (i ? ", " : "") + tail[i];
  return s + ")";
}

template <typename Dims>
bool HasShape(const Dims& got, const Shape& lead, const Shape& tail) {
  if (got.size() != lead.size() + tail.size()) return false;
  for (size_t i = 0; i < got.size(); ++i)
    if (got[i] != (i < lead.size() ? lead[i] : tail[i - lead.size()])) return false;
  return true;
}

ffi::Error Expect(const char* op, const char* arg, const ffi::AnyBuffer& buf, ffi::DataType type,
                  const char* type_name, const Shape& lead, const Shape& tail) {
  if (buf.element_type() != type) return BadArg(op, arg, std::string("must be ") + type_name);
  if (!HasShape(buf.dimensions(), lead, tail)) {
    std::vector<std::string> t;
    for (int64_t d : tail) t.push_back(std::to_string(d));
    return BadShape(op, arg, ShapeText(lead, t), buf.dimensions());
  }
  return ffi::Error::Success();
}

const char* TypeName(ffi::DataType t) { return t == ffi::DataType::BF16 ? "bfloat16 (the dtype of q)" : "float16 (the dtype of q)"; }

// (..., T, H, D) of k-like operands: same leading axes as q, head count hkv and head dim d.
ffi::Error KeyShape(const char* op, const char* arg, const ffi::AnyBuffer& buf, ffi::DataType type, const Shape& lead,
                    int64_t hkv, int64_t d, int64_t* t) {
  auto dims = buf.dimensions();
  if (dims.size() != lead.size() + 3 || !HasShape(dims.first(lead.size()), lead, {}) || dims[lead.size() + 1] != hkv ||
      dims[lead.size() + 2] != d)
    return BadShape(op, arg, ShapeText(lead, {"T", std::to_string(hkv), std::to_string(d)}), dims);
  if (buf.element_type() != type) return BadArg(op, arg, std::string("must be ") + TypeName(type));
  *t = dims[lead.size()];
  return ffi::Error::Success();
}

ffi::Error Mask(const char* op, const char* arg, const ffi::AnyBuffer& buf, bool present, const Shape& lead,
                int64_t t, const int32_t** out) {
  if (!present) {
    if (buf.element_count() != 0) return BadArg(op, arg, "must be empty when its has_* attribute is false");
    *out = nullptr;
    return ffi::Error::Success();
  }
  if (auto e = Expect(op, arg, buf, ffi::DataType::S32, "int32", lead, {t}); e.failure()) return e;
  *out = static_cast<const int32_t*>(buf.untyped_data());
  return ffi::Error::Success();
}

// Decodes and checks the operands shared by the forward and backward passes.
ffi::Error Decode(const char* op, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                  const ffi::AnyBuffer& k2, const ffi::AnyBuffer& v2, const ffi::AnyBuffer& q_block,
                  const ffi::AnyBuffer& k_block, const ffi::AnyBuffer& k_valid, float softmax_scale, float softcap,
                  bool has_block_mask, bool has_valid_mask, AttentionArgs* a, Shape* lead) {
  const ffi::DataType type = q.element_type();
  if (!ToDType(type, &a->dtype) || (a->dtype != DType::kBF16 && a->dtype != DType::kF16))
    return BadArg(op, "q", "must be bfloat16 or float16");
  auto qd = q.dimensions();
  if (qd.size() < 4)
    return BadArg(op, "q", "must have shape (batch..., tq, hq, head_dim), got " + DimsString(qd));
  const size_t r = qd.size();
  lead->assign(qd.begin(), qd.begin() + (r - 3));
  a->batch = 1;
  for (int64_t d : *lead) a->batch *= d;
  a->tq = qd[r - 3], a->hq = qd[r - 2], a->head_dim = qd[r - 1];
  if (a->batch * a->tq * a->hq == 0) return BadArg(op, "q", "must be non-empty, got " + DimsString(qd));
  if (a->head_dim != 64 && a->head_dim != 128 && a->head_dim != 256)
    return BadArg(op, "q", "head_dim must be 64, 128 or 256 (smaller dims are zero-padded by the caller), got " +
                               std::to_string(a->head_dim));
  auto kd = k.dimensions();
  a->hkv = kd.size() == r ? kd[r - 2] : 0;
  if (a->hkv <= 0 || a->hq % a->hkv != 0)
    return BadArg(op, "k", "must have a head count dividing hq = " + std::to_string(a->hq) + ", got shape " +
                               DimsString(kd));
  if (auto e = KeyShape(op, "k", k, type, *lead, a->hkv, a->head_dim, &a->tk1); e.failure()) return e;
  if (a->tk1 == 0) return BadArg(op, "k", "must hold at least one key, got " + DimsString(kd));
  if (auto e = Expect(op, "v", v, type, TypeName(type), *lead, {a->tk1, a->hkv, a->head_dim}); e.failure()) return e;
  if (auto e = KeyShape(op, "k2", k2, type, *lead, a->hkv, a->head_dim, &a->tk2); e.failure()) return e;
  if (auto e = Expect(op, "v2", v2, type, TypeName(type), *lead, {a->tk2, a->hkv, a->head_dim}); e.failure()) return e;
  if (!std::isfinite(softmax_scale)) return BadArg(op, "softmax_scale", "must be finite");
  if (!(softcap >= 0.0f) || !std::isfinite(softcap)) return BadArg(op, "softcap", "must be finite and >= 0 (0: off)");
  a->softmax_scale = softmax_scale;
  a->softcap = softcap;
  a->q = q.untyped_data();
  a->k = k.untyped_data();
  a->v = v.untyped_data();
  a->k2 = a->tk2 ? k2.untyped_data() : nullptr;
  a->v2 = a->tk2 ? v2.untyped_data() : nullptr;
  if (auto e = Mask(op, "q_block", q_block, has_block_mask, *lead, a->tq, &a->q_block); e.failure()) return e;
  if (auto e = Mask(op, "k_block", k_block, has_block_mask, *lead, a->tk(), &a->k_block); e.failure()) return e;
  if (auto e = Mask(op, "k_valid", k_valid, has_valid_mask, *lead, a->tk(), &a->k_valid); e.failure()) return e;
  return ffi::Error::Success();
}

ffi::Error CheckWorkspace(const char* op, const ffi::AnyBuffer& ws, int64_t need) {
  if (ws.element_type() != ffi::DataType::U8) return BadArg(op, "workspace", "must be uint8");
#ifdef FLASHRT_CUDA
  if (static_cast<int64_t>(ws.size_bytes()) < need)
    return BadArg(op, "workspace", "must hold at least " + std::to_string(need) + " bytes, got " +
                                       std::to_string(ws.size_bytes()));
#else
  (void)need;  // the CPU kernels need no scratch
#endif
  return ffi::Error::Success();
}

#ifdef FLASHRT_CUDA
ffi::Error Launched(const char* op, cudaError_t err) {
  if (err == cudaSuccess) err = cudaGetLastError();
  return CudaError(op, err);
}
#endif

ffi::Error AttentionFwdImpl(Stream stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer k2,
                            ffi::AnyBuffer v2, ffi::AnyBuffer q_block, ffi::AnyBuffer k_block, ffi::AnyBuffer k_valid,
                            ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse, float softmax_scale,
                            float softcap, bool has_block_mask, bool has_valid_mask) {
  AttentionArgs a{};
  Shape lead;
  if (auto e = Decode(kFwd, q, k, v, k2, v2, q_block, k_block, k_valid, softmax_scale, softcap, has_block_mask,
                      has_valid_mask, &a, &lead);
      e.failure())
    return e;
  const ffi::DataType type = q.element_type();
  if (auto e = Expect(kFwd, "o", *o, type, TypeName(type), lead, {a.tq, a.hq, a.head_dim}); e.failure()) return e;
  if (auto e = Expect(kFwd, "lse", *lse, ffi::DataType::F32, "float32", lead, {a.hq, a.tq}); e.failure()) return e;
  AttentionForwardOut out{o->untyped_data(), static_cast<float*>(lse->untyped_data())};
#ifdef FLASHRT_CUDA
  return Launched(kFwd, cuda::AttentionForward(a, out, stream));
#else
  (void)stream;
  cpu::AttentionForward(a, out);
  return ffi::Error::Success();
#endif
}

ffi::Error AttentionBwdImpl(Stream stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer k2,
                            ffi::AnyBuffer v2, ffi::AnyBuffer q_block, ffi::AnyBuffer k_block, ffi::AnyBuffer k_valid,
                            ffi::AnyBuffer o, ffi::AnyBuffer lse, ffi::AnyBuffer d_o, ffi::Result<ffi::AnyBuffer> dq,
                            ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                            ffi::Result<ffi::AnyBuffer> dk2, ffi::Result<ffi::AnyBuffer> dv2,
                            ffi::Result<ffi::AnyBuffer> workspace, float softmax_scale, float softcap,
                            bool has_block_mask, bool has_valid_mask) {
  AttentionArgs a{};
  Shape lead;
  if (auto e = Decode(kBwd, q, k, v, k2, v2, q_block, k_block, k_valid, softmax_scale, softcap, has_block_mask,
                      has_valid_mask, &a, &lead);
      e.failure())
    return e;
  const ffi::DataType type = q.element_type();
  const char* tn = TypeName(type);
  const Shape q_tail{a.tq, a.hq, a.head_dim}, k1_tail{a.tk1, a.hkv, a.head_dim}, k2_tail{a.tk2, a.hkv, a.head_dim};
  if (auto e = Expect(kBwd, "o", o, type, tn, lead, q_tail); e.failure()) return e;
  if (auto e = Expect(kBwd, "lse", lse, ffi::DataType::F32, "float32", lead, {a.hq, a.tq}); e.failure()) return e;
  if (auto e = Expect(kBwd, "d_o", d_o, type, tn, lead, q_tail); e.failure()) return e;
  if (auto e = Expect(kBwd, "dq", *dq, type, tn, lead, q_tail); e.failure()) return e;
  if (auto e = Expect(kBwd, "dk", *dk, type, tn, lead, k1_tail); e.failure()) return e;
  if (auto e = Expect(kBwd, "dv", *dv, type, tn, lead, k1_tail); e.failure()) return e;
  if (auto e = Expect(kBwd, "dk2", *dk2, type, tn, lead, k2_tail); e.failure()) return e;
  if (auto e = Expect(kBwd, "dv2", *dv2, type, tn, lead, k2_tail); e.failure()) return e;
  if (auto e = CheckWorkspace(kBwd, *workspace,
                              AttentionBackwardWorkspaceBytes(a.batch, a.tq, a.tk(), a.hq, a.hkv, a.head_dim));
      e.failure())
    return e;
  AttentionBackwardArgs g{};
  g.o = o.untyped_data();
  g.lse = static_cast<const float*>(lse.untyped_data());
  g.d_o = d_o.untyped_data();
  g.dq = dq->untyped_data();
  g.dk = dk->untyped_data();
  g.dv = dv->untyped_data();
  g.dk2 = a.tk2 ? dk2->untyped_data() : nullptr;
  g.dv2 = a.tk2 ? dv2->untyped_data() : nullptr;
#ifdef FLASHRT_CUDA
  return Launched(kBwd, cuda::AttentionBackward(a, g, workspace->untyped_data(), stream));
#else
  (void)stream;
  cpu::AttentionBackward(a, g);
  return ffi::Error::Success();
#endif
}

}  // namespace

FLASHRT_DEFINE_HANDLER(AttentionFwd, AttentionFwdImpl,
                       .Arg<ffi::AnyBuffer>()  // q (..., tq, hq, D) bf16 / f16, D in {64, 128, 256}
                       .Arg<ffi::AnyBuffer>()  // k (..., tk1, hkv, D): first key source, tk1 >= 1
                       .Arg<ffi::AnyBuffer>()  // v (..., tk1, hkv, D)
                       .Arg<ffi::AnyBuffer>()  // k2 (..., tk2, hkv, D): second key source, tk2 may be 0
                       .Arg<ffi::AnyBuffer>()  // v2 (..., tk2, hkv, D)
                       .Arg<ffi::AnyBuffer>()  // q_block (..., tq) s32, or empty
                       .Arg<ffi::AnyBuffer>()  // k_block (..., tk1 + tk2) s32, or empty
                       .Arg<ffi::AnyBuffer>()  // k_valid (..., tk1 + tk2) s32 (nonzero: valid), or empty
                       .Ret<ffi::AnyBuffer>()  // o (..., tq, hq, D)
                       .Ret<ffi::AnyBuffer>()  // lse (..., hq, tq) f32
                       .Attr<float>("softmax_scale")
                       .Attr<float>("softcap")  // 0: off
                       .Attr<bool>("has_block_mask")
                       .Attr<bool>("has_valid_mask"));

FLASHRT_DEFINE_HANDLER(AttentionBwd, AttentionBwdImpl,
                       .Arg<ffi::AnyBuffer>()  // q (..., tq, hq, D)
                       .Arg<ffi::AnyBuffer>()  // k (..., tk1, hkv, D)
                       .Arg<ffi::AnyBuffer>()  // v (..., tk1, hkv, D)
                       .Arg<ffi::AnyBuffer>()  // k2 (..., tk2, hkv, D)
                       .Arg<ffi::AnyBuffer>()  // v2 (..., tk2, hkv, D)
                       .Arg<ffi::AnyBuffer>()  // q_block (..., tq) s32, or empty
                       .Arg<ffi::AnyBuffer>()  // k_block (..., tk) s32, or empty
                       .Arg<ffi::AnyBuffer>()  // k_valid (..., tk) s32, or empty
                       .Arg<ffi::AnyBuffer>()  // o (..., tq, hq, D): the forward output
                       .Arg<ffi::AnyBuffer>()  // lse (..., hq, tq) f32: the forward lse
                       .Arg<ffi::AnyBuffer>()  // d_o (..., tq, hq, D)
                       .Ret<ffi::AnyBuffer>()  // dq (..., tq, hq, D)
                       .Ret<ffi::AnyBuffer>()  // dk (..., tk1, hkv, D)
                       .Ret<ffi::AnyBuffer>()  // dv (..., tk1, hkv, D)
                       .Ret<ffi::AnyBuffer>()  // dk2 (..., tk2, hkv, D)
                       .Ret<ffi::AnyBuffer>()  // dv2 (..., tk2, hkv, D)
                       .Ret<ffi::AnyBuffer>()  // workspace (u8), AttentionBackwardWorkspaceBytes
                       .Attr<float>("softmax_scale")
                       .Attr<float>("softcap")
                       .Attr<bool>("has_block_mask")
                       .Attr<bool>("has_valid_mask"));

}  // namespace fr::jax_ffi
