#!/usr/bin/env python3
"""What FSDP buys: peak memory per rank under DDP and under FSDP (built on the meta device, each rank
materializing only its shards), and the largest model each can train under a per-process cap.

    python benchmarks/fsdp_memory.py [--n-layer 8] [--n-embd 1280] [--steps 3] [--cap-gb 4]

(``--n-layer 1 --n-embd 64 --steps 1 --nproc 1``: a check that the script runs.)

A model whose state dominates: wide, a batch of one short sequence a rank, so that weights, gradients
and AdamW's moments (16 bytes a parameter) outweigh activations. Two jobs under
``torchrun --standalone --nproc_per_node=2`` (gloo on the CPU), one per mode, one after the other
(with ``--nproc 1``, each job is the one process torchrun would start, without torchrun);
each rank trains a few steps and reports its peak RSS (on CUDA: torch's peak allocation). Nothing is
saved: a checkpoint's own buffers are another benchmark's (sharded_checkpoints.py).

The largest model under ``--cap-gb`` per process is judged by nanoresume's own pre-training memory
check (:func:`nanoresume.memory.need`, the bound a run is refused by), at the same depth, batch and
context, over widths in steps of 64. The check is a lower bound that leaves out the process itself
(torch's import, about 0.3 GB of RSS), so the same run prints how it compares with the RSS measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULT = "RESULT "
MODES = ("ddp", "fsdp")


def worker(args: argparse.Namespace) -> None:
    """One rank of one job (run by torchrun)."""
    import torch

    from benchmarks._common import make_trainer, peak_rss_bytes
    from nanoresume import distributed, memory

    imports = peak_rss_bytes()  # torch and nanoresume, loaded
    trainer = make_trainer("cpu", args.device, parallel=args.parallel, n_layer=args.n_layer, n_embd=args.n_embd,
                           n_head=args.n_head, block_size=args.block_size, batch_size=1, dropout=0.0, eval_iters=1,
                           max_steps=10**6, eval_interval=10**6, async_save=False)
    for _ in range(args.steps):
        trainer.train_step()
    if trainer.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes()
    everyone = distributed.gather_objects((peak, imports))
    if trainer.env.is_main:
        bound = memory.training_bytes(trainer.cfg, trainer.env.world_size, trainer.sharded_model)
        print(RESULT + json.dumps({"peaks": [p for p, _ in everyone], "imports": [i for _, i in everyone],
                                   "bound": bound, "params": trainer.raw_model.num_parameters(),
                                   "sharded": trainer.sharded_model}), flush=True)
    trainer.close()


def launch(args: argparse.Namespace, mode: str) -> subprocess.Popen:
    from benchmarks._common import launch_command

    command, env = launch_command(args.nproc, [
        __file__, "--worker", "--parallel", mode, "--device", args.device, "--steps", str(args.steps),
        "--n-layer", str(args.n_layer), "--n-embd", str(args.n_embd), "--n-head", str(args.n_head),
        "--block-size", str(args.block_size)])
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def result_of(job: subprocess.Popen, mode: str) -> dict:
    out, err = job.communicate()
    lines = [line for line in out.splitlines() if line.startswith(RESULT)]
    if job.returncode != 0 or not lines:
        raise SystemExit(f"the {mode} job failed (exit {job.returncode}):\n{err[-3000:]}")
    return json.loads(lines[0][len(RESULT):])


def largest(args: argparse.Namespace, sharded: bool, cap: int) -> tuple[int, int]:
    """(width, parameters) of the widest model whose memory check passes under ``cap`` bytes a process."""
    from nanoresume.config import TrainConfig, resolve_config
    from nanoresume.memory import need

    best = (0, 0)
    for width in range(64, 1 << 16, 64):
        cfg = resolve_config(TrainConfig(n_layer=args.n_layer, n_embd=width, n_head=args.n_head,
                                         block_size=args.block_size, batch_size=1, eval_iters=1, vocab_size=256))
        needed = need(cfg, args.nproc, sharded)
        if needed.total > cap:
            return best
        best = (width, needed.parameters)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--n-embd", type=int, default=1280)
    parser.add_argument("--n-head", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--cap-gb", type=float, default=4.0, help="memory a process may use, for the largest model")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--parallel", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = {mode: result_of(launch(args, mode), mode) for mode in args.modes}  # one at a time: the RAM
    params = next(iter(results.values()))["params"]
    what = "peak allocated" if args.device == "cuda" else "peak RSS"
    print(f"{args.n_layer} layers x {args.n_embd} wide, {params / 1e6:,.1f}M parameters; 1 x {args.block_size} "
          f"tokens a rank; {args.nproc} processes ({'nccl' if args.device == 'cuda' else 'gloo'}), {args.steps} steps")
    for mode, result in results.items():
        peaks = "  ".join(f"{p / 1e6:>8,.0f} MB" for p in result["peaks"])
        above = "  ".join(f"{(p - i) / 1e6:>6,.0f}" for p, i in zip(result["peaks"], result["imports"]))
        print(f"  {mode:4} {what} per rank {peaks}   above the imports {above} MB   "
              f"(memory check's bound {result['bound'] / 1e6:,.0f} MB)")
    if len(results) == 2:
        fsdp, ddp = results["fsdp"], results["ddp"]
        ratio = max(fsdp["peaks"]) / max(ddp["peaks"])
        above = max(p - i for p, i in zip(fsdp["peaks"], fsdp["imports"])) / \
            max(1, max(p - i for p, i in zip(ddp["peaks"], ddp["imports"])))
        print(f"  fsdp / ddp {what}: {ratio:.2f}x (goal <= 0.6x); above the imports {above:.2f}x")
    cap = int(args.cap_gb * 1e9)
    sizes = {mode: largest(args, mode == "fsdp", cap) for mode in MODES}
    print(f"largest model under {args.cap_gb:g} GB a process, judged by the memory check ({args.n_layer} layers, "
          f"1 x {args.block_size} tokens a rank, {args.nproc} processes):")
    for mode, (width, count) in sizes.items():
        print(f"  {mode:4} --n-embd {width:>6,}: {count / 1e6:>9,.1f}M parameters")
    print(f"  fsdp / ddp parameters: {sizes['fsdp'][1] / max(1, sizes['ddp'][1]):.2f}x")


if __name__ == "__main__":
    main()
