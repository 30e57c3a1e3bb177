"""Reading a ``--config`` file: JSON (such as a run's ``OUT/config.json``) or TOML (Python 3.11+).

This module only turns the file into a dict of settings; :mod:`nanoresume.config`
checks each one against its flag.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from .errors import ConfigError


def load_settings(path: str) -> dict[str, Any]:
    """The top-level table of a ``.json`` or ``.toml`` file; ConfigError naming the file otherwise."""
    file = Path(path).expanduser()
    kind = file.suffix.lower()
    if kind not in (".json", ".toml"):
        raise ConfigError(f"--config {path}: expected a .json or .toml file")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    settings = _parse_toml(path, text) if kind == ".toml" else _parse_json(path, text)
    if not isinstance(settings, dict):
        raise ConfigError(f"--config {path}: must hold one object of settings, like a run's OUT/config.json")
    return settings


def _parse_json(path: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise ConfigError(f"--config {path}: not valid JSON ({e})") from None


def _parse_toml(path: str, text: str) -> Any:
    try:
        import tomllib  # the standard library's TOML reader, new in Python 3.11
    except ImportError:
        raise ConfigError(f"--config {path}: reading TOML needs Python 3.11 or newer (this is Python "
                          f"{platform.python_version()}); use a JSON file instead, such as a run's "
                          f"OUT/config.json") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
