// Flash attention on Hopper (sm_90a) with bf16/f16 tensor-core MMAs, fp32 softmax and accumulation,
// never materialising the (Tq, Tk) logits.
//
// Rows: the query heads that share a KV head are folded into the rows of one tile (row = query
// position * group + head in group), so each K/V tile is read once for all of them (MQA / GQA).
// Masks: every key gets an "effective block" (its block id, or INT_MAX when invalid / past the end)
// and a query sees it iff that is <= the query's block id. Before its main loop each CTA lists the
// tiles it sees at all, and marks those it sees in full, so masked-out tiles cost nothing and full
// tiles skip the per-element test.
//
// Forward: one CTA per (128 folded rows, batch, KV head[, key split]), warp-specialized: a producer
// warp loads the listed K / V tiles with TMA into two stages (mbarriers), and two consumer warpgroups
// of 64 rows run warpgroup MMAs (wgmma) from 128-byte-swizzled shared memory, Q K^T of one tile
// issued together with P V of the previous one so the softmax overlaps the tensor cores, the two
// warpgroups taking turns at issuing. Key splits (when the row tiles fill less than half the GPU)
// merge inside a thread-block cluster through distributed shared memory; few query rows (decode) go
// to decode.cu.
// Backward (deterministic, no atomics; wgmma as well): a preprocess kernel (rowsum(dO * O),
// lse in log2 units), one kernel per key tile for dK / dV looping over the query tiles (all heads of
// the group, so a shared KV head accumulates without races), and one kernel per query tile for dQ
// (warp-specialized like the forward).
#include <cudaTypedefs.h>  // CUtensorMap, PFN_cuTensorMapEncodeTiled

#include "attention/sm90.cuh"

namespace fr::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// The warp-specialized kernels' key pipeline (forward and dQ)

constexpr int kSpecThreads = 3 * 128;      // two consumer warpgroups and one producer warpgroup
constexpr int kConsumerThreads = 2 * 128;
// Named barriers (0 is __syncthreads): the consumers' Q (and dO) loaded; kTurnBar + w: warpgroup w's
// turn to issue (forward) or its dS stored (dQ).
constexpr int kQueryBar = 1, kTurnBar = 2;
// setmaxnreg: 40 x 128 + 232 x 256 <= 168 x 384, the count __launch_bounds__(kSpecThreads, 1) starts from.
constexpr int kProducerRegs = 40, kConsumerRegs = 232;

// TMA maps of the two key sources' K and V, (batch, keys, KV heads, D) boxed as 64 keys x 64
// columns with the 128-byte swizzle: one box is one region of a key Tile.
struct KeyMaps {
  CUtensorMap k1, v1, k2, v2;
};

// The key tiles of a K or V stage: one TMA box per 64 columns, or, for the tile across the end of
// the first key source (the last tile of a cached prefix), cp.async by the warp, completed and
// fenced for wgmma before the arrive. `full` expects one arrival per lane.
template <int D>
__device__ __forceinline__ void ProduceKeyStage(const Params& p, const CUtensorMap& m1, const CUtensorMap& m2,
                                                const char* src1, const char* src2, const Tile& dst,
                                                uint64_t* full, int b, int h, int64_t j0, int lane) {
  if (j0 < p.tk1 && j0 + kKeysPerTile > p.tk1 && p.tk2 > 0) {
    constexpr int kChunks = D / 8;
    const int c = lane % kChunks;
#pragma unroll 1
    for (int r = lane / kChunks; r < kKeysPerTile; r += 32 / kChunks) {
      const int64_t j = j0 + r;
      const char* g = j < p.tk1 ? src1 + RowOffset<D>(b, j, p.tk1, p.hkv, h) * 2
                                : src2 + RowOffset<D>(b, j - p.tk1, p.tk2, p.hkv, h) * 2;
      CpAsync16(dst.Addr(r, c), j < p.tk ? g + c * 16 : src1, j < p.tk);
    }
    CpAsyncCommit();
    CpAsyncWait<0>();
    FenceAsyncProxy();
    MbarArrive(full);
    return;
  }
  if (lane != 0) {
    MbarArrive(full);
    return;
  }
  MbarArriveExpectTx(full, kKeysPerTile * D * 2);
  const bool first = j0 < p.tk1;  // keys past the map's end arrive as zeros
  const CUtensorMap& map = first ? m1 : m2;
  const int j = int(first ? j0 : j0 - p.tk1);
#pragma unroll
  for (int r = 0; r < D / 64; ++r) TmaLoad4d(dst.Addr(0, 8 * r), &map, 64 * r, h, j, b, full);
}

// The key-tile pipeline of the warp-specialized kernels: bars = k_full[2], v_full[2], k_empty[2],
// v_empty[2] (full: the producer warp's lanes arrive, TMA bytes complete; empty: every consumer
// thread arrives). Thread 0, before a barrier.
__device__ __forceinline__ void InitKeyPipeline(uint64_t* bars) {
  for (int st = 0; st < 2; ++st) {
    MbarInit(&bars[st], 32), MbarInit(&bars[2 + st], 32);
    MbarInit(&bars[4 + st], kConsumerThreads), MbarInit(&bars[6 + st], kConsumerThreads);
  }
  MbarInitFence();
}

// Consumers: their cp.async loads of Q (and dO) landed, fenced for wgmma, and everyone's visible.
__device__ __forceinline__ void WaitQueryRows() {
  CpAsyncWait<0>();
  FenceAsyncProxy();
  NamedBarSync(kQueryBar, kConsumerThreads);
}

// The producer warp's loop: K (with its keys' effective blocks, eff[2][64]) and V of the n listed
// tiles into stages st = it % 2 of k0 / v0 (the second stage follows the first), each once both
// consumers have released the stage's previous tile.
template <int D>
__device__ __forceinline__ void ProduceKeyTiles(const Params& p, const KeyMaps& maps, const Tile& k0, const Tile& v0,
                                                int* eff, uint64_t* bars, const uint16_t* list, int n, int b, int h,
                                                int lane) {
  constexpr int kStageBytes = kKeysPerTile * D * 2;
  for (int it = 0; it < n; ++it) {
    const int st = it & 1;
    const uint32_t free_parity = ((it >> 1) & 1) ^ 1;  // a fresh barrier counts as free
    const int64_t j0 = int64_t(list[it] & ~kFullTile) * kKeysPerTile;
    MbarWait(&bars[4 + st], free_parity);
    eff[st * kKeysPerTile + lane] = KeyEff(p, b, j0 + lane);
    eff[st * kKeysPerTile + 32 + lane] = KeyEff(p, b, j0 + 32 + lane);
    ProduceKeyStage<D>(p, maps.k1, maps.k2, p.k, p.k2, Tile{k0.base + st * kStageBytes, kKeysPerTile}, &bars[st],
                       b, h, j0, lane);
    MbarWait(&bars[6 + st], free_parity);
    ProduceKeyStage<D>(p, maps.v1, maps.v2, p.v, p.v2, Tile{v0.base + st * kStageBytes, kKeysPerTile},
                       &bars[2 + st], b, h, j0, lane);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward

constexpr int kFwdRows = 128;  // rows per forward CTA: two consumer warpgroups of 64

template <int D>
constexpr int FwdSmemBytes() {  // 1024: alignment; then Q, K / V stages, key blocks, reduction, mbarriers
  return 1024 + (kFwdRows * D + 4 * kKeysPerTile * D) * 2 + 2 * kKeysPerTile * 4 + 16 + 8 * 8;
}

// One CTA per (128 folded rows, batch, KV head[, key split]), warp-specialized: warpgroup 2's first
// warp loads the listed K / V tiles with TMA into two stages each (mbarriers: full when landed, empty
// when both consumers are done), while warpgroups 0 and 1 each own 64 rows. A consumer issues
// S_it = Q K_it^T together with P V of the previous tile, then runs the softmax of S_it while those
// run; the two consumers take turns at issuing (ping-pong), so one's softmax overlaps the other's
// MMAs.
template <typename T, int D>
__global__ void __launch_bounds__(kSpecThreads, 1)
    ForwardKernel(Params p, AttentionForwardOut out, int tiles_per_split, const __grid_constant__ KeyMaps maps) {
  constexpr int kDTiles = D / 8;
  constexpr uint32_t kStageBytes = kKeysPerTile * D * 2;
  extern __shared__ __align__(128) char smem_raw[];
  char* smem = smem_raw + ((1024 - SmemAddr(smem_raw) % 1024) % 1024);  // wgmma's swizzle atoms
  const Tile sq{smem, kFwdRows};
  // Stage st of the double-buffered K and V tiles (computed, not indexed, to stay in registers).
  auto sk = [&](int st) { return Tile{smem + (kFwdRows + st * kKeysPerTile) * D * 2, kKeysPerTile}; };
  auto sv = [&](int st) { return Tile{smem + (kFwdRows + (2 + st) * kKeysPerTile) * D * 2, kKeysPerTile}; };
  int* eff = reinterpret_cast<int*>(smem + (kFwdRows + 4 * kKeysPerTile) * D * 2);  // [2][64], with K
  int* red = eff + 2 * kKeysPerTile;                                                 // 4 ints
  uint64_t* k_full = reinterpret_cast<uint64_t*>(red + 4);
  uint64_t *v_full = k_full + 2, *k_empty = k_full + 4, *v_empty = k_full + 6;
  uint8_t* flags = reinterpret_cast<uint8_t*>(k_full + 8);
  uint16_t* list = reinterpret_cast<uint16_t*>(flags + ((tiles_per_split + 1) & ~1));
  const int n_tiles_total = int((p.tk + kKeysPerTile - 1) / kKeysPerTile);

  const int b = blockIdx.y / p.hkv, h = blockIdx.y % p.hkv, split = blockIdx.z;
  const int64_t row0 = int64_t(blockIdx.x) * kFwdRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warp / 4;
  const int begin = split * tiles_per_split;
  const int end = min(n_tiles_total, begin + tiles_per_split);

  // The consumers' Q rows load while the tile list is built.
  if (wg < 2) LoadQueryRows<D, kConsumerThreads, kFwdRows>(p, p.q, sq, b, h, row0);
  CpAsyncCommit();
  if (threadIdx.x == 0) InitKeyPipeline(k_full);
  int qmin, qmax;
  bool complete;
  QueryBlockRange(p, b, row0, kFwdRows, red, &qmin, &qmax, &complete);  // (its barriers publish the inits)
  const int n = ListKeyTiles(p, b, qmin, qmax, complete, begin, max(begin, end), list, flags, red + 3);

  if (wg == 2) {  // producer
    WarpgroupRegisters<kProducerRegs>();
    if (warp == 8) ProduceKeyTiles<D>(p, maps, sk(0), sv(0), eff, k_full, list, n, b, h, lane);
    if (gridDim.z > 1) {
      __syncthreads();  // matches the consumers' barrier before the merge
      MergeKeySplitsBarriers();
    }
    return;
  }

  WarpgroupRegisters<kConsumerRegs>();
  // This thread's two rows (r0 and r0 + 8 of the warp's 16) and their query blocks.
  const int r0 = 16 * warp + lane / 4;
  int qb[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t t = (row0 + r0 + 8 * i) / p.group;
    qb[i] = t < p.tq ? QueryBlock(p, b, t) : INT_MIN;
  }
  WaitQueryRows();

  float o[kDTiles][4];
  Zero(o);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  uint32_t pa[4][4];  // P of the previous tile as the A operand of O += P V

  // Descriptors: Q and K K-major, V MN-major (the region size as leading byte offset).
  const TileDesc dq(sq, 16, 1024), dk(sk(0), 16, 1024), dv(sv(0), kKeysPerTile * 128, 1024);
  auto issue_pv = [&](int st) {  // O += P V of V stage st: V MN-major, 16 keys x 64 columns of D per MMA
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int nc = 0; nc < D / 64; ++nc)
        Elem<T>::GmmaRS(*reinterpret_cast<float(*)[8][4]>(&o[8 * nc]), pa[kk],
                        dv.At(16 * kk, 8 * nc, st * kStageBytes));
    GmmaCommit();
  };
  // Turns: warpgroup w issues after the other's arrive on kTurnBar + w; warpgroup 0 goes first, and
  // each warpgroup arrives as often as the other syncs.
  if (wg == 1 && n > 0) NamedBarArrive(kTurnBar, kConsumerThreads);
  for (int it = 0; it < n; ++it) {
    const int st = it & 1;
    MbarWait(&k_full[st], (it >> 1) & 1);
    if (it > 0) MbarWait(&v_full[st ^ 1], ((it - 1) >> 1) & 1);
    NamedBarSync(kTurnBar + wg, kConsumerThreads);
    // S = Q K^T for this warpgroup's 64 rows: K-major Q and K, 16 columns of D per step. Rows 64 * wg
    // and K row 0 are multiples of 8, where Addr adds no swizzle.
    float s[8][4];
    Zero(s);
    GmmaFenceOperands(o);
    GmmaFence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      Elem<T>::template GmmaSS<64, 0, 0>(s, dq.At(64 * wg, 2 * kk), dk.At(0, 2 * kk, st * kStageBytes), kk);
    }
    GmmaCommit();
    if (it > 0) {
      issue_pv(st ^ 1);
      GmmaWait<1>();
    } else {
      GmmaWait<0>();
    }
    GmmaFenceOperands(s);
    // The other warpgroup's turn once S is in: its MMAs still queue behind this one's P V, and an
    // arrive between the issue and the wait made ptxas serialize the MMAs (C7514).
    if (wg == 0 || it + 1 < n) NamedBarArrive(kTurnBar + 1 - wg, kConsumerThreads);

    float alpha[2];
    SoftmaxStep(p, s, list[it] & kFullTile ? nullptr : eff + st * kKeysPerTile, qb, m, l, alpha);
    GmmaWait<0>();  // the previous tile's P V: O and pa are free again
    MbarArrive(&k_empty[st]);
    if (it > 0) MbarArrive(&v_empty[st ^ 1]);
    GmmaFenceOperands(o);
    RescaleRows(o, alpha);
    PackP<T>(s, pa);
  }
  if (n > 0) {  // the last tile's P V
    MbarWait(&v_full[(n - 1) & 1], ((n - 1) >> 1) & 1);
    GmmaFenceOperands(o);
    GmmaFence();
    issue_pv((n - 1) & 1);
    GmmaWait<0>();
    GmmaFenceOperands(o);
  }

  float inv[2];
  RowInverses(l, inv);

  if (gridDim.z == 1) {
    // Stage this warp's 16 output rows in its own Q rows, then store them with 16-byte writes.
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      sq.Store2(r0, dt * 8 + 2 * (lane % 4), Elem<T>::Pack(o[dt][0] * inv[0], o[dt][1] * inv[0]));
      sq.Store2(r0 + 8, dt * 8 + 2 * (lane % 4), Elem<T>::Pack(o[dt][2] * inv[1], o[dt][3] * inv[1]));
    }
    __syncwarp();
    // A warp-wide store covers kRowStep rows. With one KV head (MQA) the folded rows are the
    // output's rows; else (t, head) comes from a 32-bit division per row (64-bit ones cost ~5% here).
    constexpr int kChunks = D / 8, kRowStep = 32 / kChunks;
    const int c = lane % kChunks;
#pragma unroll
    for (int r = 16 * warp + lane / kChunks; r < 16 * (warp + 1); r += kRowStep) {
      const int row = int(row0) + r;
      if (row >= p.rows) break;  // rows grow with r
      int64_t offset = (int64_t(b) * p.rows + row) * D;
      if (p.hkv != 1) {
        const int t = row / p.group;
        offset = RowOffset<D>(b, t, p.tq, p.hq, h * p.group + row - t * p.group);
      }
      *reinterpret_cast<int4*>(static_cast<char*>(out.o) + (offset + c * 8) * 2) =
          *reinterpret_cast<const int4*>(sq.At(r, c));
    }
    if (lane % 4 == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int64_t row = row0 + r0 + 8 * i, t = row / p.group;
        if (t < p.tq)
          out.lse[(int64_t(b) * p.hq + h * p.group + row % p.group) * p.tq + t] =
              l[i] > 0.0f ? (m[i] + log2f(l[i])) * kLn2 : -INFINITY;
      }
    }
    return;
  }
  // The merge buffer overlaps Q, K and V: this CTA's warps are done with them, and the cluster
  // barrier's wait in MergeKeySplits tells that every other CTA is.
  __syncthreads();  // every warp is done with Q, K and V in shared memory
  MergeKeySplits<T, D, kFwdRows, D>(p, out, smem, b, h, row0, o, inv, m, l, r0, 0, kConsumerThreads / 32);
}

// ---------------------------------------------------------------------------------------------
// Backward

constexpr int kBwdRows = 64;  // query rows per tile in both backward kernels

// delta = rowsum(dO * O); lse2 = lse in log2 units, +inf for rows that see no key (so P = 0 there).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) BackwardPrepKernel(Params p, AttentionBackwardArgs g, float* delta,
                                                               float* lse2) {
  const int64_t rows_total = int64_t(p.batch) * p.tq * p.hq;
  const int64_t row = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;  // (b, t, head)
  const int lane = threadIdx.x % 32;
  if (row >= rows_total) return;
  const int64_t t = (row / p.hq) % p.tq, b = row / (p.hq * p.tq), head = row % p.hq;
  const int64_t i = (b * p.hq + head) * p.tq + t;
  const float lse = g.lse[i];
  float acc = 0.0f;
  // A row that saw no key (a padding query) has P = 0: its delta is never used, so O and dO stay unread.
  for (int c = lane; c < D / 8 && lse != -INFINITY; c += 32) {
    const int4 ov = reinterpret_cast<const int4*>(static_cast<const T*>(g.o) + row * D)[c];
    const int4 dv = reinterpret_cast<const int4*>(static_cast<const T*>(g.d_o) + row * D)[c];
    const uint32_t* ou = reinterpret_cast<const uint32_t*>(&ov);
    const uint32_t* du = reinterpret_cast<const uint32_t*>(&dv);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 a = Elem<T>::Unpack(ou[i]), d = Elem<T>::Unpack(du[i]);
      acc += a.x * d.x + a.y * d.y;
    }
  }
  for (int off = 16; off; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    delta[i] = acc;
    lse2[i] = lse == -INFINITY ? INFINITY : lse * kLog2e;
  }
}

// Per-row data of a backward query tile: lse2, delta and query block (INT_MIN, lse2 = +inf on padding).
struct RowInfo {
  float* lse2;
  float* delta;
  int* qb;
};

__device__ __forceinline__ void LoadRowInfo(const Params& p, const float* lse2, const float* delta, RowInfo dst,
                                            int b, int h, int64_t row0) {
  if (threadIdx.x < kBwdRows) {
    const int64_t row = row0 + threadIdx.x, t = row / p.group;
    if (t < p.tq) {
      const int64_t i = (int64_t(b) * p.hq + h * p.group + row % p.group) * p.tq + t;
      dst.lse2[threadIdx.x] = lse2[i], dst.delta[threadIdx.x] = delta[i], dst.qb[threadIdx.x] = QueryBlock(p, b, t);
    } else {
      dst.lse2[threadIdx.x] = INFINITY, dst.delta[threadIdx.x] = 0.0f, dst.qb[threadIdx.x] = INT_MIN;
    }
  }
}

// One warp's 16 x 32 block of P and dS (rows m0.., keys n0..) of a 64 x 64 tile, stored to shared
// memory as [row][key] in T. s holds Q K^T, dp holds dO V^T.
template <typename T>
__device__ __forceinline__ void SoftmaxGrad(const Params& p, float (&s)[4][4], const float (&dp)[4][4], int m0,
                                            int n0, const RowInfo& ri, const int* eff, bool full, const Tile* sp,
                                            const Tile& sds) {
  const int lane = threadIdx.x % 32;
  float dlogit[4][4];  // d logit / d s
  float scale = 1.0f;  // logit in log2 units = scale * s afterwards
  if (p.softcap > 0.0f) {
    const float pre = p.softcap_pre, post = p.softcap * kLog2e;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float th = tanhf(pre * s[nt][i]);
        s[nt][i] = post * th;
        dlogit[nt][i] = p.softmax_scale * (1.0f - th * th);
      }
  } else {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) dlogit[nt][i] = p.softmax_scale;
    scale = p.softmax_scale * kLog2e;
  }
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; i += 2) {
      const int r = m0 + lane / 4 + 4 * i, c = n0 + nt * 8 + 2 * (lane % 4);
      float pv[2], ds[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool vis = full | (eff[c + e] <= ri.qb[r]);
        pv[e] = vis ? Exp2(fmaf(s[nt][i + e], scale, -ri.lse2[r])) : 0.0f;
        ds[e] = pv[e] * (dp[nt][i + e] - ri.delta[r]) * dlogit[nt][i + e];
      }
      if (sp) sp->Store2(r, c, Elem<T>::Pack(pv[0], pv[1]));
      sds.Store2(r, c, Elem<T>::Pack(ds[0], ds[1]));
    }
  }
}

template <int D>
constexpr int BwdKVSmemBytes() {
  return 1024 + (2 * kKeysPerTile * D + 4 * kBwdRows * D + 2 * kBwdRows * kKeysPerTile) * 2 + kKeysPerTile * 4 +
         2 * 3 * kBwdRows * 4 + 16;
}

// dK, dV for one key tile of one (batch, KV head), looping over every query tile that sees it, or
// over part gridDim.z of them (split = blockIdx.z), written as float32 partials to `partial`.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    BackwardKVKernel(Params p, AttentionBackwardArgs g, const float* delta, const float* lse2, float* partial) {
  extern __shared__ __align__(128) char smem[];
  char* ptr = smem + ((1024 - SmemAddr(smem) % 1024) % 1024);  // wgmma's swizzle atoms
  auto take = [&ptr](int bytes) { char* r = ptr; ptr += bytes; return r; };
  const Tile sk{take(kKeysPerTile * D * 2), kKeysPerTile}, sv{take(kKeysPerTile * D * 2), kKeysPerTile};
  char* q_stages = take(2 * kBwdRows * D * 2);
  char* do_stages = take(2 * kBwdRows * D * 2);
  auto sq = [&](int st) { return Tile{q_stages + st * kBwdRows * D * 2, kBwdRows}; };
  auto sdo = [&](int st) { return Tile{do_stages + st * kBwdRows * D * 2, kBwdRows}; };
  const Tile sp{take(kBwdRows * kKeysPerTile * 2), kBwdRows};
  const Tile sds{take(kBwdRows * kKeysPerTile * 2), kBwdRows};
  int* eff = reinterpret_cast<int*>(take(kKeysPerTile * 4));
  char* row_info = take(2 * 3 * kBwdRows * 4);
  auto ri = [&](int st) {
    float* f = reinterpret_cast<float*>(row_info) + st * 3 * kBwdRows;
    return RowInfo{f, f + kBwdRows, reinterpret_cast<int*>(f + 2 * kBwdRows)};
  };
  int* red = reinterpret_cast<int*>(take(16));
  const int n_qtiles = int((p.rows + kBwdRows - 1) / kBwdRows);
  uint8_t* flags = reinterpret_cast<uint8_t*>(take((n_qtiles + 1) & ~1));
  uint16_t* list = reinterpret_cast<uint16_t*>(ptr);

  const int b = blockIdx.y / p.hkv, h = blockIdx.y % p.hkv, ktile = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp % 4, wg = warp / 4;

  LoadKeyTile<D, kThreads>(p, sk, sv, eff, b, h, ktile);
  CpAsyncCommit();
  // Key range of this tile: the smallest visible block and whether some key is invisible.
  if (threadIdx.x == 0) red[0] = INT_MAX, red[1] = INT_MIN;
  __syncthreads();
  if (threadIdx.x < kKeysPerTile) {
    atomicMin(&red[0], eff[threadIdx.x]);
    atomicMax(&red[1], eff[threadIdx.x]);
  }
  __syncthreads();
  const int kmin = red[0], kmax = red[1];
  // Query tiles that see this key tile (any row's block >= kmin), full when every row sees every key.
  for (int t = warp; t < n_qtiles; t += kThreads / 32) {
    int lo = INT_MAX, hi = INT_MIN;
    bool pad = false;
    for (int r = lane; r < kBwdRows; r += 32) {
      const int64_t qt = (int64_t(t) * kBwdRows + r) / p.group;
      if (qt < p.tq) {
        const int qb = QueryBlock(p, b, qt);
        lo = min(lo, qb), hi = max(hi, qb);
      } else {
        pad = true;
      }
    }
    for (int off = 16; off; off /= 2) {
      lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, off));
      hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, off));
    }
    pad = __any_sync(0xffffffffu, pad);
    if (lane == 0) flags[t] = (kmin != kInvisible && hi >= kmin) ? (!pad && lo >= kmax ? 2 : 1) : 0;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int n = 0;
    for (int t = 0; t < n_qtiles; ++t)
      if (flags[t]) list[n++] = uint16_t(t) | (flags[t] == 2 ? kFullTile : 0);
    red[2] = n;
  }
  __syncthreads();
  // This CTA's share of the listed query tiles: list[lo, lo + n).
  const int lo = int(int64_t(red[2]) * blockIdx.z / gridDim.z);
  const int n = int(int64_t(red[2]) * (blockIdx.z + 1) / gridDim.z) - lo;
  list += lo;

  float acc[D / 8][4];  // warpgroup 0: dV, warpgroup 1: dK (64 keys x D)
  Zero(acc);
  // dV = P^T dO and dK = dS^T Q: A is P or dS ([row][key]) read M-major, B is dO or Q, N-major.
  const Tile acc_a = wg == 0 ? sp : sds;
  auto load_rows = [&](int i, int st) {
    const int64_t r0 = int64_t(list[i] & ~kFullTile) * kBwdRows;
    LoadQueryRows<D, kThreads, kBwdRows>(p, p.q, sq(st), b, h, r0);
    LoadQueryRows<D, kThreads, kBwdRows>(p, static_cast<const char*>(g.d_o), sdo(st), b, h, r0);
    LoadRowInfo(p, lse2, delta, ri(st), b, h, r0);
  };
  if (n > 0) load_rows(0, 0);
  CpAsyncCommit();
  for (int it = 0; it < n; ++it) {
    const int st = it & 1;
    CpAsyncWait<0>();
    FenceAsyncProxy();
    __syncthreads();
    {
      // S = Q K^T and dP = dO V^T for this warpgroup's 32 keys; the next query tile loads meanwhile.
      float s[4][4], dp[4][4];
      Zero(s);
      Zero(dp);
      GmmaFence();
      GroupMmaIssue<T, 4, D / 16, false, false>(s, sq(st), sk, 32 * wg);
      GroupMmaIssue<T, 4, D / 16, false, false>(dp, sdo(st), sv, 32 * wg);
      GmmaCommit();
      if (it + 1 < n) load_rows(it + 1, st ^ 1);
      CpAsyncCommit();
      GroupMmaWait(s, dp);
      SoftmaxGrad<T>(p, s, dp, 16 * wm, 32 * wg, ri(st), eff, list[it] & kFullTile, &sp, sds);
    }
    FenceAsyncProxy();  // P, dS stores -> wgmma reads
    __syncthreads();
    GmmaFenceOperands(acc);
    GmmaFence();
    const Tile acc_b = wg == 0 ? sdo(st) : sq(st);
    GroupMmaIssue<T, D / 8, kBwdRows / 16, true, true>(acc, acc_a, acc_b, 0);
    GmmaCommit();
    GmmaWait<0>();
    GmmaFenceOperands(acc);
    __syncthreads();
  }
  CpAsyncWait<0>();

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t j = int64_t(ktile) * kKeysPerTile + 16 * wm + lane / 4 + 8 * i;
    if (j >= p.tk) continue;
    if (partial != nullptr) {  // [split][dV, dK][batch][tk][hkv][D]
      float* dst = partial + ((int64_t(blockIdx.z * 2 + wg) * p.batch + b) * p.tk + j) * p.hkv * D + int64_t(h) * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<float2*>(dst + dt * 8 + 2 * (lane % 4)) = make_float2(acc[dt][2 * i], acc[dt][2 * i + 1]);
      continue;
    }
    const bool first = j < p.tk1;
    const int64_t off = first ? RowOffset<D>(b, j, p.tk1, p.hkv, h) : RowOffset<D>(b, j - p.tk1, p.tk2, p.hkv, h);
    T* dst = static_cast<T*>(wg == 0 ? (first ? g.dv : g.dv2) : (first ? g.dk : g.dk2)) + off;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const int c = dt * 8 + 2 * (lane % 4);
      *reinterpret_cast<uint32_t*>(dst + c) = Elem<T>::Pack(acc[dt][2 * i], acc[dt][2 * i + 1]);
    }
  }
}

// Sums the query splits of dK / dV: one thread per 4 elements of a (dV or dK, batch, key, KV head) row.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) BackwardKVReduceKernel(Params p, AttentionBackwardArgs g,
                                                                   const float* partial, int splits) {
  const int64_t rows = int64_t(p.batch) * p.tk * p.hkv, quads = 2 * rows * (D / 4);
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= quads) return;
  const int64_t row = i / (D / 4) % rows, which = i / (rows * (D / 4));  // which: 0 dV, 1 dK
  const int c = int(i % (D / 4)) * 4;
  float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int s = 0; s < splits; ++s) {
    const float4 v = *reinterpret_cast<const float4*>(partial + ((s * 2 + which) * rows + row) * D + c);
    sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
  }
  const int64_t h = row % p.hkv, j = row / p.hkv % p.tk, b = row / (int64_t(p.hkv) * p.tk);
  const bool first = j < p.tk1;
  const int64_t off = first ? RowOffset<D>(b, j, p.tk1, p.hkv, h) : RowOffset<D>(b, j - p.tk1, p.tk2, p.hkv, h);
  T* dst = static_cast<T*>(which == 0 ? (first ? g.dv : g.dv2) : (first ? g.dk : g.dk2)) + off + c;
  *reinterpret_cast<uint2*>(dst) = make_uint2(Elem<T>::Pack(sum.x, sum.y), Elem<T>::Pack(sum.z, sum.w));
}

template <int D>
constexpr int BwdQSmemBytes() {  // 1024: alignment; Q, dO, K / V stages, dS; key blocks, rows, reduction, mbarriers
  return 1024 + (2 * kBwdRows * D + 4 * kKeysPerTile * D + kBwdRows * kKeysPerTile) * 2 + 2 * kKeysPerTile * 4 +
         3 * kBwdRows * 4 + 16 + 8 * 8;
}

// dQ for one query tile of one (batch, KV head), looping over the key tiles it sees. Warp-specialized
// like the forward: warpgroup 2's first warp loads the tiles; warpgroups 0 and 1 each take 32 keys
// of a tile (S and dP recomputed, dS stored, dQ += dS K) without waiting for each other, and their
// halves of dQ are summed at the end.
template <typename T, int D>
__global__ void __launch_bounds__(kSpecThreads, 1) BackwardQKernel(Params p, AttentionBackwardArgs g,
                                                                  const float* delta, const float* lse2,
                                                                  const __grid_constant__ KeyMaps maps) {
  extern __shared__ __align__(128) char smem[];
  char* ptr = smem + ((1024 - SmemAddr(smem) % 1024) % 1024);  // wgmma's swizzle atoms
  auto take = [&ptr](int bytes) { char* r = ptr; ptr += bytes; return r; };
  const Tile sq{take(kBwdRows * D * 2), kBwdRows}, sdo{take(kBwdRows * D * 2), kBwdRows};
  const Tile k0{take(2 * kKeysPerTile * D * 2), kKeysPerTile}, v0{take(2 * kKeysPerTile * D * 2), kKeysPerTile};
  auto sk = [&](int st) { return Tile{k0.base + st * kKeysPerTile * D * 2, kKeysPerTile}; };
  auto sv = [&](int st) { return Tile{v0.base + st * kKeysPerTile * D * 2, kKeysPerTile}; };
  const Tile sds{take(kBwdRows * kKeysPerTile * 2), kBwdRows};
  int* eff = reinterpret_cast<int*>(take(2 * kKeysPerTile * 4));
  RowInfo ri{reinterpret_cast<float*>(take(kBwdRows * 4)), reinterpret_cast<float*>(take(kBwdRows * 4)),
             reinterpret_cast<int*>(take(kBwdRows * 4))};
  int* red = reinterpret_cast<int*>(take(16));
  uint64_t* bars = reinterpret_cast<uint64_t*>(take(8 * 8));  // k_full[2], v_full[2], k_empty[2], v_empty[2]
  const int n_ktiles = int((p.tk + kKeysPerTile - 1) / kKeysPerTile);
  uint8_t* flags = reinterpret_cast<uint8_t*>(take((n_ktiles + 1) & ~1));
  uint16_t* list = reinterpret_cast<uint16_t*>(ptr);

  const int b = blockIdx.y / p.hkv, h = blockIdx.y % p.hkv;
  const int64_t row0 = int64_t(blockIdx.x) * kBwdRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp % 4, wg = warp / 4;

  if (wg < 2) {
    LoadQueryRows<D, kConsumerThreads, kBwdRows>(p, p.q, sq, b, h, row0);
    LoadQueryRows<D, kConsumerThreads, kBwdRows>(p, static_cast<const char*>(g.d_o), sdo, b, h, row0);
  }
  CpAsyncCommit();
  LoadRowInfo(p, lse2, delta, ri, b, h, row0);
  if (threadIdx.x == 0) InitKeyPipeline(bars);
  int qmin, qmax;
  bool complete;
  QueryBlockRange(p, b, row0, kBwdRows, red, &qmin, &qmax, &complete);  // (its barriers publish the inits)
  const int n = ListKeyTiles(p, b, qmin, qmax, complete, 0, n_ktiles, list, flags, red + 3);

  if (wg == 2) {  // producer
    WarpgroupRegisters<kProducerRegs>();
    if (warp == 8) ProduceKeyTiles<D>(p, maps, k0, v0, eff, bars, list, n, b, h, lane);
    return;
  }

  WarpgroupRegisters<kConsumerRegs>();
  WaitQueryRows();
  float dq[D / 8][4];  // this warpgroup's half of the keys
  Zero(dq);
  for (int it = 0; it < n; ++it) {
    const int st = it & 1;
    MbarWait(&bars[st], (it >> 1) & 1);
    MbarWait(&bars[2 + st], (it >> 1) & 1);
    float s[4][4], dp[4][4];
    Zero(s);
    Zero(dp);
    GmmaFence();
    GroupMmaIssue<T, 4, D / 16, false, false>(s, sq, sk(st), 32 * wg);
    GroupMmaIssue<T, 4, D / 16, false, false>(dp, sdo, sv(st), 32 * wg);
    GmmaCommit();
    GroupMmaWait(s, dp);
    MbarArrive(&bars[6 + st]);  // V read
    SoftmaxGrad<T>(p, s, dp, 16 * wm, 32 * wg, ri, eff + st * kKeysPerTile, list[it] & kFullTile, nullptr, sds);
    FenceAsyncProxy();                                  // dS stores -> wgmma reads
    NamedBarSync(kTurnBar + wg, kConsumerThreads / 2);  // this warpgroup's dS columns are stored
    // dQ += dS K over this warpgroup's 32 keys: dS K-major, K N-major.
    GmmaFenceOperands(dq);
    GmmaFence();
    GroupMmaIssue<T, D / 8, 2, false, true>(dq, sds, sk(st), 0, 32 * wg);
    GmmaCommit();
    GmmaWait<0>();
    GmmaFenceOperands(dq);
    MbarArrive(&bars[4 + st]);  // K and its key blocks read
  }
  // Sum the two warpgroups' halves through shared memory (the K stages are free once both are done).
  float* partial = reinterpret_cast<float*>(k0.base);  // [kBwdRows][D]
  const int r0 = 16 * wm + lane / 4;
  NamedBarSync(kQueryBar, kConsumerThreads);
  if (wg == 1) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<float2*>(partial + (r0 + 8 * i) * D + dt * 8 + 2 * (lane % 4)) =
            make_float2(dq[dt][2 * i], dq[dt][2 * i + 1]);
  }
  NamedBarSync(kQueryBar, kConsumerThreads);
  if (wg == 1) return;

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t row = row0 + r0 + 8 * i, t = row / p.group;
    if (t >= p.tq) continue;
    T* dqr = static_cast<T*>(g.dq) + RowOffset<D>(b, t, p.tq, p.hq, int64_t(h) * p.group + row % p.group);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const int c = dt * 8 + 2 * (lane % 4);
      const float2 other = *reinterpret_cast<const float2*>(partial + (r0 + 8 * i) * D + c);
      *reinterpret_cast<uint32_t*>(dqr + c) = Elem<T>::Pack(dq[dt][2 * i] + other.x, dq[dt][2 * i + 1] + other.y);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

// A (batch, keys, KV heads, D) K or V source as a TMA map of 64-key x 64-column boxes (KeyMaps).
cudaError_t EncodeKeyMap(CUtensorMap* map, const void* base, bool bf16, int d, int64_t batch, int64_t keys,
                         int64_t hkv) {
  static const auto encode = [] {  // the driver's entry point, through the runtime (no libcuda link)
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                                           &found);
#else
    const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found);
#endif
    if (e != cudaSuccess || found != cudaDriverEntryPointSuccess) fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[4] = {cuuint64_t(d), cuuint64_t(hkv), cuuint64_t(keys), cuuint64_t(batch)};
  const cuuint64_t strides[3] = {cuuint64_t(d) * 2, cuuint64_t(hkv * d) * 2, cuuint64_t(keys * hkv * d) * 2};
  const cuuint32_t box[4] = {64, 1, kKeysPerTile, 1}, unit[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                            const_cast<void*>(base), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);  // out-of-range keys read as zeros
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

cudaError_t EncodeKeyMaps(const AttentionArgs& a, KeyMaps* maps) {
  const bool bf16 = a.dtype == DType::kBF16;
  const int d = int(a.head_dim);
  auto encode = [&](CUtensorMap* map, const void* base, int64_t keys) {
    return keys > 0 ? EncodeKeyMap(map, base, bf16, d, a.batch, keys, a.hkv) : cudaSuccess;
  };
  for (const cudaError_t e : {encode(&maps->k1, a.k, a.tk1), encode(&maps->v1, a.v, a.tk1),
                              encode(&maps->k2, a.k2, a.tk2), encode(&maps->v2, a.v2, a.tk2)})
    if (e != cudaSuccess) return e;
  return cudaSuccess;
}

// Key splits of the forward pass: when the 128-row query tiles fill less than half the GPU (decode:
// few queries, many keys), as many key ranges as keep every CTA in the first wave, at least one key
// tile each and at most 16 (the largest cluster; LaunchForward falls back to the portable 8).
int KeySplits(const Params& p, int n_tiles, int device) {
  int sms = 132;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) sms = 132;  // H100 SXM
  const int64_t row_tiles = int64_t(p.batch) * p.hkv * ((p.rows + 127) / 128);
  if (row_tiles * 2 > sms) return 1;
  return int(std::max<int64_t>(1, std::min<int64_t>({sms / row_tiles, n_tiles, kMaxSplits})));
}

template <typename T, int D>
cudaError_t Forward(const AttentionArgs& a, const AttentionForwardOut& out, cudaStream_t stream) {
  const Params p = MakeParams(a);
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  const int n_tiles = int((p.tk + kKeysPerTile - 1) / kKeysPerTile);
  const int splits = KeySplits(p, n_tiles, device);
  // Few rows (decode): the dedicated kernel of decode.cu; the 128-row kernel measured faster for a
  // 968-token prefix.
  if (splits > 1 && p.rows <= 1024) return AttentionDecodeForward(a, out, splits, stream);
  KeyMaps maps{};
  if (cudaError_t e = EncodeKeyMaps(a, &maps); e != cudaSuccess) return e;
  const cudaError_t e = LaunchSplits(
      ForwardKernel<T, D>, p, out, kFwdRows, kSpecThreads,
      [](int per_split) { return FwdSmemBytes<D>() + ListBytes(per_split); }, splits, device, stream, maps);
  return e != cudaSuccess ? e : cudaGetLastError();
}

template <typename T, int D>
cudaError_t Backward(const AttentionArgs& a, const AttentionBackwardArgs& g, void* workspace, cudaStream_t stream) {
  const Params p = MakeParams(a);
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  const int64_t rows_total = int64_t(p.batch) * p.tq * p.hq;
  float* delta = static_cast<float*>(workspace);
  float* lse2 = delta + rows_total;
  BackwardPrepKernel<T, D><<<unsigned((rows_total + 7) / 8), kThreads, 0, stream>>>(p, g, delta, lse2);

  const int n_ktiles = int((p.tk + kKeysPerTile - 1) / kKeysPerTile);
  const int n_qtiles = int((p.rows + kBwdRows - 1) / kBwdRows);
  const int splits = int(AttentionBackwardQuerySplits(a.batch, a.tq, a.tk(), a.hq, a.hkv));
  float* partial = splits > 1 ? delta + (2 * rows_total + 3) / 4 * 4 : nullptr;  // 16-byte aligned
  const int kv_smem = BwdKVSmemBytes<D>() + ListBytes(n_qtiles);
  auto kv_kernel = BackwardKVKernel<T, D>;
  if (cudaError_t e = SetSmem(kv_kernel, kv_smem, device); e != cudaSuccess) return e;
  kv_kernel<<<dim3(unsigned(n_ktiles), unsigned(p.batch * p.hkv), unsigned(splits)), kThreads, kv_smem, stream>>>(
      p, g, delta, lse2, partial);
  if (splits > 1) {
    const int64_t quads = 2 * int64_t(p.batch) * p.tk * p.hkv * (D / 4);
    BackwardKVReduceKernel<T, D><<<unsigned((quads + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p, g, partial,
                                                                                                      splits);
  }

  const int q_smem = BwdQSmemBytes<D>() + ListBytes(n_ktiles);
  auto q_kernel = BackwardQKernel<T, D>;
  if (cudaError_t e = SetSmem(q_kernel, q_smem, device); e != cudaSuccess) return e;
  KeyMaps maps{};
  if (cudaError_t e = EncodeKeyMaps(a, &maps); e != cudaSuccess) return e;
  q_kernel<<<dim3(unsigned(n_qtiles), unsigned(p.batch * p.hkv)), kSpecThreads, q_smem, stream>>>(p, g, delta, lse2,
                                                                                                 maps);
  return cudaGetLastError();
}

template <typename T, int D>
struct ForwardFn {
  static cudaError_t Run(const AttentionArgs& a, const AttentionForwardOut& out, cudaStream_t s) {
    return Forward<T, D>(a, out, s);
  }
};
template <typename T, int D>
struct BackwardFn {
  static cudaError_t Run(const AttentionArgs& a, const AttentionBackwardArgs& g, void* ws, cudaStream_t s) {
    return Backward<T, D>(a, g, ws, s);
  }
};

}  // namespace

cudaError_t AttentionForward(const AttentionArgs& a, const AttentionForwardOut& out, cudaStream_t stream) {
  return Dispatch<ForwardFn>(a, out, stream);
}

cudaError_t AttentionBackward(const AttentionArgs& a, const AttentionBackwardArgs& g, void* workspace,
                              cudaStream_t stream) {
  return Dispatch<BackwardFn>(a, g, workspace, stream);
}

}  // namespace fr::cuda
