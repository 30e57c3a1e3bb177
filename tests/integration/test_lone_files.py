"""A checkpoint copied or renamed without its .sha256 works with every tool, and the same copy with
one flipped byte or one byte missing is refused by every tool with one line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoresume.checkpoint import load_checkpoint
from tests.helpers import REPO, run_train
from tests.integration.test_ckpt_tool import trained_run, trained_template  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), *args], capture_output=True,
                          text=True, timeout=120)


def lone_copy(source: Path, folder: Path, name: str) -> Path:
    folder.mkdir(exist_ok=True)
    target = folder / name
    shutil.copyfile(source, target)  # the file alone: no .sha256 travels with it
    return target


def damaged(path: Path, how: str) -> Path:
    data = bytearray(path.read_bytes())
    if how == "flipped":
        state = load_checkpoint(path)
        needle = state["model"]["blocks.0.mlp.fc.weight"].numpy().tobytes()[:32]
        data[data.index(needle) + 8] ^= 0x10  # inside the tensor data, not the zip's bookkeeping
    else:
        data = data[:-1]
    target = path.with_name(f"{how}-{path.name}")
    target.write_bytes(bytes(data))
    return target


@pytest.fixture
def lone_files(trained_run: Path, tmp_path: Path) -> dict[str, Path]:  # noqa: F811
    elsewhere = tmp_path / "shared with a colleague"
    return {"best": lone_copy(trained_run / "best.pt", elsewhere, "my model.pt"),
            "step": lone_copy(trained_run / "checkpoints" / "step_00000030.pt", elsewhere, "renamed-30.pt")}


def test_lone_copies_work_with_every_tool(lone_files: dict[str, Path], tiny_text: Path, tmp_path: Path) -> None:
    best, step = lone_files["best"], lone_files["step"]
    for path in (best, step):
        assert not path.with_name(path.name + ".sha256").exists()
        for args in (("ckpt", "verify", str(path)), ("ckpt", "show", str(path)),
                     ("sample", "--ckpt", str(path), "--max-new-tokens", "5"),
                     ("evaluate", "--ckpt", str(path), "--data", str(tiny_text), "--no-progress")):
            result = tool(*args)
            assert result.returncode == 0, (args, result.stderr)
    assert tool("ckpt", "diff", str(step), str(step)).returncode == 0
    exported = tmp_path / "exported.pt"
    assert tool("ckpt", "export", str(step), "--to", str(exported)).returncode == 0
    assert torch.equal(load_checkpoint(exported)["model"]["wte.weight"], load_checkpoint(step)["model"]["wte.weight"])
    resumed = run_train(["--resume", str(step), "--out-dir", str(tmp_path / "resumed"), "--max-steps", "31",
                         "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout


@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_a_damaged_lone_copy_is_refused_by_every_tool_with_one_line(lone_files: dict[str, Path], how: str,
                                                                    tiny_text: Path, tmp_path: Path) -> None:
    for kind, original in lone_files.items():
        bad = damaged(original, how)
        commands = [("ckpt", "verify", str(bad)), ("ckpt", "show", str(bad)), ("ckpt", "diff", str(bad), str(original)),
                    ("ckpt", "export", str(bad), "--to", str(tmp_path / f"x-{kind}-{how}.pt")),
                    ("sample", "--ckpt", str(bad), "--max-new-tokens", "5"),
                    ("evaluate", "--ckpt", str(bad), "--data", str(tiny_text), "--no-progress")]
        for args in commands:
            result = tool(*args)
            assert result.returncode != 0, (args, result.stdout)
            output = (result.stdout + result.stderr).strip().splitlines()
            problem = [line for line in output if str(bad) in line and ("checksum" in line or "corrupt" in line)]
            assert problem, (args, output)
            assert "Traceback" not in result.stderr
        if kind == "step":
            result = run_train(["--resume", str(bad), "--out-dir", str(tmp_path / f"r-{how}"), "--no-progress"])
            assert result.returncode == 2 and result.stderr.count("\n") == 1 and str(bad) in result.stderr
            assert not (tmp_path / f"r-{how}" / "checkpoints").exists() or \
                not list((tmp_path / f"r-{how}" / "checkpoints").glob("step_*.pt"))
