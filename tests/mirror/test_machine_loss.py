"""The machine is lost: a run stopped at step 10 was mirrored, its OUT is deleted, and a new OUT is
restored from the mirror; training on from there ends bitwise equal to a run that never stopped, and
metrics.jsonl and TensorBoard read as one run. (In-process, with the library's calls; the CLI test
comes with --mirror.)"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import pytest

from nanoresume.mirror import Backoff, Mirror, Uploader, find_newest_on_mirror, restore_run_files
from tests.helpers import final_state, train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


@pytest.mark.slow
def test_a_run_resumed_from_the_mirror_on_an_empty_out_ends_as_if_never_stopped(target, make_config, reference_run,
                                                                                 assert_same_state):
    reference = reference_run(max_steps=20, eval_interval=10)  # trained once for both targets
    cfg = make_config(max_steps=20, eval_interval=10)

    train(cfg, stop_at=10)
    out = Path(cfg.out_dir)
    warnings: list[str] = []
    uploader = Uploader(target.open(), out, warnings.append, backoff=Backoff(0.01, 0.05)).start()
    try:
        uploader.committed(10, out / "checkpoints" / "step_00000010.pt")
        assert uploader.wait(60) == 10
    finally:
        uploader.close()
    shutil.rmtree(out)  # the machine is gone, and its disk with it

    mirror = Mirror(target.url, target.options)
    restored = find_newest_on_mirror(mirror, out / "checkpoints", warnings.append)
    assert restored is not None and restored.step == 10
    brought_back = restore_run_files(mirror, out, restored.step, warnings.append)
    assert {"best.pt", "config.json", "metrics.jsonl"} <= set(brought_back)
    assert any(name.startswith("tb/events.out.tfevents.") for name in brought_back)
    time.sleep(1.02 - time.time() % 1)  # event file names start with whole seconds: keep them in order
    resumed, _ = train(dataclasses.replace(cfg, resume="auto"))
    assert warnings == []
    assert resumed.resumed_from == out / "checkpoints" / "step_00000010.pt"
    assert_same_state(final_state(resumed), reference.state)
    train_steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
                   if "train/loss" in json.loads(line)]
    assert train_steps == list(range(1, 21))
    curves = event_accumulator.EventAccumulator(str(out / "tb"), size_guidance={event_accumulator.SCALARS: 0})
    curves.Reload()
    assert [e.step for e in curves.Scalars("train/loss")] == list(range(1, 21)), "TensorBoard reads as one run"
