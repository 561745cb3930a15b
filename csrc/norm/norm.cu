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
  int64_t iters;  // row groups per block
  OutArgs o;
};

// What a launch reads besides x: one kernel per variant keeps each one's registers to what it uses.
enum class Variant { kAffine, kResidual, kAda };  // [weight] [bias]; residual [weight]; modulation
// Whether the row's mean is subtracted: known at compile time for the affine kernels (rms_norm,
// layer_norm), read from the arguments by the others.
enum class Mean { kNo, kYes, kRuntime };

template <int TPR>
constexpr int kThreads = TPR == 32 ? 128 : TPR;  // 4 rows a block with one warp a row
template <int TPR>
constexpr int kRowsPerBlock = kThreads<TPR> / TPR;  // rows a block works on at once

// Loads the next row while the current one is reduced and written, where the row is at most 64
// bytes a thread (its registers are then affordable); x + residual rows are twice the bytes in
// flight anyway.
template <typename T, int V, int N, Variant kVariant>
constexpr bool kPrefetch = kVariant != Variant::kResidual && N * V * sizeof(T) <= 64;

// Registers a thread may use: 96 for rms / ada rows of 2-byte vectors (10 blocks of 64 threads an
// SM, as before, now with the next row in flight), 104 for layer norm and residual (9 blocks:
// ptxas spills at 96), 128 for the rest and 160 for float32 residual rows.
template <typename T, int V, Variant kVariant, Mean kMean>
constexpr int kRegs = sizeof(T) == 2 && V > 1 ? (kVariant == Variant::kResidual || kMean == Mean::kYes ? 104 : 96)
                                              : (kVariant == Variant::kResidual && sizeof(T) == 4 && V > 1 ? 160 : 128);
template <typename T, int V, int TPR, Variant kVariant, Mean kMean>
constexpr int kMinBlocks = 65536 / (kRegs<T, V, kVariant, kMean> * kThreads<TPR>) > 0
                               ? 65536 / (kRegs<T, V, kVariant, kMean> * kThreads<TPR>) : 1;

// A block works on a.iters consecutive groups of kRowsPerBlock rows (a contiguous stretch, so the
// parameter rows it reads stay in L1), one group after the other, loading the next group's x
// while it finishes the current one. Thread t of a row always holds chunks t + TPR * j. The second
// launch of per-tensor scaling (kQuant) walks its stretch backwards: the rows the amax launch read
// last are the ones still in L2.
template <typename T, int V, int N, int TPR, Variant kVariant, Mean kMean, bool kGiven>
__global__ void __launch_bounds__(kThreads<TPR>, (kMinBlocks<T, V, TPR, kVariant, kMean>))
    NormFp8Kernel(const NormArgs a) {
  using P = Packed<T, V>;
  constexpr bool kResidual = kVariant == Variant::kResidual, kBias = kVariant == Variant::kAffine;
  constexpr bool kWeight = kVariant != Variant::kAda, kMod = kVariant == Variant::kAda;
  constexpr int kRB = kRowsPerBlock<TPR>;
  constexpr bool kPre = kPrefetch<T, V, N, kVariant>;
  constexpr int kSlot = TPR / 32;  // words of one reduction's cross-warp step
  // Slots: (mean, sum of squares, max) x two alternating rows.
  __shared__ float smem[6 * kSlot > kMaxThreads / 32 ? 6 * kSlot : kMaxThreads / 32];
  RecordTensorScale(a.o);
  const bool layer = kMean == Mean::kYes || (kMean == Mean::kRuntime && a.layer);
  const int t = threadIdx.x % TPR;
  const int chunks = static_cast<int>(a.cols / V);
  const float cols_f = static_cast<float>(a.cols);
  uint32_t amax_acc = 0;
  // This thread's rows: first + kRB * i for i < n (the same n in all threads of a row, and with
  // TPR > 32 in the whole block, which syncs).
  const int64_t first = static_cast<int64_t>(blockIdx.x) * a.iters * kRB + threadIdx.x / TPR;
  const int64_t n = first < a.rows ? min(a.iters, (a.rows - first + kRB - 1) / kRB) : 0;
  const bool reverse = a.o.pass == Pass::kQuant;
  auto row_at = [&](int64_t i) { return first + kRB * (reverse ? n - 1 - i : i); };
  P h[N];
  if (kPre && n > 0) LoadRow<T, V, N, TPR>(h, a.x, row_at(0) * a.cols, t, chunks);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = row_at(i);
    const int64_t offset = row * a.cols;
    float* slots = smem + (i & 1) * 3 * kSlot;
    P hn[N];
    if constexpr (kPre) {
      if (i + 1 < n) LoadRow<T, V, N, TPR>(hn, a.x, row_at(i + 1) * a.cols, t, chunks);
    } else {
      LoadRow<T, V, N, TPR>(h, a.x, offset, t, chunks);
    }
    if (kResidual && a.residual != nullptr) {
      P r[N];
      LoadRow<T, V, N, TPR>(r, a.residual, offset, t, chunks);
      T* ro = a.residual_out != nullptr ? static_cast<T*>(a.residual_out) + offset + t * V : nullptr;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (t + TPR * j < chunks) {
          P sum;
#pragma unroll
          for (int k = 0; k < V; ++k) sum.Set(k, __fadd_rn(h[j].Get(k), r[j].Get(k)));
          h[j] = sum;
          if (ro != nullptr) sum.Store(ro + TPR * V * j);
        }
      }
    }
    // Statistics in the reference's operations; without a mean, h - 0 is h itself.
    float mean = 0.0f;
    if (layer) {
      float s = 0.0f;
#pragma unroll
      for (int j = 0; j < N; ++j)
        if (t + TPR * j < chunks)
#pragma unroll
          for (int k = 0; k < V; ++k) s = __fadd_rn(s, h[j].Get(k));
      mean = __fdiv_rn(RowSumAt<TPR>(s, slots), cols_f);
    }
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (t + TPR * j < chunks) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float d = layer ? __fsub_rn(h[j].Get(k), mean) : h[j].Get(k);
          ss = __fmaf_rn(d, d, ss);
        }
      }
    }
    const float rstd =
        __frcp_rn(__fsqrt_rn(__fadd_rn(__fdiv_rn(RowSumAt<TPR>(ss, slots + kSlot), cols_f), a.eps)));
    // y once, into registers; parameters come from L1 (the block's rows share them).
    const float* w = kWeight && a.weight != nullptr ? a.weight + DivRows(row, a.weight_group) * a.cols + t * V : nullptr;
    const float* b = kBias && a.bias != nullptr ? a.bias + DivRows(row, a.bias_group) * a.cols + t * V : nullptr;
    const int64_t mod_offset = kMod ? DivRows(row, a.mod_group) * a.cols : 0;
    const T* smr = kMod ? static_cast<const T*>(a.scale_mod) + mod_offset + t * V : nullptr;
    const T* shr = kMod ? static_cast<const T*>(a.shift_mod) + mod_offset + t * V : nullptr;
    // Absent parameters are exact identities, selected rather than branched on per element: a
    // weight multiplies by 1 (offset ignored), a bias adds -0 (x + -0 == x for every x, -0 included).
    float y[N][V];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (t + TPR * j < chunks) {
        float g[V], bv[V];
        if (kWeight && w != nullptr) {
          LoadFloats<V>(w + TPR * V * j, g);
#pragma unroll
          for (int k = 0; k < V; ++k) g[k] = __fadd_rn(a.offset, g[k]);
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) g[k] = 1.0f;
        }
        if (kBias && b != nullptr) {
          LoadFloats<V>(b + TPR * V * j, bv);
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) bv[k] = -0.0f;
        }
        P sm, sh;
        if constexpr (kMod) {  // scale_mod and shift_mod come together
          sm.Load(smr + TPR * V * j);
          sh.Load(shr + TPR * V * j);
        }
#pragma unroll
        for (int k = 0; k < V; ++k) {  // the reference's order, no contraction into FMAs
          const float d = layer ? __fsub_rn(h[j].Get(k), mean) : h[j].Get(k);
          float v = __fmul_rn(d, rstd);
          if constexpr (kWeight) v = __fmul_rn(v, g[k]);
          if constexpr (kBias) v = __fadd_rn(v, bv[k]);
          if constexpr (kMod) v = __fadd_rn(__fmul_rn(v, __fadd_rn(1.0f, sm.Get(k))), sh.Get(k));
          y[j][k] = v;
        }
      }
    }
    QuantizeRow<T, V, N, TPR, kGiven>(y, row, t, chunks, a.cols, a.o, slots + 2 * kSlot, amax_acc);
    if constexpr (kPre) {
#pragma unroll
      for (int j = 0; j < N; ++j) h[j] = hn[j];
    }
  }
  BlockAmaxAtomic(a.o, amax_acc);
}

template <typename T, int V>
struct Launcher {
  const NormArgs& a;
  Variant variant;
  cudaStream_t stream;

  // One resident wave of blocks, each taking an even share of the row groups.
  template <typename Kernel>
  cudaError_t Run(Kernel kernel, int threads, int rows_per_block) const {
    int device = 0, sms = 132, per_sm = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0);
    if (err != cudaSuccess) return err;
    const int64_t groups = (a.rows + rows_per_block - 1) / rows_per_block;
    const int64_t resident = std::max<int64_t>(1, static_cast<int64_t>(std::max(per_sm, 1)) * sms);
    NormArgs pa = a;
    pa.iters = (groups + resident - 1) / resident;
    const int64_t grid = (groups + pa.iters - 1) / pa.iters;
    kernel<<<grid, threads, 0, stream>>>(pa);
    return cudaGetLastError();
  }

  template <int N, int TPR, bool kGiven>
  cudaError_t RunScaling() const {
    constexpr int threads = kThreads<TPR>, rpb = kRowsPerBlock<TPR>;
    switch (variant) {
      case Variant::kAffine:
        return a.layer ? Run(NormFp8Kernel<T, V, N, TPR, Variant::kAffine, Mean::kYes, kGiven>, threads, rpb)
                       : Run(NormFp8Kernel<T, V, N, TPR, Variant::kAffine, Mean::kNo, kGiven>, threads, rpb);
      case Variant::kResidual:
        return Run(NormFp8Kernel<T, V, N, TPR, Variant::kResidual, Mean::kRuntime, kGiven>, threads, rpb);
      case Variant::kAda: return Run(NormFp8Kernel<T, V, N, TPR, Variant::kAda, Mean::kRuntime, kGiven>, threads, rpb);
    }
    return cudaErrorInvalidValue;
  }

  template <int N, int TPR>
  cudaError_t operator()() const {
    return a.o.scale_in != nullptr ? RunScaling<N, TPR, true>() : RunScaling<N, TPR, false>();
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
      (p.scale_mod != nullptr && p.weight != nullptr) || (p.scale_mod != nullptr) != (p.shift_mod != nullptr))
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
    return vec ? DispatchShape<kMaxChunks<kVec>>(shape, Launcher<T, kVec>{pa, v, stream})
               : DispatchShape<kMaxChunks<1>>(shape, Launcher<T, 1>{pa, v, stream});
  }, stream);
}

}  // namespace

cudaError_t NormFp8(const NormParams& p, cudaStream_t stream) {
  return rows::DispatchRowDtype(p.x_dtype, p.rows, p.cols, [&](auto t) { return Launch<decltype(t)>(p, stream); });
}

}  // namespace fr::cuda
