"""Token data (cached, memory-mapped) and a sampler whose position is one integer.

Text is read as raw UTF-8 bytes (vocabulary 256), written once into a cache file named
by the tokens' SHA-256 and memory-mapped afterwards. Pre-tokenized data (``.npy``, or
``.bin`` with an explicit ``--token-dtype``, such as nanoGPT's uint16 GPT-2 ids) is
memory-mapped as it is; nanoGPT's ``meta.pkl`` is never read, since unpickling can run
code. The windows of optimizer step ``i`` are a pure function of ``(seed, i)``, whatever
the number of processes, so saving ``i`` is all it takes to resume the data stream
exactly, in O(1), without replaying anything.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from .atomic import temp_target, temp_writer_pid, write_file_atomically
from .errors import CheckpointError, DataError

CACHE_FORMAT = 2  # 2: cache files named by the tokens' SHA-256; 1 named them by path, size and mtime
# Names of cache files, format 2 and format 1 (their temp names follow the one scheme in nanoresume.atomic).
_CACHE_FILE = re.compile(r"^(tokens-v\d+-[0-9a-f]{32}\.bin|[0-9a-f]{24}\.(?:bin|json))$")
_DATA_ADVICE = ("point --data at a .txt file, a folder of .txt files, a .bin/.npy token file, or a folder "
                "holding train.bin and val.bin")
_SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}


@dataclass(frozen=True)
class TokenData:
    """Train and validation tokens (uint8 or uint16 arrays, usually memory-mapped) and where they came from."""

    train: np.ndarray
    val: np.ndarray
    fingerprint: str  # sha256 of the tokens (see token_fingerprint): tells whether a resume sees the same data
    source: str

    def describe(self) -> str:
        return (f"{self.source}: {len(self.train):,} train + {len(self.val):,} val tokens "
                f"(fingerprint {self.fingerprint[:12]})")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nanoresume"


def stdlib_sources() -> list[Path]:
    """The running Python's own standard-library ``.py`` files, in a fixed (sorted) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not _SKIP_STDLIB_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _warn_on_stderr(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


def data_path_problem(data: str) -> Optional[str]:
    """What a stat tells is wrong with ``--data`` (missing, empty, a device or pipe), so a bad path
    fails before anything is read or created; None if nothing is."""
    try:
        info = Path(data).expanduser().stat()
    except OSError:
        return f"--data {data}: no such file or folder; {_DATA_ADVICE}"
    if stat.S_ISDIR(info.st_mode):
        return None
    if not stat.S_ISREG(info.st_mode):
        return (f"--data {data} is not a regular file (a device, pipe or socket may never end or may "
                f"block forever); {_DATA_ADVICE}")
    if info.st_size == 0:
        return f"--data {data} holds no text (0 bytes); give it a non-empty file"
    return None


def text_files(path: Path) -> list[Path]:
    """``path`` itself, or every ``.txt`` file below a folder, sorted so the order is reproducible."""
    if path.is_dir():
        return sorted((p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.as_posix())
    return [path]


def load_tokens(data: Optional[str], val_fraction: float, cache_dir: Optional[str] = None,
                token_dtype: Optional[str] = None, vocab_size: int = 256,
                warn: Callable[[str], None] = _warn_on_stderr) -> TokenData:
    """Tokens for ``--data`` (or the default corpus), split deterministically: the last
    ``val_fraction`` of the tokens is validation, unless a folder's train.bin/val.bin give the split.

    ``token_dtype`` says how a ``.bin`` file stores its tokens (required for one); every
    token id must be below ``vocab_size``. ``warn`` hears about cache trouble (the tokens
    are still right).
    """
    if data is None:
        _require_bytes(token_dtype, "the default corpus")
        tokens, fingerprint = _cached_tokens(stdlib_sources(), cache_dir, warn)
        _check_vocabulary(tokens, vocab_size, "(the default corpus)")
        source = f"Python {sysconfig.get_python_version()} standard library"
    else:
        path = Path(data).expanduser()
        problem = data_path_problem(data)
        if problem is not None:
            raise DataError(problem)
        if path.is_dir() and ((path / "train.bin").exists() or (path / "val.bin").exists()):
            return _split_token_files(path, token_dtype, vocab_size)
        if path.suffix in (".bin", ".npy") and path.is_file():
            tokens, fingerprint = read_token_file(path, token_dtype, vocab_size)
        else:
            _require_bytes(token_dtype, f"--data {data} (text, read as bytes)")
            files = text_files(path)
            if not files:
                raise DataError(f"--data {data}: the folder holds no .txt files")
            tokens, fingerprint = _cached_tokens(files, cache_dir, warn)
            _check_vocabulary(tokens, vocab_size, data)
        source = str(path)
    if len(tokens) == 0:
        raise DataError(f"--data {data or '(default corpus)'} holds no text; give it a non-empty file")
    n_val = max(1, int(len(tokens) * val_fraction))
    return TokenData(train=tokens[:-n_val], val=tokens[-n_val:], fingerprint=fingerprint, source=source)


def _require_bytes(token_dtype: Optional[str], what: str) -> None:
    if token_dtype not in (None, "uint8"):
        raise DataError(f"--token-dtype {token_dtype} is for .bin token files, but {what} is text; "
                        f"leave --token-dtype out")


def _split_token_files(folder: Path, token_dtype: Optional[str], vocab_size: int) -> TokenData:
    """nanoGPT's layout: ``train.bin`` and ``val.bin`` side by side, the split taken as given."""
    missing = [name for name in ("train.bin", "val.bin") if not (folder / name).is_file()]
    if missing:
        raise DataError(f"--data {folder}: holds {'val.bin' if missing == ['train.bin'] else 'train.bin'} but "
                        f"no {missing[0]}; a token folder needs both train.bin and val.bin")
    train, train_digest = read_token_file(folder / "train.bin", token_dtype, vocab_size)
    val, val_digest = read_token_file(folder / "val.bin", token_dtype, vocab_size)
    for name, split in (("train.bin", train), ("val.bin", val)):
        if len(split) == 0:
            raise DataError(f"--data {folder}: {name} is empty")
    fingerprint = hashlib.sha256(f"train.bin {train_digest} val.bin {val_digest}".encode()).hexdigest()
    return TokenData(train=train, val=val, fingerprint=fingerprint, source=f"{folder} (train.bin + val.bin)")


def read_token_file(path: Path, token_dtype: Optional[str], vocab_size: int) -> tuple[np.ndarray, str]:
    """A pre-tokenized file and its fingerprint: ``.bin`` holds raw ``token_dtype`` values
    (little-endian, as nanoGPT writes them), ``.npy`` any integer array. Every id must be
    below ``vocab_size``. Raises a one-line DataError for anything that does not fit."""
    if path.suffix == ".bin":
        tokens = _bin_tokens(path, token_dtype)
        _check_vocabulary(tokens, vocab_size, str(path))
    elif token_dtype is not None:
        raise DataError(f"--data {path}: a .npy file records its own dtype; leave --token-dtype out")
    else:
        tokens = _npy_tokens(path, vocab_size)
    return tokens, token_fingerprint(tokens)


def _bin_tokens(path: Path, token_dtype: Optional[str]) -> np.ndarray:
    if token_dtype is None:
        raise DataError(f"--data {path}: a .bin file does not say how its tokens are stored; pass "
                        f"--token-dtype uint8 (one byte per token) or --token-dtype uint16 with --vocab-size "
                        f"(nanoGPT's prepare.py, e.g. --vocab-size 50304 for GPT-2 ids)")
    dtype = np.dtype(token_dtype).newbyteorder("<")
    try:
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise DataError(f"--data {path}: {size:,} bytes is not a whole number of {token_dtype} tokens "
                            f"({dtype.itemsize} bytes each); is --token-dtype right?")
        return np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    except OSError as e:
        raise DataError(f"--data {path}: cannot read it ({e.strerror or e})") from None


def _npy_tokens(path: Path, vocab_size: int) -> np.ndarray:
    """A .npy array, memory-mapped; a file without the .npy header is named as such (numpy would
    take it for a pickle and suggest loading it unsafely, which nanoresume never does)."""
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise DataError(f"--data {path}: not a NumPy .npy file (it lacks the .npy header); write token "
                                f"arrays with numpy.save, or pass raw uint8 bytes as .bin or text as .txt")
        tokens = np.load(path, mmap_mode="r", allow_pickle=False).reshape(-1)
    except (OSError, ValueError) as e:
        raise DataError(f"--data {path}: cannot read it as a token file ({e})") from None
    if not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"--data {path}: holds {tokens.dtype} values; token files must hold integers")
    if len(tokens) and tokens.min() < 0:
        raise DataError(f"--data {path}: holds negative token ids ({tokens.min()}); ids start at 0")
    _check_vocabulary(tokens, vocab_size, str(path))  # before narrowing, which would wrap large ids
    compact = np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.int64
    return tokens if tokens.dtype == compact else np.ascontiguousarray(tokens, dtype=compact)


def _check_vocabulary(tokens: np.ndarray, vocab_size: int, source: str) -> None:
    if len(tokens) and (tokens.dtype != np.uint8 or vocab_size < 256):
        largest = int(tokens.max())
        if largest >= vocab_size:
            raise DataError(f"--data {source}: holds token id {largest:,}, but the vocabulary has {vocab_size:,} "
                            f"tokens; pass the --vocab-size (and --token-dtype) the data was prepared with")


def token_fingerprint(tokens: np.ndarray) -> str:
    """SHA-256 of the tokens' bytes; for anything but bytes the dtype is hashed first, so the
    same file read as other token ids never passes for the same data."""
    if tokens.dtype == np.uint8:
        return _sha256_array(tokens)
    return _sha256_array(tokens, prefix=f"{tokens.dtype.str}\0".encode())


def _cached_tokens(files: Sequence[Path], cache_dir: Optional[str],
                   warn: Callable[[str], None]) -> tuple[np.ndarray, str]:
    """The concatenated bytes of ``files``, memory-mapped from a cache file named by their SHA-256.

    Every source byte is read and hashed on every load (about 20 ms for the 12.6 MB default
    corpus), so any edit, even one that keeps the size and mtime, names another cache file.
    A damaged cache file is rebuilt, never trusted; an unwritable cache folder costs memory
    (the tokens stay in RAM), never correctness. Either is said once through ``warn``.
    """
    fingerprint, n_tokens = _sha256_files(files)
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = _cache_path(folder, fingerprint)
    _remove_abandoned_temp_files(folder, warn)
    if path.is_file():
        if path.stat().st_size == n_tokens:
            cached = _memmap(path, n_tokens)
            if _sha256_array(cached) == fingerprint:
                return cached, fingerprint
        warn(f"the token cache {path} does not match the data it is named after (damaged or truncated); "
             f"rebuilding it")
    tokens = np.frombuffer(b"".join(_read_bytes(f) for f in files), dtype=np.uint8)
    fingerprint = _sha256_array(tokens)  # of the bytes read now, should a file have changed since
    path = _cache_path(folder, fingerprint)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_file_atomically(path, tokens.tobytes())
    except OSError as e:
        warn(f"cannot write the token cache in {folder} ({e.strerror or e}); keeping the tokens in memory "
             f"instead. Pass --cache-dir a writable folder to cache them")
        return tokens, fingerprint
    return _memmap(path, len(tokens)), fingerprint


def _cache_path(folder: Path, fingerprint: str) -> Path:
    return folder / f"tokens-v{CACHE_FORMAT}-{fingerprint[:32]}.bin"


def _sha256_files(files: Sequence[Path]) -> tuple[str, int]:
    """SHA-256 and length of the files' bytes, concatenated in order, reading one file at a time."""
    digest, size = hashlib.sha256(), 0
    for f in files:
        data = _read_bytes(f)
        digest.update(data)
        size += len(data)
    return digest.hexdigest(), size


def _remove_abandoned_temp_files(folder: Path, warn: Callable[[str], None]) -> None:
    """A cache write killed midway leaves a full-size ``.<name>.tmp.<pid>`` file behind; remove those
    whose process is gone (a writer still running keeps its file)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return  # no cache folder yet, or none we can list
    for entry in entries:
        target, pid = temp_target(entry.name), temp_writer_pid(entry.name)
        if target is None or pid is None or not _CACHE_FILE.match(target) or _process_exists(pid):
            continue
        if not entry.is_file():
            continue
        try:
            entry.unlink()
        except OSError:
            continue
        warn(f"removed {entry}, left in the token cache by an interrupted write")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):  # gone, or a number no process can have
        return False
    except PermissionError:
        return True  # it exists, but belongs to someone else
    return True


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"--data: cannot read {path} ({e.strerror})") from None


def _memmap(path: Path, n_tokens: int) -> np.ndarray:
    return np.memmap(path, dtype=np.uint8, mode="r") if n_tokens else np.zeros(0, np.uint8)


def _sha256_array(tokens: np.ndarray, prefix: bytes = b"") -> str:
    digest = hashlib.sha256(prefix)
    for start in range(0, len(tokens), 1 << 24):
        digest.update(memoryview(np.ascontiguousarray(tokens[start:start + (1 << 24)])))
    return digest.hexdigest()


def check_block_size(data: TokenData, block_size: int) -> None:
    """Both splits must hold at least one full (input, target) window."""
    for name, split in (("training", data.train), ("validation", data.val)):
        if len(split) <= block_size:
            raise DataError(f"--block-size {block_size} is larger than the {name} split ({len(split):,} tokens) "
                            f"of {data.source}; lower --block-size or give more data")


def windows(tokens: np.ndarray, offsets: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, each (B, T) int64, for windows starting at ``offsets``."""
    index = offsets[:, None] + np.arange(block_size + 1)[None, :]
    chunk = torch.from_numpy(tokens[index].astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


class BatchSampler:
    """Random training windows by optimizer step, the same for any number of processes.

    Step ``index``'s global batch (every window of one optimizer step, over all ranks and
    micro-batches: ``batch_size * grad_accum * world_size`` of them) depends only on
    ``(seed, index)``. Rank ``r`` of ``W`` takes the r-th contiguous share and cuts it into
    micro-batches. So a run sees the same windows at the same step on 1, 2 or 8 processes,
    and resuming on another world size keeps the data order exactly; the position is one
    integer, restored in O(1) without replaying anything.
    """

    def __init__(self, n_tokens: int, block_size: int, global_batch: int, seed: int) -> None:
        self.n_windows = n_tokens - block_size  # valid start offsets: [0, n_windows)
        self.global_batch = global_batch
        self.seed = seed
        self.index = 0  # optimizer steps drawn so far

    def step_offsets(self, index: int) -> np.ndarray:
        """Start offsets of every window of step ``index``'s global batch."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, index])))
        return rng.integers(0, self.n_windows, size=self.global_batch)

    def next_micro_batches(self, rank: int, world_size: int, grad_accum: int) -> list[np.ndarray]:
        """This rank's micro-batches of the next step's global batch; advances the position."""
        share = self.global_batch // world_size
        mine = self.step_offsets(self.index)[rank * share:(rank + 1) * share]
        self.index += 1
        micro = share // grad_accum
        return [mine[m * micro:(m + 1) * micro] for m in range(grad_accum)]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.index = int(state["seed"]), int(state["index"])


class ResumableSampler:
    """Shuffled batches of indices into a dataset of ``num_items``, where batch ``step`` is a pure
    function of ``(seed, step)``: resuming the data order needs nothing but the step.

    ::

        sampler = ResumableSampler(len(dataset), batch_size=64, seed=0)
        for step in range(start_step, max_steps):
            batch = [dataset[i] for i in sampler.batch(step)]

    Every epoch visits each item once, in an order drawn from ``(seed, epoch)``; a batch may span
    two epochs. For a ``DataLoader``, pass ``batch_sampler=sampler.batches(start_step)``: the
    position is the step your loop reached, never how far the loader's workers read ahead; and
    ``generator=torch.Generator()``, or each ``iter()`` draws from the global stream a resume just
    restored (see docs/own-loop.md). Its
    state (``num_items``, ``batch_size``, ``seed``) can go into a checkpoint; loading it checks that
    the dataset and batch size are the ones the order was drawn for.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0) -> None:
        if num_items < 1 or batch_size < 1:
            raise ValueError(f"num_items ({num_items}) and batch_size ({batch_size}) must be at least 1")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self._epoch: Optional[tuple[int, np.ndarray]] = None  # the last permutation drawn

    def batch(self, step: int) -> list[int]:
        """The indices of batch ``step`` (0-based)."""
        first = step * self.batch_size
        indices: list[int] = []
        while len(indices) < self.batch_size:
            epoch, offset = divmod(first + len(indices), self.num_items)
            indices += self.permutation(epoch)[offset:offset + self.batch_size - len(indices)].tolist()
        return indices

    def batches(self, start_step: int = 0) -> Iterator[list[int]]:
        """Batch ``start_step``, then every one after it, without end."""
        step = start_step
        while True:
            yield self.batch(step)
            step += 1

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the items in ``epoch``."""
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._epoch = (epoch, rng.permutation(self.num_items))
        return self._epoch[1]

    def state_dict(self) -> dict[str, int]:
        return {"num_items": self.num_items, "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Take the saved seed; refuse another dataset size or batch size, which would shift every batch."""
        saved = (int(state["num_items"]), int(state["batch_size"]))
        if saved != (self.num_items, self.batch_size):
            raise CheckpointError(f"the data order was drawn for {saved[0]} items in batches of {saved[1]}, not "
                             f"{self.num_items} in batches of {self.batch_size}; keep both to resume exactly")
        self.seed = int(state["seed"])
        self._epoch = None


def eval_offsets(n_tokens: int, block_size: int, n_batches: int, batch_size: int) -> list[np.ndarray]:
    """A fixed set of validation windows, evenly spread over the split; no RNG is touched."""
    starts = np.linspace(0, n_tokens - block_size - 1, n_batches * batch_size).astype(np.int64)
    return [starts[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


def iterate_in_order(tokens: np.ndarray, block_size: int,
                     batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping full windows, in order. The last ``< block_size`` targets are
    left out; :mod:`nanoresume.tools.evaluation` scores that tail itself."""
    n_windows = (len(tokens) - 1) // block_size
    starts = np.arange(n_windows, dtype=np.int64) * block_size
    for i in range(0, n_windows, batch_size):
        yield windows(tokens, starts[i:i + batch_size], block_size)
