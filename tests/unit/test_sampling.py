"""Sampling: seeded and repeatable, byte decoding that never fails, runs from both checkpoint kinds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoresume import sampling
from nanoresume.config import ModelConfig
from nanoresume.model import GPT
from nanoresume.trainer import Trainer
from tests.helpers import REPO

SAMPLE_SCRIPT = REPO / "scripts" / "sample.py"
CPU = torch.device("cpu")


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)).eval()


def test_decode_replaces_invalid_and_truncated_utf8_instead_of_failing() -> None:
    # 0xff is never valid; 0xe2 0x82 is the start of "€" cut off.
    text = sampling.decode([ord("a"), 0xFF, ord("b"), 0xE2, 0x82])
    assert text == "a\ufffdb\ufffd"
    assert sampling.decode(list(range(256)))  # every byte value decodes to something


def test_empty_prompt_starts_from_a_newline() -> None:
    assert sampling.encode("") == [ord("\n")]
    assert sampling.encode("é") == [0xC3, 0xA9]


def test_same_seed_gives_same_tokens_and_another_seed_differs() -> None:
    model = tiny_model()
    run = lambda seed: sampling.generate_tokens(model, [65], 40, 1.0, None, seed, CPU)  # noqa: E731
    assert run(7) == run(7)
    assert run(7) != run(8)
    assert len(run(7)) == 41


def test_generation_leaves_the_global_rng_alone() -> None:
    model = tiny_model()
    before = torch.get_rng_state()
    sampling.generate_tokens(model, [65], 20, 1.0, 5, 3, CPU)
    assert torch.equal(before, torch.get_rng_state())


def test_prompt_longer_than_block_size_is_cropped_not_an_error() -> None:
    tokens = sampling.generate_tokens(tiny_model(), list(b"x" * 40), 5, 0.0, None, 0, CPU)
    assert tokens[:40] == list(b"x" * 40) and len(tokens) == 45


@pytest.mark.slow
def test_samples_from_best_pt_and_from_a_step_checkpoint(make_config, capsys: pytest.CaptureFixture) -> None:
    cfg = make_config(max_steps=4, eval_interval=2)
    Trainer(cfg).run()
    capsys.readouterr()
    out = Path(cfg.out_dir)
    for ckpt in (out / "best.pt", out / "checkpoints" / "step_00000004.pt"):
        args = ["--ckpt", str(ckpt), "--prompt", "def ", "--max-new-tokens", "30", "--seed", "1", "--device", "cpu"]
        assert sampling.main(args) == 0
        first = capsys.readouterr().out
        assert sampling.main(args) == 0
        assert capsys.readouterr().out == first  # deterministic for a seed, from a file too
        assert first.startswith("def ")


@pytest.mark.slow
def test_cli_prints_replacement_chars_even_on_an_ascii_terminal(make_config) -> None:
    """best.pt at step 0 is an untrained model: its bytes are near-uniform, so most are invalid UTF-8."""
    cfg = make_config(max_steps=1, eval_interval=1)
    Trainer(cfg).run()
    env = dict(os.environ, PYTHONIOENCODING="ascii")
    proc = subprocess.run([sys.executable, str(SAMPLE_SCRIPT), "--ckpt", str(Path(cfg.out_dir) / "best.pt"),
                           "--max-new-tokens", "200", "--temperature", "1.0", "--device", "cpu"],
                          capture_output=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert b"?" in proc.stdout  # U+FFFD, written as "?" because ASCII cannot hold it
    assert b"Traceback" not in proc.stderr


def test_user_errors_are_one_line_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert sampling.main(["--ckpt", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "missing.pt" in err
    assert sampling.main(["--ckpt", "x.pt", "--temperature", "-1", "--top-k", "0"]) == 2
    err = capsys.readouterr().err
    assert "--temperature" in err and "--top-k" in err and err.count("\n") == 1


def test_a_tiny_temperature_behaves_like_greedy_instead_of_producing_nan() -> None:
    model = tiny_model()
    greedy = sampling.generate_tokens(model, [65], 8, 0.0, None, 1, torch.device("cpu"))
    near_zero = sampling.generate_tokens(model, [65], 8, 1e-40, None, 1, torch.device("cpu"))
    assert near_zero == greedy


def test_a_prompt_with_undecodable_command_line_bytes_keeps_those_bytes() -> None:
    assert sampling.encode("caf\udce9") == [99, 97, 102, 0xE9]
