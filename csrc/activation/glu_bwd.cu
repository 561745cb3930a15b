// CUDA fused GLU backward + FP8 quantization (the backward of the merged GLU in an FP8 FFN: its
// result feeds the gate|up GEMM's input-gradient GEMM). One pass per row: gate, up and dh are read
// once, d[gate | up] (2F float32 values) stays in registers, the row amax is reduced across the
// block, and the FP8 codes (and the optional unquantized values) are written. A row is spread over
// TPR threads (one warp for short rows, up to a whole block of 512 for F = 16384), each caching at
// most 64 float32 outputs: dgate and dup of 32 columns of F, as 16-byte vectors (bf16 / f16: 4 of 8,
// f32: 8 of 4), or 16 scalar columns where rows are not whole vectors (F <= 8192 then). At F = 16384
// a row's 32768 float32 values fill half of an SM's register file: one 512-thread block of up to 128
// registers a thread (ptxas: 107-128, no spills) is resident per SM. Per-tensor current scaling runs
// the kernel twice (amax pass, then a quantize pass that recomputes the values).
#include "activation/glu.h"
#include "common/fp8_rows.cuh"

namespace fr::cuda {
namespace {

using namespace rows;  // NOLINT

struct GluBwdArgs {
  const void* gate;
  const void* up;
  const void* dh;
  int64_t gate_stride, up_stride, dh_stride;
  const float* col_scale;
  int64_t col_group;  // rows per row of col_scale
  int64_t rows, cols;
  bool silu;
  OutArgs o;
};

// act(g) and act'(g) in float32, act as the forward computes it (glu.cu, reference.glu):
//   gelu_tanh: p = 0.5 * (1 + tanh(z)), z = sqrt(2 / pi) * (g + 0.044715 g^3); act = g * p,
//              act' = p + g * 0.5 * (1 - t) * (1 + t) * sqrt(2 / pi) * (1 + 3 * 0.044715 g^2)
//   silu:      s = 1 / (1 + exp(-g)); act = g * s, act' = s * (1 + g * (1 - s))
template <bool kSilu>
__device__ __forceinline__ void ActGrad(float g, float& act, float& grad) {
  if constexpr (kSilu) {
    const float s = __frcp_rn(__fadd_rn(1.0f, expf(-g)));
    act = __fmul_rn(g, s);
    grad = __fmul_rn(s, __fadd_rn(1.0f, __fmul_rn(g, __fsub_rn(1.0f, s))));
    return;
  }
  const float g2 = __fmul_rn(g, g);
  const float inner = __fmul_rn(0.7978845608028654f, __fadd_rn(g, __fmul_rn(0.044715f, __fmul_rn(g2, g))));
  const float t = tanhf(inner);
  const float p = __fmul_rn(0.5f, __fadd_rn(1.0f, t));
  act = __fmul_rn(g, p);
  const float sech2 = __fmul_rn(__fsub_rn(1.0f, t), __fadd_rn(1.0f, t));
  const float dinner = __fmul_rn(0.7978845608028654f, __fadd_rn(1.0f, __fmul_rn(0.134145f, g2)));
  grad = __fadd_rn(p, __fmul_rn(g, __fmul_rn(__fmul_rn(0.5f, sech2), dinner)));
}

// Chunk j of thread t is chunk c = t + TPR * j of a row's F columns; it gives the chunks c (dgate)
// and chunks + c (dup) of the 2F-wide output row.
template <typename T, int V, int N, int TPR, bool kSilu>
__global__ void __launch_bounds__(TPR == 32 ? 256 : TPR) GluBwdFp8Kernel(const GluBwdArgs a) {
  using C = Chunk<T, V>;
  constexpr int kRowsPerBlock = TPR == 32 ? 256 / 32 : 1;
  __shared__ float smem[kMaxThreads / 32];
  RecordTensorScale(a.o);
  const int t = threadIdx.x % TPR;
  const int chunks = static_cast<int>(a.cols / V);
  const int64_t out_cols = 2 * a.cols;
  const OutArgs& o = a.o;
  uint32_t amax_acc = 0;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.x / TPR; row < a.rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const C* gr = reinterpret_cast<const C*>(static_cast<const T*>(a.gate) + row * a.gate_stride) + t;
    const C* ur = reinterpret_cast<const C*>(static_cast<const T*>(a.up) + row * a.up_stride) + t;
    const C* hr = reinterpret_cast<const C*>(static_cast<const T*>(a.dh) + row * a.dh_stride) + t;
    float dg[N][V], du[N][V];  // the row's outputs, computed once
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const int c = t + TPR * j;
      if (c < chunks) {
        const C g = gr[TPR * j], u = ur[TPR * j], h = hr[TPR * j];
#pragma unroll
        for (int k = 0; k < V; ++k) {
          float act, grad;
          ActGrad<kSilu>(ToFloat(g.v[k]), act, grad);
          const float dy = ToFloat(h.v[k]);
          dg[j][k] = __fmul_rn(__fmul_rn(dy, ToFloat(u.v[k])), grad);
          du[j][k] = __fmul_rn(dy, act);
        }
        if (a.col_scale != nullptr) {
          float sg[V], su[V];
          const float* cs = a.col_scale + (row / a.col_group) * 2 * a.cols + static_cast<int64_t>(c) * V;
          LoadFloats<V>(cs, sg);
          LoadFloats<V>(cs + a.cols, su);
#pragma unroll
          for (int k = 0; k < V; ++k) {
            dg[j][k] = __fmul_rn(dg[j][k], sg[k]);
            du[j][k] = __fmul_rn(du[j][k], su[k]);
          }
        }
      }
    }

    // y (the values before quantization), in the pass that has the values first.
    if (o.y != nullptr && o.pass != Pass::kQuant) {
      C* yr = reinterpret_cast<C*>(static_cast<T*>(o.y) + row * out_cols) + t;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (t + TPR * j < chunks) {
          C vg, vu;
#pragma unroll
          for (int k = 0; k < V; ++k) vg.v[k] = FromFloat<T>(dg[j][k]), vu.v[k] = FromFloat<T>(du[j][k]);
          yr[TPR * j] = vg;
          yr[chunks + TPR * j] = vu;
        }
      }
    }

    float inv;
    if (o.pass == Pass::kQuant) {  // the tensor amax is complete
      inv = TensorInverseScale(o);
    } else {  // this row's amax
      uint32_t m = 0;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (t + TPR * j < chunks) {
#pragma unroll
          for (int k = 0; k < V; ++k) m = max(m, max(AbsBits(dg[j][k]), AbsBits(du[j][k])));
        }
      }
      if (o.scale_in != nullptr) {
        AccumulateAmax(o, row, m, amax_acc);
        inv = __frcp_rn(o.scale_in[row / o.scale_group]);
      } else if (o.pass == Pass::kAmax) {
        AccumulateAmax(o, row, m, amax_acc);
        continue;
      } else {  // per-row current scaling
        m = RowMax<TPR>(m, smem);
        inv = StoreRowScale(o, m, row, t);
      }
    }
    Chunk<uint8_t, V>* qr = reinterpret_cast<Chunk<uint8_t, V>*>(o.q + row * out_cols) + t;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (t + TPR * j < chunks) {
        Chunk<uint8_t, V> qg, qu;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          qg.v[k] = ToFp8(__fmul_rn(dg[j][k], inv), o.e5m2);
          qu.v[k] = ToFp8(__fmul_rn(du[j][k], inv), o.e5m2);
        }
        qr[TPR * j] = qg;
        qr[chunks + TPR * j] = qu;
      }
    }
  }
  BlockAmaxAtomic(a.o, amax_acc);
}

template <typename T, int V>
struct Launcher {
  const GluBwdArgs& a;
  int64_t grid;
  int threads;
  cudaStream_t stream;
  template <int N, int TPR>
  cudaError_t operator()() const {
    if (a.silu) {
      GluBwdFp8Kernel<T, V, N, TPR, true><<<grid, threads, 0, stream>>>(a);
    } else {
      GluBwdFp8Kernel<T, V, N, TPR, false><<<grid, threads, 0, stream>>>(a);
    }
    return cudaGetLastError();
  }
};

template <typename T>
cudaError_t Launch(const GluBwdParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = p.cols % kVec == 0 && p.gate_stride % kVec == 0 && p.up_stride % kVec == 0 &&
                   p.dh_stride % kVec == 0 && Aligned(p.gate, 16) && Aligned(p.up, 16) && Aligned(p.dh, 16) &&
                   Aligned(p.out.y, 16) && Aligned(p.out.q, kVec) && Aligned(p.col_scale, 16);
  const RowShape shape = vec ? ShapeFor(p.cols / kVec, kMaxChunks<kVec>) : ShapeFor(p.cols, kMaxChunks<1>);
  GluBwdArgs a{};
  a.gate = p.gate;
  a.up = p.up;
  a.dh = p.dh;
  a.gate_stride = p.gate_stride;
  a.up_stride = p.up_stride;
  a.dh_stride = p.dh_stride;
  a.col_scale = p.col_scale;
  a.col_group = p.col_scale != nullptr ? p.rows / p.col_scale_count : 1;
  a.rows = p.rows;
  a.cols = p.cols;
  a.silu = p.activation == Activation::kSilu;
  return LaunchRowPasses<Launcher, T, kVec>(p.out, a, p.rows, vec, shape, stream);
}

}  // namespace

cudaError_t GluBwdFp8(const GluBwdParams& p, cudaStream_t stream) {
  return rows::DispatchRowDtype(p.dtype, p.rows, p.cols, [&](auto t) { return Launch<decltype(t)>(p, stream); });
}

}  // namespace fr::cuda
