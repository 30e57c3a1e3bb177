#!/usr/bin/env python3
"""Seconds from SIGTERM to process exit (finish the step, save, exit 143), per preset.

    python benchmarks/stop_latency.py [--device cpu|cuda] [--preset cpu] [--repeats 3] [--after 3] [-- train flags]

For scale it also prints the median step time and checkpoint save time the run
itself measured: a stop costs at most about one step plus one save.
"""

import argparse
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._common import scratch_dir  # noqa: E402


def one_stop(preset: str, device: str, extra: list[str], work: Path, after: float) -> tuple[float, int]:
    out = work / f"run{time.monotonic_ns()}"
    command = [sys.executable, "-u", str(REPO / "scripts" / "train.py"), "--preset", preset, "--device", device,
               "--out-dir", str(out), "--cache-dir", str(work / "cache"), "--eval-interval", "100000",
               "--eval-iters", "1", "--no-progress", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("step      0 |"):
            break
    time.sleep(after)  # into training
    sent = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    process.communicate()
    return time.perf_counter() - sent, process.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--after", type=float, default=3.0,
                        help="seconds of training after step 0's line before the SIGTERM (0: a check that it runs)")
    parser.add_argument("extra", nargs="*", help="more scripts/train.py flags (after --)")
    args = parser.parse_args()
    work = scratch_dir("nanoresume-stop-")
    results = [one_stop(args.preset, args.device, args.extra, work, args.after) for _ in range(args.repeats)]
    seconds = [s for s, _ in results]
    print(f"{args.preset} on {args.device} {' '.join(args.extra)}: "
          f"SIGTERM -> exit median {statistics.median(seconds):.2f} s (max {max(seconds):.2f} s), "
          f"exit codes {sorted({c for _, c in results})}")


if __name__ == "__main__":
    main()
