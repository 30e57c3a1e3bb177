"""torchrun + DDP on CPU (gloo): exact resume, collective stops, rank 0 alone writes, resuming on another
world size, and two "nodes" on loopback. Real processes, real signals.

Few launches on purpose (a 2-process launch costs ~12 s of CPU on 2 cores), chained so that each answers
several questions: one uninterrupted 2-process reference; a stop chain (a SIGKILLed torchrun, a SIGTERM to
torchrun, a worker SIGKILLed mid-save under ``--max-restarts``) that ends bit for bit equal to it; a
world-size chain 1 -> 2 -> 4 -> 1 (the one-process legs in this process), stopped by a SIGTERM to one
worker and by the time limit; two nodes stopped by a NaN and resumed with ``--ckpt-minutes``. A probe
(``NANORESUME_PROBE_HOLD``) holds a rank before a step until the signal has arrived, so that no run has
to be long for a signal to land mid-run: each stops after exactly the step it was held at.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from nanoresume.checkpoint import load_checkpoint, step_path
from nanoresume.compare import first_difference
from nanoresume.config import TrainConfig
from nanoresume.data import BatchSampler
from nanoresume.tools import cli, ckpt, evaluation, sampling
from nanoresume.tools.chaos import comparable_state, final_state_difference
from tests.harness.probes import HOLD_ENV, NAN_ENV, PAUSE_ENV, RECORD_ENV, read_records
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


def run(command: list[str], train_args: list[str], env: dict[str, str], timeout: float = 120) \
        -> subprocess.CompletedProcess:
    return run_tree(command + train_args, timeout, env=env, cwd=REPO)


def launch(command: list[str], train_args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """``command`` started with its output (stdout and stderr together) piped, for a test to signal."""
    return launch_tree(command + train_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                       cwd=REPO)


def losses(records: Path, rank: int = 0) -> dict[int, float]:
    return read_records(records, rank)[0]


def windows_by_step(records: Path, ranks: int) -> dict[int, list[int]]:
    """Step index -> every window of that step's global batch: the ranks that drew it, in rank order."""
    per_rank = [read_records(records, r)[1] for r in range(ranks)]
    indices = sorted(set().union(*per_rank))
    return {index: [o for rank in per_rank if index in rank for o in rank[index]] for index in indices}


def global_windows(output: str, global_batch: int, steps: int) -> dict[int, list[int]]:
    """Step index -> the windows of that step's global batch as the data order defines them (a pure function
    of the seed and the step), for the data a run's start line describes."""
    train_tokens = int(output.split(" train + ")[0].rsplit(" ", 1)[1].replace(",", ""))
    sampler = BatchSampler(train_tokens, FLAGS["block_size"], global_batch, TrainConfig().seed)
    return {index: sampler.step_offsets(index).tolist() for index in range(steps)}


def last_steps(records: Path, ranks: int) -> list[int]:
    """The last step each rank recorded."""
    return [max(losses(records, rank)) for rank in range(ranks)]


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


# ---- the stop chain: one 2-process run in three launches, each ended differently ---------------------


@pytest.fixture(scope="module")
def stop_chain(tiny_text: Path, tmp_path_factory) -> dict[str, Any]:
    """One run of the reference's flags in three launches:

    1. torchrun is SIGKILLed while every rank is held before step 8: its workers notice, stop after step 8
       (saved), and exit;
    2. resumed, it is held before step 14 until a SIGTERM to torchrun, which stops both ranks after step 14;
    3. resumed under ``--max-restarts=3`` with slowed writes, rank 1 is held before step 22 (in torchrun's
       first start only) and SIGKILLed there, while step 20's background save is being written: torchrun
       restarts both workers, which resume from the newest commit by themselves and finish.
    """
    root = tmp_path_factory.mktemp("stop-chain")
    out, records = root / "out", root / "records"
    train_args = cli_flags(dict(FLAGS, data=str(tiny_text), out_dir=str(out), cache_dir=str(root / "cache")))
    chain: dict[str, Any] = {"out": out, "records": records}

    launcher = launch(launch_command(2), train_args, environment(records, **{HOLD_ENV: "8"}))
    wait_for_step(records, 7)
    workers = [worker_pid(launcher.pid, rank) for rank in (0, 1)]
    launcher.kill()  # SIGKILL: torchrun can forward nothing
    chain["launcher killed"] = launcher.communicate(timeout=60)[0]  # EOF once the workers, sharing its stdout, are gone
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, f"orphaned workers still running: {workers}"
        time.sleep(0.05)
    chain["launcher killed: last steps"] = last_steps(records, 2)
    chain["launcher killed: exit code"] = (out / "exit_code").read_text()
    chain["launcher killed: saved"] = load_checkpoint(step_path(out / "checkpoints", 8))["step"]  # before pruning

    launcher = launch(launch_command(2), train_args + ["--resume", "auto"], environment(records, **{HOLD_ENV: "14"}))
    wait_for_step(records, 13)
    launcher.send_signal(signal.SIGTERM)
    chain["torchrun stopped"] = launcher.communicate(timeout=60)[0]  # a hang fails here
    chain["torchrun stopped: code"] = launcher.returncode
    chain["torchrun stopped: last steps"] = last_steps(records, 2)
    chain["torchrun stopped: exit code"] = (out / "exit_code").read_text()
    chain["torchrun stopped: saved"] = load_checkpoint(step_path(out / "checkpoints", 14))["step"]

    launcher = launch(launch_command(2, ["--max-restarts=3"]), train_args + ["--resume", "auto"],
                      environment(records, NANORESUME_CHAOS_WRITE_DELAY="0.01", **{HOLD_ENV: "22:1;"}))
    wait_for_step(records, 21)  # the step-20 save is now being written in the background; rank 1 waits
    os.kill(worker_pid(launcher.pid, rank=1), signal.SIGKILL)
    chain["restarted"] = launcher.communicate(timeout=180)[0]  # a hang fails here
    chain["restarted: code"] = launcher.returncode
    return chain


def test_workers_of_a_sigkilled_torchrun_save_at_the_next_step_name_torchrun_s_command_and_exit(stop_chain):
    """torchrun can forward nothing when SIGKILLed: each worker notices its launcher's death, the ranks stop
    after the same step, save it, and exit, leaving no orphan (waited for in the fixture)."""
    output = stop_chain["launcher killed"]
    assert stop_chain["launcher killed: last steps"] == [8, 8], output  # held at step 8 until the death was noticed
    assert stop_chain["launcher killed: saved"] == 8
    assert stop_chain["launcher killed: exit code"] == f"{128 + signal.SIGTERM}\n"
    [stopped] = [line for line in output.splitlines() if "stopped by SIGTERM" in line]
    assert "after step 8" in stopped
    # the command that continues the run is torchrun's (2 processes), not the worker's own (1 process)
    again = stopped.split("Continue with: ")[1]
    assert again.startswith(f"{os.path.basename(launch_command(2)[0])} -m torch.distributed.run ") or \
        again.startswith(f"{launch_command(2)[0]} -m torch.distributed.run "), again
    assert "--nproc_per_node=2" in again and again.endswith("--resume auto"), again


def test_a_sigterm_to_torchrun_stops_both_ranks_after_the_same_step_and_rank_0_alone_speaks(stop_chain):
    output, out = stop_chain["torchrun stopped"], stop_chain["out"]
    assert f"resumed from {step_path(out / 'checkpoints', 8)} at step 8" in output, output
    stopped = [line for line in output.splitlines() if "stopped by SIGTERM after step" in line]
    assert len(stopped) == 1 and "after step 14;" in stopped[0], output  # rank 0 alone speaks
    assert stop_chain["torchrun stopped: last steps"] == [14, 14]
    assert stop_chain["torchrun stopped: code"] == 1  # torchrun hides the workers' 143 behind its own 1 ...
    assert stop_chain["torchrun stopped: exit code"] == "143\n"  # ... which a job script reads here
    assert stop_chain["torchrun stopped: saved"] == 14


def test_torchrun_max_restarts_resumes_a_worker_killed_mid_save_by_itself_and_the_chain_ends_bit_exact(
        stop_chain, two_process_reference):
    """A SIGKILLed worker under ``--max-restarts``: torchrun restarts both (the restart joins torchrun's store
    afresh), they resume from the newest commit with no human step, and the run of three launches ends
    equal, bit for bit, to the uninterrupted one. (A one-process run SIGKILLed again and again and resumed by
    hand, inside writes too: tests/integration/test_chaos.py.)"""
    output, out = stop_chain["restarted"], stop_chain["out"]
    assert stop_chain["restarted: code"] == 0, output
    assert "torchrun restarted the workers (restart 1 of 3)" in output, output
    resumed = [line for line in output.splitlines() if line.startswith("resumed from ")]
    assert len(resumed) == 2 and resumed[0] == f"resumed from {step_path(out / 'checkpoints', 14)} at step 14", output
    assert resumed[1].endswith((" at step 14", " at step 20")), output  # step 20 if its write was committed
    final = step_path(out / "checkpoints", STEPS)
    assert final_state_difference(final, step_path(two_process_reference["out"] / "checkpoints", STEPS)) is None
    assert losses(stop_chain["records"]) == losses(two_process_reference["records"])


# ---- the world-size chain: 1 -> 2 -> 4 -> 1 processes, global batch 4 throughout -----------------------


@pytest.fixture(scope="module")
def world_size_chain(tiny_text: Path, tmp_path_factory) -> dict[str, Any]:
    """One run in four starts, with the global batch of 4 sequences kept throughout:

    1. one process x batch 2 x accumulation 2 (in this process), stopped after step 10;
    2. 2 processes x batch 2, rank 1 held before step 20 until a SIGTERM to rank 1 alone stops both;
    3. 4 processes x batch 1 with ``--time-limit 1``, which rank 0's clock finds passed at the first step
       (1 s is kept in hand for the save at any speed): every rank stops after step 21;
    4. one process x batch 2 x accumulation 2 again (in this process), to the end.
    """
    root = tmp_path_factory.mktemp("world-size")
    records = root / "records"

    def args(*more: str) -> list[str]:
        return cli_flags(dict(FLAGS, data=str(tiny_text), out_dir=str(root / "out"),
                              cache_dir=str(root / "cache"))) + list(more)

    chain: dict[str, Any] = {"out": root / "out", "records": records}
    chain[1] = train_in_this_process(args("--grad-accum", "2"), records, stop_in=10)
    launcher = launch(launch_command(2), args("--resume", "auto"), environment(records, **{HOLD_ENV: "20:1"}))
    wait_for_step(records, 19)
    os.kill(worker_pid(launcher.pid, rank=1), signal.SIGTERM)
    output = launcher.communicate(timeout=60)[0]  # a hang fails here
    chain[2] = subprocess.CompletedProcess(launcher.args, launcher.returncode, output, "")
    chain["2: last steps"] = last_steps(records, 2)
    chain["2: saved"] = load_checkpoint(step_path(root / "out" / "checkpoints", 20))["step"]  # before pruning
    chain[4] = run(launch_command(4), args("--batch-size", "1", "--time-limit", "1", "--resume", "auto"),
                   environment(records))
    chain["4: last steps"] = last_steps(records, 4)
    chain["4: saved"] = load_checkpoint(step_path(root / "out" / "checkpoints", 21))["step"]
    chain["1 again"] = train_in_this_process(args("--resume", "auto"), records)
    return chain


def test_a_sigterm_to_one_worker_stops_both_ranks_after_the_same_step(world_size_chain):
    output = world_size_chain[2].stdout
    assert world_size_chain["2: last steps"] == [20, 20], output  # rank 1 held at step 20 until the signal
    assert "stopped by SIGTERM after step 20" in output, output
    assert world_size_chain["2: saved"] == 20


def test_time_limit_stops_every_rank_cleanly_with_75(world_size_chain):
    result = world_size_chain[4]
    assert result.returncode != 0
    assert "stopped by time limit after step 21" in result.stdout, result.stdout + result.stderr
    assert "exitcode  : 75" in result.stderr  # torchrun's summary of the workers
    assert world_size_chain["4: last steps"] == [21] * 4
    assert world_size_chain["4: saved"] == 21


def test_a_resume_on_another_world_size_keeps_every_step_s_windows_and_close_losses(world_size_chain,
                                                                                   reference_run):
    """Every step draws the windows one process draws (the data order is a function of the step), and the
    losses are those of the uninterrupted one-process run (in this process) up to rounding."""
    reference = dict(reference_run(**FLAGS, grad_accum=2).step_losses)
    for leg, change in ((2, "--grad-accum: 2 -> 1"), (4, "4 processes x batch 1 x accumulation 1"),
                        ("1 again", "--grad-accum: 1 -> 2")):
        result = world_size_chain[leg]
        assert change in result.stdout, result.stdout
        assert "start new streams" in result.stdout + result.stderr  # the one warning about dropout streams
    assert world_size_chain["1 again"].returncode == 0, world_size_chain["1 again"].stderr
    records = world_size_chain["records"]
    assert windows_by_step(records, 4) == global_windows(world_size_chain[1].stdout, 4, STEPS)
    ours = losses(records)
    assert ours.keys() == reference.keys()
    for step in ours:
        assert math.isclose(ours[step], reference[step], rel_tol=1e-4), (step, ours[step], reference[step])


# ---- two nodes on loopback --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_nodes(tiny_text: Path, tmp_path_factory) -> dict[str, Any]:
    """One run on two torchrun agents of one worker each (c10d rendezvous on loopback, as two machines):
    stopped by a NaN loss on rank 1 at step 13, then resumed to the end with ``--ckpt-minutes 0.001``
    (and ``--keep-last 1000``) while rank 0 pauses 0.1 s before steps 15 and 25."""
    root = tmp_path_factory.mktemp("nodes")
    out, records = root / "out", root / "records"
    train_args = cli_flags(dict(FLAGS, data=str(tiny_text), out_dir=str(out), cache_dir=str(root / "cache")))

    def both_nodes(extra_env: dict[str, str], more: list[str]) -> list[subprocess.CompletedProcess]:
        port = free_port()
        launchers = [launch_tree(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
             "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
             f"--rdzv_id=nodes-{port}", "--monitor-interval=0.1", "-m", "nanoresume.tools.chaos_child", "child",
             *train_args, *more],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(records, **extra_env),
            cwd=REPO) for node in (0, 1)]
        outputs = [p.communicate(timeout=120) for p in launchers]
        return [subprocess.CompletedProcess(p.args, p.returncode, *output) for p, output in zip(launchers, outputs)]

    nodes: dict[str, Any] = {"out": out, "records": records}
    nodes["nan"] = both_nodes({NAN_ENV: "13:1"}, [])
    nodes["nan: last steps"] = last_steps(records, 2)
    nodes["nan: checkpoints"] = sorted(p.name for p in (out / "checkpoints").glob("step_*.pt"))
    nodes["finished"] = both_nodes({PAUSE_ENV: "15,25:0:0.1"},
                                   ["--resume", "auto", "--ckpt-minutes", "0.001", "--keep-last", "1000"])
    return nodes


def test_a_nan_on_one_rank_stops_both_ranks_with_one_line(two_nodes):
    stderr = "".join(node.stderr for node in two_nodes["nan"])
    assert stderr.count("training loss is nan at step 13") == 1, stderr  # rank 0 alone speaks
    assert two_nodes["nan: last steps"] == [12, 12]
    assert "nanoresume/" not in stderr  # no traceback from the workers, only torchrun's summaries
    assert two_nodes["nan: checkpoints"] == ["step_00000010.pt"]


def test_two_nodes_on_loopback_train_stop_and_resume_like_one_machine(two_nodes, two_process_reference):
    """Resumed from step 10, the run ends equal to the uninterrupted one on one machine, bit for bit, but
    for the two flags given at the resume (which change when it saves, never what it trains)."""
    finished = two_nodes["finished"]
    assert all(p.returncode == 0 for p in finished), [p.stdout + p.stderr for p in finished]
    stdout = "".join(p.stdout for p in finished)  # rank 0 is on whichever agent joined the rendezvous first
    assert f"resumed from {step_path(two_nodes['out'] / 'checkpoints', 10)} at step 10" in stdout, stdout
    ours, theirs = (comparable_state(step_path(out / "checkpoints", STEPS))
                    for out in (two_nodes["out"], two_process_reference["out"]))
    for state, values in ((ours, (0.001, 1000)), (theirs, (None, 3))):
        assert (state["config"].pop("ckpt_minutes"), state["config"].pop("keep_last")) == values
    assert first_difference(ours, theirs) is None


def test_ckpt_minutes_is_decided_together_so_off_interval_saves_never_hang(two_nodes):
    """Rank 0's clock says when --ckpt-minutes is due (here: after its pauses before steps 15 and 25, at any
    speed); a save gathers every rank's state, so a rank that decided alone would hang the run (bounded
    here by the timeout)."""
    checkpoints = two_nodes["out"] / "checkpoints"
    steps = sorted(int(p.stem.split("_")[1]) for p in checkpoints.glob("step_*.pt"))
    assert {15, 25, STEPS} <= set(steps), steps  # saves off any interval, and the last step
    for step in steps:
        assert len(load_checkpoint(step_path(checkpoints, step))["ranks"]) == 2


# ---- helpers ------------------------------------------------------------------------------------


def train_in_this_process(argv: list[str], records: Path, stop_in: Optional[int] = None) \
        -> subprocess.CompletedProcess:
    """What a plain one-process launch with the probes would do, without the seconds a process costs: the
    command line's ``main`` in this process, every step's loss and windows appended to ``records`` as
    rank 0's and, with ``stop_in``, a stop asked for during that step as a SIGTERM would."""
    from nanoresume.trainer import Trainer

    draw, step = BatchSampler.next_micro_batches, Trainer.train_step

    def record(entry: dict[str, Any]) -> None:
        records.mkdir(parents=True, exist_ok=True)
        with open(records / "rank0.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def recorded_draw(sampler: BatchSampler, *args: Any, **kwargs: Any) -> Any:
        index, batches = sampler.index, draw(sampler, *args, **kwargs)
        record({"index": index, "offsets": [int(o) for batch in batches for o in batch]})
        return batches

    def recorded_step(trainer: Trainer) -> tuple[float, float]:
        upcoming = trainer.counters.step + 1
        if upcoming == stop_in:
            trainer.stop.request("SIGTERM", 143)
        loss, norm = step(trainer)
        record({"step": upcoming, "loss": loss})
        return loss, norm

    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        patch.setattr(BatchSampler, "next_micro_batches", recorded_draw)
        patch.setattr(Trainer, "train_step", recorded_step)
        code = cli.main(argv)
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def wait_for_step(records: Path, step: int, ranks: int = 2, timeout: float = 60) -> None:
    """Until each of the first ``ranks`` ranks has recorded ``step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            if all(step in losses(records, rank) for rank in range(ranks)):
                return
        time.sleep(0.05)
    raise AssertionError(f"the workers did not reach step {step}")


def wait_for_steps(records: Path, steps: int, timeout: float = 60) -> None:
    """Until ranks 0 and 1 have each recorded ``steps`` steps."""
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


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"  # a zombie has exited
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
