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


def _set(path: str, value: Any) -> Any:
    """A mutation that puts ``value`` at ``path`` (``a.b.0.c``) of a state."""
    def mutate(state: dict[str, Any]) -> None:
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        node: Any = state
        for key in parents:
            node = node[key]
        node[last] = value
    return mutate


# Every integer of a training state, a value just past each of its bounds, and what the line must name.
OUT_OF_BOUNDS = [
    ("step", -5, "'step'"), ("step", 10 ** 30, "'step'"), ("step", 2 ** 62, "'step'"),
    ("tokens_seen", -1, "'tokens_seen'"), ("tokens_seen", 10 ** 30, "'tokens_seen'"),
    ("evaluated_step", -2, "'evaluated_step'"), ("evaluated_step", 10 ** 30, "'evaluated_step'"),
    ("world_size", 0, "'world_size'"), ("world_size", 10 ** 30, "'world_size'"),
    ("format_version", 10 ** 30, "'format_version'"),
    ("scheduler.last_epoch", -2, "scheduler.last_epoch"), ("scheduler.last_epoch", 10 ** 30, "scheduler.last_epoch"),
    ("sampler.index", -1, "sampler.index"), ("sampler.index", 10 ** 30, "sampler.index"),
    ("sampler.seed", -1, "sampler.seed"), ("sampler.seed", 2 ** 64, "sampler.seed"),
    ("ranks.0.rng.numpy.pos", 625, "rng.numpy.pos"), ("ranks.0.rng.numpy.has_gauss", 2, "rng.numpy.has_gauss"),
    ("ranks.0.rng.python.version", 10 ** 30, "rng.python.version"),
    ("optimizer.param_groups.0.params.0", -1, "param_groups"),
    ("optimizer.param_groups.0.params.0", 10 ** 30, "param_groups"),
    ("config.n_embd", 10 ** 30, "config.n_embd"), ("config.n_layer", 0, "config.n_layer"),
    ("config.seed", 2 ** 64, "config.seed"), ("config.max_steps", -5, "config.max_steps"),
    ("config.grad_accum", 10 ** 20, "config.grad_accum"),
    ("scaler", {"scale": 1.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 0,
                "_growth_tracker": 0}, "scaler.growth_interval"),
    ("scaler", {"scale": 1.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                "_growth_tracker": 10 ** 30}, "scaler._growth_tracker"),
]


@pytest.mark.parametrize("path, value, named", OUT_OF_BOUNDS)
def test_every_integer_out_of_its_bounds_is_one_line_naming_the_key_and_the_bound(states, path, value, named):
    state = copy.deepcopy(states["train"])
    _set(path, value)(state)
    found = schema.problems(state)
    assert len(found) == 1 and named in found[0] and "\n" not in found[0], found
    assert " in [" in found[0], found  # the bound, as [low, high]


@pytest.mark.parametrize("kind, path, value", [("train", "step", 2 ** 62 - 1), ("train", "evaluated_step", -1),
                                               ("train", "config.seed", 2 ** 64 - 1),
                                               ("weights", "step", 2 ** 62 - 1), ("weights", "tokens_seen", 0)])
def test_integers_at_their_bounds_are_accepted(states, kind, path, value):
    state = copy.deepcopy(states[kind])
    _set(path, value)(state)
    assert schema.problems(state) == []


@pytest.mark.parametrize("key, value", [("step", -5), ("step", 10 ** 30), ("tokens_seen", -1)])
def test_a_weights_file_with_an_integer_out_of_bounds_is_refused(states, key, value):
    state = copy.deepcopy(states["weights"])
    state[key] = value
    found = schema.problems(state)
    assert len(found) == 1 and f"'{key}'" in found[0], found
