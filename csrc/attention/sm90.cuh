// Building blocks of the Hopper (sm_90a) attention kernels (attention.cu: training forward and
// backward; decode.cu: few query rows against many keys): PTX wrappers, warpgroup MMAs over
// 128-byte-swizzled shared-memory tiles, the problem description and its masks, the Q / K / V
// loaders, the online-softmax step, the cluster merge of key splits, and the host-side launch state.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cooperative_groups.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <map>
#include <mutex>
#include <type_traits>
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

// mbarriers (shared memory, 8 bytes): arrivals and, for TMA loads, transaction bytes complete a
// phase; waiters name the parity of the phase they wait for.
__device__ __forceinline__ void MbarInit(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(SmemAddr(bar)), "r"(count));
}
// Makes the inits visible to the other threads and to the TMA unit (then a barrier).
__device__ __forceinline__ void MbarInitFence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void MbarArrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(SmemAddr(bar)) : "memory");
}
// Arrives and adds `bytes` that TMA loads completing on this barrier will deliver.
__device__ __forceinline__ void MbarArriveExpectTx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(SmemAddr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void MbarWait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nLAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra LAB_WAIT;\n}\n" ::"r"(SmemAddr(bar)),
      "r"(parity)
      : "memory");
}

// TMA: a box of a 4-d tensor map (coordinates innermost first) into shared memory, completing on `bar`.
__device__ __forceinline__ void TmaLoad4d(uint32_t dst, const void* map, int c0, int c1, int c2, int c3,
                                          uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(SmemAddr(bar))
      : "memory");
}

// Named barriers (id 1..15; 0 is __syncthreads) over `threads` threads: sync waits, arrive does not.
__device__ __forceinline__ void NamedBarSync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void NamedBarArrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Moves registers between warpgroups (every thread of the warpgroup calls it).
template <int N>
__device__ __forceinline__ void WarpgroupRegisters() {
  if constexpr (N > 128) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
  else asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Thread-block cluster barrier in two halves: arrive without ordering memory (no fence; the wait
// then only tells that every CTA of the cluster got that far), and wait.
__device__ __forceinline__ void ClusterArriveRelaxed() { asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void ClusterWait() { asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory"); }

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
  float softcap_pre;  // softmax_scale / softcap, from the host: a division in the kernel took its slow path when softcap = 0
  const int32_t* q_block;
  const int32_t* k_block;
  const int32_t* k_valid;
};

__device__ __forceinline__ int KeyEff(const Params& p, int b, int64_t j) {
  // No branch between the two loads, so that they are in flight together (a decode step waits on them).
  const int64_t i = b * p.tk + min(j, p.tk - 1);
  const bool valid = j < p.tk && (p.k_valid == nullptr || p.k_valid[i] != 0);
  const int block = p.q_block ? p.k_block[i] : INT_MIN;
  return valid ? block : kInvisible;
}

__device__ __forceinline__ int QueryBlock(const Params& p, int b, int64_t t) {
  return p.q_block ? p.q_block[b * p.tq + t] : kSeesAll;
}

// Element offset of (b, t, head) in a (batch, time, heads, D) array.
template <int D>
__device__ __forceinline__ int64_t RowOffset(int64_t b, int64_t t, int64_t time, int64_t heads, int64_t head) {
  return ((b * time + t) * heads + head) * D;
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
  // A tile across the end of the first source or past the last key (a decode step's last split,
  // which its cluster waits for): both sources walked with a fixed stride from the thread's first row.
  const int r0 = threadIdx.x / kChunks;
  const int64_t stride = int64_t(kStep) * p.hkv * D * 2;
  const char* g1 = src1 + RowOffset<D>(b, j0 + r0, p.tk1, p.hkv, h) * 2 + c * 16;
  const char* g2 = p.tk2 > 0 ? src2 + RowOffset<D>(b, j0 + r0 - p.tk1, p.tk2, p.hkv, h) * 2 + c * 16 : src1;
#pragma unroll
  for (int i = 0; i < kKeysPerTile / kStep; ++i) {
    const int64_t j = j0 + r0 + i * kStep;
    const char* g = j < p.tk1 ? g1 + i * stride : g2 + i * stride;
    CpAsync16(dst.Addr(r0 + i * kStep, c), j < p.tk ? g : src1, j < p.tk);
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

// One key tile's online-softmax step for this thread's two rows (s: its accumulators of a
// warpgroup's 64 x 8 * NT S = Q K^T). Applies the softmax scale and soft-cap; masks the keys whose
// effective block (eff[key]; eff == nullptr: every key visible) exceeds the row's query block qb;
// moves the running maximum m (log2 units) only when the tile's exceeds it by more than
// kRescaleSlack (P then stays <= 2^kRescaleSlack: no overflow, the same relative precision, and O is
// rarely rescaled); turns s into P = 2^(logit - m) and adds it to the row sums l. alpha: what the
// caller rescales O by (1: nothing to do). share_max(mx) may combine the rows' maxima of s with those
// of the tile's other keys, held elsewhere.
template <int NT, typename ShareMax>
__device__ __forceinline__ void SoftmaxStep(const Params& p, float (&s)[NT][4], const int* eff, const int (&qb)[2],
                                            float (&m)[2], float (&l)[2], float (&alpha)[2], ShareMax&& share_max) {
  // Logits in log2 units are scale * s: a positive scale is applied inside the exponent's FFMA,
  // after the row maximum of s. Branches stay outside the element loops.
  float scale = p.softmax_scale * kLog2e;
  if (p.softcap > 0.0f) {
    const float pre = p.softcap_pre, post = p.softcap * kLog2e;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] = post * tanhf(pre * s[nt][i]);
    scale = 1.0f;
  } else if (scale <= 0.0f) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] *= scale;
    scale = 1.0f;
  }
  if (eff != nullptr) {
    const int* e = eff + 2 * (threadIdx.x % 4);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] = e[nt * 8 + (i & 1)] > qb[i / 2] ? -INFINITY : s[nt][i];
  }
  float mx[2] = {-INFINITY, -INFINITY}, base[2];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) mx[i / 2] = fmaxf(mx[i / 2], s[nt][i]);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
  }
  share_max(mx);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    mx[i] *= scale;
    const bool move = mx[i] > m[i] + kRescaleSlack;
    alpha[i] = move ? Exp2(m[i] - mx[i]) : 1.0f;  // 0 for a row that had seen nothing
    m[i] = move ? mx[i] : m[i];
    l[i] *= alpha[i];
    base[i] = m[i] == -INFINITY ? 0.0f : m[i];  // a row that has seen nothing yet stays at zero
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      s[nt][i] = Exp2(fmaf(s[nt][i], scale, -base[i / 2]));
      l[i / 2] += s[nt][i];
    }
  }
}

template <int NT>
__device__ __forceinline__ void SoftmaxStep(const Params& p, float (&s)[NT][4], const int* eff, const int (&qb)[2],
                                            float (&m)[2], float (&l)[2], float (&alpha)[2]) {
  SoftmaxStep(p, s, eff, qb, m, l, alpha, [](float (&)[2]) {});
}

// O *= alpha per row, skipped by a warp whose rows all keep their maximum (most tiles).
template <int N>
__device__ __forceinline__ void RescaleRows(float (&o)[N][4], const float (&alpha)[2]) {
  if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
    for (int dt = 0; dt < N; ++dt) o[dt][0] *= alpha[0], o[dt][1] *= alpha[0], o[dt][2] *= alpha[1], o[dt][3] *= alpha[1];
  }
}

// P straight from the S accumulators, whose layout is that of the A operand of O += P V.
template <typename T, int NT>
__device__ __forceinline__ void PackP(const float (&s)[NT][4], uint32_t (&pa)[NT / 2][4]) {
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    pa[kk][0] = Elem<T>::Pack(s[2 * kk][0], s[2 * kk][1]), pa[kk][1] = Elem<T>::Pack(s[2 * kk][2], s[2 * kk][3]);
    pa[kk][2] = Elem<T>::Pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    pa[kk][3] = Elem<T>::Pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
}

// 1 / l per row after the quad's partial sums are added up (0 for a row that saw no key).
__device__ __forceinline__ void RowInverses(float (&l)[2], float (&inv)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    inv[i] = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
  }
}

// Key splits: the CTAs of one row tile's splits form a thread-block cluster (split = cluster rank,
// blockIdx.z). Each leaves its normalised partial rows (float32) and per row (running max in log2
// units, sum) in its own shared memory at `smem`, then merges a share of the rows from all of them
// and writes o and lse: no global scratch, no second kernel. This thread holds columns
// col0 + 8 * dt + 2 * (lane % 4) (and the next) of its rows r0 and r0 + 8 in o, unnormalised
// (inv = 1 / l); threads with col0 == 0 record (m, l). A warp merges kSeg columns of a row at a time.
// Call from `warps` warps (0..warps - 1; any others of the CTA call MergeKeySplitsBarriers), after
// a barrier behind the main loop's last shared-memory read. (Tried:
// pushing the partial rows into the merging CTA with remote stores, then merging locally: slower,
// 12.1 vs 11.5 us per decode step, the release barrier waiting for the stores.)
template <typename T, int D, int kRows, int kSeg, int kDTiles>
__device__ __forceinline__ void MergeKeySplits(const Params& p, const AttentionForwardOut& out, char* smem, int b,
                                               int h, int64_t row0, const float (&o)[kDTiles][4],
                                               const float (&inv)[2], const float (&m)[2], const float (&l)[2],
                                               int r0, int col0, int warps) {
  constexpr int kStride = D + 8;  // floats per partial row: conflict-free float2 stores, aligned float4 loads
  // A lane merges kVec columns at kVec * lane + 32 * kVec * j, j < kChunks, of each split's row.
  constexpr int kVec = kSeg >= 128 ? 4 : 2, kChunks = kSeg / (32 * kVec), kSegs = D / kSeg;
  using Vec = std::conditional_t<kVec == 4, float4, float2>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* po = reinterpret_cast<float*>(smem);
  float2* pml = reinterpret_cast<float2*>(po + kRows * kStride);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt)
      *reinterpret_cast<float2*>(po + (r0 + 8 * i) * kStride + col0 + dt * 8 + 2 * (lane % 4)) =
          make_float2(o[dt][2 * i] * inv[i], o[dt][2 * i + 1] * inv[i]);
    if (col0 == 0 && lane % 4 == 0) pml[r0 + 8 * i] = make_float2(m[i], l[i]);
  }
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // release / acquire: every partial row is written
  const int splits = int(gridDim.z), split = int(blockIdx.z);
  for (int item = warp;; item += warps) {
    const int r = split + splits * (item / kSegs), seg = item % kSegs;
    if (r >= kRows) break;
    const int row = int(row0) + r, t = row / p.group;
    if (t >= p.tq) break;  // rows grow with item
    // Every split's (max, sum) and partial segment load at once: distributed shared memory is far,
    // and one round trip per batch of splits was the merge's largest cost. Past the last split, v
    // is 0 and so is its weight.
    const float2 ml = lane < splits ? cluster.map_shared_rank(pml, lane)[r] : make_float2(-INFINITY, 0.0f);
    float v[kMaxSplits][kChunks][kVec];
#pragma unroll
    for (int u = 0; u < kMaxSplits; ++u) {
      const float* src = cluster.map_shared_rank(po, min(u, splits - 1)) + r * kStride + seg * kSeg + kVec * lane;
#pragma unroll
      for (int j = 0; j < kChunks; ++j) {
        const Vec x = u < splits ? *reinterpret_cast<const Vec*>(src + 32 * kVec * j) : Vec{};
        *reinterpret_cast<Vec*>(v[u][j]) = x;
      }
    }
    float mx = ml.x;
    for (int off = 16; off; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    const float w = ml.y > 0.0f ? ml.y * Exp2(ml.x - mx) : 0.0f;  // an empty split weighs nothing
    float sum = w;
    for (int off = 16; off; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    float acc[kChunks][kVec] = {};
#pragma unroll
    for (int u = 0; u < kMaxSplits; ++u) {
      const float ws = __shfl_sync(0xffffffffu, w, u);
#pragma unroll
      for (int j = 0; j < kChunks; ++j)
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[j][e] += ws * v[u][j][e];
    }
    const float scale = sum > 0.0f ? 1.0f / sum : 0.0f;
    const int head = h * p.group + row - t * p.group;
    T* dst = static_cast<T*>(out.o) + RowOffset<D>(b, t, p.tq, p.hq, head) + seg * kSeg + kVec * lane;
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      uint32_t packed[kVec / 2];
#pragma unroll
      for (int e = 0; e < kVec / 2; ++e) packed[e] = Elem<T>::Pack(acc[j][2 * e] * scale, acc[j][2 * e + 1] * scale);
      if constexpr (kVec == 4) *reinterpret_cast<uint2*>(dst + 32 * kVec * j) = make_uint2(packed[0], packed[1]);
      else *reinterpret_cast<uint32_t*>(dst + 32 * kVec * j) = packed[0];
    }
    if (lane == 0 && seg == 0)
      out.lse[(int64_t(b) * p.hq + head) * p.tq + t] = sum > 0.0f ? (mx + log2f(sum)) * kLn2 : -INFINITY;
  }
  // Peers may still read this CTA's shared memory. Their reads are done once they arrive (the values
  // are in use), so the arrive orders no memory: relaxed, without the release's fence.
  ClusterArriveRelaxed();
  ClusterWait();
}

// MergeKeySplits' cluster barriers, for the CTA's warps that hold no rows.
__device__ __forceinline__ void MergeKeySplitsBarriers() {
  cg::this_cluster().sync();
  ClusterArriveRelaxed();
  ClusterWait();
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
  p.softcap_pre = a.softcap > 0.0f ? a.softmax_scale / a.softcap : 0.0f;
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

// Launches kernel(p, out, tiles per split, extra...) over (row tiles of rows_per_cta, batch x KV
// heads, splits) CTAs of `threads`, the splits of a row tile forming one cluster: 16 CTAs (a
// non-portable size) only where one fits, else at most the portable 8. smem_bytes(tiles per split):
// dynamic shared memory.
template <typename K, typename SmemBytes, typename... Extra>
cudaError_t LaunchSplits(K kernel, const Params& p, const AttentionForwardOut& out, int rows_per_cta, int threads,
                         SmemBytes smem_bytes, int splits, int device, cudaStream_t stream, const Extra&... extra) {
  constexpr int kPortableCluster = 8;
  const int n_tiles = int((p.tk + kKeysPerTile - 1) / kKeysPerTile);
  cudaLaunchConfig_t config{};
  cudaLaunchAttribute cluster;  // the key splits of one row tile merge inside their cluster
  cluster.id = cudaLaunchAttributeClusterDimension;
  config.blockDim = dim3(unsigned(threads));
  config.stream = stream;
  config.attrs = &cluster;
  int per_split = 0;
  auto configure = [&]() {
    per_split = std::max(1, (n_tiles + splits - 1) / splits);
    config.gridDim = dim3(unsigned((p.rows + rows_per_cta - 1) / rows_per_cta), unsigned(p.batch * p.hkv),
                          unsigned(splits));
    config.dynamicSmemBytes = size_t(smem_bytes(per_split));
    cluster.val.clusterDim.x = 1, cluster.val.clusterDim.y = 1, cluster.val.clusterDim.z = unsigned(splits);
    config.numAttrs = splits > 1 ? 1 : 0;
    return SetSmem(kernel, int(config.dynamicSmemBytes), device);
  };
  if (cudaError_t e = configure(); e != cudaSuccess) return e;
  if (splits > kPortableCluster && !WideClusterFits(kernel, config, device)) {
    splits = kPortableCluster;
    if (cudaError_t e = configure(); e != cudaSuccess) return e;
  }
  return cudaLaunchKernelEx(&config, kernel, p, out, per_split, extra...);
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

}  // namespace

// Forward for few query rows (decode.cu): `splits` key ranges per 64-row tile, merged in a cluster.
cudaError_t AttentionDecodeForward(const AttentionArgs& a, const AttentionForwardOut& out, int splits,
                                   cudaStream_t stream);

}  // namespace fr::cuda
