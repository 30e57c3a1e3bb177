"""The mirror's flags and lines, as plain values: parsing (flags and --config keys), defaults, one-line
problems, the lag the evaluation line adds, and the refusal of a mirror that holds another run."""

from __future__ import annotations

import json

import pytest

from nanoresume import messages
from nanoresume.config import (MIRROR_WAIT_SECONDS, RUNTIME_FIELDS, TrainConfig, command_line_flags, mirror_problems,
                               parse_config)
from nanoresume.errors import ConfigError
from nanoresume.mirror import Mirror, MirrorError
from nanoresume.startup import run_identity


def test_mirror_flags_parse_repeat_and_round_trip_through_command_line_flags():
    cfg = parse_config(["--mirror", "s3://b/run", "--mirror-option", "profile=p",
                        "--mirror-option", "client_kwargs.endpoint_url=http://127.0.0.1:9000", "--mirror-wait", "5",
                        "--mirror-keep-last", "2"])
    assert (cfg.mirror, cfg.mirror_wait, cfg.mirror_keep_last) == ("s3://b/run", 5.0, 2)
    assert cfg.mirror_option == ["profile=p", "client_kwargs.endpoint_url=http://127.0.0.1:9000"]
    again = parse_config(command_line_flags({name: getattr(cfg, name) for name in
                                             ("mirror", "mirror_option", "mirror_wait", "mirror_keep_last")}))
    assert again.mirror_option == cfg.mirror_option and again.mirror_wait == 5.0


def test_mirror_settings_work_as_config_file_keys(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"mirror": "/drive/run", "mirror_option": "auto_mkdir=true", "mirror_wait": 30}))
    cfg = parse_config(["--config", str(path)])
    assert (cfg.mirror, cfg.mirror_option, cfg.mirror_wait) == ("/drive/run", ["auto_mkdir=true"], 30.0)
    path.write_text(json.dumps({"mirror_option": [1]}))
    with pytest.raises(ConfigError, match="mirror_option must be a string or a list of strings"):
        parse_config(["--config", str(path)])


def test_the_defaults_and_that_a_resume_takes_the_mirror_from_the_command_line():
    cfg = TrainConfig()
    assert (cfg.mirror, cfg.mirror_option, cfg.mirror_wait, cfg.mirror_keep_last) == (None, None, 20.0, None)
    assert MIRROR_WAIT_SECONDS < 30  # a 30 s preemption notice must hold the local save too
    assert {"mirror", "mirror_option", "mirror_wait", "mirror_keep_last"} <= set(RUNTIME_FIELDS)


@pytest.mark.parametrize("changes, needle", [
    (dict(mirror=" "), "--mirror must not be empty"),
    (dict(mirror_option=["a=1"]), "--mirror-option only applies to --mirror"),
    (dict(mirror="/m", mirror_option=["novalue"]), "must be KEY=VALUE"),
    (dict(mirror="/m", mirror_wait=-1.0), "--mirror-wait -1.0 must be in [0, 1e+09] seconds"),
    (dict(mirror="/m", mirror_wait=float("nan")), "--mirror-wait nan"),
    (dict(mirror="/m", mirror_keep_last=0), "--mirror-keep-last 0 must be at least 1"),
])
def test_bad_mirror_settings_are_named(changes, needle):
    problems = mirror_problems(TrainConfig(**changes))
    assert len(problems) == 1 and needle in problems[0]


def test_the_lag_on_the_evaluation_line():
    assert messages.mirror_lag(0, 0.0) == " | mirror up to date"
    assert messages.mirror_lag(1500, 14.2) == " | mirror -1,500 steps, 14 s"


def test_a_mirror_holds_one_run(tmp_path):
    mirror = Mirror(str(tmp_path / "mirror"))
    mirror.probe()
    ours = run_identity(TrainConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256), "ab" * 32)
    mirror.claim(ours)  # the first run claims it
    mirror.claim(dict(ours))  # the same run again: fine
    with pytest.raises(MirrorError) as info:
        mirror.claim({**ours, "data_fingerprint": "cd" * 32, "n_embd": 64})
    message = str(info.value)
    assert "holds another run" in message and "data_fingerprint 'abababababab' there, 'cdcdcdcdcdcd' here" in message
    assert "n_embd 32 there, 64 here" in message and "\n" not in message
