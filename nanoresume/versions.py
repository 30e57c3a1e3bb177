"""The oldest Python and torch nanoresume declares, which are the ones CI tests (``.ci/run``).

setup.cfg's ``python_requires`` and ``install_requires`` say the same (a test checks it). A process that
got past pip anyway (a checkout run with ``scripts/*.py``, ``pip install --no-deps``) is told in one line.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
from typing import Optional

MIN_PYTHON = (3, 11)  # also what `--config` TOML needs (the standard library's tomllib)
MIN_TORCH = (2, 13)  # FSDP2's public torch.distributed.fsdp.fully_shard and everything else, as tested


def release(version: str) -> tuple[int, ...]:
    """``"2.13.0+cpu"`` or ``"2.14.0.dev20260101"`` -> ``(2, 13, 0)`` / ``(2, 14, 0)``."""
    match = re.match(r"\d+(\.\d+)*", version.strip())
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def untested_versions(python: Optional[str] = None, torch: Optional[str] = None) -> Optional[str]:
    """One line naming what is older than the floors (None: all is as tested). Defaults: this process's."""
    python = platform.python_version() if python is None else python
    if torch is None:
        try:
            torch = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            torch = ""
    old = []
    if release(python)[:2] < MIN_PYTHON:
        old.append(f"Python {python} (needs {_dotted(MIN_PYTHON)}+)")
    if torch and release(torch)[:2] < MIN_TORCH:
        old.append(f"torch {torch} (needs {_dotted(MIN_TORCH)}+)")
    if not old:
        return None
    return (f"{' and '.join(old)} is older than nanoresume is tested on; upgrade "
            f"(pip install \"torch>={_dotted(MIN_TORCH)}\"), or expect failures such as --config TOML files "
            f"(Python 3.11's tomllib) and --parallel fsdp")
