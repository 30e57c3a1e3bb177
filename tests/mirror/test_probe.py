"""A mirror that cannot work is refused at start, in one line naming the URL and the fix."""

from __future__ import annotations

import os

import pytest

from nanoresume.mirror import Mirror, MirrorError, describe_failure, parse_options
from tests.mirror.helpers import MirrorTarget


def one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_path_mirror_is_created_below_an_existing_folder_and_the_probe_leaves_nothing(tmp_path):
    Mirror(str(tmp_path / "mirror")).probe()
    assert list((tmp_path / "mirror").iterdir()) == []


def test_a_path_mirror_whose_parent_is_missing_is_refused_not_invented(tmp_path):
    url = str(tmp_path / "drive-not-mounted" / "MyDrive" / "run")
    with pytest.raises(MirrorError) as info:
        Mirror(url).probe()
    assert url in one_line(info) and "mount" in one_line(info)
    assert not (tmp_path / "drive-not-mounted").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_an_unwritable_path_mirror_is_refused(tmp_path):
    folder = tmp_path / "mirror"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(MirrorError) as info:
            Mirror(str(folder)).probe()
        assert "not writable" in one_line(info)
    finally:
        folder.chmod(0o755)


def test_a_path_mirror_on_a_read_only_filesystem_is_refused(tmp_path, monkeypatch):
    import errno

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    mirror = Mirror(str(tmp_path))
    monkeypatch.setattr(mirror.store, "put_bytes", read_only)
    with pytest.raises(MirrorError) as info:
        mirror.probe()
    assert "not writable" in one_line(info) and str(tmp_path) in one_line(info)


def test_a_url_whose_backend_is_not_installed_names_the_extra():
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed here")
    except ImportError:
        pass
    with pytest.raises(MirrorError) as info:
        Mirror("gs://bucket/run")
    assert "pip install 'nanoresume[gcs]'" in one_line(info)
    assert "pip install 'nanoresume[s3]'" in describe_failure("s3://b/r", ImportError("Install s3fs to access S3"))


def test_an_unknown_protocol_is_refused():
    with pytest.raises(MirrorError) as info:
        Mirror("nosuch://bucket/run")
    assert "unknown protocol nosuch://" in one_line(info)


def test_mirror_options_nest_on_dots_and_take_their_types():
    assert parse_options(["client_kwargs.endpoint_url=http://127.0.0.1:9000", "anon=false", "profile=x",
                          "config_kwargs.connect_timeout=5"]) == {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}, "anon": False, "profile": "x",
        "config_kwargs": {"connect_timeout": 5}}
    with pytest.raises(MirrorError, match="KEY=VALUE"):
        parse_options(["endpoint"])


@pytest.mark.slow
def test_a_missing_bucket_is_refused(s3_endpoint):
    from tests.mirror.helpers import s3_options

    with pytest.raises(MirrorError) as info:
        MirrorTarget("s3://no-such-bucket/run", s3_options(s3_endpoint)).open()
    assert "s3://no-such-bucket/run" in one_line(info) and "bucket does not exist" in one_line(info)


@pytest.mark.slow
def test_wrong_credentials_are_refused(s3_target, monkeypatch):
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server checks keys from now on
    with pytest.raises(MirrorError) as info:
        s3_target.open()
    assert "access denied" in one_line(info) and "AWS_ACCESS_KEY_ID" in one_line(info)


@pytest.mark.slow
def test_an_unreachable_endpoint_is_refused(s3_credentials):
    import socket

    from tests.mirror.helpers import s3_options

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MirrorError) as info:
        MirrorTarget("s3://bucket/run", s3_options(f"http://127.0.0.1:{port}")).open()
    assert "cannot reach" in one_line(info)
