"""A process killed (SIGKILL) in the middle of an upload leaves the mirror's previous pointer and
checkpoint intact, and the resume from the mirror picks that one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nanoresume.mirror import find_newest_on_mirror
from tests.helpers import REPO
from tests.mirror.helpers import make_checkpoint


@pytest.mark.slow
def test_a_kill_during_an_upload_leaves_the_previous_pointer_and_checkpoint_intact(target, tmp_path):
    mirror = target.open()
    folder = tmp_path / "out" / "checkpoints"
    mirror.upload_checkpoint(make_checkpoint(folder, 10), 10)
    big = make_checkpoint(folder, 20, size=4 << 20)  # 16 MB: seconds at the trickle's pace
    started = tmp_path / "started"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-m", "tests.mirror.slow_upload", target.url,
                                json.dumps(target.options), str(big), str(started)], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the upload never started"
        process.send_signal(signal.SIGKILL)  # bytes are out; the rest would take seconds more
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert mirror.pointer().step == 10
    assert [c.step for c in mirror.checkpoints()] == [10], "a half upload must never appear under its name"
    if mirror.store.is_path:
        assert mirror.remove_leftovers() == [f"checkpoints/.step_00000020.pt.tmp.{process.pid}"]
    else:  # bytes did go up, in a multipart upload that never completed, so no object shows
        bucket = target.url.split("/")[2]
        pending = mirror.store.fs.list_multipart_uploads(bucket)
        assert [upload["Key"] for upload in pending] == ["run/checkpoints/step_00000020.pt"]
    warnings: list[str] = []
    assert find_newest_on_mirror(mirror, tmp_path / "new", warnings.append).step == 10
    assert warnings == []
