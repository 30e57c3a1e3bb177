"""What a run leaves for programs: metrics.jsonl that reads as one run, a callback with every metric,
and a run killed before its first checkpoint that ``--resume auto`` continues with its own settings.
Also nanoGPT-prepared data end to end, set up through ``--config``."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nanoresume.checkpoint import step_path
from nanoresume.trainer import Trainer

from nanoresume.tools import cli, sampling
from tests.helpers import TRAIN_SCRIPT, LossRecorder, run_main


def read_jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class Crash(Exception):
    """Ends a run the way a kill does: no stop, no save."""


def crash_at(step: int):
    def hook(trainer, at, loss):
        if at == step:
            raise Crash
    return hook


def test_metrics_jsonl_has_a_line_per_step_and_per_evaluation(make_config):
    cfg = make_config(max_steps=6, eval_interval=3)
    recorder = LossRecorder()
    Trainer(cfg, on_step=recorder).run()
    records = read_jsonl(Path(cfg.out_dir))
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["train/loss"] for r in train] == [loss for _, loss in recorder.losses]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "time"} <= set(train[0])
    assert [(r["step"], sorted(r)) for r in records if "val/loss" in r] == \
        [(s, ["step", "time", "val/loss", "val/perplexity"]) for s in (0, 3, 6)]


def test_after_a_kill_the_lost_steps_are_named_and_metrics_jsonl_reads_as_one_run(make_config, capsys):
    cfg = make_config(max_steps=20, eval_interval=5, ckpt_interval=10)
    with pytest.raises(Crash):
        Trainer(cfg, on_step=crash_at(13)).run()  # steps 11-13 trained, never saved
    with open(Path(cfg.out_dir) / "metrics.jsonl", "a") as f:
        f.write('{"step": 14, "train/lo')  # and a line torn by the kill
    capsys.readouterr()
    recorder = LossRecorder()
    Trainer(dataclasses.replace(cfg, resume="auto"), on_step=recorder).run()
    assert "steps 11-13 trained before the last stop were never saved: lost, training again" in \
        capsys.readouterr().out
    records = read_jsonl(Path(cfg.out_dir))
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 21))
    assert [r["train/loss"] for r in train[10:]] == [loss for _, loss in recorder.losses]
    assert [r["step"] for r in records if "val/loss" in r] == [0, 5, 10, 15, 20]


def test_a_graceful_stop_loses_no_steps_and_says_none_are_lost(make_config, capsys):
    cfg = make_config(max_steps=10, eval_interval=5)
    Trainer(cfg, on_step=lambda tr, step, loss: tr.stop.request("test", 99) if step == 7 else None).run()
    capsys.readouterr()
    Trainer(dataclasses.replace(cfg, resume="auto")).run()
    assert "lost" not in capsys.readouterr().out


def test_the_callback_gets_every_training_step_and_evaluation(make_config):
    calls: list[tuple[int, dict]] = []
    cfg = make_config(max_steps=4, eval_interval=2)
    Trainer(cfg, on_metrics=lambda step, values: calls.append((step, values))).run()
    assert [(step, "val/loss" in values) for step, values in calls] == \
        [(0, True), (1, False), (2, False), (2, True), (3, False), (4, False), (4, True)]
    assert set(calls[1][1]) == {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"}


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_continues_with_its_own_settings(tiny_cli_args, tmp_path, capsys):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *tiny_cli_args(max_steps=5000, eval_interval=1000)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum('"train/loss"' in line for line in _lines(out)) < 5:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    saved = json.loads((out / "config.json").read_text())
    assert not list((out / "checkpoints").glob("step_*.pt"))

    # The same mismatch rules as a resume: a flag that changes the model is refused, touching nothing.
    refused = run_main(cli.main, ["--out-dir", str(out), "--resume", "auto", "--n-embd", "64"], capsys)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert f"--n-embd is 32 in {out / 'config.json'} but 64 now" in refused.stderr
    assert json.loads((out / "config.json").read_text()) == saved

    # Only the folder and a new length: model, data and every other setting come from OUT/config.json.
    again = run_main(cli.main, ["--out-dir", str(out), "--resume", "auto", "--max-steps", "8", "--no-progress",
                                "--cache-dir", saved["cache_dir"]], capsys)
    assert again.returncode == 0, again.stderr
    assert f"training the run that {out / 'config.json'} describes again, from step 0" in again.stdout
    assert "changed since the last start: --max-steps: 5000 -> 8" in again.stdout
    assert "steps 1-" in again.stdout and "lost, training again" in again.stdout
    config = json.loads((out / "config.json").read_text())
    assert config == {**saved, "max_steps": 8, "resume": "auto"}
    assert [r["step"] for r in read_jsonl(out) if "train/loss" in r] == list(range(1, 9))


def _lines(out: Path) -> list[str]:
    try:
        return (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []


@pytest.mark.slow
def test_nanogpt_token_data_trains_from_a_config_file_and_samples_token_ids(tmp_path, capsys):
    data = tmp_path / "shakespeare_char"  # nanoGPT's layout: train.bin and val.bin of uint16 ids, and meta.pkl
    data.mkdir()
    ids = np.random.default_rng(0).integers(0, 65, size=6000).astype(np.uint16)
    ids[:5000].tofile(data / "train.bin")
    ids[5000:].tofile(data / "val.bin")
    (data / "meta.pkl").write_bytes(b"never unpickled")
    settings = {"data": str(data), "token_dtype": "uint16", "vocab_size": 65, "n_layer": 1, "n_head": 2,
                "n_embd": 16, "block_size": 32, "batch_size": 4, "eval_iters": 2, "eval_interval": 4,
                "cache_dir": str(tmp_path / "cache"), "progress": False}
    (tmp_path / "run.json").write_text(json.dumps(settings))
    out = tmp_path / "out"
    trained = run_main(cli.main, ["--config", str(tmp_path / "run.json"), "--max-steps", "4", "--out-dir", str(out)],
                       capsys)  # in-process, as the sampling below (test_sampling.py runs sample.py as a script)
    assert trained.returncode == 0, trained.stderr
    assert "(train.bin + val.bin): 5,000 train + 1,000 val tokens" in trained.stdout
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in settings} == settings and config["max_steps"] == 4
    assert step_path(out / "checkpoints", 4).is_file()

    sampled = run_main(sampling.main, ["--ckpt", str(out / "best.pt"), "--prompt-ids", "1,2,3", "--max-new-tokens",
                                       "10", "--device", "cpu"], capsys)
    assert sampled.returncode == 0, sampled.stderr
    tokens = [int(t) for t in sampled.stdout.split()]
    assert tokens[:3] == [1, 2, 3] and len(tokens) == 13 and max(tokens) < 65
