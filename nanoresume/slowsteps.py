"""Are this run's steps longer than a stop can wait? One warning, on a sustained pattern, with advice that fits.

A stop signal is honoured between optimizer steps, so a step longer than a preemption's grace period
(about 30 s on GCP and Azure spot VMs and Kubernetes) can be killed before it saves. One slow step says
little: the first steps after start-up, an evaluation's neighbour or a burst of other work on a shared
machine. Only ``SUSTAINED_STEPS`` slow steps in a row make a warning, and its advice names only the
flags that would shorten a step in the settings in use.
"""

from __future__ import annotations

import statistics
from typing import Optional

SLOW_STEP_SECONDS = 20.0  # leaves a ~30 s grace period room for the step's save
SUSTAINED_STEPS = 5  # consecutive slow steps before a warning


class SlowStepWatch:
    """Told each step's duration; returns the warning once the steps have been slow ``sustained`` times in a row.

        watch = SlowStepWatch(grad_accum=1, batch_size=12)
        warning = watch.observe(step, seconds)   # None, or the one line to print (at most once per run)
    """

    def __init__(self, grad_accum: int, batch_size: int, threshold: Optional[float] = None,
                 sustained: Optional[int] = None) -> None:
        self.grad_accum, self.batch_size = grad_accum, batch_size
        self.threshold = SLOW_STEP_SECONDS if threshold is None else threshold
        self.sustained = SUSTAINED_STEPS if sustained is None else sustained
        self.recent: list[float] = []  # the current run of slow steps
        self.fastest = float("inf")
        self.warned = False

    def observe(self, step: int, seconds: float) -> Optional[str]:
        self.fastest = min(self.fastest, seconds)
        if self.warned:
            return None
        self.recent = self.recent + [seconds] if seconds > self.threshold else []
        if len(self.recent) < self.sustained:
            return None
        self.warned = True
        return slow_steps(step - self.sustained + 1, step, statistics.median(self.recent), self.fastest,
                          self.threshold, self.grad_accum, self.batch_size)


def slow_steps(first: int, last: int, median: float, fastest: float, threshold: float, grad_accum: int,
               batch_size: int) -> str:
    """The warning: what was seen, why it matters, and what would shorten a step with these settings."""
    seen = (f"steps {first:,}-{last:,} each took over {threshold:.0f} s (median {median:.0f} s); a stop signal "
            f"waits for the step to end, so a stop may outlast a ~30 s preemption grace period")
    if grad_accum > 1:
        advice = (f"lower --grad-accum (now {grad_accum}: each step runs {grad_accum} micro-batches) for shorter "
                  f"steps, which also shrinks the global batch")
    elif batch_size > 1:
        advice = f"lower --batch-size (now {batch_size}) for shorter steps"
    else:
        advice = "a smaller model (--n-layer, --n-embd, --block-size) or a faster device would shorten them"
    if fastest < threshold / 2:
        advice = (f"the fastest step so far took {fastest:.1f} s, so this machine may be busy with other work; "
                  f"if it stays slow, {advice}")
    return f"{seen}. {advice[0].upper()}{advice[1:]}, or give the job a longer grace period"
