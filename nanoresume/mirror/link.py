"""A training run's link to its mirror (rank 0, with ``--mirror``): start the uploader from where the
run starts, hand it each local commit, report its lag, and at the end wait a bounded time for it.

::

    link = MirrorLink.start(mirror, out_dir, warn, keep_last, resumed=40, mirror_holds_resumed=True)
    manager.on_commit = lambda step, path: link.committed(step, path)
    steps, seconds = link.uploader.lag()
    print(link.finish(mirror_wait, forced, time_left))    # what the mirror holds
    link.close()
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from .remote import Mirror
from .uploader import Uploader


class MirrorLink:
    """Owns the run's :class:`Uploader` (``uploader``) from start to close."""

    def __init__(self, uploader: Uploader) -> None:
        self.uploader = uploader

    @classmethod
    def start(cls, mirror: Mirror, out_dir: Path, warn: Callable[[str], None], keep_last: Optional[int],
              resumed: Optional[int], mirror_holds_resumed: bool,
              resumed_path: Optional[Path] = None) -> "MirrorLink":
        """Start the background uploader. The mirror holds the step resumed from when it came from there
        or the mirror's pointer names it (``mirror_holds_resumed``); otherwise that checkpoint
        (``resumed_path``, the committed one) goes up first: the mirror is behind."""
        held = resumed if resumed is not None and mirror_holds_resumed else None
        uploader = Uploader(mirror, out_dir, warn, keep_last=keep_last,
                            protect=() if resumed is None else (resumed,), held=held).start()
        if resumed is not None and held is None and resumed_path is not None:
            uploader.committed(resumed, resumed_path)
        return cls(uploader)

    def committed(self, step: int, path: Path) -> None:
        """A step checkpoint was committed locally: returns at once, training never waits for the network."""
        self.uploader.committed(step, path)

    def finish(self, mirror_wait: float, forced: bool, time_left: Optional[float]) -> str:
        """After the last local commit: wait at most ``mirror_wait`` (never past the time limit,
        ``time_left`` seconds away) for the final upload; then what the mirror holds, as a line."""
        wait = 0.0 if forced else mirror_wait  # the user insists: no waiting for the network
        if time_left is not None:
            wait = min(wait, max(0.0, time_left))
        self.uploader.wait(wait)
        return self.uploader.summary()

    def close(self) -> None:
        """An upload in flight is abandoned: the mirror keeps its previous pointer."""
        self.uploader.close()
