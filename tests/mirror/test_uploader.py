"""The background uploader: one upload at a time, coalescing to the newest commit, retries with a
bounded backoff, one warning for a mirror that stops answering, lag, the final wait and summary."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from nanoresume.mirror import Backoff, Mirror, Uploader
from tests.mirror.helpers import MirrorTarget, make_checkpoint, s3_options

FAST = Backoff(first=0.01, most=0.05)


class Gate:
    """Holds every checkpoint upload until released, and records the steps uploaded."""

    def __init__(self, mirror: Mirror) -> None:
        self.open, self.entered, self.steps = threading.Event(), threading.Event(), []
        upload = mirror.upload_checkpoint

        def gated(local: Path, step: int):
            self.entered.set()
            self.open.wait(30)
            self.steps.append(step)
            return upload(local, step)

        mirror.upload_checkpoint = gated


def test_uploads_that_fall_behind_skip_to_the_newest_commit(path_target, tmp_path):
    mirror = path_target.open()
    gate = Gate(mirror)
    folder = tmp_path / "out" / "checkpoints"
    uploader = Uploader(mirror, tmp_path / "out", print, backoff=FAST).start()
    try:
        uploader.committed(10, make_checkpoint(folder, 10))
        assert gate.entered.wait(10)
        for step in (20, 30, 40):  # while 10 uploads: the slot of one keeps only the newest
            uploader.committed(step, make_checkpoint(folder, step))
        assert uploader.lag()[0] == 40
        gate.open.set()
        assert uploader.wait(30) == 40
        assert gate.steps == [10, 40] and uploader.coalesced == 2
        assert uploader.lag() == (0, 0.0)
        assert uploader.summary() == f"mirrored step 40 to {mirror.url}"
    finally:
        uploader.close()


def test_committed_never_waits_for_an_upload(path_target, tmp_path):
    mirror = path_target.open()
    gate = Gate(mirror)
    uploader = Uploader(mirror, tmp_path / "out", print, backoff=FAST).start()
    try:
        folder = tmp_path / "out" / "checkpoints"
        uploader.committed(10, make_checkpoint(folder, 10))
        assert gate.entered.wait(10)
        uploader.committed(20, make_checkpoint(folder, 20))  # returns although the upload of 10 is held
        assert uploader.wait(0.05) is None
        assert "step 20 is not mirrored" in uploader.summary()
    finally:
        gate.open.set()
        uploader.close()


def test_failures_give_one_warning_are_retried_and_the_mirror_catches_up(path_target, tmp_path):
    mirror = path_target.open()
    failures = {"left": 5}
    put_file = mirror.store.put_file

    def flaky(local, name):
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("connection reset by peer")
        put_file(local, name)

    mirror.store.put_file = flaky
    warnings: list[str] = []
    uploader = Uploader(mirror, tmp_path / "out", warnings.append, backoff=FAST).start()
    try:
        uploader.committed(10, make_checkpoint(tmp_path / "out" / "checkpoints", 10))
        assert uploader.wait(30) == 10
        assert len(warnings) == 2, warnings
        assert "could not upload step 10" in warnings[0] and "training goes on" in warnings[0]
        assert "works again" in warnings[1] and "step 10" in warnings[1]
    finally:
        uploader.close()


def test_a_checkpoint_pruned_locally_before_its_upload_is_dropped_quietly(path_target, tmp_path):
    mirror = path_target.open()
    warnings: list[str] = []
    uploader = Uploader(mirror, tmp_path / "out", warnings.append, backoff=FAST).start()
    try:
        uploader.committed(10, tmp_path / "out" / "checkpoints" / "step_00000010.pt")  # already gone
        uploader.committed(20, make_checkpoint(tmp_path / "out" / "checkpoints", 20))
        assert uploader.wait(30) == 20 and warnings == []
    finally:
        uploader.close()


def test_a_best_pt_replaced_during_its_upload_does_not_hold_back_the_checkpoint(path_target, tmp_path):
    from nanoresume.checkpoint import save_atomically

    mirror = path_target.open()
    out = tmp_path / "out"
    out.mkdir()
    save_atomically({"format_version": 2, "kind": "weights"}, out / "best.pt")
    put_file = mirror.store.put_file

    def best_goes_away(local, name):
        if name == "best.pt":
            local.unlink()  # as a rename onto best.pt, or a cleanup, would make it vanish for this upload
            raise FileNotFoundError(local)
        put_file(local, name)

    mirror.store.put_file = best_goes_away
    warnings: list[str] = []
    uploader = Uploader(mirror, out, warnings.append, backoff=FAST).start()
    try:
        uploader.committed(10, make_checkpoint(out / "checkpoints", 10))
        assert uploader.wait(30) == 10 and warnings == []
    finally:
        uploader.close()


def test_retention_on_the_mirror_never_deletes_the_step_the_run_resumed_from(target, tmp_path):
    mirror = target.open()
    folder = tmp_path / "out" / "checkpoints"
    uploader = Uploader(mirror, tmp_path / "out", print, keep_last=2, protect={10}, backoff=FAST).start()
    try:
        for step in (10, 20, 30, 40, 50):
            uploader.committed(step, make_checkpoint(folder, step))
            assert uploader.wait(30) == step
        assert [c.step for c in mirror.checkpoints()] == [10, 40, 50]
    finally:
        uploader.close()


def test_the_final_wait_uploads_the_exit_code_written_after_the_last_commit(path_target, tmp_path):
    mirror = path_target.open()
    out = tmp_path / "out"
    uploader = Uploader(mirror, out, print, backoff=FAST).start()
    try:
        uploader.committed(10, make_checkpoint(out / "checkpoints", 10))
        assert uploader.wait(30) == 10
        (out / "exit_code").write_text("143\n")
        assert uploader.wait(30) == 10
        assert mirror.store.read("exit_code") == b"143\n"
    finally:
        uploader.close()


def test_a_full_mirror_falls_behind_with_one_warning_and_the_local_checkpoints_stay_intact(path_target, tmp_path):
    import errno

    mirror = path_target.open()

    def full(local, name):
        raise OSError(errno.ENOSPC, "No space left on device")

    mirror.store.put_file = full
    warnings: list[str] = []
    folder = tmp_path / "out" / "checkpoints"
    uploader = Uploader(mirror, tmp_path / "out", warnings.append, backoff=FAST).start()
    try:
        for step in (10, 20, 30):
            uploader.committed(step, make_checkpoint(folder, step))
        assert uploader.wait(0.3) is None
        assert len(warnings) == 1 and "No space left on device" in warnings[0]
        assert "holds no checkpoint of this run; step 30 is not mirrored: " in uploader.summary()
        assert uploader.lag()[0] == 30
    finally:
        uploader.close()
    assert sorted(p.name for p in folder.glob("*.pt")) == ["step_00000010.pt", "step_00000020.pt",
                                                            "step_00000030.pt"]


def test_an_upload_that_does_not_check_out_is_named_as_such_and_retried(path_target, tmp_path):
    mirror = path_target.open()
    put_file, calls = mirror.store.put_file, []

    def truncating(local, name):
        calls.append(name)
        if len(calls) == 1:
            mirror.store.put_bytes(local.read_bytes()[:100], name)
        else:
            put_file(local, name)

    mirror.store.put_file = truncating
    warnings: list[str] = []
    uploader = Uploader(mirror, tmp_path / "out", warnings.append, backoff=FAST).start()
    try:
        uploader.committed(10, make_checkpoint(tmp_path / "out" / "checkpoints", 10))
        assert uploader.wait(30) == 10
        assert "did not check out" in warnings[0] and "100 bytes" in warnings[0]
    finally:
        uploader.close()


@pytest.mark.slow
def test_a_server_stopped_mid_run_gives_one_warning_and_the_mirror_catches_up_when_it_is_back(
        s3_credentials, tmp_path):
    from moto.server import ThreadedMotoServer

    from tests.mirror.conftest import new_bucket

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    target = MirrorTarget(f"s3://{new_bucket(endpoint)}/run", s3_options(endpoint))
    mirror = target.open()
    warnings: list[str] = []
    folder = tmp_path / "out" / "checkpoints"
    uploader = Uploader(mirror, tmp_path / "out", warnings.append, backoff=Backoff(first=0.05, most=0.2)).start()
    try:
        uploader.committed(10, make_checkpoint(folder, 10))
        assert uploader.wait(30) == 10
        server.stop()
        for step in (20, 30):
            uploader.committed(step, make_checkpoint(folder, step))  # training goes on
        assert uploader.wait(2) == 10
        assert uploader.lag()[0] == 20
        assert len(warnings) == 1 and "could not upload step" in warnings[0] and "cannot reach" in warnings[0]
        assert "holds step 10; step 30 is not mirrored: cannot reach" in uploader.summary()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        assert uploader.wait(30) == 30
        assert len(warnings) == 2 and "works again" in warnings[1]
        assert mirror.pointer().step == 30 and [c.step for c in mirror.checkpoints()] == [10, 30]
    finally:
        uploader.close()
        server.stop()


def test_a_mirror_ahead_on_a_timeline_the_run_left_does_not_count_as_up_to_date(path_target, tmp_path):
    mirror = path_target.open()
    gate = Gate(mirror)
    uploader = Uploader(mirror, tmp_path / "out", print, held=60, backoff=FAST).start()
    try:
        uploader.committed(50, make_checkpoint(tmp_path / "out" / "checkpoints", 50))  # resumed from 40
        assert gate.entered.wait(10)
        assert uploader.lag()[0] == 50 and "step 50 is not mirrored" in uploader.summary()
        gate.open.set()
        assert uploader.wait(30) == 50 and uploader.lag() == (0, 0.0)
    finally:
        gate.open.set()
        uploader.close()
