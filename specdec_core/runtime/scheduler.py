"""The compute thread of a service: jobs from many callers, batched into one forward per iteration.

Why one thread: torch's CPU build runs intra-op parallelism on GNU OpenMP, which keeps a worker pool for
every thread that starts a parallel region. As soon as a second thread does (a gRPC handler next to the
thread that loaded the model), libgomp counts more workers than cores and throttles every pool's spinning,
so each parallel region pays a futex wake-up (docs/serving.md, "The scheduler"). So every forward of a
process runs here, and so does every job's code (``jobs.py``): its first step when the scheduler takes it
in, then after each of its forwards. Plain calls (``call``) run between iterations.

The thread's loop: take what arrived (``Inbox``: calls, tasks, the stop), wait for the batch (below), drop
the cancelled jobs, run the rows ``batching.py`` chooses, one forward per runner, and move each job on to
its next row or its result (``Tasks``). Sessions join and leave between iterations, and a job that is not
ready (its drafter is late, or dead) holds up nobody.

**Batch window.** The sequences of one forward come back together: each caller wakes, does its part
(sends a token, asks its drafter for a block) and submits its next row. Starting the next forward with the
first one back would split the batch for good: every forward re-reads the weights, so two half batches
cost nearly twice one full batch (docs/serving.md, "The scheduler"). So before a forward of new rows the
scheduler waits for the sequences of its last forward, up to ``batch_wait`` times that forward's duration
(at most ``max_batch_wait_s``), and starts as soon as all of them are back: sessions that decode without
drafting come back at once and wait for the ones drafting, and the batch stays whole (one forward per
round, the drafter batching the drafts in between). A session whose drafter is late or dead delays the
others by at most one forward's time, once: it is not expected again until it has run. Prompts that arrive
while the batch is away are prefilled meanwhile, so a first token does not wait for the next round. New
sessions arriving on an idle scheduler are gathered for ``arrival_wait_s`` after the latest one, so
clients calling at once share their prefill.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from .batching import Batcher, Feed, by_runner, rows_to_feed
from .interface import Row, Runner, Sequence
from .jobs import Job, OnForward, Task, drive

__all__ = ["Inbox", "Scheduler", "Tasks"]

T = TypeVar("T")

_STOP = object()


@dataclass(eq=False)
class _Call:
    """A plain call from another thread, run on the compute thread between iterations."""

    fn: Callable[..., Any]
    args: tuple
    kwargs: dict
    future: Future = field(default_factory=Future)

    def run(self) -> None:
        """Make the call (unless its future was cancelled); its future gets the result or the error."""
        if self.future.set_running_or_notify_cancel():
            try:
                self.future.set_result(self.fn(*self.args, **self.kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self.future.set_exception(exc)


class Inbox:
    """What other threads hand the compute thread, in order: calls, tasks, and last the stop."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = False

    def put(self, item: _Call | Task) -> None:
        """Queue ``item`` for the compute thread; RuntimeError once the scheduler is closed."""
        if self.closed:
            raise RuntimeError("compute thread is closed")
        self._queue.put(item)

    def close(self) -> bool:
        """Queue the stop; True the first time (nothing is taken in afterwards)."""
        if self.closed:
            return False
        self.closed = True
        self._queue.put(_STOP)
        return True

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """The next item; None when none came (at once, or within ``timeout``)."""
        try:
            return self._queue.get(block, timeout)
        except queue.Empty:
            return None

    def reject_rest(self) -> None:
        """Fail the calls and tasks that raced the stop: an error, never a hang."""
        while (item := self.get(block=False)) is not None:
            if item is not _STOP and item.future.set_running_or_notify_cancel():
                item.future.set_exception(RuntimeError("compute thread is closed"))


class Tasks:
    """The jobs taken in (on the compute thread only), in arrival order: each is run to its next row, and
    leaves the list before its future is resolved (a caller holding its result never counts it pending)."""

    def __init__(self) -> None:
        self._tasks: list[Task] = []

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks)

    def take(self, task: Task) -> None:
        """Take ``task`` in (unless its future was cancelled) and run its job to its first row."""
        if task.future.set_running_or_notify_cancel():
            self._tasks.append(task)
            self.advance(task, None)

    def busy(self) -> bool:
        """Some job has a row ready."""
        return any(t.row is not None for t in self._tasks)

    def mid_row(self) -> bool:
        """Some job with a row ready is in the middle of its rows (a drafted block, a chunked prompt)."""
        return any(t.steps or t.fed for t in self._tasks if t.row is not None)

    def ready_sequences(self) -> set[int]:
        """Ids of the sequences with a row ready."""
        return {id(t.row.seq) for t in self._tasks if t.row is not None}

    def fed(self, group: list[Feed], outputs: list) -> None:
        """After a forward: each task of ``group`` goes on with its job if its row is fed whole, or queues
        the rest of its row behind the rows that waited meanwhile."""
        for (task, n), logits in zip(group, outputs):
            assert task.row is not None
            task.fed += n
            if task.fed == len(task.row.tokens):
                task.steps += 1
                self.advance(task, logits)
            else:
                task.ready_since = time.monotonic()

    def advance(self, task: Task, logits: torch.Tensor | None) -> None:
        """Run the job to its next row (first step when ``logits`` is None) or to its result."""
        try:
            row = next(task.job) if logits is None else task.job.send(logits)
        except StopIteration as stop:
            self.finish(task, result=stop.value)
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self.finish(task, error=exc)
            return
        task.row, task.fed, task.ready_since = row, 0, time.monotonic()

    def finish(self, task: Task, result: Any = None, error: BaseException | None = None) -> None:
        """End ``task``: it leaves the list, then its future gets ``result`` or raises ``error``."""
        if task in self._tasks:
            self._tasks.remove(task)
        task.row = None
        if error is not None:
            task.future.set_exception(error)
        else:
            task.future.set_result(result)

    def fail(self, tasks: list[Task], error: BaseException | Callable[[], BaseException]) -> None:
        """Close the jobs of ``tasks``; their futures raise ``error`` (given a factory: one made for each)."""
        for task in tasks:
            task.job.close()
            self.finish(task, error=error if isinstance(error, BaseException) else error())

    def drop_cancelled(self) -> None:
        """End the cancelled tasks (``Task.cancel``): their futures raise ``CancelledError``."""
        self.fail([t for t in self._tasks if t.cancelled], CancelledError)


class Scheduler:
    """A service's compute thread (module docstring): calls, and jobs batched into one forward per iteration.

    ``call``, ``submit``, ``run``, ``close`` and ``pending`` may be used from any thread; the counters
    (``iterations``, ``forwards``, ``rows_run``, ``tokens_run``, ``forward_s``) are the thread's own.
    ``lease``: a context entered around each forward (``lease.py``); ``on_forward``: told the tokens of
    each row and the seconds of every forward (a stepped forward's time shared evenly among its steps).
    """

    def __init__(
        self,
        name: str = "specdec-compute",
        max_rows: int = 64,
        max_tokens: int = 512,
        prefill_chunk: int = 128,
        on_forward: OnForward | None = None,
        batch_wait: float = 1.0,
        max_batch_wait_s: float = 2.0,
        arrival_wait_s: float = 0.01,
        lease=None,
        forward_cost: Callable[[int], float] | None = None,
    ) -> None:
        self.batcher = Batcher(max_rows, max_tokens, prefill_chunk, forward_cost)
        self.on_forward = on_forward
        self.batch_wait = batch_wait
        self.max_batch_wait_s = max_batch_wait_s
        self.arrival_wait_s = arrival_wait_s
        self.lease = lease if lease is not None else contextlib.nullcontext()
        self._expected: list[Sequence] = []  # sequences of the last forward, expected back
        self._last_forward_s = 0.0
        self._inbox = Inbox()
        self._tasks = Tasks()
        self.iterations = 0
        self.forwards = 0
        self.rows_run = 0
        self.tokens_run = 0
        self.forward_s = 0.0  # seconds inside forwards (the rest of the thread's time is overhead or idle)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    # -- API (any thread) ----------------------------------------------------------------------------
    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, run on the compute thread between iterations (its error raised here)."""
        if self.on_thread:
            return fn(*args, **kwargs)
        item = _Call(fn, args, kwargs)
        self._inbox.put(item)
        return item.future.result()

    def submit(self, runner: Runner, job: Job, background: bool = False) -> Task:
        """Queue ``job`` for ``runner``; its result arrives in ``task.future``."""
        task = Task(runner, job, background)
        self._inbox.put(task)
        return task

    def run(self, runner: Runner, job: Job, on_task: Callable[[Task], None] | None = None) -> Any:
        """Submit ``job`` and wait for its result (``on_task`` sees the task first, e.g. to cancel it)."""
        if self.on_thread:  # a job that runs another job on this thread: no batching, just drive it
            return drive(runner, job)
        task = self.submit(runner, job)
        if on_task is not None:
            on_task(task)
        return task.future.result()

    def close(self) -> None:
        """Stop the thread (and wait for it, from another thread): the jobs taken in and whatever is still
        queued fail with RuntimeError, and so does every later call."""
        if self._inbox.close() and not self.on_thread:
            self._thread.join()

    @property
    def pending(self) -> int:
        """Jobs taken in and not finished (foreground and background)."""
        return len(self._tasks)

    # -- the loop (compute thread) ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            if not self._drain(self._inbox.get(block=not self._tasks.busy())):
                return
            # jobs in the middle of their rows (a block being drafted, a prompt being chunked) go on at once;
            # otherwise the next forward waits for the sequences of the last one (the batch window)
            if not self._tasks.mid_row():
                if not self._wait_for_expected():
                    return
            self._iterate()

    def _drain(self, item) -> bool:
        """Take ``item`` and whatever else is queued; False once the scheduler is stopping."""
        while item is not None:
            if item is _STOP:
                self._tasks.fail(list(self._tasks), lambda: RuntimeError("compute thread is closed"))
                self._inbox.reject_rest()
                return False
            if isinstance(item, _Call):
                item.run()
            else:
                self._tasks.take(item)
            item = self._inbox.get(block=False)
        return True

    def _wait_for_expected(self) -> bool:
        """The batch window (see the module docstring); False once the scheduler is stopping.

        With nobody expected (new sessions arriving on an idle scheduler), a burst of arrivals is gathered
        for ``arrival_wait_s`` after the latest one, so clients that call at the same moment share a forward.
        """
        expected = [s for s in self._expected if s.slot >= 0]  # released sequences are not coming back
        self._expected = []
        if not expected:
            return self._gather_arrivals()
        if not self.batch_wait:
            return True
        deadline = time.monotonic() + min(self.batch_wait * self._last_forward_s, self.max_batch_wait_s)
        while True:
            ready = self._tasks.ready_sequences()
            if all(id(s) in ready for s in expected):
                return True
            if self._prefill_meanwhile(expected):
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            item = self._inbox.get(timeout=remaining)
            if item is None:
                return True
            if not self._drain(item):
                return False

    def _gather_arrivals(self) -> bool:
        """Take arrivals until none came for ``arrival_wait_s`` (10 times that at most); False once the
        scheduler is stopping."""
        deadline = time.monotonic() + 10 * self.arrival_wait_s
        while self.arrival_wait_s > 0:
            item = self._inbox.get(timeout=min(self.arrival_wait_s, max(deadline - time.monotonic(), 0.0)))
            if item is None:
                return True
            if not self._drain(item):
                return False
        return True

    def _prefill_meanwhile(self, expected: list[Sequence]) -> bool:
        """While the batch's sessions are away (drafting), run the prompts that just arrived rather than
        idle: their first tokens need not wait for the next round. True if a forward ran."""
        groups = self.batcher.prompts(self._tasks, away={id(s) for s in expected})
        if not groups:
            return False
        for group in groups:
            self._forward(group)
        self._expected = expected + self._expected  # still away: wait for them next
        self.iterations += 1
        return True

    def _iterate(self) -> None:
        self._expected = []
        self._tasks.drop_cancelled()
        chosen = self.batcher.select(self._tasks)
        if not chosen:
            return
        for group in by_runner(chosen):  # each split by width after the forwards before it (their costs)
            self._forward(self.batcher.by_width(group))
        self.iterations += 1

    def _forward(self, group: list[Feed]) -> None:
        """One forward of ``group`` (one runner's feeds); every job of it learns the outcome."""
        rows = rows_to_feed(group)
        try:
            with self.lease:  # our turn on cores shared with another service (see lease.py)
                t0 = time.perf_counter()
                outputs = group[0][0].runner.forward(rows)
                seconds = time.perf_counter() - t0
        except BaseException as exc:  # noqa: BLE001 - every job of the forward learns why
            self._tasks.fail([task for task, _ in group], exc)
            return
        self.forwards += 1
        self.rows_run += len(rows)
        self.tokens_run += sum(len(r.tokens) + (r.steps - 1 if r.pick else 0) for r in rows)
        self.forward_s += seconds
        self._tasks.fed(group, outputs)
        if self.on_forward is not None:
            _report(self.on_forward, rows, seconds)
        self._last_forward_s = seconds
        # the rows whose jobs finished are expected back for the next forward
        self._expected.extend(r.seq for (task, _), r in zip(group, rows) if task.row is None)


def _report(on_forward: OnForward, rows: list[Row], seconds: float) -> None:
    """Tell ``on_forward`` of a forward of ``rows``: stepped rows ran one forward per step after the
    first, so the time is shared evenly among the steps."""
    steps = max(r.steps if r.pick else 1 for r in rows)
    on_forward([len(r.tokens) for r in rows], seconds / steps)
    for step in range(1, steps):
        on_forward([1 for r in rows if r.pick and r.steps > step], seconds / steps)
