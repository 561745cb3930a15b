// Attention forward for few query rows against many keys: a decode step (pi0.5: 50 action queries x
// 8 heads against a 1018-token cache), or any forward of at most 1024 folded rows per (batch, KV
// head) whose row tiles fill less than half the GPU.
//
// The keys split over the CTAs of a thread-block cluster, which merge their partial rows through
// distributed shared memory (MergeKeySplits); each CTA takes 64 folded rows and a range of key
// tiles, one at the decode shape. A CTA's time is then the latency of its serial chain, not
// throughput, and the training kernel ran it with one warp per scheduler. Here two warpgroups share
// the 64 rows (D >= 128): each computes S = Q K^T and the softmax for half of the tile's keys, the
// row maxima and the halves of P meet in shared memory, and each multiplies all of P by its own half
// of V's columns. A warp's S, softmax and P V chains, the partial rows it writes and the columns it
// merges are halved, and each scheduler has two warps. There is no tile list (every key's mask is a
// select per element) and no pipelining beyond two K / V stages.
#include "attention/sm90.cuh"

namespace fr::cuda {
namespace {

constexpr int kDecRows = 64;  // folded query rows per CTA

// Warpgroups per CTA: each owns D / groups output columns, at least the 64 of one wgmma.
template <int D>
constexpr int kDecGroups = D >= 128 ? 2 : 1;

template <int D>
constexpr int DecSmemBytes() {  // Q, two stages of K, V and the keys' effective blocks, row maxima, P
  return 1024 + (kDecRows * D + 4 * kKeysPerTile * D) * 2 + 2 * kKeysPerTile * 4 + 2 * kDecRows * 4 +
         2 * 2 * 4 * 128 * 4;  // 1024: alignment
}

template <typename T, int D>
__global__ void __launch_bounds__(128 * kDecGroups<D>, 1)
    DecodeKernel(Params p, AttentionForwardOut out, int tiles_per_split) {
  constexpr int kGroups = kDecGroups<D>, kN = 128 * kGroups, kCols = D / kGroups, kKeys = kKeysPerTile / kGroups;
  constexpr uint32_t kStageBytes = kKeysPerTile * D * 2;
  static_assert((kDecRows * (D + 8) + 2 * kDecRows) * 4 <= (kDecRows + 4 * kKeysPerTile) * D * 2,
                "the partial rows fit where Q, K and V were");
  extern __shared__ __align__(128) char smem_raw[];
  char* smem = smem_raw + ((1024 - SmemAddr(smem_raw) % 1024) % 1024);  // wgmma's swizzle atoms
  const Tile sq{smem, kDecRows};
  auto sk = [&](int st) { return Tile{smem + (kDecRows + st * kKeysPerTile) * D * 2, kKeysPerTile}; };
  auto sv = [&](int st) { return Tile{smem + (kDecRows + (2 + st) * kKeysPerTile) * D * 2, kKeysPerTile}; };
  int* eff = reinterpret_cast<int*>(smem + (kDecRows + 4 * kKeysPerTile) * D * 2);  // [2][64]
  float* row_max = reinterpret_cast<float*>(eff + 2 * kKeysPerTile);                  // [2 groups][64 rows]
  uint32_t* p_share = reinterpret_cast<uint32_t*>(row_max + 2 * kDecRows);            // [2][2][4][128]

  const int b = blockIdx.y / p.hkv, h = blockIdx.y % p.hkv;
  const int64_t row0 = int64_t(blockIdx.x) * kDecRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warp / 4;
  const int begin = int(blockIdx.z) * tiles_per_split;
  const int n_tiles = int((p.tk + kKeysPerTile - 1) / kKeysPerTile);
  const int n = max(0, min(n_tiles, begin + tiles_per_split) - begin);

  // The first two tiles' key blocks are read first and stored last, so that their latency overlaps
  // the loads. cp.async groups: Q with K of the first tile, then its V, then K and V of the second,
  // so that S waits for Q and K only (V arrives while S and the softmax run). Tile i's K is group
  // 2 i and its V group 2 i + 1 (the loop commits two groups per tile).
  const int first_eff = threadIdx.x < 2 * kKeysPerTile ? KeyEff(p, b, int64_t(begin) * kKeysPerTile + threadIdx.x) : 0;
  LoadQueryRows<D, kN, kDecRows>(p, p.q, sq, b, h, row0);
  auto load_tile = [&](int i, int st) {  // K and V of the split's tile i into stage st
    if (i < n) LoadKeyRows<D, kN>(p, p.k, p.k2, sk(st), b, h, begin + i);
    CpAsyncCommit();
    if (i < n) LoadKeyRows<D, kN>(p, p.v, p.v2, sv(st), b, h, begin + i);
    CpAsyncCommit();
  };
  load_tile(0, 0);
  load_tile(1, 1);
  if (threadIdx.x < 2 * kKeysPerTile) eff[threadIdx.x] = first_eff;
  const int r0 = 16 * (warp % 4) + lane / 4;  // this thread's rows: r0 and r0 + 8
  int qb[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int t = (int(row0) + r0 + 8 * i) / p.group;
    qb[i] = t < p.tq ? QueryBlock(p, b, t) : INT_MIN;
  }

  float o[kCols / 8][4];
  Zero(o);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  // Q and K K-major, V MN-major (the region size as leading byte offset); this warpgroup's columns
  // of V start at 64-column region wg * kCols / 64.
  const TileDesc dq(sq, 16, 1024), dk(sk(0), 16, 1024), dv(sv(0), kKeysPerTile * 128, 1024);
  for (int it = 0; it < n; ++it) {
    const int st = it & 1;
    CpAsyncWait<3>();  // K of tile it: its V and the next tile's K and V may still be in flight
    FenceAsyncProxy();  // cp.async data -> wgmma reads
    __syncthreads();
    // S of this warpgroup's keys (all 64 with one warpgroup; else 32, key 32 * wg on).
    float s[kKeys / 8][4];
    Zero(s);
    GmmaFence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      Elem<T>::template GmmaSS<kKeys, 0, 0>(s, dq.At(0, 2 * kk), dk.At(kKeys * wg, 2 * kk, st * kStageBytes), kk);
    GmmaCommit();
    GmmaWait<0>();
    GmmaFenceOperands(s);
    float alpha[2];
    uint32_t pa[4][4];
    if constexpr (kGroups == 1) {
      SoftmaxStep(p, s, eff + st * kKeysPerTile, qb, m, l, alpha);
      PackP<T>(s, pa);
      CpAsyncWait<2>();  // V of tile it
      FenceAsyncProxy();
      __syncthreads();
    } else {
      // The two halves' row maxima meet in shared memory, then each half's P goes to the other
      // warpgroup, whose P V runs over all 64 keys.
      SoftmaxStep(p, s, eff + st * kKeysPerTile + kKeys * wg, qb, m, l, alpha, [&](float (&mx)[2]) {
#pragma unroll
        for (int i = 0; i < 2; ++i)
          if (lane % 4 == 0) row_max[wg * kDecRows + r0 + 8 * i] = mx[i];
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 2; ++i) mx[i] = fmaxf(mx[i], row_max[(1 - wg) * kDecRows + r0 + 8 * i]);
      });
      uint32_t own[2][4];
      PackP<T>(s, own);
#pragma unroll
      for (int kk = 0; kk < 2; ++kk)
#pragma unroll
        for (int e = 0; e < 4; ++e) p_share[((wg * 2 + kk) * 4 + e) * 128 + threadIdx.x % 128] = own[kk][e];
      CpAsyncWait<2>();  // V of tile it, visible to every warp after the barrier
      FenceAsyncProxy();
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          pa[kk][e] = kk / 2 == wg ? own[kk % 2][e]
                                   : p_share[(((1 - wg) * 2 + kk % 2) * 4 + e) * 128 + threadIdx.x % 128];
    }
    RescaleRows(o, alpha);
    GmmaFenceOperands(o);
    GmmaFence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int nc = 0; nc < kCols / 64; ++nc)
        Elem<T>::GmmaRS(*reinterpret_cast<float(*)[8][4]>(&o[8 * nc]), pa[kk],
                        dv.At(16 * kk, 8 * (wg * kCols / 64 + nc), st * kStageBytes));
    GmmaCommit();
    GmmaWait<0>();
    GmmaFenceOperands(o);
    __syncthreads();  // every warp is done with stage st
    load_tile(it + 2, st);
    if (it + 2 < n) StoreKeyEff(p, eff + st * kKeysPerTile, b, begin + it + 2);
  }
  CpAsyncWait<0>();
  if constexpr (kGroups == 2) {  // each warpgroup summed P over its own keys: add the other's sums
#pragma unroll
    for (int i = 0; i < 2; ++i) p_share[(wg * 2 + i) * 128 + threadIdx.x % 128] = __float_as_uint(l[i]);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 2; ++i) l[i] += __uint_as_float(p_share[((1 - wg) * 2 + i) * 128 + threadIdx.x % 128]);
  }
  __syncthreads();  // a CTA without tiles still had Q loading
  float inv[2];
  RowInverses(l, inv);
  MergeKeySplits<T, D, kDecRows, (D > 128 ? 128 : D)>(p, out, smem, b, h, row0, o, inv, m, l, r0, wg * kCols,
                                                      4 * kDecGroups<D>);
}

template <typename T, int D>
struct DecodeFn {
  static cudaError_t Run(const AttentionArgs& a, const AttentionForwardOut& out, int splits, cudaStream_t stream) {
    int device = 0;
    if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
    const cudaError_t e = LaunchSplits(
        DecodeKernel<T, D>, MakeParams(a), out, kDecRows, 128 * kDecGroups<D>, [](int) { return DecSmemBytes<D>(); },
        splits, device, stream);
    return e != cudaSuccess ? e : cudaGetLastError();
  }
};

}  // namespace

cudaError_t AttentionDecodeForward(const AttentionArgs& a, const AttentionForwardOut& out, int splits,
                                   cudaStream_t stream) {
  return Dispatch<DecodeFn>(a, out, splits, stream);
}

}  // namespace fr::cuda
