// CPU reference attention: the definition in attention.h evaluated row by row in float32, one
// (batch, query, head) row at a time, softmax with the row maximum subtracted. Not fast; exact
// enough to check the CUDA kernels and to run the whole FFI path in CPU-only CI.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention/attention.h"
#include "common/fp8_cpu.h"

namespace fr::cpu {
namespace {

std::vector<float> ToFloat(const void* p, DType t, int64_t n) {
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = LoadAsFloat(p, t, i);
  return out;
}

void Store(const std::vector<float>& x, void* p, DType t) {
  for (int64_t i = 0; i < static_cast<int64_t>(x.size()); ++i) StoreFromFloat(p, t, i, x[i]);
}

float Dot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

// The inputs of one call as float32, with the two key sources addressed as one key axis.
struct Operands {
  const AttentionArgs& a;
  std::vector<float> q, k1, v1, k2, v2;

  explicit Operands(const AttentionArgs& args)
      : a(args),
        q(ToFloat(a.q, a.dtype, a.batch * a.tq * a.hq * a.head_dim)),
        k1(ToFloat(a.k, a.dtype, a.batch * a.tk1 * a.hkv * a.head_dim)),
        v1(ToFloat(a.v, a.dtype, a.batch * a.tk1 * a.hkv * a.head_dim)),
        k2(a.tk2 ? ToFloat(a.k2, a.dtype, a.batch * a.tk2 * a.hkv * a.head_dim) : std::vector<float>()),
        v2(a.tk2 ? ToFloat(a.v2, a.dtype, a.batch * a.tk2 * a.hkv * a.head_dim) : std::vector<float>()) {}

  // Offset of key j (of the joint axis) of KV head h in its source; `second` says which source.
  int64_t KeyOffset(int64_t b, int64_t j, int64_t h, bool* second) const {
    *second = j >= a.tk1;
    return *second ? ((b * a.tk2 + j - a.tk1) * a.hkv + h) * a.head_dim : ((b * a.tk1 + j) * a.hkv + h) * a.head_dim;
  }
  const float* Q(int64_t b, int64_t i, int64_t h) const { return &q[((b * a.tq + i) * a.hq + h) * a.head_dim]; }

  // Which keys query i of batch element b sees.
  void Visible(int64_t b, int64_t i, std::vector<char>* vis) const {
    const int64_t tk = a.tk();
    for (int64_t j = 0; j < tk; ++j) {
      bool ok = a.k_valid == nullptr || a.k_valid[b * tk + j] != 0;
      if (a.q_block != nullptr) ok = ok && a.k_block[b * tk + j] <= a.q_block[b * a.tq + i];
      (*vis)[j] = ok;
    }
  }

  // Soft-capped, scaled logit of query row `qi` against key j; `t` gets tanh(x / softcap) (0 without cap).
  float Logit(const float* qi, const float* kj, float* t) const {
    float x = a.softmax_scale * Dot(qi, kj, a.head_dim);
    if (a.softcap > 0.0f) {
      *t = std::tanh(x / a.softcap);
      return a.softcap * *t;
    }
    *t = 0.0f;
    return x;
  }
};

}  // namespace

void AttentionForward(const AttentionArgs& a, const AttentionForwardOut& out) {
  const Operands in(a);
  const int64_t tk = a.tk(), d = a.head_dim, group = a.group();
  std::vector<float> o(a.batch * a.tq * a.hq * d, 0.0f), s(tk), acc(d);
  std::vector<char> vis(tk);
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t i = 0; i < a.tq; ++i) {
      in.Visible(b, i, &vis);
      for (int64_t h = 0; h < a.hq; ++h) {
        const int64_t kh = h / group;
        const float* qi = in.Q(b, i, h);
        float m = -std::numeric_limits<float>::infinity(), t;
        bool any = false;
        for (int64_t j = 0; j < tk; ++j) {
          if (!vis[j]) continue;
          bool second;
          int64_t off = in.KeyOffset(b, j, kh, &second);
          s[j] = in.Logit(qi, (second ? in.k2 : in.k1).data() + off, &t);
          m = any ? std::fmax(m, s[j]) : s[j];
          any = true;
        }
        float& lse = out.lse[(b * a.hq + h) * a.tq + i];
        if (!any) {  // no visible key: o stays 0
          lse = -std::numeric_limits<float>::infinity();
          continue;
        }
        float l = 0.0f;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t j = 0; j < tk; ++j) {
          if (!vis[j]) continue;
          bool second;
          int64_t off = in.KeyOffset(b, j, kh, &second);
          const float* vj = (second ? in.v2 : in.v1).data() + off;
          float p = std::exp(s[j] - m);
          l += p;
          for (int64_t c = 0; c < d; ++c) acc[c] += p * vj[c];
        }
        float* oi = &o[((b * a.tq + i) * a.hq + h) * d];
        for (int64_t c = 0; c < d; ++c) oi[c] = acc[c] / l;
        lse = m + std::log(l);
      }
    }
  }
  Store(o, out.o, a.dtype);
}

// With p = exp(logit - lse) and D = rowsum(dO * O): dS = p (dO . v - D), times the soft-cap's
// derivative 1 - tanh^2; dq = scale sum_j dS k_j, dk_j = scale sum_i dS q_i, dv_j = sum_i p dO_i.
// dk / dv of a KV head sum over the query heads of its group.
void AttentionBackward(const AttentionArgs& a, const AttentionBackwardArgs& g) {
  const Operands in(a);
  const int64_t tk = a.tk(), d = a.head_dim, group = a.group();
  const int64_t nq = a.batch * a.tq * a.hq * d;
  const std::vector<float> o = ToFloat(g.o, a.dtype, nq), d_o = ToFloat(g.d_o, a.dtype, nq);
  std::vector<float> dq(nq, 0.0f), dk1(in.k1.size(), 0.0f), dv1(in.v1.size(), 0.0f), dk2(in.k2.size(), 0.0f),
      dv2(in.v2.size(), 0.0f);
  std::vector<char> vis(tk);
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t i = 0; i < a.tq; ++i) {
      in.Visible(b, i, &vis);
      for (int64_t h = 0; h < a.hq; ++h) {
        const float lse = g.lse[(b * a.hq + h) * a.tq + i];
        if (lse == -std::numeric_limits<float>::infinity()) continue;  // no visible key: zero gradients
        const int64_t kh = h / group, row = ((b * a.tq + i) * a.hq + h) * d;
        const float* qi = &in.q[row];
        const float* doi = &d_o[row];
        const float di = Dot(doi, &o[row], d);
        float* dqi = &dq[row];
        for (int64_t j = 0; j < tk; ++j) {
          if (!vis[j]) continue;
          bool second;
          int64_t off = in.KeyOffset(b, j, kh, &second);
          const float* kj = (second ? in.k2 : in.k1).data() + off;
          const float* vj = (second ? in.v2 : in.v1).data() + off;
          float* dkj = (second ? dk2 : dk1).data() + off;
          float* dvj = (second ? dv2 : dv1).data() + off;
          float t;
          float p = std::exp(in.Logit(qi, kj, &t) - lse);
          float ds = p * (Dot(doi, vj, d) - di);
          if (a.softcap > 0.0f) ds *= 1.0f - t * t;
          ds *= a.softmax_scale;
          for (int64_t c = 0; c < d; ++c) {
            dqi[c] += ds * kj[c];
            dkj[c] += ds * qi[c];
            dvj[c] += p * doi[c];
          }
        }
      }
    }
  }
  Store(dq, g.dq, a.dtype);
  Store(dk1, g.dk, a.dtype);
  Store(dv1, g.dv, a.dtype);
  if (a.tk2) {
    Store(dk2, g.dk2, a.dtype);
    Store(dv2, g.dv2, a.dtype);
  }
}

}  // namespace fr::cpu
