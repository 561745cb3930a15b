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
// Forward: one CTA per (128 folded rows, batch, KV head[, key split]), a warpgroup per 64 rows with
// warpgroup MMAs (wgmma) from 128-byte-swizzled shared memory; K/V tiles double-buffered through
// cp.async, Q K^T of one tile issued together with P V of the previous one so the softmax overlaps
// the tensor cores. Few query rows (decode) split the keys over the CTAs of a cluster, which merge
// through distributed shared memory.
// Backward (deterministic, no atomics; wgmma as well): a preprocess kernel (rowsum(dO * O),
// lse in log2 units), one kernel per key tile for dK / dV looping over the query tiles (all heads of
// the group, so a shared KV head accumulates without races), and one kernel per query tile for dQ.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cooperative_groups.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "attention/attention.h"

namespace fr::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;  // 8 warps
constexpr int kKeysPerTile = 64;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kInvisible = INT_MAX;     // effective block of a key nobody sees
constexpr int kSeesAll = INT_MAX - 1;   // block of a query when there is no block mask
constexpr uint16_t kFullTile = 0x8000;  // tile-list flag: every row sees every key of the tile
constexpr int kMaxSplits = 16;           // forward key splits (CTAs of one cluster; 16 is the largest)
constexpr float kRescaleSlack = 8.0f;    // forward: log2 units a row maximum may rise before O is rescaled

// ---------------------------------------------------------------------------------------------
// PTX wrappers

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---------------------------------------------------------------------------------------------
// Warpgroup MMAs (sm_90a): a warpgroup of 4 warps computes a 64 x N tile d (+)= A B with k = 16,
// fp32 accumulators. d[nt][i] holds, like mma.sync's C fragment per warp, row 16 * (warp % 4) +
// lane / 4 + 8 * (i / 2), column 8 * nt + 2 * (lane % 4) + i % 2.

// Shared-memory matrix descriptor of a 128-byte-swizzled operand (Tile layout): start address,
// leading byte offset (MN-major: bytes between 64-column regions), stride byte offset (8 rows).
__device__ __forceinline__ uint64_t GmmaDesc(uint32_t addr, uint32_t lead, uint32_t stride) {
  return uint64_t((addr & 0x3FFFF) >> 4) | uint64_t(lead >> 4) << 16 | uint64_t(stride >> 4) << 32 |
         uint64_t(1) << 62;
}

__device__ __forceinline__ void GmmaFence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void GmmaCommit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void GmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses to d across the asynchronous MMAs that write it.
template <int N>
__device__ __forceinline__ void GmmaFenceOperands(float (&d)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+f"(d[i][j])::"memory");
}

// Accumulator operand lists of m64nNk16 wgmmas (N / 2 fp32 registers per thread).
#define FR_GMMA_D4(n) "+f"(d[n][0]), "+f"(d[n][1]), "+f"(d[n][2]), "+f"(d[n][3])
#define FR_GMMA_D32 FR_GMMA_D4(0), FR_GMMA_D4(1), FR_GMMA_D4(2), FR_GMMA_D4(3)
#define FR_GMMA_D64 FR_GMMA_D32, FR_GMMA_D4(4), FR_GMMA_D4(5), FR_GMMA_D4(6), FR_GMMA_D4(7)
#define FR_GMMA_D128                                                                                    \
  FR_GMMA_D64, FR_GMMA_D4(8), FR_GMMA_D4(9), FR_GMMA_D4(10), FR_GMMA_D4(11), FR_GMMA_D4(12), FR_GMMA_D4(13), \
      FR_GMMA_D4(14), FR_GMMA_D4(15)
#define FR_GMMA_L32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define FR_GMMA_L64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "  \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FR_GMMA_L128 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "  \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, "  \
  "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, "  \
  "%60, %61, %62, %63}"

// d (+)= A B, A (64 x 16) and B (16 x N) in shared memory; kTA / kTB: A M-major / B N-major instead
// of K-major; scale_d = 0 ignores d. The operand numbers follow the N / 2 accumulators.
#define FR_GMMA_SS_ASM(TYPE, N, A, B, SCALE, TA, TB)                                                     \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"                                         \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " " FR_GMMA_L##N ", " A ", " B \
               ", p, 1, 1, " TA ", " TB ";\n}\n"                                                          \
               : FR_GMMA_D##N                                                                             \
               : "l"(a), "l"(b), "r"(scale_d), "n"(kTA), "n"(kTB))
// d += A B with A (64 x 16) in registers (each warp's 16 rows in mma.sync's A-fragment layout) and
// B (16 x 64) N-major in shared memory.
#define FR_GMMA(TYPE)                                                                                    \
  template <int N, int kTA, int kTB>                                                                     \
  static __device__ __forceinline__ void GmmaSS(float (&d)[N / 8][4], uint64_t a, uint64_t b, int scale_d) { \
    if constexpr (N == 32) {                                                                             \
      FR_GMMA_SS_ASM(TYPE, 32, "%16", "%17", "%18", "%19", "%20");                                       \
    } else if constexpr (N == 64) {                                                                      \
      FR_GMMA_SS_ASM(TYPE, 64, "%32", "%33", "%34", "%35", "%36");                                       \
    } else {                                                                                             \
      static_assert(N == 128, "wgmma N: 32, 64 or 128");                                                 \
      FR_GMMA_SS_ASM(TYPE, 128, "%64", "%65", "%66", "%67", "%68");                                      \
    }                                                                                                    \
  }                                                                                                      \
  static __device__ __forceinline__ void GmmaRS(float (&d)[8][4], const uint32_t (&a)[4], uint64_t b) {   \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                              \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " FR_GMMA_L64             \
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                         \
                 : FR_GMMA_D64                                                                           \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                                  \
  }

template <typename T>
struct Elem;
template <>
struct Elem<__nv_bfloat16> {
  FR_GMMA("bf16")
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 Unpack(uint32_t u) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
  }
};
template <>
struct Elem<__half> {
  FR_GMMA("f16")
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 Unpack(uint32_t u) {
    return __half22float2(*reinterpret_cast<__half2*>(&u));
  }
};

// A shared-memory tile of 16-bit elements in the layout wgmma reads with 128-byte swizzling:
// 64-column regions of rows x 128 bytes, one after the other, the 16-byte chunk index XORed with
// row % 8 (no bank conflicts for the 16-byte stores either). The regions must be 1024-byte aligned.
struct Tile {
  char* base;
  int rows;
  __device__ __forceinline__ char* At(int row, int chunk) const {
    return base + ((chunk / 8) * rows + row) * 128 + ((chunk % 8) ^ (row & 7)) * 16;
  }
  __device__ __forceinline__ uint32_t Addr(int row, int chunk) const { return SmemAddr(At(row, chunk)); }
  // Stores two adjacent elements (col even) packed in one 32-bit word.
  __device__ __forceinline__ void Store2(int row, int col, uint32_t v) const {
    *reinterpret_cast<uint32_t*>(At(row, col / 8) + (col % 8) * 2) = v;
  }
};

// wgmma descriptors into a Tile, from one computed at its base: at rows that are multiples of 8 the
// swizzle adds nothing, so they differ by an offset added to the start address field (bits 0-13,
// which cannot carry: shared memory is below 256 KB). Building each from its address cost ~15
// instructions per MMA.
struct TileDesc {
  uint32_t lo, hi;
  int rows;
  __device__ __forceinline__ TileDesc(const Tile& t, uint32_t lead, uint32_t stride) : rows(t.rows) {
    const uint64_t d = GmmaDesc(SmemAddr(t.base), lead, stride);
    lo = uint32_t(d), hi = uint32_t(d >> 32);
  }
  // Element (row, 16-byte chunk), row % 8 == 0, of the tile or of the one `bytes` further on.
  __device__ __forceinline__ uint64_t At(int row, int chunk, uint32_t bytes = 0) const {
    return uint64_t(hi) << 32 | (lo + ((bytes + ((chunk / 8) * rows + row) * 128 + (chunk % 8) * 16) >> 4));
  }
};

template <int N>
__device__ __forceinline__ void Zero(float (&acc)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
}

// Issues acc (+)= A B for one warpgroup (no fence, commit or wait): A is rows 0..63 of `a` (with
// kATrans: its columns 0..63, `a` stored [k][m]), B is columns n0.. of `b` stored [n][k] (with
// kBTrans: [k][n]), N = 8 * NT, and the reduction runs over k0 .. k0 + 16 * KSTEPS.
template <typename T, int NT, int KSTEPS, bool kATrans, bool kBTrans>
__device__ __forceinline__ void GroupMmaIssue(float (&acc)[NT][4], const Tile& a, const Tile& b, int n0, int k0 = 0) {
  constexpr int kN = NT * 8 > 128 ? 128 : NT * 8;  // columns per instruction
  const TileDesc da(a, kATrans ? a.rows * 128 : 16, 1024), db(b, kBTrans ? b.rows * 128 : 16, 1024);
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
    const int k = k0 + 16 * kk;
#pragma unroll
    for (int nc = 0; nc < NT * 8 / kN; ++nc) {
      const int n = n0 + nc * kN;
      Elem<T>::template GmmaSS<kN, kATrans, kBTrans>(
          *reinterpret_cast<float(*)[kN / 8][4]>(&acc[nc * kN / 8]),
          kATrans ? da.At(k, 0) : da.At(0, k / 8), kBTrans ? db.At(k, n / 8) : db.At(n, k / 8), 1);
    }
  }
}

// Waits for the warpgroup's MMAs and fences their accumulators.
template <int N, int M>
__device__ __forceinline__ void GroupMmaWait(float (&a)[N][4], float (&b)[M][4]) {
  GmmaWait<0>();
  GmmaFenceOperands(a);
  GmmaFenceOperands(b);
}

__device__ __forceinline__ void FenceAsyncProxy() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// 2^x without exp2f's subnormal range fix-up (three more instructions per element): the softmax
// arguments are <= 0 up to rounding, and a result below 2^-126 flushing to 0 changes nothing.
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---------------------------------------------------------------------------------------------
// Problem description shared by the kernels

struct Params {
  const char* q;
  const char* k;
  const char* v;
  const char* k2;
  const char* v2;
  int batch, hq, hkv, group;
  int64_t tq, tk1, tk2, tk, rows;  // rows = tq * group folded query rows per (batch, KV head)
  float softmax_scale, softcap;
  const int32_t* q_block;
  const int32_t* k_block;
  const int32_t* k_valid;
};

__device__ __forceinline__ int KeyEff(const Params& p, int b, int64_t j) {
  if (j >= p.tk) return kInvisible;
  if (p.k_valid && !p.k_valid[b * p.tk + j]) return kInvisible;
  return p.q_block ? p.k_block[b * p.tk + j] : INT_MIN;
}

__device__ __forceinline__ int QueryBlock(const Params& p, int b, int64_t t) {
  return p.q_block ? p.q_block[b * p.tq + t] : kSeesAll;
}

// Element offset of (b, t, head) in a (batch, time, heads, D) array.
template <int D>
__device__ __forceinline__ int64_t RowOffset(int64_t b, int64_t t, int64_t time, int64_t heads, int64_t head) {
  return ((b * time + t) * heads + head) * D;
}

// Source row (K or V, first or second source) of key j for KV head h; nullptr past the end.
template <int D>
__device__ __forceinline__ const char* KeyRow(const Params& p, const char* src1, const char* src2, int b, int h,
                                              int64_t j) {
  if (j < p.tk1) return src1 + RowOffset<D>(b, j, p.tk1, p.hkv, h) * 2;
  if (j < p.tk) return src2 + RowOffset<D>(b, j - p.tk1, p.tk2, p.hkv, h) * 2;
  return nullptr;
}

// Issues the cp.async of one 16-byte chunk per row r = r0, r0 + kStep, ... < kRows of `dst` (r0 < kStep)
// from rows `stride` bytes apart starting at `g`; with kCheck, rows with first + r >= limit are
// zero-filled (read from `fallback`: nothing, at a valid global address). A fixed trip count, and
// with kStep a multiple of 8 a fixed swizzle, so the addresses only advance: this runs for every K
// and V tile, and per-row bounds tests and swizzles were a third of the loop's instructions.
template <int kStep, int kRows, bool kCheck>
__device__ __forceinline__ void LoadStridedRows(const Tile& dst, int c, int r0, int64_t first, int64_t limit,
                                                const char* g, int64_t stride, const char* fallback) {
  static_assert(kRows % kStep == 0, "whole steps");
  const uint32_t a0 = dst.Addr(r0, c);
#pragma unroll
  for (int i = 0; i < kRows / kStep; ++i, g += stride) {
    const int r = r0 + i * kStep;
    const bool ok = !kCheck || first + r < limit;
    CpAsync16(kStep % 8 == 0 ? a0 + i * kStep * 128 : dst.Addr(r, c), ok ? g : fallback, ok);
  }
}

// Loads rows [row0, row0 + kRows) of a (batch, tq, hq, D) array for folded rows of KV head h into
// `dst`, zero-filling rows past the end. Each of the kN threads keeps one 16-byte column chunk, and
// its folded row (t, head in group) is divided out once and then advanced, not divided per row.
template <int D, int kN, int kRows>
__device__ __forceinline__ void LoadQueryRows(const Params& p, const char* src, const Tile& dst, int b, int h,
                                              int64_t row0) {
  constexpr int kChunks = D / 8, kStep = kN / kChunks;
  const int c = threadIdx.x % kChunks;
  if (p.hkv == 1) {  // MQA: the folded rows are the array's rows, walked with a fixed stride
    const int r0 = threadIdx.x / kChunks;
    const char* g = src + ((int64_t(b) * p.rows + row0 + r0) * D + c * 8) * 2;
    LoadStridedRows<kStep, kRows, true>(dst, c, r0, row0, p.rows, g, kStep * D * 2, src);
    return;
  }
  int r = threadIdx.x / kChunks, t = (int(row0) + r) / p.group, hh = int(row0) + r - t * p.group;
  const char* g = src + (RowOffset<D>(b, t, p.tq, p.hq, int64_t(h) * p.group + hh) + c * 8) * 2;
  const int64_t next_t = int64_t(p.hq - p.group) * D * 2;  // from past the group's heads to the next t
  for (; r < kRows; r += kStep) {
    const bool ok = t < p.tq;
    CpAsync16(dst.Addr(r, c), ok ? g : src, ok);
    hh += kStep, g += kStep * D * 2;
    if (hh >= p.group) {
      const int carry = p.group >= kStep ? 1 : hh / p.group;
      hh -= carry * p.group, t += carry, g += carry * next_t;
    }
  }
}

// Loads the K or V rows of key tile `tile` (src1 / src2: the two key sources) into `dst` with kN
// threads, zero-filling rows past the end. A tile inside the first source walks it with a fixed stride.
template <int D, int kN>
__device__ __forceinline__ void LoadKeyRows(const Params& p, const char* src1, const char* src2, const Tile& dst,
                                            int b, int h, int tile) {
  constexpr int kChunks = D / 8, kStep = kN / kChunks;
  const int c = threadIdx.x % kChunks;
  const int64_t j0 = int64_t(tile) * kKeysPerTile;
  if (j0 + kKeysPerTile <= p.tk1) {
    const int r0 = threadIdx.x / kChunks;
    const char* g = src1 + RowOffset<D>(b, j0 + r0, p.tk1, p.hkv, h) * 2 + c * 16;
    LoadStridedRows<kStep, kKeysPerTile, false>(dst, c, r0, 0, 0, g, int64_t(kStep) * p.hkv * D * 2, src1);
    return;
  }
  for (int r = threadIdx.x / kChunks; r < kKeysPerTile; r += kStep) {
    const char* g = KeyRow<D>(p, src1, src2, b, h, j0 + r);
    CpAsync16(dst.Addr(r, c), g ? g + c * 16 : src1, g != nullptr);
  }
}

// Stores the effective blocks of key tile `tile`'s keys (threads 0..63).
__device__ __forceinline__ void StoreKeyEff(const Params& p, int* eff, int b, int tile) {
  if (threadIdx.x < kKeysPerTile) eff[threadIdx.x] = KeyEff(p, b, int64_t(tile) * kKeysPerTile + threadIdx.x);
}

// Loads the K and V rows of key tile `tile` and the keys' effective blocks.
template <int D, int kN>
__device__ __forceinline__ void LoadKeyTile(const Params& p, const Tile& k, const Tile& v, int* eff, int b, int h,
                                            int tile) {
  LoadKeyRows<D, kN>(p, p.k, p.k2, k, b, h, tile);
  LoadKeyRows<D, kN>(p, p.v, p.v2, v, b, h, tile);
  StoreKeyEff(p, eff, b, tile);
}

// Lists the key tiles in [begin, end) that any query with block in [qmin, qmax] sees, flagging
// the tiles that every such query sees in full. Call from all threads; returns the count.
__device__ int ListKeyTiles(const Params& p, int b, int qmin, int qmax, bool rows_complete, int begin, int end,
                            uint16_t* list, uint8_t* flags, int* count) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int t = begin + warp; t < end; t += blockDim.x / 32) {
    const int64_t j = int64_t(t) * kKeysPerTile + 2 * lane;
    const int e0 = KeyEff(p, b, j), e1 = KeyEff(p, b, j + 1);
    const bool any = __any_sync(0xffffffffu, e0 <= qmax || e1 <= qmax);
    const bool all = __all_sync(0xffffffffu, e0 <= qmin && e1 <= qmin);
    if (lane == 0) flags[t - begin] = any ? (all && rows_complete ? 2 : 1) : 0;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int n = 0;
    for (int t = begin; t < end; ++t)
      if (flags[t - begin]) list[n++] = uint16_t(t) | (flags[t - begin] == 2 ? kFullTile : 0);
    *count = n;
  }
  __syncthreads();
  return *count;
}

// Block-wide min and max of the blocks of the real (non-padding) folded rows [row0, row0 + nrows).
__device__ void QueryBlockRange(const Params& p, int b, int64_t row0, int nrows, int* red, int* qmin, int* qmax,
                                bool* complete) {
  if (threadIdx.x == 0) red[0] = INT_MAX, red[1] = INT_MIN, red[2] = 1;
  __syncthreads();
  for (int r = threadIdx.x; r < nrows; r += blockDim.x) {
    const int64_t t = (row0 + r) / p.group;
    if (t < p.tq) {
      const int qb = QueryBlock(p, b, t);
      atomicMin(&red[0], qb);
      atomicMax(&red[1], qb);
    } else {
      red[2] = 0;
    }
  }
  __syncthreads();
  *qmin = red[0], *qmax = red[1], *complete = red[2] != 0;
}

// ---------------------------------------------------------------------------------------------
// Forward

// Rows per forward CTA: 128 (8 warps x 16 rows); 64 (4 warps) for the few rows of a decode step, so
// that they still spread over many CTAs.
template <int D, int kFwdRows>
constexpr int FwdSmemBytes() {
  return 1024 + (kFwdRows * D + 4 * kKeysPerTile * D) * 2 + 2 * kKeysPerTile * 4 + 16;  // 1024: alignment
}

template <typename T, int D, int kFwdRows>
__global__ void __launch_bounds__(kFwdRows * 2, 1)
    ForwardKernel(Params p, AttentionForwardOut out, int tiles_per_split) {
  constexpr int kChunks = D / 8, kDTiles = D / 8;
  extern __shared__ __align__(128) char smem_raw[];
  char* smem = smem_raw + ((1024 - SmemAddr(smem_raw) % 1024) % 1024);  // wgmma's swizzle atoms
  const Tile sq{smem, kFwdRows};
  // Stage st of the double-buffered K and V tiles (computed, not indexed, to stay in registers).
  auto sk = [&](int st) { return Tile{smem + (kFwdRows + st * kKeysPerTile) * D * 2, kKeysPerTile}; };
  auto sv = [&](int st) { return Tile{smem + (kFwdRows + (2 + st) * kKeysPerTile) * D * 2, kKeysPerTile}; };
  int* eff = reinterpret_cast<int*>(smem + (kFwdRows + 4 * kKeysPerTile) * D * 2);  // [2][64]
  int* red = eff + 2 * kKeysPerTile;                                                 // 4 ints
  const int n_tiles_total = int((p.tk + kKeysPerTile - 1) / kKeysPerTile);
  uint8_t* flags = reinterpret_cast<uint8_t*>(red + 4);
  uint16_t* list = reinterpret_cast<uint16_t*>(flags + ((tiles_per_split + 1) & ~1));

  const int b = blockIdx.y / p.hkv, h = blockIdx.y % p.hkv, split = blockIdx.z;
  const int64_t row0 = int64_t(blockIdx.x) * kFwdRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warp / 4;

  const int begin = split * tiles_per_split;
  const int end = min(n_tiles_total, begin + tiles_per_split);
  // Before the masks are read, the Q rows and the K / V tiles of the range's first two tiles (both
  // stages): they are the first listed unless a mask hides them, and a short range (a decode split)
  // then waits for one round trip to memory instead of one per tile.
  const int guessed = max(0, min(2, end - begin));
  LoadQueryRows<D, kFwdRows * 2, kFwdRows>(p, p.q, sq, b, h, row0);
  for (int i = 0; i < guessed; ++i)
    LoadKeyTile<D, kFwdRows * 2>(p, sk(i), sv(i), eff + i * kKeysPerTile, b, h, begin + i);
  CpAsyncCommit();
  int qmin, qmax;
  bool complete;
  QueryBlockRange(p, b, row0, kFwdRows, red, &qmin, &qmax, &complete);
  const int n = ListKeyTiles(p, b, qmin, qmax, complete, begin, max(begin, end), list, flags, red + 3);
  auto tile_of = [&](int i) { return list[i] & ~kFullTile; };
  int ready = 0;  // listed tiles whose K and V are already loading
  while (ready < min(guessed, n) && tile_of(ready) == begin + ready) ++ready;
  if (ready < guessed) CpAsyncWait<0>();  // a guessed tile is not listed: its stage gets reloaded

  // This thread's two rows (r0 and r0 + 8 of the warp's 16) and their query blocks.
  const int r0 = 16 * warp + lane / 4;
  int qb[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t t = (row0 + r0 + 8 * i) / p.group;
    qb[i] = t < p.tq ? QueryBlock(p, b, t) : INT_MIN;
  }

  float o[kDTiles][4];
  Zero(o);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  uint32_t pa[4][4];  // P of the previous tile as the A operand of O += P V

  // Software pipeline, per iteration `it`: S_it = Q K_it and O += P_{it-1} V_{it-1} go to the tensor
  // cores together; the softmax of S_it runs while the second is still in flight; then O is rescaled.
  // K_it and V_{it-1} were loaded during the previous iteration (stage it % 2 and (it - 1) % 2 of
  // each); K_{it+1} and V_it load during this one, into stages whose previous tiles are done.
  // Descriptors: Q and K K-major, V MN-major (the region size as leading byte offset).
  constexpr uint32_t kStageBytes = kKeysPerTile * D * 2;
  const TileDesc dq(sq, 16, 1024), dk(sk(0), 16, 1024), dv(sv(0), kKeysPerTile * 128, 1024);
  auto v_desc = [&](int kk, int nc, int st) { return dv.At(16 * kk, 8 * nc, st * kStageBytes); };
  if (ready == 0 && n > 0) {
    LoadKeyRows<D, kFwdRows * 2>(p, p.k, p.k2, sk(0), b, h, tile_of(0));
    StoreKeyEff(p, eff, b, tile_of(0));
  }
  CpAsyncCommit();
  for (int it = 0; it < n; ++it) {
    const int st = it & 1;
    CpAsyncWait<0>();
    FenceAsyncProxy();  // cp.async data -> wgmma reads
    __syncthreads();
    // Issuing these after the MMAs below measured slower (786 vs 697 us at pi0.5 B 32).
    if (it + 1 < n && it + 1 >= ready) {
      LoadKeyRows<D, kFwdRows * 2>(p, p.k, p.k2, sk(st ^ 1), b, h, tile_of(it + 1));
      StoreKeyEff(p, eff + (st ^ 1) * kKeysPerTile, b, tile_of(it + 1));
    }
    if (it >= ready) LoadKeyRows<D, kFwdRows * 2>(p, p.v, p.v2, sv(st), b, h, tile_of(it));
    CpAsyncCommit();

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
      // O += P V of the previous tile: V MN-major, 16 keys x 64 columns of D per MMA.
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int nc = 0; nc < D / 64; ++nc)
          Elem<T>::GmmaRS(*reinterpret_cast<float(*)[8][4]>(&o[8 * nc]), pa[kk], v_desc(kk, nc, st ^ 1));
      GmmaCommit();
      GmmaWait<1>();
    } else {
      GmmaWait<0>();
    }
    GmmaFenceOperands(s);

    // Logits in log2 units are scale * s: a positive scale is applied inside the exponent's FFMA,
    // after the row maximum of s. Branches stay outside the element loops.
    float scale = p.softmax_scale * kLog2e;
    if (p.softcap > 0.0f) {
      const float pre = p.softmax_scale / p.softcap, post = p.softcap * kLog2e;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) s[nt][i] = post * tanhf(pre * s[nt][i]);
      scale = 1.0f;
    } else if (scale <= 0.0f) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) s[nt][i] *= scale;
      scale = 1.0f;
    }
    if (!(list[it] & kFullTile)) {
      const int* e = eff + st * kKeysPerTile + 2 * (lane % 4);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) s[nt][i] = e[nt * 8 + (i & 1)] > qb[i / 2] ? -INFINITY : s[nt][i];
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) mx[i / 2] = fmaxf(mx[i / 2], s[nt][i]);
    float alpha[2], base[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = scale * fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      // The running maximum only moves when the tile's exceeds it by more than kRescaleSlack: P then
      // stays <= 2^kRescaleSlack (no overflow, the same relative precision), and O is rarely rescaled.
      const bool move = mx[i] > m[i] + kRescaleSlack;
      alpha[i] = move ? Exp2(m[i] - mx[i]) : 1.0f;  // 0 for a row that had seen nothing
      m[i] = move ? mx[i] : m[i];
      l[i] *= alpha[i];
      base[i] = m[i] == -INFINITY ? 0.0f : m[i];  // a row that has seen nothing yet stays at zero
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[nt][i] = Exp2(fmaf(s[nt][i], scale, -base[i / 2]));
        l[i / 2] += s[nt][i];
      }
    }
    GmmaWait<0>();  // the previous tile's P V: O and pa are free again
    GmmaFenceOperands(o);
    // Most tiles leave the running maxima where they are: the warp then skips the rescale.
    if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        o[dt][0] *= alpha[0], o[dt][1] *= alpha[0], o[dt][2] *= alpha[1], o[dt][3] *= alpha[1];
      }
    }
    // P straight from the S accumulators: their layout is the A operand's.
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      pa[kk][0] = Elem<T>::Pack(s[2 * kk][0], s[2 * kk][1]), pa[kk][1] = Elem<T>::Pack(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = Elem<T>::Pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = Elem<T>::Pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
  }
  CpAsyncWait<0>();
  if (n > 0) {  // the last tile's P V
    FenceAsyncProxy();
    __syncthreads();
    GmmaFenceOperands(o);
    GmmaFence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int nc = 0; nc < D / 64; ++nc)
        Elem<T>::GmmaRS(*reinterpret_cast<float(*)[8][4]>(&o[8 * nc]), pa[kk], v_desc(kk, nc, (n - 1) & 1));
    GmmaCommit();
    GmmaWait<0>();
    GmmaFenceOperands(o);
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }
  const float inv[2] = {l[0] > 0.0f ? 1.0f / l[0] : 0.0f, l[1] > 0.0f ? 1.0f / l[1] : 0.0f};

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
    constexpr int kRowStep = 32 / kChunks;
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
  // Key split: the CTAs of the splits form one thread-block cluster (split = cluster rank). Each
  // leaves its normalised partial output and (running max in log2 units, sum) in its own shared
  // memory, then merges a share of the rows from all of them: no global scratch, no second kernel.
  __syncthreads();  // every warp is done with Q, K and V in shared memory
  constexpr int kStride = D + 8;  // floats per partial row: conflict-free float2 stores
  float* po = reinterpret_cast<float*>(smem);
  float2* pml = reinterpret_cast<float2*>(po + kFwdRows * kStride);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt)
      *reinterpret_cast<float2*>(po + (r0 + 8 * i) * kStride + dt * 8 + 2 * (lane % 4)) =
          make_float2(o[dt][2 * i] * inv[i], o[dt][2 * i + 1] * inv[i]);
    if (lane % 4 == 0) pml[r0 + 8 * i] = make_float2(m[i], l[i]);
  }
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  const int splits = int(gridDim.z);
  for (int r = split + splits * warp; r < kFwdRows; r += splits * (kFwdRows / 16)) {
    const int row = int(row0) + r, t = row / p.group;
    if (t >= p.tq) break;  // rows grow with r
    // Every split's (max, sum) and partial row (columns 2 * lane + 64 * j) load at once: distributed
    // shared memory is far, and one round trip per batch of splits was the merge's largest cost.
    // Past the last split, v is 0 and so is its weight.
    const float2 ml = lane < splits ? cluster.map_shared_rank(pml, lane)[r] : make_float2(-INFINITY, 0.0f);
    float2 v[kMaxSplits][D / 64];
#pragma unroll
    for (int u = 0; u < kMaxSplits; ++u) {
      const float* src = cluster.map_shared_rank(po, min(u, splits - 1)) + r * kStride + 2 * lane;
#pragma unroll
      for (int j = 0; j < D / 64; ++j)
        v[u][j] = u < splits ? *reinterpret_cast<const float2*>(src + 64 * j) : make_float2(0.0f, 0.0f);
    }
    float mx = ml.x;
    for (int off = 16; off; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    const float w = ml.y > 0.0f ? ml.y * exp2f(ml.x - mx) : 0.0f;  // an empty split weighs nothing
    float sum = w;
    for (int off = 16; off; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    float2 acc[D / 64] = {};
#pragma unroll
    for (int u = 0; u < kMaxSplits; ++u) {
      const float ws = __shfl_sync(0xffffffffu, w, u);
#pragma unroll
      for (int j = 0; j < D / 64; ++j) acc[j].x += ws * v[u][j].x, acc[j].y += ws * v[u][j].y;
    }
    const float scale = sum > 0.0f ? 1.0f / sum : 0.0f;
    const int head = h * p.group + row - t * p.group;
    T* dst = static_cast<T*>(out.o) + RowOffset<D>(b, t, p.tq, p.hq, head) + 2 * lane;
#pragma unroll
    for (int j = 0; j < D / 64; ++j)
      *reinterpret_cast<uint32_t*>(dst + 64 * j) = Elem<T>::Pack(acc[j].x * scale, acc[j].y * scale);
    if (lane == 0) out.lse[(int64_t(b) * p.hq + head) * p.tq + t] = sum > 0.0f ? (mx + log2f(sum)) * kLn2 : -INFINITY;
  }
  cluster.sync();  // peers may still read this CTA's shared memory
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
  float acc = 0.0f;
  for (int c = lane; c < D / 8; c += 32) {
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
    const int64_t t = (row / p.hq) % p.tq, b = row / (p.hq * p.tq), head = row % p.hq;
    const int64_t i = (b * p.hq + head) * p.tq + t;
    const float lse = g.lse[i];
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
    const float pre = p.softmax_scale / p.softcap, post = p.softcap * kLog2e;
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
constexpr int BwdQSmemBytes() {
  return 1024 + (2 * kBwdRows * D + 4 * kKeysPerTile * D + kBwdRows * kKeysPerTile) * 2 + 2 * kKeysPerTile * 4 +
         3 * kBwdRows * 4 + 16;
}

// dQ for one query tile of one (batch, KV head), looping over the key tiles it sees.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    BackwardQKernel(Params p, AttentionBackwardArgs g, const float* delta, const float* lse2) {
  extern __shared__ __align__(128) char smem[];
  char* ptr = smem + ((1024 - SmemAddr(smem) % 1024) % 1024);  // wgmma's swizzle atoms
  auto take = [&ptr](int bytes) { char* r = ptr; ptr += bytes; return r; };
  const Tile sq{take(kBwdRows * D * 2), kBwdRows}, sdo{take(kBwdRows * D * 2), kBwdRows};
  char* k_stages = take(2 * kKeysPerTile * D * 2);
  char* v_stages = take(2 * kKeysPerTile * D * 2);
  auto sk = [&](int st) { return Tile{k_stages + st * kKeysPerTile * D * 2, kKeysPerTile}; };
  auto sv = [&](int st) { return Tile{v_stages + st * kKeysPerTile * D * 2, kKeysPerTile}; };
  const Tile sds{take(kBwdRows * kKeysPerTile * 2), kBwdRows};
  int* eff = reinterpret_cast<int*>(take(2 * kKeysPerTile * 4));
  RowInfo ri{reinterpret_cast<float*>(take(kBwdRows * 4)), reinterpret_cast<float*>(take(kBwdRows * 4)),
             reinterpret_cast<int*>(take(kBwdRows * 4))};
  int* red = reinterpret_cast<int*>(take(16));
  const int n_ktiles = int((p.tk + kKeysPerTile - 1) / kKeysPerTile);
  uint8_t* flags = reinterpret_cast<uint8_t*>(take((n_ktiles + 1) & ~1));
  uint16_t* list = reinterpret_cast<uint16_t*>(ptr);

  const int b = blockIdx.y / p.hkv, h = blockIdx.y % p.hkv;
  const int64_t row0 = int64_t(blockIdx.x) * kBwdRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp % 4, wg = warp / 4;

  LoadQueryRows<D, kThreads, kBwdRows>(p, p.q, sq, b, h, row0);
  LoadQueryRows<D, kThreads, kBwdRows>(p, static_cast<const char*>(g.d_o), sdo, b, h, row0);
  CpAsyncCommit();
  LoadRowInfo(p, lse2, delta, ri, b, h, row0);
  int qmin, qmax;
  bool complete;
  QueryBlockRange(p, b, row0, kBwdRows, red, &qmin, &qmax, &complete);
  const int n = ListKeyTiles(p, b, qmin, qmax, complete, 0, n_ktiles, list, flags, red + 3);

  float dq[D / 8][4];  // this warpgroup's half of the keys; the halves are summed at the end
  Zero(dq);
  if (n > 0) LoadKeyTile<D, kThreads>(p, sk(0), sv(0), eff, b, h, list[0] & ~kFullTile);
  CpAsyncCommit();
  for (int it = 0; it < n; ++it) {
    const int st = it & 1;
    CpAsyncWait<0>();
    FenceAsyncProxy();
    __syncthreads();
    {
      // The next key tile loads while the tensor cores work.
      float s[4][4], dp[4][4];
      Zero(s);
      Zero(dp);
      GmmaFence();
      GroupMmaIssue<T, 4, D / 16, false, false>(s, sq, sk(st), 32 * wg);
      GroupMmaIssue<T, 4, D / 16, false, false>(dp, sdo, sv(st), 32 * wg);
      GmmaCommit();
      if (it + 1 < n)
        LoadKeyTile<D, kThreads>(p, sk(st ^ 1), sv(st ^ 1), eff + (st ^ 1) * kKeysPerTile, b, h,
                                 list[it + 1] & ~kFullTile);
      CpAsyncCommit();
      GroupMmaWait(s, dp);
      SoftmaxGrad<T>(p, s, dp, 16 * wm, 32 * wg, ri, eff + st * kKeysPerTile, list[it] & kFullTile, nullptr, sds);
    }
    FenceAsyncProxy();  // dS stores -> wgmma reads
    __syncthreads();
    // dQ += dS K over this warpgroup's 32 keys: dS K-major, K N-major.
    GmmaFenceOperands(dq);
    GmmaFence();
    GroupMmaIssue<T, D / 8, 2, false, true>(dq, sds, sk(st), 0, 32 * wg);
    GmmaCommit();
    GmmaWait<0>();
    GmmaFenceOperands(dq);
    __syncthreads();
  }
  CpAsyncWait<0>();
  __syncthreads();
  // Sum the two warpgroups' halves through shared memory (the K stages are free now).
  float* partial = reinterpret_cast<float*>(k_stages);  // [kBwdRows][D]
  const int r0 = 16 * wm + lane / 4;
  if (wg == 1) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<float2*>(partial + (r0 + 8 * i) * D + dt * 8 + 2 * (lane % 4)) =
            make_float2(dq[dt][2 * i], dq[dt][2 * i + 1]);
  }
  __syncthreads();
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

Params MakeParams(const AttentionArgs& a) {
  Params p{};
  p.q = static_cast<const char*>(a.q);
  p.k = static_cast<const char*>(a.k);
  p.v = static_cast<const char*>(a.v);
  p.k2 = static_cast<const char*>(a.k2);
  p.v2 = static_cast<const char*>(a.v2);
  p.batch = int(a.batch), p.hq = int(a.hq), p.hkv = int(a.hkv), p.group = int(a.group());
  p.tq = a.tq, p.tk1 = a.tk1, p.tk2 = a.tk2, p.tk = a.tk(), p.rows = a.tq * a.group();
  p.softmax_scale = a.softmax_scale, p.softcap = a.softcap;
  p.q_block = a.q_block, p.k_block = a.k_block, p.k_valid = a.k_valid;
  return p;
}

constexpr int kMaxSmemBytes = 227 * 1024;  // per block on sm_90

// Host-side facts about a kernel on a device, kept so that a launch makes no attribute calls or
// occupancy queries after the first (decode launches are short enough for those to show).
struct KernelState {
  int smem_granted = 0;    // cudaFuncAttributeMaxDynamicSharedMemorySize set so far (it only grows)
  int wide_cluster = -1;   // whether one cluster of 16 fits: -1 not asked yet
  int wide_cluster_smem = 0;  // ... with this much dynamic shared memory
};

std::mutex kernel_state_mu;

KernelState& StateOf(const void* kernel, int device) {  // call with kernel_state_mu held
  static std::map<std::pair<const void*, int>, KernelState> states;
  return states[{kernel, device}];
}

template <typename K>
cudaError_t SetSmem(K kernel, int bytes, int device) {
  if (bytes > kMaxSmemBytes) return cudaErrorInvalidValue;  // too many tiles to list (very long sequence)
  std::lock_guard<std::mutex> lock(kernel_state_mu);
  KernelState& state = StateOf(reinterpret_cast<const void*>(kernel), device);
  if (bytes <= state.smem_granted) return cudaSuccess;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) return e;
  state.smem_granted = bytes;
  return cudaSuccess;
}

// Whether one cluster of `config` (16 CTAs, a non-portable size) fits on the device; asked once per
// kernel, device and shared-memory size.
template <typename K>
bool WideClusterFits(K kernel, const cudaLaunchConfig_t& config, int device) {
  std::lock_guard<std::mutex> lock(kernel_state_mu);
  KernelState& state = StateOf(reinterpret_cast<const void*>(kernel), device);
  if (state.wide_cluster < 0 || state.wide_cluster_smem != int(config.dynamicSmemBytes)) {
    int fits = 0;
    const bool ok = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess &&
                    cudaOccupancyMaxActiveClusters(&fits, kernel, &config) == cudaSuccess;
    if (!ok) cudaGetLastError();  // clear the query's error
    state.wide_cluster = ok && fits > 0, state.wide_cluster_smem = int(config.dynamicSmemBytes);
  }
  return state.wide_cluster != 0;
}

int ListBytes(int n) { return ((n + 1) & ~1) + 2 * n + 16; }

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

template <typename T, int D, int kRows>
cudaError_t LaunchForward(const Params& p, const AttentionForwardOut& out, int splits, int n_tiles, int device,
                          cudaStream_t stream) {
  constexpr int kPortableCluster = 8;
  auto kernel = ForwardKernel<T, D, kRows>;
  cudaLaunchConfig_t config{};
  cudaLaunchAttribute cluster;  // the key splits of one row tile merge inside their cluster
  cluster.id = cudaLaunchAttributeClusterDimension;
  config.blockDim = dim3(kRows * 2);
  config.stream = stream;
  config.attrs = &cluster;
  int per_split = 0;
  auto configure = [&]() {
    per_split = (n_tiles + splits - 1) / splits;
    config.gridDim = dim3(unsigned((p.rows + kRows - 1) / kRows), unsigned(p.batch * p.hkv), unsigned(splits));
    config.dynamicSmemBytes = FwdSmemBytes<D, kRows>() + ListBytes(per_split);
    cluster.val.clusterDim.x = 1, cluster.val.clusterDim.y = 1, cluster.val.clusterDim.z = unsigned(splits);
    config.numAttrs = splits > 1 ? 1 : 0;
    return SetSmem(kernel, int(config.dynamicSmemBytes), device);
  };
  if (cudaError_t e = configure(); e != cudaSuccess) return e;
  if (splits > kPortableCluster && !WideClusterFits(kernel, config, device)) {
    splits = kPortableCluster;
    if (cudaError_t e = configure(); e != cudaSuccess) return e;
  }
  return cudaLaunchKernelEx(&config, kernel, p, out, per_split);
}

template <typename T, int D>
cudaError_t Forward(const AttentionArgs& a, const AttentionForwardOut& out, cudaStream_t stream) {
  const Params p = MakeParams(a);
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  const int n_tiles = int((p.tk + kKeysPerTile - 1) / kKeysPerTile);
  const int splits = KeySplits(p, n_tiles, device);
  // Few rows (decode): 64-row CTAs spread them wider; measured slower for a 968-token prefix.
  const cudaError_t e = splits > 1 && p.rows <= 1024
                            ? LaunchForward<T, D, 64>(p, out, splits, n_tiles, device, stream)
                            : LaunchForward<T, D, 128>(p, out, splits, n_tiles, device, stream);
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
  q_kernel<<<dim3(unsigned(n_qtiles), unsigned(p.batch * p.hkv)), kThreads, q_smem, stream>>>(p, g, delta, lse2);
  return cudaGetLastError();
}

template <template <typename, int> class Fn, typename... Args>
cudaError_t Dispatch(const AttentionArgs& a, Args&&... args) {
  const bool bf16 = a.dtype == DType::kBF16;
  switch (a.head_dim) {
    case 64: return bf16 ? Fn<__nv_bfloat16, 64>::Run(a, args...) : Fn<__half, 64>::Run(a, args...);
    case 128: return bf16 ? Fn<__nv_bfloat16, 128>::Run(a, args...) : Fn<__half, 128>::Run(a, args...);
    case 256: return bf16 ? Fn<__nv_bfloat16, 256>::Run(a, args...) : Fn<__half, 256>::Run(a, args...);
    default: return cudaErrorInvalidValue;
  }
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
