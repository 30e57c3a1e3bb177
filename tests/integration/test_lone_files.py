"""A checkpoint copied or renamed without its .sha256 works with every tool, and the same copy with
one flipped byte or one byte missing is refused by every tool with one line.

The tools run in this process (their ``main``), as the scripts would run them; the integration
tests of the scripts themselves live in test_cli.py and test_ckpt_tool.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from nanoresume.tools import ckpt, cli, evaluation, sampling
from nanoresume.checkpoint import load_checkpoint
from tests.integration.test_ckpt_tool import trained_run, trained_template  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


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


def tool_calls(path: Path, tiny_text: Path, tmp_path: Path, other: Path) -> list[tuple[object, list[str]]]:
    return [(ckpt.main, ["verify", str(path)]), (ckpt.main, ["show", str(path)]),
            (ckpt.main, ["diff", str(path), str(other)]),
            (ckpt.main, ["export", str(path), "--to", str(tmp_path / f"export-of-{path.name}")]),
            (sampling.main, ["--ckpt", str(path), "--max-new-tokens", "5"]),
            (evaluation.main, ["--ckpt", str(path), "--data", str(tiny_text), "--no-progress"])]


def test_lone_copies_work_with_every_tool(lone_files: dict[str, Path], tiny_text: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    for path in lone_files.values():
        assert not path.with_name(path.name + ".sha256").exists()
        for main, args in tool_calls(path, tiny_text, tmp_path, other=path):
            assert main(args) == 0, (args, capsys.readouterr().err)
    step = lone_files["step"]
    exported = load_checkpoint(tmp_path / f"export-of-{step.name}")
    assert torch.equal(exported["model"]["wte.weight"], load_checkpoint(step)["model"]["wte.weight"])
    capsys.readouterr()
    args = ["--resume", str(step), "--out-dir", str(tmp_path / "resumed"), "--max-steps", "31", "--no-progress"]
    assert cli.main(args) == 0, capsys.readouterr().err
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_00000031.pt")["step"] == 31


@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_a_damaged_lone_copy_is_refused_by_every_tool_with_one_line(lone_files: dict[str, Path], how: str,
                                                                    tiny_text: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    for kind, original in lone_files.items():
        bad = damaged(original, how)
        capsys.readouterr()
        for main, args in tool_calls(bad, tiny_text, tmp_path, other=original):
            code = main(args)
            captured = capsys.readouterr()
            assert code != 0, (args, captured.out)
            problem = [line for line in (captured.out + captured.err).splitlines()
                       if str(bad) in line and ("checksum" in line or "corrupt" in line)]
            assert problem, (args, captured.out, captured.err)
            assert "Traceback" not in captured.err
        if kind == "step":
            out = tmp_path / f"resumed-{how}"
            code = cli.main(["--resume", str(bad), "--out-dir", str(out), "--no-progress"])
            lines = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and str(bad) in lines[0], lines
            assert not list((out / "checkpoints").glob("step_*.pt"))
