#!/usr/bin/env bash
# One prepared script for a GPU machine: the CUDA tests, then the benchmarks, logs under $OUT.
# Usage (from the repo root): OUT=/some/folder bash benchmarks/device_check.sh
set -u
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "no CUDA device here: nothing to check" | tee "$OUT/skipped.txt"
    exit 0
fi
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/unit/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
timeout 150 python3 benchmarks/checkpoint_io.py --device cuda --repeats 5 2>&1 | tee "$OUT/checkpoint_io.log"
timeout 100 python3 benchmarks/throughput.py --device cuda 2>&1 | tee "$OUT/throughput.log"
timeout 100 python3 benchmarks/stop_latency.py --device cuda --preset gpu10m 2>&1 | tee "$OUT/stop_latency.log"
# The tools on a GPU-trained run: train on CUDA (float16 + scaler) with a step count it cannot
# finish before the signal, SIGTERM it once it has trained a while, resume (keeping float16), then
# sample, evaluate, verify. Each line of tools.log says what it shows.
G=/tmp/device-tools; rm -rf "$G"
timeout 300 python3 scripts/train.py --device cuda --dtype float16 --max-steps 100000 --eval-interval 100 \
    --no-progress --log-interval 50 --out-dir "$G" --data "$(python3 -c 'import argparse; print(argparse.__file__)')" \
    > "$OUT/train-stopped.log" 2>&1 &
pid=$!
until grep -q "step    200 |" "$OUT/train-stopped.log" 2>/dev/null || ! kill -0 $pid 2>/dev/null; do sleep 1; done
kill -TERM $pid; wait $pid; echo "train exit after SIGTERM (expect 143): $?" | tee "$OUT/tools.log"
tail -1 "$OUT/train-stopped.log" | tee -a "$OUT/tools.log"
timeout 120 python3 scripts/train.py --out-dir "$G" --resume auto --max-steps 300 --no-progress 2>&1 \
    | grep -E "resumed from|float16|finished" | tee -a "$OUT/tools.log"
timeout 60 python3 scripts/sample.py --ckpt "$G/best.pt" --device cuda --prompt "def " --max-new-tokens 80 --seed 1 2>&1 | tee -a "$OUT/tools.log"
timeout 60 python3 scripts/evaluate.py --ckpt "$G/best.pt" --device cuda --data "$(python3 -c 'import json,os; print(os.path.join(os.path.dirname(json.__file__), "decoder.py"))')" --no-progress 2>&1 | tee -a "$OUT/tools.log"
timeout 60 python3 scripts/ckpt.py verify "$G" 2>&1 | tee -a "$OUT/tools.log"
# nccl: two processes on one GPU is not possible with one rank per GPU; where there are two GPUs,
# a 2-process DDP run stopped with SIGTERM and resumed.
if [ "$NGPU" -ge 2 ]; then
    timeout 200 torchrun --standalone --nproc_per_node=2 scripts/train.py --device cuda --max-steps 300 \
        --out-dir /tmp/device-ddp --no-progress 2>&1 | tail -3 | tee "$OUT/nccl.log"
fi
# FSDP2 built on the meta device, each rank materializing only its shards, over nccl: one rank per GPU
# (one GPU: one rank, still nccl, meta init and folders). First, meta init on CUDA gives the same
# weights as a whole model built on the CPU; then train, stop at 200, resume to 300; then the memory
# benchmark (peak allocated per rank, DDP against FSDP).
timeout 120 python3 - <<'PY' 2>&1 | tee "$OUT/fsdp.log"
import torch
from nanoresume.config import ModelConfig
from nanoresume.model import GPT, materialize, shapes_only
cfg = ModelConfig(n_layer=4, n_head=4, n_embd=256, block_size=128)
on_gpu = materialize(shapes_only(cfg), torch.device("cuda"), 1337).state_dict()
whole = GPT(cfg, seed=1337).state_dict()
same = all(torch.equal(on_gpu[k].cpu(), v) for k, v in whole.items())
print(f"meta init on cuda equals the whole model built on the cpu: {same}")
PY
F=/tmp/device-fsdp; rm -rf "$F"
FSDP_FLAGS=(--device cuda --parallel fsdp --dtype bfloat16 --eval-interval 100 --no-progress --out-dir "$F")
timeout 300 torchrun --standalone --nproc_per_node="$NGPU" scripts/train.py "${FSDP_FLAGS[@]}" --max-steps 200 \
    2>&1 | grep -E "sharded over|finished|rror" | tee -a "$OUT/fsdp.log"
timeout 300 torchrun --standalone --nproc_per_node="$NGPU" scripts/train.py "${FSDP_FLAGS[@]}" --max-steps 300 \
    --resume auto 2>&1 | grep -E "resumed from|sharded over|finished|rror" | tee -a "$OUT/fsdp.log"
timeout 300 python3 benchmarks/fsdp_memory.py --device cuda --nproc "$NGPU" 2>&1 | tee "$OUT/fsdp_memory.log"
