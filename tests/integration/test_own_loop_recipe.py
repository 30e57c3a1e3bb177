"""The README's recipe for a DataLoader under Checkpointer (examples/own_loop_dataloader.py): stopped and
resumed, with dropout and worker processes, it ends bit for bit where the uninterrupted run ends."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from nanoresume import load_checkpoint
from tests.helpers import REPO

pytestmark = pytest.mark.slow

EXAMPLE = REPO / "examples" / "own_loop_dataloader.py"


def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("own_loop_dataloader", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def final_state(out: Path, step: int) -> dict:
    return load_checkpoint(next((out / "checkpoints").glob(f"step_*{step}.pt")))


def test_the_dataloader_recipe_stopped_and_resumed_ends_bit_exact_with_dropout(tmp_path, capsys, assert_same_state):
    run = example().main
    workers = ["--workers", "2"]
    assert run(["--out-dir", str(tmp_path / "straight"), "--steps", "40", *workers]) == 0
    assert run(["--out-dir", str(tmp_path / "stopped"), "--steps", "20", *workers]) == 0  # saved at step 20
    assert run(["--out-dir", str(tmp_path / "stopped"), "--steps", "40", *workers]) == 0  # --resume auto
    assert "resumed at step 20" in capsys.readouterr().out
    assert_same_state(final_state(tmp_path / "stopped", 40), final_state(tmp_path / "straight", 40))
