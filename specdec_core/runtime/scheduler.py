"""Which rows run this iteration: continuous batching on a service's one compute thread.

Why one thread: torch's CPU build runs intra-op parallelism on GNU OpenMP, which keeps a worker pool for
every thread that starts a parallel region. As soon as a second thread does (a gRPC handler next to the
thread that loaded the model), libgomp counts more workers than cores and throttles every pool's spinning,
so each parallel region pays a futex wake-up (measured on the 2-core CPU machine: an int8 drafter step took
56 ms on the loading thread, 80-120 ms on a handler thread). So every forward of a process runs here.

Work arrives as **jobs**: generators that yield a ``Row`` (tokens to feed one sequence, logits wanted for
the last ``keep`` of them) and receive its logits, until they return their result::

    def verify_job():
        logits = yield Row(seq, pending + drafted, keep=k + 1)
        return verify(logits)

A job's code runs on this thread (its first step when the scheduler takes it in, then after each of its
forwards), so jobs of one sequence never race. Each **iteration** takes every job with a row ready, in
arrival order, up to ``max_rows`` rows and ``max_tokens`` tokens, and runs them as one forward per model:
sessions join and leave between iterations, and a job that is not ready (its drafter is late, or dead)
holds up nobody. A long row is fed in chunks of ``prefill_chunk`` tokens while other sequences are active
(its logits come with the last chunk), so a long prompt does not stall the sessions already decoding; an
unfinished row keeps its place at the head of the queue, so nothing starves. *Background* jobs (a
drafter's lookahead) run only in iterations with no other work. Plain calls (``call``) run between
iterations.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

import torch

from .runner import ModelRunner, Row

T = TypeVar("T")
log = logging.getLogger(__name__)

Job = Generator[Row, torch.Tensor, Any]  # yields rows, receives their logits [keep, vocab], returns a result

_STOP = object()


@dataclass(eq=False)
class Task:
    """A submitted job: its current row, how much of it is fed, and the future of its result."""

    runner: ModelRunner
    job: Job
    background: bool = False
    future: Future = field(default_factory=Future)
    row: Row | None = None
    fed: int = 0  # tokens of ``row`` already fed (chunked rows)
    ready_since: float = 0.0
    cancelled: bool = False

    def cancel(self) -> None:
        """Drop the job at the next iteration (from any thread); its future raises ``CancelledError``."""
        self.cancelled = True


OnForward = Callable[[list[int], float], None]  # tokens fed by each row, seconds of the forward


def drive(runner: ModelRunner, job: Job, on_forward: OnForward | None = None) -> Any:
    """Run ``job`` right here, one forward per row (in-process use without a scheduler)."""
    logits = None
    while True:
        try:
            row = next(job) if logits is None else job.send(logits)
        except StopIteration as stop:
            return stop.value
        t0 = time.perf_counter()
        logits = runner.forward([row])[0]
        if on_forward is not None:
            on_forward([len(row.tokens)], time.perf_counter() - t0)


class Inline:
    """The executor of in-process use: jobs driven on the caller's thread, calls made right away."""

    def __init__(self, on_forward: OnForward | None = None) -> None:
        self.on_forward = on_forward

    def run(self, runner: ModelRunner, job: Job, on_task: Callable[[Task], None] | None = None) -> Any:
        return drive(runner, job, self.on_forward)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return fn(*args, **kwargs)


Executor = Union["Scheduler", Inline]


class Scheduler:
    """The compute thread of a service: calls, and jobs batched into one forward per iteration."""

    def __init__(
        self,
        name: str = "specdec-compute",
        max_rows: int = 64,
        max_tokens: int = 512,
        prefill_chunk: int = 128,
        on_forward: OnForward | None = None,
    ) -> None:
        if max_rows < 1 or max_tokens < 1:
            raise ValueError("max_rows and max_tokens must be >= 1")
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.prefill_chunk = prefill_chunk  # 0: never split a row
        self.on_forward = on_forward
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._tasks: list[Task] = []  # on the thread only
        self._closed = False
        self.iterations = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    # -- API (any thread) ----------------------------------------------------------------------------
    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the compute thread between iterations; return or raise its result."""
        if self.on_thread:
            return fn(*args, **kwargs)
        future: Future = Future()
        self._put(("call", fn, args, kwargs, future))
        return future.result()

    def submit(self, runner: ModelRunner, job: Job, background: bool = False) -> Task:
        """Queue ``job`` for ``runner``; its result arrives in ``task.future``."""
        task = Task(runner, job, background)
        self._put(("task", task))
        return task

    def run(self, runner: ModelRunner, job: Job, on_task: Callable[[Task], None] | None = None) -> Any:
        """Submit ``job`` and wait for its result (``on_task`` sees the task first, e.g. to cancel it)."""
        if self.on_thread:  # a job that runs another job on this thread: no batching, just drive it
            return drive(runner, job)
        task = self.submit(runner, job)
        if on_task is not None:
            on_task(task)
        return task.future.result()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._inbox.put(_STOP)
            if not self.on_thread:
                self._thread.join()

    @property
    def pending(self) -> int:
        """Jobs taken in and not finished (foreground and background)."""
        return len(self._tasks)

    def _put(self, item) -> None:
        if self._closed:
            raise RuntimeError("compute thread is closed")
        self._inbox.put(item)

    # -- the loop (compute thread) ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            busy = any(t.row is not None for t in self._tasks)
            try:
                item = self._inbox.get_nowait() if busy else self._inbox.get()
            except queue.Empty:
                item = None
            while item is not None:
                if item is _STOP:
                    self._shut_down()
                    return
                self._take(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = None
            self._iterate()

    def _take(self, item) -> None:
        if item[0] == "call":
            _, fn, args, kwargs, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)
            return
        task = item[1]
        if task.future.set_running_or_notify_cancel():
            self._tasks.append(task)
            self._advance(task, None)

    def _advance(self, task: Task, logits: torch.Tensor | None) -> None:
        """Run the job to its next row (first step when ``logits`` is None) or to its result."""
        try:
            row = next(task.job) if logits is None else task.job.send(logits)
        except StopIteration as stop:
            self._finish(task, result=stop.value)
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self._finish(task, error=exc)
            return
        task.row, task.fed, task.ready_since = row, 0, time.monotonic()

    def _finish(self, task: Task, result: Any = None, error: BaseException | None = None) -> None:
        if task in self._tasks:
            self._tasks.remove(task)
        task.row = None
        if error is not None:
            task.future.set_exception(error)
        else:
            task.future.set_result(result)

    def _shut_down(self) -> None:
        for task in list(self._tasks):
            task.job.close()
            self._finish(task, error=RuntimeError("compute thread is closed"))
        while True:  # calls and jobs that raced close(): an error, never a hang
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is _STOP:
                continue
            future = item[4] if item[0] == "call" else item[1].future
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("compute thread is closed"))

    def _drop_cancelled(self) -> None:
        for task in [t for t in self._tasks if t.cancelled]:
            task.job.close()
            self._finish(task, error=CancelledError())

    def _select(self) -> list[tuple[Task, int]]:
        """The rows of this iteration: (task, tokens to feed now), in arrival order, within the limits."""
        ready = sorted((t for t in self._tasks if t.row is not None), key=lambda t: t.ready_since)
        foreground = [t for t in ready if not t.background]
        candidates = foreground or ready
        # split long rows only when someone else would wait for them
        others = len(foreground) > 1 or any(t.runner.active_sequences > 1 for t in candidates)
        chunk = self.prefill_chunk if self.prefill_chunk and others else self.max_tokens
        chosen: list[tuple[Task, int]] = []
        budget = self.max_tokens
        for task in candidates:
            if len(chosen) == self.max_rows or budget <= 0:
                break
            assert task.row is not None
            remaining = len(task.row.tokens) - task.fed
            n = min(remaining, max(chunk, task.row.keep), budget)
            if n < remaining:  # a partial feed: the positions whose logits are wanted come in one piece
                n = min(n, remaining - task.row.keep)
                if n <= 0:
                    if chosen:
                        continue
                    n = remaining  # nothing else to run: feed it whole rather than stall
            chosen.append((task, n))
            budget -= n
        return chosen

    def _iterate(self) -> None:
        self._drop_cancelled()
        chosen = self._select()
        if not chosen:
            return
        by_runner: dict[int, list[tuple[Task, int]]] = {}
        for task, n in chosen:
            by_runner.setdefault(id(task.runner), []).append((task, n))
        for group in by_runner.values():
            self._forward(group)
        self.iterations += 1

    def _forward(self, group: list[tuple[Task, int]]) -> None:
        runner = group[0][0].runner
        rows = []
        for task, n in group:
            assert task.row is not None
            last = task.fed + n == len(task.row.tokens)
            rows.append(
                Row(task.row.seq, task.row.tokens[task.fed : task.fed + n], task.row.keep if last else 0)
            )
        t0 = time.perf_counter()
        try:
            outputs = runner.forward(rows)
        except BaseException as exc:  # noqa: BLE001 - every job of the forward learns why
            for task, _ in group:
                task.job.close()
                self._finish(task, error=exc)
            return
        seconds = time.perf_counter() - t0
        for (task, n), logits in zip(group, outputs):
            assert task.row is not None
            task.fed += n
            if task.fed == len(task.row.tokens):
                self._advance(task, logits)
        if self.on_forward is not None:  # after the rows' results: they report what they emitted
            self.on_forward([len(r.tokens) for r in rows], seconds)
