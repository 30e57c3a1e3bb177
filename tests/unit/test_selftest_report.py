"""What the self-test says about a difference: the first step and the first tensor, named as a person
would look for them, and when the run left the reference."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nanoresume.checkpoint import FORMAT_VERSION, save_atomically, step_path
from nanoresume.compare import Difference
from nanoresume.tools.selftest_runs import SCENARIOS, Outcome
from nanoresume.tools.selftest_report import compare, distinct, locate, table, verdict, where_it_began


def run_folder(root: Path, name: str, losses: list[float], weight: float) -> Outcome:
    """A finished run as the self-test finds it: metrics.jsonl and a final Checkpointer file."""
    out = root / name
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "train/loss": x}) + "\n"
                                               for i, x in enumerate(losses)))
    state = {"format_version": FORMAT_VERSION, "kind": "state", "step": len(losses),
             "objects": {"model": {"w": torch.full((3,), weight)}, "sampler": {"seed": 1}},
             "rng": {"torch": torch.zeros(4, dtype=torch.uint8)}}
    final = step_path(out / "checkpoints", len(losses))
    save_atomically(state, final)
    scenario = SCENARIOS[0] if name == "reference" else SCENARIOS[1]
    return Outcome(scenario, out, stopped=[] if name == "reference" else ["2"],
                   resumed=[] if name == "reference" else [2], final=final, seconds=1.0)


def test_a_run_that_ends_like_the_reference_has_no_finding(tmp_path):
    reference = run_folder(tmp_path, "reference", [2.5, 2.25, 2.0], 1.0)
    assert compare(reference, run_folder(tmp_path, "same", [2.5, 2.25, 2.0], 1.0)) is None


def test_a_difference_names_the_first_loss_the_first_tensor_and_what_else_differs(tmp_path):
    reference = run_folder(tmp_path, "reference", [2.5, 2.25, 2.0], 1.0)
    other = run_folder(tmp_path, "other", [2.5, 2.25, 2.0000001], 1.0 + 2**-20)
    finding = compare(reference, other)
    assert finding.loss_step == 3 and finding.differing == ["model"]
    said = verdict([reference, other], [None, finding], 10.0, ["a hint"])
    lines = said.splitlines()
    assert lines[0] == ("first difference: loss at step 3 (2.0000000 vs 2.0000001); model weight w differs: "
                        "max abs diff 9.54e-07 (3 of 3 values differ)")
    assert lines[1] == ("  in the run 'SIGTERM'; at the end these differ: model; identical: data position, "
                        "RNG streams, counters")
    assert "step 3 is the first step after resuming from step 2" in lines[2]
    assert lines[-2:] == ["NOT bit-exact on this machine with these settings. Common causes:", "  - a hint"]
    assert "differs from step 3" in table([reference, other], [None, finding])


def test_numbers_get_just_enough_digits_to_tell_them_apart():
    assert distinct(2.31412, 2.31418) == ("2.3141", "2.3142")
    assert distinct(1.0, 1.0 + 2**-40) == ("1.000000000000", "1.000000000001")
    assert distinct(None, 2.5) == ("non-finite", "2.5")


def test_an_optimizer_moment_of_a_gpt_is_named_by_its_parameter(make_config):
    state = {"kind": "train", "config": make_config().to_dict()}
    found = Difference(("optimizer", "state", 2, "exp_avg"), None, None, "tensors differ")
    assert locate(found, state) == "optimizer exp_avg of blocks.0.attn.qkv.weight"
    assert locate(Difference(("ranks", 0, "rng", "torch"), None, None, ""), state) == \
        "the torch random number stream of rank 0"


def test_where_it_began_tells_a_broken_restore_from_a_run_that_is_not_deterministic(tmp_path):
    outcome = Outcome(SCENARIOS[1], tmp_path, stopped=["11"], resumed=[11])
    found = {"outcome": outcome, "losses": (1.0, 2.0), "state": None, "reference_state": {},
             "differing": ["model"], "identical": []}
    from nanoresume.tools.selftest_report import Finding

    assert "first step after resuming from step 11" in where_it_began(Finding(loss_step=12, **found))
    assert "training itself is not deterministic" in where_it_began(Finding(loss_step=5, **found))
    unseeded = Finding(**{**found, "differing": ["RNG streams"]}, loss_step=None)
    assert "seed_everything" in where_it_began(unseeded)


def test_the_verdict_says_what_was_compared_when_every_run_ended_as_the_reference(tmp_path):
    reference = run_folder(tmp_path, "reference", [2.5, 2.25, 2.0], 1.0)
    same = run_folder(tmp_path, "same", [2.5, 2.25, 2.0], 1.0)
    assert verdict([reference, same], [None], 12.4, ["a hint"]) == (
        "bit-exact on this machine with these settings (every step's loss and the whole final state, bit for "
        "bit; 12 s in all)")
    (reference.out / "metrics.jsonl").unlink()  # a script of your own that writes no losses
    assert verdict([reference, same], [None], 3.0, []) == (
        "bit-exact on this machine with these settings (the whole final state, bit for bit; 3 s in all)")
