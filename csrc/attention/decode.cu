// Attention forward for few query rows against many keys: a decode step (pi0.5: 50 action queries x
// 8 heads against a 1018-token cache), or any forward of at most 1024 folded rows per (batch, KV
// head) whose row tiles fill less than half the GPU.
//
// The keys split over the CTAs of a thread-block cluster, which merge their partial rows through
// distributed shared memory (MergeKeySplits); each CTA takes 64 folded rows and a range of key
// tiles, one at the decode shape. A CTA's time is then the latency of its serial chain, not
// throughput, and the training kernel ran it with one warp per scheduler. Here both warpgroups
// compute S = Q K^T and the softmax of the same 64 rows (the tensor cores have time to spare) and
// each multiplies P by its own half of V's columns: the P V chain, the partial rows a warp writes and
// the columns it merges are halved, and each scheduler has two warps. There is no tile list (every
// key's mask is a select per element) and no pipelining beyond two K / V stages.
#include "attention/sm90.cuh"

namespace fr::cuda {
namespace {

constexpr int kDecRows = 64;  // folded query rows per CTA

// Warpgroups per CTA: each owns D / groups output columns, at least the 64 of one wgmma.
template <int D>
constexpr int kDecGroups = D >= 128 ? 2 : 1;

template <int D>
constexpr int DecSmemBytes() {  // Q and two stages of K, V and the keys' effective blocks
  return 1024 + (kDecRows * D + 4 * kKeysPerTile * D) * 2 + 2 * kKeysPerTile * 4;  // 1024: alignment
}

template <typename T, int D>
__global__ void __launch_bounds__(128 * kDecGroups<D>, 1)
    DecodeKernel(Params p, AttentionForwardOut out, int tiles_per_split) {
  constexpr int kN = 128 * kDecGroups<D>, kCols = D / kDecGroups<D>;
  constexpr uint32_t kStageBytes = kKeysPerTile * D * 2;
  static_assert((kDecRows * (D + 8) + 2 * kDecRows) * 4 <= (kDecRows + 4 * kKeysPerTile) * D * 2,
                "the partial rows fit where Q, K and V were");
  extern __shared__ __align__(128) char smem_raw[];
  char* smem = smem_raw + ((1024 - SmemAddr(smem_raw) % 1024) % 1024);  // wgmma's swizzle atoms
  const Tile sq{smem, kDecRows};
  auto sk = [&](int st) { return Tile{smem + (kDecRows + st * kKeysPerTile) * D * 2, kKeysPerTile}; };
  auto sv = [&](int st) { return Tile{smem + (kDecRows + (2 + st) * kKeysPerTile) * D * 2, kKeysPerTile}; };
  int* eff = reinterpret_cast<int*>(smem + (kDecRows + 4 * kKeysPerTile) * D * 2);  // [2][64]

  const int b = blockIdx.y / p.hkv, h = blockIdx.y % p.hkv;
  const int64_t row0 = int64_t(blockIdx.x) * kDecRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warp / 4;
  const int begin = int(blockIdx.z) * tiles_per_split;
  const int n_tiles = int((p.tk + kKeysPerTile - 1) / kKeysPerTile);
  const int n = max(0, min(n_tiles, begin + tiles_per_split) - begin);

  // The first two tiles' key blocks are read first and stored last, so that their latency overlaps
  // the loads of Q with the first tile and of the second tile (one cp.async group each).
  const int first_eff = threadIdx.x < 2 * kKeysPerTile ? KeyEff(p, b, int64_t(begin) * kKeysPerTile + threadIdx.x) : 0;
  LoadQueryRows<D, kN, kDecRows>(p, p.q, sq, b, h, row0);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (i < n) {
      LoadKeyRows<D, kN>(p, p.k, p.k2, sk(i), b, h, begin + i);
      LoadKeyRows<D, kN>(p, p.v, p.v2, sv(i), b, h, begin + i);
    }
    CpAsyncCommit();
  }
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
    CpAsyncWait<1>();  // tile it's group: only the next tile's may still be in flight
    FenceAsyncProxy();  // cp.async data -> wgmma reads
    __syncthreads();
    float s[8][4];
    Zero(s);
    GmmaFence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      Elem<T>::template GmmaSS<64, 0, 0>(s, dq.At(0, 2 * kk), dk.At(0, 2 * kk, st * kStageBytes), kk);
    GmmaCommit();
    GmmaWait<0>();
    GmmaFenceOperands(s);
    float alpha[2];
    SoftmaxStep(p, s, eff + st * kKeysPerTile, qb, m, l, alpha);
    RescaleRows(o, alpha);
    uint32_t pa[4][4];
    PackP<T>(s, pa);
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
    if (it + 2 < n) LoadKeyTile<D, kN>(p, sk(st), sv(st), eff + st * kKeysPerTile, b, h, begin + it + 2);
    CpAsyncCommit();
  }
  CpAsyncWait<0>();
  __syncthreads();  // a CTA without tiles still had Q loading
  float inv[2];
  RowInverses(l, inv);
  MergeKeySplits<T, D, kDecRows, (D > 128 ? 128 : D)>(p, out, smem, b, h, row0, o, inv, m, l, r0, wg * kCols);
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
