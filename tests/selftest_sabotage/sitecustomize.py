"""Loaded by every Python process started with this folder first on PYTHONPATH: a training run whose
``--out-dir`` folder is named ``NANORESUME_TEST_FORGET_RNG_IN`` (a self-test scenario's folder, e.g.
``sigterm``) gets the harness's forget-the-random-streams probe; every other run trains as it is. So
one self-test can show a bit-exact scenario beside one that is not. Then the next ``sitecustomize`` on
the path runs (tests/harness's, which installs the probe), as tests/harness/sitecustomize.py does."""

import os
import runpy
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
SCENARIO_ENV = "NANORESUME_TEST_FORGET_RNG_IN"


def _out_dir() -> str:
    try:
        with open("/proc/self/cmdline", "rb") as f:  # sys.argv is not set yet while site runs
            words = f.read().decode(errors="replace").split("\0")
    except OSError:
        return ""
    return next((words[i + 1] for i, word in enumerate(words[:-1]) if word == "--out-dir"), "")


def _main() -> None:
    if os.environ.get(SCENARIO_ENV) and os.path.basename(_out_dir().rstrip(os.sep)) == os.environ[SCENARIO_ENV]:
        os.environ["NANORESUME_PROBE_FORGET_RNG"] = "1"
    for folder in sys.path:
        candidate = os.path.join(folder or os.curdir, "sitecustomize.py")
        if os.path.abspath(os.path.dirname(candidate)) != _HERE and os.path.isfile(candidate):
            runpy.run_path(candidate, run_name="sitecustomize")
            return


if not getattr(sys, "_nanoresume_forget_rng_in", False):  # the next one runs the first one found: this one
    sys._nanoresume_forget_rng_in = True
    _main()
