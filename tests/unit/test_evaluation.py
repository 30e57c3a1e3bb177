"""Evaluation: every token predicted once, a token-weighted mean, the same number the trainer computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanoresume.tools import evaluation
from nanoresume.config import ModelConfig
from nanoresume.data import windows
from nanoresume.model import GPT
from nanoresume.trainer import Trainer
from tests.helpers import run_main

CPU = torch.device("cpu")
BLOCK = 16


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=BLOCK)).eval()


def known_text() -> np.ndarray:
    # 7 full windows of 16 plus a 5-token tail: neither the batches nor the windows are all one size.
    return np.frombuffer((b"The quick brown fox jumps over the lazy dog. " * 3)[:118], dtype=np.uint8)


def direct_loss(model: GPT, tokens: np.ndarray) -> float:
    """Reference: per-token cross-entropy of each window on its own, summed, divided by tokens."""
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, BLOCK):
        chunk = torch.from_numpy(tokens[start:start + BLOCK + 1].astype(np.int64))[None]
        logits, _ = model(chunk[:, :-1])
        total += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += chunk.size(1) - 1
    assert count == len(tokens) - 1
    return total / count


def test_in_order_batches_predict_every_token_once_in_order() -> None:
    tokens = known_text()
    pairs = list(evaluation.in_order_batches(tokens, BLOCK, batch_size=3))
    inputs = torch.cat([x.reshape(-1) for x, _ in pairs]).numpy()
    targets = torch.cat([y.reshape(-1) for _, y in pairs]).numpy()
    assert np.array_equal(inputs, tokens[:-1]) and np.array_equal(targets, tokens[1:])
    assert len(pairs) == evaluation.count_batches(len(tokens), BLOCK, 3) == 4  # 3 + 3 + 1 full, 1 tail


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_loss_matches_a_direct_computation_for_any_batch_size(batch_size: int) -> None:
    model, tokens = tiny_model(), known_text()
    result = evaluation.evaluate_tokens(model, tokens, batch_size, CPU)
    assert result.tokens == len(tokens) - 1
    # Not bitwise: batched matmuls may round differently from one-window ones.
    assert result.loss == pytest.approx(direct_loss(model, tokens), rel=1e-6)
    assert result.perplexity == pytest.approx(np.exp(result.loss))


def test_unequal_batches_are_weighted_by_tokens_not_averaged_per_batch() -> None:
    model = tiny_model()
    x = torch.randint(0, 256, (3, BLOCK))
    y = torch.randint(0, 256, (3, BLOCK))
    big, small = (x[:2], y[:2]), (x[2:, :4], y[2:, :4])  # 32 tokens and 4 tokens
    def summed(xb: torch.Tensor, yb: torch.Tensor) -> float:
        return F.cross_entropy(model(xb)[0].reshape(-1, 256), yb.reshape(-1), reduction="sum").item()

    expected = (summed(*big) + summed(*small)) / 36
    assert evaluation.mean_loss(model, [big, small], CPU).loss == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
def test_agrees_with_the_training_loops_own_eval_on_its_windows(make_config) -> None:
    with Trainer(make_config(max_steps=5)) as trainer:
        trainer.train_step()
        batches = [windows(trainer.data.val, offsets, trainer.cfg.block_size) for offsets in trainer.val_batches]
        ours = evaluation.mean_loss(trainer.raw_model, batches, CPU).loss
        # Equal-sized batches: the token-weighted mean is the trainer's plain mean of batch means,
        # up to float summation order (it sums float32 batch means, we sum float64 token losses).
        assert ours == pytest.approx(trainer.evaluate(), rel=1e-6)
        assert trainer.raw_model.training  # mean_loss put the mode back


@pytest.mark.slow
def test_cli_on_a_text_file_prints_the_same_loss(make_config, tiny_text: Path, tmp_path: Path, capsys) -> None:
    cfg = make_config(max_steps=5, eval_interval=5)
    Trainer(cfg).run()
    best = Path(cfg.out_dir) / "best.pt"
    text = tmp_path / "eval.txt"
    text.write_bytes(tiny_text.read_bytes()[:5000])
    proc = run_main(evaluation.main, ["--ckpt", str(best), "--data", str(text), "--batch-size", "64", "--no-progress",
                                      "--device", "cpu"], capsys)
    assert proc.returncode == 0, proc.stderr
    from nanoresume.loading import load_model

    model, _ = load_model(best, CPU)
    expected = evaluation.evaluate_tokens(model, evaluation.read_text_bytes(text), 64, CPU)
    assert f"loss {expected.loss:.4f}" in proc.stdout
    assert f"{expected.tokens:,} tokens" in proc.stdout


@pytest.mark.slow
def test_user_errors_are_one_line_with_exit_code_2(make_config, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = make_config(max_steps=1, eval_interval=1)
    Trainer(cfg).run()
    best = str(Path(cfg.out_dir) / "best.pt")
    one_byte = tmp_path / "one.txt"
    one_byte.write_bytes(b"a")
    capsys.readouterr()
    for argv, needle in ([["--ckpt", best, "--data", str(tmp_path / "nope.txt")], "nope.txt"],
                         [["--ckpt", best, "--data", str(one_byte)], "at least 2"],
                         [["--ckpt", best, "--data", str(one_byte), "--batch-size", "0"], "--batch-size"]):
        assert evaluation.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err
