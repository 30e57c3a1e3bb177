"""GPT shapes, loss, tied embeddings, and that it can learn at all."""

from __future__ import annotations

import math

import pytest
import torch

from nanoresume.config import ModelConfig
from nanoresume.model import GPT, parameter_count
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


def test_a_tiny_model_overfits_a_tiny_text_within_a_few_hundred_steps():
    torch.manual_seed(0)
    tokens = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 8))
    model = GPT(TINY)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.99))
    starts = torch.arange(0, len(tokens) - 17, 7)
    x = torch.stack([tokens[s:s + 16] for s in starts])
    y = torch.stack([tokens[s + 1:s + 17] for s in starts])
    first = None
    for _ in range(150):
        _, loss = model(x, y)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 5.0
    assert loss.item() < first / 3, f"loss only fell from {first:.3f} to {loss.item():.3f}"


def test_greedy_generation_appends_tokens_and_is_deterministic():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    prompt = torch.tensor([[104, 105]])
    out = model.generate(prompt, max_new_tokens=20, temperature=0)
    assert out.shape == (1, 22)
    assert torch.equal(out[:, :2], prompt)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=20, temperature=0))
