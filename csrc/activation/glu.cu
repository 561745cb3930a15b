// CUDA fused GLU + FP8 quantization. One pass per row: gate and up are read once, y = act(gate) *
// up is kept in registers as float32, and FinishRow writes y / q / the row scale. Per-tensor
// current scaling runs the kernel twice (amax pass, then a quantize pass that recomputes y).
#include "activation/glu.h"
#include "common/fp8_rows.cuh"

namespace fr::cuda {
namespace {

using namespace rows;  // NOLINT

struct GluArgs {
  const void* gate;
  const void* up;
  int64_t gate_stride, up_stride;
  int64_t rows, cols;
  bool silu;
  OutArgs o;
};

// The reference's float32 operations in its order; tanhf and expf are CUDA's accurate ones.
__device__ __forceinline__ float Act(bool silu, float g) {
  if (silu) return __fmul_rn(g, __frcp_rn(__fadd_rn(1.0f, expf(-g))));  // g * sigmoid(g)
  const float cube = __fmul_rn(__fmul_rn(g, g), g);
  const float inner = __fmul_rn(0.7978845608028654f, __fadd_rn(g, __fmul_rn(0.044715f, cube)));  // sqrt(2 / pi)
  return __fmul_rn(g, __fmul_rn(0.5f, __fadd_rn(1.0f, tanhf(inner))));
}

template <typename T, int V, int N, int TPR>
__global__ void __launch_bounds__(TPR == 32 ? 256 : TPR) GluFp8Kernel(const GluArgs a) {
  using C = Chunk<T, V>;
  constexpr int kRowsPerBlock = TPR == 32 ? 256 / 32 : 1;
  __shared__ float smem[kMaxThreads / 32];
  RecordTensorScale(a.o);
  const int t = threadIdx.x % TPR;
  const int chunks = static_cast<int>(a.cols / V);
  uint32_t amax_acc = 0;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.x / TPR; row < a.rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const C* gr = reinterpret_cast<const C*>(static_cast<const T*>(a.gate) + row * a.gate_stride) + t;
    const C* ur = reinterpret_cast<const C*>(static_cast<const T*>(a.up) + row * a.up_stride) + t;
    C g[N], u[N];
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (t + TPR * j < chunks) g[j] = gr[TPR * j];
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (t + TPR * j < chunks) u[j] = ur[TPR * j];
    float y[N][V];  // computed once: the activation costs more than a second sweep over registers
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (t + TPR * j < chunks) {
#pragma unroll
        for (int k = 0; k < V; ++k) y[j][k] = __fmul_rn(Act(a.silu, ToFloat(g[j].v[k])), ToFloat(u[j].v[k]));
      }
    }
    auto chunk_y = [&](int j, int, float (&v)[V]) {
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = y[j][k];
    };
    FinishRow<T, V, N, TPR>(chunk_y, row, t, chunks, a.cols, a.o, smem, amax_acc);
  }
  BlockAmaxAtomic(a.o, amax_acc);
}

template <typename T, int V>
struct Launcher {
  const GluArgs& a;
  int64_t grid;
  int threads;
  cudaStream_t stream;
  template <int N, int TPR>
  cudaError_t operator()() const {
    GluFp8Kernel<T, V, N, TPR><<<grid, threads, 0, stream>>>(a);
    return cudaGetLastError();
  }
};

template <typename T>
cudaError_t Launch(const GluParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = p.cols % kVec == 0 && p.gate_stride % kVec == 0 && p.up_stride % kVec == 0 &&
                   Aligned(p.gate, 16) && Aligned(p.up, 16) && Aligned(p.out.y, 16) && Aligned(p.out.q, kVec);
  const RowShape shape = vec ? ShapeFor(p.cols / kVec, kMaxChunks<kVec>) : ShapeFor(p.cols, kMaxChunks<1>);
  GluArgs a{};
  a.gate = p.gate;
  a.up = p.up;
  a.gate_stride = p.gate_stride;
  a.up_stride = p.up_stride;
  a.rows = p.rows;
  a.cols = p.cols;
  a.silu = p.activation == Activation::kSilu;
  return LaunchRowPasses<Launcher, T, kVec>(p.out, a, p.rows, vec, shape, stream);
}

}  // namespace

cudaError_t GluFp8(const GluParams& p, cudaStream_t stream) {
  return rows::DispatchRowDtype(p.dtype, p.rows, p.cols, [&](auto t) { return Launch<decltype(t)>(p, stream); });
}

}  // namespace fr::cuda
