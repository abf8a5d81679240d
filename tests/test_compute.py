"""The compute thread: every call on one thread, errors handed back, background work between calls."""

import threading
import time
from concurrent.futures import Future

import pytest

import specdec_core.compute as compute_module
from specdec_core.compute import ComputeThread


def test_calls_run_on_one_thread_and_errors_come_back():
    compute = ComputeThread()
    try:
        idents = {compute.call(threading.get_ident) for _ in range(5)}
        assert len(idents) == 1 and threading.get_ident() not in idents
        assert compute.call(lambda a, b=0: a + b, 2, b=3) == 5
        with pytest.raises(ZeroDivisionError):
            compute.call(lambda: 1 / 0)
        assert compute.call(lambda: compute.call(lambda: 7)) == 7  # re-entrant from the thread itself
    finally:
        compute.close()
    with pytest.raises(RuntimeError):
        compute.call(lambda: None)


def test_background_work_runs_between_calls_and_yields_to_them():
    compute = ComputeThread()
    steps: list[int] = []

    def work():
        for i in range(10_000):
            time.sleep(0.001)
            steps.append(i)
            yield

    try:
        compute.call(lambda: compute.set_background("w", work()))
        deadline = time.monotonic() + 5
        while not steps and time.monotonic() < deadline:
            time.sleep(0.01)
        assert steps, "background work ran while the thread was idle"
        seen = compute.call(lambda: len(steps))  # served between two steps, long before the work ends
        assert seen < 10_000
        compute.call(lambda: compute.clear_background("w"))
        stopped_at = len(steps)
        time.sleep(0.02)
        assert len(steps) == stopped_at  # cleared work is never resumed
    finally:
        compute.close()


def test_a_call_queued_behind_close_gets_an_error_not_a_hang():
    compute = ComputeThread()
    started, release = threading.Event(), threading.Event()
    compute._queue.put((lambda: (started.set(), release.wait()), (), {}, Future()))  # keep the thread busy
    started.wait()
    compute._closed = True  # close() has begun: its stop marker is queued ...
    compute._queue.put(compute_module._STOP)
    late: Future = Future()  # ... and a call that passed the closed check before it lands behind it
    compute._queue.put((lambda: 1, (), {}, late))
    release.set()
    with pytest.raises(RuntimeError, match="closed"):
        late.result(timeout=5)
    compute._thread.join(5)
    assert not compute._thread.is_alive()
