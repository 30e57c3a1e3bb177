"""The checkpoint tool on real runs: list, verify, show, diff (uninterrupted vs resumed) and export."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from nanoresume.tools import ckpt, sampling
from nanoresume.checkpoint import load_checkpoint, save_atomically
from nanoresume.trainer import Trainer
from tests.helpers import REPO, flip_a_byte, run_main, run_script, stop_after

CKPT_SCRIPT = REPO / "scripts" / "ckpt.py"
SAMPLE_SCRIPT = REPO / "scripts" / "sample.py"


def run_tool(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = ckpt.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def trained_template(reference_run) -> Path:
    """OUT of a 30-step run with step checkpoints 10, 20, 30 and best.pt, trained once per session."""
    return reference_run(max_steps=30, eval_interval=10, keep_last=3).out


@pytest.fixture
def trained_run(trained_template: Path, tmp_path: Path) -> Path:
    """A private copy of the template run (file times kept), free to corrupt."""
    return Path(shutil.copytree(trained_template, tmp_path / "run"))


def test_list_and_verify_a_clean_run(trained_run: Path, capsys) -> None:
    code, out, err = run_tool(capsys, "list", str(trained_run))
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.rstrip().endswith(" ok")]
    assert [int(r.split()[0]) for r in rows] == [10, 20, 30]
    assert "--resume auto would pick: step_00000030.pt" in out
    assert "best.pt: step 30" in out
    code, out, err = run_tool(capsys, "verify", str(trained_run))
    assert code == 0, out + err
    assert "4 of 4 checkpoint(s) verify" in out


def test_one_corrupted_file_is_reported_alone_and_fails_list_and_verify(trained_run: Path, capsys) -> None:
    flip_a_byte(trained_run / "checkpoints" / "step_00000030.pt")
    code, out, _ = run_tool(capsys, "verify", str(trained_run))
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert code == 1 and len(bad) == 1
    assert "step_00000030.pt" in bad[0] and "checksum mismatch" in bad[0]
    code, out, _ = run_tool(capsys, "list", str(trained_run))
    bad = [line for line in out.splitlines() if "BAD" in line]
    assert code == 1 and len(bad) == 1 and bad[0].split()[0] == "30"
    assert "--resume auto would pick: step_00000020.pt" in out  # the newest one that verifies
    code, _, _ = run_tool(capsys, "verify", str(trained_run / "checkpoints" / "step_00000020.pt"))
    assert code == 0


def test_a_weights_file_under_a_step_name_is_bad_not_a_crash(trained_run: Path, capsys) -> None:
    save_atomically(load_checkpoint(trained_run / "best.pt"), trained_run / "checkpoints" / "step_00000040.pt")
    code, out, err = run_tool(capsys, "list", str(trained_run))
    assert code == 1 and not err
    bad = [line for line in out.splitlines() if "BAD" in line]
    assert len(bad) == 1 and bad[0].split()[0] == "40" and "'weights'" in bad[0]
    assert "--resume auto would pick: step_00000030.pt" in out


def test_diff_says_identical_for_an_uninterrupted_and_a_resumed_run(make_config, tmp_path: Path, capsys) -> None:
    straight = make_config(max_steps=12, eval_interval=6, out_dir=str(tmp_path / "straight"))
    Trainer(straight).run()
    interrupted = dataclasses.replace(straight, out_dir=str(tmp_path / "resumed"))
    assert Trainer(interrupted, on_step=stop_after(4)).run().step == 4
    Trainer(dataclasses.replace(interrupted, resume="auto")).run()
    capsys.readouterr()
    a = tmp_path / "straight" / "checkpoints" / "step_00000012.pt"
    b = tmp_path / "resumed" / "checkpoints" / "step_00000012.pt"
    code, out, _ = run_tool(capsys, "diff", str(a), str(b))
    assert code == 0 and "identical" in out
    assert "(ignored, run-only) config.resume: 'none' vs 'auto'" in out  # said, not hidden
    code, out, _ = run_tool(capsys, "diff", "--strict", str(a), str(b))
    assert code == 1 and "config.out_dir" in out


def test_diff_names_a_changed_tensor_and_config_field(trained_run: Path, tmp_path: Path, capsys) -> None:
    original = trained_run / "checkpoints" / "step_00000030.pt"
    state = load_checkpoint(original)
    state["model"]["blocks.1.mlp.fc.weight"][3, 4] += 0.5
    state["optimizer"]["state"][0]["exp_avg"][0] += 1.0
    state["config"]["lr"] = 1.0
    changed = tmp_path / "changed.pt"
    save_atomically(state, changed)
    code, out, _ = run_tool(capsys, "diff", str(original), str(changed))
    assert code == 1
    assert "model.blocks.1.mlp.fc.weight: max abs diff 0.5 (1 of" in out
    assert "optimizer.state.0.exp_avg: max abs diff 1" in out
    assert "config.lr: 0.003 vs 1.0" in out
    assert "model.blocks.0" not in out  # unchanged tensors are not reported


def test_show_prints_config_tensors_and_optimizer_summary(trained_run: Path, capsys) -> None:
    code, out, _ = run_tool(capsys, "show", str(trained_run / "checkpoints" / "step_00000020.pt"))
    assert code == 0
    assert "kind 'train', format_version 2, step 20" in out
    assert "sampler: {'seed': 1337, 'index': 20} (written by 1 process(es))" in out
    assert "n_embd = 32" in out
    assert any(line.split()[:3] == ["blocks.0.attn.qkv.weight", "(96,", "32)"] for line in out.splitlines())
    assert "exp_avg_sq:" in out and "rng streams python, numpy, torch, cuda" in out


def test_export_round_trip(trained_run: Path, tmp_path: Path, capsys) -> None:
    source = trained_run / "checkpoints" / "step_00000020.pt"
    target = tmp_path / "weights.pt"
    code, out, err = run_tool(capsys, "export", str(source), "--to", str(target))
    assert code == 0, err
    exported, step_state = load_checkpoint(target), load_checkpoint(source)
    best = load_checkpoint(trained_run / "best.pt")
    assert exported["kind"] == "weights" and exported.keys() == best.keys()
    assert exported["model_config"] == best["model_config"] and exported["step"] == 20
    assert exported["model"].keys() == step_state["model"].keys()
    assert all(torch.equal(exported["model"][k], step_state["model"][k]) for k in exported["model"])
    proc = run_main(sampling.main, ["--ckpt", str(target), "--prompt", "import", "--max-new-tokens", "20"], capsys)
    assert proc.returncode == 0 and proc.stdout.startswith("import"), proc.stderr
    code, _, err = run_tool(capsys, "export", str(source), "--to", str(target))
    assert code == 2 and "--force" in err  # no silent overwrite


@pytest.mark.parametrize("make_args, needle", [
    (lambda out, bad: ["show", str(out / "nope.pt")], "no such checkpoint file"),
    (lambda out, bad: ["show", str(out)], "is a folder"),
    (lambda out, bad: ["verify", str(out / "nope")], "no such file or folder"),
    (lambda out, bad: ["list", str(bad.parent)], "no checkpoints/ folder"),
    (lambda out, bad: ["show", str(bad)], "unknown checkpoint kind 'optimizer'"),
    (lambda out, bad: ["export", str(out / "best.pt"), "--to", str(out / "checkpoints" / "step_00000099.pt")],
     "step_* names"),
])
def test_user_errors_are_one_line_with_exit_code_2(trained_run: Path, tmp_path: Path, capsys,
                                                   make_args, needle: str) -> None:
    wrong_kind = tmp_path / "wrong" / "wrong.pt"
    wrong_kind.parent.mkdir()
    save_atomically({"format_version": 1, "kind": "optimizer", "model": {}}, wrong_kind)
    code, out, err = run_tool(capsys, *make_args(trained_run, wrong_kind))
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err


def test_bad_flag_and_help_through_the_real_script(capsys) -> None:
    proc = run_script(CKPT_SCRIPT, "diff", "--bogus")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    proc = run_main(ckpt.main, ["export", "--help"], capsys)  # in-process: the parser is the same
    assert proc.returncode == 0 and "--to FILE" in proc.stdout and "--force" in proc.stdout


def test_verify_refuses_a_run_folder_with_nothing_in_it(tmp_path: Path, capsys) -> None:
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    code, _, err = run_tool(capsys, "verify", str(tmp_path / "out"))
    assert code == 2 and "holds no checkpoint files" in err
