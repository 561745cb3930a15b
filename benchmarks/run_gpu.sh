#!/usr/bin/env bash
# One device call: build the CUDA module in-tree, run the GPU tests and the benchmarks, and copy logs
# and results to $OUT (the device tool brings that folder back). Usage:
#   bash benchmarks/run_gpu.sh [none|tests|bench|all] [extra args for benchmarks/gemm.py]
# GPU_TESTS overrides the test selection (default: every `gpu` test under tests/). With pytest-xdist
# importable the tests run in GPU_TEST_WORKERS processes (default 6) sharing the GPU.
set -uo pipefail
what=${1:-all}; shift || true
OUT=${OUT:-/tmp/flashrt_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, jaxlib, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
t0=$(date +%s)
cmake -S . -B build/gpu -G Ninja -DSKBUILD_PROJECT_NAME=flashrt_jax -DPython_EXECUTABLE="$(which python3)" \
  -DFLASHRT_CUDA=ON -DCMAKE_CUDA_COMPILER="$(which nvcc || echo /usr/local/cuda/bin/nvcc)" > "$OUT/build.log" 2>&1 \
  && ninja -C build/gpu >> "$OUT/build.log" 2>&1 && cp build/gpu/_*.so flashrt_jax/ || { tail -30 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "import flashrt_jax as fr; assert fr.cuda_available(); print('flashrt_jax CUDA handlers registered')" || exit 1
status=0
if [[ $what == tests || $what == all ]]; then
  workers=()
  python3 -c "import xdist" 2>/dev/null && workers=(-n "${GPU_TEST_WORKERS:-6}")
  # Workers share the GPU: no process may take most of its memory up front.
  XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -q -m gpu -p no:cacheprovider "${workers[@]}" \
    ${GPU_TESTS:-tests} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
  status=${PIPESTATUS[0]}
fi
if [[ $what == bench || $what == all ]]; then
  python3 benchmarks/gemm.py "$@" 2>&1 | tee "$OUT/bench.log"
  cp benchmarks/results/h100/gemm.* "$OUT"/
fi
exit $status
