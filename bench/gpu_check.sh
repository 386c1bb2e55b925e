#!/usr/bin/env bash
# One pass of the checks that need a GPU, for a machine that has one but none of our build:
# build hetmerge's extensions there (its own python3, torch and nvcc), run the CUDA tests and the
# whole suite with the GPU visible, then the CUDA benchmark. Logs go to $OUT (default: ./gpu-check).
#
#     bash bench/gpu_check.sh [bench args...]      # e.g. --size 8192 --k 8
#
# Python packages the machine lacks can sit as wheels in ./.whl (installed into /tmp/site first).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

if [ -z "${CUDACXX:-}" ]; then
  for nvcc in "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc /usr/local/bin/nvcc; do
    if [ -n "$nvcc" ] && [ -x "$nvcc" ]; then export CUDACXX="$nvcc"; break; fi
  done
fi
echo "gpu_check: CUDACXX=${CUDACXX:-none}"
start=$(date +%s)
cmake -S . -B build/gpu-check -G Ninja -DCMAKE_BUILD_TYPE=Release -DHETMERGE_CUDA=ON \
  -DPython_EXECUTABLE="$(command -v $PY)" -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" >"$OUT/configure.log" 2>&1 \
  && cmake --build build/gpu-check -j"$(nproc)" >"$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/configure.log" "$OUT/build.log" 2>/dev/null; exit 1; }
cp build/gpu-check/_C*.so build/gpu-check/_cuda*.so python/hetmerge/
echo "gpu_check: build took $(( $(date +%s) - start )) s"
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import hetmerge; from hetmerge import _backend; print('cuda_available', hetmerge.cuda_available(), _backend.cuda_status())"

echo "== CUDA tests"
$PY -m pytest tests/test_cuda.py tests/test_cuda_build.py -p no:cacheprovider -rfEs 2>&1 | tee "$OUT/cuda_tests.log" | tail -40
echo "== whole suite, GPU visible"
xdist=""; $PY -c "import xdist" 2>/dev/null && xdist="-n 8"
timeout 200 $PY -m pytest tests $xdist -p no:cacheprovider --maxfail=40 -rfE 2>&1 | tee "$OUT/suite.log" | grep -E "FAILED|ERROR|passed|failed" | tail -40
echo "== bench_cuda"
timeout 120 $PY bench/bench_cuda.py "$@" 2>&1 | tee "$OUT/bench_cuda.log"
