"""The check after every folder load: optimizer state laid out as its parameters, groups as saved."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from nanoresume.optim import build_optimizer, named_optimizer_state, parameter_names
from nanoresume.parallel import loaded_optimizer_problem


def stepped() -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    saved = named_optimizer_state(copy.deepcopy(optimizer.state_dict()), parameter_names(model, optimizer))
    return model, optimizer, saved


def test_an_optimizer_loaded_as_saved_passes():
    model, optimizer, saved = stepped()
    saved["param_groups"][0]["betas"] = list(saved["param_groups"][0]["betas"])  # a folder may give lists back
    assert loaded_optimizer_problem(model, optimizer, saved) is None


def test_a_moment_of_another_shape_than_its_parameter_is_named():
    model, optimizer, saved = stepped()
    weight = model[0].weight
    optimizer.state[weight]["exp_avg"] = torch.zeros(12)  # whole but flattened, as a bad load could leave it
    problem = loaded_optimizer_problem(model, optimizer, saved)
    assert problem == "optimizer state 0.weight.exp_avg is laid out as a tensor of shape (12,) but its parameter " \
                      "as a tensor of shape (3, 4)"


def test_a_parameter_group_that_did_not_round_trip_is_named():
    model, optimizer, saved = stepped()
    optimizer.param_groups[0]["lr"] = 0.5
    assert "parameter group 0 has lr 0.5 but the checkpoint" in loaded_optimizer_problem(model, optimizer, saved)
    model, optimizer, _ = stepped()
    optimizer.param_groups[1]["params"].reverse()
    assert loaded_optimizer_problem(model, optimizer, saved) == \
        "parameter group 1 holds other parameters than the checkpoint's"
    saved["param_groups"].pop()
    assert "2 parameter groups but the checkpoint 1" in loaded_optimizer_problem(model, optimizer, saved)
