"""What ships beside the code: the license setup.cfg promises."""

from __future__ import annotations

import configparser

from tests.helpers import REPO


def test_the_license_file_exists_and_is_the_one_setup_cfg_names():
    metadata = configparser.ConfigParser()
    metadata.read(REPO / "setup.cfg")
    assert metadata["metadata"]["license"] == "MIT"
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) the nanoresume authors" in text
