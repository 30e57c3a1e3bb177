#!/usr/bin/env python3
"""Training throughput with checkpointing on (sync, then background) against a bare hand-written loop.

    python benchmarks/checkpoint_overhead.py [--device cpu|cuda] [--repeats 3] [--presets cpu gpu10m] [--steps N]

The bare loop is the minimal loop on the same model, batch, dtype and optimizer: no
evaluation, no checkpoints, no logging. nanoresume's loop runs with evaluation off
(after step 0) and checkpoints every --ckpt-interval steps, synchronous or in the
background. Tokens/s are measured between the end of step 1 and the end of the last
step (start-up excluded), interleaved, median of --repeats.

Rows: the cpu preset at the default interval (500 steps: the setting users get), and
the 10.8M preset at a stress interval of 25 steps (at 500 its saves would be too rare
to measure in a few minutes; the projected overhead at 500 is printed beside it).
``--presets`` keeps only the rows of those presets; ``--steps N`` trains every row N steps with a
checkpoint every N // 2 (``--presets cpu --steps 4 --repeats 1``: a check that the script runs).
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._common import make_trainer  # noqa: E402
from nanoresume.data import windows  # noqa: E402

CASES = [  # (label, preset, overrides, steps, checkpoint interval)
    ("cpu preset, interval 500", "cpu", {}, 1001, 500),
    ("gpu10m batch 4, interval 25", "gpu10m", {"batch_size": 4}, 51, 25),
]


def bare_loop_tokens_per_second(preset: str, device: str, overrides: dict, steps: int) -> float:
    """The same model and optimizer, trained by the smallest loop that does the same arithmetic."""
    trainer = make_trainer(preset, device, **overrides)
    cfg, model, optimizer = trainer.cfg, trainer.raw_model, trainer.optimizer
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ends = []
    for _ in range(steps):
        [offsets] = trainer.sampler.next_micro_batches(0, 1, 1)  # the same windows nanoresume's loop draws
        x, y = (t.to(trainer.device) for t in windows(trainer.data.train, offsets, cfg.block_size))
        with trainer.autocast():
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        loss.item()  # the one sync per step a real loop has (logging the loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trainer.scheduler.step()
        sync()
        ends.append(time.perf_counter())
    trainer.close()
    return cfg.tokens_per_step() * (steps - 1) / (ends[-1] - ends[0])


def loop_tokens_per_second(preset: str, device: str, overrides: dict, steps: int, interval: int,
                           async_save: bool) -> tuple[float, float]:
    """(tokens/s, mean stall per save in seconds) of nanoresume's loop."""
    ends, stalls = [], []

    def on_step(trainer, step, loss):
        ends.append(time.perf_counter())

    trainer = make_trainer(preset, device, max_steps=steps, eval_interval=10 ** 9, eval_iters=1,
                           ckpt_interval=interval, async_save=async_save, keep_last=3, **overrides)
    trainer.on_step = on_step
    original_save = trainer.manager.save

    def timed_save(*args, **kwargs):
        started = time.perf_counter()
        result = original_save(*args, **kwargs)
        stalls.append(time.perf_counter() - started)
        return result

    trainer.manager.save = timed_save
    trainer.run()
    return trainer.cfg.tokens_per_step() * (steps - 1) / (ends[-1] - ends[0]), statistics.mean(stalls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=[case[1] for case in CASES],
                        choices=[case[1] for case in CASES], help="only the rows of these presets")
    parser.add_argument("--steps", type=int, help="steps of every row (at least 3; default: each row's own)")
    args = parser.parse_args()
    for label, preset, overrides, steps, interval in CASES:
        if preset not in args.presets:
            continue
        if args.steps is not None:
            steps, interval = max(3, args.steps), max(1, args.steps // 2)
            label = f"{preset} preset, {steps} steps, interval {interval}"
        results: dict[str, list[float]] = {"bare": [], "sync": [], "async": [], "sync stall": [], "async stall": []}
        for _ in range(args.repeats):
            results["bare"].append(bare_loop_tokens_per_second(preset, args.device, overrides, steps))
            for mode in ("sync", "async"):
                rate, stall = loop_tokens_per_second(preset, args.device, overrides, steps, interval, mode == "async")
                results[mode].append(rate)
                results[f"{mode} stall"].append(stall)
        med = {k: statistics.median(v) for k, v in results.items()}
        step_seconds = make_step_seconds(med["bare"], preset, overrides)
        print(f"{label} ({args.device}, median of {args.repeats}): bare loop {med['bare']:,.0f} tok/s")
        for mode in ("sync", "async"):
            projected = 1 - med[f"{mode} stall"] / (500 * step_seconds) if not math.isnan(step_seconds) else math.nan
            print(f"  {mode:5}: {med[mode]:,.0f} tok/s = {med[mode] / med['bare']:.3f}x bare; stall per save "
                  f"{med[f'{mode} stall'] * 1e3:.1f} ms (at interval 500: {projected:.4f}x)")


def make_step_seconds(bare_tokens_per_second: float, preset: str, overrides: dict) -> float:
    from nanoresume.config import TrainConfig, resolve_config

    cfg = resolve_config(TrainConfig(preset=preset, **overrides), check=False)
    return cfg.tokens_per_step() / bare_tokens_per_second


if __name__ == "__main__":
    main()
