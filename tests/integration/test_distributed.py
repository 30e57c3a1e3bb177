"""torchrun + DDP on CPU (gloo, 2 processes): exact resume, collective stops, rank 0 alone writes,
resuming on another world size, and two "nodes" on loopback. Real processes, real signals."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanoresume.tools import ckpt, evaluation, sampling
from nanoresume.tools.chaos import final_state_difference
from nanoresume.checkpoint import load_checkpoint, step_path
from tests.harness.probes import NAN_ENV, RECORD_ENV, STOP_ENV, read_records
from tests.helpers import REPO, TINY_FLAGS, cli_flags, launch_tree, run_tree

pytestmark = pytest.mark.slow

AUDIT = Path(__file__).resolve().parent / "audit"
HARNESS = REPO / "tests" / "harness"  # its sitecustomize installs the probes in every process started
STEPS = 30
# dropout 0: with no random numbers in the step, runs on different world sizes differ only by rounding.
FLAGS = dict(TINY_FLAGS, batch_size=2, dropout=0.0, max_steps=STEPS, eval_interval=10, ckpt_interval=10,
             progress=False)


def launch_command(nproc: int, extra: list[str] = ()) -> list[str]:
    if nproc == 0:  # a plain single process, no torchrun
        return [sys.executable, "-m", "nanoresume.tools.chaos_child", "child"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--monitor-interval=0.1", "--shutdown-timeout=10", *extra, "-m", "nanoresume.tools.chaos_child", "child"]


def environment(records: Path, **extra: str) -> dict[str, str]:
    """The probes' harness first on PYTHONPATH (before ``extra``'s or this process's), recording to ``records``."""
    records.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(p for p in (str(HARNESS), extra.pop("PYTHONPATH", os.environ.get("PYTHONPATH"))) if p)
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **{RECORD_ENV: str(records)}, **extra,
                PYTHONPATH=path)


@pytest.fixture
def args(tiny_text: Path, tmp_path: Path):
    def make(out: str, **overrides) -> list[str]:
        values = dict(FLAGS, data=str(tiny_text), out_dir=str(tmp_path / out), cache_dir=str(tmp_path / "cache"))
        values.update(overrides)
        return cli_flags(values)

    return make


def run(command: list[str], train_args: list[str], env: dict[str, str], timeout: float = 120) \
        -> subprocess.CompletedProcess:
    return run_tree(command + train_args, timeout, env=env, cwd=REPO)


def losses(records: Path, rank: int = 0) -> dict[int, float]:
    return read_records(records, rank)[0]


def windows_by_step(records: Path, ranks: int) -> dict[int, list[int]]:
    """Step index -> every window of that step's global batch: the ranks that drew it, in rank order."""
    per_rank = [read_records(records, r)[1] for r in range(ranks)]
    indices = sorted(set().union(*per_rank))
    return {index: [o for rank in per_rank if index in rank for o in rank[index]] for index in indices}


@pytest.fixture(scope="module")
def two_process_reference(tiny_text: Path, tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted 2-process run, with every file operation of each rank under OUT audited."""
    root = tmp_path_factory.mktemp("reference")
    values = dict(FLAGS, data=str(tiny_text), out_dir=str(root / "out"), cache_dir=str(root / "cache"))
    env = environment(root / "records", PYTHONPATH=f"{AUDIT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                      NANORESUME_AUDIT_WATCH=str(root / "out"), NANORESUME_AUDIT_LOG=str(root / "audit"))
    result = run(launch_command(2), cli_flags(values), env)
    assert result.returncode == 0, result.stdout + result.stderr
    return {"out": root / "out", "records": root / "records", "audit": root / "audit", "stdout": result.stdout}


def test_only_rank_0_creates_or_writes_anything_under_out(two_process_reference):
    audit = two_process_reference["audit"]
    rank0 = Path(f"{audit}.rank0").read_text().splitlines()
    assert any("best.pt" in line for line in rank0) and any("step_00000030.pt" in line for line in rank0)
    assert any("config.json" in line for line in rank0) and any("tfevents" in line for line in rank0)
    assert not Path(f"{audit}.rank1").exists(), Path(f"{audit}.rank1").read_text()


def test_the_start_line_and_config_json_show_the_global_batch(two_process_reference):
    assert "2 processes x batch 2 x accumulation 1 = global batch 4" in two_process_reference["stdout"]
    config = json.loads((two_process_reference["out"] / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch_size"] == 4
    state = load_checkpoint(step_path(two_process_reference["out"] / "checkpoints", STEPS))
    assert state["world_size"] == 2 and [r["rank"] for r in state["ranks"]] == [0, 1]


def test_the_tools_read_a_checkpoint_written_by_two_processes(two_process_reference, tiny_text, capsys):
    out = two_process_reference["out"]
    step = str(step_path(out / "checkpoints", STEPS))
    for main, args in ((ckpt.main, ["verify", str(out)]), (ckpt.main, ["show", step]),
                       (sampling.main, ["--ckpt", step, "--max-new-tokens", "4"]),
                       (evaluation.main, ["--ckpt", step, "--data", str(tiny_text), "--no-progress"])):
        assert main(args) == 0, (args, capsys.readouterr().err)
    ckpt.main(["show", step])
    shown = capsys.readouterr().out
    assert "written by 2 process(es)" in shown and "rank 1: rng streams" in shown


def test_ranks_draw_different_windows_and_report_the_same_loss_every_step(two_process_reference):
    """Each rank computes its loss on its own windows; the loss each reports is the agreed one
    (the vote itself: tests/unit/test_distributed.py)."""
    records = two_process_reference["records"]
    assert losses(records, 0) == losses(records, 1) and sorted(losses(records, 0)) == list(range(1, STEPS + 1))
    mine, theirs = read_records(records, 0)[1], read_records(records, 1)[1]
    assert mine.keys() == theirs.keys() and all(mine[i] != theirs[i] for i in mine)


def test_sigterm_to_one_worker_then_to_torchrun_stops_both_ranks_each_time_and_the_resume_is_bit_exact(
        args, tmp_path):
    """One launch chain: a SIGTERM to one worker (both stop at the same step, no hang), a resume that a
    SIGTERM to torchrun stops (rank 0 alone speaks, exit code 143 on file), a resume to the end."""
    train_args = args("stopped", max_steps=200, ckpt_interval=1000)
    reference = run(launch_command(2), args("ref200", max_steps=200, ckpt_interval=1000),
                    environment(tmp_path / "ref-records"))
    assert reference.returncode == 0, reference.stderr
    records = tmp_path / "records"

    launcher = launch_tree(launch_command(2) + train_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=environment(records), cwd=REPO)
    wait_for_steps(records, 20)
    os.kill(worker_pid(launcher.pid, rank=1), signal.SIGTERM)
    output = launcher.communicate(timeout=60)[0]  # a hang fails here
    last = [max(losses(records, rank)) for rank in (0, 1)]
    assert last[0] == last[1] < 200, output
    assert f"stopped by SIGTERM after step {last[0]}" in output
    assert load_checkpoint(step_path(tmp_path / "stopped" / "checkpoints", last[0]))["step"] == last[0]

    launcher = launch_tree(launch_command(2) + train_args + ["--resume", "auto"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=environment(records), cwd=REPO)
    wait_for_steps(records, last[0] + 20)
    launcher.send_signal(signal.SIGTERM)
    output = launcher.communicate(timeout=60)[0]
    stopped = [int(line.split("after step ")[1].split(";")[0].replace(",", ""))
               for line in output.splitlines() if "stopped by SIGTERM after step" in line]
    assert len(stopped) == 1, output  # rank 0 alone speaks
    assert launcher.returncode == 1  # torchrun hides the workers' 143 behind its own 1 ...
    assert (tmp_path / "stopped" / "exit_code").read_text() == "143\n"  # ... which a job script reads here
    state = load_checkpoint(step_path(tmp_path / "stopped" / "checkpoints", stopped[0]))
    assert last[0] < state["step"] == stopped[0] < 200

    resumed = run(launch_command(2), train_args + ["--resume", "auto"], environment(records))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert final_state_difference(step_path(tmp_path / "stopped" / "checkpoints", 200),
                              step_path(tmp_path / "ref200" / "checkpoints", 200)) is None
    assert losses(records) == losses(tmp_path / "ref-records")


def test_sigkill_of_one_worker_then_resume_auto_ends_bit_exact(two_process_reference, args, tmp_path):
    train_args = args("killed")
    records = tmp_path / "records"
    launcher = launch_tree(launch_command(2) + train_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=environment(records, NANORESUME_CHAOS_WRITE_DELAY="0.01"),
                                cwd=REPO)
    deadline = time.monotonic() + 60
    while not step_path(tmp_path / "killed" / "checkpoints", 10).exists():  # a first commit (slowed writes)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    wait_for_steps(records, 21)  # the step-20 save is now being written in the background
    os.kill(worker_pid(launcher.pid, rank=1), signal.SIGKILL)
    launcher.communicate(timeout=60)
    assert launcher.returncode != 0
    resumed = run(launch_command(2), train_args + ["--resume", "auto"], environment(records))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout
    final = step_path(tmp_path / "killed" / "checkpoints", STEPS)
    assert final_state_difference(final, step_path(two_process_reference["out"] / "checkpoints", STEPS)) is None
    assert losses(records) == losses(two_process_reference["records"])


def test_torchrun_max_restarts_resumes_a_killed_worker_s_run_by_itself_and_ends_bit_exact(
        two_process_reference, args, tmp_path):
    """SIGKILL one worker after the step-10 commit: torchrun restarts both, they resume from step 10 with
    no human step (the restart joins torchrun's store afresh) and end equal to the uninterrupted run."""
    records = tmp_path / "records"
    launcher = launch_tree(launch_command(2, ["--max-restarts=3"]) + args("restarted") + ["--resume", "auto"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment(records),
                           cwd=REPO)
    deadline = time.monotonic() + 60
    while not step_path(tmp_path / "restarted" / "checkpoints", 10).exists():
        assert time.monotonic() < deadline, "no commit at step 10"
        time.sleep(0.05)
    wait_for_steps(records, 12)
    os.kill(worker_pid(launcher.pid, rank=1), signal.SIGKILL)
    output = launcher.communicate(timeout=120)[0]  # the reported hang fails here
    assert launcher.returncode == 0, output
    assert "torchrun restarted the workers (restart 1 of 3)" in output, output
    assert f"resumed from {step_path(tmp_path / 'restarted' / 'checkpoints', 10)} at step 10" in output, output
    final = step_path(tmp_path / "restarted" / "checkpoints", STEPS)
    assert final_state_difference(final, step_path(two_process_reference["out"] / "checkpoints", STEPS)) is None
    assert losses(records) == losses(two_process_reference["records"])


def test_a_resume_on_another_world_size_keeps_every_step_s_windows_and_close_losses(args, tmp_path):
    """Global batch 4 throughout: 1 process x batch 2 x accumulation 2, 2 processes x batch 2, 4 processes
    x batch 1, 1 process x batch 2 x accumulation 2 again. One launch chain: 1 process to step 10, then 2 to
    step 20, then 4 to step 25, then 1 process to the end."""
    single_args = ["--grad-accum", "2"]
    reference = run(launch_command(0), args("reference") + single_args, environment(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr
    records = tmp_path / "records"
    stopped = run(launch_command(0), args("switched") + single_args, environment(records, **{STOP_ENV: "10"}))
    assert "stopped by SIGTERM after step 10" in stopped.stdout, stopped.stdout + stopped.stderr
    for nproc, stop, flags, change in ((2, "20", [], "--grad-accum: 2 -> 1"),
                                       (4, "25", ["--batch-size", "1"], "4 processes x batch 1 x accumulation 1"),
                                       (0, None, [], "--grad-accum: 1 -> 2")):
        resumed = run(launch_command(nproc), args("switched") + flags + ["--resume", "auto"],
                      environment(records, **({STOP_ENV: stop} if stop else {})))
        if stop:
            assert f"stopped by SIGTERM after step {stop}" in resumed.stdout, resumed.stdout + resumed.stderr
        else:
            assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "start new streams" in resumed.stdout + resumed.stderr  # the one warning about dropout streams
        assert change in resumed.stdout, resumed.stdout
    assert windows_by_step(records, 4) == windows_by_step(tmp_path / "ref", 1)
    ours, theirs = losses(records), losses(tmp_path / "ref")
    assert ours.keys() == theirs.keys()
    for step in ours:
        assert math.isclose(ours[step], theirs[step], rel_tol=1e-4), (step, ours[step], theirs[step])


def test_time_limit_stops_both_ranks_cleanly_with_75(args, tmp_path):
    records = tmp_path / "records"
    # Counted from each worker's start with a second to spare: 1 s is spent after the first step at any speed.
    result = run(launch_command(2), args("timed", max_steps=100000) + ["--time-limit", "1"], environment(records))
    assert result.returncode != 0
    assert "stopped by time limit after step" in result.stdout, result.stdout + result.stderr
    assert "exitcode  : 75" in result.stderr  # torchrun's summary of the workers
    last = max(losses(records, 0))
    assert last == max(losses(records, 1))
    assert load_checkpoint(step_path(tmp_path / "timed" / "checkpoints", last))["step"] == last


def test_a_nan_on_one_rank_stops_both_ranks_with_one_line(args, tmp_path):
    records = tmp_path / "records"
    result = run(launch_command(2), args("nan"), environment(records, **{NAN_ENV: "14:1"}))
    assert "training loss is nan at step 14" in result.stderr, result.stdout + result.stderr
    assert max(losses(records, 0)) == max(losses(records, 1)) == 13
    assert "nanoresume/" not in result.stderr  # no traceback from the workers, only torchrun's summary
    assert [p.name for p in (tmp_path / "nan" / "checkpoints").glob("step_*.pt")] == ["step_00000010.pt"]


def test_two_nodes_on_loopback_train_stop_and_resume_like_one_machine(two_process_reference, args, tmp_path):
    train_args = args("nodes")
    records = tmp_path / "records"

    def both_nodes(extra_env: dict[str, str], resume: bool) -> list[subprocess.CompletedProcess]:
        port = free_port()
        launchers = [launch_tree(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
             "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
             f"--rdzv_id=nodes-{port}", "--monitor-interval=0.1", "-m", "nanoresume.tools.chaos_child", "child",
             *train_args, *(["--resume", "auto"] if resume else [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment(records, **extra_env),
            cwd=REPO) for node in (0, 1)]
        outputs = [p.communicate(timeout=120)[0] for p in launchers]
        return [subprocess.CompletedProcess(p.args, p.returncode, out, "") for p, out in zip(launchers, outputs)]

    stopped = both_nodes({STOP_ENV: "12:1"}, resume=False)
    assert "stopped by SIGTERM after step 12" in stopped[0].stdout + stopped[1].stdout
    finished = both_nodes({}, resume=True)
    assert all(p.returncode == 0 for p in finished), [p.stdout for p in finished]
    assert final_state_difference(step_path(tmp_path / "nodes" / "checkpoints", STEPS),
                              step_path(two_process_reference["out"] / "checkpoints", STEPS)) is None


# ---- helpers ------------------------------------------------------------------------------------


def wait_for_steps(records: Path, steps: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if all(len(losses(records, rank)) >= steps for rank in (0, 1)):
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"the workers did not reach step {steps}")


def worker_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (its children, in rank order of their environment)."""
    children = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} under {launcher_pid}: {children}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ckpt_minutes_is_decided_together_so_off_interval_saves_never_hang(args, tmp_path):
    """Rank 0's clock says when --ckpt-minutes is due; a save gathers every rank's state, so a rank
    that decided alone would hang the run (bounded here by the timeout)."""
    out = tmp_path / "timed-saves"
    train_args = args("timed-saves", ckpt_interval=1000, keep_last=1000) + ["--ckpt-minutes", "0.001"]
    result = run(launch_command(2), train_args, environment(tmp_path / "records"), timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = sorted(int(p.stem.split("_")[1]) for p in (out / "checkpoints").glob("step_*.pt"))
    assert steps[-1] == STEPS and len(steps) >= 3, steps  # the last step, and saves off any interval
    for step in steps:
        assert len(load_checkpoint(step_path(out / "checkpoints", step))["ranks"]) == 2
