// Flash attention: softmax(scale * q k^T + mask) v with fp32 softmax and accumulation, never
// materialising the (Tq, Tk) logits. Layouts are (batch, time, heads, head_dim), contiguous.
//
// Keys come from one or two sources that together form the key axis of length tk = tk1 + tk2:
// key j < tk1 is row j of (k, v), key j >= tk1 is row j - tk1 of (k2, v2). The second source lets
// suffix queries attend to a cached prefix plus their own keys without concatenating the caches.
//
// Visibility of key j to query i of batch element b (every mask is expressed this way):
//   (k_valid == nullptr || k_valid[b * tk + j] != 0) &&
//   (q_block == nullptr || k_block[b * tk + j] <= q_block[b * tq + i])
// Causal attention is block ids = positions. A query with no visible key gets o = 0, lse = -inf
// and zero gradients.
#pragma once

#include <cstdint>

#include "common/dtypes.h"

namespace fr {

struct AttentionArgs {
  DType dtype;  // kBF16 or kF16: q, k, v, k2, v2, o and all gradients
  int64_t batch, tq, tk1, tk2, hq, hkv, head_dim;
  const void* q;   // (batch, tq, hq, head_dim)
  const void* k;   // (batch, tk1, hkv, head_dim)
  const void* v;   // (batch, tk1, hkv, head_dim)
  const void* k2;  // (batch, tk2, hkv, head_dim) or nullptr when tk2 == 0
  const void* v2;
  float softmax_scale;     // logits = softmax_scale * q.k (before the soft-cap)
  float softcap;           // 0: none; else logits = softcap * tanh(logits / softcap)
  const int32_t* q_block;  // (batch, tq) or nullptr: no block mask (then k_block is ignored)
  const int32_t* k_block;  // (batch, tk)
  const int32_t* k_valid;  // (batch, tk), nonzero = visible, or nullptr: all keys valid

  int64_t tk() const { return tk1 + tk2; }
  int64_t group() const { return hq / hkv; }  // query heads per KV head
};

// Forward results: o (batch, tq, hq, head_dim) in dtype, lse (batch, hq, tq) float32, the natural
// log of the sum of exp(logits) over the visible keys.
struct AttentionForwardOut {
  void* o;
  float* lse;
};

// Backward inputs and results; dk2 / dv2 only with a second key source.
struct AttentionBackwardArgs {
  const void* o;
  const float* lse;
  const void* d_o;  // (batch, tq, hq, head_dim)
  void* dq;         // (batch, tq, hq, head_dim)
  void* dk;         // (batch, tk1, hkv, head_dim)
  void* dv;
  void* dk2;  // (batch, tk2, hkv, head_dim) or nullptr
  void* dv2;
};

// Query splits of the dK / dV backward kernel: with fewer (batch, KV head, key tile) CTAs than the
// GPU has SMs (MQA at small batch), the query loop of each key tile is split over CTAs that write
// float32 partial dK / dV, summed in a second kernel (deterministic: fixed order).
inline int64_t AttentionBackwardQuerySplits(int64_t batch, int64_t tq, int64_t tk, int64_t hq, int64_t hkv) {
  constexpr int64_t kKeysPerTile = 64, kRowsPerTile = 64, kTargetCtas = 132, kMaxSplits = 4;
  const int64_t ctas = batch * hkv * ((tk + kKeysPerTile - 1) / kKeysPerTile);
  if (ctas * 2 > kTargetCtas) return 1;
  const int64_t q_tiles = (tq * (hq / hkv) + kRowsPerTile - 1) / kRowsPerTile;
  int64_t splits = (kTargetCtas + ctas - 1) / ctas;
  splits = splits < q_tiles ? splits : q_tiles;
  return splits < kMaxSplits ? (splits > 1 ? splits : 1) : kMaxSplits;
}

// Device scratch (bytes) of the CUDA backward, passed in as an XLA result buffer; the CPU handler
// ignores it. A pure function of the shapes so the Python side can size the buffer.
inline int64_t AttentionBackwardWorkspaceBytes(int64_t batch, int64_t tq, int64_t tk, int64_t hq, int64_t hkv,
                                               int64_t head_dim) {
  // rowsum(do * o) and the lse in log2 units, rounded up to 16 bytes for the float4 reads that follow
  int64_t bytes = (2 * batch * hq * tq * int64_t(sizeof(float)) + 15) / 16 * 16;
  const int64_t splits = AttentionBackwardQuerySplits(batch, tq, tk, hq, hkv);
  if (splits > 1) bytes += splits * 2 * batch * tk * hkv * head_dim * int64_t(sizeof(float));  // partial dK, dV
  return bytes;
}

namespace cpu {
void AttentionForward(const AttentionArgs& a, const AttentionForwardOut& out);
void AttentionBackward(const AttentionArgs& a, const AttentionBackwardArgs& g);
}  // namespace cpu

}  // namespace fr

#if defined(FLASHRT_CUDA) || defined(__CUDACC__)
#include <cuda_runtime.h>
namespace fr::cuda {
cudaError_t AttentionForward(const AttentionArgs& a, const AttentionForwardOut& out, cudaStream_t stream);
cudaError_t AttentionBackward(const AttentionArgs& a, const AttentionBackwardArgs& g, void* workspace,
                              cudaStream_t stream);
}  // namespace fr::cuda
#endif
