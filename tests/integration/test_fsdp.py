"""torchrun + FSDP2 on CPU (gloo, 2 processes) with checkpoint folders: exact resume after a real
SIGTERM and after a SIGKILL inside a sharded write, resharding onto other world sizes and onto
DDP or one process, refusals of damaged or crafted folders, and the tools on a folder.

Few launches on purpose (each costs seconds on 2 cores): one uninterrupted reference, one run
stopped at step 12 that every resume test starts from a copy of.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from nanoresume.tools import ckpt
from nanoresume.tools.chaos import final_state_difference
from nanoresume.checkpoint.folders import METADATA, file_sha256, manifest_digests, write_manifest
from nanoresume.compare import first_difference
from nanoresume.loading import load_model, read_state
from tests.harness.probes import DUMP_RESUMED_ENV, KILL_IN_SAVE_ENV, SIGTERM_ENV, STOP_ENV, read_records
from tests.helpers import TINY_FLAGS, cli_flags
from tests.integration.test_distributed import AUDIT, environment, launch_command, losses, run

pytestmark = pytest.mark.slow

STEPS, STOP = 20, 12
# dropout 0: with no random numbers in the step, runs on different world sizes differ only by rounding.
# 3 evaluation batches: under FSDP on 2 ranks, rank 1 runs one more forward that counts for nothing.
FLAGS = dict(TINY_FLAGS, batch_size=2, dropout=0.0, max_steps=STEPS, eval_interval=10, eval_iters=3,
             ckpt_interval=5, progress=False)
FSDP = ["--parallel", "fsdp"]
SAME_STATE = ("model", "optimizer", "scheduler", "scaler", "sampler", "step", "tokens_seen", "best_val_loss")


def train_args(tiny_text: Path, root: Path, out: str = "out") -> list[str]:
    return cli_flags(dict(FLAGS, data=str(tiny_text), out_dir=str(root / out), cache_dir=str(root.parent / "cache")))


def folder(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def reference(tiny_text: Path, tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted 2-process FSDP run, with every file operation of each rank under OUT audited."""
    root = tmp_path_factory.mktemp("fsdp-reference")
    env = environment(root / "records", PYTHONPATH=f"{AUDIT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                      NANORESUME_AUDIT_WATCH=str(root / "out"), NANORESUME_AUDIT_LOG=str(root / "audit"))
    result = run(launch_command(2), train_args(tiny_text, root) + FSDP, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sharded over 2 processes (FSDP2)" in result.stdout
    return {"out": root / "out", "records": root / "records", "audit": root / "audit"}


@pytest.fixture(scope="module")
def stopped(tiny_text: Path, tmp_path_factory) -> dict[str, Path]:
    """A 2-process FSDP run that rank 1 stopped at step 12 by sending itself a real SIGTERM. It prints text
    samples at its evaluations (each token a forward that every rank takes part in); the reference does not."""
    root = tmp_path_factory.mktemp("fsdp-stopped")
    result = run(launch_command(2), train_args(tiny_text, root) + FSDP + ["--sample-tokens", "4"],
                 environment(root / "records", **{SIGTERM_ENV: f"{STOP}:1"}))
    assert result.stdout.count("sample at step 10:\n  | def ") == 1, result.stdout
    assert f"stopped by SIGTERM after step {STOP}; saved {folder(root / 'out', STOP)}" in result.stdout, \
        result.stdout + result.stderr
    assert "exitcode  : 143" in result.stderr
    return {"out": root / "out", "records": root / "records"}


def copy_of(stopped: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    shutil.copytree(stopped["out"], tmp_path / "out")
    shutil.copytree(stopped["records"], tmp_path / "records")
    return {"out": tmp_path / "out", "records": tmp_path / "records"}


def resume(tiny_text: Path, tmp_path: Path, nproc: int, *extra: str, **env: str) -> subprocess.CompletedProcess:
    result = run(launch_command(nproc), train_args(tiny_text, tmp_path) + ["--resume", "auto", *extra],
                 environment(tmp_path / "records", **env))
    assert result.returncode == 0 or STOP_ENV in env, result.stdout + result.stderr
    return result


def windows(records: Path) -> dict[int, list[int]]:
    """Step index -> every window of that step's global batch, in rank order, from however many ranks."""
    per_rank = [read_records(records, int(p.stem[4:]))[1] for p in sorted(records.glob("rank*.jsonl"))]
    indices = sorted(set().union(*per_rank))
    return {index: [o for rank in per_rank if index in rank for o in rank[index]] for index in indices}


# ---- exact resume -------------------------------------------------------------------------------


def test_a_sigterm_to_one_fsdp_worker_then_resume_ends_bit_exact(reference, stopped, tiny_text, tmp_path):
    copy = copy_of(stopped, tmp_path)
    resumed = resume(tiny_text, tmp_path, 2)
    assert f"resumed from {folder(copy['out'], STOP)} at step {STOP}" in resumed.stdout
    assert final_state_difference(folder(copy["out"], STEPS), folder(reference["out"], STEPS)) is None
    assert losses(copy["records"]) == losses(reference["records"])


def test_best_pt_under_fsdp_is_one_file_with_the_whole_model(reference):
    best = read_state(reference["out"] / "best.pt")
    assert best["kind"] == "weights" and best["step"] == STEPS  # the loss fell at every evaluation
    assert first_difference(best["model"], read_state(folder(reference["out"], STEPS))["model"]) is None


def test_each_rank_writes_only_its_own_shards_and_rank_0_everything_else(reference):
    audit = reference["audit"]
    rank1 = Path(f"{audit}.rank1").read_text().splitlines()
    assert rank1 and all("/checkpoints/.step_" in line and ".tmp." in line and "/__1_" in line
                         for line in rank1 if line.startswith("open")), rank1
    assert not [line for line in rank1 if not line.startswith(("open", "os.mkdir"))], rank1
    rank0 = Path(f"{audit}.rank0").read_text()
    assert "MANIFEST.sha256" in rank0 and "best.pt" in rank0 and "config.json" in rank0


def test_a_sigkill_inside_a_sharded_write_leaves_a_folder_that_is_removed_and_resume_ends_bit_exact(
        reference, tiny_text, tmp_path):
    out = tmp_path / "out"
    killed = run(launch_command(2), train_args(tiny_text, tmp_path) + FSDP,
                 environment(tmp_path / "records", **{KILL_IN_SAVE_ENV: "10:1"}))
    assert killed.returncode != 0
    half = list((out / "checkpoints").glob(".step_00000010.tmp.*"))
    assert len(half) == 1 and (half[0] / METADATA).exists()  # every shard written, no manifest
    shutil.copytree(half[0], folder(out, 10))  # and one under the step's own name, as if renamed early
    resumed = resume(tiny_text, tmp_path, 2)
    for leftover in (half[0], folder(out, 10)):
        assert f"removed {leftover}, left by an interrupted write" in resumed.stderr + resumed.stdout
    assert f"resumed from {folder(out, 5)} at step 5" in resumed.stdout
    assert final_state_difference(folder(out, STEPS), folder(reference["out"], STEPS)) is None
    assert losses(tmp_path / "records") == losses(reference["records"])


# ---- resharding ---------------------------------------------------------------------------------

RESHARDS = {  # processes (0: one, without torchrun), flags, last step trained (4 processes are slow on 2 cores)
    "2 -> 1 process": (1, FSDP, STEPS),
    "2 -> 4 processes": (4, FSDP + ["--batch-size", "1"], STOP + 2),  # 4 x 1: the same global batch of 4
    "fsdp -> one process": (0, [], STEPS),
    "fsdp -> ddp": (2, ["--parallel", "ddp"], STEPS),
}


@pytest.mark.parametrize("case", RESHARDS)
def test_a_folder_resumes_resharded_with_the_same_state_windows_and_close_losses(reference, stopped, tiny_text,
                                                                                 tmp_path, case):
    nproc, extra, last = RESHARDS[case]
    copy = copy_of(stopped, tmp_path)
    dump = tmp_path / "resumed.pt"
    stop = {STOP_ENV: str(last)} if last < STEPS else {}
    result = resume(tiny_text, tmp_path, nproc, *extra, **{DUMP_RESUMED_ENV: str(dump)}, **stop)
    assert ("start new streams" in result.stdout + result.stderr) == (nproc != 2)
    loaded, saved = torch.load(dump, weights_only=True), read_state(folder(copy["out"], STOP))
    for key in SAME_STATE:
        assert first_difference(loaded[key], saved[key], key) is None
    assert windows(copy["records"]) == {i: w for i, w in windows(reference["records"]).items() if i < last}
    ours, theirs = losses(copy["records"]), losses(reference["records"])
    for step in range(1, last + 1):
        assert math.isclose(ours[step], theirs[step], rel_tol=1e-4), (step, ours[step], theirs[step])


LAYOUTS = {  # how the first run is launched, its flags, and the checkpoint it leaves at step 12
    "ddp file -> fsdp": (2, [], f"step_{STOP:08d}.pt"),
    "1 process folder -> fsdp on 2": (0, ["--ckpt-format", "sharded", "--grad-accum", "2"], f"step_{STOP:08d}"),
}


@pytest.mark.parametrize("case", LAYOUTS)
def test_a_checkpoint_of_another_layout_resumes_under_fsdp_with_the_same_state(reference, tiny_text, tmp_path, case):
    nproc, extra, name = LAYOUTS[case]
    first = run(launch_command(nproc), train_args(tiny_text, tmp_path) + extra,
                environment(tmp_path / "records", **{SIGTERM_ENV: str(STOP)}))
    saved_at = tmp_path / "out" / "checkpoints" / name
    assert f"saved {saved_at}" in first.stdout, first.stdout + first.stderr
    dump = tmp_path / "resumed.pt"
    result = resume(tiny_text, tmp_path, 2, *FSDP, **{DUMP_RESUMED_ENV: str(dump)})
    assert "--parallel: 'ddp' -> 'fsdp'" in result.stdout and "sharded over 2 processes" in result.stdout
    loaded, saved = torch.load(dump, weights_only=True), read_state(saved_at)
    for key in SAME_STATE:
        assert first_difference(loaded[key], saved[key], key) is None
    assert folder(tmp_path / "out", STEPS).is_dir()  # FSDP writes folders from here on (auto; or as asked)
    assert windows(tmp_path / "records") == windows(reference["records"])
    ours, theirs = losses(tmp_path / "records"), losses(reference["records"])
    assert ours.keys() == theirs.keys()
    assert all(math.isclose(ours[s], theirs[s], rel_tol=1e-4) for s in ours), (ours, theirs)


# ---- refusals -----------------------------------------------------------------------------------


def test_a_metadata_that_runs_code_is_refused_in_one_line_and_auto_falls_back(stopped, tiny_text, tmp_path):
    copy = copy_of(stopped, tmp_path)
    newest, marker = folder(copy["out"], STOP), tmp_path / "marker"
    (newest / METADATA).write_bytes(pickle.dumps(_RunsCode(marker)))
    write_manifest(newest, {name: file_sha256(newest / name) for name in manifest_digests(newest)})  # digest matches
    refused = run(launch_command(0), train_args(tiny_text, tmp_path) + ["--resume", str(newest)],
                  environment(tmp_path / "records"))
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert str(newest / METADATA) in lines[0] and "refused, it asks to import posix.system" in lines[0]
    result = resume(tiny_text, tmp_path, 0, "--max-steps", str(STOP))
    assert f"skipping {newest / METADATA}: refused" in result.stderr
    assert f"resumed from {folder(copy['out'], 10)} at step 10" in result.stdout
    assert not marker.exists()


def test_a_truncated_shard_is_skipped_by_resume_auto_with_a_warning_naming_it(stopped, tiny_text, tmp_path):
    copy = copy_of(stopped, tmp_path)
    shard = folder(copy["out"], STOP) / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    result = resume(tiny_text, tmp_path, 0, "--max-steps", str(STOP))
    assert f"skipping {shard}: checksum mismatch" in result.stderr
    assert f"resumed from {folder(copy['out'], 10)} at step 10" in result.stdout
    assert (copy["out"] / "checkpoints" / "abandoned" / "1" / f"step_{STOP:08d}").is_dir()  # kept, set aside


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


# ---- the tools ----------------------------------------------------------------------------------


def test_the_checkpoint_tools_list_verify_show_diff_and_export_a_folder(reference, tmp_path, capsys):
    out, newest = reference["out"], folder(reference["out"], STEPS)
    assert ckpt.main(["list", str(out)]) == 0
    listed = capsys.readouterr().out
    assert f"--resume auto would pick: {newest.name}" in listed and listed.count(" ok") == 3
    assert ckpt.main(["verify", str(newest)]) == 0
    assert f"ok   {newest}" in capsys.readouterr().out
    assert ckpt.main(["show", str(newest)]) == 0
    shown = capsys.readouterr().out
    assert "stored as a folder of shards: .metadata, MANIFEST.sha256, __0_0.distcp, __1_0.distcp" in shown
    assert "written by 2 process(es)" in shown
    assert ckpt.main(["diff", str(newest), str(newest)]) == 0 and "identical" in capsys.readouterr().out
    assert ckpt.main(["diff", str(folder(out, 10)), str(newest)]) == 1
    capsys.readouterr()
    assert ckpt.main(["export", str(newest), "--to", str(tmp_path / "weights.pt")]) == 0
    model, state = load_model(tmp_path / "weights.pt", torch.device("cpu"))
    assert first_difference(model.state_dict(), read_state(newest)["model"]) is None
    assert state["kind"] == "weights" and state["step"] == STEPS
    assert ckpt.main(["verify", str(out)]) == 0
