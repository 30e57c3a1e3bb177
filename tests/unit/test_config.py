"""Presets, flag overrides, config files, the one validation, and duration parsing."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest

from nanoresume.config import (PRESETS, TrainConfig, build_parser, command_line_flags, config_from_dict,
                               explicit_fields, flag, merge_resumed_config, parse_command_line, parse_config,
                               parse_duration, read_command_line, resolve_config, self_test_request)
from nanoresume.errors import CheckpointError, ConfigError


def test_a_preset_fills_every_model_and_batch_field_left_unset():
    cfg = resolve_config(TrainConfig(preset="gpu10m"))
    for name, value in PRESETS["gpu10m"].items():
        assert getattr(cfg, name) == value
    assert cfg.model_config().n_embd == 384


def test_an_explicit_flag_overrides_the_preset_and_the_rest_still_comes_from_it():
    cfg = parse_config(["--preset", "gpu10m", "--n-layer", "8", "--dropout", "0"])
    assert cfg.n_layer == 8
    assert cfg.dropout == 0.0  # an explicit zero is not "unset"
    assert cfg.n_embd == PRESETS["gpu10m"]["n_embd"]
    assert cfg.lr == PRESETS["gpu10m"]["lr"]


def test_the_default_preset_is_cpu():
    cfg = parse_config([])
    assert all(getattr(cfg, k) == v for k, v in PRESETS["cpu"].items())


def test_an_unknown_preset_is_refused_naming_the_flag():
    with pytest.raises(ConfigError, match="--preset"):
        resolve_config(TrainConfig(preset="huge"))


@pytest.mark.parametrize("overrides, named", [
    (dict(n_embd=30, n_head=4), "--n-embd 30 must be divisible by --n-head 4"),
    (dict(max_steps=-1), "--max-steps -1"),
    (dict(max_steps=0), "--max-steps 0"),
    (dict(n_layer=0), "--n-layer"),
    (dict(n_head=0), "--n-head"),
    (dict(block_size=0), "--block-size"),
    (dict(batch_size=0), "--batch-size"),
    (dict(grad_accum=0), "--grad-accum"),
    (dict(eval_interval=0), "--eval-interval"),
    (dict(eval_iters=0), "--eval-iters"),
    (dict(keep_last=0), "--keep-last"),
    (dict(dropout=1.0), "--dropout 1.0"),
    (dict(dropout=-0.1), "--dropout"),
    (dict(lr=0.0), "--lr"),
    (dict(lr=float("nan")), "--lr"),
    (dict(lr=1e308), "--lr 1e+308 must be in (0, 1]"),
    (dict(seed=-1), "--seed -1 must be in [0, 2**64 - 1]"),
    (dict(seed=2**70), f"--seed {2**70} must be in"),
    (dict(data="/dev/zero"), "--data /dev/zero is not a regular file"),
    (dict(min_lr_ratio=1.5), "--min-lr-ratio"),
    (dict(warmup_steps=-1), "--warmup-steps"),
    (dict(weight_decay=-0.1), "--weight-decay"),
    (dict(beta1=1.0), "--beta1"),
    (dict(beta2=-0.5), "--beta2"),
    (dict(grad_clip=-1.0), "--grad-clip"),
    (dict(val_fraction=0.0), "--val-fraction"),
    (dict(val_fraction=1.0), "--val-fraction"),
    (dict(ckpt_interval=0), "--ckpt-interval"),
    (dict(time_limit=0.0), "--time-limit"),
    (dict(out_dir="  "), "--out-dir"),
    (dict(resume=""), "--resume"),
])
def test_every_validation_rule_names_its_flag(overrides, named):
    with pytest.raises(ConfigError) as info:
        resolve_config(TrainConfig(**overrides))
    assert named in str(info.value)
    assert "\n" not in str(info.value)


def test_an_empty_data_file_or_a_fifo_is_refused_by_validation_before_anything_is_created(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    for data, named in ((empty, "holds no text"), (fifo, "not a regular file")):
        with pytest.raises(ConfigError, match=named):
            resolve_config(TrainConfig(data=str(data)))


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        resolve_config(TrainConfig(max_steps=-1, dropout=2.0, lr=-1.0))
    message = str(info.value)
    assert "--max-steps" in message and "--dropout" in message and "--lr" in message


def test_valid_edge_values_are_accepted():
    cfg = resolve_config(TrainConfig(dropout=0.0, warmup_steps=0, grad_clip=0.0, weight_decay=0.0,
                                     min_lr_ratio=0.0, beta1=0.0, ckpt_interval=1, time_limit=0.5))
    resolve_config(TrainConfig(seed=0, lr=1.0))
    resolve_config(TrainConfig(seed=2**64 - 1))
    assert cfg.effective_ckpt_interval == 1
    assert resolve_config(TrainConfig(eval_interval=7)).effective_ckpt_interval == 7


@pytest.mark.parametrize("text, seconds", [("90", 90.0), ("1.5", 1.5), ("1:30", 90.0), ("01:00:00", 3600.0),
                                           ("0:00:05", 5.0), (" 2:00 ", 120.0)])
def test_parse_duration_reads_seconds_and_clock_times(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["abc", "", "1:2:3:4", "1h", "1::2", "10 s"])
def test_parse_duration_refuses_anything_else(text):
    with pytest.raises(argparse.ArgumentTypeError, match="seconds or HH:MM:SS"):
        parse_duration(text)


def test_time_limit_on_the_command_line_is_parsed_as_a_duration():
    assert parse_config(["--time-limit", "1:30"]).time_limit == 90.0
    assert parse_config([]).time_limit is None


def test_every_config_field_is_a_flag():
    parser = build_parser()
    options = {s for a in parser._actions for s in a.option_strings}
    for f in dataclasses.fields(TrainConfig):
        assert flag(f.name) in options, f"{flag(f.name)} missing from the CLI"


def test_every_flag_of_train_is_in_the_readme_flag_table():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("### All flags of `nanoresume train`"):]
    table = table[:table.index("\n\n", table.index("| flag |"))]
    for action in build_parser()._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                assert f"`{option}`" in table, f"{option} is missing from the README's flag table"


def test_vocab_size_defaults_to_bytes_and_uint16_data_must_name_its_vocabulary():
    assert parse_config([]).vocab_size == 256
    assert parse_config(["--token-dtype", "uint16", "--vocab-size", "50304"]).vocab_size == 50304
    with pytest.raises(ConfigError, match="--token-dtype uint16 needs --vocab-size"):
        parse_config(["--token-dtype", "uint16"])


def test_progress_is_unset_unless_a_flag_forces_it_either_way():
    assert parse_config([]).progress is None
    assert parse_config(["--progress"]).progress is True
    assert parse_config(["--no-progress"]).progress is False


# ---- --config FILE -----------------------------------------------------------------------------

def test_a_runs_config_json_read_back_with_config_gives_the_same_config(tmp_path):
    cfg = parse_config(["--n-layer", "3", "--time-limit", "1:00:00", "--no-bias", "--max-steps", "77"])
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert parse_config(["--config", str(tmp_path / "config.json")]) == cfg


def test_flags_on_the_command_line_override_the_config_file_and_both_count_as_given(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"max_steps": 50, "lr": 1e-3, "eval-interval": 10}))
    cfg, given = parse_command_line(["--config", str(tmp_path / "run.json"), "--lr", "5e-4"])
    assert (cfg.max_steps, cfg.lr, cfg.eval_interval) == (50, 5e-4, 10)
    assert given == {"max_steps", "lr", "eval_interval"}


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is new in Python 3.11")
def test_a_toml_config_file_is_read_with_durations_and_presets(tmp_path):
    (tmp_path / "run.toml").write_text('preset = "gpu10m"\nmax_steps = 20\ntime_limit = "00:01:30"\n'
                                       'bias = false\n')
    cfg, given = parse_command_line(["--config", str(tmp_path / "run.toml")])
    assert (cfg.n_layer, cfg.max_steps, cfg.time_limit, cfg.bias) == (6, 20, 90.0, False)
    assert {"preset", "n_layer", "max_steps", "time_limit", "bias"} <= given


def test_toml_without_tomllib_says_which_python_is_needed(tmp_path, monkeypatch):
    (tmp_path / "run.toml").write_text("max_steps = 20\n")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.9 and 3.10
    with pytest.raises(ConfigError, match="reading TOML needs Python 3.11 or newer .*use a JSON file"):
        parse_config(["--config", str(tmp_path / "run.toml")])


@pytest.mark.parametrize("content, message", [
    ('{"max_steps": "ten"}', "max_steps must be a whole number, not 'ten'"),
    ('{"max_stepz": 10}', "unknown setting 'max_stepz'"),
    ('{"device": "tpu"}', "device 'tpu' must be one of auto, cpu, cuda"),
    ('{"bias": null}', "bias cannot be empty"),
    ('{"max_steps": 10,', "not valid JSON"),
    ('[1, 2]', "must hold one object of settings"),
])
def test_a_bad_config_file_is_one_error_naming_the_file_and_the_setting(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ConfigError, match=f"--config {tmp_path / 'bad.json'}: .*{message}"):
        parse_config(["--config", str(tmp_path / "bad.json")])


def test_a_config_file_of_another_kind_or_missing_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="expected a .json or .toml file"):
        parse_config(["--config", str(tmp_path / "run.yaml")])
    with pytest.raises(ConfigError, match="cannot read it"):
        parse_config(["--config", str(tmp_path / "missing.json")])


def test_booleans_take_a_no_prefix_form_and_choices_are_enforced():
    assert parse_config(["--no-bias", "--no-progress", "--compile"]).bias is False
    with pytest.raises(SystemExit) as info:
        parse_config(["--device", "tpu"])
    assert info.value.code == 2


def test_explicit_fields_are_the_typed_flags_and_a_preset_counts_as_typing_its_fields():
    assert explicit_fields(["--n-layer", "3", "--max-steps", "5"]) == {"n_layer", "max_steps"}
    assert explicit_fields(["--preset", "cpu"]) == {"preset", *PRESETS["cpu"]}
    assert explicit_fields([]) == set()


def test_to_dict_and_config_from_dict_round_trip_and_unknown_keys_are_ignored():
    cfg = resolve_config(TrainConfig(n_layer=3, time_limit=12.0))
    values = cfg.to_dict()
    assert config_from_dict(values) == cfg
    assert config_from_dict({**values, "from_a_future_version": 1}) == cfg


def test_command_line_flags_give_back_the_same_resolved_config():
    cfg = parse_config(["--preset", "gpu10m", "--lr", "0.0003", "--no-bias", "--time-limit", "90.5"])
    again = parse_config(command_line_flags(cfg.to_dict()))
    assert again == cfg
    assert "--ckpt-interval" not in command_line_flags(cfg.to_dict())  # None: the flag's default


@pytest.mark.parametrize("argv, expected", [
    ([], None), (["--self-test"], 0), (["--self-test", "--self-test-nproc", "2"], 2)])
def test_self_test_request_says_whether_and_how_many_processes(argv, expected):
    assert self_test_request(argv) == expected


@pytest.mark.parametrize("argv, message", [
    (["--self-test-nproc", "2"], "only applies to --self-test"),
    (["--self-test", "--self-test-nproc", "0"], "must be at least 1")])
def test_self_test_options_that_cannot_work_are_one_error(argv, message):
    with pytest.raises(ConfigError, match=message):
        self_test_request(argv)


def test_self_test_flags_are_not_config_fields():
    cfg, given = parse_command_line(["--self-test", "--max-steps", "12"])
    assert cfg.max_steps == 12 and given == {"max_steps"}


# ---- merge_resumed_config: the config of a resumed run ------------------------------------------

def _saved(**changes: object) -> dict:
    """A resolved config as a checkpoint stores it."""
    return dataclasses.replace(resolve_config(TrainConfig()), **changes).to_dict()


def test_a_resume_keeps_the_saved_settings_that_were_not_given_again():
    saved = _saved(max_steps=40, lr=1e-3)
    merged, changes = merge_resumed_config(saved, resolve_config(TrainConfig(), check=False), explicit=set())
    assert (merged.max_steps, merged.lr) == (40, 1e-3)
    assert changes == []


def test_a_flag_given_on_resume_overrides_the_saved_value_and_is_reported():
    current = resolve_config(TrainConfig(max_steps=80), check=False)
    merged, changes = merge_resumed_config(_saved(max_steps=40), current, explicit={"max_steps"})
    assert merged.max_steps == 80
    assert changes == ["--max-steps: 40 -> 80"]


def test_runtime_fields_always_come_from_the_command_line_and_are_not_reported():
    current = resolve_config(TrainConfig(out_dir="elsewhere", resume="auto", device="cpu"), check=False)
    merged, changes = merge_resumed_config(_saved(out_dir="out"), current, explicit=set())
    assert (merged.out_dir, merged.resume, merged.device) == ("elsewhere", "auto", "cpu")
    assert changes == []


def test_library_use_counts_every_field_as_given():
    current = resolve_config(TrainConfig(max_steps=7), check=False)
    merged, _ = merge_resumed_config(_saved(max_steps=40), current, explicit=None)
    assert merged.max_steps == 7


def test_a_changed_model_shape_is_refused_naming_every_mismatching_flag():
    current = resolve_config(TrainConfig(n_layer=2, n_embd=32), check=False)
    with pytest.raises(CheckpointError) as caught:
        merge_resumed_config(_saved(), current, explicit={"n_layer", "n_embd"})
    message = str(caught.value)
    assert "--n-layer is 4 in the checkpoint but 2 now" in message
    assert "--n-embd is 64 in the checkpoint but 32 now" in message


def test_must_match_and_source_name_what_is_compared_and_where_it_came_from():
    current = resolve_config(TrainConfig(data="other.txt"), check=False)
    with pytest.raises(CheckpointError, match="--data is None in OUT/config.json but 'other.txt' now"):
        merge_resumed_config(_saved(), current, explicit={"data"}, source="OUT/config.json",
                             must_match=("data",))


def test_a_changed_seed_is_reported_as_having_no_effect():
    current = resolve_config(TrainConfig(seed=7), check=False)
    _, changes = merge_resumed_config(_saved(), current, explicit={"seed"})
    assert changes == ["--seed: 1337 -> 7 (no effect: the data order and random numbers continue from the "
                       "checkpoint)"]


def test_more_processes_keep_the_global_batch_by_lowering_the_accumulation():
    saved = _saved(batch_size=4, grad_accum=4)  # 16 sequences per step on one process
    merged, changes = merge_resumed_config(saved, resolve_config(TrainConfig(), check=False), set(),
                                           saved_world_size=1, world_size=2)
    assert merged.grad_accum == 2 and merged.global_batch(2) == 16
    assert changes == ["--grad-accum: 4 -> 2", "processes: 1 -> 2 (global batch 16 sequences per step)"]


def test_a_global_batch_no_whole_accumulation_keeps_is_refused():
    saved = _saved(batch_size=4, grad_accum=1)
    with pytest.raises(CheckpointError, match="cannot keep the global batch of 4 sequences"):
        merge_resumed_config(saved, resolve_config(TrainConfig(), check=False), set(), saved_world_size=1,
                             world_size=3)


def test_an_accumulation_given_on_resume_sets_a_new_global_batch():
    saved = _saved(batch_size=4, grad_accum=4)
    current = resolve_config(TrainConfig(grad_accum=3), check=False)
    merged, _ = merge_resumed_config(saved, current, {"grad_accum"}, saved_world_size=1, world_size=2)
    assert merged.grad_accum == 3 and merged.global_batch(2) == 24


def test_settings_a_newer_version_saved_are_ignored():
    merged, _ = merge_resumed_config({**_saved(), "from_the_future": 1},
                                     resolve_config(TrainConfig(), check=False), set())
    assert not hasattr(merged, "from_the_future")


def test_a_command_line_is_parsed_once_into_config_explicit_fields_and_self_test(monkeypatch, tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"eval_interval": 7}))
    parses = []
    parse = argparse.ArgumentParser.parse_known_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args",
                        lambda self, *args, **kwargs: parses.append(1) or parse(self, *args, **kwargs))
    line = read_command_line(["--config", str(tmp_path / "run.json"), "--max-steps", "9", "--self-test"])
    assert len(parses) == 1
    assert (line.cfg.max_steps, line.cfg.eval_interval, line.self_test) == (9, 7, 0)
    assert line.explicit == {"max_steps", "eval_interval"}
