// cuBLASLt FP8 GEMM. Row-major out (m, n) = a (m, k) @ b (n, k)^T is, in cuBLASLt's column-major
// terms, D (n x m) = op(A) @ op(B) with A = b, transa = T and B = a, transb = N: the "TN" form that
// FP8 on sm_90 requires. Plans (descriptors + the heuristic's candidate algorithms) are cached per
// device and problem, so a call after the first only sets pointers and enqueues. The first call made
// outside a CUDA graph capture times the candidates on its own operands and keeps the fastest, as
// XLA's autotuner does for its GEMMs; until then (or when captured) the heuristic's first pick runs.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "gemm/fp8_gemm.h"

namespace fr::cuda {
namespace {

#define FR_LT_CHECK(expr)                                                                         \
  do {                                                                                            \
    cublasStatus_t status_ = (expr);                                                              \
    if (status_ != CUBLAS_STATUS_SUCCESS)                                                         \
      return std::string(#expr " failed: ") + cublasLtGetStatusString(status_);                   \
  } while (0)

cudaDataType_t CudaType(DType t) {
  switch (t) {
    case DType::kE4M3: return CUDA_R_8F_E4M3;
    case DType::kE5M2: return CUDA_R_8F_E5M2;
    case DType::kBF16: return CUDA_R_16BF;
    case DType::kF16: return CUDA_R_16F;
    default: return CUDA_R_32F;
  }
}

int Alignment(const void* p) {  // largest power of two (<= 256) dividing the address
  auto v = reinterpret_cast<uintptr_t>(p);
  int a = 256;
  while (a > 1 && v % a != 0) a /= 2;
  return a;
}

using PlanKey = std::tuple<int, int64_t, int64_t, int64_t, int, int, int, bool, bool, bool, size_t, int, int, int>;

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a_layout = nullptr, b_layout = nullptr, d_layout = nullptr;
  std::vector<cublasLtMatmulAlgo_t> candidates;  // the heuristic's order; candidates[0] runs untuned
  bool tuned = false;
  std::mutex mu;  // the descriptor's pointer attributes are set per call
  ~Plan() {
    if (d_layout) cublasLtMatrixLayoutDestroy(d_layout);
    if (b_layout) cublasLtMatrixLayoutDestroy(b_layout);
    if (a_layout) cublasLtMatrixLayoutDestroy(a_layout);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

std::mutex cache_mu;
std::map<int, cublasLtHandle_t> handles;
std::map<PlanKey, std::unique_ptr<Plan>> plans;

std::string GetHandle(int device, cublasLtHandle_t* handle) {
  auto it = handles.find(device);
  if (it == handles.end()) {
    cublasLtHandle_t h;
    FR_LT_CHECK(cublasLtCreate(&h));
    it = handles.emplace(device, h).first;
  }
  *handle = it->second;
  return "";
}

constexpr int kCandidates = 8;  // heuristic results the first uncaptured call times

std::string BuildPlan(cublasLtHandle_t handle, const Fp8GemmParams& p, int align_a, int align_b, int align_d,
                      Plan* plan) {
  FR_LT_CHECK(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t trans = CUBLAS_OP_T, no_trans = CUBLAS_OP_N;
  FR_LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans, sizeof(trans)));
  FR_LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &no_trans, sizeof(no_trans)));
  int8_t fast = p.fast_accum ? 1 : 0;
  FR_LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof(fast)));
  // Vector scale modes are checked against real pointers at heuristic time; later calls reset them.
  FR_LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &p.b_scale,
                                             sizeof(p.b_scale)));
  FR_LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &p.a_scale,
                                             sizeof(p.a_scale)));
  if (p.vector_scales) {
    int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
    FR_LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof(mode)));
    FR_LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof(mode)));
  }
  if (p.bias != nullptr) {
    cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    cudaDataType_t bias_type = CudaType(p.out_dtype);
    FR_LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
    FR_LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                               sizeof(bias_type)));
  }
  // Column-major views: A = b as (k x n), B = a as (k x m), D = out as (n x m).
  FR_LT_CHECK(cublasLtMatrixLayoutCreate(&plan->a_layout, CudaType(p.b_dtype), p.k, p.n, p.k));
  FR_LT_CHECK(cublasLtMatrixLayoutCreate(&plan->b_layout, CudaType(p.a_dtype), p.k, p.m, p.k));
  FR_LT_CHECK(cublasLtMatrixLayoutCreate(&plan->d_layout, CudaType(p.out_dtype), p.n, p.m, p.n));

  cublasLtMatmulPreference_t pref;
  FR_LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>, decltype(&cublasLtMatmulPreferenceDestroy)>
      pref_guard(pref, &cublasLtMatmulPreferenceDestroy);
  size_t ws = p.workspace_bytes;
  uint32_t aa = align_b, ab = align_a, ad = align_d;  // cuBLASLt's A is our b, its B our a
  FR_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  FR_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa, sizeof(aa)));
  FR_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab, sizeof(ab)));
  FR_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ad, sizeof(ad)));
  FR_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ad, sizeof(ad)));
  cublasLtMatmulHeuristicResult_t results[kCandidates];
  int found = 0;
  FR_LT_CHECK(cublasLtMatmulAlgoGetHeuristic(handle, plan->desc, plan->a_layout, plan->b_layout, plan->d_layout,
                                             plan->d_layout, pref, kCandidates, results, &found));
  for (int i = 0; i < found; ++i)
    if (results[i].state == CUBLAS_STATUS_SUCCESS) plan->candidates.push_back(results[i].algo);
  if (plan->candidates.empty()) return "cuBLASLt has no FP8 algorithm for this problem";
  plan->tuned = plan->candidates.size() == 1;
  return "";
}

cublasStatus_t Run(cublasLtHandle_t handle, const Plan& plan, const cublasLtMatmulAlgo_t& algo,
                   const Fp8GemmParams& p, cudaStream_t stream) {
  const float alpha = 1.0f, beta = 0.0f;
  return cublasLtMatmul(handle, plan.desc, &alpha, p.b, plan.a_layout, p.a, plan.b_layout, &beta, p.out,
                        plan.d_layout, p.out, plan.d_layout, &algo, p.workspace, p.workspace_bytes, stream);
}

// Times each candidate (kTimedRuns after a warm-up run) on the call's own operands and moves the
// fastest to the front. The output is overwritten by the runs; the caller's real run follows.
// Skipped (plan left untuned) while the stream is being captured, where nothing may synchronize.
void Tune(cublasLtHandle_t handle, Plan* plan, const Fp8GemmParams& p, cudaStream_t stream) {
  constexpr int kTimedRuns = 3;
  cudaStreamCaptureStatus capture;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone) return;
  cudaEvent_t start, stop;
  if (cudaEventCreate(&start) != cudaSuccess) return;
  if (cudaEventCreate(&stop) != cudaSuccess) {
    cudaEventDestroy(start);
    return;
  }
  float best_ms = -1.0f;
  size_t best = 0;
  for (size_t i = 0; i < plan->candidates.size(); ++i) {
    const cublasLtMatmulAlgo_t& algo = plan->candidates[i];
    if (Run(handle, *plan, algo, p, stream) != CUBLAS_STATUS_SUCCESS) continue;
    cudaEventRecord(start, stream);
    bool ok = true;
    for (int r = 0; r < kTimedRuns && ok; ++r) ok = Run(handle, *plan, algo, p, stream) == CUBLAS_STATUS_SUCCESS;
    cudaEventRecord(stop, stream);
    float ms = 0.0f;
    if (!ok || cudaEventSynchronize(stop) != cudaSuccess || cudaEventElapsedTime(&ms, start, stop) != cudaSuccess)
      continue;
    if (best_ms < 0.0f || ms < best_ms) best_ms = ms, best = i;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::swap(plan->candidates[0], plan->candidates[best]);
  plan->tuned = true;
}

}  // namespace

std::string Fp8Gemm(const Fp8GemmParams& p, cudaStream_t stream) {
  int device;
  if (cudaGetDevice(&device) != cudaSuccess) return "cudaGetDevice failed";
  const int align_a = Alignment(p.a), align_b = Alignment(p.b), align_d = Alignment(p.out);
  PlanKey key{device, p.m, p.n, p.k, static_cast<int>(p.a_dtype), static_cast<int>(p.b_dtype),
              static_cast<int>(p.out_dtype), p.vector_scales, p.bias != nullptr, p.fast_accum, p.workspace_bytes,
              align_a, align_b, align_d};
  cublasLtHandle_t handle;
  Plan* plan;
  {
    std::lock_guard<std::mutex> lock(cache_mu);
    if (std::string err = GetHandle(device, &handle); !err.empty()) return err;
    auto it = plans.find(key);
    if (it == plans.end()) {
      auto fresh = std::make_unique<Plan>();
      if (std::string err = BuildPlan(handle, p, align_a, align_b, align_d, fresh.get()); !err.empty())
        return err + " (m=" + std::to_string(p.m) + " n=" + std::to_string(p.n) + " k=" + std::to_string(p.k) +
               " a_dtype=" + std::to_string(static_cast<int>(p.a_dtype)) + " b_dtype=" +
               std::to_string(static_cast<int>(p.b_dtype)) + " out_dtype=" + std::to_string(static_cast<int>(p.out_dtype)) +
               " vector_scales=" + std::to_string(p.vector_scales) + " bias=" + std::to_string(p.bias != nullptr) +
               " alignments a/b/out=" + std::to_string(align_a) + "/" + std::to_string(align_b) + "/" +
               std::to_string(align_d) + ")";
      it = plans.emplace(key, std::move(fresh)).first;
    }
    plan = it->second.get();
  }
  std::lock_guard<std::mutex> lock(plan->mu);
  FR_LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &p.b_scale,
                                             sizeof(p.b_scale)));
  FR_LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &p.a_scale,
                                             sizeof(p.a_scale)));
  if (p.bias != nullptr)
    FR_LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias, sizeof(p.bias)));
  if (!plan->tuned) Tune(handle, plan, p, stream);
  FR_LT_CHECK(Run(handle, *plan, plan->candidates[0], p, stream));
  return "";
}

}  // namespace fr::cuda
