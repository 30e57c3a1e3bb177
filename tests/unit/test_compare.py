"""One meaning of "identical": bit for bit, over both sides' keys, everything in the state."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from nanoresume.tools.chaos import final_state_difference
from nanoresume.checkpoint import save_atomically
from nanoresume.compare import find_difference, first_difference


def a_state() -> dict:
    return {"format_version": 1, "kind": "train", "model": {"w": torch.arange(6.0).reshape(2, 3)},
            "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
            "scheduler": {"last_epoch": 5}, "best_val_loss": math.inf, "nan": float("nan"),
            "ranks": [{"rng": {"torch": torch.tensor([1, 2], dtype=torch.uint8)}, "sampler": {"index": 3}}],
            "config": {"out_dir": "a", "resume": "none", "lr": 0.1}}


@pytest.mark.parametrize("change, where", [
    (lambda s: s["scheduler"].update(last_epoch=6), "['scheduler']['last_epoch']"),
    (lambda s: s["ranks"][0]["rng"]["torch"].add_(1), "['ranks'][0]['rng']['torch']"),
    (lambda s: s["ranks"][0]["sampler"].update(index=4), "['sampler']['index']"),
    (lambda s: s["optimizer"]["state"].update({1: {"exp_avg": torch.ones(2)}}), "keys only in A [], only in B ['1']"),
    (lambda s: s["model"]["w"].mul_(-0.0), "['model']['w']"),  # 0.0 -> -0.0: equal to torch.equal, not in bits
    (lambda s: s["model"].update(w=s["model"]["w"].double()), "torch.float32"),
    (lambda s: s["optimizer"]["param_groups"][0].update(params=(0,)), "list vs tuple"),
    (lambda s: s["config"].update(lr=0.2), "['config']['lr']"),
])
def test_any_difference_anywhere_is_found_and_named(change, where):
    a, b = a_state(), a_state()
    change(b)
    found = first_difference(a, b)
    assert found is not None and where in found, found


def test_identical_states_including_nan_are_identical():
    assert first_difference(a_state(), a_state()) is None


def test_final_state_difference_compares_the_whole_file_but_not_how_each_run_was_started(tmp_path: Path):
    def saved(name: str, state: dict) -> Path:
        path = tmp_path / f"{name}.pt"
        save_atomically(state, path)
        return path

    reference = saved("reference", a_state())
    resumed = copy.deepcopy(a_state())
    resumed["config"].update(out_dir="b", resume="auto")  # differ by design between the two runs
    assert final_state_difference(reference, saved("resumed", resumed)) is None
    other_rng = a_state()
    other_rng["ranks"][0]["rng"]["torch"][0] = 9
    assert "rng" in final_state_difference(reference, saved("other_rng", other_rng))
    extra = a_state()
    extra["scaler"] = {}
    assert "only in B ['scaler']" in final_state_difference(reference, saved("extra", extra))


def test_the_difference_found_carries_its_path_and_both_values():
    a, b = a_state(), a_state()
    b["optimizer"]["state"][0]["exp_avg"][1] = 2.0
    found = find_difference(a, b)
    assert found.path == ("optimizer", "state", 0, "exp_avg")
    assert found.where() == "state['optimizer']['state'][0]['exp_avg']"
    assert found.b[1].item() == 2.0 and found.what == "tensors differ"
