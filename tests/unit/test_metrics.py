"""Metrics sinks: metrics.jsonl reads as one run after any restart, and no sink failure ends a run."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from nanoresume.metrics import Metrics, MetricsFile, TensorBoardLog, scan_for_cut


def lines(*records: dict) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def train(step: int) -> dict:
    return {"step": step, "train/loss": 1.0 / step}


def val(step: int) -> dict:
    return {"step": step, "val/loss": 2.0}


def test_a_resume_keeps_the_lines_before_its_first_step_and_names_the_last_lost_training_step():
    content = lines(val(0), train(1), train(2), val(2), train(3), train(4))
    keep, last_lost = scan_for_cut(content, first_step=3)  # resumed from step 2
    assert content[:keep] == lines(val(0), train(1), train(2), val(2))
    assert last_lost == 4


def test_a_torn_last_line_from_a_kill_is_cut_and_does_not_count_as_a_step():
    content = lines(val(0), train(1), train(2)) + b'{"step": 3, "train/lo'
    keep, last_lost = scan_for_cut(content, first_step=3)
    assert content[:keep] == lines(val(0), train(1), train(2))
    assert last_lost is None


def test_a_new_run_from_step_0_cuts_everything_an_unsaved_run_logged():
    keep, last_lost = scan_for_cut(lines(val(0), train(1), train(2)), first_step=0)
    assert (keep, last_lost) == (0, 2)


def test_an_unreadable_line_ends_what_is_kept():
    content = lines(val(0), train(1)) + b"garbage\n" + lines(train(2))
    keep, _ = scan_for_cut(content, first_step=10)
    assert content[:keep] == lines(val(0), train(1))


def test_metrics_file_rewrites_nothing_it_keeps_and_appends_after_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(lines(val(0), train(1), train(2), train(3)) + b'{"step": 4')
    sink = MetricsFile(path, warn=pytest.fail)
    assert sink.start(first_step=2) == 3
    sink.write(2, {"train/loss": 0.5, "train/grad_norm": float("inf")})
    sink.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[-1]["train/loss"] == 0.5 and records[-1]["train/grad_norm"] is None  # strict JSON
    assert isinstance(records[-1]["time"], float)


class FullDisk:
    """A file whose every write fails as a full disk would."""

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_under_tensorboard_warns_once_and_stops_logging(tmp_path):
    warnings: list[str] = []
    log = TensorBoardLog(tmp_path / "tb", warnings.append)
    log.start(0, {"max_steps": 2})
    log._file = FullDisk()  # the disk fills after the start
    log.scalars(1, {"train/loss": 1.0})
    log.scalars(2, {"train/loss": 0.5})
    log.close()
    assert warnings == ["TensorBoard logging stopped: No space left on device; training goes on"]


def test_tensorboard_that_cannot_create_its_folder_warns_once_and_logs_nothing(tmp_path):
    (tmp_path / "tb").write_text("a file where the folder should be")
    warnings: list[str] = []
    log = TensorBoardLog(tmp_path / "tb", warnings.append)
    log.start(0, {})
    log.scalars(1, {"train/loss": 1.0})
    log.close()
    assert len(warnings) == 1 and warnings[0].startswith("TensorBoard logging stopped:")


def test_a_failing_callback_is_reported_once_and_the_other_sinks_go_on(tmp_path):
    warnings: list[str] = []
    seen: list[int] = []

    def callback(step: int, values: dict[str, float]) -> None:
        seen.append(step)
        raise ConnectionError("wandb is down")

    metrics = Metrics(tmp_path / "tb", tmp_path / "metrics.jsonl", warnings.append, callback)
    metrics.start(0, {})
    for step in (1, 2, 3):
        metrics.log(step, {"train/loss": 1.0})
    metrics.close()
    assert seen == [1]
    assert warnings == ["the metrics callback raised ConnectionError: wandb is down; it is not called again"]
    assert len(Path(tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_the_callback_gets_every_metric_of_every_step_and_evaluation(tmp_path):
    calls: list[tuple[int, dict]] = []
    metrics = Metrics(tmp_path / "tb", tmp_path / "metrics.jsonl", pytest.fail, lambda s, v: calls.append((s, v)))
    metrics.start(0, {})
    metrics.log(0, {"val/loss": 2.0, "val/perplexity": 7.4})
    metrics.log(1, {"train/loss": 1.5, "train/lr": 1e-3})
    metrics.close()
    assert calls == [(0, {"val/loss": 2.0, "val/perplexity": 7.4}), (1, {"train/loss": 1.5, "train/lr": 1e-3})]
