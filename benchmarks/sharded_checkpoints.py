#!/usr/bin/env python3
"""Sharded vs single-file checkpoints, and FSDP vs DDP memory, under torchrun on this machine.

    python benchmarks/sharded_checkpoints.py [--nproc 2] [--preset gpu10m] [--repeats 3] [--device cpu]

``--combinations ddp/file fsdp/sharded`` runs only those jobs, and prints the ratios whose jobs ran
(``--preset cpu --repeats 1 --batch-size 1 --nproc 1 --combinations ddp/file fsdp/sharded``: a check that
the script runs).

Runs one torchrun job per combination of ``--parallel`` (ddp, fsdp) and ``--ckpt-format``
(file, sharded); with ``--nproc 1``, the one process torchrun would start, without torchrun.
Every rank of a job builds the trainer, trains two steps (so the optimizer holds its moments),
then times ``--repeats`` synchronous saves (state built, written, fsynced, committed, every
rank waiting for the commit) and as many resumes from the newest checkpoint (rank 0 verifies
it and picks it, every rank loads it into its model and optimizer), and
reports its peak memory. The parent prints each job's medians, then the ratios:

- save and load time, sharded folder / single file, under each of ddp and fsdp;
- peak memory per rank and model + optimizer bytes per rank, fsdp / ddp (file checkpoints).

Memory on CPU is the growth of the process's peak RSS over what it held before the trainer
was built (imports excluded); on CUDA, torch's peak allocated memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import DATA, launch_command, peak_rss_bytes, scratch_dir  # noqa: E402

COMBINATIONS = [("ddp", "file"), ("ddp", "sharded"), ("fsdp", "file"), ("fsdp", "sharded")]
RESULT_MARK = "RESULT "


def worker(args: argparse.Namespace) -> None:
    """One rank of one job (run by torchrun)."""
    import torch

    from nanoresume import distributed, parallel
    from nanoresume.checkpoint import CheckpointDir
    from nanoresume.config import TrainConfig, resolve_config
    from nanoresume.loading import load_valid
    from nanoresume.trainer import Trainer

    baseline = peak_rss_bytes()
    cfg = resolve_config(TrainConfig(
        preset=args.preset, device=args.device, data=DATA, out_dir=args.out, cache_dir=args.out + "-cache",
        batch_size=args.batch_size, parallel=args.parallel, ckpt_format=args.format, async_save=False,
        max_steps=1000, eval_interval=1000, keep_last=2, progress=False))
    trainer = Trainer(cfg)
    rank = trainer.env.rank
    for _ in range(2):
        trainer.train_step()
    trainer.counters.step = 2
    train_peak = peak_memory(torch, trainer.device, baseline)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    saves, loads = [], []
    for _ in range(args.repeats):
        trainer.counters.step += 1
        sync()
        distributed.barrier()
        started = time.perf_counter()
        # synchronous: returns once the commit is done on every rank
        trainer.saves.save_if_due(trainer.counters.step, force=True)
        saves.append(time.perf_counter() - started)
        checkpoints = CheckpointDir(trainer.run_dir.checkpoints)
        distributed.barrier()
        started = time.perf_counter()
        path = checkpoints.list()[-1].path if rank == 0 else None
        found = (path, load_valid(path, tensors=False)) if rank == 0 else None  # what resolve_resume does
        trainer._resume_from(*distributed.broadcast_object(found))
        sync()
        distributed.barrier()
        loads.append(time.perf_counter() - started)
    state_bytes = sum(parallel.local(t).numel() * t.element_size() for t in trainer.raw_model.parameters())
    state_bytes += sum(parallel.local(t).numel() * t.element_size() for s in trainer.optimizer.state.values()
                       for t in s.values() if isinstance(t, torch.Tensor))
    peak = peak_memory(torch, trainer.device, baseline)
    everyone = distributed.gather_objects({"train": train_peak, "peak": peak, "state": state_bytes})
    if rank == 0:
        size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.iterdir())
        print(RESULT_MARK + json.dumps({
            "save": statistics.median(saves), "load": statistics.median(loads), "bytes": size,
            **{key: [r[key] for r in everyone] for key in ("train", "peak", "state")},
            "params": trainer.raw_model.num_parameters()}), flush=True)
    trainer.close()


def peak_memory(torch, device, baseline: int) -> int:
    """Bytes: torch's peak allocation on CUDA; on CPU, the peak RSS over the baseline."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return peak_rss_bytes() - baseline


def launch(args: argparse.Namespace, parallel_mode: str, ckpt_format: str, work: Path) -> dict:
    out = work / f"{parallel_mode}-{ckpt_format}"
    command, env = launch_command(args.nproc, [
        __file__, "--worker", "--parallel", parallel_mode, "--format", ckpt_format, "--out", str(out),
        "--preset", args.preset, "--device", args.device, "--repeats", str(args.repeats),
        "--batch-size", str(args.batch_size)])
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if result.returncode != 0 or not lines:  # its output here: the scratch folder is removed at exit
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        sys.exit(f"{tail}\n{parallel_mode}/{ckpt_format} failed (exit {result.returncode}); the end of its output "
                 f"is above")
    return json.loads(lines[0][len(RESULT_MARK):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--preset", default="gpu10m")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4, help="per rank; small, so the state dominates memory")
    parser.add_argument("--combinations", nargs="+", default=[f"{m}/{f}" for m, f in COMBINATIONS],
                        choices=[f"{m}/{f}" for m, f in COMBINATIONS], help="the jobs to run (default: all)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", help=argparse.SUPPRESS)
    parser.add_argument("--format", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    work = scratch_dir("nanoresume-sharded-bench-")
    chosen = [combo for combo in COMBINATIONS if "/".join(combo) in args.combinations]
    results = {combo: launch(args, *combo, work) for combo in chosen}
    first = results[chosen[0]]
    print(f"{args.preset}: {first['params'] / 1e6:.1f}M parameters, {args.nproc} processes on {args.device}, "
          f"batch {args.batch_size} per rank, median of {args.repeats}")
    print("  memory per rank, MB (rank 0/rank 1...): model+optim = parameters and AdamW moments held; "
          "train peak = peak after 2 steps; peak = after the saves and loads too")
    print(f"  {'parallel':8} {'format':8} {'ckpt MB':>8} {'save s':>7} {'load s':>7} {'model+optim':>12} "
          f"{'train peak':>12} {'peak':>12}")

    def per_rank(values: list) -> str:
        return "/".join(f"{v / 1e6:.0f}" for v in values)

    for (mode, fmt), r in results.items():
        print(f"  {mode:8} {fmt:8} {r['bytes'] / 1e6:8.1f} {r['save']:7.3f} {r['load']:7.3f} "
              f"{per_rank(r['state']):>12} {per_rank(r['train']):>12} {per_rank(r['peak']):>12}")
    for mode in ("ddp", "fsdp"):
        if (mode, "file") in results and (mode, "sharded") in results:
            file, folder = results[(mode, "file")], results[(mode, "sharded")]
            print(f"  {mode}: sharded / file: save {folder['save'] / file['save']:.2f}x, "
                  f"load {folder['load'] / file['load']:.2f}x")
    if ("ddp", "sharded") in results and ("fsdp", "sharded") in results:
        ddp, fsdp = results[("ddp", "sharded")], results[("fsdp", "sharded")]
        print(f"  fsdp / ddp per rank (sharded checkpoints): model + optimizer "
              f"{max(fsdp['state']) / max(ddp['state']):.2f}x, train peak "
              f"{max(fsdp['train']) / max(ddp['train']):.2f}x, peak {max(fsdp['peak']) / max(ddp['peak']):.2f}x")


if __name__ == "__main__":
    main()
