// CUDA fused norms + FP8 quantization. One pass per row: the row (h = x [+ residual]) is read
// once into registers, the statistics are reduced across its threads, and FinishRow computes y
// from h, writes y / q / the row scale. Per-tensor current scaling runs the kernel twice (amax
// pass, then a quantize pass that reads h again, mostly from L2).
#include "common/fp8_rows.cuh"
#include "norm/norm.h"

namespace fr::cuda {
namespace {

using namespace rows;  // NOLINT

struct NormArgs {
  const void* x;
  const void* residual;
  void* residual_out;
  int64_t rows, cols;
  bool layer;
  float eps, offset;
  const float* weight;
  int64_t weight_group;  // rows per weight row
  const float* bias;
  int64_t bias_group;
  const void* scale_mod;
  const void* shift_mod;
  int64_t mod_group;
  OutArgs o;
};

// What a launch reads besides x: one kernel per variant keeps each one's registers to what it uses.
enum class Variant { kAffine, kResidual, kAda };  // [weight] [bias]; residual [weight]; modulation

template <typename T, int V, int N, int TPR, Variant kVariant>
__global__ void __launch_bounds__(TPR == 32 ? 256 : TPR) NormFp8Kernel(const NormArgs a) {
  using C = Chunk<T, V>;
  constexpr bool kResidual = kVariant == Variant::kResidual, kBias = kVariant == Variant::kAffine;
  constexpr bool kWeight = kVariant != Variant::kAda, kMod = kVariant == Variant::kAda;
  constexpr int kRowsPerBlock = TPR == 32 ? 256 / 32 : 1;
  __shared__ float smem[kMaxThreads / 32];
  RecordTensorScale(a.o);
  const int t = threadIdx.x % TPR;
  const int chunks = static_cast<int>(a.cols / V);
  const float cols_f = static_cast<float>(a.cols);
  uint32_t amax_acc = 0;
  // With TPR > 32 a block is one row and all its threads take the same iterations (block syncs).
  for (int64_t row = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.x / TPR; row < a.rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t offset = row * a.cols;
    // Loads first (all in flight at once), then the residual sum and its store.
    C h[N];
    const C* xr = reinterpret_cast<const C*>(static_cast<const T*>(a.x) + offset) + t;
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (t + TPR * j < chunks) h[j] = xr[TPR * j];
    if (kResidual && a.residual != nullptr) {
      C r[N];
      const C* rr = reinterpret_cast<const C*>(static_cast<const T*>(a.residual) + offset) + t;
#pragma unroll
      for (int j = 0; j < N; ++j)
        if (t + TPR * j < chunks) r[j] = rr[TPR * j];
      C* ro = a.residual_out != nullptr ? reinterpret_cast<C*>(static_cast<T*>(a.residual_out) + offset) + t : nullptr;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (t + TPR * j < chunks) {
#pragma unroll
          for (int k = 0; k < V; ++k) h[j].v[k] = FromFloat<T>(__fadd_rn(ToFloat(h[j].v[k]), ToFloat(r[j].v[k])));
          if (ro != nullptr) ro[TPR * j] = h[j];
        }
      }
    }
    float mean = 0.0f;
    if (a.layer) {
      float s = 0.0f;
#pragma unroll
      for (int j = 0; j < N; ++j)
        if (t + TPR * j < chunks)
#pragma unroll
          for (int k = 0; k < V; ++k) s = __fadd_rn(s, ToFloat(h[j].v[k]));
      mean = __fdiv_rn(RowSum<TPR>(s, smem), cols_f);
    }
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (t + TPR * j < chunks) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float d = __fsub_rn(ToFloat(h[j].v[k]), mean);
          ss = __fmaf_rn(d, d, ss);
        }
      }
    }
    const float rstd = __frcp_rn(__fsqrt_rn(__fadd_rn(__fdiv_rn(RowSum<TPR>(ss, smem), cols_f), a.eps)));
    const float* w = kWeight && a.weight != nullptr ? a.weight + row / a.weight_group * a.cols + t * V : nullptr;
    const float* b = kBias && a.bias != nullptr ? a.bias + row / a.bias_group * a.cols + t * V : nullptr;
    const int64_t mod_offset = row / a.mod_group * a.cols;
    const C* smr = kMod && a.scale_mod != nullptr ? reinterpret_cast<const C*>(static_cast<const T*>(a.scale_mod) + mod_offset) + t : nullptr;
    const C* shr = kMod && a.scale_mod != nullptr ? reinterpret_cast<const C*>(static_cast<const T*>(a.shift_mod) + mod_offset) + t : nullptr;
    // y of chunk j, computed where it is needed (twice with current scaling: cheap next to the
    // row's load, and it keeps only h in registers); parameters come from L1.
    auto chunk_y = [&](int j, int, float (&v)[V]) {
      float wv[V], bv[V];
      if (kWeight && w != nullptr) LoadFloats<V>(w + TPR * V * j, wv);
      if (kBias && b != nullptr) LoadFloats<V>(b + TPR * V * j, bv);
      C sm, sh;
      if (kMod && smr != nullptr) {
        sm = smr[TPR * j];
        sh = shr[TPR * j];
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {  // the reference's order, no contraction into FMAs
        float y = __fmul_rn(__fsub_rn(ToFloat(h[j].v[k]), mean), rstd);
        if (kWeight && w != nullptr) y = __fmul_rn(y, __fadd_rn(a.offset, wv[k]));
        if (kBias && b != nullptr) y = __fadd_rn(y, bv[k]);
        if (kMod && smr != nullptr) y = __fadd_rn(__fmul_rn(y, __fadd_rn(1.0f, ToFloat(sm.v[k]))), ToFloat(sh.v[k]));
        v[k] = y;
      }
    };
    FinishRow<T, V, N, TPR>(chunk_y, row, t, chunks, a.cols, a.o, smem, amax_acc);
  }
  BlockAmaxAtomic(a.o, amax_acc, smem);
}

// Chunks a thread holds for the widest rows: 32 elements in 16-byte vectors, or 16 elements.
template <int V>
constexpr int kMaxChunks = V == 1 ? 16 : 32 / V;

template <typename T, int V>
struct Launcher {
  const NormArgs& a;
  Variant variant;
  int64_t grid;
  int threads;
  cudaStream_t stream;
  template <int N, int TPR>
  cudaError_t operator()() const {
    switch (variant) {
      case Variant::kAffine: NormFp8Kernel<T, V, N, TPR, Variant::kAffine><<<grid, threads, 0, stream>>>(a); break;
      case Variant::kResidual: NormFp8Kernel<T, V, N, TPR, Variant::kResidual><<<grid, threads, 0, stream>>>(a); break;
      case Variant::kAda: NormFp8Kernel<T, V, N, TPR, Variant::kAda><<<grid, threads, 0, stream>>>(a); break;
    }
    return cudaGetLastError();
  }
};

template <typename T>
cudaError_t Launch(const NormParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = p.cols % kVec == 0 && Aligned(p.x, 16) && Aligned(p.residual, 16) &&
                   Aligned(p.residual_out, 16) && Aligned(p.weight, 16) && Aligned(p.bias, 16) &&
                   Aligned(p.scale_mod, 16) && Aligned(p.shift_mod, 16) && Aligned(p.out.y, 16) &&
                   Aligned(p.out.q, kVec);
  const RowShape shape = vec ? ShapeFor(p.cols / kVec, kMaxChunks<kVec>) : ShapeFor(p.cols, kMaxChunks<1>);
  NormArgs a{};
  a.x = p.x;
  a.residual = p.residual;
  a.residual_out = p.residual_out;
  a.rows = p.rows;
  a.cols = p.cols;
  a.layer = p.kind == NormKind::kLayer;
  a.eps = p.eps;
  a.offset = p.offset;
  a.weight = p.weight;
  a.weight_group = p.weight != nullptr ? p.rows / p.weight_rows : 1;
  a.bias = p.bias;
  a.bias_group = p.bias != nullptr ? p.rows / p.bias_rows : 1;
  a.scale_mod = p.scale_mod;
  a.shift_mod = p.shift_mod;
  a.mod_group = p.scale_mod != nullptr ? p.rows / p.mod_rows : 1;
  // The CPU kernel takes any mix; the public ops use these three.
  if ((p.residual != nullptr) + (p.scale_mod != nullptr) + (p.bias != nullptr) > 1 ||
      (p.scale_mod != nullptr && p.weight != nullptr))
    return cudaErrorInvalidValue;
  const Variant variant = p.residual != nullptr ? Variant::kResidual : p.scale_mod != nullptr ? Variant::kAda
                                                                                               : Variant::kAffine;
  return RunPasses(p.out, [&](Pass pass) {
    NormArgs pa = a;
    Variant v = variant;
    pa.o = MakeOutArgs(p.out, p.rows, pass);
    if (pass == Pass::kQuant && p.residual != nullptr) {  // h is stored: read it instead of x + residual
      pa.x = p.residual_out;
      pa.residual = nullptr;
      pa.residual_out = nullptr;
      v = Variant::kAffine;
    }
    const int64_t grid = GridFor(p.rows, shape, pass);
    return vec ? DispatchShape<kMaxChunks<kVec>>(shape, Launcher<T, kVec>{pa, v, grid, shape.threads, stream})
               : DispatchShape<kMaxChunks<1>>(shape, Launcher<T, 1>{pa, v, grid, shape.threads, stream});
  }, stream);
}

}  // namespace

cudaError_t NormFp8(const NormParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (!RowFits(p.x_dtype, p.cols)) return cudaErrorInvalidValue;
  switch (p.x_dtype) {
    case DType::kF32: return Launch<float>(p, stream);
    case DType::kBF16: return Launch<__nv_bfloat16>(p, stream);
    case DType::kF16: return Launch<__half>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fr::cuda
