#!/usr/bin/env python3
"""What a checkpoint costs: save, background-save stall, verified resume, against plain torch.

    python benchmarks/checkpoint_io.py [--device cpu|cuda] [--models gpu10m 4x] [--repeats 7]

(``--models cpu --repeats 1``: the cpu preset's small model, a check that the script runs.)

For each model, on the full training state after one optimizer step (weights, AdamW
moments, RNGs, config), every variant below runs once per repetition, interleaved, and
the table shows the median of the repetitions. Dirty pages are flushed (``os.sync``,
untimed) before each measurement. Each save goes to a new step name, as
training does (never an overwrite), with retention at --keep-last 3.

- plain save: ``torch.save(state, path)`` (no fsync, no checksum)
- sync save: nanoresume's synchronous save (atomic, hashed, fsync'd, committed); its ``.sha256``
  and pruning follow on another thread and are not counted
- async stall: what a background save costs the training thread (the snapshot)
- memory copy: ``copy.deepcopy(state)``, an in-memory copy of the same state
- write+fsync: writing and fsyncing as many bytes: the disk's own limit
- plain resume: ``torch.load`` + ``load_state_dict`` of model, optimizer and scheduler
- verified resume: nanoresume's resume (verify, safe load, schema check, restore everything)
- resume at step 100 and at step 100,000: the same, from checkpoints whose counters say so
"""

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._common import make_trainer  # noqa: E402
from nanoresume.checkpoint import CheckpointManager, step_path  # noqa: E402
from nanoresume.loading import load_valid  # noqa: E402

MODELS = {
    "gpu10m": dict(preset="gpu10m"),
    "4x": dict(preset="gpu10m", n_layer=16, n_head=8, n_embd=480),  # about 4x the parameters
    "cpu": dict(preset="cpu"),  # small: for a quick check that the script runs, not a measurement
}
DEFAULT_MODELS = ["gpu10m", "4x"]


def timed(sync: Callable[[], None], fn: Callable[..., object], *args: object) -> float:
    """Seconds ``fn(*args)`` takes, device work included.

    Dirty pages of the previous variant are flushed first (untimed), so no variant pays for
    another's write-back: in training, the last checkpoint's pages are long on disk.
    """
    sync()
    os.sync()
    start = time.perf_counter()
    fn(*args)
    sync()
    return time.perf_counter() - start


def write_and_fsync(path: Path, n_bytes: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(n_bytes >> 20):
            f.write(block)
        f.write(block[: n_bytes & ((1 << 20) - 1)])
        f.flush()
        os.fsync(f.fileno())


def bench(model: str, device: str, repeats: int) -> None:
    trainer = make_trainer(**MODELS[model], device=device, batch_size=1, async_save=False)
    trainer.train_step()  # fills the optimizer state
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    folder = trainer.run_dir.checkpoints
    sync_saves = CheckpointManager(folder / "sync", 1, 3)
    async_saves = CheckpointManager(folder / "async", 1, 3, background=True)
    (folder / "plain").mkdir()
    times: dict[str, list[float]] = {}
    commit_seconds = []

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    for rep in range(1, repeats + 1):
        state = trainer.state_dict()
        plain = step_path(folder / "plain", rep)
        record("plain save", timed(sync, torch.save, state, plain))
        record("sync save", timed(sync, sync_saves.save, rep, state))
        sync_saves.wait()  # its .sha256 and pruning follow on another thread: not the loop's time, and not
        # allowed to overlap the next measurement
        record("async stall", timed(sync, async_saves.save, rep, state))
        async_saves.wait()
        commit_seconds.append(async_saves.last_commit_seconds)
        record("memory copy", timed(sync, copy.deepcopy, state))
        size = plain.stat().st_size
        record("write+fsync", timed(sync, write_and_fsync, folder / "raw.bin", size))
        record("plain resume", timed(sync, plain_resume, trainer, plain))
        record("verified resume", timed(sync, verified_resume, trainer, step_path(folder / "sync", rep)))
        if rep > 3:
            (plain.with_name(step_path(folder, rep - 3).name)).unlink()
    med = {name: statistics.median(values) for name, values in times.items()}
    at_100, at_100k = resume_times(trainer, folder, repeats, sync)
    params = trainer.raw_model.num_parameters() / 1e6
    print(f"\n{model}: {params:.1f}M parameters, checkpoint {size / 1e6:.1f} MB, device {device}, "
          f"median of {repeats}")
    rows = [
        ("plain torch.save", med["plain save"], "1.00x", ""),
        ("sync save (atomic, verified)", med["sync save"], f"{med['sync save'] / med['plain save']:.2f}x plain",
         "goal <= 1.2x"),
        ("async stall (training thread)", med["async stall"],
         f"{med['async stall'] / med['memory copy']:.2f}x copy, {med['async stall'] / med['sync save']:.1%} of sync",
         "goal <= 2x copy, <= 10% of sync"),
        ("  background commit", statistics.median(commit_seconds), "", "off the training thread"),
        ("in-memory copy (deepcopy)", med["memory copy"], "", ""),
        ("write+fsync same bytes", med["write+fsync"], f"{med['write+fsync'] / med['plain save']:.2f}x plain",
         "the disk's limit"),
        ("plain load + load_state_dict", med["plain resume"], "1.00x", ""),
        ("verified resume", med["verified resume"], f"{med['verified resume'] / med['plain resume']:.2f}x plain",
         "goal <= 1.5x"),
        ("verified resume at step 100", at_100, "", ""),
        ("verified resume at step 100,000", at_100k, f"{at_100k / at_100:.2f}x step 100", "no replay: ~1x"),
    ]
    for name, seconds, ratio, goal in rows:
        print(f"  {name:34} {seconds * 1e3:9.1f} ms  {ratio:32} {goal}")
    sync_saves.close()
    trainer.close()


def verified_resume(trainer, path: Path) -> None:
    trainer.load_state_dict(load_valid(path))


def plain_resume(trainer, path: Path) -> None:
    state = torch.load(path, weights_only=True, map_location="cpu")
    trainer.raw_model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])


def resume_times(trainer, folder: Path, repeats: int, sync: Callable[[], None]) -> tuple[float, float]:
    """Resume from a checkpoint at step 100 and at step 100,000 (counters set, not trained)."""
    paths = {}
    manager = CheckpointManager(folder / "counters", 1, 10)
    for step in (100, 100_000):
        trainer.counters.step = step
        trainer.scheduler.last_epoch = step
        paths[step] = manager.save(step, trainer.state_dict())
    results = {step: [] for step in paths}
    for _ in range(repeats):
        for step, path in paths.items():
            results[step].append(timed(sync, verified_resume, trainer, path))
    return statistics.median(results[100]), statistics.median(results[100_000])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    for model in args.models:
        bench(model, args.device, args.repeats)


if __name__ == "__main__":
    main()
