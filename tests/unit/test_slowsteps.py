"""The slow-step warning: only a sustained pattern warns, once, and its advice fits the settings in use."""

from __future__ import annotations

from nanoresume.slowsteps import SlowStepWatch


def feed(watch: SlowStepWatch, durations: list[float], first_step: int = 1) -> list[str]:
    """The warnings a run whose steps take ``durations`` seconds (a fake clock) gets."""
    found = [watch.observe(step, seconds) for step, seconds in enumerate(durations, start=first_step)]
    return [warning for warning in found if warning is not None]


def test_one_slow_step_after_start_up_does_not_warn():
    assert feed(SlowStepWatch(grad_accum=1, batch_size=12), [45.0] + [0.5] * 50) == []


def test_slow_steps_that_come_and_go_on_a_busy_machine_do_not_warn():
    bursts = ([25.0] * 4 + [1.0]) * 20  # never five slow steps in a row
    assert feed(SlowStepWatch(grad_accum=1, batch_size=12), bursts) == []


def test_sustained_slow_steps_warn_once_naming_the_steps():
    warnings = feed(SlowStepWatch(grad_accum=4, batch_size=12), [21.0, 24.0, 25.0, 30.0, 26.0] * 10, first_step=11)
    assert len(warnings) == 1
    assert warnings[0].startswith("steps 11-15 each took over 20 s (median 25 s); a stop signal waits for the step")


def test_with_accumulation_the_advice_is_to_lower_grad_accum():
    [warning] = feed(SlowStepWatch(grad_accum=8, batch_size=12), [25.0] * 5)
    assert "Lower --grad-accum (now 8: each step runs 8 micro-batches)" in warning
    assert "--batch-size" not in warning


def test_without_accumulation_the_advice_never_names_grad_accum():
    [warning] = feed(SlowStepWatch(grad_accum=1, batch_size=12), [25.0] * 5)
    assert "--grad-accum" not in warning and "Lower --batch-size (now 12)" in warning


def test_with_nothing_left_to_split_the_advice_is_a_smaller_model_or_a_faster_device():
    [warning] = feed(SlowStepWatch(grad_accum=1, batch_size=1), [25.0] * 5)
    assert "--grad-accum" not in warning and "--batch-size" not in warning
    assert "smaller model (--n-layer, --n-embd, --block-size) or a faster device" in warning


def test_when_earlier_steps_were_fast_the_warning_says_the_machine_may_be_busy():
    [warning] = feed(SlowStepWatch(grad_accum=1, batch_size=12), [0.8] * 30 + [22.0] * 5)
    assert ("The fastest step so far took 0.8 s, so this machine may be busy with other work; if it stays slow, "
            "lower --batch-size (now 12)") in warning


def test_every_warning_is_one_line_that_offers_a_longer_grace_period():
    for accum, batch in ((1, 1), (1, 12), (8, 12)):
        [warning] = feed(SlowStepWatch(grad_accum=accum, batch_size=batch), [40.0] * 5)
        assert "\n" not in warning and warning.endswith("or give the job a longer grace period")
