"""Plain helpers for the mirror's tests: storage options for the loopback server, checkpoints to upload."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoresume.checkpoint import FORMAT_VERSION, save_atomically, step_path
from nanoresume.checkpoint.folders import MANIFEST, METADATA, file_sha256, write_manifest
from nanoresume.mirror import Mirror


@dataclass(frozen=True)
class MirrorTarget:
    url: str
    options: dict[str, Any]

    def open(self) -> Mirror:
        mirror = Mirror(self.url, self.options)
        mirror.probe()
        return mirror


def s3_options(endpoint: str) -> dict[str, Any]:
    """s3fs options for the loopback server: one attempt and short timeouts, so a stopped server fails fast
    (the uploader's own retries are what the tests check)."""
    return {"client_kwargs": {"endpoint_url": endpoint},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1, "read_timeout": 5}}


def train_state(step: int, size: int = 1000) -> dict[str, Any]:
    """A stand-in training state (what resume's key check needs), deterministic per step."""
    generator = torch.Generator().manual_seed(step)
    return {"format_version": FORMAT_VERSION, "kind": "train", "step": step,
            "model": {"weight": torch.randn(size, generator=generator)}}


def make_checkpoint(folder: Path, step: int, size: int = 1000) -> Path:
    """A committed step file (self-verifying, with its .sha256), as a run writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = step_path(folder, step)
    save_atomically(train_state(step, size), path)
    return path


def make_checkpoint_folder(folder: Path, step: int) -> Path:
    """A committed step folder: a few files, then MANIFEST.sha256 listing them."""
    path = folder / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / METADATA).write_bytes(b"index of step %d" % step)
    for rank in range(2):
        (path / f"__{rank}_0.distcp").write_bytes(bytes([rank, step % 256]) * 5000)
    write_manifest(path, {p.name: file_sha256(p) for p in path.iterdir() if p.name != MANIFEST})
    return path


class TouchOnLoad:
    """Unpickling this calls Path.touch(marker): the stand-in for a checkpoint that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def make_malicious_checkpoint(folder: Path, step: int, marker: Path) -> Path:
    """A step file whose embedded digest is right but whose pickle runs code when loaded unsafely."""
    folder.mkdir(parents=True, exist_ok=True)
    path = step_path(folder, step)
    save_atomically({"format_version": FORMAT_VERSION, "kind": "train", "payload": TouchOnLoad(marker)}, path)
    return path


def mirror_flags(target: MirrorTarget) -> list[str]:
    """``--mirror URL`` and a ``--mirror-option`` for each storage option (nested ones dotted)."""
    def pairs(options: dict[str, Any], prefix: str = "") -> list[str]:
        found = []
        for key, value in options.items():
            if isinstance(value, dict):
                found += pairs(value, f"{prefix}{key}.")
            else:
                found.append(f"{prefix}{key}={value}")
        return found

    return ["--mirror", target.url, *[flag for pair in pairs(target.options) for flag in ("--mirror-option", pair)]]
