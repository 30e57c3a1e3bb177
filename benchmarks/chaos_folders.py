#!/usr/bin/env python3
"""kill -9 an FSDP run that writes checkpoint folders, again and again: no committed folder is lost,
and the run ends bitwise equal to one never killed.

    python benchmarks/chaos_folders.py [--kills 20] [--nproc 2] [--seed 0]

Trains a tiny model once without interruption under ``torchrun --nproc_per_node NPROC`` with
``--parallel fsdp`` and ``--ckpt-format sharded`` (every rank writes its shards of each folder,
rank 0 commits it by writing its manifest), then trains it again while SIGKILLing torchrun and
all its workers at random moments, half of them inside a folder's write or commit, resuming
with ``--resume auto`` after each. ``--kills 0 --nproc 1`` (one process without torchrun, still
folders, never killed; the reference then trains in this process) is the smallest setting: a check
that the script runs. Prints the counts and whether the
final state is bitwise equal; exit 0 only if everything held.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import DATA, scratch_dir  # noqa: E402
from nanoresume.checkpoint import step_folder_path  # noqa: E402
from nanoresume.tools.chaos import _child_command, final_state_difference, run_chaos, torchrun_launcher  # noqa: E402


def train_reference(train_args: list[str], launcher: list[str]) -> tuple[int, str]:
    """The run never killed: (exit code, what it printed on stderr). One process trains here, in this
    process (a process of its own would only add a torch import: its wall time then leaves out a start-up)."""
    if launcher:
        done = subprocess.run(_child_command(train_args, launcher), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        return done.returncode, done.stderr
    from nanoresume.tools.cli import main as train

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = train(train_args)
    return code, printed.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver before letting the run finish")
    parser.add_argument("--nproc", type=int, default=2, help="processes (FSDP under torchrun when above 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed for when the kills land")
    parser.add_argument("--max-wait", type=float, default=8.0,
                        help="seconds: a kill not aimed at a write lands at a random moment this early in a start")
    args = parser.parse_args()

    work = scratch_dir("nanoresume-chaos-folders-")
    launcher = torchrun_launcher(args.nproc) if args.nproc > 1 else []
    max_steps = max(30, args.kills * 40)  # room for every kill to land mid-run
    common = ["--data", DATA, "--cache-dir", str(work / "cache"), "--n-layer", "2", "--n-head", "2",
              "--n-embd", "32", "--block-size", "32", "--batch-size", "2", "--dropout", "0.1",
              "--max-steps", str(max_steps), "--eval-interval", "50", "--eval-iters", "2",
              "--ckpt-interval", "10", "--keep-last", "2", "--no-progress", "--ckpt-format", "sharded",
              *(["--parallel", "fsdp"] if args.nproc > 1 else [])]
    how = f"{args.nproc} processes, FSDP under torchrun" if args.nproc > 1 else "1 process"
    print(f"reference run: {max_steps} steps, {how}, checkpoint folders every 10 steps", flush=True)
    started = time.monotonic()
    code, errors = train_reference(common + ["--out-dir", str(work / "reference")], launcher)
    if code != 0:
        print(errors[-2000:], file=sys.stderr)
        return 1
    reference_seconds = time.monotonic() - started
    out = work / "chaos"
    started = time.monotonic()
    report = run_chaos(common + ["--out-dir", str(out)], out, kills=args.kills, seed=args.seed, max_wait=args.max_wait,
                       write_delay=0.002, timeout=24 * 3600, launcher=launcher, log=lambda line: None)
    difference = final_state_difference(step_folder_path(out / "checkpoints", max_steps),
                                        step_folder_path(work / "reference" / "checkpoints", max_steps))
    print(f"kills: {report.kills} ({report.kills_during_write} during a folder write or commit), "
          f"resumes: {report.resumes}, committed folders lost: {report.checkpoints_lost}")
    print(f"final state bitwise equal to the run never killed: {'yes' if difference is None else 'NO: ' + difference}")
    print(f"wall time: reference {reference_seconds:.0f} s, killed run {time.monotonic() - started:.0f} s "
          f"({(time.monotonic() - started) / reference_seconds:.1f}x)")
    for problem in report.problems:
        print(f"problem: {problem}")
    held = report.kills == args.kills and not report.problems and report.checkpoints_lost == 0 and difference is None
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
