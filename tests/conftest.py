"""Shared fixtures: a tiny text corpus, a tiny config, CLI flags for it, a state comparer, and a guard
on torch's global deterministic-algorithms flag. Plain helpers live in ``tests/helpers.py``."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Callable

# One compute thread, set before torch is imported (here and in every subprocess, which
# inherits the environment): on a busy 2-core machine two threads make tiny models ~100x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from nanoresume.compare import first_difference  # noqa: E402
from nanoresume.config import TrainConfig, resolve_config  # noqa: E402
from tests.helpers import TINY_FLAGS, ReferenceRun, cli_flags, kill_launched_trees  # noqa: E402


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 40 KB of real text (two stdlib modules), fixed across runs."""
    import argparse
    import json

    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(Path(argparse.__file__).read_text() + Path(json.__file__).read_text())
    return path


def _tiny_values(tiny_text: Path, tmp_path: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    values = dict(TINY_FLAGS, data=str(tiny_text), out_dir=str(tmp_path / "out"),
                  cache_dir=str(tmp_path / "cache"), max_steps=20, eval_interval=10, progress=False)
    values.update(overrides)
    return values


def _run_key(overrides: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The settings a reference run trains with, so that ``max_steps=20`` and no overrides share one run."""
    values = _tiny_values(Path("data"), Path("root"), overrides)
    return tuple(sorted((k, v) for k, v in values.items() if k not in ("data", "out_dir", "cache_dir")
                        or k in overrides))


@pytest.fixture
def make_config(tiny_text: Path, tmp_path: Path) -> Callable[..., TrainConfig]:
    """``make_config(max_steps=20, ...)``: a resolved tiny config writing under tmp_path/out."""
    return lambda **overrides: resolve_config(TrainConfig(**_tiny_values(tiny_text, tmp_path, overrides)))


@pytest.fixture(scope="session")
def reference_run(tiny_text: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., ReferenceRun]:
    """``reference_run(max_steps=20, ...)``: the uninterrupted in-process run of the tiny config with
    these overrides, trained the first time a test asks for them and shared for the rest of the session.
    Call it before patching anything a run uses: a patched first call would be the reference for all."""
    runs: dict[tuple[tuple[str, Any], ...], ReferenceRun] = {}

    def get(**overrides: Any) -> ReferenceRun:
        key = _run_key(overrides)
        if key not in runs:
            root = tmp_path_factory.mktemp("reference")
            runs[key] = ReferenceRun.train(resolve_config(TrainConfig(**_tiny_values(tiny_text, root, overrides))))
        return runs[key]

    return get


@pytest.fixture(scope="session")
def reference_cli_run(tiny_text: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``reference_cli_run(max_steps=20, ...)``: OUT of an uninterrupted ``scripts/train.py`` run of the
    tiny config with these overrides, run the first time a test asks for them and shared for the rest
    of the session. Read it, never change it. The command line's ``main`` runs in this process, as the
    script would run it (the same OUT, bit for bit), without a process start to pay for."""
    from nanoresume.tools.cli import main

    runs: dict[tuple[tuple[str, Any], ...], Path] = {}

    def get(**overrides: Any) -> Path:
        key = _run_key(overrides)
        if key not in runs:
            root = tmp_path_factory.mktemp("reference-cli")
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                code = main(cli_flags(_tiny_values(tiny_text, root, overrides)))
            assert code == 0, printed.getvalue()
            runs[key] = root / "out"
        return runs[key]

    return get


@pytest.fixture
def tiny_cli_args(tiny_text: Path, tmp_path: Path) -> Callable[..., list[str]]:
    """``tiny_cli_args(max_steps=20)``: flags for scripts/train.py on the tiny config."""
    return lambda **overrides: cli_flags(_tiny_values(tiny_text, tmp_path, overrides))


@pytest.fixture
def assert_same_state() -> Callable[..., None]:
    """``assert_same_state(a, b)``: the same nested structure, every leaf equal bit for bit
    (:func:`nanoresume.compare.first_difference`, which the chaos harness uses too)."""

    def check(a: Any, b: Any, where: str = "state") -> None:
        difference = first_difference(a, b, where)
        assert difference is None, difference

    return check


@pytest.fixture(autouse=True)
def deterministic_flag_guard(request: pytest.FixtureRequest):
    """A Trainer turns on torch's process-wide deterministic-algorithms flag and ``close()`` puts it
    back. A test that builds one and never closes it would change every later test: restore the
    flag, and fail that test so the leak gets fixed."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    after = torch.are_deterministic_algorithms_enabled()
    if after != before:
        torch.use_deterministic_algorithms(before)
        pytest.fail(f"{request.node.nodeid} left torch.use_deterministic_algorithms({after}) behind; "
                    f"close every Trainer it builds (trainer.close(), run(), or `with Trainer(...)`)")


@pytest.fixture(autouse=True)
def no_process_outlives_its_test():
    """Whatever a test launched with ``tests.helpers.launch_tree`` (torchrun and its workers) is
    killed when the test ends, passed or failed."""
    yield
    kill_launched_trees()
