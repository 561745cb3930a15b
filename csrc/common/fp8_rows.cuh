// CUDA building blocks of the fused FP8 producers (norm/, activation/): a row lives in the
// registers of TPR threads (one warp, or a whole block of up to 512 threads for wide rows), each
// holding N chunks of V elements (one 16-byte vector, or one element where rows are not whole
// vectors); chunk j of thread t is chunk t + TPR * j of the row, so that a warp's accesses are
// contiguous, and with TPR a template parameter every chunk's address is an immediate offset
// from one base. A producer computes its row as float32 values; FinishRow writes them (y), reduces
// the amax and quantizes, in the same pass (with a given scale the amax is a side output).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/fp8_output.h"

namespace fr::cuda::rows {

constexpr int kMaxThreads = 512;  // per row and per block: keeps up to 128 registers a thread

template <typename T>
__device__ __forceinline__ float ToFloat(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T FromFloat(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half FromFloat(float v) { return __float2half_rn(v); }

// V consecutive elements, loaded and stored as one access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Chunk {
  T v[V];
};

// V consecutive elements held as 32-bit words (2-byte elements two to a word, low half first; a
// lone 2-byte element in the low half): the compiler gives every 16-bit value a register of its
// own, which doubles a row's registers when chunks are kept as T arrays.
template <typename T, int V>
struct Packed {
  static constexpr int kWords = (V * static_cast<int>(sizeof(T)) + 3) / 4;
  uint32_t u[kWords];

  __device__ __forceinline__ void Load(const T* p) {
    if constexpr (V * sizeof(T) == 16) {
      const uint4 w = *reinterpret_cast<const uint4*>(p);
      u[0] = w.x, u[1] = w.y, u[2] = w.z, u[3] = w.w;
    } else if constexpr (V * sizeof(T) == 8) {
      const uint2 w = *reinterpret_cast<const uint2*>(p);
      u[0] = w.x, u[1] = w.y;
    } else if constexpr (V * sizeof(T) == 4) {
      u[0] = *reinterpret_cast<const uint32_t*>(p);
    } else {
      static_assert(V * sizeof(T) == 2, "chunk of 2, 4, 8 or 16 bytes");
      u[0] = *reinterpret_cast<const uint16_t*>(p);
    }
  }
  __device__ __forceinline__ void Store(T* p) const {
    if constexpr (V * sizeof(T) == 16) {
      *reinterpret_cast<uint4*>(p) = make_uint4(u[0], u[1], u[2], u[3]);
    } else if constexpr (V * sizeof(T) == 8) {
      *reinterpret_cast<uint2*>(p) = make_uint2(u[0], u[1]);
    } else if constexpr (V * sizeof(T) == 4) {
      *reinterpret_cast<uint32_t*>(p) = u[0];
    } else {
      *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(u[0]);
    }
  }
  // Element k as float32: exactly ToFloat of the element.
  __device__ __forceinline__ float Get(int k) const {
    if constexpr (sizeof(T) == 4) {
      return __uint_as_float(u[k]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      return __uint_as_float(k % 2 == 0 ? u[k / 2] << 16 : u[k / 2] & 0xFFFF0000u);
    } else {
      return __half2float(__ushort_as_half(static_cast<unsigned short>(k % 2 == 0 ? u[k / 2] : u[k / 2] >> 16)));
    }
  }
  // Sets element k to FromFloat<T>(v). Set every element of a word, even ones first.
  __device__ __forceinline__ void Set(int k, float v) {
    if constexpr (sizeof(T) == 4) {
      u[k] = __float_as_uint(v);
    } else {
      uint32_t bits;
      if constexpr (std::is_same_v<T, __nv_bfloat16>) bits = __bfloat16_as_ushort(__float2bfloat16_rn(v));
      else bits = __half_as_ushort(__float2half_rn(v));
      u[k / 2] = k % 2 == 0 ? bits : (u[k / 2] | (bits << 16));
    }
  }
};

// This thread's chunks of the row starting at element `offset` of `base`.
template <typename T, int V, int N, int TPR>
__device__ __forceinline__ void LoadRow(Packed<T, V> (&h)[N], const void* base, int64_t offset, int t, int chunks) {
  const T* p = static_cast<const T*>(base) + offset + t * V;
#pragma unroll
  for (int j = 0; j < N; ++j)
    if (t + TPR * j < chunks) h[j].Load(p + TPR * V * j);
}

// V float32 parameters (weights, biases), as 16-byte loads where V allows.
template <int V>
__device__ __forceinline__ void LoadFloats(const float* p, float (&out)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int i = 0; i < V / 4; ++i) {
      const float4 f = reinterpret_cast<const float4*>(p)[i];
      out[4 * i] = f.x, out[4 * i + 1] = f.y, out[4 * i + 2] = f.z, out[4 * i + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = p[i];
  }
}

// a / b for non-negative a, b: 32-bit where both fit (a 64-bit division is a long subroutine).
__device__ __forceinline__ int64_t DivRows(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  return a / b;
}

// |v| as ordered bits: an integer max orders non-negative floats and sorts every NaN above inf.
__device__ __forceinline__ uint32_t AbsBits(float v) { return __float_as_uint(v) & 0x7FFFFFFFu; }

__device__ __forceinline__ float ScaleFromAmax(float amax, float fmax) {
  float floored = amax > kAmaxFloor ? amax : (isnan(amax) ? amax : kAmaxFloor);
  return __fdiv_rn(floored, fmax);
}

// Sum / max over the threads of one row, the same bits in each (xor shuffles add commutatively, the
// cross-warp step runs in warp order), with the cross-warp step through `slot` (TPR / 32 words).
// With TPR > 32 the block is that one row. Without kLeadingSync the caller gives every reduction of
// a row its own slot and alternates two slot sets between consecutive rows, so that a slot is
// rewritten only after a later barrier that every reader of its previous value has passed.
template <int TPR, bool kLeadingSync = false>
__device__ __forceinline__ float RowSumAt(float v, float* slot) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  if constexpr (TPR == 32) {
    return v;
  } else {
    if constexpr (kLeadingSync) __syncthreads();  // the slot's previous readers are done
    if (threadIdx.x % 32 == 0) slot[threadIdx.x / 32] = v;
    __syncthreads();
    float s = slot[0];
#pragma unroll
    for (int w = 1; w < TPR / 32; ++w) s += slot[w];
    return s;
  }
}

template <int TPR, bool kLeadingSync = false>
__device__ __forceinline__ uint32_t RowMaxAt(uint32_t m, float* slot) {
  m = __reduce_max_sync(0xFFFFFFFFu, m);
  if constexpr (TPR == 32) {
    return m;
  } else {
    uint32_t* bits = reinterpret_cast<uint32_t*>(slot);
    if constexpr (kLeadingSync) __syncthreads();
    if (threadIdx.x % 32 == 0) bits[threadIdx.x / 32] = m;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < TPR / 32; ++w) m = max(m, bits[w]);
    return m;
  }
}

// The same through one shared `smem` slot, with a barrier before it is rewritten.
template <int TPR>
__device__ __forceinline__ float RowSum(float v, float* smem) {
  return RowSumAt<TPR, true>(v, smem);
}
template <int TPR>
__device__ __forceinline__ uint32_t RowMax(uint32_t m, float* smem) {
  return RowMaxAt<TPR, true>(m, smem);
}

// Round to nearest even, saturate to the format's max, NaN stays NaN.
__device__ __forceinline__ uint8_t ToFp8(float v, bool e5m2) {
  return static_cast<uint8_t>(e5m2 ? __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E5M2)
                                   : __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

// Two values to FP8 as ToFp8 does (the same instruction): lo in the low byte, hi in the high one.
template <bool kE5M2>
__device__ __forceinline__ uint32_t Fp8x2(float lo, float hi) {
  uint16_t r;
  if constexpr (kE5M2) asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  else asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}

// q of V values y * inv, stored as one access of V bytes.
template <int V, bool kE5M2>
__device__ __forceinline__ void StoreFp8(const float (&y)[V], float inv, uint8_t* q) {
  if constexpr (V == 1) {
    *q = static_cast<uint8_t>(Fp8x2<kE5M2>(__fmul_rn(y[0], inv), 0.0f));
  } else {
    static_assert(V == 2 || V == 4 || V == 8 || V == 16, "chunk of 1, 2, 4, 8 or 16 values");
    uint32_t w[(V + 3) / 4];
#pragma unroll
    for (int i = 0; i < V / 2; ++i) {
      const uint32_t pair = Fp8x2<kE5M2>(__fmul_rn(y[2 * i], inv), __fmul_rn(y[2 * i + 1], inv));
      w[i / 2] = i % 2 == 0 ? pair : (w[i / 2] | (pair << 16));
    }
    if constexpr (V == 2) *reinterpret_cast<uint16_t*>(q) = static_cast<uint16_t>(w[0]);
    else if constexpr (V == 4) *reinterpret_cast<uint32_t*>(q) = w[0];
    else if constexpr (V == 8) *reinterpret_cast<uint2*>(q) = make_uint2(w[0], w[1]);
    else *reinterpret_cast<uint4*>(q) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// Pass of a launch: kOne does everything (per-row or given scale); per-tensor current scaling
// runs kAmax (side outputs, amax into a global atomicMax) and then kQuant (q with the tensor scale).
enum class Pass : int { kOne, kAmax, kQuant };

struct OutArgs {
  const float* scale_in;  // given scale, one per `scale_group` rows; nullptr = current scaling
  int64_t scale_group;
  uint8_t* q;
  float* scale_out;
  // Per-row current scaling: one per row. Per-tensor current scaling (kAmax) and a given scale (one
  // per scale value): atomicMax targets, zeroed before the launch.
  float* amax_out;
  bool amax_per_group;  // a given scale of several values
  void* y;              // optional unquantized output, the input dtype
  float fmax;
  bool e5m2;            // else e4m3
  Pass pass;
};

// Max of m over a warp into *amax: one atomicMax, none for 0 (the zeroed value). Every thread of
// the warp calls it.
__device__ __forceinline__ void WarpAmaxAtomic(uint32_t* amax, uint32_t m) {
  m = __reduce_max_sync(0xFFFFFFFFu, m);
  if (threadIdx.x % 32 == 0 && m != 0) atomicMax(amax, m);
}

// Max of m over a block into *amax: one atomicMax, none for 0. Every thread of the block calls it.
__device__ __forceinline__ void BlockAmaxAtomic(uint32_t* amax, uint32_t m) {
  __shared__ uint32_t warp_m[kMaxThreads / 32];
  m = __reduce_max_sync(0xFFFFFFFFu, m);
  if (threadIdx.x % 32 == 0) warp_m[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) m = max(m, warp_m[w]);
    if (m != 0) atomicMax(amax, m);
  }
}

__device__ __forceinline__ uint32_t* AmaxBits(const OutArgs& o) { return reinterpret_cast<uint32_t*>(o.amax_out); }

// Adds m, a thread's |y| maximum over its part of row `row`, to the amax (kAmax, or a given scale).
// One amax: into amax_acc, which BlockAmaxAtomic flushes at the end of the kernel. One per group of
// rows: an atomicMax per warp and row, which keeps no state across rows (registers are tight).
__device__ __forceinline__ void AccumulateAmax(const OutArgs& o, int64_t row, uint32_t m, uint32_t& amax_acc) {
  if (o.amax_per_group) WarpAmaxAtomic(AmaxBits(o) + DivRows(row, o.scale_group), m);
  else amax_acc = max(amax_acc, m);
}

// Per-row current scaling, after the row's |y| maximum m is reduced: thread 0 writes the row's scale
// and amax; returns 1 / scale.
__device__ __forceinline__ float StoreRowScale(const OutArgs& o, uint32_t m, int64_t row, int t) {
  const float amax = __uint_as_float(m), scale = ScaleFromAmax(amax, o.fmax);
  if (t == 0) {
    o.scale_out[row] = scale;
    o.amax_out[row] = amax;
  }
  return __frcp_rn(scale);
}

// 1 / scale of per-tensor current scaling in the kQuant pass (the tensor amax is complete).
__device__ __forceinline__ float TensorInverseScale(const OutArgs& o) {
  return __frcp_rn(ScaleFromAmax(__uint_as_float(*AmaxBits(o)), o.fmax));
}

// Writes y (if asked), finds the scale and quantizes row `row`. Chunk j of this thread is
// c = t + TPR * j, present when c < chunks; chunk_y(j, c, v) computes its float32 values into v.
// Current scaling sweeps the chunks twice (amax, then quantize), so chunk_y must be cheap or read
// a cache. In kAmax, only accumulates the row's |y| into amax_acc; with a given scale, accumulates it
// while quantizing.
template <typename T, int V, int N, int TPR, typename ChunkY>
__device__ __forceinline__ void FinishRow(ChunkY&& chunk_y, int64_t row, int t, int chunks, int64_t cols,
                                          const OutArgs& o, float* smem, uint32_t& amax_acc) {
  Chunk<T, V>* yr = o.y != nullptr && o.pass != Pass::kQuant
                        ? reinterpret_cast<Chunk<T, V>*>(static_cast<T*>(o.y) + row * cols) + t : nullptr;
  auto store_y = [&](int j, const float (&v)[V]) {
    Chunk<T, V> out;
#pragma unroll
    for (int k = 0; k < V; ++k) out.v[k] = FromFloat<T>(v[k]);
    yr[TPR * j] = out;
  };
  const bool current = o.scale_in == nullptr && o.pass != Pass::kQuant;
  float inv;
  if (current) {
    uint32_t m = 0;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const int c = t + TPR * j;
      if (c < chunks) {
        float v[V];
        chunk_y(j, c, v);
        if (yr != nullptr) store_y(j, v);
#pragma unroll
        for (int k = 0; k < V; ++k) m = max(m, AbsBits(v[k]));
      }
    }
    if (o.pass == Pass::kAmax) {
      AccumulateAmax(o, row, m, amax_acc);
      return;
    }
    m = RowMax<TPR>(m, smem);
    inv = StoreRowScale(o, m, row, t);
  } else if (o.scale_in != nullptr) {
    inv = __frcp_rn(o.scale_in[row / o.scale_group]);
  } else {  // kQuant: the tensor amax is complete
    inv = TensorInverseScale(o);
  }
  Chunk<uint8_t, V>* qr = reinterpret_cast<Chunk<uint8_t, V>*>(o.q + row * cols) + t;
  // The quantize sweep; with a given scale it also gathers the amax of what it quantizes (compiled
  // apart, so that current scaling pays nothing for it).
  auto sweep = [&](auto given) {
    uint32_t m = 0;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const int c = t + TPR * j;
      if (c < chunks) {
        float v[V];
        chunk_y(j, c, v);
        if (!current && yr != nullptr) store_y(j, v);
        Chunk<uint8_t, V> out;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          out.v[k] = ToFp8(__fmul_rn(v[k], inv), o.e5m2);
          if constexpr (decltype(given)::value) m = max(m, AbsBits(v[k]));
        }
        qr[TPR * j] = out;
      }
    }
    return m;
  };
  if (o.scale_in != nullptr) {
    AccumulateAmax(o, row, sweep(std::true_type{}), amax_acc);
  } else {
    sweep(std::false_type{});
  }
}

// FinishRow for a row whose float32 values the thread already holds (y[j] is chunk t + TPR * j,
// present when that is < chunks): writes y (if asked), finds the scale and quantizes, in one sweep
// over registers each. `slot` is this row's slot for RowMaxAt (see there). In kAmax, only
// accumulates the row's |y| into amax_acc; with a given scale (kGiven: o.scale_in is set),
// accumulates it and quantizes. kGiven is a template parameter because the given-scale code, even
// untaken, made the layer-norm kernel 10% slower when it was compiled into the current-scaling one.
template <typename T, int V, int N, int TPR, bool kGiven>
__device__ __forceinline__ void QuantizeRow(const float (&y)[N][V], int64_t row, int t, int chunks, int64_t cols,
                                            const OutArgs& o, float* slot, uint32_t& amax_acc) {
  if (o.y != nullptr && o.pass != Pass::kQuant) {
    T* yr = static_cast<T*>(o.y) + row * cols + t * V;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (t + TPR * j < chunks) {
        Packed<T, V> out;
#pragma unroll
        for (int k = 0; k < V; ++k) out.Set(k, y[j][k]);
        out.Store(yr + TPR * V * j);
      }
    }
  }
  float inv;
  if (!kGiven && o.pass == Pass::kQuant) {  // the tensor amax is complete
    inv = TensorInverseScale(o);
  } else {
    uint32_t m = 0;
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (t + TPR * j < chunks)
#pragma unroll
        for (int k = 0; k < V; ++k) m = max(m, AbsBits(y[j][k]));
    if constexpr (kGiven) {
      AccumulateAmax(o, row, m, amax_acc);
      inv = __frcp_rn(o.scale_in[DivRows(row, o.scale_group)]);
    } else if (o.pass == Pass::kAmax) {
      AccumulateAmax(o, row, m, amax_acc);
      return;
    } else {  // per-row current scaling
      m = RowMaxAt<TPR>(m, slot);
      inv = StoreRowScale(o, m, row, t);
    }
  }
  uint8_t* qr = o.q + row * cols + t * V;
  if (o.e5m2) {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (t + TPR * j < chunks) StoreFp8<V, true>(y[j], inv, qr + TPR * V * j);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (t + TPR * j < chunks) StoreFp8<V, false>(y[j], inv, qr + TPR * V * j);
  }
}

// Start of a kQuant launch: block 0 records the tensor scale.
__device__ __forceinline__ void RecordTensorScale(const OutArgs& o) {
  if (o.pass == Pass::kQuant && o.scale_out != nullptr && blockIdx.x == 0 && threadIdx.x == 0)
    o.scale_out[0] = ScaleFromAmax(__uint_as_float(*AmaxBits(o)), o.fmax);
}

// End of a kAmax launch, or of a kOne launch with one given scale: the amax the threads gathered.
// Every thread of the block calls it.
__device__ __forceinline__ void BlockAmaxAtomic(const OutArgs& o, uint32_t amax_acc) {
  if (o.pass == Pass::kAmax || (o.scale_in != nullptr && !o.amax_per_group)) BlockAmaxAtomic(AmaxBits(o), amax_acc);
}

// Chunks a thread holds for the widest rows (V elements per chunk): 32 elements in 16-byte vectors,
// or 16 elements.
template <int V>
constexpr int kMaxChunks = V == 1 ? 16 : 32 / V;

// Threads per row and chunks per thread for rows of `chunks` chunks: 4 chunks a thread for short
// rows, else max_n (what the kernel's registers hold) with as many threads as that takes.
struct RowShape {
  int n;        // chunks per thread: 4 or max_n
  int tpr;      // threads per row: 32 (a warp; 8 rows per 256-thread block) up to 512 (one block)
  int threads;  // per block
};

inline RowShape ShapeFor(int64_t chunks, int max_n) {
  const int n = chunks <= 32 * 4 ? 4 : max_n;
  const int64_t per_thread = (chunks + n - 1) / n;
  int tpr = 32;
  while (tpr < per_thread) tpr *= 2;
  return {n, tpr, tpr == 32 ? 256 : tpr};
}

// Calls launch.template operator()<N, TPR>() for the shape: N = 4 with one warp, else kMaxN with
// 32 to 512 threads.
template <int kMaxN, typename Launch>
cudaError_t DispatchShape(const RowShape& s, Launch&& launch) {
  if (s.n == 4 && s.tpr == 32) return launch.template operator()<4, 32>();
  if (s.n != kMaxN) return cudaErrorInvalidValue;
  switch (s.tpr) {
    case 32: return launch.template operator()<kMaxN, 32>();
    case 64: return launch.template operator()<kMaxN, 64>();
    case 128: return launch.template operator()<kMaxN, 128>();
    case 256: return launch.template operator()<kMaxN, 256>();
    case 512: return launch.template operator()<kMaxN, 512>();
    default: return cudaErrorInvalidValue;
  }
}

inline bool Aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Blocks for `rows` rows: all of them for kOne / kQuant; at most about one resident wave for
// kAmax, whose blocks loop over rows and issue one atomic each.
inline int64_t GridFor(int64_t rows, const RowShape& s, Pass pass) {
  const int64_t blocks = (rows + s.threads / s.tpr - 1) / (s.threads / s.tpr);
  if (pass != Pass::kAmax) return std::min<int64_t>(blocks, 0x7FFFFFFF);
  int device = 0, sms = 132;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return std::max<int64_t>(1, std::min<int64_t>(blocks, static_cast<int64_t>(sms) * (2048 / s.threads)));
}

// Runs the passes `out` needs through run_pass(pass). Per-tensor current scaling and a given scale
// gather the amax by atomicMax: it is zeroed first (a memset on the stream: no allocation,
// capturable into a CUDA graph).
template <typename RunPass>
cudaError_t RunPasses(const Fp8Output& out, RunPass&& run_pass, cudaStream_t stream) {
  const bool given = out.scale_in != nullptr;
  if (!given && out.granularity == Granularity::kRow) return run_pass(Pass::kOne);
  cudaError_t err = cudaMemsetAsync(out.amax_out, 0, (given ? out.scale_count : 1) * sizeof(uint32_t), stream);
  if (err != cudaSuccess) return err;
  if (given) return run_pass(Pass::kOne);
  if ((err = run_pass(Pass::kAmax)) != cudaSuccess) return err;
  return run_pass(Pass::kQuant);
}

inline OutArgs MakeOutArgs(const Fp8Output& out, int64_t rows, Pass pass) {
  OutArgs o{};
  o.scale_in = out.scale_in;
  o.scale_group = out.scale_in != nullptr ? rows / out.scale_count : 1;
  o.q = static_cast<uint8_t*>(out.q);
  o.scale_out = out.scale_out;
  o.amax_out = out.amax_out;
  o.amax_per_group = out.scale_in != nullptr && out.scale_count > 1;
  o.y = out.y;
  o.fmax = Fp8Max(out.q_dtype);
  o.e5m2 = out.q_dtype == DType::kE5M2;
  o.pass = pass;
  return o;
}

// Runs Launcher<T, kVec> (Launcher<T, 1> when !vec) over the passes `out` needs. Args carries the
// pass's output arguments in `o`; Launcher<T, V>{args, grid, threads, stream} launches the kernel.
template <template <typename, int> class Launcher, typename T, int kVec, typename Args>
cudaError_t LaunchRowPasses(const Fp8Output& out, const Args& a, int64_t rows, bool vec, const RowShape& shape,
                            cudaStream_t stream) {
  return RunPasses(out, [&](Pass pass) {
    Args pa = a;
    pa.o = MakeOutArgs(out, rows, pass);
    const int64_t grid = GridFor(rows, shape, pass);
    return vec ? DispatchShape<kMaxChunks<kVec>>(shape, Launcher<T, kVec>{pa, grid, shape.threads, stream})
               : DispatchShape<kMaxChunks<1>>(shape, Launcher<T, 1>{pa, grid, shape.threads, stream});
  }, stream);
}

// Calls launch(T{}) with T the element type of `dtype` (float32, bfloat16, float16) of a row
// producer over `rows` rows of `cols` elements; no rows is a no-op, a row too wide an error.
template <typename Launch>
cudaError_t DispatchRowDtype(DType dtype, int64_t rows, int64_t cols, Launch&& launch) {
  if (rows == 0) return cudaSuccess;
  if (!RowFits(dtype, cols)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kF32: return launch(float{});
    case DType::kBF16: return launch(__nv_bfloat16{});
    case DType::kF16: return launch(__half{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fr::cuda::rows
