"""Text samples at evaluations: printed after the evaluation's line and logged to TensorBoard, drawn from
a stream of their own so training ends bit for bit the same with them or without them."""

from __future__ import annotations

import pytest
import torch

from nanoresume.config import ModelConfig, TrainConfig, merge_resumed_config, parse_config, resolve_config
from nanoresume.errors import ConfigError
from nanoresume.model import GPT
from nanoresume.samples import EvalSamples, console_text, markdown, printable, sample_seed
from tests.helpers import final_state, train

CPU = torch.device("cpu")


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, dropout=0.5))


def test_the_sample_seed_is_a_function_of_seed_and_step_only():
    assert sample_seed(1337, 10) == sample_seed(1337, 10)
    assert len({sample_seed(1337, 10), sample_seed(1337, 20), sample_seed(1, 10)}) == 3
    assert 0 <= sample_seed(2**64 - 1, 2**40) < 2**64


def test_a_sample_leaves_the_global_streams_and_the_models_mode_alone():
    model = tiny_model().train()  # dropout 0.5: a forward in train mode would draw from the global stream
    samples = EvalSamples(12, "ab", seed=3, vocab_size=256, device=CPU, warn=pytest.fail)
    before = torch.get_rng_state()
    text = samples.take(model, step=4, autocast=torch.no_grad)
    assert torch.equal(before, torch.get_rng_state()) and model.training
    assert text.startswith("ab") and len(text.encode("utf-8", "surrogatepass")) >= 12
    assert samples.take(model, step=4, autocast=torch.no_grad) == text  # the same step, the same text


def test_a_stop_cuts_a_sample_short_and_token_by_token_draws_the_same_text():
    model = tiny_model()
    samples = EvalSamples(10, "ab", seed=3, vocab_size=256, device=CPU, warn=pytest.fail)
    whole = samples.take(model, step=4, autocast=torch.no_grad)
    assert samples.take(model, step=4, autocast=torch.no_grad, cancelled=lambda: False) == whole
    asked: list[int] = []
    assert samples.take(model, 4, torch.no_grad, cancelled=lambda: asked.append(1) or len(asked) > 3) is None
    assert len(asked) == 4  # a stop waits for at most one more forward


def test_an_empty_prompt_starts_from_a_newline_that_is_not_shown():
    samples = EvalSamples(5, "", seed=3, vocab_size=256, device=CPU, warn=pytest.fail)
    assert samples.prompt == []
    assert samples.take(tiny_model(), step=0, autocast=torch.no_grad) is not None


def test_samples_are_off_at_zero_tokens_and_for_a_vocabulary_that_is_not_text():
    assert EvalSamples(0, None, 0, 256, CPU, pytest.fail).take(tiny_model(), 0, torch.no_grad) is None
    warnings: list[str] = []
    ids = EvalSamples(64, None, 0, 65, CPU, warnings.append)  # nanoGPT's shakespeare_char: 65 ids, no tokenizer
    assert ids.tokens == 0 and len(warnings) == 1
    assert "not text" in warnings[0] and "--sample-tokens 0" in warnings[0]


def test_control_characters_are_shown_escaped_and_every_line_behind_a_margin():
    assert printable("a\x1b[2Jb\tc\nd\r") == "a\\x1b[2Jb\tc\nd\\r"
    assert console_text(500, "def f():\n    return 1") == "sample at step 500:\n  | def f():\n  |     return 1"
    assert markdown("x\n y") == "    x\n     y"


def test_sample_settings_resume_like_any_setting_and_never_have_to_match():
    saved = resolve_config(TrainConfig(sample_tokens=0, sample_prompt="import ")).to_dict()
    merged, changes = merge_resumed_config(saved, resolve_config(TrainConfig(sample_tokens=32)), {"sample_tokens"})
    assert (merged.sample_tokens, merged.sample_prompt) == (32, "import ") and changes == ["--sample-tokens: 0 -> 32"]
    merged, changes = merge_resumed_config(saved, resolve_config(TrainConfig()), explicit=set())
    assert (merged.sample_tokens, changes) == (0, [])
    older = {k: v for k, v in saved.items() if not k.startswith("sample_")}  # a checkpoint from before samples
    assert merge_resumed_config(older, resolve_config(TrainConfig()), explicit=set())[0].sample_tokens == 64


def test_sample_flags_parse_and_a_negative_count_is_one_error_naming_the_flag():
    cfg = parse_config(["--sample-tokens", "16", "--sample-prompt", ""])
    assert (cfg.sample_tokens, cfg.sample_prompt) == (16, "")
    with pytest.raises(ConfigError, match="--sample-tokens -1 must be at least 0"):
        parse_config(["--sample-tokens", "-1"])


@pytest.mark.slow
def test_a_run_with_samples_ends_bit_for_bit_where_one_without_ends(make_config, tmp_path, capsys,
                                                                     assert_same_state):
    # dropout 0.1 (the tiny flags): a sample that drew from the global stream would change every mask after it
    flags = dict(max_steps=6, eval_interval=2, dropout=0.1)
    plain, plain_result = train(make_config(**flags, out_dir=str(tmp_path / "plain")))  # --sample-tokens 0
    assert "sample at step" not in capsys.readouterr().out
    sampled, sampled_result = train(make_config(**flags, out_dir=str(tmp_path / "sampled"), sample_tokens=8,
                                                sample_prompt="import "))
    out = capsys.readouterr().out
    assert sampled_result.step_losses == plain_result.step_losses
    assert_same_state(final_state(sampled), final_state(plain))
    lines = out.splitlines()
    for step in (0, 2, 4, 6):
        header = lines.index(f"sample at step {step}:")
        assert lines[header - 1].startswith(f"step {step:>6} |"), "the sample follows its evaluation's line"
        assert lines[header + 1].startswith("  | import ")
    tags = tensorboard_text(tmp_path / "sampled" / "tb")
    assert [step for step, tag in tags if tag.startswith("sample")] == [0, 2, 4, 6]


def tensorboard_text(folder) -> list[tuple[int, str]]:
    """(step, tag) of every text summary in the event files under ``folder``."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    found = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "text":
                    found.append((event.step, value.tag))
    return found
