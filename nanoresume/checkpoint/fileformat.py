"""A checkpoint file that verifies on its own: torch's zip archive with its SHA-256 in the zip comment.

``torch.save`` writes a zip archive. Its last record (the end of the central
directory) ends with a 2-byte comment length, which torch leaves at 0. While the
file streams out, the writer holds those 2 bytes back and writes instead a fixed
82-byte comment holding the SHA-256 of everything before them::

    [ torch.save output without its last 2 bytes ][ 82 as uint16 LE ][ b"nanoresume-sha256:" + 64 hex ]

The result is still an ordinary zip, so ``torch.load``, ``zipfile`` and ``unzip``
read it unchanged, and it can be checked without any other file: a copy, a
rename or an upload stays verifiable. One pass of SHA-256 gives both that
embedded digest and the digest of the whole file (for the ``.sha256`` sidecar
that ``sha256sum -c`` reads), because a SHA-256 state can be copied mid-stream.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import io
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Union

MAGIC = b"nanoresume-sha256:"
COMMENT_LEN = len(MAGIC) + 64
TRAILER_LEN = 2 + COMMENT_LEN  # the comment-length field plus the comment
_EOCD_SIGNATURE = b"PK\x05\x06"
_EOCD_LEN = 22  # end-of-central-directory record without its comment; the length field is its last 2 bytes
_PARALLEL_HASH_BYTES = 1 << 20  # chunks this large are hashed in a second thread while the first writes them
_WRITEBACK_EVERY = 16 << 20  # ask the kernel to start writing dirty pages back every this many bytes

Buffer = Union[bytes, bytearray, memoryview]


class NotAZipError(ValueError):
    """What ``torch.save`` produced does not end in a zip end-of-central-directory record."""


class DigestingWriter:
    """The file object ``torch.save`` writes into: passes bytes on to ``file``, hashes them, and
    replaces the zip comment at the end with the embedded digest (see the module docstring).

    Large chunks are hashed in a helper thread while this thread writes them (hashlib and file
    writes both release the GIL), so hashing adds little to the time of the write itself. Call
    :meth:`finish` after ``torch.save`` returns; it writes the trailer and returns
    ``(embedded digest, whole-file digest)``.
    """

    def __init__(self, file: io.BufferedWriter, on_progress: Optional[Callable[[int], None]] = None) -> None:
        self.file = file
        self.on_progress = on_progress
        self.written = 0
        self.error: Optional[BaseException] = None  # torch's C++ writer replaces exceptions with its own
        self._hash = hashlib.sha256()
        self._held = b""  # the last 2 bytes seen so far: the zip comment length, replaced by finish()
        self._tail = b""  # the last 22 bytes seen so far, to check that they are a zip's final record
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanoresume-sha256")
        self._writeback = _Writeback(file)

    def write(self, data: Buffer) -> int:
        try:
            view = memoryview(data).cast("B")
            size = len(view)
            if size >= 2:
                self._emit(memoryview(self._held))
                self._emit(view[:-2])
                self._held = bytes(view[-2:])
            else:
                both = self._held + bytes(view)
                self._emit(memoryview(both[:-2]))
                self._held = both[-2:]
            self._tail = (self._tail + bytes(view[-_EOCD_LEN:]))[-_EOCD_LEN:]
            if self.on_progress is not None:
                self.on_progress(self.written)
            return size
        except BaseException as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()

    def _emit(self, view: memoryview) -> None:
        if not view:
            return
        if len(view) >= _PARALLEL_HASH_BYTES:
            hashed = self._hasher.submit(self._hash.update, view)
            try:
                self.file.write(view)
            finally:
                hashed.result()  # before returning: torch may reuse the buffer behind ``view``
        else:
            self._hash.update(view)
            self.file.write(view)
        self.written += len(view)
        self._writeback.advance(self.written)

    def finish(self) -> tuple[str, str]:
        """Write the trailer; returns (embedded digest, SHA-256 of the whole file)."""
        self._hasher.shutdown()
        if self._held != b"\x00\x00" or not self._tail.startswith(_EOCD_SIGNATURE):
            raise NotAZipError("torch.save did not end its output with an empty zip comment")
        embedded = self._hash.hexdigest()
        trailer = struct.pack("<H", COMMENT_LEN) + MAGIC + embedded.encode()
        self.file.write(trailer)
        whole = self._hash.copy()
        whole.update(trailer)
        self.written += len(trailer)
        return embedded, whole.hexdigest()

    def close(self) -> None:
        self._hasher.shutdown()


@dataclass(frozen=True)
class Digests:
    """What one pass over a file's bytes found."""

    whole: str  # SHA-256 of every byte, as ``sha256sum`` prints it
    embedded: Optional[str]  # the digest the file carries, or None for a file without a trailer
    computed: Optional[str]  # the digest of the bytes the embedded one covers

    @property
    def has_trailer(self) -> bool:
        return self.embedded is not None

    @property
    def self_consistent(self) -> bool:
        return self.embedded is not None and self.embedded == self.computed


def digests(data: Buffer) -> Digests:
    """Hash ``data`` (a whole file, e.g. a memory map) once; read its embedded digest if it has one."""
    view = memoryview(data).cast("B")
    size = len(view)
    comment_start = size - COMMENT_LEN
    has_trailer = (
        size >= _EOCD_LEN + COMMENT_LEN
        and view[comment_start:comment_start + len(MAGIC)] == MAGIC
        and view[size - TRAILER_LEN:comment_start] == struct.pack("<H", COMMENT_LEN)
        and view[size - TRAILER_LEN - (_EOCD_LEN - 2):size - TRAILER_LEN - (_EOCD_LEN - 6)] == _EOCD_SIGNATURE
    )
    if not has_trailer:
        return Digests(whole=hashlib.sha256(view).hexdigest(), embedded=None, computed=None)
    covered = hashlib.sha256(view[:size - TRAILER_LEN])
    whole = covered.copy()
    whole.update(view[size - TRAILER_LEN:])
    embedded = bytes(view[size - 64:]).decode("ascii", errors="replace").lower()
    return Digests(whole=whole.hexdigest(), embedded=embedded, computed=covered.hexdigest())


class _Writeback:
    """Starts the kernel's write-back of a file's dirty pages as it grows (Linux ``sync_file_range``),
    so the final fsync finds little left to do. A no-op where the call does not exist."""

    _SYNC_FILE_RANGE_WRITE = 2
    _libc: Optional[ctypes.CDLL] = None
    _looked_up = False

    def __init__(self, file: io.BufferedWriter) -> None:
        self.file = file
        self.started_at = 0

    @classmethod
    def _sync_file_range(cls) -> Optional[Callable[..., int]]:
        if not cls._looked_up:
            cls._looked_up = True
            try:
                cls._libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
                cls._libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            except (OSError, AttributeError):
                cls._libc = None
        return cls._libc.sync_file_range if cls._libc is not None else None

    def advance(self, written: int) -> None:
        if written - self.started_at < _WRITEBACK_EVERY:
            return
        call = self._sync_file_range()
        if call is not None:
            self.file.flush()
            call(self.file.fileno(), self.started_at, written - self.started_at, self._SYNC_FILE_RANGE_WRITE)
        self.started_at = written
