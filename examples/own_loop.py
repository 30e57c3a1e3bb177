#!/usr/bin/env python3
"""Your own model, optimizer and loop, with nanoresume's guarantees: atomic checkpoints, exact resume,
Ctrl-C / SIGTERM that save before exiting.

    python examples/own_loop.py                  # trains a small MLP on synthetic data (about 10 s)
    python examples/own_loop.py --resume auto    # after Ctrl-C, SIGTERM or kill -9: continues exactly
    nanoresume self-test examples/own_loop.py    # proves that it does, on this machine
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from nanoresume import CheckpointError, Checkpointer, ResumableSampler, StopFlag, seed_everything  # noqa: E402


class SignMomentum(torch.optim.Optimizer):
    """A custom optimizer (sign of a momentum, as in Lion): its state is saved like any other."""

    def __init__(self, params, lr: float = 1e-3, beta: float = 0.9) -> None:
        super().__init__(params, dict(lr=lr, beta=beta))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                momentum = self.state[p].setdefault("momentum", torch.zeros_like(p))
                momentum.mul_(group["beta"]).add_(p.grad, alpha=1 - group["beta"])
                p.add_(momentum.sign(), alpha=-group["lr"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="own_loop_out", help="checkpoints go to OUT/checkpoints")
    parser.add_argument("--resume", default="auto", help="'auto' (newest good checkpoint), 'none', or a file")
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()

    seed_everything(0)  # every random stream: the data, the initial weights; the rest is in the checkpoints
    inputs = torch.randn(4096, 32)
    targets = (inputs @ torch.randn(32, 10)).argmax(dim=1)  # 10 classes
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))
    optimizer = SignMomentum(model.parameters(), lr=1e-3)
    warmup_then_decay = lambda step: min(1.0, (step + 1) / 100) * 0.5 ** (step / 1000)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_decay)
    sampler = ResumableSampler(len(inputs), batch_size=64, seed=1)

    stop = StopFlag()  # SIGTERM, Ctrl-C, SIGUSR1 and SIGHUP only set it; the loop saves and exits
    checkpoints = Checkpointer(Path(args.out_dir) / "checkpoints", {
        "model": model, "optimizer": optimizer, "scheduler": scheduler, "sampler": sampler,
    }, every=50, keep_last=2, stop=stop)  # the random streams (dropout) are saved too
    try:
        step = checkpoints.resume(args.resume)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if step:
        print(f"resumed at step {step}")

    with stop.installed(), checkpoints:  # leaving the block waits for the last background save
        while step < args.steps and not stop.is_set():
            index = sampler.batch(step)
            loss = F.cross_entropy(model(inputs[index]), targets[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step % 500 == 0:
                print(f"step {step}: loss {loss.item():.4f}")
            checkpoints.save(step, force=stop.is_set() or step == args.steps)
    if step < args.steps:
        print(f"stopped by {stop.reason} after step {step}; continue with: "
              f"python {sys.argv[0]} --out-dir {args.out_dir} --resume auto")
        return stop.exit_code  # 128 + the signal: 143 for SIGTERM, 130 for Ctrl-C
    accuracy = (model.eval()(inputs).argmax(dim=1) == targets).float().mean().item()
    print(f"finished {step} steps; training accuracy {accuracy:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
