"""Loaded by every Python process started with this folder on PYTHONPATH: installs the test probes of
:mod:`probes` in a training process when a ``NANORESUME_PROBE_*`` variable asks for one.

Only the first ``sitecustomize`` on the path is imported, so this one then runs the next one found
there too (``tests/integration/audit``'s): test harnesses compose by both being on PYTHONPATH.
"""

import os
import runpy
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _run_the_next_sitecustomize() -> None:
    for folder in sys.path:
        candidate = os.path.join(folder or os.curdir, "sitecustomize.py")
        if os.path.abspath(os.path.dirname(candidate)) != _HERE and os.path.isfile(candidate):
            runpy.run_path(candidate, run_name="sitecustomize")
            return


if any(name.startswith("NANORESUME_PROBE_") and value for name, value in os.environ.items()):
    import probes  # this folder is on the path

    probes.install()
_run_the_next_sitecustomize()
