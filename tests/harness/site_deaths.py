"""Kill one of two gloo processes just before each collective of :mod:`nanoresume.distributed`; print, as
JSON, what the survivor raised there: ``{site: [exception type, message]}``.

    python tests/harness/site_deaths.py WORK_DIR

One interpreter imports torch once, then forks a fresh pair of processes per site (fork is cheap; a
torchrun launch per site costs seconds). Used by tests/unit/test_distributed.py.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist

from nanoresume import distributed

# site -> (the rank that dies, the collective the other one then runs)
SITES: dict[str, tuple[int, Callable[[], Any]]] = {
    "the per-step vote": (1, lambda: distributed.agree(torch.tensor(2.0), torch.tensor(1.0), 0, False, False, False)),
    "the checkpoint gather": (1, lambda: distributed.gather_objects({"rng": [1, 2, 3]})),  # rank 0 receives
    "evaluation": (1, lambda: distributed.all_sum(torch.zeros(4, dtype=torch.float64))),
    "the resume broadcast": (0, lambda: distributed.broadcast_object({"step": 8})),  # rank 1 receives
    "a barrier": (0, lambda: distributed.barrier()),
}


def pair(site: str, store_path: str) -> tuple[str, str]:
    """Fork two ranks in a gloo group; one dies before ``site``, the other reports what it raised."""
    dying, collective = SITES[site]
    read, write = os.pipe()
    pids = []
    for rank in (0, 1):
        pid = os.fork()
        if pid == 0:  # a child: one rank
            os.close(read)
            result = ("nothing", "")
            try:
                dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2,
                                        timeout=datetime.timedelta(seconds=60))
                dist.barrier()  # both ranks are in the group
                if rank == dying:
                    os.kill(os.getpid(), signal.SIGKILL)
                collective()
            except BaseException as error:  # the report is the point
                result = (type(error).__name__, str(error))
            os.write(write, json.dumps(result).encode())
            os._exit(0)
        pids.append(pid)
    os.close(write)
    with os.fdopen(read) as answers:
        text = answers.read()
    for pid in pids:
        os.waitpid(pid, 0)
    kind, message = json.loads(text) if text else ("no answer", "")
    return kind, message


def main(work: str) -> None:
    results = {site: pair(site, os.path.join(work, f"store-{i}")) for i, site in enumerate(SITES)}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
