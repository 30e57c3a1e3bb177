"""Fixtures for the mirror's tests: a real S3 API server on 127.0.0.1 (moto's threaded server) reached
with the real s3fs client, and the same tests against a path mirror (a tmp folder).

Nothing leaves the machine: the server listens on loopback, and the credentials are dummies set for
the session (moto accepts any unless a test turns its authentication on).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.mirror.helpers import MirrorTarget, s3_options

_DUMMY_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
              "AWS_DEFAULT_REGION": "us-east-1"}
_CLEARED_ENV = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE",
                "AWS_SHARED_CREDENTIALS_FILE")


@pytest.fixture(scope="session")
def s3_credentials() -> Iterator[None]:
    """Dummy credentials in the environment for the session (restored after); no profile, no endpoint."""
    saved = {name: os.environ.get(name) for name in (*_DUMMY_ENV, *_CLEARED_ENV)}
    os.environ.update(_DUMMY_ENV)
    for name in _CLEARED_ENV:
        os.environ.pop(name, None)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def s3_endpoint(s3_credentials: None) -> Iterator[str]:
    """``http://127.0.0.1:<port>``: moto's S3 API server, one for the session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one request line each otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def new_bucket(endpoint: str) -> str:
    import s3fs

    name = f"mirror-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**s3_options(endpoint)).mkdir(name)
    return name


@pytest.fixture
def s3_target(s3_endpoint: str) -> MirrorTarget:
    """A mirror in a fresh bucket of the loopback server."""
    return MirrorTarget(f"s3://{new_bucket(s3_endpoint)}/run", s3_options(s3_endpoint))


@pytest.fixture
def path_target(tmp_path: Path) -> MirrorTarget:
    """A path mirror: a folder (as a mounted Drive would be)."""
    return MirrorTarget(str(tmp_path / "mirror"), {})


@pytest.fixture(params=[pytest.param("s3", marks=pytest.mark.slow), "path"])
def target(request: pytest.FixtureRequest) -> Any:
    """Each mirror test runs against the loopback S3 server and against a path mirror."""
    return request.getfixturevalue(f"{request.param}_target")
