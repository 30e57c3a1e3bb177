#!/usr/bin/env python3
"""Checkpoint size, save and load time per preset, against plain torch.save / torch.load.

    python benchmarks/checkpoint_io.py [--device cpu|cuda] [--presets cpu gpu10m]

"save" is nanoresume's full commit (hash while writing, fsync, checksum file,
os.replace, folder fsync); the baseline is a bare torch.save with no fsync.
"load" reads once, verifies SHA-256, then torch.load(weights_only=True); the
baseline is torch.load(weights_only=True) of the same file.
"""

import argparse
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._common import make_trainer, median_seconds  # noqa: E402
from nanoresume.checkpoint import load_checkpoint, save_atomically  # noqa: E402


def measure(preset: str, device: str, repeats: int, sync: Callable[[], None]) -> None:
    """One row: step, save and load times of one preset, each against its bare torch baseline."""
    trainer = make_trainer(preset, device, batch_size=4 if device == "cpu" else None)
    trainer.train_step()  # warm-up; also fills the optimizer state
    step_seconds = median_seconds(trainer.train_step, 3, sync)
    folder = trainer.run_dir.checkpoints
    ours, bare = folder / "bench.pt", folder / "bare.pt"
    save = median_seconds(lambda: save_atomically(trainer.state_dict(), ours), repeats, sync)
    bare_save = median_seconds(lambda: torch.save(trainer.state_dict(), bare), repeats, sync)
    load = median_seconds(lambda: load_checkpoint(ours), repeats)
    bare_load = median_seconds(lambda: torch.load(bare, weights_only=True, map_location="cpu"), repeats)
    print(f"{preset:8} {trainer.raw_model.num_parameters() / 1e6:>7.2f}M {ours.stat().st_size / 1e6:>8.1f} "
          f"{step_seconds:>8.3f} {save:>8.3f} {bare_save:>11.3f} {save / bare_save:>7.2f} "
          f"{load:>8.3f} {bare_load:>11.3f} {load / bare_load:>7.2f}", flush=True)
    trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--presets", nargs="+", default=["cpu", "gpu10m"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    print(f"{'preset':8} {'params':>8} {'ckpt MB':>8} {'step s':>8} {'save s':>8} {'bare save s':>11} "
          f"{'save x':>7} {'load s':>8} {'bare load s':>11} {'load x':>7}")
    for preset in args.presets:
        measure(preset, args.device, args.repeats, sync)
    print(f"device {args.device}; step = one optimizer step ({'batch 4' if args.device == 'cpu' else 'preset batch'})")


if __name__ == "__main__":
    main()
