"""Crafted DCP indexes built only from the allow-listed classes, with the manifest recomputed: each is
refused in one line before a tensor is allocated or a path is followed, by the folder reader, by
``ckpt verify`` and ``ckpt list``, and ``--resume auto`` falls back past such a folder."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch.distributed.checkpoint import metadata as dcp_metadata

from nanoresume.checkpoint import sharded, step_folder_path
from nanoresume.checkpoint.folders import METADATA
from nanoresume.errors import CheckpointError
from nanoresume.tools import ckpt, evaluation, sampling
from nanoresume.trainer import Trainer
from tests.helpers import assert_one_line_error, run_main
from tests.unit.test_sharded import reseal, saved_folder

Craft = Callable[[dcp_metadata.Metadata], None]


def _tensor_fqn(metadata: dcp_metadata.Metadata) -> str:
    """The largest tensor, so a changed size cannot hide behind a small one."""
    tensors = {fqn: item for fqn, item in metadata.state_dict_metadata.items()
               if isinstance(item, dcp_metadata.TensorStorageMetadata)}
    return max(tensors, key=lambda fqn: tensors[fqn].size.numel())


def _resize(size: tuple[int, ...]) -> Craft:
    def craft(metadata: dcp_metadata.Metadata) -> None:
        fqn = _tensor_fqn(metadata)
        metadata.state_dict_metadata[fqn] = dataclasses.replace(metadata.state_dict_metadata[fqn],
                                                                size=torch.Size(size))
    return craft


def _float_size(metadata: dcp_metadata.Metadata) -> None:
    """A size torch.Size would refuse to build, stored as a plain tuple (a pickle can say anything)."""
    fqn = _tensor_fqn(metadata)
    metadata.state_dict_metadata[fqn] = dataclasses.replace(metadata.state_dict_metadata[fqn], size=(2.5,))


def _empty_path(metadata: dcp_metadata.Metadata) -> None:
    metadata.planner_data[_tensor_fqn(metadata)] = ()


def _prefix_path(metadata: dcp_metadata.Metadata) -> None:
    """A plain value where a tensor's path passes through: ``step`` stored at ``(<tensor's first key>,)``."""
    metadata.planner_data["step"] = metadata.planner_data[_tensor_fqn(metadata)][:1]


def _same_path(metadata: dcp_metadata.Metadata) -> None:
    metadata.planner_data["step"] = metadata.planner_data[_tensor_fqn(metadata)]


def _huge_list_index(metadata: dcp_metadata.Metadata) -> None:
    """A list index that would make the reader build a list of 10**12 entries."""
    metadata.planner_data["step"] = ("step", 10 ** 12)


def _mixed_keys(metadata: dcp_metadata.Metadata) -> None:
    """One path asks for a list where another asks for a dict."""
    first = metadata.planner_data[_tensor_fqn(metadata)][0]
    metadata.planner_data["step"] = (first, 0)


def _chunk_outside(metadata: dcp_metadata.Metadata) -> None:
    fqn = _tensor_fqn(metadata)
    item = metadata.state_dict_metadata[fqn]
    chunk = item.chunks[0]
    moved = dataclasses.replace(chunk, offsets=torch.Size([o + 10 ** 9 for o in chunk.offsets]))
    metadata.state_dict_metadata[fqn] = dataclasses.replace(item, chunks=[moved])


def _length_beyond_file(metadata: dcp_metadata.Metadata) -> None:
    index = next(iter(metadata.storage_data))
    metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], length=10 ** 15)


CRAFTED: dict[str, tuple[Craft, str]] = {
    "negative-size": (_resize((-5,)), "size"),
    "absurd-size": (_resize((10 ** 9, 10 ** 9)), "size"),
    "non-int-size": (_float_size, "size"),
    "empty-path": (_empty_path, "path"),
    "prefix-path": (_prefix_path, "path"),
    "same-path": (_same_path, "path"),
    "huge-list-index": (_huge_list_index, "path"),
    "list-and-dict-keys": (_mixed_keys, "path"),
    "chunk-outside-tensor": (_chunk_outside, "chunk"),
    "length-beyond-file": (_length_beyond_file, "beyond"),
}


def craft_folder(folder: Path, name: str) -> Path:
    """Rewrite ``folder``'s index by the crafting ``name`` and recompute its manifest."""
    metadata = pickle.loads((folder / METADATA).read_bytes())  # the folder is ours: plain pickle is fine
    CRAFTED[name][0](metadata)
    (folder / METADATA).write_bytes(pickle.dumps(metadata))
    reseal(folder)
    return folder


# ---- the reader ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CRAFTED)
def test_a_crafted_index_is_refused_in_one_line_by_every_reader(tmp_path: Path, name: str) -> None:
    folder = craft_folder(saved_folder(tmp_path), name)
    for read in (sharded.verify_folder, sharded.read_folder,
                 lambda f: sharded.read_folder(f, placeholders_under=("model",)), sharded.stored_keys):
        with pytest.raises(CheckpointError) as info:
            read(folder)
        message = str(info.value)
        assert "\n" not in message and str(folder / METADATA) in message and CRAFTED[name][1] in message, message


def test_a_well_formed_index_still_reads(tmp_path: Path) -> None:
    assert sharded.read_folder(saved_folder(tmp_path))["step"] == 1


# ---- the tools and a resume ----------------------------------------------------------------------

GOOD, CRAFTED_STEP = 5, 10


@pytest.fixture(scope="module")
def sharded_template(reference_run) -> Any:
    """A run of sharded step checkpoints 5 and 10, trained once per session."""
    return reference_run(max_steps=CRAFTED_STEP, eval_interval=GOOD, ckpt_format="sharded")


@pytest.fixture
def crafted_run(sharded_template, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    cfg = sharded_template.copy_to(tmp_path / "out")
    craft_folder(step_folder_path(Path(cfg.out_dir) / "checkpoints", CRAFTED_STEP), request.param)
    return cfg


@pytest.mark.parametrize("crafted_run", ["negative-size", "absurd-size", "empty-path", "prefix-path"],
                         indirect=True)
def test_ckpt_verify_and_list_report_the_crafted_folder_as_bad_in_one_line(crafted_run: Any, capsys) -> None:
    out = Path(crafted_run.out_dir)
    folder = step_folder_path(out / "checkpoints", CRAFTED_STEP)
    proc = run_main(ckpt.main, ["verify", str(folder)], capsys)
    bad = [line for line in proc.stdout.splitlines() if line.startswith("BAD")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert len(bad) == 1 and str(folder / METADATA) in bad[0], proc.stdout
    proc = run_main(ckpt.main, ["list", str(out)], capsys)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    bad = [line for line in proc.stdout.splitlines() if "BAD" in line]
    assert len(bad) == 1 and bad[0].split()[0] == str(CRAFTED_STEP), proc.stdout
    assert f"--resume auto would pick: {step_folder_path(out, GOOD).name}" in proc.stdout


@pytest.mark.parametrize("crafted_run", ["negative-size", "absurd-size", "empty-path", "prefix-path"],
                         indirect=True)
def test_resume_auto_falls_back_past_a_crafted_folder_with_a_warning(crafted_run: Any,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    checkpoints = Path(crafted_run.out_dir) / "checkpoints"
    with Trainer(dataclasses.replace(crafted_run, resume="auto", max_steps=CRAFTED_STEP + 2)) as trainer:
        assert trainer.resumed_from == step_folder_path(checkpoints, GOOD)
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(skipped) == 1 and str(step_folder_path(checkpoints, CRAFTED_STEP)) in skipped[0], skipped


@pytest.mark.parametrize("crafted_run", ["negative-size", "absurd-size", "empty-path", "prefix-path"],
                         indirect=True)
def test_show_sample_and_evaluate_refuse_the_crafted_folder_in_one_line(crafted_run: Any, tiny_text: Path,
                                                                        capsys) -> None:
    folder = step_folder_path(Path(crafted_run.out_dir) / "checkpoints", CRAFTED_STEP)
    named = str(folder / METADATA)
    assert_one_line_error(run_main(ckpt.main, ["show", str(folder)], capsys), named)
    assert_one_line_error(run_main(sampling.main, ["--ckpt", str(folder), "--max-new-tokens", "2"], capsys), named)
    assert_one_line_error(run_main(evaluation.main, ["--ckpt", str(folder), "--data", str(tiny_text),
                                                     "--no-progress"], capsys), named)
