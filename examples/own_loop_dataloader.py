#!/usr/bin/env python3
"""Your own loop reading its batches through a torch DataLoader with worker processes, resumable bit for bit,
dropout included (see docs/own-loop.md for why each line is there).

    python examples/own_loop_dataloader.py                  # a small MLP on synthetic data
    python examples/own_loop_dataloader.py --resume auto    # after Ctrl-C, SIGTERM or kill -9: continues exactly
    nanoresume self-test examples/own_loop_dataloader.py    # proves that it does, on this machine
"""

import argparse
import signal
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from nanoresume import CheckpointError, Checkpointer, ResumableSampler, StopFlag, seed_everything  # noqa: E402

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


def leave_stop_signals_to_the_loop(worker_id: int) -> None:
    """A worker ignores the stop signals: Ctrl-C reaches the whole process group, and a worker that died of
    it would fail the batch the loop still needs before it saves. The loop stops; its workers go with it."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="own_loop_dataloader_out", help="checkpoints go to OUT/checkpoints")
    parser.add_argument("--resume", default="auto", help="'auto' (newest good checkpoint), 'none', or a file")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (0: none)")
    args = parser.parse_args(argv)

    seed_everything(0)  # every random stream: the data, the initial weights; the rest is in the checkpoints
    inputs = torch.randn(4096, 32)
    dataset = TensorDataset(inputs, (inputs @ torch.randn(32, 10)).argmax(dim=1))  # 10 classes
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampler = ResumableSampler(len(dataset), batch_size=64, seed=1)  # batch i: a function of (seed, i)

    stop = StopFlag()  # SIGTERM, Ctrl-C, SIGUSR1 and SIGHUP only set it; the loop saves and exits
    checkpoints = Checkpointer(Path(args.out_dir) / "checkpoints", {
        "model": model, "optimizer": optimizer, "sampler": sampler,
    }, every=50, keep_last=2, stop=stop)  # the random streams (dropout) are saved too
    try:
        step = checkpoints.resume(args.resume)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if step:
        print(f"resumed at step {step}")

    # Built after the resume, from the step reached: however far the workers read ahead, the position is
    # `step`. generator=: the loader draws its workers' base seed from a generator of its own; without it,
    # every iter() draws from torch's global stream, which holds the dropout masks the resume just restored.
    loader = DataLoader(dataset, batch_sampler=sampler.batches(step), num_workers=args.workers,
                        generator=torch.Generator().manual_seed(0),
                        worker_init_fn=leave_stop_signals_to_the_loop if args.workers else None)
    batches = iter(loader)
    with stop.installed(), checkpoints:  # leaving the block waits for the last background save
        while step < args.steps and not stop.is_set():
            x, y = next(batches)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 250 == 0:
                print(f"step {step}: loss {loss.item():.4f}")
            checkpoints.save(step, force=stop.is_set() or step == args.steps)
    del batches  # its workers end here
    if step < args.steps:
        print(f"stopped by {stop.reason} after step {step}; continue with: "
              f"python {sys.argv[0]} --out-dir {args.out_dir} --resume auto")
        return stop.exit_code  # 128 + the signal: 143 for SIGTERM, 130 for Ctrl-C
    print(f"finished {step} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
