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
(its logits come with the last chunk), so a long prompt does not stall the sessions already decoding; after
each chunk the rest queues behind the rows that waited meanwhile, so nothing starves. Rows that would be
padded wastefully together (narrow decoding rows beside a wide prompt chunk) take turns (``_by_width``).
*Background* jobs (a drafter's lookahead) run only in iterations with no other work. Plain calls
(``call``) run between iterations.

**Batch window.** The sequences of one forward come back together: each caller wakes, does its part
(sends a token, asks its drafter for a block) and submits its next row. Starting the next forward with the
first one back would split the batch for good: every forward re-reads the weights, so two half batches
cost nearly twice one full batch (measured: 8 streams over gRPC ran 4 rows per forward instead of 7, at
two thirds of the throughput). So before a forward of new rows the scheduler waits for the sequences of
its last forward, up to ``batch_wait`` times that forward's duration (at most ``max_batch_wait_s``), and
starts as soon as all of them are back: sessions that decode without drafting come back at once and
wait for the ones drafting, and the batch stays whole (one forward per round, the drafter batching the
drafts in between). A session whose drafter is late or dead delays the others by at most one forward's
time, once: it is not expected again until it has run. Prompts that arrive while the batch is away are
prefilled meanwhile, so a first token does not wait for the next round. New sessions arriving on an idle
scheduler are gathered for ``arrival_wait_s`` after the latest one, so clients calling at once share
their prefill.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from .interface import Row, Runner, Sequence

T = TypeVar("T")
log = logging.getLogger(__name__)

Job = Generator[Row, torch.Tensor, Any]  # yields rows, receives their logits [keep, vocab], returns a result

_STOP = object()
WIDE_ROW = 16  # a row feeding more tokens than this is a prompt (chunk), not a decoding or verify step


@dataclass(eq=False)
class Task:
    """A submitted job: its current row, how much of it is fed, and the future of its result."""

    runner: Runner
    job: Job
    background: bool = False
    future: Future = field(default_factory=Future)
    row: Row | None = None
    fed: int = 0  # tokens of ``row`` already fed (chunked rows)
    steps: int = 0  # rows of this job already run
    ready_since: float = 0.0
    cancelled: bool = False

    def cancel(self) -> None:
        """Drop the job at the next iteration (from any thread); its future raises ``CancelledError``."""
        self.cancelled = True


OnForward = Callable[[list[int], float], None]  # tokens fed by each row, seconds of the forward


def drive(runner: Runner, job: Job, on_forward: OnForward | None = None) -> Any:
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

    def run(self, runner: Runner, job: Job, on_task: Callable[[Task], None] | None = None) -> Any:
        return drive(runner, job, self.on_forward)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return fn(*args, **kwargs)


class Executor(Protocol):
    """Where a generation's jobs run: ``Scheduler`` (a service's compute thread) or ``Inline``."""

    def run(self, runner: Runner, job: Job, on_task: Callable[[Task], None] | None = None) -> Any: ...

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...


class Scheduler:
    """The compute thread of a service: calls, and jobs batched into one forward per iteration."""

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
        if max_rows < 1 or max_tokens < 1:
            raise ValueError("max_rows and max_tokens must be >= 1")
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.prefill_chunk = prefill_chunk  # 0: never split a row
        self.on_forward = on_forward
        self.batch_wait = batch_wait
        self.max_batch_wait_s = max_batch_wait_s
        self.arrival_wait_s = arrival_wait_s
        self.lease = lease if lease is not None else contextlib.nullcontext()
        self.forward_cost = forward_cost  # seconds of a forward by padded positions (None: proportional)
        self._expected: list[Sequence] = []  # sequences of the last forward, expected back
        self._last_forward_s = 0.0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._tasks: list[Task] = []  # on the thread only
        self._closed = False
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
        """Run ``fn(*args, **kwargs)`` on the compute thread between iterations; return or raise its result."""
        if self.on_thread:
            return fn(*args, **kwargs)
        future: Future = Future()
        self._put(("call", fn, args, kwargs, future))
        return future.result()

    def submit(self, runner: Runner, job: Job, background: bool = False) -> Task:
        """Queue ``job`` for ``runner``; its result arrives in ``task.future``."""
        task = Task(runner, job, background)
        self._put(("task", task))
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
            if not self._drain(item):
                return
            # jobs in the middle of their rows (a block being drafted, a prompt being chunked) go on at once;
            # otherwise the next forward waits for the sequences of the last one (the batch window)
            if not any(t.steps or t.fed for t in self._tasks if t.row is not None):
                if not self._wait_for_expected():
                    return
            self._iterate()

    def _drain(self, item, timeout: float | None = None) -> bool:
        """Take ``item`` and whatever else is queued; False once the scheduler is stopping."""
        while item is not None:
            if item is _STOP:
                self._shut_down()
                return False
            self._take(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                item = None
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
            ready = {id(t.row.seq) for t in self._tasks if t.row is not None}
            if all(id(s) in ready for s in expected):
                return True
            if self._prefill_meanwhile(expected):
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            try:
                item = self._inbox.get(timeout=remaining)
            except queue.Empty:
                return True
            if not self._drain(item):
                return False

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

    def _prefill_meanwhile(self, expected: list[Sequence]) -> bool:
        """While the batch's sessions are away (drafting), run the prompts that just arrived rather than
        idle: their first tokens need not wait for the next round. True if a forward ran."""
        away = {id(s) for s in expected}
        new = [
            t
            for t in self._tasks
            if t.row is not None
            and not t.steps
            and not t.background
            and not t.cancelled
            and id(t.row.seq) not in away
            and self._remaining(t) > WIDE_ROW
        ]
        if not new:
            return False
        by_runner: dict[int, list[tuple[Task, int]]] = {}
        for task in new[: self.max_rows]:
            n = self._feed_size(task, self.prefill_chunk or self.max_tokens, self.max_tokens)
            by_runner.setdefault(id(task.runner), []).append((task, n if n > 0 else self._remaining(task)))
        for group in by_runner.values():
            self._forward(group)
        self._expected = expected + self._expected  # still away: wait for them next
        self.iterations += 1
        return True

    def _gather_arrivals(self) -> bool:
        deadline = time.monotonic() + 10 * self.arrival_wait_s
        while self.arrival_wait_s > 0:
            try:
                item = self._inbox.get(
                    timeout=min(self.arrival_wait_s, max(deadline - time.monotonic(), 0.0))
                )
            except queue.Empty:
                return True
            if not self._drain(item):
                return False
        return True

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
            n = self._feed_size(task, chunk, budget)
            if n <= 0:
                if chosen:
                    continue
                n = self._remaining(task)  # nothing else to run: feed it whole rather than stall
            chosen.append((task, n))
            budget -= n
        return chosen

    @staticmethod
    def _remaining(task: Task) -> int:
        assert task.row is not None
        return len(task.row.tokens) - task.fed

    def _feed_size(self, task: Task, chunk: int, budget: int) -> int:
        """Tokens of ``task``'s row to feed now, at most ``chunk`` and ``budget``; a partial feed leaves the
        positions whose logits are wanted for one last piece (0: it does not fit)."""
        assert task.row is not None
        remaining = self._remaining(task)
        n = min(remaining, max(chunk, task.row.keep), budget)
        return n if n == remaining else min(n, remaining - task.row.keep)

    def _iterate(self) -> None:
        self._expected = []
        self._drop_cancelled()
        chosen = self._select()
        if not chosen:
            return
        by_runner: dict[int, list[tuple[Task, int]]] = {}
        for task, n in chosen:
            by_runner.setdefault(id(task.runner), []).append((task, n))
        for group in by_runner.values():
            self._forward(self._by_width(group))
        self.iterations += 1

    def _by_width(self, group: list[tuple[Task, int]]) -> list[tuple[Task, int]]:
        """The rows to run now: all of them, or, where padding them to one width costs more than a second
        forward, the narrow ones (decoding, verifying: up to ``WIDE_ROW`` tokens) or the wide ones (prompt
        chunks), whichever holds the row that waited longest (so they take turns, and a new prompt goes
        first). Prompts are not split among themselves: that would trade first tokens for little.

        Rows are padded to the widest (see ``runner.py``): 8 rows decoding one token each next to a 23-token
        prompt compute 9 x 23 positions (SmolLM2 on this CPU: 0.34 s against 0.09 + 0.11 s apart). On a GPU
        a forward of a few hundred positions costs what one of a few does, and the rows stay together.
        """
        narrow = [item for item in group if item[1] <= WIDE_ROW]
        wide = [item for item in group if item[1] > WIDE_ROW]
        if not narrow or not wide:
            return group
        cost = self.forward_cost or (lambda tokens: float(tokens))
        together = cost(len(group) * max(n for _, n in wide))
        apart = cost(len(narrow) * max(n for _, n in narrow)) + cost(len(wide) * max(n for _, n in wide))
        if apart >= 0.95 * together:
            return group
        oldest = min(group, key=lambda item: item[0].ready_since)  # whoever waited longest goes first
        return wide if any(item is oldest for item in wide) else narrow

    def _forward(self, group: list[tuple[Task, int]]) -> None:
        runner = group[0][0].runner
        rows = []
        for task, n in group:
            assert task.row is not None
            last = task.fed + n == len(task.row.tokens)
            piece = task.row.tokens[task.fed : task.fed + n]
            if last:  # a stepped row decodes its steps after its last piece
                rows.append(Row(task.row.seq, piece, task.row.keep, task.row.steps, task.row.pick))
            else:
                rows.append(Row(task.row.seq, piece, 0))
        try:
            with self.lease:  # our turn on cores shared with another service (see lease.py)
                t0 = time.perf_counter()
                outputs = runner.forward(rows)
                seconds = time.perf_counter() - t0
        except BaseException as exc:  # noqa: BLE001 - every job of the forward learns why
            for task, _ in group:
                task.job.close()
                self._finish(task, error=exc)
            return
        self.forwards += 1
        self.rows_run += len(rows)
        self.tokens_run += sum(len(r.tokens) + (r.steps - 1 if r.pick else 0) for r in rows)
        self.forward_s += seconds
        for (task, n), logits in zip(group, outputs):
            assert task.row is not None
            task.fed += n
            if task.fed == len(task.row.tokens):
                task.steps += 1
                self._advance(task, logits)
            else:  # a chunk of a long row: the rest queues behind the rows that waited meanwhile
                task.ready_since = time.monotonic()
        if self.on_forward is not None:
            # stepped rows ran one forward per step after the first: the time is shared evenly among them
            steps = max(r.steps if r.pick else 1 for r in rows)
            self.on_forward([len(r.tokens) for r in rows], seconds / steps)
            for step in range(1, steps):
                self.on_forward([1 for r in rows if r.pick and r.steps > step], seconds / steps)
        self._last_forward_s = seconds
        # the rows whose jobs finished are expected back for the next forward
        self._expected.extend(r.seq for (task, _), r in zip(group, rows) if task.row is None)
