"""One forward at a time across the processes that share a host's CPU cores.

When the drafter and the verifier run on the same cores (docker-compose, ``specdec demo``), a drafter
step that starts while the target computes does not run beside it: both OpenMP teams are time-sliced on
the same cores, and every parallel region waits for its slowest, descheduled thread, so both forwards
crawl. Taking turns is faster than sharing. Processes that find themselves on the same host with the same
CPU set take an advisory file lock (``flock``) around each forward, named by the host and the CPU set
under ``$SPECDEC_HOME/run`` (the directory both roles already share: the models volume in
docker-compose). Processes pinned to different cores get different names, so they never wait for each
other; GPU forwards take no lease.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class ComputeLease:
    """An exclusive turn on the shared cores, held for one forward (``with lease:``)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)

    def __enter__(self) -> ComputeLease:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


def cpu_lease(root: Path, host: str, cpus: list[int]) -> ComputeLease:
    """The lease of the processes on ``host`` that run on exactly ``cpus``."""
    key = hashlib.sha1(f"{host}:{','.join(map(str, sorted(cpus)))}".encode()).hexdigest()[:16]
    lease = ComputeLease(root / "run" / f"cpu-{key}.lock")
    log.info("forwards take turns with other specdec processes on cores %s (%s)", cpus, lease.path)
    return lease
