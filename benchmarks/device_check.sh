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
timeout 100 python3 benchmarks/stop_latency.py --device cuda --preset gpu10m 2>&1 | tee "$OUT/stop_latency.log"
# The tools on a GPU-trained run: train a little on CUDA (float16 + scaler), stop it with SIGTERM, resume, sample, evaluate, verify.
G=/tmp/device-tools; rm -rf "$G"
timeout 120 python3 scripts/train.py --device cuda --dtype float16 --max-steps 400 --eval-interval 100 --no-progress --out-dir "$G" --data "$(python3 -c 'import argparse; print(argparse.__file__)')" &
pid=$!; sleep 25; kill -TERM $pid; wait $pid; echo "train exit after SIGTERM: $?" | tee "$OUT/tools.log"
timeout 120 python3 scripts/train.py --out-dir "$G" --resume auto --no-progress 2>&1 | tail -3 | tee -a "$OUT/tools.log"
timeout 60 python3 scripts/sample.py --ckpt "$G/best.pt" --device cuda --prompt "def " --max-new-tokens 80 --seed 1 2>&1 | tee -a "$OUT/tools.log"
timeout 60 python3 scripts/evaluate.py --ckpt "$G/best.pt" --device cuda --data "$(python3 -c 'import json,os; print(os.path.join(os.path.dirname(json.__file__), "decoder.py"))')" --no-progress 2>&1 | tee -a "$OUT/tools.log"
timeout 60 python3 scripts/ckpt.py verify "$G" 2>&1 | tee -a "$OUT/tools.log"
