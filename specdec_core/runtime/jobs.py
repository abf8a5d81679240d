"""What the speculative code hands the runtime: jobs, and the executors that run them.

A **job** is a generator that yields a ``Row`` (tokens to feed one sequence, logits wanted for the last
``keep`` of them) and receives its logits, until it returns its result::

    def verify_job():
        logits = yield Row(seq, pending + drafted, keep=k + 1)
        return verify(logits)

Whoever writes a job does not know who runs it: an ``Executor``. ``Inline`` drives it on the caller's
thread, one forward per row (in-process use); ``Scheduler`` (``scheduler.py``) batches the rows of many
callers' jobs on a service's compute thread. Either way a job's code runs on the thread that runs its
forwards, so the jobs of one sequence never race.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from .interface import Row, Runner

T = TypeVar("T")

Job = Generator[Row, torch.Tensor, Any]  # yields rows, receives their logits [keep, vocab], returns a result

OnForward = Callable[[list[int], float], None]  # tokens fed by each row, seconds of the forward


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
