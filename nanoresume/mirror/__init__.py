"""The durable mirror: a copy of each committed checkpoint on storage that outlives the machine (a
mounted Drive or NFS folder, an S3-compatible bucket, any fsspec URL), and the resume from it.

**Local commit first, mirror second.** OUT keeps its fast atomic commit. After each local commit a
background :class:`Uploader` copies the committed checkpoint, then the run's small files, to the
mirror; training never waits for the network.

**Commit protocol, without rename** (object stores have none that is atomic):

1. An object appears whole or not at all: one PUT, or a multipart upload that shows only once
   complete. On a path mirror, a temp name beside the target, fsync, rename, fsync of the folder
   where the filesystem allows it.
2. A step file goes under its final key (``checkpoints/step_00000040.pt``): it verifies itself
   (its digest is in its trailer), so no rename is needed. A step folder's files go first and its
   ``MANIFEST.sha256`` last: a folder counts only once its manifest lists every file.
3. Every upload is checked before anything counts on it, by what the store reports about the bytes it
   holds: below 100 MiB (one PUT from memory) the CRC32 and/or MD5 an S3 PUT answers with, against
   the same sums of the bytes sent; above, the size from ``info`` and the MD5 it reports (S3's ETag,
   also of s3fs's multipart uploads; GCS's md5Hash) against the local file's, hashed while it
   uploads. Where the store reports no sum (a path, memory://), the size, and the object's last
   64 KiB read back and compared byte for byte: for a checkpoint file, the trailer carrying the
   digest of every byte before it; for the small files (config, manifest, pointer), all of them.
4. The pointer ``LATEST.json`` ({step, name, kind, size, digest}) is written last, and checked the same way.
   Only checkpoints at or below its step count; old ones are pruned only after a newer pointer is
   written, never the pointer's own nor the one the run resumed from; ``best.pt`` is never pruned.

**Resume** downloads to a temp name, verifies with the same safe load as a local checkpoint (digest,
``weights_only``: a malicious pickle is refused and never runs code), and only then commits it
into OUT; anything corrupt, truncated, without pointer or manifest is skipped with one line.

**Guarantee:** the mirror's pointer only ever names a checkpoint that was uploaded whole and checked,
so after the process exits the mirror holds a verified step N, or the last line says which step it
holds and why the newest is missing.

Modules: :mod:`.store` (the fsspec seam, the probe, one-line errors), :mod:`.remote` (uploads,
checks, pointer, retention), :mod:`.uploader` (the background thread), :mod:`.link` (a training run's
uploader, from start to the bounded wait at the end), :mod:`.restore` (download,
verify, commit; the run's other files), :mod:`.fetch` (the tools' verified copies in a cache).
"""

from .fetch import cache_folder, fetch, fetch_checkpoint, is_url, local_checkpoint
from .remote import POINTER, LocalGone, Mirror, Pointer, RemoteCheckpoint, UploadMismatch
from .restore import Restored, download_checkpoint, find_newest_on_mirror, mirror_candidates, restore_run_files
from .store import MirrorError, Store, describe_failure, parse_options
from .uploader import Backoff, Uploader

__all__ = [
    "POINTER", "Backoff", "LocalGone", "Mirror", "MirrorError", "Pointer", "RemoteCheckpoint", "Restored", "Store",
    "UploadMismatch", "Uploader", "cache_folder", "describe_failure", "download_checkpoint", "fetch",
    "fetch_checkpoint", "find_newest_on_mirror", "is_url", "local_checkpoint", "mirror_candidates", "parse_options",
    "restore_run_files",
]
