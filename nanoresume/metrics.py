"""Where numbers go: TensorBoard (``OUT/tb``), ``OUT/metrics.jsonl`` and an optional callback.

Every start continues from one step: 0 for a new run, ``R + 1`` after resuming from
step ``R``. Whatever an earlier start logged from that step on belongs to steps that
were never saved (a kill, or a run that died before its first checkpoint): TensorBoard
gets a ``SessionLog.START`` at that step, which every reader takes as "drop what you
have from here", and ``metrics.jsonl`` is cut back to the lines before it. So both
always read as one run.

Logging must never end a run: a sink that fails (a full disk, say) warns once and
stops; training goes on, and the next checkpoint save reports the disk itself.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

# Called with (step, metrics): every training step ({"train/loss", "train/lr", "train/grad_norm",
# "train/tokens_per_s"}) and every evaluation ({"val/loss", "val/perplexity"}; with --mirror, then
# {"mirror/lag_steps", "mirror/lag_seconds"}: how far the mirror is behind the newest local commit).
MetricsCallback = Callable[[int, dict[str, float]], None]
Warn = Callable[[str], None]

_serial = itertools.count()  # tells apart event files opened in the same second by one process


class _Sink:
    """Something that can fail once: the first error is a warning, after which it is quiet."""

    name = "logging"

    def __init__(self, warn: Warn) -> None:
        self.warn = warn
        self.failed = False

    def guarded(self, action: Callable[[], None]) -> None:
        if self.failed:
            return
        try:
            action()
        except OSError as e:
            self.failed = True
            self.abandon()
            self.warn(f"{self.name} stopped: {e.strerror or e}; training goes on")

    def abandon(self) -> None:
        """Let go of open files after a failure, without raising again."""


class TensorBoardLog(_Sink):
    """Scalars and the run's config (as text) for TensorBoard: one event file per start.

    Events are written by the calling thread, not a background one, so an I/O error
    surfaces here as one warning instead of a thread traceback. Nothing is created
    until :meth:`start`, so a start with nothing to train adds no empty file.
    """

    name = "TensorBoard logging"

    def __init__(self, folder: Path, warn: Warn) -> None:
        super().__init__(warn)
        self.folder = Path(folder)
        self._file: Optional[BinaryIO] = None
        self._records: Any = None

    def start(self, first_step: int, config: dict[str, Any]) -> None:
        """Open a new event file that drops earlier events from ``first_step`` on, and log ``config``."""
        def start() -> None:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog
            from tensorboard.summary.writer.record_writer import RecordWriter
            from torch.utils.tensorboard.summary import text

            self.folder.mkdir(parents=True, exist_ok=True)
            name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                    f"{os.getpid()}.{next(_serial)}")
            self._file = open(self.folder / name, "wb")
            self._records = RecordWriter(self._file)
            self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
            self._write(Event(wall_time=time.time(), step=first_step,
                              session_log=SessionLog(status=SessionLog.START)))
            self._write(Event(wall_time=time.time(), step=first_step, summary=text("config", config_table(config))))
            self._file.flush()

        self.guarded(start)

    def _write(self, event: Any) -> None:
        self._records.write(event.SerializeToString())

    def scalars(self, step: int, values: dict[str, float]) -> None:
        def add() -> None:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary

            if self._records is None:
                return
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
            self._write(Event(wall_time=time.time(), step=step, summary=summary))
            # Written out at once: a kill right after a checkpoint must not leave saved steps without curves.
            self._file.flush()

        self.guarded(add)

    def text(self, step: int, tag: str, markdown: str) -> None:
        """Text for TensorBoard's Text tab (what ``SummaryWriter.add_text`` writes), e.g. a sample."""
        def add() -> None:
            from tensorboard.compat.proto.event_pb2 import Event
            from torch.utils.tensorboard.summary import text

            if self._records is None:
                return
            self._write(Event(wall_time=time.time(), step=step, summary=text(tag, markdown)))
            self._file.flush()

        self.guarded(add)

    def close(self) -> None:
        def close() -> None:
            if self._file is not None:
                file, self._file, self._records = self._file, None, None
                file.close()

        self.guarded(close)
        self.abandon()

    def abandon(self) -> None:
        file, self._file, self._records = self._file, None, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass  # already reported once; the bytes it held are lost with the disk


def config_table(config: dict[str, Any]) -> str:
    """The config as a two-column Markdown table, which TensorBoard's Text tab renders."""
    rows = [f"| `{key}` | `{json.dumps(value)}` |" for key, value in sorted(config.items())]
    return "\n".join(["| setting | value |", "| --- | --- |", *rows])


class MetricsFile(_Sink):
    """``OUT/metrics.jsonl``: one JSON object per line, for each training step and each evaluation.

    ``{"step": 10, "time": 1764000000.0, "train/loss": 2.31, "train/lr": 0.002, ...}`` or
    ``{"step": 10, "time": ..., "val/loss": 2.4, "val/perplexity": 11.0}``; ``time`` is
    seconds since the epoch, and a non-finite value is ``null``. Each line is appended
    with a single write, so a kill leaves at most one torn last line, which the next
    start removes.
    """

    name = "metrics.jsonl logging"

    def __init__(self, path: Path, warn: Warn) -> None:
        super().__init__(warn)
        self.path = Path(path)
        self._file: Optional[BinaryIO] = None

    def start(self, first_step: int) -> Optional[int]:
        """Cut the file back to the lines before ``first_step`` and open it for appending.

        Returns the last training step that was cut (a step trained but never saved), or None.
        """
        last_cut: list[Optional[int]] = [None]

        def start() -> None:
            if self.path.exists():
                keep, last_cut[0] = scan_for_cut(self.path.read_bytes(), first_step)
                os.truncate(self.path, keep)
            self._file = open(self.path, "ab", buffering=0)

        self.guarded(start)
        return last_cut[0]

    def write(self, step: int, values: dict[str, float]) -> None:
        def write() -> None:
            if self._file is None:
                return
            record = {"step": step, "time": round(time.time(), 3),
                      **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
            line = memoryview((json.dumps(record) + "\n").encode())
            while line:  # a regular file takes it in one write; loop only for a short write
                line = line[self._file.write(line):]

        self.guarded(write)

    def close(self) -> None:
        self.abandon()

    def abandon(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass  # unbuffered: nothing was pending


def scan_for_cut(content: bytes, first_step: int) -> tuple[int, Optional[int]]:
    """(bytes to keep, last training step dropped) for a metrics.jsonl that must end before ``first_step``.

    Keeps complete, readable lines up to the first one at ``first_step`` or later; a torn
    or unreadable line ends what is kept, since nothing after it can be trusted.
    """
    keep, last_cut, cutting, offset = 0, None, False, 0
    *complete, _torn = content.split(b"\n")  # after the last newline: b"" or a line cut short
    for line in complete:
        offset += len(line) + 1
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, TypeError, KeyError):
            break
        if step < first_step and not cutting:
            keep = offset
            continue
        cutting = True
        if "train/loss" in record:
            last_cut = step if last_cut is None else max(last_cut, step)
    return keep, last_cut


class Metrics:
    """Every number of a run, fanned out to TensorBoard, ``metrics.jsonl`` and ``callback``.

    A callback that raises is reported once and not called again, like a sink whose disk is full.
    """

    def __init__(self, tensorboard_dir: Path, jsonl_path: Path, warn: Warn,
                 callback: Optional[MetricsCallback] = None, enabled: bool = True) -> None:
        """``enabled=False``: log nothing anywhere (the ranks other than 0 under torchrun)."""
        self.tensorboard = TensorBoardLog(tensorboard_dir, warn)
        self.jsonl = MetricsFile(jsonl_path, warn)
        self.warn = warn
        self.callback = callback
        self.enabled = enabled

    def start(self, first_step: int, config: dict[str, Any]) -> Optional[int]:
        """Begin logging at ``first_step``; returns the last step an earlier start trained but never saved."""
        if not self.enabled:
            return None
        self.tensorboard.start(first_step, config)
        return self.jsonl.start(first_step)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.tensorboard.scalars(step, values)
        self.jsonl.write(step, values)
        if self.callback is not None:
            try:
                self.callback(step, values)
            except Exception as e:  # someone else's code: report it, keep training
                self.callback = None
                self.warn(f"the metrics callback raised {type(e).__name__}: {e}; it is not called again")

    def text(self, step: int, tag: str, markdown: str) -> None:
        """Text for TensorBoard only (``metrics.jsonl`` and the callback carry numbers)."""
        if self.enabled:
            self.tensorboard.text(step, tag, markdown)

    def close(self) -> None:
        self.tensorboard.close()
        self.jsonl.close()
