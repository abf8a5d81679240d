"""One thread for all of a process's model work, with background work between calls.

Why one thread: torch's CPU build runs intra-op parallelism on GNU OpenMP, which keeps a worker pool for
every thread that has started a parallel region. As soon as a second thread does (a gRPC handler thread
next to the thread that loaded the model, or a drafting thread next to the caller), libgomp counts more
workers than cores and switches every pool to throttled spinning, so each parallel region pays a futex
wake-up. Measured on the 2-core CPU machine: a 200k-element add took 19 us on the loading thread and
100-150 us on a handler thread, and an int8 drafter step 56 ms against 80-120 ms. Sending every forward,
sampling and verification through one thread keeps one pool. It also serialises the forwards of
concurrent requests, which on a CPU run faster one after another than interleaved.

Between calls the thread runs background work one step at a time (a drafter's lookahead): a queued call
waits at most one step.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

_STOP = object()


class ComputeThread:
    def __init__(self, name: str = "specdec-compute") -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._background: OrderedDict[object, Iterator[Any]] = OrderedDict()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._closed = False
        self._thread.start()

    @property
    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the compute thread and return its result (or raise its error)."""
        if self.on_thread:
            return fn(*args, **kwargs)
        if self._closed:
            raise RuntimeError("compute thread is closed")
        future: Future = Future()
        self._queue.put((fn, args, kwargs, future))
        return future.result()

    def set_background(self, key: object, steps: Iterator[Any]) -> None:
        """Run ``steps`` one ``next()`` at a time while no call waits (from the compute thread only)."""
        assert self.on_thread, "background work is managed from the compute thread"
        self._background[key] = steps

    def clear_background(self, key: object) -> None:
        """Drop ``key``'s background work; it is never resumed (from the compute thread only)."""
        assert self.on_thread, "background work is managed from the compute thread"
        self._background.pop(key, None)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            if not self.on_thread:
                self._thread.join()

    def _loop(self) -> None:
        while True:
            if self._background:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    self._step_background()
                    continue
            else:
                item = self._queue.get()
            if item is _STOP:
                self._background.clear()
                self._fail_pending()
                return
            fn, args, kwargs, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

    def _fail_pending(self) -> None:
        """Calls queued after ``close()`` raced its check: hand them an error instead of waiting forever."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item[3].set_running_or_notify_cancel():
                item[3].set_exception(RuntimeError("compute thread is closed"))

    def _step_background(self) -> None:
        key, steps = self._background.popitem(last=False)  # round robin over the owners
        try:
            next(steps)
        except StopIteration:
            return
        except Exception:  # noqa: BLE001 - background work is best effort: drop it, keep serving
            log.exception("background work of %r failed; dropped", key)
            return
        self._background[key] = steps


def run_on(compute: ComputeThread | None, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on ``compute`` when there is one, else right here (in-process use without a service)."""
    return compute.call(fn, *args) if compute is not None else fn(*args)
