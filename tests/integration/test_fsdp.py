"""torchrun + FSDP2 on CPU (gloo) with checkpoint folders: initial weights identical bit for bit in every
layout, exact resume after a real SIGTERM and twice in a row (the second time from a folder a resumed
run wrote, after a SIGKILL inside a sharded write), uneven shards on 3 ranks, resharding 2 -> 3 -> 2
and onto DDP or one process and back, refusals of damaged or crafted folders, and the tools on a folder.

Few launches on purpose (each costs seconds on 2 cores), chained so that each does several checks:
one uninterrupted reference on 2 ranks, one run stopped at step 12 that every resume starts from a
copy of, and three resharded runs from it (one process, in this process; DDP; 3 ranks) that later
tests resume again. The refusals run in this process too.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from nanoresume.checkpoint.folders import METADATA, file_sha256, manifest_digests, write_manifest
from nanoresume.compare import first_difference
from nanoresume.config import TrainConfig, read_command_line
from nanoresume.loading import load_model, model_config_from_state, read_state
from nanoresume.model import GPT
from nanoresume.tools import ckpt, cli
from nanoresume.tools.chaos import final_state_difference
from nanoresume.trainer import Trainer
from tests.harness.probes import DUMP_INIT_ENV, DUMP_RESUMED_ENV, KILL_IN_SAVE_ENV, SIGTERM_ENV, STOP_ENV, read_records
from tests.helpers import TINY_FLAGS, assert_one_line_error, cli_flags, run_main
from tests.integration.test_distributed import AUDIT, environment, launch_command, losses, run

pytestmark = pytest.mark.slow

STEPS, STOP = 20, 12
# dropout 0: with no random numbers in the step, runs on different world sizes differ only by rounding.
# A global batch of 6 sequences: 3 a rank on 2 ranks, 2 on 3, 3 x 2 accumulated by one process.
# 3 evaluation batches: under FSDP on 2 ranks, rank 1 runs one more forward that counts for nothing.
FLAGS = dict(TINY_FLAGS, batch_size=3, dropout=0.0, max_steps=STEPS, eval_interval=10, eval_iters=3,
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
                      NANORESUME_AUDIT_WATCH=str(root / "out"), NANORESUME_AUDIT_LOG=str(root / "audit"),
                      **{DUMP_INIT_ENV: str(root / "init.pt")})
    result = run(launch_command(2), train_args(tiny_text, root) + FSDP, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sharded over 2 processes (FSDP2)" in result.stdout
    return {"out": root / "out", "records": root / "records", "audit": root / "audit", "init": root / "init.pt"}


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


def copy_of(run_paths: dict[str, Path], tmp_path: Path, drop: tuple[str, ...] = ()) -> dict[str, Path]:
    """A copy of a run's OUT and records under ``tmp_path``, without the checkpoints named in ``drop``."""
    shutil.copytree(run_paths["out"], tmp_path / "out")
    shutil.copytree(run_paths["records"], tmp_path / "records")
    for name in drop:
        path = tmp_path / "out" / "checkpoints" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
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


def assert_close_losses(records: Path, reference: Path, last: int = STEPS) -> None:
    """Runs on other world sizes: the same data, the same numbers up to rounding."""
    ours, theirs = losses(records), losses(reference)
    for step in range(1, last + 1):
        assert math.isclose(ours[step], theirs[step], rel_tol=1e-4), (step, ours[step], theirs[step])


# ---- resharded runs from the stopped one, resumed again by later tests ------------------------------

RESHARDS = {  # processes (0: one, in this process), flags; each trains from step 12 to the end
    "one process": (0, ["--ckpt-format", "sharded"]),  # folders from one process, read by FSDP later
    "ddp": (2, ["--parallel", "ddp"]),  # files (auto), read by FSDP later
    "3 ranks": (3, FSDP + ["--batch-size", "2"]),  # uneven shards: 256 and 32 rows over 3 ranks
}


@pytest.fixture(scope="module", params=list(RESHARDS))
def resharded(request, stopped, tiny_text: Path, tmp_path_factory) -> dict[str, Any]:
    """The stopped run resumed to the end on another world size or layout; the state it resumed with and
    its initial weights (built before the resume replaced them) dumped."""
    root = tmp_path_factory.mktemp("fsdp-resharded")
    nproc, extra = RESHARDS[request.param]
    copy = copy_of(stopped, root)
    dumps = {DUMP_RESUMED_ENV: str(root / "resumed.pt"), DUMP_INIT_ENV: str(root / "init.pt")}
    if nproc == 0:
        resume_in_this_process(train_args(tiny_text, root) + ["--resume", "auto", *extra], copy["records"], **dumps)
    else:
        result = resume(tiny_text, root, nproc, *extra, **dumps)
        assert ("start new streams" in result.stdout + result.stderr) == (nproc != 2)
    return dict(copy, case=request.param, nproc=nproc, resumed=root / "resumed.pt", init=root / "init.pt")


def resume_in_this_process(argv: list[str], records: Path, **dumps: str) -> None:
    """What a plain one-process launch with the probes would do, without the seconds a process costs:
    the initial weights and the resumed state dumped, every step's loss and windows appended to
    ``records`` as rank 0's."""
    from nanoresume import trainer as trainer_module
    from nanoresume.data import BatchSampler

    line, initial = read_command_line(argv), {}
    materialize, draw = trainer_module.materialize, BatchSampler.next_micro_batches

    def record(entry: dict) -> None:
        with open(records / "rank0.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def materialized(*args, **kwargs):
        model = materialize(*args, **kwargs)
        initial.update({name: t.clone() for name, t in model.state_dict().items()})
        return model

    def recorded_draw(sampler: BatchSampler, *args, **kwargs):
        index, batches = sampler.index, draw(sampler, *args, **kwargs)
        record({"index": index, "offsets": [int(o) for batch in batches for o in batch]})
        return batches

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "materialize", materialized)
        patch.setattr(BatchSampler, "next_micro_batches", recorded_draw)
        trainer = Trainer(line.cfg, explicit=line.explicit,
                          on_step=lambda _, step, loss: record({"step": step, "loss": loss}))
        torch.save(initial, dumps[DUMP_INIT_ENV])
        torch.save(trainer.state_dict(), dumps[DUMP_RESUMED_ENV])
        assert trainer.run().exit_code == 0


# ---- initial weights ----------------------------------------------------------------------------


def test_the_initial_weights_are_identical_bit_for_bit_in_every_layout_and_world_size(reference, resharded):
    """Keyed by (seed, parameter name), each rank filling only its shard: FSDP on 3 ranks cuts 256 rows
    into 86 + 86 + 84, yet the gathered weights equal one process's, DDP's and FSDP on 2 ranks'."""
    last = folder(reference["out"], STEPS)
    whole = GPT(model_config_from_state(last, read_state(last)), seed=TrainConfig().seed).state_dict()
    for dump in (reference["init"], resharded["init"]):
        weights = torch.load(dump, weights_only=True)
        assert weights.keys() == whole.keys()
        for name, value in whole.items():
            assert torch.equal(weights[name], value), (dump, name)
    assert torch.equal(weights["lm_head.weight"], weights["wte.weight"])  # still tied


# ---- exact resume -------------------------------------------------------------------------------


def test_stop_resume_stop_resume_under_fsdp_ends_bit_exact_and_a_write_killed_midway_is_removed(
        reference, stopped, tiny_text, tmp_path):
    """A real SIGTERM at step 12; the resumed run commits step 15 and is SIGKILLed inside its write of
    step 20 (every shard written, no manifest); the second resume reads step 15, a folder that a
    resumed run wrote (the pytorch #138575 class), removes the leftovers and ends bit for bit."""
    copy = copy_of(stopped, tmp_path)
    out = copy["out"]
    killed = run(launch_command(2), train_args(tiny_text, tmp_path) + ["--resume", "auto"],
                 environment(tmp_path / "records", **{KILL_IN_SAVE_ENV: f"{STEPS}:1"}))
    assert killed.returncode != 0 and f"resumed from {folder(out, STOP)} at step {STOP}" in killed.stdout
    half = list((out / "checkpoints").glob(f".step_{STEPS:08d}.tmp.*"))
    assert len(half) == 1 and (half[0] / METADATA).exists()
    shutil.copytree(half[0], folder(out, STEPS))  # and one under the step's own name, as if renamed early
    resumed = resume(tiny_text, tmp_path, 2)
    for leftover in (half[0], folder(out, STEPS)):
        assert f"removed {leftover}, left by an interrupted write" in resumed.stderr + resumed.stdout
    assert f"resumed from {folder(out, 15)} at step 15" in resumed.stdout
    assert final_state_difference(folder(out, STEPS), folder(reference["out"], STEPS)) is None
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


# ---- resharding ---------------------------------------------------------------------------------


def test_a_folder_resumes_resharded_with_the_same_state_windows_and_close_losses(reference, stopped, resharded):
    loaded, saved = torch.load(resharded["resumed"], weights_only=True), read_state(folder(stopped["out"], STOP))
    for key in SAME_STATE:
        assert first_difference(loaded[key], saved[key], key) is None
    assert windows(resharded["records"]) == windows(reference["records"])
    assert_close_losses(resharded["records"], reference["records"])


def test_what_a_resharded_run_saved_resumes_under_fsdp_with_the_same_state(reference, resharded, tiny_text,
                                                                          tmp_path):
    """Back from one process's folder or DDP's file to FSDP on 2 ranks; from 3 ranks' uneven shards to 2."""
    file = ".pt" if resharded["case"] == "ddp" else ""
    copy = copy_of(resharded, tmp_path, drop=(f"step_{STEPS:08d}{file}",))
    shutil.rmtree(copy["records"])  # this run's records alone
    saved_at, dump, stop = copy["out"] / "checkpoints" / f"step_00000015{file}", tmp_path / "resumed.pt", 17
    result = resume(tiny_text, tmp_path, 2, *FSDP, "--batch-size", "3", **{DUMP_RESUMED_ENV: str(dump),
                                                                            STOP_ENV: str(stop)})
    assert f"resumed from {saved_at} at step 15" in result.stdout and "sharded over 2 processes" in result.stdout
    loaded, saved = torch.load(dump, weights_only=True), read_state(saved_at)
    for key in SAME_STATE:
        assert first_difference(loaded[key], saved[key], key) is None
    assert folder(copy["out"], stop).is_dir()  # FSDP writes folders from here on (auto; or as asked)
    assert windows(copy["records"]) == {i: w for i, w in windows(reference["records"]).items() if 15 <= i < stop}
    ours, theirs = losses(copy["records"]), losses(reference["records"])
    assert list(ours) == [16, 17] and all(math.isclose(ours[s], theirs[s], rel_tol=1e-4) for s in ours)


def test_uneven_shards_on_3_ranks_resume_bit_exact(resharded, tiny_text, tmp_path):
    """The run resharded onto 3 ranks went on uninterrupted to step 20; resumed from its step 15 on 3
    ranks, it ends there bit for bit."""
    if resharded["case"] != "3 ranks":
        pytest.skip("3 ranks only")
    copy = copy_of(resharded, tmp_path, drop=(f"step_{STEPS:08d}",))
    result = resume(tiny_text, tmp_path, 3, "--batch-size", "2")
    assert f"resumed from {folder(copy['out'], 15)} at step 15" in result.stdout
    assert final_state_difference(folder(copy["out"], STEPS), folder(resharded["out"], STEPS)) is None
    for rank in range(3):
        assert losses(copy["records"], rank) == losses(resharded["records"], rank)


# ---- refusals -----------------------------------------------------------------------------------


def test_a_crafted_metadata_and_a_truncated_shard_are_refused_in_one_line_and_auto_falls_back(
        stopped, tiny_text, tmp_path, capsys):
    """In this process: the tool's refusal and a one-process resume of what is left."""
    copy = copy_of(stopped, tmp_path)
    newest, marker = folder(copy["out"], STOP), tmp_path / "marker"
    (newest / METADATA).write_bytes(pickle.dumps(_RunsCode(marker)))
    write_manifest(newest, {name: file_sha256(newest / name) for name in manifest_digests(newest)})  # digest matches
    shard = folder(copy["out"], 10) / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    refused = run_main(cli.main, train_args(tiny_text, tmp_path) + ["--resume", str(newest)], capsys)
    assert_one_line_error(refused, str(newest / METADATA), "refused, it asks to import posix.system")
    result = run_main(cli.main, train_args(tiny_text, tmp_path) + ["--resume", "auto", "--max-steps", "6"], capsys)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"skipping {newest / METADATA}: refused" in result.stderr
    assert f"skipping {shard}: checksum mismatch" in result.stderr
    assert f"resumed from {folder(copy['out'], 5)} at step 5" in result.stdout
    abandoned = copy["out"] / "checkpoints" / "abandoned" / "1"
    assert (abandoned / f"step_{STOP:08d}").is_dir() and (abandoned / "step_00000010").is_dir()  # kept, set aside
    assert not marker.exists()


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
