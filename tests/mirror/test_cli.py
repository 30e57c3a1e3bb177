"""The mirror through the real command line: a machine lost mid-run resumes from the mirror bit for bit,
a SIGTERM waits for the final upload, a mirror that cannot work is refused before training, a server that
goes away costs one warning, and retention keeps the checkpoint a run resumed from.

One test starts a real process, ``tests.mirror.held_train`` (scripts/train.py's main, paused at a known step
so that it can be killed there), on the loopback S3 server: the machine lost is what it is about. The path
mirror's machine loss is tests/mirror/test_machine_loss.py's (in-process, both stores), and the mirror's store
is one code path over fsspec for both. The others run the command line's main in this process, paused or
signalled at a known step by a patched ``Trainer._end_of_step``; every wait is bounded, nothing is timed."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nanoresume.checkpoint import load_checkpoint
from nanoresume.mirror import Mirror
from nanoresume.tools import cli
from tests.helpers import REPO, assert_one_line_error, flip_a_byte, launch_tree, run_main
from tests.mirror.helpers import MirrorTarget, mirror_flags, s3_options

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def launch_held(mode: str, marker: Path, step: int, flags: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return launch_tree([sys.executable, "-m", "tests.mirror.held_train", mode, str(marker), str(step), *flags],
                       cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(marker: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not marker.exists():
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"the run never reached its held step:\n{out}\n{err}")


def final_state(out: Path, step: int) -> dict[str, Any]:
    """The training state a run ended with, less its config (out_dir, resume and the mirror differ)."""
    state = load_checkpoint(out / "checkpoints" / f"step_{step:08d}.pt")
    del state["config"]
    return state


def train_steps(out: Path) -> list[int]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [record["step"] for record in records if "train/loss" in record]


def tensorboard_steps(out: Path) -> list[int]:
    curves = event_accumulator.EventAccumulator(str(out / "tb"), size_guidance={event_accumulator.SCALARS: 0})
    curves.Reload()
    return [event.step for event in curves.Scalars("train/loss")]


def at_step(monkeypatch: pytest.MonkeyPatch, step: int, action) -> None:
    """Call ``action()`` in this process's run after ``step``, once the mirror holds a checkpoint of it
    (as ``tests.mirror.held_train`` does in a process of its own); undone when the test ends."""
    from nanoresume.trainer import Trainer

    original = Trainer._end_of_step

    def end_of_step(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        outcome = original(self, *args, **kwargs)
        if self.counters.step == step:
            deadline = time.monotonic() + 60
            while self.mirror_link.uploader.held is None and time.monotonic() < deadline:
                time.sleep(0.02)
            action()
        return outcome

    monkeypatch.setattr(Trainer, "_end_of_step", end_of_step)


@pytest.mark.slow
def test_a_machine_lost_mid_run_resumes_from_the_mirror_as_if_never_stopped(s3_target, tiny_cli_args,
                                                                           reference_cli_run, tmp_path,
                                                                           assert_same_state, capsys):
    target = s3_target
    settings = dict(max_steps=30, eval_interval=10)
    flags = [*tiny_cli_args(**settings), *mirror_flags(target)]
    out, marker = tmp_path / "out", tmp_path / "held"
    first = launch_held("hold", marker, 15, flags)  # trained to step 15; the mirror holds step 10
    wait_for(marker, first)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    shutil.rmtree(out)  # the machine is gone, and its disk with it

    time.sleep(1.02 - time.time() % 1)  # TensorBoard event file names start with whole seconds: keep them in order
    resumed = run_main(cli.main, [*flags, "--resume", "auto"], capsys)  # in-process: the new machine
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {target.url}/checkpoints/step_00000010.pt at step 10" in resumed.stdout
    assert resumed.stdout.rstrip().splitlines()[-1] == f"mirrored step 30 to {target.url}"
    assert "warning" not in resumed.stderr.lower(), resumed.stderr
    assert_same_state(final_state(out, 30), final_state(reference_cli_run(**settings), 30))
    assert train_steps(out) == list(range(1, 31)), "metrics.jsonl reads as one run"
    assert tensorboard_steps(out) == list(range(1, 31)), "TensorBoard reads as one run"
    mirror = Mirror(target.url, target.options)
    assert mirror.pointer().step == 30 and mirror.store.read("exit_code").strip() == b"0"


@pytest.mark.slow
def test_sigterm_waits_for_the_final_upload_and_the_stop_line_names_what_the_mirror_holds(target, tiny_cli_args,
                                                                                          tmp_path, capsys,
                                                                                          monkeypatch):
    flags = [*tiny_cli_args(max_steps=1000, eval_interval=10), *mirror_flags(target), "--mirror-wait", "60"]
    at_step(monkeypatch, 12, lambda: os.kill(os.getpid(), signal.SIGTERM))  # a real one, to this process
    run = run_main(cli.main, flags, capsys)  # the run stops after step 13, as a process of its own would
    out, err = run.stdout, run.stderr
    assert run.returncode == 143, out + err  # the signal's, whatever the mirror did
    lines = out.splitlines()
    stop = next(i for i, line in enumerate(lines) if line.startswith("stopped by SIGTERM after step 13;"))
    assert lines[stop + 1] == f"mirrored step 13 to {target.url}", out
    mirror = Mirror(target.url, target.options)
    assert mirror.pointer().step == 13
    assert mirror.store.read("exit_code").strip() == b"143"
    evaluations = [line for line in lines if line.startswith("step ")]
    assert len(evaluations) == 2 and all(re.search(r" \| mirror (up to date|-[\d,]+ steps, \d+ s)$", line)
                                         for line in evaluations), evaluations
    out_dir = Path(flags[flags.index("--out-dir") + 1])
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "mirror/lag_steps" in r] == [0, 10]
    curves = event_accumulator.EventAccumulator(str(out_dir / "tb"), size_guidance={event_accumulator.SCALARS: 0})
    curves.Reload()
    assert {"mirror/lag_steps", "mirror/lag_seconds"} <= set(curves.Tags()["scalars"])


@pytest.mark.slow
def test_a_server_stopped_mid_run_costs_one_warning_and_training_goes_on(s3_credentials, tiny_cli_args, tmp_path,
                                                                         capsys, monkeypatch):
    from moto.server import ThreadedMotoServer

    from tests.mirror.conftest import new_bucket

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    stopped = []
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        target = MirrorTarget(f"s3://{new_bucket(endpoint)}/run", s3_options(endpoint))
        flags = [*tiny_cli_args(max_steps=30, eval_interval=10), *mirror_flags(target), "--mirror-wait", "2"]
        at_step(monkeypatch, 12, lambda: stopped.append(server.stop()))  # the mirror holds step 10
        run = run_main(cli.main, flags, capsys)
    finally:
        if not stopped:
            server.stop()
    out, err = run.stdout, run.stderr
    assert stopped and run.returncode == 0, out + err
    assert len([line for line in err.splitlines() if "could not upload" in line]) == 1, err
    assert "training goes on" in err
    assert out.rstrip().splitlines()[-1].startswith(f"the mirror {target.url} holds step 10; step 30 is not "
                                                    f"mirrored: cannot reach the store"), out
    assert train_steps(tmp_path / "out") == list(range(1, 31))
    load_checkpoint(tmp_path / "out" / "checkpoints" / "step_00000030.pt")  # the local checkpoints are intact


@pytest.mark.slow
def test_a_full_mirror_costs_one_warning_and_the_local_checkpoints_stay_intact(path_target, tiny_cli_args, tmp_path,
                                                                               capsys, monkeypatch):
    from nanoresume.mirror import Store

    def full(self: Store, local: Path, name: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Store, "put_file", full)  # the probe (a small write from memory) still passes
    flags = [*tiny_cli_args(max_steps=20, eval_interval=10), *mirror_flags(path_target), "--mirror-wait", "0"]
    result = run_main(cli.main, flags, capsys)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len([line for line in result.stderr.splitlines() if "could not upload" in line]) == 1, result.stderr
    assert "No space left on device" in result.stderr
    assert result.stdout.rstrip().splitlines()[-1].startswith(
        f"the mirror {path_target.url} holds no checkpoint of this run; step 20 is not mirrored"), result.stdout
    for step in (10, 20):
        load_checkpoint(tmp_path / "out" / "checkpoints" / f"step_{step:08d}.pt")


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 800 KB tmpfs (room for one tiny checkpoint and best.pt): a path mirror that fills up. Needs root."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=800k", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (and a container that allows it)")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.slow
def test_a_path_mirror_on_a_tmpfs_that_fills_costs_one_warning_and_training_goes_on(small_tmpfs, tiny_cli_args,
                                                                                    tmp_path, capsys):
    mirror = small_tmpfs / "run"
    flags = [*tiny_cli_args(max_steps=30, eval_interval=10), "--mirror", str(mirror), "--mirror-wait", "1"]
    result = run_main(cli.main, flags, capsys)
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stderr.splitlines() if "could not upload" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], result.stderr
    assert result.stdout.rstrip().splitlines()[-1].startswith(
        f"the mirror {mirror} holds step 10; step 30 is not mirrored"), result.stdout
    assert Mirror(str(mirror)).pointer().step == 10
    for step in (10, 20, 30):
        load_checkpoint(tmp_path / "out" / "checkpoints" / f"step_{step:08d}.pt")  # the local ones are intact


# ---- a mirror that cannot work: exit 2 before training, one line, OUT untouched ---------------------------

def test_a_mirror_folder_whose_parent_is_missing_is_refused_before_training(tiny_cli_args, tmp_path, capsys):
    refused = run_main(cli.main, [*tiny_cli_args(), "--mirror", str(tmp_path / "no-drive" / "run")], capsys)
    assert_one_line_error(refused, f"--mirror {tmp_path / 'no-drive' / 'run'}", "mount the drive")
    assert not (tmp_path / "out").exists()


def test_an_unwritable_mirror_folder_is_refused_before_training(tiny_cli_args, tmp_path, capsys, monkeypatch):
    from nanoresume.mirror import Store

    def read_only(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Store, "put_bytes", read_only)  # root writes through permissions; a read-only mount does not
    refused = run_main(cli.main, [*tiny_cli_args(), "--mirror", str(tmp_path / "mirror")], capsys)
    assert_one_line_error(refused, "not writable")
    assert not (tmp_path / "out").exists()


def test_bad_mirror_flags_are_one_line_errors(tiny_cli_args, tmp_path, capsys):
    for flags, needle in [(["--mirror-option", "a=1"], "only applies to --mirror"),
                          (["--mirror", str(tmp_path), "--mirror-option", "novalue"], "KEY=VALUE"),
                          (["--mirror", str(tmp_path), "--mirror-wait", "-1"], "--mirror-wait -1"),
                          (["--mirror", str(tmp_path), "--mirror-keep-last", "0"], "--mirror-keep-last 0")]:
        assert_one_line_error(run_main(cli.main, [*tiny_cli_args(), *flags], capsys), needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_missing_bucket_is_refused_before_training(s3_endpoint, tiny_cli_args, tmp_path, capsys):
    target = MirrorTarget("s3://no-such-bucket/run", s3_options(s3_endpoint))
    refused = run_main(cli.main, [*tiny_cli_args(), *mirror_flags(target)], capsys)
    assert_one_line_error(refused, "--mirror s3://no-such-bucket/run", "bucket does not exist")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_wrong_credentials_are_refused_before_training(s3_target, tiny_cli_args, tmp_path, capsys, monkeypatch):
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server checks keys from now on
    refused = run_main(cli.main, [*tiny_cli_args(), *mirror_flags(s3_target)], capsys)
    assert_one_line_error(refused, f"--mirror {s3_target.url}", "access denied")
    assert not (tmp_path / "out").exists()


# ---- another run, and retention ---------------------------------------------------------------------------

@pytest.mark.slow
def test_a_mirror_holding_another_run_is_refused_unless_that_run_is_resumed(path_target, tiny_cli_args, tmp_path,
                                                                             capsys):
    flags = [*tiny_cli_args(max_steps=10, eval_interval=10), *mirror_flags(path_target)]
    assert run_main(cli.main, flags, capsys).returncode == 0
    # A finished run started again with a mirror that lacks it: nothing to train, and the mirror catches up.
    again = run_main(cli.main, [*flags, "--resume", "auto", "--mirror", str(tmp_path / "late")], capsys)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr
    assert again.stdout.rstrip().splitlines()[-1] == f"mirrored step 10 to {tmp_path / 'late'}"
    again = run_main(cli.main, [*flags, "--out-dir", str(tmp_path / "new")], capsys)
    assert_one_line_error(again, "already holds checkpoints of a run (step 10)", "--resume auto")
    wider = run_main(cli.main, [*flags, "--out-dir", str(tmp_path / "wide"), "--n-embd", "64", "--resume", "auto"],
                     capsys)
    assert_one_line_error(wider, "--n-embd is 32 in the checkpoint but 64 now", "nothing was copied")
    assert not list((tmp_path / "wide").rglob("step_*")), "a refused checkpoint is never committed into OUT"
    other = tmp_path / "other.txt"
    other.write_text("another corpus, another run. " * 2000)
    refused = run_main(cli.main, [*flags, "--out-dir", str(tmp_path / "other"), "--data", str(other),
                                  "--resume", "auto"], capsys)
    assert_one_line_error(refused, "holds another run", "data_fingerprint")


@pytest.mark.slow
def test_retention_on_the_mirror_never_deletes_the_checkpoint_the_run_resumed_from(path_target, tiny_cli_args,
                                                                                   tmp_path, capsys):
    flags = [*tiny_cli_args(max_steps=10, eval_interval=5), *mirror_flags(path_target), "--mirror-keep-last", "1"]
    assert run_main(cli.main, flags, capsys).returncode == 0
    mirror = Mirror(path_target.url)
    assert [c.step for c in mirror.checkpoints()] == [10]
    shutil.rmtree(tmp_path / "out")
    resumed = run_main(cli.main, [*flags, "--max-steps", "25", "--resume", "auto"], capsys)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {path_target.url}/checkpoints/step_00000010.pt" in resumed.stdout
    assert [c.step for c in mirror.checkpoints()] == [10, 25], "the one resumed from stays, with the newest"
    assert (Path(path_target.url) / "best.pt").exists()


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_on_the_mirror_is_skipped_with_one_line_and_the_resume_falls_back(
        path_target, tiny_cli_args, tmp_path, capsys):
    flags = [*tiny_cli_args(max_steps=20, eval_interval=5), *mirror_flags(path_target)]
    assert run_main(cli.main, [*flags, "--max-steps", "10"], capsys).returncode == 0
    flip_a_byte(Path(path_target.url) / "checkpoints" / "step_00000010.pt")
    shutil.rmtree(tmp_path / "out")
    resumed = run_main(cli.main, [*flags, "--resume", "auto"], capsys)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    skipped = [line for line in resumed.stderr.splitlines() if "step_00000010.pt" in line]
    assert len(skipped) == 1 and "skipping" in skipped[0], resumed.stderr
    assert f"resumed from {path_target.url}/checkpoints/step_00000005.pt at step 5" in resumed.stdout
    assert train_steps(tmp_path / "out") == list(range(1, 21))
    assert resumed.stdout.rstrip().splitlines()[-1] == f"mirrored step 20 to {path_target.url}"

