"""A decoder-only GPT: pre-LayerNorm blocks, causal SDPA attention, GELU MLP, tied embeddings.

No I/O and no training logic: build it from a :class:`ModelConfig`, call it.

Initial weights are keyed, not streamed: each parameter's values come from a generator seeded by
``(seed, parameter name)`` alone, never from the global random stream. So they are the same bit for
bit however the model is later split (one process, DDP, FSDP on any number of ranks), a rank of a
sharded model can fill in just its own shard (:func:`materialize`), and building a model draws
nothing from the streams dropout uses.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of ``GPT(cfg)`` (the tied embedding counted once), computed without building it,
    so that a size that cannot fit is refused before anything is allocated."""
    C, bias = cfg.n_embd, int(cfg.bias)
    # per block: qkv 3C^2, attention proj C^2, MLP 4C^2 + 4C^2; two LayerNorm weights; biases
    # of qkv (3C), proj (C), fc (4C), MLP proj (C) and both LayerNorms (2C)
    block = 12 * C * C + 2 * C + 11 * C * bias
    return cfg.vocab_size * C + cfg.block_size * C + cfg.n_layer * block + C * (1 + bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """``GPT(cfg)(idx, targets)`` returns ``(logits, loss)``; ``loss`` is None without targets."""

    def __init__(self, cfg: ModelConfig, seed: Optional[int] = 0) -> None:
        """``seed``: the initial weights' key (:func:`init_weights`); None leaves them as torch's modules
        made them (for a model built on the meta device, to be materialized later)."""
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tie_weights()
        if seed is not None:
            init_weights(self, seed)

    def tie_weights(self) -> None:
        """One matrix embeds and un-embeds (``Module.to_empty`` unties them: it makes a new tensor per module)."""
        self.lm_head.weight = self.wte.weight

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, T); temperature 0 is greedy."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            logits, _ = self(context)
            logits = logits[:, -1, :].float()
            if temperature <= 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                # Shift the max to 0 first: a tiny temperature then sends the rest to -inf, never to nan.
                logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
                if top_k is not None and top_k < logits.size(-1):
                    kth = torch.topk(logits, top_k).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_token), dim=1)
        return idx


# ---- initial weights -----------------------------------------------------------------------------

def parameter_key(seed: int, name: str) -> int:
    """The seed of parameter ``name``'s generator: a stable hash (not Python's salted ``hash``)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def initial_value(model: GPT, name: str, seed: int) -> torch.Tensor:
    """Parameter ``name``'s whole initial value, on the CPU, in float32: N(0, 0.02) for weight
    matrices, with GPT-2's residual projections shrunk by sqrt(2 * n_layer) so the residual stream
    stays O(1); ones for LayerNorm weights; zeros for biases. Depends only on (seed, name, shape)."""
    module_name, _, kind = name.rpartition(".")
    module = model.get_submodule(module_name)
    shape = getattr(module, kind).shape
    if kind == "bias":
        return torch.zeros(shape)
    if isinstance(module, nn.LayerNorm):
        return torch.ones(shape)
    std = 0.02 / math.sqrt(2 * model.config.n_layer) if name.endswith("proj.weight") else 0.02
    generator = torch.Generator(device="cpu").manual_seed(parameter_key(seed, name))
    return torch.empty(shape).normal_(mean=0.0, std=std, generator=generator)


@torch.no_grad()
def init_weights(model: GPT, seed: int) -> None:
    """Give every parameter its keyed initial value, one whole parameter at a time on the CPU (the
    peak is the largest parameter, not the model). A parameter sharded as a DTensor (FSDP2) receives
    only this rank's shard of it, so every layout ends up holding the same numbers."""
    for name, p in model.named_parameters():  # a tied parameter once, under its first name
        _copy_part(p, initial_value(model, name, seed))


def _copy_part(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy into ``p`` its part of ``full``: the whole of it, or for a DTensor this rank's shard, cut as
    DTensor cuts (``torch.chunk`` along the sharded dim: uneven sizes, trailing ranks possibly empty)."""
    placements = getattr(p, "placements", None)
    if placements is None:
        p.copy_(full)
        return
    part = full
    for mesh_dim, placement in enumerate(placements):
        if placement.is_shard():
            ranks, index = p.device_mesh.size(mesh_dim), p.device_mesh.get_local_rank(mesh_dim)
            chunks = torch.chunk(part, ranks, dim=placement.dim)
            part = chunks[index] if index < len(chunks) else part.narrow(placement.dim, 0, 0)
    local = p.to_local()
    if local.shape != part.shape:  # copy_ would broadcast a wrong cut silently
        raise AssertionError(f"shard of shape {tuple(local.shape)} but the cut is {tuple(part.shape)}")
    local.copy_(part)


def materialize(model: GPT, device: torch.device, seed: int) -> GPT:
    """Allocate a meta-device model (:func:`shapes_only`, sharded or not) on ``device`` and initialise it
    with :func:`init_weights`: each rank of a sharded model allocates and fills only its shards."""
    model.to_empty(device=device)
    if getattr(model.wte.weight, "placements", None) is None:
        model.tie_weights()  # FSDP2 keeps its shared parameter; to_empty gave each module its own
    assert model.lm_head.weight is model.wte.weight, "the output head lost its tie to the token embedding"
    init_weights(model, seed)
    return model


# Initialisers the modules above call while being built.
_INITIALISERS = ("uniform_", "normal_", "kaiming_uniform_", "zeros_", "ones_", "constant_")


@contextmanager
def _initialisers_skipped() -> Iterator[None]:
    saved = {name: getattr(nn.init, name) for name in _INITIALISERS}
    try:
        for name in _INITIALISERS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, initialiser in saved.items():
            setattr(nn.init, name, initialiser)


def shapes_only(cfg: ModelConfig) -> GPT:
    """A GPT on the meta device: the names and shapes of its tensors, no memory, no values.

    Built without weight initialisation, which would be wasted on meta tensors and costs about
    a second the first time in a process (torch's meta kernels for random fills import its compiler
    stack); checkpoint validation in every tool and every resume would pay it.
    """
    with torch.device("meta"), _initialisers_skipped():
        return GPT(cfg, seed=None)
