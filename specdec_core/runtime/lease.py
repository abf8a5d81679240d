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
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


class ComputeLease:
    """An exclusive turn on the shared cores, held for one forward (``with lease:``).

    A turn is waited for at most ``timeout_s``: a holder that does not let go (a process stopped with
    SIGSTOP, or hung, in the middle of a forward) must not stall this one. Past it the forward runs without
    the lease, and forwards skip it for ``skip_s`` before trying again.
    """

    def __init__(self, path: Path, timeout_s: float = 10.0, skip_s: float = 30.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.timeout_s = timeout_s
        self.skip_s = skip_s
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        self._held = False
        self._skip_until = 0.0
        self._mutex = threading.Lock()

    def __enter__(self) -> ComputeLease:
        self._held = False
        if time.monotonic() < self._skip_until:
            return self
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._held = True
            return self
        except BlockingIOError:
            pass
        self._held = self._wait()
        return self

    def _wait(self) -> bool:
        """Block for the lock in a helper thread (woken the moment it is free), at most ``timeout_s``."""
        got = threading.Event()
        abandoned = [False]

        def take() -> None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            with self._mutex:
                if abandoned[0]:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)  # its forward went ahead without it
                else:
                    got.set()

        threading.Thread(target=take, name="lease-wait", daemon=True).start()
        if got.wait(self.timeout_s):
            return True
        with self._mutex:
            if got.is_set():
                return True
            abandoned[0] = True
        self._skip_until = time.monotonic() + self.skip_s
        log.warning(
            "the other process on these cores has held the compute lease for over %.1fs (stopped or hung?): "
            "forwards run without it for %.0fs",
            self.timeout_s,
            self.skip_s,
        )
        return False

    def __exit__(self, *exc) -> None:
        if self._held:
            self._held = False
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


def cpu_lease(root: Path, host: str, cpus: list[int], timeout_s: float = 10.0) -> ComputeLease:
    """The lease of the processes on ``host`` that run on exactly ``cpus``."""
    key = hashlib.sha1(f"{host}:{','.join(map(str, sorted(cpus)))}".encode()).hexdigest()[:16]
    lease = ComputeLease(root / "run" / f"cpu-{key}.lock", timeout_s=timeout_s)
    log.info("forwards take turns with other specdec processes on cores %s (%s)", cpus, lease.path)
    return lease
