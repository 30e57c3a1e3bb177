#!/usr/bin/env python3
"""One process against two (torchrun, DDP, gloo on CPU) at the same global batch: throughput, the
time of a checkpoint save, and what the per-step collective decision costs.

    python benchmarks/distributed.py [--preset cpu] [--steps 40] [--global-batch 8]

(``--steps 1 --saves 1 --global-batch 2``: a check that the script runs.)

Runs the same measurements once in this process and once under
``torchrun --standalone --nproc_per_node=2``, each process timing itself:

- step: the median time of an optimizer step (global batch split over the ranks);
- save: the median time a synchronous save holds the loop (under DDP: every rank's RNG
  streams gathered to rank 0, its commit, and the barrier after it);
- decision: the median time of :func:`nanoresume.distributed.agree` alone (one all-gather of
  five numbers per rank; in one process, the same arithmetic without a collective).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULT = "RESULT "


def measure(args: argparse.Namespace) -> dict[str, float]:
    """This process's measurements: one rank of the torchrun job, or the one process itself."""
    import torch

    from benchmarks._common import make_trainer
    from nanoresume import distributed

    env = distributed.detect()
    trainer = make_trainer(args.preset, "cpu", batch_size=args.global_batch // env.world_size,
                           async_save=False, keep_last=2, eval_iters=1)
    for _ in range(3):
        trainer.train_step()  # warm-up
    steps = []
    for _ in range(args.steps):
        started = time.perf_counter()
        trainer.train_step()
        steps.append(time.perf_counter() - started)
    saves = []
    for _ in range(args.saves):
        trainer.counters.step += 1  # a new step name for every save, as in training
        started = time.perf_counter()
        trainer.saves.save_if_due(trainer.counters.step, force=True)
        saves.append(time.perf_counter() - started)
    loss, norm = torch.tensor(2.5), torch.tensor(1.0)
    decisions = []
    for _ in range(200):
        started = time.perf_counter()
        distributed.agree(loss, norm, stop_code=0, time_up=False, save_time_due=False, save_failed=False)
        decisions.append(time.perf_counter() - started)
    trainer.close()
    return {"step": statistics.median(steps), "save": statistics.median(saves),
            "decision": statistics.median(decisions), "tokens_per_step": trainer.cfg.tokens_per_step(env.world_size)}


def one_process(args: argparse.Namespace) -> dict[str, float]:
    """The one-process measurements, in this process (a process of its own would only add a torch import),
    with the thread count the torchrun workers get."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        return measure(args)
    finally:
        torch.set_num_threads(threads)


def run(command: list[str]) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(next(line for line in output.splitlines() if line.startswith(RESULT))[len(RESULT):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per step over all processes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = measure(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print(RESULT + json.dumps(result), flush=True)
        return
    flags = ["--preset", args.preset, "--steps", str(args.steps), "--saves", str(args.saves),
             "--global-batch", str(args.global_batch), "--worker"]
    one = one_process(args)
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               *flags])
    print(f"preset {args.preset}, global batch {args.global_batch}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')} per process")
    for name, result in (("1 process", one), ("2 processes (DDP, gloo)", two)):
        print(f"  {name:24} {result['tokens_per_step'] / result['step']:>9,.0f} tok/s   "
              f"save {result['save'] * 1e3:7.1f} ms   decision {result['decision'] * 1e6:7.1f} us")
    print(f"  2 vs 1: throughput {one['step'] / two['step']:.2f}x, save {two['save'] / one['save']:.2f}x; "
          f"the decision is {two['decision'] / two['step']:.2%} of a 2-process step")


if __name__ == "__main__":
    main()
