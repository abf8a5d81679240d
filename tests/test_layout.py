"""Start-up choices for the layout a service finds: the OpenMP wait policy (set before torch loads), who
shares compute, and the lease that makes forwards on shared cores take turns."""

import os
import subprocess
import sys
import threading
import time

import pytest

from client.local import ROOT
from specdec import placement
from specdec_core.runtime.lease import cpu_lease


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "SPECDEC_VERIFIER_OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_auto_spins_briefly_when_sharing_the_machine_and_actively_when_pinned(clean_env):
    clean_env.setattr(placement, "pinned", lambda: False)
    assert placement.apply_wait_policy([], "verifier") == "brief"
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["GOMP_SPINCOUNT"] == "10000"
    clean_env.delenv("OMP_WAIT_POLICY")
    clean_env.setattr(placement, "pinned", lambda: True)
    assert placement.apply_wait_policy([], "verifier") == "active"
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_flag_environment_and_an_existing_policy(clean_env):
    assert placement.apply_wait_policy(["--omp-wait-policy", "passive"], "verifier") == "passive"
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ
    assert (
        placement.apply_wait_policy(["--omp-wait-policy=active"], "verifier") == "passive"
    )  # already set: kept
    clean_env.delenv("OMP_WAIT_POLICY")
    clean_env.setenv("SPECDEC_VERIFIER_OMP_WAIT_POLICY", "active")
    assert placement.apply_wait_policy([], "verifier") == "active"
    clean_env.delenv("OMP_WAIT_POLICY")
    with pytest.raises(ValueError, match="wait policy"):
        placement.apply_wait_policy(["--omp-wait-policy", "sometimes"], "verifier")


def test_the_service_sets_the_policy_before_torch_starts_openmp(tmp_path):
    """`specdec serve-*` applies it in the CLI, before torch is imported (libgomp reads it once)."""
    code = (
        "import sys; from client.cli import main; import specdec.placement as l; "
        "l.apply_wait_policy(['--omp-wait-policy', 'passive'], 'drafter'); "
        "print('torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"  # nothing on the CLI's path to the policy imports torch


def test_who_shares_compute():
    me = ("boot-1", "cpu", [0, 1])
    assert placement.shares_compute(me, ("boot-1", "cpu", [1]))  # same host, overlapping cores
    assert not placement.shares_compute(me, ("boot-1", "cpu", [2, 3]))  # pinned apart
    assert not placement.shares_compute(me, ("boot-2", "cpu", [0, 1]))  # another machine
    assert not placement.shares_compute(me, ("boot-1", "cuda:0", []))  # a GPU drafter
    assert placement.shares_compute(("b", "cuda:0", []), ("b", "cuda:0", [5]))
    assert not placement.shares_compute(("b", "cuda:0", []), ("b", "cuda:1", []))


def test_the_lease_makes_forwards_on_the_same_cores_take_turns(tmp_path):
    a, b = cpu_lease(tmp_path, "host", [0, 1]), cpu_lease(tmp_path, "host", [1, 0])
    other = cpu_lease(tmp_path, "host", [2])
    assert a.path == b.path and other.path != a.path
    inside: list[str] = []

    def turn(lease, name):
        with lease:
            inside.append(f"{name} in")
            time.sleep(0.05)
            inside.append(f"{name} out")

    threads = [threading.Thread(target=turn, args=(lease, name)) for lease, name in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    with other:  # a process on other cores never waits
        assert len(inside) <= 2
    for t in threads:
        t.join()
    assert inside in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])


def test_a_holder_that_never_lets_go_does_not_stall_the_other_process(tmp_path):
    stuck, waiter = cpu_lease(tmp_path, "host", [0]), cpu_lease(tmp_path, "host", [0], timeout_s=0.2)
    waiter.skip_s = 0.3
    stuck.__enter__()  # a process stopped in the middle of a forward
    t0 = time.monotonic()
    with waiter:
        assert 0.15 < time.monotonic() - t0 < 1.0  # waited its timeout, then ran without the lease
    t0 = time.monotonic()
    with waiter:
        assert time.monotonic() - t0 < 0.05  # skips the lease for a while instead of waiting every forward
    stuck.__exit__(None, None, None)  # it comes back and lets go
    time.sleep(0.35)
    with waiter:
        assert waiter._held  # the turns are taken again
    with stuck:  # and released: the other one gets it at once
        pass


def test_threads_never_exceed_the_cores_a_process_may_use(monkeypatch):
    monkeypatch.setattr(placement, "cpus", lambda: [3])
    assert placement.default_threads(2) == 1  # pinned to one core: one thread, not two time-sliced
    monkeypatch.setattr(placement, "cpus", lambda: [0, 1, 2, 3])
    assert placement.default_threads(2) == 2  # the machine's physical cores, as torch would take
