"""Token data (cached, memory-mapped) and a sampler whose position is one integer.

Text is read as raw UTF-8 bytes (vocabulary 256), tokenized once into a cache file
and memory-mapped afterwards. Pre-tokenized data (``.npy``, or ``.bin`` with an
explicit ``--token-dtype``, such as nanoGPT's uint16 GPT-2 ids) is memory-mapped
as it is; nanoGPT's ``meta.pkl`` is never read, since unpickling can run code.
Batch ``i`` is a pure function of
``(seed, rank, i)``, so saving ``i`` is all it takes to resume the data stream
exactly, in O(1), without replaying earlier batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .atomic import write_file_atomically
from .errors import DataError

CACHE_FORMAT = 1
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


def text_files(path: Path) -> list[Path]:
    """``path`` itself, or every ``.txt`` file below a folder, sorted so the order is reproducible."""
    if path.is_dir():
        return sorted((p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.as_posix())
    return [path]


def load_tokens(data: Optional[str], val_fraction: float, cache_dir: Optional[str] = None,
                token_dtype: Optional[str] = None, vocab_size: int = 256) -> TokenData:
    """Tokens for ``--data`` (or the default corpus), split deterministically: the last
    ``val_fraction`` of the tokens is validation, unless a folder's train.bin/val.bin give the split.

    ``token_dtype`` says how a ``.bin`` file stores its tokens (required for one); every
    token id must be below ``vocab_size``.
    """
    if data is None:
        _require_bytes(token_dtype, "the default corpus")
        tokens, fingerprint = _cached_tokens(stdlib_sources(), cache_dir)
        _check_vocabulary(tokens, vocab_size, "(the default corpus)")
        source = f"Python {sysconfig.get_python_version()} standard library"
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise DataError(f"--data {data}: no such file or folder; point --data at a .txt file, a folder of "
                            f".txt files, a .bin/.npy token file, or a folder holding train.bin and val.bin")
        if path.is_dir() and ((path / "train.bin").exists() or (path / "val.bin").exists()):
            return _split_token_files(path, token_dtype, vocab_size)
        if path.suffix in (".bin", ".npy") and path.is_file():
            tokens, fingerprint = read_token_file(path, token_dtype, vocab_size)
        else:
            _require_bytes(token_dtype, f"--data {data} (text, read as bytes)")
            files = text_files(path)
            if not files:
                raise DataError(f"--data {data}: the folder holds no .txt files")
            tokens, fingerprint = _cached_tokens(files, cache_dir)
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
    try:
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


def _cached_tokens(files: Sequence[Path], cache_dir: Optional[str]) -> tuple[np.ndarray, str]:
    """Concatenate ``files`` as bytes once, then reuse the memory-mapped cache while they are unchanged."""
    try:
        signature = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    except OSError as e:
        raise DataError(f"--data: cannot read {e.filename} ({e.strerror})") from None
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, signature]).encode()).hexdigest()[:24]
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    bin_path, meta_path = folder / f"{key}.bin", folder / f"{key}.json"
    try:
        meta = json.loads(meta_path.read_text())
        if bin_path.stat().st_size == meta["n_tokens"]:
            tokens = _memmap(bin_path, meta["n_tokens"])
            if _sha256_array(tokens) == meta["fingerprint"]:  # a damaged cache is rebuilt, never trusted
                return tokens, meta["fingerprint"]
    except (OSError, ValueError, KeyError):
        pass  # no cache yet, or a stale/half-written one: rebuild it below
    tokens = np.frombuffer(b"".join(_read_bytes(f) for f in files), dtype=np.uint8)
    fingerprint = _sha256_array(tokens)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_file_atomically(bin_path, tokens.tobytes())
        write_file_atomically(meta_path, json.dumps({"n_tokens": len(tokens), "fingerprint": fingerprint}).encode())
    except OSError:
        return tokens, fingerprint  # an unwritable cache only costs speed; the data is still right
    return _memmap(bin_path, len(tokens)), fingerprint


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
    """Random training windows; batch ``index`` depends only on ``(seed, rank, index)``.

    Under data parallelism each rank has its own sampler (its own ``rank``), and
    each rank's state is saved separately.
    """

    def __init__(self, n_tokens: int, block_size: int, batch_size: int, seed: int, rank: int = 0) -> None:
        self.n_windows = n_tokens - block_size  # valid start offsets: [0, n_windows)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.index = 0  # batches drawn so far

    def next_offsets(self) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.rank, self.index])))
        self.index += 1
        return rng.integers(0, self.n_windows, size=self.batch_size)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "rank": self.rank, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.rank, self.index = int(state["seed"]), int(state["rank"]), int(state["index"])


def eval_offsets(n_tokens: int, block_size: int, n_batches: int, batch_size: int) -> list[np.ndarray]:
    """A fixed set of validation windows, evenly spread over the split; no RNG is touched."""
    starts = np.linspace(0, n_tokens - block_size - 1, n_batches * batch_size).astype(np.int64)
    return [starts[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


def iterate_in_order(tokens: np.ndarray, block_size: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping full windows, in order. The last ``< block_size`` targets are
    left out; :mod:`nanoresume.evaluation` scores that tail itself."""
    n_windows = (len(tokens) - 1) // block_size
    starts = np.arange(n_windows, dtype=np.int64) * block_size
    for i in range(0, n_windows, batch_size):
        yield windows(tokens, starts[i:i + batch_size], block_size)
