"""Which generations run: a bounded number at once, the rest in a bounded first-come queue; and how one
is abandoned from another thread (its client went away)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# defined outside the runtime so the wire layer maps them to status codes without importing it
from ..errors import GenerationCancelled, QueueFull

__all__ = ["Admission", "Cancellation"]


class Cancellation:
    """A flag another thread raises to abandon a generation; callbacks run once when it is raised."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            if self.cancelled:
                return
            self.cancelled = True
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn()

    def on_cancel(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if not self.cancelled:
                self._callbacks.append(fn)
                return
        fn()

    def check(self) -> None:
        if self.cancelled:
            raise GenerationCancelled("generation cancelled")


class Admission:
    """``max_running`` generations at once; up to ``max_waiting`` more wait their turn in arrival order."""

    def __init__(self, max_running: int, max_waiting: int) -> None:
        if max_running < 1 or max_waiting < 0:
            raise ValueError("max_running must be >= 1 and max_waiting >= 0")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.running = 0
        self._queue: deque[object] = deque()
        self._cond = threading.Condition()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @contextmanager
    def slot(self, cancel: Cancellation | None = None) -> Iterator[None]:
        """Hold a running spot for the ``with`` body, waiting in line for it first.

        Raises ``QueueFull`` when the line is full; a waiter whose generation is cancelled leaves the line
        with ``GenerationCancelled``.
        """
        ticket = object()
        with self._cond:
            if self.running >= self.max_running or self._queue:
                if len(self._queue) >= self.max_waiting:
                    raise QueueFull(
                        f"verifier busy: {self.running} generations running (max_running "
                        f"{self.max_running}) and {len(self._queue)} waiting (max_waiting {self.max_waiting})"
                    )
                self._queue.append(ticket)
                try:
                    while True:
                        if cancel is not None and cancel.cancelled:
                            raise GenerationCancelled("left the queue: the client went away")
                        if self._queue[0] is ticket and self.running < self.max_running:
                            break
                        self._cond.wait(0.25)
                finally:
                    self._queue.remove(ticket)
                    self._cond.notify_all()
            self.running += 1
        try:
            yield
        finally:
            with self._cond:
                self.running -= 1
                self._cond.notify_all()
