"""The checkpoint schema: keys and types of both kinds, one line per problem, and it never raises."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from nanoresume import schema
from nanoresume.trainer import Trainer
from tests.helpers import TINY_FLAGS, TYPE_CONFUSED

@pytest.fixture(scope="module")
def states(tmp_path_factory: pytest.TempPathFactory, tiny_text) -> dict[str, dict[str, Any]]:
    """A real training state and a real weights state of the tiny model (built, never trained)."""
    from nanoresume.config import TrainConfig, resolve_config

    root = tmp_path_factory.mktemp("schema")
    cfg = resolve_config(TrainConfig(**TINY_FLAGS, data=str(tiny_text), out_dir=str(root / "out"),
                                     cache_dir=str(root / "cache"), progress=False))
    with Trainer(cfg) as trainer:
        train = trainer.state_dict()
    weights = {"format_version": 1, "kind": "weights", "model": train["model"],
               "model_config": {k: train["config"][k] for k in schema.SHAPE_FIELDS + ("dropout",)},
               "step": 0, "tokens_seen": 0, "val_loss": None}
    return {"train": train, "weights": weights}


def test_what_training_and_export_write_has_no_problems(states):
    assert schema.problems(states["train"]) == []
    assert schema.problems(states["weights"]) == []


@pytest.mark.parametrize("name", TYPE_CONFUSED)
def test_each_type_confused_checkpoint_gets_one_line_naming_its_key(states, name):
    mutate, named = TYPE_CONFUSED[name]
    state = copy.deepcopy(states["train"])
    mutate(state)
    found = schema.problems(state)
    assert len(found) == 1 and named in found[0] and "\n" not in found[0], found


@pytest.mark.parametrize("garbage", [None, [], "train", 3, {"format_version": 1},
                                     {"format_version": True, "kind": "train"},
                                     {"format_version": 1, "kind": "weights", "model": {"w": 1}, "step": 0,
                                      "tokens_seen": 0, "val_loss": "low", "model_config": []}])
def test_garbage_gives_problems_and_never_an_exception(garbage):
    found = schema.problems(garbage)
    assert found and all(isinstance(p, str) and "\n" not in p for p in found)


@pytest.mark.parametrize("mutate, named", [
    (lambda s: s["ranks"][0]["rng"]["python"].update(keys=torch.zeros(3, dtype=torch.int64)), "rng.python"),
    (lambda s: s.update(sampler={"seed": 1}), "sampler"),
    (lambda s: s.update(world_size=2), "world_size of 2"),
    (lambda s: s["ranks"][0].update(rank=1), "ranks[0].rank"),
    (lambda s: s["scheduler"].update(last_epoch="5"), "scheduler.last_epoch"),
    (lambda s: s.update(scaler={"scale": 1.0}), "scaler lacks"),
    (lambda s: s["model"].update(extra=[1, 2]), "'model'"),
    (lambda s: s["config"].update(lr=None), "config.lr is missing"),
    (lambda s: s["config"].update(time_limit="1h"), "config.time_limit"),
    (lambda s: s.update(step=3.0), "'step'"),
])
def test_deeper_problems_resume_would_crash_on_are_named_too(states, mutate, named):
    state = copy.deepcopy(states["train"])
    mutate(state)
    found = schema.problems(state)
    assert any(named in p for p in found), found


def test_fields_a_newer_version_adds_are_ignored_and_ones_an_older_lacks_take_defaults(states):
    state = copy.deepcopy(states["train"])
    state["config"]["from_a_future_version"] = [1, 2]
    del state["config"]["keep_last"]
    assert schema.problems(state) == []
