"""Every numeric flag and config-file key, in both directions: a bad number is one line naming the flag,
the value and the allowed range (exit code 2), never a traceback from deep inside a run.

The flags are enumerated from the parser, so a numeric flag added later without a range fails here.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from nanoresume.config import (FLOAT_RANGES, INT_RANGES, MAX_SELF_TEST_PROCESSES, MAX_SEQUENCES_PER_STEP,
                               TrainConfig, build_parser, flag, parse_duration, read_command_line, resolve_config,
                               validate)
from nanoresume.errors import ConfigError
from nanoresume.schema import _CONFIG_BOUNDS, MAX_COUNT

NOT_CONFIG = {"self_test_nproc"}  # a numeric option of the command, not of the run


def numeric_options() -> dict[str, type]:
    """dest -> int or float for every option of ``nanoresume train`` that takes a number."""
    kinds = {int: int, float: float, parse_duration: float}
    return {action.dest: kinds[action.type] for action in build_parser()._actions if action.type in kinds}


def bad_values(name: str) -> list:
    """Values just outside the range, far outside it, and the non-numbers a float accepts."""
    if name in INT_RANGES:
        low, high = INT_RANGES[name]
        return [low - 1, high + 1, -10**20, 10**20]
    opening, low, high, closing, _ = FLOAT_RANGES[name]
    values = [math.nan, math.inf, -math.inf, -1e300] + ([1e300] if math.isfinite(high) else [])
    values += [low] if opening == "(" else [low - 1e-9 if low else -1e-9]
    values += [high] if closing == ")" and math.isfinite(high) else []
    return values


def cases() -> list[tuple[str, object]]:
    return [(name, value) for name in numeric_options() if name not in NOT_CONFIG for value in bad_values(name)]


def test_every_numeric_flag_has_a_range():
    for name in numeric_options():
        assert name in INT_RANGES or name in FLOAT_RANGES or name in NOT_CONFIG, f"{flag(name)} has no range"


def one_line(message: str, name: str) -> None:
    assert "\n" not in message and flag(name) in message and "must be" in message, message


@pytest.mark.parametrize("name, value", cases())
def test_a_number_out_of_range_on_the_command_line_is_one_line_naming_the_flag(name, value, capsys):
    text = repr(value) if isinstance(value, float) else str(value)
    try:
        read_command_line([f"{flag(name)}={text}"])  # with '=', as argparse needs for a value like -inf
    except ConfigError as e:
        one_line(str(e), name)
        assert text in str(e) or name == "time_limit", str(e)  # the value as typed (a duration as seconds)
    except SystemExit as e:  # argparse refused the text itself (a negative duration)
        assert e.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and flag(name) in err and text in err, err
    else:
        pytest.fail(f"{flag(name)}={text} was accepted")


@pytest.mark.parametrize("name, value", cases())
def test_a_number_out_of_range_in_a_config_file_is_one_line_naming_the_setting(name, value, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({name: value}))  # JSON as Python writes it holds NaN and Infinity too
    with pytest.raises(ConfigError) as info:
        read_command_line(["--config", str(path)])
    one_line(str(info.value), name)


@pytest.mark.parametrize("name, value", cases())
def test_a_number_out_of_range_is_caught_on_resume_too(name, value):
    """A resume defers validation until the flags are merged with the checkpoint's config; the same
    validate() then names the flag."""
    cfg = read_command_line(["--resume", "auto"]).cfg
    problems = validate(dataclasses.replace(cfg, mirror="/m" if name.startswith("mirror") else None,
                                            **{name: value}))
    assert len(problems) >= 1
    one_line(next(p for p in problems if flag(name) in p), name)


def test_the_examples_from_the_report():
    with pytest.raises(ConfigError, match=r"^--grad-accum 100000000000000000000 must be at most 2\*\*31 - 1$"):
        read_command_line(["--grad-accum", "100000000000000000000"])
    with pytest.raises(ConfigError, match=r"^--lr nan must be in \(0, 1\]$"):
        read_command_line(["--lr", "nan"])
    with pytest.raises(ConfigError, match=r"^--batch-size 0 must be at least 1$"):
        read_command_line(["--batch-size", "0"])
    with pytest.raises(ConfigError, match=r"^--weight-decay inf must be in \[0, inf\)$"):
        read_command_line(["--weight-decay", "inf"])


def test_a_negative_time_limit_says_it_is_negative(capsys):
    with pytest.raises(SystemExit) as info:
        read_command_line(["--time-limit", "-5"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--time-limit: '-5' is negative" in err and "0-59" not in err


def test_the_train_command_exits_2_with_one_line(capfd):
    from nanoresume.tools.cli import main

    assert main(["--grad-accum", "100000000000000000000"]) == 2
    err = capfd.readouterr().err.strip()
    assert err == "error: --grad-accum 100000000000000000000 must be at most 2**31 - 1", err


def test_a_huge_step_budget_per_process_is_refused_before_the_sampler_allocates_it():
    ok = resolve_config(TrainConfig(batch_size=MAX_SEQUENCES_PER_STEP, grad_accum=1))
    assert ok.batch_size == MAX_SEQUENCES_PER_STEP
    with pytest.raises(ConfigError, match=r"--batch-size 4096 x --grad-accum 4097 must be at most 16,777,216"):
        resolve_config(TrainConfig(batch_size=4096, grad_accum=4097))


def test_the_edges_of_every_range_are_accepted():
    base = resolve_config(TrainConfig())
    for name, (low, high) in INT_RANGES.items():
        for value in (low, high):
            changes = {name: value}
            if name in ("n_head", "n_embd"):
                changes = {"n_head": value, "n_embd": value}
            if name in ("batch_size", "grad_accum"):  # their product is bounded too
                changes = {"batch_size": 1, "grad_accum": 1, name: min(value, MAX_SEQUENCES_PER_STEP)}
            assert validate(dataclasses.replace(base, **changes)) == [], changes
    for name, (opening, low, high, closing, _) in FLOAT_RANGES.items():
        inside = [v for v, ok in ((low, opening == "["), (high, closing == "]")) if ok and math.isfinite(v)]
        for value in inside + [(low + min(high, 1.0)) / 2]:
            assert validate(dataclasses.replace(base, **{name: value})) == [], (name, value)


def test_what_validates_is_what_a_checkpoint_may_hold():
    """The config's int ranges lie within the checkpoint schema's, so a run never writes a config that
    ``verify`` or ``--resume`` would refuse."""
    for name, (low, high) in INT_RANGES.items():
        schema_low, schema_high = _CONFIG_BOUNDS.get(name, (0, MAX_COUNT))
        assert schema_low <= low and high <= schema_high, name


def test_self_test_processes_are_bounded_both_ways():
    with pytest.raises(ConfigError, match="--self-test-nproc 0 must be at least 1"):
        read_command_line(["--self-test", "--self-test-nproc", "0"])
    with pytest.raises(ConfigError, match=f"--self-test-nproc {10**9} must be at most {MAX_SELF_TEST_PROCESSES}"):
        read_command_line(["--self-test", "--self-test-nproc", str(10**9)])


@pytest.mark.parametrize("line, needle", [
    ("lr = nan", "--lr nan must be in (0, 1]"),
    ("grad_accum = 100000000000000000", "--grad-accum 100000000000000000 must be at most 2**31 - 1"),
    ("time_limit = -5", "--time-limit -5.0 must be in (0, 1e+09] seconds"),
    ('time_limit = "-5"', "time_limit '-5' is negative"),
    ("weight_decay = -inf", "--weight-decay -inf must be in [0, inf)"),
])
def test_a_toml_config_goes_through_the_same_ranges(line, needle, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError) as info:
        read_command_line(["--config", str(path)])
    assert needle in str(info.value) and "\n" not in str(info.value)
