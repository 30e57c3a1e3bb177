"""The trainer's checkpoint: the counters, the dict built from named parts, and its folder layout."""

from __future__ import annotations

import math

import pytest

from nanoresume import training_state
from nanoresume.training_state import (CONFIG, COUNTERS, FORMAT_VERSION, KIND, RANKS, SAMPLER, SCALER, SCHEDULER,
                                       STATEFUL_PARTS, WHOLE_IN_FOLDERS, Counters)


class _Part:
    def __init__(self, state: dict) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def test_counters_round_trip_through_their_state_dict_including_infinity():
    fresh = Counters()
    assert fresh.best_val_loss == math.inf
    done = Counters(step=12, tokens_seen=3456, best_val_loss=1.25)
    restored = Counters()
    restored.load_state_dict(done.state_dict())
    assert restored == done
    restored.load_state_dict(fresh.state_dict())
    assert restored == fresh


def test_a_training_state_holds_the_header_the_counters_the_settings_and_every_named_part():
    parts = {name: _Part({"of": name}) for name in STATEFUL_PARTS}
    state = training_state.build(Counters(step=3), {"lr": 1.0}, {"fingerprint": "f", "source": "s"}, 2,
                                 model={"w": 1}, optimizer={"state": {}}, parts=parts, ranks=["r0", "r1"])
    assert list(state) == ["format_version", "kind", *COUNTERS, "world_size", "config", "data", "model",
                           "optimizer", "scheduler", "scaler", "sampler", "ranks"]
    assert (state["format_version"], state["kind"], state["step"]) == (FORMAT_VERSION, KIND, 3)
    assert [state[name] for name in (SCHEDULER, SCALER, SAMPLER)] == [{"of": name} for name in STATEFUL_PARTS]
    assert state[RANKS] == ["r0", "r1"] and state[CONFIG] == {"lr": 1.0}


def test_building_a_state_without_one_of_its_parts_is_a_bug():
    with pytest.raises(AssertionError):
        training_state.build(Counters(), {}, {}, 1, {}, {}, parts={SCHEDULER: _Part({})}, ranks=[])


def test_a_folder_stores_the_parts_without_tensors_whole_and_reads_them_back():
    state = {"step": 1, "model": {"w": 1}, **{key: {"k": key} for key in WHOLE_IN_FOLDERS}}
    stored = training_state.for_folder(state)
    assert all(stored[key] == ({"k": key},) for key in WHOLE_IN_FOLDERS)
    assert stored["model"] == {"w": 1} and stored["step"] == 1
    assert training_state.from_folder(stored) == state


def test_a_folder_part_that_is_not_a_one_tuple_is_left_for_the_schema_check():
    assert training_state.from_folder({"sampler": ("a", "b")}) == {"sampler": ("a", "b")}
