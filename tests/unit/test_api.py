"""The public API for loops of your own: few names, each documented, none of them paid for by ``import nanoresume``."""

from __future__ import annotations

import subprocess
import sys

import pytest

import nanoresume
from tests.helpers import REPO


def test_every_public_name_resolves_and_says_what_it_is_for():
    for name in nanoresume.__all__:
        value = getattr(nanoresume, name)
        if name != "__version__":
            assert (value.__doc__ or "").strip(), f"nanoresume.{name} has no docstring"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Trainerr'"):
        nanoresume.Trainerr  # noqa: B018


def test_importing_nanoresume_or_its_stop_flag_does_not_import_torch():
    code = "import sys, nanoresume; from nanoresume import StopFlag; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.stdout.strip() == "False", result.stderr



def test_every_public_name_is_in_the_readme_table():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Use it in your own loop"):]
    for name in nanoresume.__all__:
        if name != "__version__":
            assert f"`{name}" in table, f"{name} is missing from the README's API table"
