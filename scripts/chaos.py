#!/usr/bin/env python3
"""kill -9 a training run again and again; prove it always resumes and ends bit-identical.

    python scripts/chaos.py --kills 100

Trains a tiny model once without interruption (the reference), then trains it
again while killing it with SIGKILL at random moments (half of them inside a
checkpoint write), resuming with --resume auto after each kill. Prints the kill
count, the checkpoints lost (must be 0) and whether the final state (model,
optimizer, scheduler, counters, RNG streams, sampler, config) is bitwise equal to
the reference. Exit 0 only if everything held.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanoresume.tools.chaos import final_state_difference, run_chaos  # noqa: E402
from nanoresume.checkpoint import step_path  # noqa: E402
from nanoresume.tools.cli import main as train  # noqa: E402
from nanoresume.rundir import RunDir  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--kills", type=int, default=100, help="SIGKILLs to deliver before letting the run finish")
    parser.add_argument("--seed", type=int, default=0, help="seed for when the kills land")
    parser.add_argument("--data", default=str(Path(argparse.__file__)), help="text to train on (small is fine)")
    parser.add_argument("--work-dir", default=argparse.SUPPRESS, help="where runs are written (default: a temp folder)")
    parser.add_argument("--async-save", action=argparse.BooleanOptionalAction, default=True,
                        help="save checkpoints in the background, as training does by default")
    args = parser.parse_args()

    work = Path(getattr(args, "work_dir", None) or tempfile.mkdtemp(prefix="nanoresume-chaos-"))
    max_steps = max(200, args.kills * 8)  # room for every kill to land mid-run
    common = ["--data", args.data, "--cache-dir", str(work / "cache"), "--n-layer", "2", "--n-head", "2",
              "--n-embd", "32", "--block-size", "32", "--batch-size", "4", "--dropout", "0.1",
              "--max-steps", str(max_steps), "--eval-interval", "50", "--eval-iters", "2",
              "--ckpt-interval", "10", "--keep-last", "2", "--no-progress",
              "--async-save" if args.async_save else "--no-async-save"]
    print(f"reference run ({max_steps} steps) in {work / 'reference'}", flush=True)
    if train(common + ["--out-dir", str(work / "reference")]) != 0:
        return 1
    chaos_out = work / "chaos"
    report = run_chaos(common + ["--out-dir", str(chaos_out)], chaos_out, kills=args.kills, seed=args.seed,
                       max_wait=3.0, timeout=24 * 3600)
    difference = final_state_difference(step_path(RunDir(chaos_out).checkpoints, max_steps),
                                        step_path(RunDir(work / "reference").checkpoints, max_steps))
    print(f"final state bitwise equal to the uninterrupted run: {difference is None}"
          + (f" (first difference: {difference})" if difference else ""))
    for problem in report.problems:
        print(f"problem: {problem}")
    return 0 if difference is None and not report.problems and report.checkpoints_lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
