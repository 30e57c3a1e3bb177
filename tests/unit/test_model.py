"""GPT shapes, loss, tied embeddings, that it can learn at all, and keyed initial weights."""

from __future__ import annotations

import math

import pytest
import torch

from nanoresume.config import ModelConfig
from nanoresume.model import (GPT, _copy_part, initial_value, materialize, parameter_count, parameter_key,
                              shapes_only)
from nanoresume.optim import build_optimizer

TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0)


def test_logits_have_shape_batch_time_vocab_and_the_loss_is_finite_near_uniform():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx = torch.randint(0, 256, (3, 16))
    logits, loss = model(idx, torch.randint(0, 256, (3, 16)))
    assert logits.shape == (3, 16, 256)
    assert loss.dim() == 0 and torch.isfinite(loss)
    # small init: predictions start close to uniform over 256 bytes
    assert abs(loss.item() - math.log(256)) < 0.5


def test_without_targets_the_loss_is_none_and_shorter_sequences_work():
    model = GPT(TINY)
    logits, loss = model(torch.zeros(2, 5, dtype=torch.long))
    assert loss is None
    assert logits.shape == (2, 5, 256)


def test_a_sequence_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        GPT(TINY)(torch.zeros(1, 17, dtype=torch.long))


def test_input_embedding_and_output_head_share_one_tensor_counted_once():
    model = GPT(TINY)
    assert model.lm_head.weight is model.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "wte.weight" in names and "lm_head.weight" not in names
    # By hand: embeddings 256*32 + 16*32; per block LayerNorms 2*64, qkv 32*96+96, proj 32*32+32,
    # MLP 32*128+128 and 128*32+32; final LayerNorm 64. The tied 256x32 matrix twice would be 42,368.
    assert model.num_parameters() == 8192 + 512 + 2 * (128 + 3168 + 1056 + 4224 + 4128) + 64 == 34_176


@pytest.mark.parametrize("cfg", [TINY, ModelConfig(n_layer=3, n_head=4, n_embd=48, block_size=40, bias=False)],
                         ids=["bias", "no-bias"])
def test_parameter_count_without_building_the_model_matches_the_built_model(cfg):
    assert parameter_count(cfg) == GPT(cfg).num_parameters()


def test_attention_is_causal_so_later_tokens_do_not_change_earlier_logits():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.randint(0, 256, (1, 10))
    changed = idx.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 256
    assert torch.equal(model(idx)[0][:, :7], model(changed)[0][:, :7])
    assert not torch.equal(model(idx)[0][:, 7:], model(changed)[0][:, 7:])


def test_a_tiny_model_overfits_a_tiny_text_within_a_hundred_steps():
    torch.manual_seed(0)
    tokens = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 8))
    model = GPT(TINY)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.99))
    starts = torch.arange(0, len(tokens) - 17, 7)
    x = torch.stack([tokens[s:s + 16] for s in starts])
    y = torch.stack([tokens[s + 1:s + 17] for s in starts])
    first = None
    for _ in range(80):  # the loss falls below a fifth by step ~60, to ~0.05 by 150
        _, loss = model(x, y)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 5.0
    assert loss.item() < first / 5, f"loss only fell from {first:.3f} to {loss.item():.3f}"


def test_greedy_generation_appends_tokens_and_is_deterministic():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    prompt = torch.tensor([[104, 105]])
    out = model.generate(prompt, max_new_tokens=20, temperature=0)
    assert out.shape == (1, 22)
    assert torch.equal(out[:, :2], prompt)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=20, temperature=0))


# ---- keyed initial weights ------------------------------------------------------------------------


def test_initial_weights_depend_on_the_seed_alone_and_draw_nothing_from_the_global_stream():
    torch.manual_seed(1)
    before = torch.get_rng_state()
    first = GPT(TINY, seed=7).state_dict()
    torch.manual_seed(2)  # a different global stream changes nothing
    second = GPT(TINY, seed=7).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["wte.weight"], GPT(TINY, seed=8).state_dict()["wte.weight"])
    torch.manual_seed(1)
    materialize(shapes_only(TINY), torch.device("cpu"), 7)
    assert torch.equal(torch.get_rng_state(), before)  # dropout's stream is left where seeding put it


def test_a_model_materialized_from_the_meta_device_equals_one_built_whole_and_keeps_its_tie():
    built = GPT(TINY, seed=3)
    meta = shapes_only(TINY)
    assert meta.wte.weight.is_meta
    model = materialize(meta, torch.device("cpu"), 3)
    assert model.lm_head.weight is model.wte.weight
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), built.state_dict().values()))


def test_initial_values_follow_gpt2_and_are_keyed_by_name_not_by_order():
    model = GPT(TINY, seed=0)
    assert torch.equal(model.blocks[0].ln_1.weight, torch.ones(32)) and not model.blocks[1].mlp.fc.bias.any()
    assert abs(model.blocks[0].mlp.fc.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.proj.weight.std().item() - 0.02 / math.sqrt(4)) < 0.002
    # a parameter's value is its name's: a deeper model starts its first block exactly as a shallow one
    deeper = GPT(ModelConfig(n_layer=3, n_head=2, n_embd=32, block_size=16), seed=0)
    assert torch.equal(deeper.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    assert parameter_key(0, "wte.weight") == parameter_key(0, "wte.weight") != parameter_key(1, "wte.weight")


@pytest.mark.parametrize("world", [2, 3, 5])
def test_the_shards_any_number_of_ranks_fill_in_put_together_are_the_whole_initial_value(world):
    """What each FSDP rank copies into its shard (torch.chunk along dim 0, as FSDP2 cuts: 256 rows over 3
    ranks is 86, 86, 84; 16 over 5 is 4, 4, 4, 4 and an empty shard)."""
    model = GPT(TINY, seed=0)
    for name, p in model.named_parameters():
        full = initial_value(model, name, 0)
        assert torch.equal(full, p.detach())
        parts = [_shard_of(full, world, rank) for rank in range(world)]
        assert torch.equal(torch.cat(parts), full), name


def _shard_of(full: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    from torch.distributed.tensor import Shard

    class Mesh:  # the two questions _copy_part asks of a device mesh
        def size(self, dim: int) -> int:
            return world

        def get_local_rank(self, dim: int) -> int:
            return rank

    expected = torch.chunk(full, world)[rank] if rank < len(torch.chunk(full, world)) else full[:0]
    target = torch.empty_like(expected)

    class Sharded:  # the parts of a DTensor _copy_part uses
        placements, device_mesh = (Shard(0),), Mesh()

        def to_local(self) -> torch.Tensor:
            return target

    _copy_part(Sharded(), full)
    return target
