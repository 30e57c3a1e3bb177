"""Run as ``python -m tests.mirror.slow_upload URL OPTIONS_JSON CHECKPOINT STARTED``: upload CHECKPOINT to
the mirror slowly (a few KB at a time), touching STARTED once the first bytes are out, so that a test can
SIGKILL the process in the middle of an upload. Object stores get the bytes through a streamed
(multipart) write, a path mirror through its own temp-file copy."""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from pathlib import Path

from nanoresume.mirror import Mirror

_PART = 5 << 20  # the smallest part of an S3 multipart upload


def main(url: str, options: str, checkpoint: str, started: str) -> None:
    mirror = Mirror(url, json.loads(options))
    marker = Path(started)
    # A path mirror: STARTED after the first 64 KB. An object store: after the first part went up.
    piece, started_after = (64 << 10, 0) if mirror.store.is_path else (1 << 20, _PART + (1 << 20))

    def trickle(source, target) -> None:
        written = 0
        while chunk := source.read(piece):
            target.write(chunk)
            target.flush()
            written += len(chunk)
            if written > started_after:
                marker.touch()
            time.sleep(0.1)

    if mirror.store.is_path:
        def slow_copy(src, dst, **kwargs):
            with open(src, "rb") as source, open(dst, "wb") as target:
                trickle(source, target)

        shutil.copyfile = slow_copy
    else:
        def slow_put(data: bytes, name: str):
            with mirror.store.fs.open(mirror.store.key(name), "wb", block_size=_PART) as target:
                trickle(io.BytesIO(data), target)

        mirror.store.put_bytes = slow_put
    path = Path(checkpoint)
    mirror.upload_checkpoint(path, int(path.stem.split("_")[1]))


if __name__ == "__main__":
    main(*sys.argv[1:])
