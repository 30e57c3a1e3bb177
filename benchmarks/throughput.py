#!/usr/bin/env python3
"""Training-loop throughput (tokens/s) per preset, with deterministic kernels on and off.

    python benchmarks/throughput.py [--device cpu|cuda] [--presets cpu gpu10m] [--steps 30] [--rounds 2]

The ratio shows what --deterministic (the default, needed for bit-exact resume on
GPUs) costs against --no-deterministic, measured in the same run.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._common import make_trainer, median_seconds  # noqa: E402


def tokens_per_second(preset: str, device: str, deterministic: bool, steps: int, repeats: int) -> float:
    trainer = make_trainer(preset, device, deterministic=deterministic)
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up
        trainer.train_step()
    seconds = median_seconds(lambda: [trainer.train_step() for _ in range(steps)], repeats, sync)
    trainer.close()
    return trainer.cfg.tokens_per_step() * steps / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--presets", nargs="+", default=["cpu", "gpu10m"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="timings of --steps steps per trainer (the median)")
    parser.add_argument("--rounds", type=int, default=2, help="trainers of each setting, alternating (the best)")
    args = parser.parse_args()
    for preset in args.presets:
        # Alternate the two settings and keep each one's best, so warm-up and noise hit both alike.
        fast = exact = 0.0
        for _ in range(args.rounds):
            fast = max(fast, tokens_per_second(preset, args.device, False, args.steps, args.repeats))
            exact = max(exact, tokens_per_second(preset, args.device, True, args.steps, args.repeats))
        print(f"{preset:8} {args.device}: {exact:,.0f} tok/s deterministic, {fast:,.0f} tok/s not; "
              f"ratio {exact / fast:.3f}", flush=True)


if __name__ == "__main__":
    main()
