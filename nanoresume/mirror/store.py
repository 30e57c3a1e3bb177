"""The storage seam of the mirror: whole objects under keys below one URL, on any fsspec filesystem.

``Store(url, options)`` opens ``url`` with ``fsspec.core.url_to_fs(url, **options)``: a local path (a
mounted Drive, NFS, any folder), ``s3://bucket/prefix`` (any S3-compatible endpoint through
``client_kwargs={"endpoint_url": ...}`` or ``AWS_ENDPOINT_URL``), ``gs://``, ``memory://``. Keys are
relative, ``/``-separated names such as ``checkpoints/step_00000040.pt``.

How an object appears whole or not at all:

- an object store (S3, GCS, memory): one PUT, or a multipart upload that becomes visible only when it
  completes; there is no rename to rely on, and none is used;
- a path: the bytes go to ``.name.tmp.<pid>`` beside the target, are fsynced, renamed onto the name,
  and the folder is fsynced where the filesystem allows it (a FUSE mount may refuse; the rename still
  makes the name appear whole).

Every failure a user can fix up front (no credentials, no bucket, a read-only folder, a missing
extra) becomes a one-line :class:`MirrorError` through :func:`describe_failure`.
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

from ..atomic import fsync_folder, remove_quietly, temp_path
from ..errors import UserError

# Protocols whose back-end ships in an extra of ours, and the extra's name.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
_PATH_PROTOCOLS = ("file", "local")


class MirrorError(UserError):
    """The mirror cannot be used as given (exit 2); the message names the URL and the fix."""


class Store:
    """Whole objects under ``url``. Not thread-safe: one thread (the uploader, or start-up) uses it."""

    def __init__(self, url: str, options: Optional[dict[str, Any]] = None) -> None:
        self.url = str(url)
        self.options = dict(options or {})
        try:
            import fsspec.core

            self.fs, root = fsspec.core.url_to_fs(self.url, **self.options)
        except Exception as e:  # ImportError for a missing back-end, ValueError for an unknown protocol
            raise MirrorError(describe_failure(self.url, e)) from None
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.protocol = protocols[0]
        self.is_path = any(p in _PATH_PROTOCOLS for p in protocols)
        self.root = root.rstrip("/")

    # ---- names -----------------------------------------------------------------------------------

    def key(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root or "/"

    def where(self, name: str) -> str:
        """``name`` as the user would write it: the URL and the key."""
        return f"{self.url.rstrip('/')}/{name}"

    @property
    def reports_md5(self) -> bool:
        """Whether ``info`` reports an MD5 of the bytes (S3's ETag, GCS's md5Hash), worth computing locally."""
        return self.protocol in ("s3", "s3a", "gs", "gcs")

    # ---- writing ---------------------------------------------------------------------------------

    def put_file(self, local: Path, name: str) -> None:
        """Upload ``local`` under ``name``, whole or not at all (see the module docstring)."""
        if self.is_path:
            target = Path(self.key(name))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_path(target)
            try:
                shutil.copyfile(local, tmp)
                _fsync_path(tmp)
                os.replace(tmp, target)
            except BaseException:
                remove_quietly(tmp)
                raise
            _fsync_folder_quietly(target.parent)
        else:
            self.fs.put_file(str(local), self.key(name))

    def put_bytes(self, data: bytes, name: str) -> Optional[dict[str, Any]]:
        """Write ``data`` under ``name``, whole or not at all. Returns the store's answer where it gives one
        (S3's PUT answers with the ETag and the CRC32 of the bytes it stored), else None."""
        if self.is_path:
            target = Path(self.key(name))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_path(target)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    _fsync_quietly(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                remove_quietly(tmp)
                raise
            _fsync_folder_quietly(target.parent)
            return None
        answer = self.fs.pipe_file(self.key(name), data)
        return answer if isinstance(answer, dict) else None

    def remove(self, name: str) -> None:
        """Delete one object; a missing one is not an error."""
        try:
            self.fs.rm_file(self.key(name))
        except FileNotFoundError:
            pass

    def remove_tree(self, name: str) -> None:
        """Delete a folder and everything below it; a missing one is not an error."""
        try:
            self.fs.rm(self.key(name), recursive=True)
        except FileNotFoundError:
            pass

    # ---- reading ---------------------------------------------------------------------------------

    def info(self, name: str) -> Optional[dict[str, Any]]:
        """What the store reports about an object (``size`` at least), or None if it is missing."""
        try:
            found = self.fs.info(self.key(name))
        except FileNotFoundError:
            return None
        return found if found.get("type", "file") == "file" else None

    def read(self, name: str, start: Optional[int] = None, end: Optional[int] = None) -> bytes:
        return self.fs.cat_file(self.key(name), start=start, end=end)

    def get_file(self, name: str, local: Path) -> None:
        """Download ``name`` to ``local`` (the caller picks a temp name, verifies and commits)."""
        self.fs.get_file(self.key(name), str(local))

    def list(self, folder: str) -> dict[str, dict[str, Any]]:
        """Entries directly in ``folder``: base name -> info (``type`` is ``"file"`` or ``"directory"``);
        empty if the folder does not exist."""
        self.fs.invalidate_cache()
        try:
            entries = self.fs.ls(self.key(folder), detail=True)
        except FileNotFoundError:
            return {}
        listed = {}
        for entry in entries:
            base = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if base:
                listed[base] = entry
        return listed

    def walk_files(self, folder: str) -> dict[str, int]:
        """Every file below ``folder``: its name relative to the store's root -> size."""
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.key(folder), detail=True)
        except FileNotFoundError:
            return {}
        prefix = self.root + "/"
        return {name[len(prefix):] if name.startswith(prefix) else name: int(info.get("size") or 0)
                for name, info in found.items() if info.get("type", "file") == "file"}

    # ---- start-up --------------------------------------------------------------------------------

    def probe(self) -> None:
        """Write, read back and delete a small object, so that a mirror that cannot work is refused in one
        line before any training. Raises :class:`MirrorError`."""
        name = f".nanoresume-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        payload = b"nanoresume mirror probe\n"
        try:
            if self.is_path:
                root = Path(self.key(""))
                if not root.is_dir():
                    if not root.parent.is_dir():  # never invent a local folder where a mount was expected
                        raise FileNotFoundError(errno.ENOENT, "no such folder", str(root.parent))
                    root.mkdir()
            self.put_bytes(payload, name)
            found = self.info(name)
            if found is None or int(found.get("size", -1)) != len(payload):
                raise OSError(errno.EIO, "a probe object written there did not read back")
            self.remove(name)
        except MirrorError:
            raise
        except Exception as e:
            raise MirrorError(describe_failure(self.url, e)) from None


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``--mirror-option KEY=VALUE`` pairs as fsspec storage options. A dotted key nests
    (``client_kwargs.endpoint_url=http://127.0.0.1:9000``); ``true``/``false``, integers and numbers
    become those types, anything else stays a string. Raises MirrorError naming a malformed pair."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise MirrorError(f"--mirror-option {pair!r}: expected KEY=VALUE, e.g. "
                              f"client_kwargs.endpoint_url=http://127.0.0.1:9000 or profile=NAME")
        target = options
        *parents, leaf = key.strip().split(".")
        for part in parents:
            nested = target.setdefault(part, {})
            if not isinstance(nested, dict):
                raise MirrorError(f"--mirror-option {pair!r}: {part} was already given a value")
            target = nested
        target[leaf] = _option_value(raw)
    return options


def _option_value(raw: str) -> Any:
    lowered = raw.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def crc32_reported(answer: dict[str, Any]) -> Optional[int]:
    """The CRC32 of the bytes stored that an S3 PUT answers with (``ChecksumCRC32``, base64), or None."""
    value = answer.get("ChecksumCRC32")
    try:
        raw = base64.b64decode(value) if isinstance(value, str) else b""
    except (binascii.Error, ValueError):
        return None
    return int.from_bytes(raw, "big") if len(raw) == 4 else None


def md5_reported(info: dict[str, Any]) -> Optional[str]:
    """The hex MD5 of an object's bytes that the store reports, or None: S3's ETag of a single PUT,
    or S3's multipart ETag (``<hex>-<parts>``, returned as is), or GCS's base64 ``md5Hash``."""
    etag = info.get("ETag") or info.get("etag")
    if isinstance(etag, str):
        etag = etag.strip('"').lower()
        head, _, parts = etag.partition("-")
        if len(head) == 32 and all(c in "0123456789abcdef" for c in head) and (not parts or parts.isdigit()):
            return etag
    md5_hash = info.get("md5Hash")
    if isinstance(md5_hash, str):
        try:
            return base64.b64decode(md5_hash).hex()
        except (binascii.Error, ValueError):
            return None
    return None


def describe_failure(url: str, error: BaseException) -> str:
    """One line naming ``url``, what went wrong and the likely fix."""
    protocol = url.split("://", 1)[0].lower() if "://" in url else "file"
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    name = type(error).__name__
    if isinstance(error, ImportError):
        extra = _EXTRAS.get(protocol)
        fix = f"pip install 'nanoresume[{extra}]'" if extra else f"install the fsspec back-end for {protocol}://"
        return f"--mirror {url}: this URL needs a package that is not installed ({text}); {fix}"
    if isinstance(error, ValueError) and "protocol" in text.lower():
        return (f"--mirror {url}: unknown protocol {protocol}://; use a folder, s3://bucket/prefix, gs://bucket/prefix "
                f"or another fsspec URL")
    if name in ("NoCredentialsError", "PartialCredentialsError") or "credentials" in text.lower() and \
            "locate" in text.lower():
        return (f"--mirror {url}: no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or pass "
                f"--mirror-option profile=NAME)")
    if protocol in _PATH_PROTOCOLS:
        if isinstance(error, FileNotFoundError):
            return (f"--mirror {url}: the folder above it does not exist ({text}); create it, or mount the drive "
                    f"first (a folder is never invented where a mount was expected)")
        if isinstance(error, PermissionError) or getattr(error, "errno", None) in (errno.EACCES, errno.EROFS):
            return f"--mirror {url}: the folder is not writable ({text}); choose a folder you can write to"
        return f"--mirror {url}: cannot write there ({text})"
    if isinstance(error, FileNotFoundError):
        return f"--mirror {url}: the bucket does not exist ({text}); create it or fix the URL"
    if isinstance(error, PermissionError):
        return (f"--mirror {url}: access denied ({text}); check the credentials (AWS_ACCESS_KEY_ID, "
                f"AWS_SECRET_ACCESS_KEY, --mirror-option profile=NAME) and that they may write to this prefix")
    if "connect" in name.lower() or "connect" in text.lower() or isinstance(error, (TimeoutError, ConnectionError)):
        return (f"--mirror {url}: cannot reach the store ({text}); check the endpoint (AWS_ENDPOINT_URL or "
                f"--mirror-option client_kwargs.endpoint_url=...) and the network")
    return f"--mirror {url}: cannot write there ({name}: {text})"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _fsync_quietly(fd)
    finally:
        os.close(fd)


def _fsync_quietly(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # some FUSE mounts refuse fsync
            raise


def _fsync_folder_quietly(folder: Path) -> None:
    try:
        fsync_folder(folder)
    except OSError:
        pass  # a FUSE mount that refuses it: the rename alone still makes the name appear whole
