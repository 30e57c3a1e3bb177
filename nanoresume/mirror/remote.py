"""The mirror of one run: what is uploaded where, in which order, how each upload is checked, the
pointer written last, and retention. Downloading is :mod:`.restore`'s business.

The mirror holds the run folder's layout below its URL::

    URL/checkpoints/step_00000040.pt               or  URL/checkpoints/step_00000040/ (MANIFEST.sha256 last)
    URL/LATEST.json                                  the pointer: the newest checkpoint uploaded and checked
    URL/best.pt (+ .sha256), config.json, metrics.jsonl, tb/..., exit_code

Call ``Mirror(url, options).probe()`` at start-up; then (from one thread, the :class:`~.uploader.Uploader`)
``upload_extras(out_dir)``, ``upload_checkpoint(path, step)`` and ``prune(keep_last, protect)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from ..atomic import is_temp_path
from ..checkpoint.fileformat import COMMENT_LEN, MAGIC
from ..checkpoint.files import CHECKSUM_SUFFIX, STEP_FOLDER_PATTERN, STEP_PATTERN
from ..checkpoint.folders import MANIFEST, manifest_digests
from .. import rundir
from ..rundir import RunDir
from .store import MirrorError, Store, crc32_reported, md5_reported

POINTER = "LATEST.json"
RUN_CONFIG = rundir.CONFIG
RUN_IDENTITY = "RUN.json"  # what the run mirrored here trains: its data fingerprint and model shape
CHECKPOINTS = rundir.CHECKPOINTS
POINTER_FORMAT = 1
# What is compared byte for byte where the store reports no MD5: an object's last 64 KiB (a whole
# small file; for a checkpoint file, the trailer holding the digest of every byte before it).
TAIL_BYTES = 64 << 10
# s3fs uploads a file in one PUT below twice its part size, else in parts of this size; S3's ETag is
# then the MD5 of the bytes, or the MD5 of the parts' MD5s followed by "-<parts>".
_S3_PART = 50 << 20
_HASH_BLOCK = 8 << 20
ONE_PUT_BYTES = 2 * _S3_PART  # on an object store, files below this go up in one PUT from memory, as in s3fs


class UploadMismatch(OSError):
    """An object on the mirror does not match the local file it was uploaded from (retried)."""


class LocalGone(Exception):
    """The local file to upload was deleted before the upload began (pruned, or superseded)."""


@dataclass(frozen=True)
class Pointer:
    """``LATEST.json``: the newest checkpoint uploaded and checked. ``digest`` is the digest a step file
    carries in its trailer, or the SHA-256 of a folder's manifest; ``size`` is bytes in all."""

    step: int
    name: str  # relative to the mirror's root: checkpoints/step_00000040.pt or checkpoints/step_00000040
    kind: str  # "file" or "folder"
    size: int
    digest: str

    def to_bytes(self) -> bytes:
        return (json.dumps({"format": POINTER_FORMAT, **asdict(self)}, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Pointer":
        """Raises ValueError for anything that is not a pointer this version writes."""
        record = json.loads(data)
        if not isinstance(record, dict) or record.get("format") != POINTER_FORMAT:
            raise ValueError("not a nanoresume pointer of format 1")
        pointer = cls(step=record["step"], name=record["name"], kind=record["kind"], size=record["size"],
                      digest=record["digest"])
        if (not isinstance(pointer.step, int) or not isinstance(pointer.size, int) or pointer.kind not in
                ("file", "folder") or not isinstance(pointer.name, str) or not isinstance(pointer.digest, str)):
            raise ValueError("a field of the wrong type")
        folder, _, base = pointer.name.rpartition("/")
        match = (STEP_PATTERN if pointer.kind == "file" else STEP_FOLDER_PATTERN).match(base)
        if folder != CHECKPOINTS or not match or int(match.group(1)) != pointer.step:
            raise ValueError(f"it names {pointer.name[:80]!r}, not the {pointer.kind} of step {pointer.step} "
                             f"under {CHECKPOINTS}/")
        return pointer


@dataclass(frozen=True)
class RemoteCheckpoint:
    """A step checkpoint listed on the mirror (not yet checked)."""

    step: int
    name: str  # relative to the mirror's root
    kind: str  # "file" or "folder"
    size: Optional[int]  # a file's size as listed; None for a folder


class Mirror:
    """A run's mirror at ``url`` (a folder or any fsspec URL; ``options`` are fsspec storage options).

    Constructing it opens the filesystem (a missing extra is a :class:`~.store.MirrorError`);
    :meth:`probe` proves it is writable. Not thread-safe: one thread uploads.
    """

    def __init__(self, url: str, options: Optional[dict[str, Any]] = None) -> None:
        self.store = Store(url, options)
        self.url = self.store.url
        self._sent: dict[str, tuple[int, int]] = {}  # extra's name -> (size, mtime_ns) last uploaded
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="nanoresume-mirror-md5")

    def probe(self) -> None:
        """Write and delete a small object; raises MirrorError in one line if the mirror cannot work."""
        self.store.probe()

    def close(self) -> None:
        self._hasher.shutdown(wait=True)

    # ---- uploading -------------------------------------------------------------------------------

    def upload_checkpoint(self, local: Path, step: int) -> Pointer:
        """Upload a committed step file or folder (every file, its manifest last),
        check every object, then write the pointer. Returns the pointer written.

        Raises LocalGone if ``local`` vanished first (pruned locally: a newer one is on its way),
        UploadMismatch if an object does not match, and the store's own errors otherwise.
        """
        local = Path(local)
        if local.is_dir():
            name = f"{CHECKPOINTS}/{local.name}"
            try:
                listed = manifest_digests(local)
            except FileNotFoundError:
                raise LocalGone(str(local)) from None
            size = 0
            for file in sorted(listed):
                size += self._upload_checked(local / file, f"{name}/{file}")
            manifest = (local / MANIFEST).read_bytes()
            size += self._upload_checked(local / MANIFEST, f"{name}/{MANIFEST}")
            pointer = Pointer(step, name, "folder", size, hashlib.sha256(manifest).hexdigest())
        else:
            name = f"{CHECKPOINTS}/{local.name}"
            try:
                digest = embedded_digest(local)
            except FileNotFoundError:
                raise LocalGone(str(local)) from None
            size = self._upload_checked(local, name)  # not its .sha256: the file verifies by itself
            pointer = Pointer(step, name, "file", size, digest or "")
        self.write_pointer(pointer)
        return pointer

    def write_pointer(self, pointer: Pointer) -> None:
        """Write ``LATEST.json`` and check it like any upload (size, and the MD5 the store reports or
        its bytes read back)."""
        data = pointer.to_bytes()
        if self.check_answer(POINTER, data, self.store.put_bytes(data, POINTER)) is not None:
            return
        found = self.store.info(POINTER)
        reported = md5_reported(found) if found is not None else None
        if found is None or int(found.get("size", -1)) != len(data) or (
                reported != hashlib.md5(data).hexdigest() if reported is not None
                else self.store.read(POINTER) != data):
            raise UploadMismatch(f"{self.store.where(POINTER)}: does not match what was written")

    def upload_extras(self, out_dir: Path) -> list[str]:
        """Upload what changed since the last call among ``best.pt`` (+ ``.sha256``), ``config.json``,
        ``metrics.jsonl``, the TensorBoard event files and ``exit_code``; returns the names uploaded.
        Files that grow while training runs are uploaded from a snapshot copy."""
        run = RunDir(Path(out_dir))
        files = [run.best, run.best.with_name(run.best.name + CHECKSUM_SUFFIX), run.config, run.metrics,
                 run.exit_code]
        if run.tensorboard.is_dir():
            files += sorted(p for p in run.tensorboard.rglob("*") if p.is_file() and not p.name.startswith("."))
        uploaded = []
        for file in files:
            try:
                stat = file.stat()
            except FileNotFoundError:
                continue
            name = file.relative_to(run.root).as_posix()
            signature = (stat.st_size, stat.st_mtime_ns)
            if self._sent.get(name) == signature:
                continue
            try:
                if file == run.best:
                    self._upload_checked(file, name)  # committed by a rename: its bytes never change in place
                else:
                    with tempfile.TemporaryDirectory(prefix="nanoresume-mirror-") as scratch:
                        snapshot = Path(scratch) / file.name
                        shutil.copyfile(file, snapshot)
                        self._upload_checked(snapshot, name)
            except (LocalGone, FileNotFoundError):
                if file.exists():
                    raise
                continue  # replaced or removed just now: the next call uploads what is there then
            self._sent[name] = signature
            uploaded.append(name)
        return uploaded

    def _upload_checked(self, local: Path, name: str) -> int:
        """Upload one file and check the object; returns its size."""
        try:
            size = local.stat().st_size
        except FileNotFoundError:
            raise LocalGone(str(local)) from None
        if not self.store.is_path and size < ONE_PUT_BYTES:  # from memory, as s3fs's put_file would anyway
            try:
                data = local.read_bytes()
            except FileNotFoundError:
                raise LocalGone(str(local)) from None
            answer = self.store.put_bytes(data, name)
            if self.check_answer(name, data, answer) is None:  # the answer said nothing: ask the store
                expected = hashlib.md5(data).hexdigest() if self.store.reports_md5 else None
                self.check_object(local, name, len(data), expected, data)
            return len(data)
        md5: Optional[Future] = self._hasher.submit(local_md5, local, size) if self.store.reports_md5 else None
        try:
            self.store.put_file(local, name)
        except FileNotFoundError:
            if not local.exists():
                raise LocalGone(str(local)) from None
            raise
        finally:
            expected = _result_or_none(md5)
        self.check_object(local, name, size, expected)
        return size

    def check_answer(self, name: str, data: bytes, answer: Optional[dict[str, Any]]) -> Optional[str]:
        """Check a PUT by what the store answered about the bytes it stored: S3's CRC32 (the flexible
        checksum botocore sends and S3 validates; cheap to compute here) or else its ETag, the MD5.
        Returns what was checked, None if the answer says nothing; raises UploadMismatch."""
        where = self.store.where(name)
        crc = crc32_reported(answer) if answer is not None else None
        if crc is not None:
            mine = zlib.crc32(data)
            if crc != mine:
                raise UploadMismatch(f"{where}: the store holds bytes whose CRC32 ({crc:08x}) differs from the "
                                     f"local file's ({mine:08x})")
            return "CRC32 of the bytes stored"
        md5 = md5_reported(answer) if answer is not None else None
        if md5 is not None and "-" not in md5:
            mine_md5 = hashlib.md5(data).hexdigest()
            if md5 != mine_md5:
                raise UploadMismatch(f"{where}: the store holds bytes whose MD5 ({md5}) differs from the local "
                                     f"file's ({mine_md5})")
            return "MD5 of the bytes stored"
        return None

    def check_object(self, local: Path, name: str, size: int, expected_md5: Optional[str],
                     data: Optional[bytes] = None) -> str:
        """Check an uploaded object against the local file by asking the store; returns what was checked,
        raises UploadMismatch.

        - the size the store reports (``info``), and where it reports an MD5 (S3's ETag of a PUT or of a
          multipart upload in s3fs's parts, GCS's md5Hash), that MD5 against the local file's;
        - otherwise (a path, memory://, a multipart upload in other parts): the object's last 64 KiB read
          back and compared byte for byte; that is all of a small file and, for a checkpoint file, the
          trailer holding the digest of every byte before it.
        """
        where = self.store.where(name)
        found = self.store.info(name)
        if found is None:
            raise UploadMismatch(f"{where}: missing right after its upload")
        if int(found.get("size", -1)) != size:
            raise UploadMismatch(f"{where}: holds {found.get('size')} bytes, the local file {size}")
        reported = md5_reported(found)
        if reported is not None and expected_md5 is not None and _comparable(reported, expected_md5):
            if reported != expected_md5:
                raise UploadMismatch(f"{where}: its MD5 ({reported}) differs from the local file's ({expected_md5})")
            return "size and MD5"
        start = max(0, size - TAIL_BYTES)
        if data is not None:  # the bytes that were sent (``local`` may have been replaced since)
            mine = data[start:]
        else:
            with open(local, "rb") as f:
                f.seek(start)
                mine = f.read()
        if self.store.read(name, start, size) != mine:
            raise UploadMismatch(f"{where}: its last {size - start} bytes differ from the local file's")
        return "size and last bytes"

    # ---- reading the mirror's state --------------------------------------------------------------

    def pointer(self) -> Optional[Pointer]:
        """The pointer, or None if there is none; ValueError if it is unreadable."""
        try:
            return Pointer.from_bytes(self.store.read(POINTER))
        except FileNotFoundError:
            return None

    def checkpoints(self) -> list[RemoteCheckpoint]:
        """Step files and folders under ``checkpoints/``, oldest first (nothing is checked here)."""
        found = []
        for base, info in self.store.list(CHECKPOINTS).items():
            is_folder = info.get("type") == "directory"
            match = (STEP_FOLDER_PATTERN if is_folder else STEP_PATTERN).match(base)
            if match:
                found.append(RemoteCheckpoint(int(match.group(1)), f"{CHECKPOINTS}/{base}",
                                              "folder" if is_folder else "file",
                                              None if is_folder else int(info.get("size") or 0)))
        return sorted(found, key=lambda c: (c.step, c.kind))

    def run_config(self) -> Optional[dict[str, Any]]:
        """The ``config.json`` the mirror holds (the run it belongs to), or None; for refusing a mirror
        that holds another run. ValueError if it is not JSON."""
        try:
            found = json.loads(self.store.read(RUN_CONFIG))
        except FileNotFoundError:
            return None
        if not isinstance(found, dict):
            raise ValueError(f"{self.store.where(RUN_CONFIG)} does not hold a JSON object")
        return found

    def claim(self, identity: dict[str, Any]) -> None:
        """Record ``identity`` (what makes a run the same run: its data fingerprint, its model's shape)
        as the run this mirror holds, or raise MirrorError if it holds another one. A mirror is one
        run's: checkpoints of two runs under one pointer could not be told apart."""
        try:
            held = json.loads(self.store.read(RUN_IDENTITY))
        except FileNotFoundError:
            held = None
        except ValueError:
            held = {}
        if held is None:
            data = (json.dumps(identity, sort_keys=True) + "\n").encode()
            self.store.put_bytes(data, RUN_IDENTITY)
            return
        def shown(value: Any) -> str:
            return repr(value[:12] if isinstance(value, str) and len(value) > 40 else value)

        differences = [f"{key} {shown(held.get(key) if isinstance(held, dict) else None)} there, {shown(value)} here"
                       for key, value in identity.items() if not isinstance(held, dict) or held.get(key) != value]
        if differences:
            raise MirrorError(f"--mirror {self.url} holds another run ({'; '.join(differences)}); choose another "
                              f"--mirror for this run, or resume that run with its data and model settings")

    def remove_leftovers(self) -> list[str]:
        """On a path mirror, delete the temp files of uploads a kill interrupted (``.name.tmp.<pid>``);
        returns their names. An object store has none to delete: an upload that never completed is not
        visible (a bucket lifecycle rule that aborts incomplete multipart uploads frees their parts)."""
        if not self.store.is_path:
            return []
        removed = []
        for name in self.store.walk_files(""):
            if is_temp_path(Path(name)):
                self.store.remove(name)
                removed.append(name)
        return removed

    # ---- retention -------------------------------------------------------------------------------

    def prune(self, keep_last: int, protect: Iterable[int] = ()) -> list[str]:
        """Delete old step checkpoints on the mirror, only below the pointer's step: keeps the newest
        ``keep_last`` up to the pointer, the pointer's own checkpoint and every step in ``protect`` (the
        one the run resumed from). ``best.pt`` and the other files are never touched. Returns the names
        deleted. Does nothing without a readable pointer."""
        try:
            pointer = self.pointer()
        except ValueError:
            return []
        if pointer is None:
            return []
        committed = [c for c in self.checkpoints() if c.step <= pointer.step]
        newest = sorted({c.step for c in committed})[-max(1, keep_last):]
        keep = set(newest) | {pointer.step} | set(protect)
        deleted = []
        for old in committed:
            if old.step in keep:
                continue
            if old.kind == "folder":
                self.store.remove(f"{old.name}/{MANIFEST}")  # uncommitted first, then its files
                self.store.remove_tree(old.name)
            else:
                self.store.remove(old.name)
            deleted.append(old.name)
        return deleted


def embedded_digest(path: Path) -> Optional[str]:
    """The digest a checkpoint file carries in its trailer (not checked here), or None."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() < COMMENT_LEN:
            return None
        f.seek(-COMMENT_LEN, 2)
        tail = f.read()
    if not tail.startswith(MAGIC):
        return None
    return tail[len(MAGIC):].decode("ascii", errors="replace").lower()


def local_md5(path: Path, size: int) -> Optional[str]:
    """The MD5 S3 reports for ``path`` once s3fs has uploaded it: of the bytes, or of its parts' MD5s."""
    try:
        with open(path, "rb") as f:
            if size < 2 * _S3_PART:
                whole = hashlib.md5()
                while block := f.read(_HASH_BLOCK):
                    whole.update(block)
                return whole.hexdigest()
            parts = []
            for _ in range(math.ceil(size / _S3_PART)):
                part = hashlib.md5()
                left = _S3_PART
                while left and (block := f.read(min(_HASH_BLOCK, left))):
                    part.update(block)
                    left -= len(block)
                parts.append(part.digest())
            return f"{hashlib.md5(b''.join(parts)).hexdigest()}-{len(parts)}"
    except OSError:
        return None


def _comparable(reported: str, expected: str) -> bool:
    """Both plain MD5s, or both multipart ETags of the same number of parts."""
    return reported.partition("-")[2] == expected.partition("-")[2]


def _result_or_none(job: Optional[Future]) -> Optional[str]:
    if job is None:
        return None
    try:
        return job.result()
    except Exception:
        return None
