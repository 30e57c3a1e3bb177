"""A checkpoint file that verifies on its own: torch's zip archive with its digest in the zip comment.

``torch.save`` writes a zip archive. Its last record (the end of the central
directory) ends with a 2-byte comment length, which torch leaves at 0. While the
file streams out, the writer holds those 2 bytes back and writes instead the
length of, and a comment holding, the digest of everything before them::

    [ torch.save output without its last 2 bytes ][ comment length, uint16 LE ][ MAGIC + 64 hex ]

The result is still a zip that ``torch.load`` reads unchanged, and it can be checked
without any other file: a copy, a rename or an upload stays verifiable.

The digest is SHA-256 in a tree of one level: the SHA-256 of each 8 MiB chunk, then the
SHA-256 of a header, the length and those chunk digests. Chunks are independent, so
checking hashes on two cores (SHA-256 runs at about 1.8 GB/s per core, which alone would
make verifying a checkpoint slower than reading it). Writing hashes on a helper thread
while this one writes; it gains less, because torch.save hands over one tensor per call
(a few MB) and each call must be hashed before it returns. Smaller chunks were tried: 1 MiB
hashed more in parallel at best, but the many hand-overs of Python's GIL made some saves
take twice as long.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Callable, Optional, Union

MAGIC = b"nanoresume-sha256x8MiB:"
COMMENT_LEN = len(MAGIC) + 64
TRAILER_LEN = 2 + COMMENT_LEN  # the comment-length field plus the comment
CHUNK = 8 << 20  # bytes per leaf of the digest tree
_TREE_HEADER = b"nanoresume sha256 tree v1\0"
_HASH_THREADS = 2
_EOCD_SIGNATURE = b"PK\x05\x06"
_EOCD_LEN = 22  # end-of-central-directory record without its comment; the length field is its last 2 bytes
_PARALLEL_HASH_BYTES = 1 << 20  # pieces this large are hashed on a helper thread while this one writes
_WRITEBACK_EVERY = 16 << 20  # ask the kernel to start writing dirty pages back every this many bytes

Buffer = Union[bytes, bytearray, memoryview]


class NotAZipError(ValueError):
    """What ``torch.save`` produced does not end in a zip end-of-central-directory record."""


def _sha256(data: memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def tree_digest(chunk_digests: list[bytes], length: int) -> str:
    """The digest of ``length`` bytes whose 8 MiB chunks have the SHA-256s ``chunk_digests``."""
    root = hashlib.sha256(_TREE_HEADER + struct.pack("<Q", length))
    for digest in chunk_digests:
        root.update(digest)
    return root.hexdigest()


class DigestingWriter:
    """The file object ``torch.save`` writes into: passes bytes on to ``file``, hashes them chunk
    by chunk on helper threads while this thread writes them (hashlib and file writes both
    release the GIL), and replaces the zip comment at the end with the digest (see the module
    docstring). Call :meth:`finish` after ``torch.save`` returns; it writes the trailer and
    returns the digest.
    """

    def __init__(self, file: IO[bytes], on_progress: Optional[Callable[[int], None]] = None) -> None:
        self.file = file
        self.on_progress = on_progress
        self.written = 0
        self.error: Optional[BaseException] = None  # torch's C++ writer replaces exceptions with its own
        self._chunks: list[Union[Future, "hashlib._Hash"]] = []  # per chunk: a digest to come, or a hasher
        self._open: Optional["hashlib._Hash"] = None  # the hasher of the chunk being filled
        self._open_len = 0
        self._held = b""  # the last 2 bytes seen so far: the zip comment length, replaced by finish()
        self._tail = b""  # the last 22 bytes seen so far, to check that they are a zip's final record
        self._pool = ThreadPoolExecutor(max_workers=_HASH_THREADS, thread_name_prefix="nanoresume-sha256")
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
        """Write ``view`` and hash it into the chunks; returns once nothing refers to ``view`` (torch
        may reuse the buffer behind it)."""
        if not view:
            return
        pending: list[Future] = []
        position, size = 0, len(view)
        while position < size:
            if self._open is None and size - position >= CHUNK:  # a whole chunk: hashed on its own
                job = self._pool.submit(_sha256, view[position:position + CHUNK])
                self._chunks.append(job)
                pending.append(job)
                position += CHUNK
                continue
            if self._open is None:
                self._open, self._open_len = hashlib.sha256(), 0
                self._chunks.append(self._open)
            piece = view[position:position + min(CHUNK - self._open_len, size - position)]
            if len(piece) >= _PARALLEL_HASH_BYTES:
                pending.append(self._pool.submit(self._open.update, piece))
            else:
                self._open.update(piece)
            self._open_len += len(piece)
            position += len(piece)
            if self._open_len == CHUNK:
                self._open = None
        try:
            self.file.write(view)
        finally:
            for job in pending:
                job.result()
        self.written += size
        self._writeback.advance(self.written)

    def finish(self) -> str:
        """Write the trailer; returns the digest it holds."""
        self._pool.shutdown()
        if self._held != b"\x00\x00" or not self._tail.startswith(_EOCD_SIGNATURE):
            raise NotAZipError("torch.save did not end its output with an empty zip comment")
        leaves = [chunk.result() if isinstance(chunk, Future) else chunk.digest() for chunk in self._chunks]
        digest = tree_digest(leaves, self.written)
        self.file.write(struct.pack("<H", COMMENT_LEN) + MAGIC + digest.encode())
        return digest

    def close(self) -> None:
        self._pool.shutdown()


@dataclass(frozen=True)
class Digests:
    """What a file's bytes say about themselves."""

    embedded: Optional[str]  # the digest the file carries, or None for a file without a trailer
    computed: Optional[str]  # the digest of the bytes it covers, computed now
    whole: Optional[str] = None  # SHA-256 of every byte, only for a file without a trailer (its .sha256)

    @property
    def has_trailer(self) -> bool:
        return self.embedded is not None

    @property
    def self_consistent(self) -> bool:
        return self.embedded is not None and self.embedded == self.computed


def digests(data: Buffer) -> Digests:
    """Check a whole file's bytes (e.g. a memory map): its embedded digest if it has one, hashed on
    every core; else the plain SHA-256 that a ``.sha256`` file beside it would list."""
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
        return Digests(embedded=None, computed=None, whole=hashlib.sha256(view).hexdigest())
    covered = size - TRAILER_LEN
    pieces = [view[start:min(start + CHUNK, covered)] for start in range(0, covered, CHUNK)]
    with ThreadPoolExecutor(max_workers=_HASH_THREADS, thread_name_prefix="nanoresume-verify") as pool:
        leaves = list(pool.map(_sha256, pieces))
    embedded = bytes(view[size - 64:]).decode("ascii", errors="replace").lower()
    return Digests(embedded=embedded, computed=tree_digest(leaves, covered))


class _Writeback:
    """Starts the kernel's write-back of a file's dirty pages as it grows (Linux ``sync_file_range``),
    so the final fsync finds little left to do. A no-op where the call does not exist."""

    _SYNC_FILE_RANGE_WRITE = 2
    _libc: Optional[ctypes.CDLL] = None
    _looked_up = False

    def __init__(self, file: IO[bytes]) -> None:
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
            try:
                fileno = self.file.fileno()
            except (OSError, ValueError):  # not a file on this machine (an upload): nothing to write back
                fileno = None
            if fileno is not None:
                self.file.flush()
                call(fileno, self.started_at, written - self.started_at, self._SYNC_FILE_RANGE_WRITE)
        self.started_at = written
