#!/usr/bin/env python3
"""What the mirror costs over plain s3fs, against a loopback S3 server (moto), for checkpoints of a few sizes.

    python benchmarks/mirror.py [--mb 16 128] [--repeats 3]

Needs the dev extras (``moto[server]``, ``s3fs``). Each checkpoint is a real step file (random
float32 weights, saved by nanoresume's commit, with its ``.sha256``). Per repetition, interleaved,
and the median shown:

- plain upload: ``s3fs.put_file`` of the same file to another key;
- mirror upload: ``Mirror.upload_checkpoint``: the file, checked by the CRC32 S3 answers the PUT with
  (below 100 MiB, one PUT from memory) or by its size and MD5/multipart ETag (above: s3fs's put_file,
  in 50 MiB parts from 100 MiB on, the MD5 hashed on a helper thread while it uploads), then the
  pointer written and checked the same way. 128 MiB takes the multipart path;
- plain resume: ``s3fs.get_file`` then ``torch.load`` (``weights_only``, torch's default);
- mirror resume: ``find_newest_on_mirror`` into an empty folder: list, read the pointer, download to
  a temp name, verify the digest, unpickle safely, check the training state's keys, commit.

Goals (issue 18): upload >= 0.9x plain throughput; resume <= 1.5x plain time. Loopback moto is a
Python server in this process, on the same cores: its own CPU (it MD5s every body) competes with the
mirror's local MD5 and digest checks, which a remote store's would not; a real bucket's network time
also makes both sides longer and the ratios closer to 1. The machine's load is printed: on a busy
machine the small sizes are noise.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from nanoresume.checkpoint import FORMAT_VERSION, save_atomically  # noqa: E402
from nanoresume.mirror import Mirror, find_newest_on_mirror  # noqa: E402


def start_server() -> tuple[object, str]:
    import logging

    from moto.server import ThreadedMotoServer

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(size_mb: int, repeats: int, endpoint: str, work: Path) -> None:
    import s3fs

    options = {"client_kwargs": {"endpoint_url": endpoint}}
    fs = s3fs.S3FileSystem(**options)
    bucket = f"bench-{size_mb}mb-{os.getpid()}"
    fs.mkdir(bucket)
    local = work / f"{size_mb}mb" / "step_00000100.pt"
    local.parent.mkdir(parents=True)
    weights = torch.randn(size_mb << 18)  # float32: size_mb MiB
    save_atomically({"format_version": FORMAT_VERSION, "kind": "train", "step": 100, "model": {"w": weights}}, local)
    mirror = Mirror(f"s3://{bucket}/run", options)
    mirror.probe()
    plain_copy = work / "plain.pt"

    def plain_resume() -> None:
        fs.get_file(f"{bucket}/plain/step_00000100.pt", str(plain_copy))
        torch.load(plain_copy, map_location="cpu")

    def mirror_resume(folder: Path) -> None:
        assert find_newest_on_mirror(Mirror(mirror.url, options), folder, print) is not None

    times: dict[str, list[float]] = {k: [] for k in ("plain upload", "mirror upload", "plain resume", "mirror resume")}
    for repeat in range(repeats):
        restore_to = work / f"restore-{size_mb}-{repeat}"
        runs = {"plain upload": lambda: fs.put_file(str(local), f"{bucket}/plain/step_00000100.pt"),
                "mirror upload": lambda: mirror.upload_checkpoint(local, 100),
                "plain resume": plain_resume,
                "mirror resume": lambda: mirror_resume(restore_to)}  # noqa: B023 (called in this repetition)
        order = list(runs) if repeat % 2 == 0 else ["mirror upload", "plain upload", "mirror resume", "plain resume"]
        for name in order:  # alternate which goes first, so neither always follows the other
            times[name].append(timed(runs[name]))
            if name == "plain resume":
                plain_copy.unlink()
            if name == "mirror resume":
                shutil.rmtree(restore_to)
    median = {k: statistics.median(v) for k, v in times.items()}
    mb = local.stat().st_size / 1e6
    print(f"{size_mb:>5} MiB  plain upload {mb / median['plain upload']:7.1f} MB/s  "
          f"mirror upload {mb / median['mirror upload']:7.1f} MB/s  "
          f"ratio {median['plain upload'] / median['mirror upload']:.2f}x (goal >= 0.9)")
    print(f"{'':>9}  plain resume {median['plain resume'] * 1e3:7.0f} ms    "
          f"mirror resume {median['mirror resume'] * 1e3:7.0f} ms    "
          f"ratio {median['mirror resume'] / median['plain resume']:.2f}x (goal <= 1.5)")
    mirror.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[16, 128], help="checkpoint sizes in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    server, endpoint = start_server()
    work = Path(tempfile.mkdtemp(prefix="nanoresume-bench-mirror-"))
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"loopback S3 (moto) at {endpoint}; torch {torch.__version__}; {os.cpu_count()} cores, load {load}; "
              f"median of {args.repeats}")
        for size in args.mb:
            bench(size, args.repeats, endpoint, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        server.stop()


if __name__ == "__main__":
    main()
