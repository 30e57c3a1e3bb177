"""TensorBoard logging never ends a run: an I/O error warns once and logging stops."""

from __future__ import annotations

import errno

from nanoresume.metrics import TensorBoardLog


def test_a_full_disk_under_tensorboard_warns_once_and_stops_logging(tmp_path):
    warnings = []
    log = TensorBoardLog(tmp_path / "tb", None, warnings.append)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    log.writer.add_scalar = full
    log.scalars(1, {"train/loss": 1.0})
    log.scalars(2, {"train/loss": 0.5})
    log.flush()
    log.close()
    assert warnings == ["TensorBoard logging stopped: No space left on device"]
