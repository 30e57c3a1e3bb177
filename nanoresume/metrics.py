"""Where numbers go: TensorBoard scalars under OUT/tb, and the console (progress bar + lines)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

from tqdm import tqdm


class TensorBoardLog:
    """Scalars for TensorBoard. On resume, events past the resumed step are purged so
    curves show no duplicated or zig-zag segment from steps that were lost.

    Logging must never end a run: after the first I/O error (a full disk, say) it
    warns once and stops logging; the next checkpoint save reports the disk itself.
    """

    def __init__(self, folder: Optional[Path], resumed_step: Optional[int], warn: Callable[[str], None]) -> None:
        """``folder=None``: log nothing (the ranks other than 0 under torchrun)."""
        self.warn = warn
        self.writer = None
        if folder is None:
            return
        from torch.utils.tensorboard import SummaryWriter  # slow import; only when logging

        purge_step = resumed_step + 1 if resumed_step is not None else None
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    def _guarded(self, action: Callable[[], None]) -> None:
        if self.writer is None:
            return
        try:
            action()
        except OSError as e:
            self.writer = None
            self.warn(f"TensorBoard logging stopped: {e.strerror or e}")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        def add() -> None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

        self._guarded(add)

    def flush(self) -> None:
        self._guarded(lambda: self.writer.flush())

    def close(self) -> None:
        self._guarded(lambda: self.writer.close())
        self.writer = None


class Console:
    """A tqdm progress bar plus log lines that do not break it. ``show_bar=False`` for logs/CI."""

    def __init__(self, total_steps: int, initial_step: int, show_bar: bool, quiet: bool = False) -> None:
        """``quiet``: print nothing (the ranks other than 0 under torchrun)."""
        self.quiet = quiet
        self.bar = tqdm(total=total_steps, initial=initial_step, disable=not show_bar or quiet, unit="step",
                        dynamic_ncols=True, file=sys.stderr)

    def log(self, line: str) -> None:
        if self.quiet:
            return
        if self.bar.disable:
            print(line, flush=True)
        else:
            self.bar.write(line)

    def warn(self, line: str) -> None:
        self.log(f"warning: {line}")

    def advance(self, loss: float, lr: float, tokens_per_second: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}", refresh=False)

    def close(self) -> None:
        self.bar.close()
