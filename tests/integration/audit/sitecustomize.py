"""Loaded by every Python process started with this folder on PYTHONPATH (the distributed tests
put it there for torchrun's workers): records, per rank, every file or folder the process creates,
writes, renames or removes under $NANORESUME_AUDIT_WATCH, into $NANORESUME_AUDIT_LOG.rank<r>."""

import os
import sys

_watch = os.environ.get("NANORESUME_AUDIT_WATCH")
_log = os.environ.get("NANORESUME_AUDIT_LOG")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.link", "os.symlink", "shutil.rmtree"}

if _watch and _log:
    _watch = os.path.realpath(_watch)
    _rank = os.environ.get("RANK", "single")

    def _under_watch(path: object) -> bool:
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(_watch)
        except (TypeError, ValueError):
            return False

    def _audit(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            if not writing or path is None or isinstance(path, int) or not _under_watch(path):
                return
        elif event in _EVENTS:
            if not any(_under_watch(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
                return
        else:
            return
        with open(f"{_log}.rank{_rank}", "a") as f:  # not under the watched folder: no recursion
            f.write(f"{event} {args[0]!r}\n")

    sys.addaudithook(_audit)
