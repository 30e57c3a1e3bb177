"""torchrun + FSDP2 on CPU (gloo) with checkpoint folders: initial weights identical bit for bit in every
layout, exact resume on 3 ranks' uneven shards after a SIGKILL inside a sharded write, after a real
SIGTERM, and from a folder a resumed run wrote; resharding from one process's file onto 3 ranks, from
3 ranks onto one process, onto FSDP on 2 ranks and onto DDP; refusals of damaged or crafted folders,
and the tools on a folder.

Few launches on purpose (each process costs seconds of CPU before its first step): a chain of three on
3 ranks and two on 2, each launch doing several checks. A one-process run (in this process) trains to
step 5 and saves a file; the reference resumes it on 3 ranks (256 and 32 rows cut 86 + 86 + 84 and
11 + 11 + 10), trains uninterrupted and is SIGKILLed inside its write of step 20, once every shard is
written: that half-written folder holds the uninterrupted state of step 20. The stopped run resumes
step 15 and sends itself a real SIGTERM at step 17; the last resumes that and must end bit for bit
where the reference did. From those folders a one-process run (in this process), FSDP on 2 ranks and
DDP resume resharded. The refusals run in this process too.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from nanoresume.checkpoint.folders import METADATA, file_sha256, manifest_digests, write_manifest
from nanoresume.compare import first_difference
from nanoresume.config import TrainConfig, read_command_line
from nanoresume.loading import load_model, model_config_from_state, read_state
from nanoresume.model import GPT
from nanoresume.tools import ckpt, cli
from nanoresume.tools.chaos import comparable_state
from nanoresume.trainer import Trainer
from tests.harness.probes import DUMP_INIT_ENV, DUMP_RESUMED_ENV, KILL_IN_SAVE_ENV, SIGTERM_ENV, STOP_ENV, read_records
from tests.helpers import TINY_FLAGS, assert_one_line_error, cli_flags, run_main
from tests.integration.test_distributed import AUDIT, environment, launch_command, losses, run

pytestmark = pytest.mark.slow

STEPS, FIRST, STOP = 20, 5, 17
RANKS = 3  # uneven shards: 256 and 32 rows over 3 ranks
# dropout 0: with no random numbers in the step, runs on different world sizes differ only by rounding.
# A global batch of 6 sequences: 2 a rank on 3 ranks, 3 on 2, 2 x 3 accumulated by one process.
# 3 evaluation batches: under FSDP on 2 ranks, rank 1 runs one more forward that counts for nothing.
FLAGS = dict(TINY_FLAGS, batch_size=2, dropout=0.0, max_steps=STEPS, eval_interval=10, eval_iters=3,
             ckpt_interval=5, progress=False)
FSDP = ["--parallel", "fsdp"]
SAME_STATE = ("model", "optimizer", "scheduler", "scaler", "sampler", "step", "tokens_seen", "best_val_loss")


def train_args(tiny_text: Path, root: Path, out: str = "out") -> list[str]:
    return cli_flags(dict(FLAGS, data=str(tiny_text), out_dir=str(root / out), cache_dir=str(root.parent / "cache")))


def folder(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}"


def sealed(half_written: Path, to: Path) -> Path:
    """A copy of a folder whose write was killed before its manifest, with the manifest it would have
    had: readable by the checks, so that the state it holds can be compared."""
    shutil.copytree(half_written, to)
    write_manifest(to, {path.name: file_sha256(path) for path in to.iterdir()})
    return to


def difference_but_samples(a: Path, b: Path) -> Optional[str]:
    """Where two checkpoints' whole states first differ (:func:`~nanoresume.tools.chaos.final_state_difference`)
    but for ``--sample-tokens``: the reference printed samples, the runs resumed from it did not, and
    that must change nothing else."""
    states = [comparable_state(path) for path in (a, b)]
    for state in states:
        state["config"].pop("sample_tokens")
    return first_difference(*states)


@pytest.fixture(scope="module")
def reference(tiny_text: Path, tmp_path_factory) -> dict[str, Path]:
    """One process trains to step 5 (in this process) and saves a file; 3 FSDP ranks resume it, with
    every file operation of each rank under OUT audited, print text samples at their evaluations (each
    token a forward that every rank takes part in; the later runs do not), and train uninterrupted to
    step 20, where rank 1 SIGKILLs itself inside the folder's write (every shard written, no manifest)."""
    root = tmp_path_factory.mktemp("fsdp-reference")
    out, records = root / "out", root / "records"
    records.mkdir()
    code = train_in_this_process(train_args(tiny_text, root) + ["--grad-accum", "3"], records, stop_at=FIRST)
    assert code == 143 and (out / "checkpoints" / f"step_{FIRST:08d}.pt").is_file()
    env = environment(records, PYTHONPATH=f"{AUDIT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                      NANORESUME_AUDIT_WATCH=str(out), NANORESUME_AUDIT_LOG=str(root / "audit"),
                      **{DUMP_INIT_ENV: str(root / "init.pt"), DUMP_RESUMED_ENV: str(root / "resumed.pt"),
                         KILL_IN_SAVE_ENV: f"{STEPS}:1"})
    flags = FSDP + ["--resume", "auto", "--sample-tokens", "4"]
    result = run(launch_command(RANKS), train_args(tiny_text, root) + flags, env)
    assert result.returncode != 0, result.stdout + result.stderr
    assert f"sharded over {RANKS} processes (FSDP2)" in result.stdout
    assert f"resumed from {out / 'checkpoints' / f'step_{FIRST:08d}.pt'} at step {FIRST}" in result.stdout
    assert "start new streams" in result.stdout + result.stderr
    assert result.stdout.count("sample at step 10:\n  | def ") == 1, result.stdout
    half = list((out / "checkpoints").glob(f".step_{STEPS:08d}.tmp.*"))
    assert len(half) == 1 and (half[0] / METADATA).exists()
    return {"out": out, "records": records, "audit": root / "audit", "init": root / "init.pt",
            "resumed": root / "resumed.pt", "half": half[0], "end": sealed(half[0], root / "end")}


@pytest.fixture(scope="module")
def stopped(reference, tiny_text: Path, tmp_path_factory) -> dict[str, Any]:
    """The reference resumed from step 15 on 3 ranks, which removes the half-written folder (and a copy
    of it under the step's own name, as if renamed early), until rank 1 sends itself a real SIGTERM at
    step 17."""
    root = tmp_path_factory.mktemp("fsdp-stopped")
    copy = copy_of(reference, root)
    out = copy["out"]
    half = out / "checkpoints" / reference["half"].name
    shutil.copytree(half, folder(out, STEPS))
    copy["records"] = root / "resumed-records"  # this run's steps alone, compared with the reference's
    result = run(launch_command(RANKS), train_args(tiny_text, root) + ["--resume", "auto"],
                 environment(copy["records"], **{SIGTERM_ENV: f"{STOP}:1"}))
    for leftover in (half, folder(out, STEPS)):
        assert f"removed {leftover}, left by an interrupted write" in result.stderr + result.stdout
        assert not leftover.exists()
    assert f"resumed from {folder(out, 15)} at step 15" in result.stdout
    assert f"stopped by SIGTERM after step {STOP}; saved {folder(out, STOP)}" in result.stdout, \
        result.stdout + result.stderr
    assert "exitcode  : 143" in result.stderr
    return copy


def copy_of(run_paths: dict[str, Path], tmp_path: Path, drop: tuple[str, ...] = ()) -> dict[str, Path]:
    """A copy of a run's OUT and records under ``tmp_path``, without the checkpoints named in ``drop``."""
    shutil.copytree(run_paths["out"], tmp_path / "out")
    shutil.copytree(run_paths["records"], tmp_path / "records")
    for name in drop:
        path = tmp_path / "out" / "checkpoints" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return {"out": tmp_path / "out", "records": tmp_path / "records"}


def train_in_this_process(argv: list[str], records: Path, stop_at: Optional[int] = None, **dumps: str) -> int:
    """What a plain one-process launch with the probes would do, without the seconds a process costs:
    every step's loss and windows appended to ``records`` as rank 0's, a stop asked for after step
    ``stop_at`` as a SIGTERM would, the initial weights and the resumed state dumped where ``dumps``
    says (``DUMP_INIT_ENV``, ``DUMP_RESUMED_ENV``). Returns the run's exit code."""
    from nanoresume import building
    from nanoresume.data import BatchSampler

    line, initial = read_command_line(argv), {}
    materialize, draw = building.materialize, BatchSampler.next_micro_batches

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

    def on_step(trainer: Trainer, step: int, loss: float) -> None:
        record({"step": step, "loss": loss})
        if step == stop_at:
            trainer.stop.request("SIGTERM", 143)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(building, "materialize", materialized)
        patch.setattr(BatchSampler, "next_micro_batches", recorded_draw)
        trainer = Trainer(line.cfg, explicit=line.explicit, on_step=on_step)
        if DUMP_INIT_ENV in dumps:
            torch.save(initial, dumps[DUMP_INIT_ENV])
        if DUMP_RESUMED_ENV in dumps:
            torch.save(trainer.state_dict(), dumps[DUMP_RESUMED_ENV])
        return trainer.run().exit_code


def windows(records: Path) -> dict[int, list[int]]:
    """Step index -> every window of that step's global batch, in rank order, from however many ranks."""
    per_rank = [read_records(records, int(p.stem[4:]))[1] for p in sorted(records.glob("rank*.jsonl"))]
    indices = sorted(set().union(*per_rank))
    return {index: [o for rank in per_rank if index in rank for o in rank[index]] for index in indices}


def assert_resumed_resharded(leg: dict[str, Any], reference: dict[str, Path]) -> None:
    """A run on another world size or layout resumed with the state its checkpoint holds, drew every
    step's windows as the reference did, and its losses are the reference's up to rounding."""
    loaded, saved = torch.load(leg["resumed"], weights_only=True), read_state(leg["from"])
    for key in SAME_STATE:
        assert first_difference(loaded[key], saved[key], key) is None, leg["case"]
    ours, theirs = windows(leg["records"]), windows(reference["records"])
    assert ours and ours == {i: w for i, w in theirs.items() if i in ours}, leg["case"]
    ours, theirs = losses(leg["records"]), losses(reference["records"])
    assert list(ours) == list(range(leg["first"] + 1, leg["last"] + 1)), (leg["case"], list(ours))
    for step, loss in ours.items():
        assert math.isclose(loss, theirs[step], rel_tol=1e-4), (leg["case"], step, loss, theirs[step])


# ---- resharded runs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process(reference, tiny_text: Path, tmp_path_factory) -> dict[str, Any]:
    """The reference's step 10 (3 ranks' uneven shards) resumed by one process, in this process, to the
    end, writing folders; its initial weights (built before the resume replaced them) and the state it
    resumed with dumped."""
    root = tmp_path_factory.mktemp("fsdp-one-process")
    copy = copy_of(reference, root, drop=("step_00000015", reference["half"].name))
    records = root / "leg-records"
    records.mkdir()
    code = train_in_this_process(train_args(tiny_text, root) + ["--resume", "auto", "--ckpt-format", "sharded"],
                                 records, **{DUMP_INIT_ENV: str(root / "init.pt"),
                                             DUMP_RESUMED_ENV: str(root / "resumed.pt")})
    assert code == 0 and folder(copy["out"], STEPS).is_dir()
    return dict(copy, records=records, case="one process", init=root / "init.pt", resumed=root / "resumed.pt",
                first=10, last=STEPS, **{"from": folder(reference["out"], 10)})


ON_TWO_RANKS = {  # flags, and what the run writes at its stop (FSDP: folders, DDP: files; auto)
    "fsdp": (FSDP + ["--batch-size", "3"], "step_00000019"),
    "ddp": (["--parallel", "ddp", "--batch-size", "3"], "step_00000019.pt"),
}


@pytest.fixture(scope="module", params=list(ON_TWO_RANKS))
def two_ranks(request, stopped, tiny_text: Path, tmp_path_factory) -> dict[str, Any]:
    """Step 17 of the stopped run (3 ranks' uneven shards, written by a resumed run) resumed on 2 ranks,
    under FSDP or DDP, until a stop at step 19; its initial weights and the state it resumed with dumped."""
    root = tmp_path_factory.mktemp(f"fsdp-two-ranks-{request.param}")
    copy = copy_of(stopped, root)
    records, (flags, written), stop = root / "leg-records", ON_TWO_RANKS[request.param], 19
    result = run(launch_command(2), train_args(tiny_text, root) + flags + ["--resume", "auto"],
                 environment(records, **{DUMP_INIT_ENV: str(root / "init.pt"),
                                         DUMP_RESUMED_ENV: str(root / "resumed.pt"), STOP_ENV: str(stop)}))
    assert f"resumed from {folder(copy['out'], STOP)} at step {STOP}" in result.stdout, result.stdout + result.stderr
    assert ("sharded over 2 processes" in result.stdout) == (request.param == "fsdp")
    assert "start new streams" in result.stdout + result.stderr
    assert (copy["out"] / "checkpoints" / written).exists(), written
    return dict(copy, records=records, case=f"{request.param} on 2 ranks", init=root / "init.pt",
                resumed=root / "resumed.pt", first=STOP, last=stop, **{"from": folder(stopped["out"], STOP)})


# ---- initial weights ----------------------------------------------------------------------------


def test_the_initial_weights_are_identical_bit_for_bit_in_every_layout_and_world_size(reference, one_process,
                                                                                     two_ranks):
    """Keyed by (seed, parameter name), each rank filling only its shard: FSDP on 3 ranks cuts 256 rows
    into 86 + 86 + 84, yet the gathered weights equal one process's, DDP's and FSDP on 2 ranks'."""
    last = folder(reference["out"], 15)
    whole = GPT(model_config_from_state(last, read_state(last)), seed=TrainConfig().seed).state_dict()
    for dump in (reference["init"], one_process["init"], two_ranks["init"]):
        weights = torch.load(dump, weights_only=True)
        assert weights.keys() == whole.keys()
        for name, value in whole.items():
            assert torch.equal(weights[name], value), (dump, name)
        assert torch.equal(weights["lm_head.weight"], weights["wte.weight"])  # still tied


# ---- exact resume -------------------------------------------------------------------------------


def test_sigkill_in_a_sharded_write_then_sigterm_then_resume_on_3_ranks_uneven_shards_ends_bit_exact(
        reference, stopped, tiny_text, tmp_path):
    """The reference was SIGKILLed inside its write of step 20; the stopped run resumed its step 15,
    removed the leftovers and was stopped by a real SIGTERM at step 17; resumed from that folder, one
    that a resumed run wrote (the pytorch #138575 class), the run ends bit for bit as the reference's
    uninterrupted step 20, every rank's every loss the same."""
    copy = copy_of(stopped, tmp_path)
    records = tmp_path / "last-records"  # this run's steps alone
    resumed = run(launch_command(RANKS), train_args(tiny_text, tmp_path) + ["--resume", "auto"],
                  environment(records))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {folder(copy['out'], STOP)} at step {STOP}" in resumed.stdout
    assert difference_but_samples(folder(copy["out"], STEPS), reference["end"]) is None
    for rank in range(RANKS):  # each start's own steps, each loss equal to the uninterrupted run's
        ours = {**losses(stopped["records"], rank), **losses(records, rank)}
        assert sorted(losses(stopped["records"], rank)) == list(range(16, STOP + 1))
        assert sorted(losses(records, rank)) == list(range(STOP + 1, STEPS + 1))
        assert ours == {step: loss for step, loss in losses(reference["records"], rank).items() if step > 15}


def test_best_pt_under_fsdp_is_one_file_with_the_whole_model(reference):
    """Written with the step's save, by rank 0 from the gathered weights: at step 10 (the kill inside the
    write of step 20 took that step's)."""
    best = read_state(reference["out"] / "best.pt")
    assert best["kind"] == "weights" and best["step"] == 10
    assert first_difference(best["model"], read_state(folder(reference["out"], 10))["model"]) is None


def test_each_rank_writes_only_its_own_shards_and_rank_0_everything_else(reference):
    audit = reference["audit"]
    for rank in range(1, RANKS):
        lines = Path(f"{audit}.rank{rank}").read_text().splitlines()
        assert lines and all("/checkpoints/.step_" in line and ".tmp." in line and f"/__{rank}_" in line
                             for line in lines if line.startswith("open")), lines
        assert not [line for line in lines if not line.startswith(("open", "os.mkdir"))], lines
    rank0 = Path(f"{audit}.rank0").read_text()
    assert "MANIFEST.sha256" in rank0 and "best.pt" in rank0 and "config.json" in rank0


# ---- resharding ---------------------------------------------------------------------------------


def test_a_checkpoint_resumes_resharded_with_the_same_state_windows_and_close_losses(reference, one_process,
                                                                                   two_ranks):
    """One process's file onto 3 ranks' shards (the reference), 3 ranks' uneven shards onto one process,
    onto FSDP on 2 ranks and onto DDP."""
    loaded = torch.load(reference["resumed"], weights_only=True)
    saved = read_state(reference["out"] / "checkpoints" / f"step_{FIRST:08d}.pt")
    for key in SAME_STATE:
        assert first_difference(loaded[key], saved[key], key) is None
    for leg in (one_process, two_ranks):
        assert_resumed_resharded(leg, reference)


# ---- refusals -----------------------------------------------------------------------------------


def test_a_crafted_metadata_and_a_truncated_shard_are_refused_in_one_line_and_auto_falls_back(
        stopped, tiny_text, tmp_path, capsys):
    """In this process: the tool's refusal and a one-process resume of what is left."""
    copy = copy_of(stopped, tmp_path)
    newest, marker = folder(copy["out"], STOP), tmp_path / "marker"
    (newest / METADATA).write_bytes(pickle.dumps(_RunsCode(marker)))
    write_manifest(newest, {name: file_sha256(newest / name) for name in manifest_digests(newest)})  # digest matches
    shard = folder(copy["out"], 15) / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    refused = run_main(cli.main, train_args(tiny_text, tmp_path) + ["--resume", str(newest)], capsys)
    assert_one_line_error(refused, str(newest / METADATA), "refused, it asks to import posix.system")
    result = run_main(cli.main, train_args(tiny_text, tmp_path) + ["--resume", "auto", "--max-steps", "11"], capsys)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"skipping {newest / METADATA}: refused" in result.stderr
    assert f"skipping {shard}: checksum mismatch" in result.stderr
    assert f"resumed from {folder(copy['out'], 10)} at step 10" in result.stdout
    abandoned = copy["out"] / "checkpoints" / "abandoned" / "1"
    assert (abandoned / f"step_{STOP:08d}").is_dir() and (abandoned / "step_00000015").is_dir()  # kept, set aside
    assert not marker.exists()


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


# ---- the tools ----------------------------------------------------------------------------------


def test_the_checkpoint_tools_list_verify_show_diff_and_export_a_folder(stopped, tmp_path, capsys):
    out, newest = stopped["out"], folder(stopped["out"], STOP)
    assert ckpt.main(["list", str(out)]) == 0
    listed = capsys.readouterr().out
    assert f"--resume auto would pick: {newest.name}" in listed
    assert listed.count(" ok") == 3, listed  # 10, 15 and 17: the last three are kept
    assert ckpt.main(["verify", str(newest)]) == 0
    assert f"ok   {newest}" in capsys.readouterr().out
    assert ckpt.main(["show", str(newest)]) == 0
    shown = capsys.readouterr().out
    assert ("stored as a folder of shards: .metadata, MANIFEST.sha256, __0_0.distcp, __1_0.distcp, "
            "__2_0.distcp") in shown, shown
    assert f"written by {RANKS} process(es)" in shown
    assert ckpt.main(["diff", str(newest), str(newest)]) == 0 and "identical" in capsys.readouterr().out
    assert ckpt.main(["diff", str(folder(out, 10)), str(newest)]) == 1
    capsys.readouterr()
    assert ckpt.main(["export", str(newest), "--to", str(tmp_path / "weights.pt")]) == 0
    model, state = load_model(tmp_path / "weights.pt", torch.device("cpu"))
    assert first_difference(model.state_dict(), read_state(newest)["model"]) is None
    assert state["kind"] == "weights" and state["step"] == STOP
    assert ckpt.main(["verify", str(out)]) == 0
