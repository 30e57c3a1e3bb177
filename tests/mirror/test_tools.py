"""The tools read a mirror's URL: ``ckpt list|verify URL`` and ``sample --ckpt URL/best.pt`` download to a
cache, verify and load safely; a corrupt or malicious object is one BAD line and never runs code.
(In-process, on a ``memory://`` mirror: the same code path as s3:// without a server.)"""

from __future__ import annotations

import shutil
import uuid

import pytest

from nanoresume.mirror import Mirror
from nanoresume.tools import ckpt, evaluation, sampling
from tests.helpers import flip_a_byte, run_main
from tests.mirror.helpers import make_malicious_checkpoint


@pytest.fixture
def mirrored_run(reference_run, tmp_path, monkeypatch):
    """A memory:// mirror holding steps 10 and 20 of a real run (pointer at 20) and best.pt, plus a
    bit-flipped step 15 under the pointer and a step 30 above it; the tools' cache under tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = reference_run(max_steps=20, eval_interval=10)
    url = f"memory://mirror-{uuid.uuid4().hex[:8]}/run"
    mirror = Mirror(url)
    mirror.upload_extras(run.out)
    damaged = tmp_path / "damaged" / "step_00000015.pt"
    damaged.parent.mkdir()
    shutil.copyfile(run.out / "checkpoints" / "step_00000010.pt", damaged)
    flip_a_byte(damaged)
    mirror.store.put_file(damaged, "checkpoints/step_00000015.pt")
    for step in (10, 20):
        mirror.upload_checkpoint(run.out / "checkpoints" / f"step_{step:08d}.pt", step)
    mirror.store.put_file(run.out / "checkpoints" / "step_00000020.pt", "checkpoints/step_00000030.pt")
    return url


@pytest.mark.slow
def test_ckpt_list_of_a_url_verifies_each_checkpoint_and_names_the_one_a_resume_would_pick(mirrored_run, capsys):
    listed = run_main(ckpt.main, ["list", mirrored_run], capsys)
    assert listed.returncode == 1, listed.stdout + listed.stderr  # step 15 is bad
    rows = {line.split()[0]: line for line in listed.stdout.splitlines() if line.strip()[:1].isdigit()}
    assert rows["10"].endswith("ok") and rows["20"].endswith("ok")
    assert "BAD" in rows["15"] and f"{mirrored_run}/checkpoints/step_00000015.pt" in rows["15"]
    assert "skipped: not covered by LATEST.json" in rows["30"]
    assert f"--resume auto would pick: {mirrored_run}/checkpoints/step_00000020.pt" in listed.stdout
    assert "best.pt: step 20" in listed.stdout


@pytest.mark.slow
def test_ckpt_verify_of_a_url_downloads_to_a_cache_and_refuses_a_malicious_pickle(mirrored_run, tmp_path, capsys):
    good = run_main(ckpt.main, ["verify", f"{mirrored_run}/checkpoints/step_00000020.pt"], capsys)
    assert good.returncode == 0 and good.stdout.startswith("ok   "), good.stdout + good.stderr
    assert list((tmp_path / "cache").rglob("step_00000020.pt")), "the verified copy is cached"

    marker = tmp_path / "pwned"
    evil = make_malicious_checkpoint(tmp_path / "evil", 12, marker)
    Mirror(mirrored_run).store.put_file(evil, "checkpoints/step_00000012.pt")
    bad = run_main(ckpt.main, ["verify", f"{mirrored_run}/checkpoints/step_00000012.pt"], capsys)
    assert bad.returncode == 1 and bad.stdout.startswith("BAD  "), bad.stdout + bad.stderr
    assert not marker.exists(), "a checkpoint on the mirror ran code"
    assert not list((tmp_path / "cache").rglob("step_00000012.pt")), "a refused download is not kept"

    whole = run_main(ckpt.main, ["verify", mirrored_run], capsys)
    assert whole.returncode == 1 and "3 of 5 checkpoint(s) verify" in whole.stdout, whole.stdout
    assert not marker.exists()

    missing = run_main(ckpt.main, ["verify", f"{mirrored_run}/checkpoints/step_00000099.pt"], capsys)
    assert missing.returncode == 2 and "no such object on the mirror" in missing.stderr


@pytest.mark.slow
def test_sample_from_best_pt_on_a_mirror(mirrored_run, capsys):
    sampled = run_main(sampling.main, ["--ckpt", f"{mirrored_run}/best.pt", "--max-new-tokens", "5"], capsys)
    assert sampled.returncode == 0, sampled.stderr


@pytest.mark.slow
def test_evaluate_a_step_checkpoint_on_a_mirror(mirrored_run, tiny_text, capsys):
    url = f"{mirrored_run}/checkpoints/step_00000020.pt"
    result = run_main(evaluation.main, ["--ckpt", url, "--data", str(tiny_text)], capsys)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{url} (step 20) on {tiny_text}:")

