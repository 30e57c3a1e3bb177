"""Snapshotter: a CPU copy of a state that training may change at once, with the state's shape kept."""

from __future__ import annotations

import io
from collections import OrderedDict

import torch

from nanoresume.checkpoint.snapshot import Snapshotter


def saved_bytes(state: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_the_copy_does_not_change_when_the_state_does():
    weight = torch.arange(6, dtype=torch.float32)
    state = {"model": {"w": weight}, "step": 3, "history": [1.0, 2.0]}
    copy = Snapshotter().take(state)
    weight.add_(100)
    state["history"].append(3.0)
    assert torch.equal(copy["model"]["w"], torch.arange(6, dtype=torch.float32))
    assert copy["step"] == 3 and copy["history"] == [1.0, 2.0]
    assert copy["model"]["w"].untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()


def test_shared_storage_and_a_tensor_met_twice_stay_shared_so_the_file_is_the_same():
    embedding = torch.randn(5, 3)
    state = {"wte": embedding, "head": embedding, "view": embedding[1:3], "tail": embedding.view(-1)[4:9]}
    copy = Snapshotter().take(state)
    assert copy["wte"] is copy["head"]
    assert copy["view"].untyped_storage().data_ptr() == copy["wte"].untyped_storage().data_ptr()
    assert copy["tail"].storage_offset() == 4 and copy["view"].stride() == embedding[1:3].stride()
    assert saved_bytes(copy) == saved_bytes(state)


def test_containers_keep_their_types_and_order():
    state = OrderedDict([("b", (torch.ones(2), 1)), ("a", [torch.zeros(1), {"x": None}])])
    copy = Snapshotter().take(state)
    assert type(copy) is OrderedDict and list(copy) == ["b", "a"]
    assert isinstance(copy["b"], tuple) and isinstance(copy["a"], list) and copy["a"][1] == {"x": None}


def test_buffers_are_reused_for_the_same_storages_and_let_go_when_they_are_gone():
    snapshots = Snapshotter()
    weight = torch.randn(4)
    first = snapshots.take({"w": weight})
    pointer = first["w"].untyped_storage().data_ptr()
    weight.mul_(2)
    second = snapshots.take({"w": weight})
    assert second["w"].untyped_storage().data_ptr() == pointer  # the next checkpoint writes into the same memory
    assert torch.equal(second["w"], weight)
    other = torch.randn(4)
    third = snapshots.take({"o": other})
    assert torch.equal(third["o"], other) and len(snapshots._buffers) == 1


def test_gradients_are_not_copied_and_empty_tensors_survive():
    weight = torch.nn.Parameter(torch.randn(3))
    weight.grad = torch.ones(3)
    copy = Snapshotter().take({"w": weight, "empty": torch.empty(0, 2)})
    assert not copy["w"].requires_grad and copy["w"].grad is None
    assert copy["empty"].shape == (0, 2)
