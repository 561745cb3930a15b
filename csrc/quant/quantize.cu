// CUDA FP8 quantization kernels. Per-tensor current scaling is two launches (an amax reduction,
// then the quantize pass); per-row scaling is one pass (rows up to rows::kMaxRowWidth wide). With a
// given scale the quantize pass also reduces the amax of what it quantizes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdint>

#include "common/fp8_rows.cuh"
#include "quant/quantize.h"

namespace fr::cuda {
namespace {

using rows::AbsBits;  // shared with the fused producers
using rows::ScaleFromAmax;
using rows::ToFloat;

constexpr int kThreads = 256;

template <__nv_fp8_interpretation_t kFormat>
__device__ __forceinline__ uint8_t ToFp8(float v) {  // round to nearest even, saturate, NaN stays NaN
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, kFormat));
}

template <typename T>
struct Vec {  // one 16-byte load of T
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ uint32_t VecAbsMax(const Vec<T>& v, uint32_t m) {
#pragma unroll
  for (int j = 0; j < Vec<T>::kSize; ++j) m = max(m, AbsBits(ToFloat(v.v[j])));
  return m;
}

template <typename T, __nv_fp8_interpretation_t kFormat>
__device__ __forceinline__ void StoreVecFp8(const Vec<T>& v, float inv, uint8_t* q, int64_t i) {
  constexpr int kVec = Vec<T>::kSize;
  uint8_t out[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) out[j] = ToFp8<kFormat>(__fmul_rn(ToFloat(v.v[j]), inv));
  if constexpr (kVec == 8) {
    reinterpret_cast<uint2*>(q)[i] = *reinterpret_cast<uint2*>(out);
  } else {
    reinterpret_cast<uint32_t*>(q)[i] = *reinterpret_cast<uint32_t*>(out);
  }
}

template <typename T>
__global__ void AbsMaxKernel(const T* __restrict__ x, int64_t n, uint32_t* __restrict__ amax_bits) {
  constexpr int kVec = Vec<T>::kSize, kUnroll = 4;  // four independent 16-byte loads in flight
  uint32_t m = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t n_vec = n / kVec;
  const Vec<T>* xv = reinterpret_cast<const Vec<T>*>(x);
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (; i + (kUnroll - 1) * stride < n_vec; i += kUnroll * stride) {
    Vec<T> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = xv[i + u * stride];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) m = VecAbsMax(v[u], m);
  }
  for (; i < n_vec; i += stride) m = VecAbsMax(xv[i], m);
  for (int64_t e = n_vec * kVec + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n; e += stride)
    m = max(m, AbsBits(ToFloat(x[e])));
  rows::BlockAmaxAtomic(amax_bits, m);
}

// Reads the tensor scale (given, or from the amax just reduced) and returns 1 / scale.
__device__ __forceinline__ float TensorInvScale(const float* scale_in, const uint32_t* amax_bits, float fmax) {
  float scale = scale_in != nullptr ? *scale_in : ScaleFromAmax(__uint_as_float(*amax_bits), fmax);
  return __frcp_rn(scale);
}

// amax_bits: the tensor amax AbsMaxKernel reduced (current scaling), or, with a given scale, where
// this pass gathers the amax of what it quantizes.
template <typename T, __nv_fp8_interpretation_t kFormat>
__global__ void QuantizeTensorKernel(const T* __restrict__ x, int64_t n, const float* scale_in,
                                     uint32_t* amax_bits, float fmax, uint8_t* __restrict__ q,
                                     float* scale_out) {
  constexpr int kVec = Vec<T>::kSize;
  const float inv = TensorInvScale(scale_in, amax_bits, fmax);
  if (scale_out != nullptr && blockIdx.x == 0 && threadIdx.x == 0)
    scale_out[0] = ScaleFromAmax(__uint_as_float(*amax_bits), fmax);
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  uint32_t m = 0;
  if ((i + 1) * kVec <= n) {
    const Vec<T> v = reinterpret_cast<const Vec<T>*>(x)[i];
    StoreVecFp8<T, kFormat>(v, inv, q, i);
    m = VecAbsMax(v, m);
  } else {
    for (int64_t e = i * kVec; e < n; ++e) {
      const float v = ToFloat(x[e]);
      q[e] = ToFp8<kFormat>(__fmul_rn(v, inv));
      m = max(m, AbsBits(v));
    }
  }
  if (scale_in != nullptr) rows::BlockAmaxAtomic(amax_bits, m);
}

// Per-row scaling of rows up to rows::kMaxRowWidth wide: a row is read once into the registers of
// TPR threads (a warp, 8 rows a block, or a block of up to 512 threads), reduced and quantized from
// there (rows::QuantizeRow, the fused producers' last step).
template <typename T, int V, int N, int TPR, bool kGiven>
__global__ void __launch_bounds__(TPR == 32 ? kThreads : TPR)
    QuantizeRowsKernel(const T* __restrict__ x, int64_t rows, int64_t cols, const rows::OutArgs o) {
  constexpr int kRowsPerBlock = TPR == 32 ? kThreads / 32 : 1;
  __shared__ float slot[TPR / 32];
  const int t = threadIdx.x % TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
  uint32_t amax = 0;
  if (row < rows) {  // a whole row's threads take the branch together
    const int chunks = static_cast<int>(cols / V);
    rows::Packed<T, V> h[N];
    rows::LoadRow<T, V, N, TPR>(h, x, row * cols, t, chunks);
    float y[N][V];
#pragma unroll
    for (int j = 0; j < N; ++j)
#pragma unroll
      for (int k = 0; k < V; ++k) y[j][k] = h[j].Get(k);
    rows::QuantizeRow<T, V, N, TPR, kGiven>(y, row, t, chunks, cols, o, slot, amax);
  }
  rows::BlockAmaxAtomic(o, amax);
}

struct RowsArgs {
  const void* x;
  int64_t rows, cols;
  rows::OutArgs o;
};

template <typename T, int V>
struct RowsLauncher {
  const RowsArgs& a;
  int64_t grid;
  int threads;
  cudaStream_t stream;
  template <int N, int TPR>
  cudaError_t operator()() const {
    const auto kernel = a.o.scale_in != nullptr ? QuantizeRowsKernel<T, V, N, TPR, true>
                                                : QuantizeRowsKernel<T, V, N, TPR, false>;
    kernel<<<grid, threads, 0, stream>>>(static_cast<const T*>(a.x), a.rows, a.cols, a.o);
    return cudaGetLastError();
  }
};

// Rows wider than the registers hold: one warp per row reads it twice (amax, then quantize).
template <typename T, __nv_fp8_interpretation_t kFormat>
__global__ void QuantizeWideRowsKernel(const T* __restrict__ x, int64_t rows, int64_t cols, const float* scale_in,
                                       float fmax, uint8_t* __restrict__ q, float* scale_out, float* amax_out) {
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const T* xr = x + row * cols;
  uint8_t* qr = q + row * cols;
  float inv;
  if (scale_in != nullptr) {
    inv = __frcp_rn(scale_in[row]);
  } else {
    uint32_t m = 0;
    for (int64_t i = lane; i < cols; i += 32) m = max(m, AbsBits(ToFloat(xr[i])));
    m = __reduce_max_sync(0xFFFFFFFFu, m);
    const float amax = __uint_as_float(m), scale = ScaleFromAmax(amax, fmax);
    if (lane == 0) {
      scale_out[row] = scale;
      amax_out[row] = amax;
    }
    inv = __frcp_rn(scale);
  }
  uint32_t m = 0;  // a given scale's amax: of the values quantized here
  for (int64_t i = lane; i < cols; i += 32) {
    const float v = ToFloat(xr[i]);
    qr[i] = ToFp8<kFormat>(__fmul_rn(v, inv));
    m = max(m, AbsBits(v));
  }
  if (scale_in != nullptr) {
    m = __reduce_max_sync(0xFFFFFFFFu, m);
    if (lane == 0) amax_out[row] = __uint_as_float(m);
  }
}

template <typename T, __nv_fp8_interpretation_t kFormat>
cudaError_t LaunchRows(const QuantizeParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (!RowFits(p.x_dtype, p.cols)) {
    const int64_t blocks = (p.rows + kThreads / 32 - 1) / (kThreads / 32);
    QuantizeWideRowsKernel<T, kFormat><<<blocks, kThreads, 0, stream>>>(
        static_cast<const T*>(p.x), p.rows, p.cols, p.scale_in, Fp8Max(p.q_dtype), static_cast<uint8_t*>(p.q), p.scale_out, p.amax_out);
    return cudaGetLastError();
  }
  // The fused producers' launch path: a given scale holds one value per row.
  const Fp8Output out{p.q_dtype, Granularity::kRow, p.scale_in, p.rows, p.q, p.scale_out, p.amax_out, nullptr};
  constexpr int kVec = Vec<T>::kSize;
  const bool vec = p.cols % kVec == 0 && rows::Aligned(p.x, 16) && rows::Aligned(p.q, kVec);
  const rows::RowShape shape =
      vec ? rows::ShapeFor(p.cols / kVec, rows::kMaxChunks<kVec>) : rows::ShapeFor(p.cols, rows::kMaxChunks<1>);
  return rows::LaunchRowPasses<RowsLauncher, T, kVec>(out, RowsArgs{p.x, p.rows, p.cols, {}}, p.rows, vec, shape,
                                                       stream);
}

// 64 x 64 tiles: each tile is quantized once and written both as q (rows, cols) and, through shared
// memory, as q_t (cols, rows_padded); q_t's padding columns are written as zeros. amax_bits as for
// QuantizeTensorKernel.
constexpr int kTile = 64;

template <typename T, __nv_fp8_interpretation_t kFormat>
__global__ void QuantizeTransposeKernel(const T* __restrict__ x, int64_t rows, int64_t cols, int64_t rows_padded,
                                        const float* scale_in, uint32_t* amax_bits, float fmax,
                                        uint8_t* __restrict__ q, uint8_t* __restrict__ q_t, float* scale_out) {
  __shared__ uint8_t tile[kTile][kTile + 4];
  const float inv = TensorInvScale(scale_in, amax_bits, fmax);
  if (scale_out != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0)
    scale_out[0] = ScaleFromAmax(__uint_as_float(*amax_bits), fmax);
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile, c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  // Phase 1: 8 threads per tile row, 8 consecutive elements each; 32 rows per pass.
  const int tc = (threadIdx.x % 8) * 8;
  const bool vec_ok = cols % 8 == 0 && (sizeof(T) == 2);
  uint32_t m = 0;  // a given scale's amax
  for (int tr = threadIdx.x / 8; tr < kTile; tr += kThreads / 8) {
    const int64_t r = r0 + tr, c = c0 + tc;
    uint8_t out[8];
    if (r < rows && vec_ok && c + 8 <= cols) {
      Vec<T> v = *reinterpret_cast<const Vec<T>*>(x + r * cols + c);
#pragma unroll
      for (int j = 0; j < 8; ++j) out[j] = ToFp8<kFormat>(__fmul_rn(ToFloat(v.v[j]), inv));
      *reinterpret_cast<uint2*>(q + r * cols + c) = *reinterpret_cast<uint2*>(out);
      m = VecAbsMax(v, m);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        out[j] = 0;  // padding rows of q_t read as zero
        if (r < rows && c + j < cols) {
          const float v = ToFloat(x[r * cols + c + j]);
          out[j] = ToFp8<kFormat>(__fmul_rn(v, inv));
          q[r * cols + c + j] = out[j];
          m = max(m, AbsBits(v));
        }
      }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) tile[tr][tc + j] = out[j];
  }
  if (scale_in != nullptr) rows::BlockAmaxAtomic(amax_bits, m);
  __syncthreads();
  // Phase 2: 4 threads per q_t row, 16 consecutive bytes (= 16 source rows) each.
  const int out_c = threadIdx.x / 4;
  const int rr = (threadIdx.x % 4) * 16;
  const int64_t c = c0 + out_c;
  if (c >= cols) return;
  uint8_t col[16];
#pragma unroll
  for (int j = 0; j < 16; ++j) col[j] = tile[rr + j][out_c];
  const int64_t r = r0 + rr;
  if (r + 16 <= rows_padded && rows_padded % 16 == 0) {
    *reinterpret_cast<uint4*>(q_t + c * rows_padded + r) = *reinterpret_cast<uint4*>(col);
  } else {
    for (int j = 0; j < 16 && r + j < rows_padded; ++j) q_t[c * rows_padded + r + j] = col[j];
  }
}

template <typename T, __nv_fp8_interpretation_t kFormat>
cudaError_t Launch(const QuantizeParams& p, cudaStream_t stream) {
  const T* x = static_cast<const T*>(p.x);
  uint8_t* q = static_cast<uint8_t*>(p.q);
  const float fmax = Fp8Max(p.q_dtype);
  const int64_t n = p.rows * p.cols;
  if (p.granularity == Granularity::kRow) return LaunchRows<T, kFormat>(p, stream);
  // Gathered by atomicMax (AbsMaxKernel, or the quantize kernel with a given scale), so zeroed first:
  // a memset on the stream, capturable into a CUDA graph.
  uint32_t* amax_bits = reinterpret_cast<uint32_t*>(p.amax_out);
  cudaError_t err = cudaMemsetAsync(amax_bits, 0, sizeof(uint32_t), stream);
  if (err != cudaSuccess) return err;
  if (p.scale_in == nullptr) {
    int device, sms;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    const int64_t vec_threads = (n / Vec<T>::kSize + kThreads - 1) / kThreads;
    const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(vec_threads, sms * 8)));
    AbsMaxKernel<T><<<blocks, kThreads, 0, stream>>>(x, n, amax_bits);
  }
  float* scale_out = p.scale_in == nullptr ? p.scale_out : nullptr;
  if (p.q_t != nullptr) {
    dim3 grid((p.cols + kTile - 1) / kTile, (p.rows_padded + kTile - 1) / kTile);
    QuantizeTransposeKernel<T, kFormat><<<grid, kThreads, 0, stream>>>(
        x, p.rows, p.cols, p.rows_padded, p.scale_in, amax_bits, fmax, q, static_cast<uint8_t*>(p.q_t), scale_out);
  } else {
    const int64_t threads = (n + Vec<T>::kSize - 1) / Vec<T>::kSize;
    const int64_t blocks = std::max<int64_t>(1, (threads + kThreads - 1) / kThreads);
    QuantizeTensorKernel<T, kFormat><<<blocks, kThreads, 0, stream>>>(x, n, p.scale_in, amax_bits, fmax, q, scale_out);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchFormat(const QuantizeParams& p, cudaStream_t stream) {
  return p.q_dtype == DType::kE4M3 ? Launch<T, __NV_E4M3>(p, stream) : Launch<T, __NV_E5M2>(p, stream);
}

}  // namespace

cudaError_t Quantize(const QuantizeParams& p, cudaStream_t stream) {
  switch (p.x_dtype) {
    case DType::kF32: return LaunchFormat<float>(p, stream);
    case DType::kBF16: return LaunchFormat<__nv_bfloat16>(p, stream);
    case DType::kF16: return LaunchFormat<__half>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fr::cuda
