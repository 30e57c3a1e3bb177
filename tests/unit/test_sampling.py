"""Sampling: seeded and repeatable, byte decoding that never fails, runs from both checkpoint kinds,
token ids (or tiktoken's text) for models that were not trained on bytes."""

from __future__ import annotations

import dataclasses
import io
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from nanoresume import checkpoint
from nanoresume.tools import sampling
from nanoresume.config import ModelConfig
from nanoresume.model import GPT
from nanoresume.textcodec import codec_for, decode_bytes, encode_bytes
from nanoresume.trainer import Trainer

CPU = torch.device("cpu")


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)).eval()


def test_decode_replaces_invalid_and_truncated_utf8_instead_of_failing() -> None:
    # 0xff is never valid; 0xe2 0x82 is the start of "€" cut off.
    text = decode_bytes([ord("a"), 0xFF, ord("b"), 0xE2, 0x82])
    assert text == "a\ufffdb\ufffd"
    assert decode_bytes(list(range(256)))  # every byte value decodes to something


def test_a_byte_model_starts_an_empty_prompt_from_a_newline() -> None:
    codec = codec_for(256)
    assert codec.start_token == ord("\n")
    assert codec.encode("é") == [0xC3, 0xA9]


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


def test_cli_prints_replacement_chars_even_on_an_ascii_terminal(make_config, monkeypatch) -> None:
    """best.pt at step 0 is an untrained model: its bytes are near-uniform, so most are invalid UTF-8. The
    tool's main runs here with an ASCII stdout, the one PYTHONIOENCODING=ascii gives a process."""
    cfg = make_config(max_steps=1, eval_interval=1)
    Trainer(cfg).run()
    written = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(written, encoding="ascii"))
    code = sampling.main(["--ckpt", str(Path(cfg.out_dir) / "best.pt"), "--max-new-tokens", "200",
                          "--temperature", "1.0", "--device", "cpu"])
    sys.stdout.flush()
    assert code == 0
    assert b"?" in written.getvalue()  # U+FFFD, written as "?" because ASCII cannot hold it


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
    assert encode_bytes("caf\udce9") == [99, 97, 102, 0xE9]


# ---- models trained on other token ids (nanoGPT's GPT-2 data) ------------------------------------

def weights_file(tmp_path: Path, vocab_size: int) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=vocab_size)
    path = tmp_path / f"vocab{vocab_size}.pt"
    checkpoint.save_atomically({"format_version": checkpoint.FORMAT_VERSION, "kind": "weights",
                                "model": GPT(config).state_dict(), "model_config": dataclasses.asdict(config),
                                "step": 0, "tokens_seen": 0, "val_loss": None}, path)
    return path


def fake_tiktoken() -> types.ModuleType:
    """Stands in for tiktoken (not a dependency): GPT-2's 50257 ids, each decoded as "<id>"."""
    encoding = types.SimpleNamespace(name="gpt2", n_vocab=50257,
                                     decode=lambda ids: "".join(f"<{i}>" for i in ids),
                                     encode=lambda text, allowed_special: [ord(c) for c in text])
    return types.SimpleNamespace(get_encoding=lambda name: encoding)


def test_a_model_of_other_token_ids_prints_the_ids(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # as where tiktoken is not installed
    ckpt = weights_file(tmp_path, 300)
    args = ["--ckpt", str(ckpt), "--prompt-ids", "299,7", "--max-new-tokens", "5", "--device", "cpu"]
    assert sampling.main(args) == 0
    ids = [int(t) for t in capsys.readouterr().out.split()]
    assert ids[:2] == [299, 7] and len(ids) == 7 and all(0 <= i < 300 for i in ids)


def test_a_text_prompt_for_a_model_of_token_ids_without_a_tokenizer_is_one_line(tmp_path: Path, capsys,
                                                                                 monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    ckpt = weights_file(tmp_path, 50304)
    assert sampling.main(["--ckpt", str(ckpt), "--prompt", "Hello", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--prompt-ids" in err and "50,304 token ids" in err


def test_gpt2_ids_are_decoded_with_tiktoken_where_it_is_installed(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", fake_tiktoken())
    ckpt = weights_file(tmp_path, 50304)  # nanoGPT's padded GPT-2 vocabulary
    assert sampling.main(["--ckpt", str(ckpt), "--max-new-tokens", "6", "--device", "cpu", "--seed", "3"]) == 0
    out = capsys.readouterr().out.strip()
    assert re.fullmatch(r"(<\d+>|<\|\d+\|>){6}", out), out  # six sampled tokens; the start token is not printed


def test_nanogpt_padding_ids_that_gpt2_lacks_are_shown_as_ids(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", fake_tiktoken())
    assert codec_for(50304).decode([1, 50300, 2, 3]) == "<1><|50300|><2><3>"
