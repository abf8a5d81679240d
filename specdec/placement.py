"""Where a service runs (host, device, CPU cores) and the start-up choices that depend on it. Imports neither
torch, grpc nor the core's runtime: the CLI calls it before torch is imported.

* **OpenMP wait policy.** torch's CPU build uses GNU OpenMP, whose idle workers spin: on cores shared with
  the other role, one process's spinning takes the cores the other computes on. ``passive`` workers sleep
  at once, but every parallel region then pays a wake-up; ``brief`` (``OMP_WAIT_POLICY=PASSIVE`` with
  ``GOMP_SPINCOUNT=10000``) spins long enough to bridge the regions of one forward, then sleeps. The policy
  must be in the environment before the OpenMP runtime starts (before torch is imported), so the CLI
  applies it first thing. ``auto`` picks ``brief`` unless the process is pinned to a strict subset of the
  machine's cores (cores it was given for itself, where spinning costs nobody else: ``active``); an
  ``OMP_WAIT_POLICY`` already in the environment wins. What each policy costs, measured:
  docs/serving.md ("Choices made for the layout").
* **Threads.** torch's default intra-op thread count is the machine's physical cores, whatever the process
  may run on; a process pinned to one core then runs two threads on it. The services take the smaller of
  the two (``--threads`` overrides).
* **Shared compute.** The verifier compares the drafter's ``Info`` (kernel boot id, device type, CPU
  affinity) with its own: a drafter on the same host's CPU cores competes with the target for them, so
  the verifier does not overlap the two prefills (``--overlap-prefill auto``).

The compute lease and the scheduler a service builds from these values: ``specdec_core/runtime/factory.py``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable

WAIT_POLICIES = ("auto", "brief", "passive", "active")
BRIEF_SPINCOUNT = "10000"


def host_id() -> str:
    """The kernel's boot id (shared by containers on one host), else the host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def cpus() -> list[int]:
    """The CPU cores this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def default_threads(torch_default: int) -> int:
    """torch's intra-op threads for this process: its default (the machine's physical cores), but never more
    than the cores this process may run on (a container's cpuset, ``taskset``)."""
    return max(1, min(torch_default, len(cpus())))


def pinned() -> bool:
    """Whether this process was given a strict subset of the machine's cores."""
    return len(cpus()) < (os.cpu_count() or 1)


def choose_wait_policy(requested: str) -> str:
    """``brief``, ``passive`` or ``active`` for ``requested`` (auto | brief | passive | active)."""
    requested = requested.lower() or "auto"
    if requested not in WAIT_POLICIES:
        raise ValueError(f"OpenMP wait policy must be one of {', '.join(WAIT_POLICIES)}, got {requested!r}")
    if requested != "auto":
        return requested
    return "active" if pinned() else "brief"


def apply_wait_policy(argv: list[str], role: str) -> str:
    """Set ``OMP_WAIT_POLICY`` for a service from its flags / environment, before torch is imported.

    Returns the policy in effect (the environment's own when it already has one).
    """
    if os.environ.get("OMP_WAIT_POLICY"):
        return os.environ["OMP_WAIT_POLICY"].lower()
    requested = os.environ.get(f"SPECDEC_{role.upper()}_OMP_WAIT_POLICY", "auto")
    for i, arg in enumerate(argv):
        if arg == "--omp-wait-policy" and i + 1 < len(argv):
            requested = argv[i + 1]
        elif arg.startswith("--omp-wait-policy="):
            requested = arg.split("=", 1)[1]
    policy = choose_wait_policy(requested)
    os.environ["OMP_WAIT_POLICY"] = "ACTIVE" if policy == "active" else "PASSIVE"
    if policy == "brief" and not os.environ.get("GOMP_SPINCOUNT"):
        os.environ["GOMP_SPINCOUNT"] = BRIEF_SPINCOUNT
    return policy


def shares_compute(mine: tuple[str, str, Iterable[int]], theirs: tuple[str, str, Iterable[int]]) -> bool:
    """Whether two services (host id, device, cpus) compete for the same compute."""
    (host_a, device_a, cpus_a), (host_b, device_b, cpus_b) = mine, theirs
    if not host_a or host_a != host_b:
        return False
    if device_a.startswith("cuda") or device_b.startswith("cuda"):
        return device_a == device_b  # the same GPU (a CPU and a GPU role do not compete much)
    return bool(set(cpus_a) & set(cpus_b))
