"""The launcher of a torchrun worker: notice when it dies, and know the command that started it.

torchrun puts its workers in sessions of their own, so a SIGKILLed torchrun (an OOM killer, a
``kill -9``, a lost SSH session's agent) would leave them training, orphaned, with nobody to stop
them. :func:`stop_when_launcher_dies` makes the launcher's death a SIGTERM to this worker: on Linux
through ``prctl(PR_SET_PDEATHSIG)``, elsewhere through a thread that watches ``os.getppid()``. The
SIGTERM reaches the stop flag like any other, so the worker saves at the next step boundary (the
ranks agree on it, as for a SIGTERM to one worker) and exits.

:func:`launcher_command` reads the launcher's command line (``/proc/<parent>/cmdline``), so the stop
message can say ``Continue with: torchrun ... --resume auto`` rather than the worker's own command,
which would continue the run on one process.

Called at start-up only under torchrun; a plain ``python train.py`` has no launcher to watch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_SECONDS = 0.5  # how often the portable fallback looks at the parent


def stop_when_launcher_dies(signum: int = signal.SIGTERM) -> str:
    """Have ``signum`` sent to this process when its parent (torchrun's agent) dies; returns how:
    ``"prctl"``, ``"watch"`` or ``"orphaned"`` (the parent was already gone: ``signum`` is sent now).

    PR_SET_PDEATHSIG fires when the parent *thread* that started us ends; torchrun's agent starts its
    workers from its main thread, which lives as long as the agent does.
    """
    parent = os.getppid()
    how = "prctl" if _set_parent_death_signal(signum) else "watch"
    # The parent died between our start and prctl: no signal will come. (A parent that is pid 1 is no sign
    # of that: torchrun is pid 1 in a container started with `exec torchrun`.)
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)
        return "orphaned"
    if how == "watch":
        _start_watch(parent, lambda: os.kill(os.getpid(), signum))
    return how


_watching: list[str] = []  # how this process watches its launcher, once set up


def stop_when_launcher_dies_once() -> str:
    """:func:`stop_when_launcher_dies`, set up once per process (a second Trainer reuses it)."""
    if not _watching:
        _watching.append(stop_when_launcher_dies())
    return _watching[0]


def _set_parent_death_signal(signum: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _start_watch(parent: int, on_death: Callable[[], None], interval: float = WATCH_SECONDS) -> threading.Thread:
    """A daemon thread calling ``on_death()`` once, when this process's parent is no longer ``parent``."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(interval):
            if os.getppid() != parent:
                on_death()
                return

    thread = threading.Thread(target=watch, name="nanoresume-launcher-watch", daemon=True)
    thread.start()
    return thread


def launcher_command(pid: Optional[int] = None) -> Optional[list[str]]:
    """The command line of the torchrun that started this process (its parent, or ``pid``), as the
    user would type it; None when it cannot be read (not Linux, no /proc) or is not torchrun."""
    pid = os.getppid() if pid is None else pid
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return torchrun_words([word.decode(errors="replace") for word in raw.split(b"\0") if word])


def torchrun_words(argv: Sequence[str]) -> Optional[list[str]]:
    """``argv`` of a launcher process as the user typed it: ``torchrun ARGS`` for the console script
    (run through its interpreter), ``python -m torch.distributed.run ARGS`` as is; None when ``argv``
    is not torchrun."""
    argv = list(argv)
    for i, word in enumerate(argv[:3]):
        if os.path.basename(word) == "torchrun":
            return ["torchrun", *argv[i + 1:]]
        if word == "-m" and i + 1 < len(argv) and argv[i + 1] in ("torch.distributed.run", "torch.distributed.launch"):
            return argv
    return None


def resume_auto(words: Sequence[str]) -> list[str]:
    """``words`` with any ``--resume X`` / ``--resume=X`` replaced by one ``--resume auto`` at the end."""
    out: list[str] = []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word == "--resume":
            skip = True
        elif not word.startswith("--resume="):
            out.append(word)
    return [*out, "--resume", "auto"]
