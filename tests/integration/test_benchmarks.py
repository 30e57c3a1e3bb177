"""Every benchmark script runs with its smallest settings and prints its numbers: a smoke test, so that
a script the library has moved away from fails here instead of on the day someone measures.
Nothing here checks what the numbers are. Each script runs as ``__main__`` in this process (a process of
its own would only add a torch import); the processes a benchmark starts are its own."""

from __future__ import annotations

import re
import runpy
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow

NUMBER = r"[\d,]+(\.\d+)?"
# script -> (its smallest settings, a pattern per line of numbers it must print)
SMOKE = {
    "throughput.py": (["--presets", "cpu", "--steps", "1", "--repeats", "1", "--rounds", "1"],
                      [rf"cpu +cpu: {NUMBER} tok/s deterministic, {NUMBER} tok/s not; ratio {NUMBER}"]),
    "checkpoint_io.py": (["--models", "cpu", "--repeats", "1"],
                         [rf"cpu: {NUMBER}M parameters, checkpoint {NUMBER} MB",
                          rf"sync save \(atomic, verified\) +{NUMBER} ms",
                          rf"verified resume at step 100,000 +{NUMBER} ms"]),
    "checkpoint_overhead.py": (["--presets", "cpu", "--steps", "4", "--repeats", "1"],
                               [rf"cpu preset, 4 steps, interval 2 \(cpu, median of 1\): bare loop {NUMBER} tok/s",
                                rf"sync : {NUMBER} tok/s = {NUMBER}x bare; stall per save {NUMBER} ms",
                                rf"async: {NUMBER} tok/s = {NUMBER}x bare"]),
    "stop_latency.py": (["--preset", "cpu", "--repeats", "1", "--after", "0"],
                        [rf"SIGTERM -> exit median {NUMBER} s \(max {NUMBER} s\), exit codes \[143\]"]),
    "distributed.py": (["--steps", "1", "--saves", "1", "--global-batch", "2"],
                       [rf"1 process +{NUMBER} tok/s +save +{NUMBER} ms +decision +{NUMBER} us",
                        rf"2 processes \(DDP, gloo\) +{NUMBER} tok/s",
                        rf"2 vs 1: throughput {NUMBER}x, save {NUMBER}x"]),
    "mirror.py": (["--mb", "1", "--repeats", "1"],
                  [rf"1 MiB +plain upload +{NUMBER} MB/s +mirror upload +{NUMBER} MB/s +ratio {NUMBER}x",
                   rf"plain resume +{NUMBER} ms +mirror resume +{NUMBER} ms +ratio {NUMBER}x"]),
    "chaos_folders.py": (["--kills", "0", "--nproc", "1"],
                         [r"kills: 0 \(0 during a folder write or commit\), resumes: 0, committed folders lost: 0",
                          r"final state bitwise equal to the run never killed: yes"]),
    "fsdp_memory.py": (["--n-layer", "1", "--n-embd", "64", "--steps", "1", "--nproc", "1"],
                       [rf"ddp +peak RSS per rank +{NUMBER} MB", rf"fsdp / ddp peak RSS: {NUMBER}x",
                        rf"fsdp / ddp parameters: {NUMBER}x"]),
    # one job of each parallelism and of each format (all four: the ratios between them too)
    "sharded_checkpoints.py": (["--preset", "cpu", "--repeats", "1", "--batch-size", "1", "--nproc", "1",
                                "--combinations", "ddp/file", "fsdp/sharded"],
                               [rf"ddp +file +{NUMBER} +{NUMBER} +{NUMBER}",
                                rf"fsdp +sharded +{NUMBER} +{NUMBER} +{NUMBER}"]),
}


def test_every_benchmark_script_has_a_smoke_test():
    scripts = sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))
    assert scripts == sorted(SMOKE)


@pytest.mark.parametrize("script", SMOKE)
def test_the_benchmark_runs_with_its_smallest_settings_and_prints_its_numbers(script, capsys, monkeypatch):
    args, patterns = SMOKE[script]
    path = REPO / "benchmarks" / script
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    monkeypatch.setattr(sys, "path", list(sys.path))  # a script puts the repository first; undone after
    monkeypatch.chdir(REPO)
    try:
        runpy.run_path(str(path), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    assert code == 0, out + err
    for pattern in patterns:
        assert re.search(pattern, out), (pattern, out)
