#!/usr/bin/env bash
# One prepared script for a GPU machine: the CUDA tests, then the benchmarks, logs under $OUT.
# Usage (from the repo root): OUT=/some/folder bash benchmarks/device_check.sh
set -u
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/unit/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
timeout 90 python3 benchmarks/checkpoint_io.py --device cuda 2>&1 | tee "$OUT/checkpoint_io.log"
timeout 100 python3 benchmarks/throughput.py --device cuda 2>&1 | tee "$OUT/throughput.log"
timeout 120 python3 benchmarks/stop_latency.py --device cuda --preset gpu10m 2>&1 | tee "$OUT/stop_latency.log"
